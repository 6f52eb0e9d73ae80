#!/usr/bin/env bash
# One GPU session in one command: build the FFI library, then run the chosen stages, each under
# its own time limit, logs into $OUT (default build/gpu_logs). Prints a SUMMARY line per stage.
#
#   STAGES="bench dc_tests" scripts/gpu_run_all.sh          # 4x H200: benchmark + GPU tests
#   STAGES="soak faults train gemm" scripts/gpu_run_all.sh
#
# Stages (all GPUs of the host unless said):
#   bench     benchmarks/bench_dispatch_combine.py, DeepSeek-V3 shape, one process (peer) [BENCH_ARGS]
#   bench_mp  the same, one process per GPU (nvshmem)
#   dc_tests  tests/gpu/test_dispatch_combine_gpu.py (peer + one process per GPU) [DC_ARGS, e.g. -k ...]
#   dc_tests2 the same on GPUs 0 and 1 only (the 2-GPU runs)
#   soak      tests/gpu/test_soak_gpu.py: 2,000 triton-vs-xla rounds, 20-repeat hash, resources
#   faults    tests/gpu/test_faults_gpu.py: absent / dying / mismatched ranks, then a restart
#   runtime   tests/gpu/test_runtime_gpu.py + test_nvshmem_multiprocess.py (the runtime's own)
#   train     scripts/gpu_train.sh: the training example with both backends, both runtime modes
#   gemm      tests/gpu/test_grouped_gemm_gpu.py + benchmarks/bench_grouped_gemm.py (GPU 0)
#   gemm_sweep  bench_grouped_gemm.py --sweep on GEMM_SWEEP_ARGS' shapes (default the Qwen3 ones)
#   copyrate  benchmarks/bench_copy_rate.py: the expansion's row copies alone, GPU 0, per programs
#   nvlink    benchmarks/bench_nvlink_rate.py: remote stores vs remote loads per program [NVLINK_ARGS]
#   ce        benchmarks/bench_ce_rate.py: the same all-to-all by copy engines [CE_ARGS]
#   ncu_gemm  Nsight Compute on one grouped GEMM launch per shape [NCU_SHAPES, NCU_KERNEL, NCU_GEMM_ARGS]
#   mcprobe   benchmarks/probes/bench_multicast_gemm.py under a Triton >= 3.9 unpacked from
#             wheels/triton-3.9.0-slim.tar.xz (GPU 0; carry it: scripts/slim_triton.sh) [MC_ARGS]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export JAX_EP_CACHE_DIR=${JAX_EP_CACHE_DIR:-$PWD/build/kernel_cache}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=()

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  timeout -s INT -k 10 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $(( $(date +%s) - t0 ))s: $(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -1)")
  tail -n "${TAIL:-15}" "$OUT/$name.log"
}

if [ ! -f build/gpu/jax_ep/libjax_ep_ffi.so ] || [ ffi/jax_ep_ffi.cc -nt build/gpu/jax_ep/libjax_ep_ffi.so ]; then
  echo "== build $(date -u +%T)"
  if ! { cmake -S . -B build/gpu -DPython_EXECUTABLE="$(command -v $PY)" > "$OUT/build.log" 2>&1 &&
         cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1; }; then
    tail -30 "$OUT/build.log"; echo "SUMMARY build failed"; exit 1
  fi
fi
export JAX_EP_FFI_LIB=$PWD/build/gpu/jax_ep/libjax_ep_ffi.so
PT="$PY -m pytest -m gpu -q -rA -s -p no:cacheprovider"
DC="JAX_EP_MP_TIMEOUT=140 $PT tests/gpu/test_dispatch_combine_gpu.py --timeout=150 ${DC_ARGS:-}"

