"""Does the data in a partial tile's wasted rows cost clock? A probe, not a benchmark.

A group's last 128-row tile computes rows past the group's end that are never stored. On a card
at its power limit the energy of those multiplications lowers the SM clock, and a tensor core
multiplying zeros is known to draw less power than one multiplying random values. This probe
lays the groups out at 128-row aligned offsets, so that every row a tile computes past its
group's end is a gap row outside all groups, and times the same products with the gap rows of
x (or dy) random (``R``) and zero (``Z``): identical tiles, instructions and stored results,
only the wasted rows' data differ. Beside them, the dense product with the same fraction of
its rows random or zero. Each run is ``bench_gemm_clocks.sustained`` (back to back for
``--seconds`` while ``nvidia-smi`` samples the clock); rounds interleave the variants.

    python benchmarks/probes/zero_rows_power.py [--shapes dsv3_up,qwen3_up] [--products fwd,dx]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_gemm_clocks as bgc  # noqa: E402
import bench_grouped_gemm as bgg  # noqa: E402


def aligned_inputs(name: str, seed: int, align: int = 128):
  """Inputs of shape ``name`` (a name of bench_grouped_gemm.SHAPES or ROWSxEXPERTSxKxN) with
  its groups at ``align``-row aligned offsets: (sizes, offsets, in_group [C] bool, x [C, K],
  dy [C, N], w [E, K, N], w_dense [K, N], FLOPs over the group rows, E), C the aligned total."""
  rows, e, k, n = bgg.shape_dims(name)
  rng = np.random.default_rng(seed)
  sizes = bgg.group_sizes(rng, rows, e, "uniform")
  spans = -(-sizes // align) * align
  offsets = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int32)
  c = int(spans.sum())
  in_group = np.zeros(c, bool)
  for o, s in zip(offsets, sizes):
    in_group[o:o + s] = True
  kx, kw, kg, kd = jax.random.split(jax.random.key(seed), 4)
  bf = jnp.bfloat16
  x = jax.random.normal(kx, (c, k), jnp.float32).astype(bf)
  dy = jax.random.normal(kg, (c, n), jnp.float32).astype(bf)
  w = (jax.random.normal(kw, (e, k, n), jnp.float32) / math.sqrt(k)).astype(bf)
  w_dense = (jax.random.normal(kd, (k, n), jnp.float32) / math.sqrt(k)).astype(bf)
  return (jnp.asarray(sizes), jnp.asarray(offsets), jnp.asarray(in_group), x, dy, w, w_dense,
          2.0 * int(sizes.sum()) * k * n, e)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="dsv3_up,qwen3_up")
  p.add_argument("--products", default="fwd,dx")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--seconds", type=float, default=2.0)
  args = p.parse_args(argv)
  if set(q for q in args.products.split(",") if q) - {"fwd", "dx"}:
    p.error(f"--products={args.products!r}: choose from fwd, dx")
  triton_gemm = bgg.require_triton_gemm("zero_rows_power")
  field = bgc._reason_field()
  print(f"{jax.devices()[0].device_kind} | jax {jax.__version__}", flush=True)
  for si, name in enumerate(s for s in args.shapes.split(",") if s):
    sizes, offsets, in_group, x, dy, w, w_dense, flops, e = aligned_inputs(name, si)
    keep = in_group[:, None]
    frac = 1.0 - float(in_group.mean())
    cut = int(round(x.shape[0] * (1.0 - frac)))  # dense: the last `frac` of rows zero
    dense_keep = (jnp.arange(x.shape[0]) < cut)[:, None]
    print(f"{name}: C {x.shape[0]} rows, {frac:.1%} of them gap rows", flush=True)
    variants = {}
    for product in (q for q in args.products.split(",") if q):
      a = x if product == "fwd" else dy
      for tag, opnd, dense_opnd in (("R", a, a), ("Z", jnp.where(keep, a, 0),
                                                  jnp.where(dense_keep, a, 0))):
        if product == "fwd":
          variants[(product, "triton", tag)] = (
              lambda x, w, s, o: triton_gemm._gmm(x, w, s, o), (opnd, w, sizes, offsets))
          variants[(product, "dense", tag)] = (lambda x, w: jnp.dot(x, w), (dense_opnd, w_dense))
        else:
          variants[(product, "triton", tag)] = (
              lambda d, w, s, o: triton_gemm._grouped(d, w, s, o, transpose_w=True),
              (opnd, w, sizes, offsets))
          variants[(product, "dense", tag)] = (lambda d, w: jnp.dot(d, w.T),
                                               (dense_opnd, w_dense))
    # Both variants of a product must agree on the group rows.
    for product in {k[0] for k in variants}:
      outs = [jax.jit(variants[(product, "triton", t)][0])(*variants[(product, "triton", t)][1])
              for t in "RZ"]
      same = bool(jnp.all(jnp.where(keep, outs[0] == outs[1], True)))
      print(f"  {product}: R and Z equal on the group rows: {same}", flush=True)
      if not same:
        sys.exit("zero_rows_power: outputs differ on group rows")
    for rnd in range(args.rounds):
      for (product, impl, tag), (f, fargs) in variants.items():
        ms, clk = bgc.sustained(f, fargs, args.seconds, 50, field, 0.5)
        fl = flops if impl == "triton" else 2.0 * fargs[0].shape[0] * fargs[1].size
        print(f"  r{rnd} {product:3s} {impl:6s} {tag}: {ms:7.3f} ms "
              f"{fl / ms / 1e9:5.0f} TFLOP/s | SM {clk.get('clocks.sm')} MHz, "
              f"{clk.get('power.draw')} W | {clk.get('reasons')}", flush=True)


if __name__ == "__main__":
  main()
