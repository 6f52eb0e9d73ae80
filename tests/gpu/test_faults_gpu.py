"""Faults in one-process-per-GPU jobs (NVSHMEM provider): the others stop, the job restarts.

Each test starts one process per GPU running ``tests/gpu/fault_worker.py`` with a scenario
(see its docstring); the victim is the last rank (rank 0 hosts JAX's coordination service):
  * absent: the victim never calls dispatch (it stays alive, then exits 0);
  * dies:   after one correct step with everyone, the victim SIGKILLs itself before the next;
  * config: the victim runs the step with a different EPConfig (capacity).
The others must stop within a few ``EPConfig.timeout_s`` (3 s here) with an error naming the op
(the step's TimeoutError / ValueError, raised through the backend's ``jax.debug.callback``)
and ``jax_ep.backends.triton.check_timeouts()`` must name the missing rank; every process must
exit within the job's wall bound and none may be left running. Then a healthy job on the same
GPUs (fresh processes, triton equal to xla) shows that the job can be restarted.

Every scenario runs with 2 ranks (the first 2 visible GPUs); ``dies`` also with 4 when there
are 4. Per job, the ranks' logs, their ``RESULT`` lines and a ``summary.json`` (errors,
seconds to the error, exit codes) go to ``$JAX_EP_FAULT_LOGS/<job>/`` (default: pytest's
tmp_path), and one line per job to ``$JAX_EP_FAULT_LOGS/faults_summary.jsonl``.

Run (needs libjax_ep_ffi.so and NVSHMEM, see docs/RUNTIME.md; ~3 minutes on 4 GPUs):
  JAX_EP_FAULT_LOGS=/tmp/faults python -m pytest tests/gpu/test_faults_gpu.py -m gpu -q \
      --timeout=400
``JAX_EP_FAULTS_DRY_RUN=1`` runs the same tests on CPU (workers with ``--cpu``: xla backend,
simulated errors): it checks the processes, the protocol and these assertions, not the kernels.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "fault_worker.py")

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

DRY_RUN = os.environ.get("JAX_EP_FAULTS_DRY_RUN", "0") == "1"
TIMEOUT_S = 3.0
# From the start of the faulty step to its error, on every surviving rank. The start barrier
# gives up after timeout_s; without the abort-on-failed-barrier path the op's receivers wait
# another timeout_s, and combine may run (and wait) after a failed dispatch: ~4 x in the worst
# case seen in the kernels' code; 8 x + 15 s leaves room for the host callback and syncs.
ERROR_BOUND_S = 8 * TIMEOUT_S + 15
# From the first process's start to the last one's exit (startup, jax + NVSHMEM init, Triton and
# XLA compiles on a cold cache, the step, the exit handshake).
JOB_WALL_S = 150
JAX_COORDINATION_DEATH = "JAX distributed service detected fatal errors"

_jobs = itertools.count()


def _num_gpus() -> int:
  if DRY_RUN:
    return 4
  from jax_ep import testing
  return testing.ffi_gpu_count()


@pytest.fixture(scope="module")
def num_gpus():
  n = _num_gpus()
  if n < 2:
    pytest.skip("needs 2 or more CUDA GPUs and libjax_ep_ffi.so (see docs/RUNTIME.md)")
  return n


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
  where = os.environ.get("JAX_EP_FAULT_LOGS")
  path = Path(where) if where else tmp_path_factory.mktemp("faults")
  path.mkdir(parents=True, exist_ok=True)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(world: int) -> dict:
  env = dict(os.environ)
  # tests/conftest.py asks for 8 virtual CPU devices; each worker wants its own one device.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  # The config scenario is the only one whose processes compile different programs; XLA shares
  # autotuning results between processes by module fingerprint, which can wait for ever for a
  # module the other process never compiles. (Its first GPU run hung before any output; which
  # stage is not known yet: the workers now log each stage.)
  flags.append("--xla_gpu_shard_autotuning=false")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  env["JAX_EP_CHECK_TIMEOUTS"] = "1"   # the default: errors through the host callback
  if DRY_RUN:
    env["JAX_PLATFORMS"] = "cpu"
    return env
  env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
  env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
  env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
  ids = visible.split(",") if visible else [str(i) for i in range(world)]
  env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:world])
  return env


def _leftover_workers(job: str) -> list[int]:
  """Pids of live processes whose command line is this job's worker (psutil, else /proc)."""
  found = []
  try:
    import psutil
  except ImportError:
    psutil = None
  if psutil is not None:
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
      cmd = p.info.get("cmdline") or []
      if (p.info.get("status") != psutil.STATUS_ZOMBIE and job in cmd
          and any(c.endswith("fault_worker.py") for c in cmd)):
        found.append(p.info["pid"])
    return found
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/cmdline", "rb") as f:
        cmd = [c.decode(errors="replace") for c in f.read().split(b"\0")]
      with open(f"/proc/{d}/stat") as f:
        state = f.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
      continue
    if state != "Z" and job in cmd and any(c.endswith("fault_worker.py") for c in cmd):
      found.append(int(d))
  return found


