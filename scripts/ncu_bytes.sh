#!/usr/bin/env bash
# DRAM and L2 traffic, duration and SM clock of one launch of a grouped GEMM kernel and of the
# dense cuBLAS product of the same FLOPs, by Nsight Compute metrics (one GPU, clocks untouched).
#
#   scripts/ncu_bytes.sh "SHAPE:PRODUCT:KERNEL_REGEX ..."   > log
#   e.g. scripts/ncu_bytes.sh "dsv3_up:fwd:grouped_gemm_ws dsv3_up:dw:grouped_gemm_dw_gluon"
#
# Each entry profiles the third launch of KERNEL_REGEX in benchmarks/probes/one_gemm_launch.py
# SHAPE PRODUCT triton, then the third cuBLAS launch of the same with dense. Needs the FFI
# library (JAX_EP_FFI_LIB) like the benchmarks.
set -u
[ $# -eq 1 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
M=${NCU_METRICS:-gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed}
for entry in $1; do
  IFS=: read -r shape product kernel <<< "$entry"
  for impl in triton dense; do
    regex=$kernel; [ "$impl" = dense ] && regex='nvjet|xmma|cutlass|gemm'
    echo "== $shape $product $impl (kernel regex $regex)"
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} ncu --clock-control none \
      --target-processes all -k "regex:$regex" --launch-skip 2 --launch-count 1 --metrics "$M" \
      $PY benchmarks/probes/one_gemm_launch.py "$shape" "$product" "$impl" 2>&1 \
      | grep -E '__|one_gemm_launch|==PROF==|rror|Context' | grep -v 'PROF== Connected'
  done
done
