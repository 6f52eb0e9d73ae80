#!/usr/bin/env bash
# Builds the jax_ep FFI library and runs every GPU test, on 2 and then on 4 GPUs of this host
# (when present), in one call. Prints a short summary last; full logs go to $OUT (if set) or
# build/gpu_logs/.
#
#   scripts/gpu_tests.sh                # both GPU counts
#   GPU_COUNTS="2" scripts/gpu_tests.sh # only 2 GPUs
#   TESTS="tests/gpu" PYTEST_TIMEOUT=500 PYTEST_ARGS="-x" SKIP_EXAMPLE=1 scripts/gpu_tests.sh
#
# Environment it sets (see docs/RUNTIME.md): NVSHMEM_DISABLE_NVLS=1 (never use NVLink
# multicast), a lower XLA_PYTHON_CLIENT_MEM_FRACTION so NVSHMEM's heap fits, and the NVSHMEM
# bootstrap on the loopback interface (one host).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-build/gpu_logs}
mkdir -p "$LOGS"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export JAX_EP_CACHE_DIR=${JAX_EP_CACHE_DIR:-$PWD/build/kernel_cache}
export PYTHONUNBUFFERED=1

if ! $PY -c "import pytest" 2>/dev/null; then
  # Machines without pytest: install carried wheels (see .whl/ in the device notes).
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== host"; date -u; nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -6
$PY -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__)"
$PY -m pip show nvidia-nvshmem-cu13 2>/dev/null | grep -i ^version

echo "== build"
BUILD=build/gpu
if ! { cmake -S . -B $BUILD -DPython_EXECUTABLE="$(command -v $PY)" > "$LOGS/cmake.log" 2>&1 && \
       cmake --build $BUILD -j 8 >> "$LOGS/cmake.log" 2>&1; }; then
  tail -30 "$LOGS/cmake.log"; echo "SUMMARY build failed"; exit 1
fi
grep "jax_ep:" "$LOGS/cmake.log"
export JAX_EP_FFI_LIB=$PWD/$BUILD/jax_ep/libjax_ep_ffi.so

NGPU=$(nvidia-smi -L | wc -l)
TESTS=${TESTS:-tests/gpu/test_runtime_gpu.py tests/gpu/test_nvshmem_multiprocess.py}
summary=()
status=0
for n in ${GPU_COUNTS:-2 4}; do
  if [ "$n" -gt "$NGPU" ]; then summary+=("gpus=$n: skipped (host has $NGPU)"); continue; fi
  devs=$(seq -s, 0 $((n - 1)))
  echo "== tests on $n GPUs (CUDA_VISIBLE_DEVICES=$devs)"
  CUDA_VISIBLE_DEVICES=$devs timeout ${PYTEST_TIMEOUT:-280} $PY -m pytest -m gpu $TESTS -q -rA -s \
      -p no:cacheprovider ${PYTEST_ARGS:-} > "$LOGS/pytest_gpus$n.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|^E |\"(init_s|calls_s)\"" "$LOGS/pytest_gpus$n.log" | head -40
  summary+=("gpus=$n: rc=$rc $(tail -1 "$LOGS/pytest_gpus$n.log")")
done
for n in ${GPU_COUNTS:-2 4}; do
  [ "$n" -le "$NGPU" ] && [ -z "${SKIP_EXAMPLE:-}" ] || continue
  echo "== example on $n GPUs: scripts/launch_multiprocess.sh examples/multiprocess/allgather.py"
  GPUS_PER_NODE=$n timeout 180 scripts/launch_multiprocess.sh examples/multiprocess/allgather.py \
      --calls 200 --loop 1000 > "$LOGS/example_gpus$n.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  grep -E "\[rank|Error|error" "$LOGS/example_gpus$n.log" | head -12
  summary+=("example gpus=$n: rc=$rc")
done
echo "== SUMMARY ($(date -u +%FT%TZ))"
for s in "${summary[@]}"; do echo "SUMMARY $s"; done
exit $status