def _last_result(text: str) -> dict | None:
  lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
  if not lines:
    return None
  try:
    return json.loads(lines[-1][len("RESULT "):])
  except json.JSONDecodeError:
    return None


def run_job(scenario: str, world: int, log_dir: Path, *extra: str) -> dict:
  """Start ``world`` workers, wait up to JOB_WALL_S, kill what is left, look for leftovers."""
  job = f"jaxep-faults-{scenario}-w{world}-{os.getpid()}-{next(_jobs)}"
  port = _free_port()
  env = _env(world)
  out = log_dir / job
  out.mkdir(parents=True, exist_ok=True)
  procs, files = [], []
  exit_s: list[float | None] = [None] * world
  t0 = time.time()
  try:
    for r in range(world):
      f = open(out / f"rank{r}.log", "w")  # noqa: SIM115 -- closed below
      files.append(f)
      cmd = [sys.executable, "-u", WORKER, "--rank", str(r), "--world", str(world),
             "--coordinator", f"127.0.0.1:{port}", "--scenario", scenario,
             "--timeout-s", str(TIMEOUT_S), "--job", job, *extra]
      if DRY_RUN:
        cmd.append("--cpu")
      procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    while time.time() - t0 < JOB_WALL_S:
      for r, p in enumerate(procs):
        if exit_s[r] is None and p.poll() is not None:
          exit_s[r] = round(time.time() - t0, 2)
      if all(e is not None for e in exit_s):
        break
      time.sleep(0.1)
  finally:
    killed = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in killed:
      procs[r].kill()          # our own child, by its Popen handle
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
    for f in files:
      f.close()
  leftovers = _leftover_workers(job)
  for pid in leftovers:       # our own workers (job tag on their command line)
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  logs = [(out / f"rank{r}.log").read_text(errors="replace") for r in range(world)]
  rec = {"job": job, "scenario": scenario, "world": world, "timeout_s": TIMEOUT_S,
         "dry_run": DRY_RUN, "wall_s": round(time.time() - t0, 2), "exit_s": exit_s,
         "returncodes": [p.returncode for p in procs], "killed": killed,
         "leftovers": leftovers, "results": [_last_result(t) for t in logs],
         "jax_coordination_death": [JAX_COORDINATION_DEATH in t for t in logs]}
  (out / "summary.json").write_text(json.dumps(rec, indent=1))
  brief = {k: rec[k] for k in ("job", "wall_s", "exit_s", "returncodes", "killed", "leftovers")}
  brief["ranks"] = [{k: (res or {}).get(k) for k in
                     ("role", "error_kind", "inner_type", "error", "seconds_to_error",
                      "check_timeouts", "exit_path", "compare", "worker_error")}
                    for res in rec["results"]]
  with open(log_dir / "faults_summary.jsonl", "a") as f:
    f.write(json.dumps(brief) + "\n")
  print("FAULTS " + json.dumps(brief))
  rec["tails"] = [t[-3000:] for t in logs]
  return rec


def _why(rec: dict, r: int | None = None) -> str:
  ranks = range(rec["world"]) if r is None else [r]
  return "\n".join(f"--- rank {i} (rc {rec['returncodes'][i]}, exit at {rec['exit_s'][i]} s) "
                   f"log tail:\n{rec['tails'][i]}" for i in ranks)


def assert_all_gone(rec: dict):
  assert not rec["killed"], (f"{rec['job']}: ranks {rec['killed']} still ran after "
                             f"{JOB_WALL_S} s and were killed\n{_why(rec)}")
  assert not rec["leftovers"], f"{rec['job']}: processes left running: {rec['leftovers']}"


