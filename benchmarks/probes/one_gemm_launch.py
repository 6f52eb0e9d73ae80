"""Run one grouped GEMM product (or the dense product of the same FLOPs) a few times, for a
profiler to catch one launch: nothing is timed or printed but the launch count.

    ncu --clock-control none -k regex:grouped_gemm_ws --launch-skip 2 --launch-count 1 \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum \
        python benchmarks/probes/one_gemm_launch.py dsv3_up fwd triton

SHAPE is a name of bench_grouped_gemm.SHAPES or ROWSxEXPERTSxKxN; PRODUCT fwd, dx or dw; IMPL
triton (the default kernels) or dense (one cuBLAS ``jnp.dot`` over the same rows). The inputs
are bench_grouped_gemm's (uniform routing, bf16, the first shape's seed).
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402

import bench_gemm_clocks  # noqa: E402  (inputs and ops)


def main(argv):
  if len(argv) not in (3, 4):
    sys.exit(__doc__)
  name, product, impl = argv[:3]
  calls = int(argv[3]) if len(argv) == 4 else 4
  _, ops = bench_gemm_clocks.shape_ops(name, [product])
  f, args = ops[product][impl]
  g = jax.jit(f)
  for _ in range(calls):
    jax.block_until_ready(g(*args))
  print(f"one_gemm_launch: {name} {product} {impl}: {calls} calls", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
