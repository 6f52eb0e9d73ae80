#!/usr/bin/env bash
# The training example on the GPUs of one host, both runtime modes, xla vs triton (issue #6):
#
#   1. one process driving every GPU (peer provider): train 40 steps with the xla backend, then
#      40 with the triton backend (same parameters, same batches), kernel timeout 45 s,
#      JAX_EP_CHECK_TIMEOUTS=0 (errors read from the kernels' records after the first step and
#      at the end), watchdog printing the runtime's launch counts when a step stalls;
#   2. one process per GPU (NVSHMEM provider, examples/multihost/launch.py): the same;
#   3. a diagnostic one-process run, chosen by what step 1 showed:
#        step 1 failed  -> --warmup-kernels (every jax_ep op launched alone before training), plus
#                          CUDA_MODULE_LOADING=EAGER unless the watchdog saw the FFI lock held;
#        step 1 passed  -> the settings of the failed 2026-11-21 run (JAX_EP_CHECK_TIMEOUTS=1,
#                          timeout 10 s), triton only, to see whether it reproduces.
#
# Run from the repository root on the GPU machine (about 4-7 minutes; every step has its own
# time limit inside a 400 s budget):
#
#   OUT=/some/dir bash scripts/gpu_train.sh
#
# Environment: JAX_EP_FFI_LIB (else the library is built with CMake into build/gpu), and what
# the runtime needs (set here unless set): NVSHMEM_DISABLE_NVLS=1, NCCL_NVLS_ENABLE=0,
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.5, PYTHONPATH=$PWD. Knobs: STEPS (40), GPUS (all),
# BUDGET_S (400), PRESET (gpu; "tiny" for a smoke run of this script).
#
# Output in $OUT (at most 7 files): summary.txt (tables, first-step times, errors, diagnoses),
# train_onep.log and train_mp.log (full logs), results.json (every run's metrics.json),
# loss_onep.png, loss_mp.png (and loss_onep_warm.png): loss curves of both backends.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu_train}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_train.XXXXXX)
START=$(date +%s)
BUDGET_S=${BUDGET_S:-400}
STEPS=${STEPS:-40}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export JAX_EP_CACHE_DIR=${JAX_EP_CACHE_DIR:-$PWD/build/kernel_cache}
# Compiled steps are reused across the runs below where the program is the same.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

say "== host $(date -u +%FT%TZ)"
nvidia-smi -L 2>&1 | tee -a "$SUMMARY"
$PY -c "import jax, triton, flax; print('jax', jax.__version__, 'triton', triton.__version__,
'flax', flax.__version__)" 2>&1 | tee -a "$SUMMARY"

if [ -z "${JAX_EP_FFI_LIB:-}" ]; then
  say "== JAX_EP_FFI_LIB not set: building the FFI library into build/gpu"
  if cmake -S . -B build/gpu -DPython_EXECUTABLE="$(command -v $PY)" > "$WORK/cmake.log" 2>&1 && \
     cmake --build build/gpu -j 8 >> "$WORK/cmake.log" 2>&1; then
    export JAX_EP_FFI_LIB=$PWD/build/gpu/jax_ep/libjax_ep_ffi.so
  else
    tail -20 "$WORK/cmake.log" | tee -a "$SUMMARY"; say "SUMMARY build failed"; exit 1
  fi
fi
say "JAX_EP_FFI_LIB=$JAX_EP_FFI_LIB"
NGPU=${GPUS:-$(nvidia-smi -L | grep -c "^GPU ")}

# Every run: the gpu preset, short schedule (lr warm-up 10 steps), tokens/s after 5 steps.
COMMON=(examples/train_moe.py --preset "${PRESET:-gpu}" --steps "$STEPS" --warmup 10
        --warmup-steps 5 --log-every 10 --no-progress --watchdog-s 15)

# run NAME LOG LIMIT_S [ENV=VALUE ...] -- ARGS...: one python run under `timeout`, appended to LOG.
run() {
  local name=$1 log=$2 limit=$3
  shift 3
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local budget; budget=$(left)
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 60 ]; then
    say "-- $name: skipped (${limit} s of the budget left)"; echo skipped > "$WORK/$name.rc"
    return
  fi
  say "-- $name (limit ${limit} s): ${envs[*]} $*"
  echo "##### RUN $name: ${envs[*]} $*" >> "$log"
  local t0; t0=$(date +%s)
  env "${envs[@]}" timeout -k 15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$rc" > "$WORK/$name.rc"
  say "   rc=$rc after $(( $(date +%s) - t0 )) s"
  # What the run said that matters: tables, first-step times, failures, watchdog reports.
  awk -v n="$name" '$0 ~ "^##### RUN "n":" {on=1; next} /^##### RUN / {on=0} on' "$log" | \
    grep -E "backend  |^(\[p0\] )?(xla|triton) |tokens/s triton|first step ran|compiled in|\
warmed up|warm-up did not|failed|diagnosis|watchdog|Error|error:|\[launch\]|\
process [0-9]+: backend|held-out|step +$STEPS/" | head -40 | sed 's/^/   /' | tee -a "$SUMMARY"
}

