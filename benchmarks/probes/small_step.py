"""Where does a small MoE step's time go? A probe, not a benchmark.

The main example (``examples/moe_shard_map.py``) runs one MoE block (route, dispatch, SwiGLU
experts, combine) at tiny sizes, and on one H200 its triton step took 0.49 ms against the xla
backend's 0.24 (session 33). This probe times such a step per backend three ways, on the local
GPUs (one process):

  - ``call``: one call, then wait for it (what the example prints), median;
  - ``pipelined``: N calls back to back, then one wait, divided by N (the host's launch work
    overlaps the GPU's);
  - ``trace``: the GPU kernels of the pipelined calls under ``jax.profiler``: per kernel its
    count, median duration and the idle gap before it on its stream.

and checks every backend's output against the xla backend's. ``--check-timeouts 0,1`` also
times the triton step with the default per-op timeout callback (``JAX_EP_CHECK_TIMEOUTS=1``).

    python benchmarks/probes/small_step.py [--shapes example,decode] [--backends xla,triton]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

# name: tokens per rank, hidden, expert FFN width, experts, top-k, dtype
SHAPES = {
    "example": (256, 256, 512, 32, 4, "float32"),  # examples/moe_shard_map.py's defaults
    "example_bf16": (256, 256, 512, 32, 4, "bfloat16"),
    "decode": (128, 7168, 2048, 256, 8, "bfloat16"),  # DeepSeek-V3-like, a decode batch
    "small": (128, 2048, 768, 128, 8, "bfloat16"),  # Qwen3-MoE-like, a decode batch
}


def make_inputs(mesh, shape, key):
  """(router, (x, w_gate_up, w_down)) of ``shape``, x and the experts sharded over "ep"."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  t, h, f, e, _, dtype = shape
  ep = mesh.shape["ep"]
  dtype = jnp.dtype(dtype)
  kx, kr, kg, kd = jax.random.split(key, 4)
  shard = NamedSharding(mesh, P("ep"))
  x = jax.device_put(jax.random.normal(kx, (ep * t, h), dtype), shard)
  router = (jax.random.normal(kr, (h, e), jnp.float32) / np.sqrt(h)).astype(dtype)
  w_gate_up = jax.device_put(
      (jax.random.normal(kg, (e, h, 2 * f), jnp.float32) / np.sqrt(h)).astype(dtype), shard)
  w_down = jax.device_put(
      (jax.random.normal(kd, (e, f, h), jnp.float32) / np.sqrt(f)).astype(dtype), shard)
  return router, (x, w_gate_up, w_down)


def make_step(mesh, config, router):
  """The example's MoE block under ``config`` (route, dispatch, SwiGLU experts, combine)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jax_ep

  def block(x, w_gate_up, w_down):
    probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(probs, config.topk)
    recv_x, _, layout = jax_ep.dispatch(x, idx.astype(jnp.int32), weights, config=config)
    y = jax_ep.experts.swiglu_fused(recv_x, w_gate_up, w_down, layout)
    return jax_ep.combine(y, layout, config=config)

  return jax.jit(jax.shard_map(block, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))


def time_step(step, inputs, iters: int, pipelined: int) -> dict:
  """Median of ``iters`` calls each waited for (after a warm-up), and the best of 5 rounds of
  ``pipelined`` calls launched back to back, per call (ms)."""
  import jax

  from bench_dispatch_combine import time_fn
  call = time_fn(step, inputs, iters)
  rounds = []
  for _ in range(5):
    t0 = time.perf_counter()
    outs = [step(*inputs) for _ in range(pipelined)]
    jax.block_until_ready(outs)
    rounds.append((time.perf_counter() - t0) / pipelined)
  return {"call_ms": 1e3 * call, "pipelined_ms": 1e3 * min(rounds)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="example,decode",
                 help=f"names of {sorted(SHAPES)}, or TOKENSxHIDDENxFFNxEXPERTSxTOPK[xDTYPE]")
  p.add_argument("--backends", default="xla,triton")
  p.add_argument("--check-timeouts", default="0",
                 help="JAX_EP_CHECK_TIMEOUTS values for the triton backend, e.g. 0,1")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--pipelined", type=int, default=50)
  p.add_argument("--no-trace", action="store_true")
  args = p.parse_args(argv)

  import jax
  import numpy as np

  import jax_ep
  from bench_dispatch_combine import trace_ops

  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
  for name in args.shapes.split(","):
    if name in SHAPES:
      shape = SHAPES[name]
    else:
      parts = name.split("x")
      shape = tuple(int(v) for v in parts[:5]) + (parts[5] if len(parts) > 5 else "bfloat16",)
    t, h, f, e, k, dtype = shape
    if e % len(devices):
      sys.exit(f"--shapes {name}: {e} experts do not split over {len(devices)} devices")
    print(f"\n== {name}: {t} tokens/rank, hidden {h}, ffn {f}, {e} experts, top-{k}, {dtype}",
          flush=True)
    reference = None
    points = [("xla", None)] if "xla" in args.backends.split(",") else []
    if "triton" in args.backends.split(","):
      points += [("triton", c) for c in args.check_timeouts.split(",")]
      if jax_ep.runtime.is_initialized():
        jax_ep.runtime.shutdown()  # sized for the last shape
      jax_ep.runtime.initialize([jax_ep.EPConfig(num_experts=e, topk=k, hidden=h,
                                                 max_tokens_per_rank=t, capacity=2 * t * k)])
    router, inputs = make_inputs(mesh, shape, jax.random.key(0))
    for backend, check in points:
      if check is not None:
        os.environ["JAX_EP_CHECK_TIMEOUTS"] = check
      config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                               capacity=2 * t * k, backend=backend)
      step = make_step(mesh, config, router)
      out = np.asarray(step(*inputs), np.float32)
      label = backend if check is None else f"{backend} (check-timeouts {check})"
      if reference is None:
        reference = out
        err = 0.0
      else:
        err = float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-30))
      r = time_step(step, inputs, args.iters, args.pipelined)
      print(f"  {label:32s} call {r['call_ms']:8.3f} ms   pipelined {r['pipelined_ms']:8.3f} ms"
            f"   rel. err vs first {err:.1e}", flush=True)
      if not args.no_trace:
        with tempfile.TemporaryDirectory() as d:
          trace_ops(d, lambda: jax.block_until_ready(
              [step(*inputs) for _ in range(args.pipelined)]), top=16)
      if backend == "triton":
        from jax_ep.backends import triton as triton_backend
        triton_backend.check_timeouts()
  if jax_ep.runtime.is_initialized():
    jax_ep.runtime.shutdown()


if __name__ == "__main__":
  main()
