"""One rank of the fault tests (tests/gpu/test_faults_gpu.py): one process, one GPU.

  python fault_worker.py --rank R --world W --coordinator HOST:PORT --scenario S
                         [--victim V] [--timeout-s 3] [--job ID] [--mismatch capacity] [--cpu]

Scenarios (the victim is rank V, by default the last rank; never rank 0, which hosts JAX's
coordination service):
  healthy  every rank runs one dispatch -> combine step with the triton backend and with the xla
           backend and compares them (recv_x, recv_weights, layout bit for bit, combine to 1e-5).
  absent   the victim never calls the step: it waits (alive) until the others have stopped,
           then exits 0. The others run the step with ``EPConfig(timeout_s=--timeout-s)``.
  dies     every rank runs one correct step; then the victim SIGKILLs itself and the others run
           a second step.
  config   the victim runs the step with a different EPConfig (``--mismatch``: capacity,
           expert_alignment or num_sms; the same symmetric-region sizing).
Every rank compiles its step before a barrier, so the ranks reach the kernels together and a
small ``timeout_s`` measures a missing peer, not a compile.

A rank that runs a faulty step records the error the step raised (type, the ``jax_ep.<op>``
line inside XLA's error text, seconds from the start of the step), then what
``jax_ep.backends.triton.check_timeouts()`` says (it names the peer). Each rank prints exactly
one line ``RESULT {json}`` (the victim of ``dies`` prints it just before it kills itself) and
leaves through ``os._exit`` (no exit-time collectives: NVSHMEM finalize and JAX's shutdown
barrier would wait for the dead or absent peer); rank 0 leaves last, after the others said so
through the key-value store, since it hosts the coordination service.

``--cpu`` is a dry run for machines without GPUs: CPU devices (gloo), the xla backend, no
runtime; the faulty steps are simulated (sleep ``timeout_s``, then raise the error the triton
backend raises), so only the processes, the protocol and the result lines are exercised.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback

# Problem: small and exact. Slot (t, k) of every rank picks expert (t * K + k) % E, so every
# rank receives exactly T * K rows: capacity T * K (the config victim's) drops nothing either.
T, H, E, K = 128, 256, 64, 4
HEALTHY_TIMEOUT_S = 60.0
OUT_NAMES = ("recv_x", "recv_weights", "group_sizes", "group_offsets", "num_recv_rows",
             "num_dropped", "out")

_OP_RE = re.compile(r"jax_ep\.(dispatch_rows|dispatch|combine|gather_slots)\b")
_OP_LINE_RE = re.compile(r"jax_ep\.(dispatch_rows|dispatch|combine|gather_slots)\b[^\n]*")
_INNER_RE = re.compile(r"(TimeoutError|ValueError|RuntimeError): (jax_ep\.[^\n]*)")


def error_kind(message: str | None) -> str:
  """'mismatch' (ranks disagree about the op/config), 'timeout', 'none' or 'other'."""
  if not message:
    return "none"
  if "timed out" in message:
    return "timeout"
  if re.search(r"fingerprint|differ|disagree|mismatch", message):
    return "mismatch"
  return "other"


def describe_exception(e: BaseException) -> dict:
  """The error as the test reads it: XLA wraps the callback's TimeoutError/ValueError in a
  JaxRuntimeError whose text ends with ``TimeoutError: jax_ep.<op>: ...``."""
  text = str(e)
  found = list(_INNER_RE.finditer(text))
  if found:
    inner_type, message = found[-1].group(1), found[-1].group(2)
  elif (m := _OP_LINE_RE.search(text)) is not None:  # the op's text without a type prefix
    message = m.group(0)
    kind = error_kind(message)
    inner_type = {"timeout": "TimeoutError", "mismatch": "ValueError"}.get(kind, type(e).__name__)
  else:
    inner_type = type(e).__name__
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else repr(e)
  op = _OP_RE.search(message)
  return {"error_type": type(e).__name__, "inner_type": inner_type, "error": message[:2000],
          "error_op": op.group(0) if op else None, "error_kind": error_kind(message),
          "error_tail": text[-1500:]}


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rank", type=int, required=True)
  ap.add_argument("--world", type=int, required=True)
  ap.add_argument("--coordinator", required=True)
  ap.add_argument("--scenario", choices=("healthy", "absent", "dies", "config"), required=True)
  ap.add_argument("--victim", type=int, default=None, help="default: the last rank")
  ap.add_argument("--timeout-s", type=float, default=3.0)
  ap.add_argument("--job", default="faults", help="tag on the command line (to find leftovers)")
  ap.add_argument("--mismatch", choices=("capacity", "expert_alignment", "num_sms"),
                  default="capacity")
  ap.add_argument("--cpu", action="store_true", help="dry run on CPU (see the docstring)")
  a = ap.parse_args(argv)
  if a.victim is None:
    a.victim = a.world - 1
  if not 0 <= a.rank < a.world or a.world < 2:
    ap.error(f"--rank {a.rank} / --world {a.world}: need world >= 2 and 0 <= rank < world")
  if not 1 <= a.victim < a.world:
    ap.error(f"--victim {a.victim} must be in [1, world): rank 0 hosts the coordination service")
  return a


def _routing(world: int):
  import numpy as np
  t = np.arange(T)[:, None] * K + np.arange(K)[None, :]
  idx = np.tile((t % E).astype(np.int32), (world, 1))                      # [W*T, K]
  rng = np.random.default_rng(7)
  x = rng.standard_normal((world * T, H)).astype(np.float32)
  w = rng.random((world * T, K)).astype(np.float32)
  return x, idx, w


def _configs(a):
  """(this rank's config for the faulty/healthy triton step, the xla reference config, the
  runtime sizing config). Every variant has the same E, K, H, T, so the same region size."""
  import jax_ep
  backend = "xla" if a.cpu else "triton"
  timeout = HEALTHY_TIMEOUT_S if a.scenario == "healthy" else a.timeout_s
  base = dict(num_experts=E, topk=K, hidden=H, max_tokens_per_rank=T, timeout_s=timeout)
  cfg = jax_ep.EPConfig(backend=backend, **base)
  if a.scenario == "config" and a.rank == a.victim:
    # A config the others do not have. capacity T*K still drops nothing with this routing, so
    # without a cross-rank check the op "succeeds" on every rank with inconsistent layouts.
    change = {"capacity": dict(capacity=T * K), "expert_alignment": dict(expert_alignment=8),
              "num_sms": dict(num_sms=max(2, cfg.num_sms // 2))}[a.mismatch]
    cfg = jax_ep.EPConfig(backend=backend, **base, **change)
  ref = jax_ep.EPConfig(backend="xla", **base)
  sizing = jax_ep.EPConfig(num_experts=E, topk=K, hidden=H, max_tokens_per_rank=T)
  return cfg, ref, sizing


def _step(mesh, cfg):
  import jax
  from jax.sharding import PartitionSpec as P
  import jax_ep

  def per_shard(x, idx, w):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
    out = jax_ep.combine(recv_x * 2.0, layout, config=cfg)
    return (recv_x[None], recv_w[None], layout.group_sizes[None], layout.group_offsets[None],
            layout.num_recv_rows[None], layout.num_dropped[None], out)

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"),) * 3,
                               out_specs=(P("ep"),) * len(OUT_NAMES)))


class Worker:
  def __init__(self, a):
    self.a = a
    victim = a.rank == a.victim and a.scenario != "healthy"
    self.res: dict = {"rank": a.rank, "world": a.world, "scenario": a.scenario,
                      "victim": a.victim, "role": "victim" if victim else "peer",
                      "timeout_s": a.timeout_s, "dry_run": a.cpu, "pid": os.getpid()}
    self.client = None
    self.t_start = time.time()

  # -- plumbing ------------------------------------------------------------------------------

  def setup(self):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    a = self.a
    if a.cpu:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(a.coordinator, num_processes=a.world, process_id=a.rank,
                                 initialization_timeout=120)
    else:
      jax.distributed.initialize(a.coordinator, num_processes=a.world, process_id=a.rank,
                                 local_device_ids=[a.rank], initialization_timeout=120)
    from jax._src import distributed
    self.client = distributed.global_state.client
    self.cfg, self.ref_cfg, sizing = _configs(a)
    self.res["config"] = {k: getattr(self.cfg, k) for k in
                          ("capacity", "expert_alignment", "num_sms", "timeout_s", "backend")}
    if not a.cpu:
      from jax_ep import runtime
      runtime.initialize([sizing])
      self.res["provider"] = runtime.provider()
    devices = sorted(jax.devices(), key=lambda d: d.process_index)
    self.mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
    sharding = NamedSharding(self.mesh, P("ep"))
    x, idx, w = _routing(a.world)
    self.global_inputs = (x, idx, w)

    def put(arr):
      local = arr[a.rank * T:(a.rank + 1) * T]
      return jax.make_array_from_process_local_data(sharding, local, arr.shape)

    self.args = tuple(put(v) for v in (x, idx, w))
    self.res["setup_s"] = round(time.time() - self.t_start, 2)

  def barrier(self, name: str, timeout_s: float = 180.0):
    self.progress(f"barrier {name}")
    self.client.wait_at_barrier(f"{self.a.job}/{name}", int(timeout_s * 1000))
    self.progress(f"passed barrier {name}")

  def kv_set(self, key: str):
    self.client.key_value_set(f"{self.a.job}/{key}", "1")

  def kv_wait(self, key: str, timeout_s: float) -> bool:
    try:
      self.client.blocking_key_value_get(f"{self.a.job}/{key}", max(1, int(timeout_s * 1000)))
      return True
    except Exception:  # noqa: BLE001 -- DEADLINE_EXCEEDED: the peer never said so
      return False

  def compile(self, cfg):
    t0 = time.time()
    self.progress(f"compile (capacity {cfg.capacity}, backend {cfg.backend})")
    compiled = _step(self.mesh, cfg).lower(*self.args).compile()
    self.progress(f"compiled in {time.time() - t0:.1f} s")
    self.res.setdefault("compile_s", []).append(round(time.time() - t0, 2))
    return compiled

  @staticmethod
  def fetch(outs):
    import numpy as np
    return [np.asarray(o.addressable_shards[0].data) for o in outs]

  # -- the faulty step -------------------------------------------------------------------------

  def _simulated_step(self, *args):
    """--cpu: what the triton backend raises when a peer is missing / disagrees."""
    del args
    a = self.a
    time.sleep(a.timeout_s)
    if a.scenario == "config":
      raise ValueError(f"jax_ep.dispatch: rank {a.rank} found that its peers run a different "
                       f"op, EPConfig, token count or dtype at this point (fingerprint "
                       f"mismatch) [simulated]")
    raise TimeoutError(f"jax_ep.dispatch: rank {a.rank} timed out after {a.timeout_s} s (start "
                       f"barrier) waiting for a peer rank [simulated]")

  def _check_timeouts(self, after_fault: bool = False):
    a = self.a
    if a.cpu:
      if not after_fault:
        return
      other = 0 if a.rank == a.victim else a.victim
      if a.scenario == "config":
        raise ValueError(f"jax_ep.dispatch: rank {a.rank} and rank {other} disagree about op "
                         f"number 1 (their fingerprints differ) [simulated]")
      raise TimeoutError(f"jax_ep.dispatch (start barrier): rank {a.rank} timed out waiting "
                         f"for rank {other} (op sequence number 1) [simulated]")
    from jax_ep.backends import triton as tb
    tb.check_timeouts()

  def faulty_step(self, compiled):
    """Run the step that should fail; record its error and check_timeouts()'s."""
    import jax
    if self.a.cpu:  # the xla backend's collectives would wait for the missing peer for ever
      compiled = self._simulated_step
    t0 = time.time()
    rec: dict = {}
    try:
      outs = compiled(*self.args)
      jax.block_until_ready(outs)
      jax.effects_barrier()
      self.fetch(outs)
      rec.update(error_type=None, error=None, error_op=None, error_kind="none")
    except Exception as e:  # noqa: BLE001 -- the error under test
      rec.update(describe_exception(e))
    rec["seconds_to_error"] = round(time.time() - t0, 3)
    try:
      self._check_timeouts(after_fault=True)
      rec["check_timeouts_type"], rec["check_timeouts"] = None, None
    except Exception as e:  # noqa: BLE001
      rec["check_timeouts_type"], rec["check_timeouts"] = type(e).__name__, str(e)[:2000]
    rec["check_timeouts_kind"] = error_kind(rec["check_timeouts"])
    rec["seconds_to_check"] = round(time.time() - t0, 3)
    self.res.update(rec)

  # -- scenarios -------------------------------------------------------------------------------

  def progress(self, what: str):
    """One line per stage on stderr (kept in the rank's log even if the process is killed)."""
    print(f"[rank {self.a.rank} {time.time() - self.t_start:7.2f} s] {what}", file=sys.stderr,
          flush=True)

  def run(self):
    a = self.a
    self.progress("setup")
    self.setup()
    self.progress(f"run_{a.scenario}")
    getattr(self, f"run_{a.scenario}")()

  def run_healthy(self):
    import numpy as np
    tri = self.compile(self.cfg)
    ref = self.compile(self.ref_cfg)
    self.barrier("ready")
    got = self.fetch(tri(*self.args))
    want = self.fetch(ref(*self.args))
    for name, g, w in zip(OUT_NAMES, got, want):
      if name == "out":
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
      else:
        np.testing.assert_array_equal(g, w, err_msg=name)
    # The expected result itself: out[t] = 2 x[t] sum_k w[t, k] (nothing dropped).
    x, _, w = self.global_inputs
    lo = self.a.rank * T
    np.testing.assert_allclose(got[-1], 2 * x[lo:lo + T] * w[lo:lo + T].sum(1, keepdims=True),
                               rtol=1e-5, atol=1e-5, err_msg="out vs 2 x sum(w)")
    self._check_timeouts()   # raises if any wait timed out
    self.res["compare"] = "ok"
    self.res["recv_rows"] = int(got[OUT_NAMES.index("num_recv_rows")].sum())
    self.res["exit_path"] = "healthy step equal to xla; os._exit(0)"

  def run_absent(self):
    a = self.a
    compiled = self.compile(self.cfg)
    self.barrier("ready")
    if a.rank == a.victim:
      # Alive but never calling dispatch: wait until every peer has stopped (or a bound).
      deadline = time.time() + 12 * a.timeout_s + 90
      seen = [r for r in range(a.world) if r != a.rank
              and self.kv_wait(f"stopped/{r}", deadline - time.time())]
      self.res["peers_stopped"] = seen
      self.res["exit_path"] = "never called the step; waited for the peers; os._exit(0)"
      return
    self.faulty_step(compiled)
    self.kv_set(f"stopped/{a.rank}")
    self.res["exit_path"] = "stopped after the step's error; os._exit(0)"

  def run_dies(self):
    import jax
    a = self.a
    compiled = self.compile(self.cfg)
    self.barrier("ready")
    t0 = time.time()
    outs = compiled(*self.args)
    jax.block_until_ready(outs)
    self._check_timeouts()
    self.res["step1"] = "ok"
    self.res["step1_s"] = round(time.time() - t0, 3)
    self.barrier("step1_done")
    if a.rank == a.victim:
      self.res["exit_path"] = "SIGKILL right before step 2"
      self.res["seconds"] = round(time.time() - self.t_start, 2)
      print("RESULT " + json.dumps(self.res), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(60)  # not reached
    self.faulty_step(compiled)
    self.res["exit_path"] = "stopped after step 2's error; os._exit(0)"

  def run_config(self):
    compiled = self.compile(self.cfg)
    self.barrier("ready")
    self.faulty_step(compiled)
    self.res["exit_path"] = "stopped after the step's error; os._exit(0)"

  # -- leaving ---------------------------------------------------------------------------------

  def leave(self, code: int):
    """Print the result, then exit without exit-time collectives; rank 0 (the coordination
    service) waits until every live rank has said it is leaving."""
    a = self.a
    self.res["seconds"] = round(time.time() - self.t_start, 2)
    print("RESULT " + json.dumps(self.res), flush=True)
    sys.stderr.flush()
    if self.client is not None:
      try:
        self.kv_set(f"exit/{a.rank}")
        if a.rank == 0:
          live = [r for r in range(1, a.world) if not (a.scenario == "dies" and r == a.victim)]
          deadline = time.time() + 30
          for r in live:
            self.kv_wait(f"exit/{r}", deadline - time.time())
      except Exception:  # noqa: BLE001 -- leaving anyway
        pass
    os._exit(code)


def main(argv=None):
  a = _args(argv)
  if a.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
  w = Worker(a)
  code = 0
  try:
    w.run()
  except BaseException:  # noqa: BLE001 -- report to the parent test
    w.res["worker_error"] = traceback.format_exc()[-4000:]
    code = 1
  w.leave(code)


if __name__ == "__main__":
  main()
