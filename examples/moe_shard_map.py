"""One MoE block with expert parallelism: route, dispatch, per-expert FFNs, combine, check, time.

On a CPU this runs on 8 virtual devices; on GPUs on every local GPU (one process).

  python examples/moe_shard_map.py                      # CPU: 8 virtual devices, xla backend
  python examples/moe_shard_map.py --backend triton     # GPUs: our Triton kernels

With the triton backend each dispatch and combine is followed by a host callback that turns a
timed-out cross-GPU wait into an error at once (``JAX_EP_CHECK_TIMEOUTS=1``, jax_ep's
default), which syncs the stream once per op: at this example's small sizes that is most of
the step. ``--check-timeouts 0`` leaves the callbacks out and reads the kernels' error records
once after the timed steps instead (``check_timeouts()``); use it for timings.
"""
from __future__ import annotations

import argparse
import os
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--ffn", type=int, default=512, help="expert FFN width")
  p.add_argument("--experts", type=int, default=32)
  p.add_argument("--topk", type=int, default=4)
  p.add_argument("--capacity-factor", type=float, default=2.0,
                 help="capacity = factor x tokens x topk (0: worst case, never drops)")
  p.add_argument("--backend", default="auto", choices=("auto", "xla", "triton"))
  p.add_argument("--cpu-devices", type=int, default=8, help="virtual devices when on CPU")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--check-timeouts", type=int, choices=(0, 1), default=None,
                 help="JAX_EP_CHECK_TIMEOUTS for the triton backend: 1 (the default) raises a "
                      "timed-out op at once, one stream sync per op; 0 checks once at the end")
  return p.parse_args()


def main():
  args = parse_args()
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}"
  if args.check_timeouts is not None:
    os.environ["JAX_EP_CHECK_TIMEOUTS"] = str(args.check_timeouts)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jax_ep

  devices = jax.devices()
  ep = len(devices)
  while args.experts % ep:
    ep -= 1
  devices = devices[:ep]
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  capacity = None
  if args.capacity_factor > 0:
    capacity = int(np.ceil(args.capacity_factor * args.tokens * args.topk))
  config = jax_ep.EPConfig(num_experts=args.experts, topk=args.topk, hidden=args.hidden,
                           max_tokens_per_rank=args.tokens, capacity=capacity,
                           backend=args.backend)
  if args.backend == "triton":
    jax_ep.runtime.initialize([config])
  print(f"{ep} x {devices[0].platform} devices, {args.tokens} tokens/rank, hidden {args.hidden}, "
        f"{args.experts} experts (top-{args.topk}), capacity {config.capacity_rows(ep)} rows/rank, "
        f"backend {args.backend}")

  # Router and experts. Tokens and expert weights are both sharded over 'ep'.
  key = jax.random.key(0)
  k_x, k_r, k_g, k_u, k_d = jax.random.split(key, 5)
  dtype = jnp.float32
  shard = NamedSharding(mesh, P("ep"))
  x = jax.device_put(jax.random.normal(k_x, (ep * args.tokens, args.hidden), dtype), shard)
  router = jax.random.normal(k_r, (args.hidden, args.experts), dtype) / np.sqrt(args.hidden)
  scale = lambda n: 1.0 / np.sqrt(n)
  # Gate and up weights side by side, [E, H, 2F]: one grouped matmul computes both.
  w_gate_up = jax.device_put(jnp.concatenate(
      [jax.random.normal(k, (args.experts, args.hidden, args.ffn), dtype) * scale(args.hidden)
       for k in (k_g, k_u)], axis=-1), shard)
  w_down = jax.device_put(
      jax.random.normal(k_d, (args.experts, args.ffn, args.hidden), dtype) * scale(args.ffn),
      shard)

  def route(x):
    probs = jax.nn.softmax(x @ router, axis=-1)
    weights, idx = jax.lax.top_k(probs, args.topk)
    return idx.astype(jnp.int32), weights / weights.sum(-1, keepdims=True)

  def moe_block(x, w_gate_up, w_down):  # per shard
    idx, weights = route(x)
    recv_x, _, layout = jax_ep.dispatch(x, idx, weights, config=config)
    y = jax_ep.experts.swiglu_fused(recv_x, w_gate_up, w_down, layout)
    out = jax_ep.combine(y, layout, config=config)
    return out, layout.num_dropped[None]

  ep_step = jax.jit(jax.shard_map(moe_block, mesh=mesh, in_specs=(P("ep"),) * 3,
                                  out_specs=(P("ep"), P("ep"))))

  def dense_block(x, w_gate_up, w_down):  # the same math without expert parallelism
    idx, weights = route(x)
    def expert(e, rows):
      gate, up = jnp.split(rows @ w_gate_up[e], 2, axis=-1)
      return (jax.nn.silu(gate) * up) @ w_down[e]
    return jax_ep.testing.dense_moe(x, idx, weights, expert, args.experts)

  # The check multiplies in full float32 on both sides: at the default precision GPUs take
  # float32 products on TF32 tensor cores (10-bit mantissas), in our kernels and in XLA's
  # dense ones alike, and two such results differ by ~1e-3. The timed steps below run at the
  # default precision.
  with jax.default_matmul_precision("float32"):
    out, dropped = ep_step(x, w_gate_up, w_down)
    reference = jax.jit(dense_block)(x, w_gate_up, w_down)
  err = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
  print(f"dropped rows: {int(np.sum(np.asarray(dropped)))}; relative error vs dense: {err:.2e}")
  if int(np.sum(np.asarray(dropped))) == 0 and not err < 1e-4:
    raise SystemExit(f"FAILED: EP result differs from the dense computation ({err=:.3e})")

  jax.block_until_ready(ep_step(x, w_gate_up, w_down))  # compiles at the default precision
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    jax.block_until_ready(ep_step(x, w_gate_up, w_down))
    times.append(time.perf_counter() - t0)
  ms = 1e3 * float(np.median(times))
  callbacks = ""
  if args.backend == "triton":
    from jax_ep.backends import triton as triton_backend
    triton_backend.check_timeouts()  # raises if a cross-GPU wait timed out
    if os.environ.get("JAX_EP_CHECK_TIMEOUTS", "1") != "0":
      callbacks = " (with a stream sync per op: --check-timeouts 0 for timings)"
  print(f"MoE block (dispatch + SwiGLU experts + combine): median {ms:.2f} ms over "
        f"{args.iters} iterations, {ep * args.tokens / ms * 1e3:,.0f} tokens/s{callbacks}")
  print("OK")
  if args.backend == "triton":
    jax_ep.runtime.shutdown()


if __name__ == "__main__":
  main()