ONEP=$OUT/train_onep.log
MP=$OUT/train_mp.log
: > "$ONEP"; : > "$MP"

say "== 1. one process x $NGPU GPUs (peer provider): xla then triton, CHECK=0, timeout 45 s"
run onep_check0 "$ONEP" 200 -- "$PY" "${COMMON[@]}" --compare-backends xla,triton \
    --check-timeouts 0 --timeout-s 45 --stall-abort-s 75 --eval-batches 2 \
    --out-dir "$WORK/onep_check0"

say "== 2. $NGPU processes x 1 GPU (NVSHMEM provider): xla then triton, CHECK=0, timeout 45 s"
budget=$(left); limit=$(( budget < 190 ? budget : 190 ))
if [ "$limit" -ge 60 ]; then
  run mp "$MP" $((limit + 30)) -- "$PY" examples/multihost/launch.py --gpus \
      --num-processes "$NGPU" --timeout "$limit" -- "${COMMON[@]}" \
      --compare-backends xla,triton --check-timeouts 0 --timeout-s 45 --stall-abort-s 90 \
      --eval-batches 2 --out-dir "$WORK/mp"
else
  say "-- mp: skipped (${limit} s of the budget left)"
fi

say "== 3. diagnostic one-process run"
if [ "$(cat "$WORK/onep_check0.rc" 2>/dev/null)" = "0" ]; then
  say "   step 1 passed: replay the failed run's settings (CHECK=1, timeout 10 s), triton only"
  run onep_replay "$ONEP" 150 -- "$PY" "${COMMON[@]}" --compare-backends triton \
      --check-timeouts 1 --timeout-s 10 --stall-abort-s 60 --eval-batches 0 \
      --out-dir "$WORK/onep_replay"
else
  extra=(CUDA_MODULE_LOADING=EAGER)
  if grep -q "FFI lock held" "$ONEP"; then extra=(); fi
  say "   step 1 failed: each op launched alone first (--warmup-kernels) ${extra[*]}"
  run onep_warm "$ONEP" 200 "${extra[@]}" -- "$PY" "${COMMON[@]}" \
      --compare-backends xla,triton --warmup-kernels --check-timeouts 0 --timeout-s 45 \
      --stall-abort-s 75 --eval-batches 0 --out-dir "$WORK/onep_warm"
fi

# Aggregate: every run's metrics.json into results.json; the loss plots.
$PY - "$WORK" "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, os, shutil, sys
work, out = sys.argv[1:3]
results = {}
for name in ("onep_check0", "mp", "onep_replay", "onep_warm"):
  path = os.path.join(work, name, "metrics.json")
  rc_path = os.path.join(work, f"{name}.rc")
  rc = open(rc_path).read().strip() if os.path.exists(rc_path) else None
  if os.path.exists(path):
    with open(path) as f:
      results[name] = dict(rc=rc, **json.load(f))
  elif rc is not None:
    results[name] = dict(rc=rc, error="no metrics.json (stopped before the first run ended)")
with open(os.path.join(out, "results.json"), "w") as f:
  json.dump(results, f)
for name, png in (("onep_check0", "loss_onep.png"), ("onep_warm", "loss_onep_warm.png"),
                  ("mp", "loss_mp.png")):
  src = os.path.join(work, name, "loss.png")
  if os.path.exists(src):
    shutil.copy(src, os.path.join(out, png))
print("== RESULTS (tokens/s after 5 warm-up steps; final = last step's training loss)")
for name, m in results.items():
  runs = m.get("runs", {})
  for backend, r in runs.items():
    losses = r.get("losses") or []
    status = "FAILED" if r.get("error") else ("skipped" if r.get("skipped") else "ok")
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    print(f"RESULT {name:12s} {backend:7s} {m.get('mode', '?'):32s} "
          f"{r.get('tokens_per_s', 0):>12,.0f} tok/s  loss {first:.3f} -> {last:.3f}  "
          f"first step {r.get('first_step_s', 0):.1f} s  {status}")
    if r.get("error"):
      print(f"       error: {r['error'][:600]}")
    if r.get("diagnosis"):
      print(f"       diagnosis: {r['diagnosis'][:600]}")
  if m.get("tokens_per_s_ratio"):
    print(f"RESULT {name:12s} triton / xla tokens/s = {m['tokens_per_s_ratio']:.3f}")
  if not runs:
    print(f"RESULT {name:12s} rc={m.get('rc')} {m.get('error', '')}")
EOF
say "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
