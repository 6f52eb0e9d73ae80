"""Start one JAX process per device (or per group of devices) and wait for all of them.

Each process gets the environment a multi-process JAX job needs, and the script reads it:

  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordination service (all processes)
  JAX_NUM_PROCESSES        processes in the whole job (all hosts)
  JAX_PROCESS_ID           this process's id, 0 .. JAX_NUM_PROCESSES - 1
  JAX_LOCAL_DEVICE_IDS     GPU mode: the local GPU ids this process drives (e.g. "2"); also
                           NVSHMEM_DISABLE_NVLS=1, NCCL_NVLS_ENABLE=0,
                           XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 and,
                           on one host, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo and
                           NVSHMEM_REMOTE_TRANSPORT=none (unless set)
  JAX_NUM_CPU_DEVICES      CPU mode: virtual CPU devices of this process
  JAX_PLATFORMS            CPU mode: "cpu"

The script passes them to ``jax.distributed.initialize`` (``examples/train_moe.py`` does).

On one machine (the coordinator on a free localhost port):
  python examples/multihost/launch.py --num-processes 2 --cpu-devices 2 -- \\
      examples/train_moe.py --preset tiny
  python examples/multihost/launch.py --num-processes 4 --gpus -- \\
      examples/train_moe.py --preset gpu

On a cluster, run one launcher per host with the same coordinator (host 0's address):
  host 0:  launch.py --gpus --num-processes 4 --total-processes 8 --first-process-id 0 \\
               --coordinator host0:12355 -- examples/train_moe.py --preset gpu
  host 1:  launch.py --gpus --num-processes 4 --total-processes 8 --first-process-id 4 \\
               --coordinator host0:12355 -- examples/train_moe.py --preset gpu

Output lines are prefixed with ``[p<id>]``. If a process fails, the launcher stops the other
processes it started and exits with the failed process's status; so it does when it is itself
stopped (SIGTERM / SIGINT, e.g. by ``timeout``) or ``--timeout`` passes (status 124).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  """A TCP port that is free on this machine right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, coordinator: str, total: int, process_id: int,
                local_index: int, gpus: bool, gpus_per_process: int,
                cpu_devices: int, single_host: bool = True) -> dict[str, str]:
  """The environment of one process of the job."""
  env = dict(base)
  env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(total),
             JAX_PROCESS_ID=str(process_id))
  if gpus:
    first = local_index * gpus_per_process
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(first + i) for i in range(gpus_per_process))
    # jax_ep's triton runtime (docs/RUNTIME.md): no NVLink multicast, and room beside XLA's
    # pool for the NVSHMEM symmetric heap.
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    if single_host:
      env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
      env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
  else:
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
  if importlib.util.find_spec("jax_ep") is None:
    # Not installed: let the processes import the source checkout this launcher belongs to.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, base.get("PYTHONPATH")) if p)
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, b""):
    sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
    sys.stdout.flush()


def launch(command: list[str], *, num_processes: int, total_processes: int | None = None,
           first_process_id: int = 0, coordinator: str | None = None, gpus: bool = False,
           gpus_per_process: int = 1, cpu_devices: int = 1,
           timeout_s: float | None = None) -> int:
  """Run ``command`` (``[script.py, args...]`` for this Python) as ``num_processes`` processes.

  Returns 0 when all exit 0; otherwise the first failure's exit status (124 on timeout).
  """
  total = total_processes or num_processes
  if not 0 <= first_process_id <= total - num_processes:
    raise ValueError(
        f"launch: first_process_id={first_process_id} with num_processes={num_processes} "
        f"does not fit in total_processes={total}; ids must stay below {total}.")
  if coordinator is None:
    if total != num_processes:
      raise ValueError("launch: a job over several hosts needs --coordinator HOST:PORT "
                       "(host 0's address, the same on every host).")
    coordinator = f"127.0.0.1:{free_port()}"
  procs, pumps = [], []
  for i in range(num_processes):
    pid = first_process_id + i
    env = process_env(dict(os.environ), coordinator=coordinator, total=total, process_id=pid,
                      local_index=i, gpus=gpus, gpus_per_process=gpus_per_process,
                      cpu_devices=cpu_devices, single_host=total == num_processes)
    p = subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{pid}]"), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)

  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  stopped = []

  def on_signal(signum, frame):  # the children run in their own sessions: stop them too
    stopped.append(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, on_signal)
  try:
    status = _wait(procs, deadline, timeout_s, stopped)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for t in pumps:
    t.join(timeout=5)
  return status


def _wait(procs: list[subprocess.Popen], deadline: float | None, timeout_s: float | None,
          stopped: list) -> int:
  """Waits for ``procs``; stops them all on the first failure, the deadline or a signal."""
  status = 0
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed and status == 0:
      status = failed[0]
    if all(c is not None for c in codes):
      break
    if stopped:
      print(f"[launch] stopped by signal {stopped[0]}: stopping the processes", flush=True)
      _stop([p for p in procs if p.poll() is None])
      return 128 + stopped[0]
    if failed or (deadline is not None and time.monotonic() > deadline):
      if not failed:
        print(f"[launch] timeout after {timeout_s} s", flush=True)
        status = 124
      _stop([p for p in procs if p.poll() is None])
      break
    time.sleep(0.2)
  return status


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
  """SIGTERM the process groups of our own children, then SIGKILL what is left."""
  for p in procs:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  end = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-processes", type=int, default=2,
                      help="processes to start on this host")
  parser.add_argument("--total-processes", type=int, default=None,
                      help="processes in the whole job (default: --num-processes)")
  parser.add_argument("--first-process-id", type=int, default=0,
                      help="id of this host's first process (hosts number them in turn)")
  parser.add_argument("--coordinator", default=None,
                      help="HOST:PORT of process 0 (default: a free localhost port)")
  parser.add_argument("--gpus", action="store_true",
                      help="give each process its own GPU(s) instead of CPU devices")
  parser.add_argument("--gpus-per-process", type=int, default=1)
  parser.add_argument("--cpu-devices", type=int, default=1,
                      help="virtual CPU devices per process (CPU mode)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- script.py [args...] (run with this Python)")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the script to run after --, e.g. -- examples/train_moe.py --preset tiny")
  return launch(command, num_processes=args.num_processes,
                total_processes=args.total_processes, first_process_id=args.first_process_id,
                coordinator=args.coordinator, gpus=args.gpus,
                gpus_per_process=args.gpus_per_process, cpu_devices=args.cpu_devices,
                timeout_s=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