for s in ${STAGES:-bench dc_tests}; do
  case $s in
    bench) stage bench ${BENCH_LIMIT:-300} "$PY benchmarks/bench_dispatch_combine.py --mode peer --shapes \
        ${BENCH_SHAPES:-dsv3_4096_uniform} --no-nccl --op-timeout 20 --timeout 280 --out $OUT \
        ${BENCH_ARGS:---sweep 0.3125@32,0.4375@32,0.375@32@2,0.375@64}" ;;
    bench_mp) stage bench_mp 300 "$PY benchmarks/bench_dispatch_combine.py --mode nvshmem \
        --shapes ${BENCH_SHAPES:-dsv3_4096_uniform} --no-nccl --timeout 280 --out $OUT \
        ${BENCH_ARGS:-}" ;;
    dc_tests) stage dc_tests ${DC_LIMIT:-300} "$DC" ;;
    dc_tests2) stage dc_tests2 ${DC_LIMIT:-300} "CUDA_VISIBLE_DEVICES=0,1 $DC" ;;
    # 2,000 rounds took ~230 s after compiles on 4 H200 (8.6 rounds/s), plus the 20-repeat
    # hash and the resource checks: give it 420 s.
    soak) stage soak 450 "JAX_EP_SOAK_ROUNDS=${SOAK_ROUNDS:-2000} JAX_EP_SOAK_TIMEOUT=420 \
        JAX_EP_SOAK_OUT=$OUT/soak_gpu.json $PT tests/gpu/test_soak_gpu.py --timeout=430" ;;
    faults) stage faults 330 "mkdir -p $OUT/faults; JAX_EP_FAULT_LOGS=$OUT/faults $PT \
        tests/gpu/test_faults_gpu.py --timeout=300" ;;
    runtime) stage runtime ${RUNTIME_LIMIT:-300} "$PT tests/gpu/test_runtime_gpu.py \
        tests/gpu/test_nvshmem_multiprocess.py --timeout=280" ;;
    train) stage train 430 "mkdir -p $OUT/train; OUT=$OUT/train bash scripts/gpu_train.sh" ;;
    # Tests ~125 s, then the benchmark ~50 s per shape (4 shapes) on one H200.
    # (the stage's rc is the tests' when they fail, else the benchmark's)
    gemm) stage gemm ${GEMM_LIMIT:-420} "CUDA_VISIBLE_DEVICES=0 $PT tests/gpu/test_grouped_gemm_gpu.py \
        --timeout=120; r=\$?; CUDA_VISIBLE_DEVICES=0 $PY benchmarks/bench_grouped_gemm.py \
        ${GEMM_ARGS:---iters 20} --out $OUT; b=\$?; exit \$(( r ? r : b ))" ;;
    # Compiling the ~136 candidates alone took 186 s (12 workers): one or two shapes per call.
    gemm_sweep) stage gemm_sweep ${GEMM_SWEEP_LIMIT:-540} "CUDA_VISIBLE_DEVICES=0 $PY \
        benchmarks/bench_grouped_gemm.py --sweep --sweep-budget 120 \
        ${GEMM_SWEEP_ARGS:---shapes qwen3_up,qwen3_down} --out $OUT" ;;
    copyrate) stage copyrate 120 "CUDA_VISIBLE_DEVICES=0 $PY benchmarks/bench_copy_rate.py \
        --out $OUT ${COPY_ARGS:-}" ;;
    nvlink) stage nvlink ${NVLINK_LIMIT:-200} "$PY benchmarks/bench_nvlink_rate.py --out $OUT \
        ${NVLINK_ARGS:-}" ;;
    mcprobe) stage mcprobe ${MC_LIMIT:-420} "$PY -c 'import tarfile; tarfile.open(\
        \"wheels/triton-3.9.0-slim.tar.xz\").extractall(\"/tmp/triton39\")' && \
        CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/triton39:\$PYTHONPATH TRITON_BACKENDS_IN_TREE=1 \
        TRITON_PTXAS_BLACKWELL_PATH=/tmp/triton39/triton/backends/nvidia/bin/ptxas \
        TRITON_CACHE_DIR=/tmp/triton39_cache $PY benchmarks/probes/bench_multicast_gemm.py \
        --out $OUT ${MC_ARGS:-}" ;;
    ce) stage ce ${CE_LIMIT:-150} "$PY benchmarks/bench_ce_rate.py --out $OUT ${CE_ARGS:-}" ;;
    # Nsight Compute on one launch of a grouped GEMM kernel per shape (GPU 0; hardware counters
    # on Firecracker machines only, see the device notes): where a kernel's time goes.
    # NCU_SOURCE=1: the full section set with per-instruction (SASS) counters and stall
    # samples, exported as $OUT/ncu_<shape>_sass.csv.gz (read it with scripts/ncu_sass_summary.py).
    ncu_gemm) stage ncu_gemm ${NCU_LIMIT:-300} "ncu --version | tail -1; \
        for sh in ${NCU_SHAPES:-dsv3_up 32768x8x7168x4096}; do echo \"== ncu \$sh\"; \
        if [ -n \"${NCU_SOURCE:-}\" ]; then what=\"--set full --import-source yes -f \
        -o /tmp/ncu_\$sh\"; else what=\"--section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section SchedulerStats\"; fi; \
        CUDA_VISIBLE_DEVICES=0 ncu --clock-control none --target-processes all \
        -k regex:${NCU_KERNEL:-grouped_gemm_dw} --launch-skip 2 --launch-count 1 \$what \
        $PY benchmarks/bench_grouped_gemm.py --shapes \$sh --sweep --sweep-only --jobs 2 \
        --sweep-iters 1 ${NCU_GEMM_ARGS:---sweep-phases dw --sweep-labels default} \
        --out /tmp/ncu_bench; if [ -n \"${NCU_SOURCE:-}\" ]; then \
        ncu -i /tmp/ncu_\$sh.ncu-rep --page details --print-details all | grep -v '^ *\$' \
        > $OUT/ncu_\${sh}_details.txt; ncu -i /tmp/ncu_\$sh.ncu-rep --page source --csv \
        --print-source sass | gzip > $OUT/ncu_\${sh}_sass.csv.gz; fi; done" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "== SUMMARY $(date -u +%FT%TZ) $(nvidia-smi -L | head -1) x $(nvidia-smi -L | wc -l)"
for s in "${summary[@]}"; do echo "SUMMARY $s"; done