def assert_stopped_with_error(rec: dict, r: int, kinds: tuple[str, ...]) -> str:
  """Rank r's step failed with an error of one of ``kinds`` naming the op, within the bound,
  and check_timeouts() named the victim. Returns the error kind."""
  res = rec["results"][r]
  victim = rec["world"] - 1
  assert res is not None, f"rank {r} printed no RESULT\n{_why(rec, r)}"
  assert "worker_error" not in res, f"rank {r}: {res['worker_error']}\n{_why(rec, r)}"
  kind = res["error_kind"]
  assert kind in kinds, (f"rank {r}: the step ended with error kind {kind!r} ({res['error']!r}), "
                         f"expected one of {kinds}\n{_why(rec, r)}")
  assert res["error_op"] and res["error_op"].startswith("jax_ep."), res["error"]
  assert res["seconds_to_error"] <= ERROR_BOUND_S, (
      f"rank {r} stopped {res['seconds_to_error']} s after the step began; bound "
      f"{ERROR_BOUND_S} s for timeout_s={TIMEOUT_S}")
  ct = res["check_timeouts"] or ""
  assert re.search(r"jax_ep\.[a-z_]+", ct) and re.search(rf"\brank {victim}\b", ct), (
      f"rank {r}: check_timeouts() did not name the op and rank {victim}: {ct!r}")
  if kind == "timeout":
    assert re.search(rf"waiting for rank {victim}\b", ct), ct
  return kind


def assert_restarts(world: int, log_dir: Path):
  """A fresh job on the same GPUs runs a correct step: the fault left nothing behind."""
  rec = run_job("healthy", world, log_dir)
  assert_all_gone(rec)
  for r, res in enumerate(rec["results"]):
    assert res is not None and "worker_error" not in res, (
        f"restart: rank {r} failed: {(res or {}).get('worker_error')}\n{_why(rec, r)}")
    assert res["compare"] == "ok", res
  assert rec["returncodes"] == [0] * world, _why(rec)


def _need(num_gpus: int, world: int):
  if num_gpus < world:
    pytest.skip(f"needs {world} GPUs, have {num_gpus}")


def test_absent_rank(num_gpus, log_dir):
  """The last rank never calls dispatch: the others time out naming the op and that rank."""
  world = 2
  rec = run_job("absent", world, log_dir)
  assert_all_gone(rec)
  for r in range(world - 1):
    assert_stopped_with_error(rec, r, ("timeout",))
  victim = rec["results"][world - 1]
  assert victim is not None and "worker_error" not in victim, _why(rec, world - 1)
  assert victim["peers_stopped"] == list(range(world - 1)), victim
  assert rec["returncodes"][world - 1] == 0, _why(rec, world - 1)
  assert_restarts(world, log_dir)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_dies(world, num_gpus, log_dir):
  """The last rank is SIGKILLed between two steps: the others stop within the bound, either
  with the op's TimeoutError (expected: JAX notices a dead task only after its 100 s heartbeat
  timeout) or terminated by JAX's coordination service (recorded in summary.json)."""
  _need(num_gpus, world)
  rec = run_job("dies", world, log_dir)
  assert_all_gone(rec)
  victim = world - 1
  assert rec["returncodes"][victim] == -signal.SIGKILL, _why(rec, victim)
  vres = rec["results"][victim]
  assert vres is not None and vres.get("step1") == "ok", _why(rec, victim)
  for r in range(world - 1):
    res = rec["results"][r]
    if res is None and rec["jax_coordination_death"][r]:
      continue  # stopped by JAX itself, with its "another task died" message
    assert res is not None and res.get("step1") == "ok", _why(rec, r)
    assert_stopped_with_error(rec, r, ("timeout",))
  assert_restarts(world, log_dir)


def test_config_mismatch(num_gpus, log_dir):
  """The last rank runs the step with another capacity. Expected (the start barrier compares a
  fingerprint of op, EPConfig and shapes): every rank raises the op's ValueError
  ('fingerprint mismatch', kind 'mismatch') and check_timeouts() names the other rank. A
  timeout naming the op is accepted as well; no error at all (kind 'none': a build without
  the fingerprint check, where both ranks run with inconsistent layouts) fails."""
  world = 2
  rec = run_job("config", world, log_dir, "--mismatch", "capacity")
  assert_all_gone(rec)
  kinds = [assert_stopped_with_error(rec, r, ("mismatch", "timeout")) for r in range(world - 1)]
  victim = rec["results"][world - 1]
  assert victim is not None and "worker_error" not in victim, _why(rec, world - 1)
  if "mismatch" in kinds:  # every rank sees the same fingerprints, so the victim refuses too
    assert victim["error_kind"] == "mismatch", victim
    assert re.search(r"\brank 0\b", victim["check_timeouts"] or ""), victim
  assert_restarts(world, log_dir)
