#!/usr/bin/env bash
# Starts one JAX process per local GPU for the triton backend's NVSHMEM provider, and waits.
#
#   scripts/launch_multiprocess.sh SCRIPT.py [ARGS...]
#
# One host (defaults): every visible GPU, coordinator on localhost.
#   scripts/launch_multiprocess.sh examples/multiprocess/allgather.py --calls 100
#
# Several hosts: run it once on every host with the same COORDINATOR (host 0's routable
# address) and NNODES, and NODE_RANK = 0 .. NNODES-1; every host must have GPUS_PER_NODE GPUs.
#   host 0: COORDINATOR=10.0.0.1:12355 NNODES=2 NODE_RANK=0 NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=eth0 \
#           scripts/launch_multiprocess.sh train.py
#   host 1: COORDINATOR=10.0.0.1:12355 NNODES=2 NODE_RANK=1 NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=eth0 \
#           scripts/launch_multiprocess.sh train.py
# On a SLURM cluster, NODE_RANK=$SLURM_NODEID and NNODES=$SLURM_NNODES work the same way.
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and
# JAX_LOCAL_DEVICE_IDS (its one GPU); the script passes them to jax.distributed.initialize()
# (see examples/multiprocess/allgather.py) and then calls jax_ep.runtime.initialize(configs).
#
# Environment for the runtime (override as needed; docs/RUNTIME.md explains each):
#   NVSHMEM_DISABLE_NVLS=1              jax_ep never uses NVLink multicast
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.6  leave GPU memory for the NVSHMEM heap
#   NVSHMEM_SYMMETRIC_SIZE              NVSHMEM heap per GPU (default 1 GiB); initialize says
#                                       when to raise it
#   NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME   interface rank 0 advertises: lo on one host, the
#                                       routable NIC across hosts
set -euo pipefail
if [ $# -lt 1 ]; then sed -n 2,30p "$0"; exit 2; fi
PY=${PYTHON:-python3}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ -z "${COORDINATOR:-}" ]; then
  [ "$NNODES" -eq 1 ] || { echo "set COORDINATOR=host0:port on every host" >&2; exit 2; }
  PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  COORDINATOR=127.0.0.1:$PORT
fi
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
if [ "$NNODES" -eq 1 ]; then
  export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
fi
TOTAL=$((NNODES * GPUS_PER_NODE))

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((local = 0; local < GPUS_PER_NODE; local++)); do
  pid=$((NODE_RANK * GPUS_PER_NODE + local))
  (
    JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$TOTAL JAX_PROCESS_ID=$pid \
    JAX_LOCAL_DEVICE_IDS=$local "$PY" "$@" 2>&1 | sed -u "s/^/[p$pid] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
[ $status -eq 0 ] || { echo "launch_multiprocess: a process failed" >&2; cleanup; }
exit $status
