"""What does one of our FFI launches cost the host? A probe, not a benchmark.

A jitted chain of N tiny kernels (each adds 1 to a [256] float32 vector, in order: each takes
the previous one's output), launched three ways:

  - ``xla``: XLA's own elementwise op, an optimization barrier between two (no fusion);
  - ``ffi``: the same kernel in Triton through ``jax_ep.launch.triton_call`` (our FFI handler);
  - ``ffi_sym``: ``launch.all_gather_int32`` at W = 1, a symmetric launch (runtime, epoch).

Per way: the host-bound time per kernel (N-chains back to back, then one wait, divided by the
kernels launched) and the GPU's busy time per kernel under ``jax.profiler``. Run it under
different ``XLA_FLAGS`` (e.g. ``--xla_gpu_enable_command_buffer=``) to see what XLA's CUDA
graphs buy.

    python benchmarks/probes/launch_overhead.py [--n 32] [--ways xla,ffi,ffi_sym]
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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  m = offs < n
  tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)


def chain(way: str, n: int):
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax_ep import launch

  def one(x):
    if way == "xla":
      return lax.optimization_barrier(x + 1.0)
    if way == "ffi":
      (y,) = launch.triton_call(_add_one_kernel, x, out_shapes=jax.ShapeDtypeStruct(
          x.shape, x.dtype), grid=(1,), constexprs={"BLOCK": 256}, scalars=[x.shape[0]])
      return y
    # ffi_sym: a symmetric launch; its output feeds the next through a cheap XLA op
    g, _ = launch.all_gather_int32(x.astype(jnp.int32), world=1, timeout_s=5.0)
    return g[0].astype(x.dtype) + 1.0

  @jax.jit
  def f(x):
    for _ in range(n):
      x = one(x)
    return x

  return f


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=32, help="kernels per jitted chain")
  p.add_argument("--ways", default="xla,ffi,ffi_sym")
  p.add_argument("--calls", type=int, default=200, help="chains per timed round")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jax_ep
  from bench_dispatch_combine import trace_ops

  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  x = jnp.zeros((256,), jnp.float32)
  for way in args.ways.split(","):
    if way == "ffi_sym" and not jax_ep.runtime.is_initialized():
      jax_ep.runtime.initialize(jax_ep.EPConfig(num_experts=8, topk=2, hidden=128,
                                                max_tokens_per_rank=16))
    f = chain(way, args.n)
    out = np.asarray(f(x))
    ok = bool(np.all(out == args.n))
    rounds = []
    for _ in range(5):
      t0 = time.perf_counter()
      outs = [f(x) for _ in range(args.calls)]
      jax.block_until_ready(outs)
      rounds.append((time.perf_counter() - t0) / (args.calls * args.n))
    print(f"  {way:8s} {1e6 * min(rounds):7.2f} us per kernel launched (host-bound, best of 5)"
          f"  output ok: {ok}", flush=True)
    with tempfile.TemporaryDirectory() as d:
      trace_ops(d, lambda: jax.block_until_ready([f(x) for _ in range(20)]), top=4)
  if jax_ep.runtime.is_initialized():
    jax_ep.runtime.shutdown()


if __name__ == "__main__":
  main()
