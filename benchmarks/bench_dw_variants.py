"""The grouped GEMM's dw kernels side by side, timed alone (a diagnostic beside
bench_grouped_gemm.py).

dw[e] = x[rows of e]^T @ dy[rows of e] is the product whose output is largest (E x K x N: 3.76 GB
at the DeepSeek-V3 up shape, where a dense dw of the same FLOPs writes 58 MB). The main
benchmark's timing loop carries each op's output through its ``fori_loop``; for dw that costs
~0.5 ms at that shape. Here each variant is timed

  * alone: one jitted call per sample, synchronized (median of ``--iters``);
  * in a loop: ``--inner`` calls in a ``fori_loop`` whose carry keeps one element of each
    output (a custom call cannot be sliced, so every call still runs in full), x changing by
    one element per iteration;

and checked against the default kernel's result (and that against a per-group numpy
product on one expert). Variants: ``default`` (one program per expert tile), ``flat`` (one
pipelined loop over a segment of experts' row steps) and ``gluon`` (the flat loop in Gluon,
TMA in and out), ``chunks4``/``chunks8`` (that kernel storing each tile in 4 or 8 column
chunks over the following row steps) and ``c4trim``/``c8trim`` (those multiplying a group's
partial last step in 16-row slices), ``ws0``/``ws1``/``ws2``/``ws1s3`` (the warp-specialized
Gluon dw kernel, its second consumer warpgroup 0, 1 or 2 steps behind the first; 4 stages, or
3), ``c8band8``/``c8band4`` (``c8trim`` with its programs walking the tiles in bands of 8 or
4 n-tiles), ``c4band8``/``ws0band8``/``ws1band8``/``ws2band8`` (``c4trim``, ``ws0``, ``ws1``,
``ws2`` in bands of 8), each in
``--rounds`` interleaved rounds (``--variants`` picks some); the dense ``jnp.dot`` of the
same FLOPs is timed alone.

Run (one GPU): python benchmarks/bench_dw_variants.py [--shapes dsv3_up,qwen3_down]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_grouped_gemm as bgg  # noqa: E402  (shapes and inputs, shared)


def _median_seconds(g, args, iters: int, calls: int = 1) -> float:
  """Median wall time of ``g(*args)`` over ``iters`` synchronized samples (after a warm-up
  call), divided by the ``calls`` of the op each sample makes."""
  return bgg.median_per_op(g, args, iters, calls)[1]["median_s"]


def time_alone(f, args, iters: int) -> float:
  return _median_seconds(jax.jit(f), args, iters)


def time_looped(f, args, inner: int, iters: int) -> float:
  return _median_seconds(bgg.looped_keep_one(f, inner), args, iters, inner)


def variants():
  from jax_ep.kernels.grouped_gemm import TileConfig as T
  return {"default": None, "flat": T(128, 256, 64, 8, 3, flatten=True),
          "gluon": T(128, 256, 64, 8, 3, gluon=True),
          "chunks4": T(128, 256, 64, 8, 3, gluon=True, store_chunks=4),
          "chunks8": T(128, 256, 64, 8, 3, gluon=True, store_chunks=8),
          "c4trim": T(128, 256, 64, 8, 3, gluon=True, store_chunks=4, trim_partial=True),
          "c8trim": T(128, 256, 64, 8, 3, gluon=True, store_chunks=8, trim_partial=True),
          "ws0": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                   trim_partial=True),
          "ws1": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                   trim_partial=True, stagger=1),
          "ws2": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                   trim_partial=True, stagger=2),
          "ws1s3": T(128, 256, 64, 8, 3, gluon=True, warp_spec=True, trim_partial=True,
                     stagger=1),
          "c8band8": T(128, 256, 64, 8, 3, gluon=True, store_chunks=8, trim_partial=True,
                       band_n=8),
          "c8band4": T(128, 256, 64, 8, 3, gluon=True, store_chunks=8, trim_partial=True,
                       band_n=4),
          "c4band8": T(128, 256, 64, 8, 3, gluon=True, store_chunks=4, trim_partial=True,
                       band_n=8),
          "ws0band8": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                        trim_partial=True, band_n=8),
          "ws1band8": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                        trim_partial=True, stagger=1, band_n=8),
          "ws2band8": T(128, 256, 64, 8, 4, gluon=True, warp_spec=True, store_chunks=2,
                        trim_partial=True, stagger=2, band_n=8)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="dsv3_up,dsv3_down,qwen3_down,32768x8x7168x4096",
                 help="names from bench_grouped_gemm.SHAPES or ROWSxEXPERTSxKxN")
  p.add_argument("--variants", default="",
                 help="comma-separated labels of variants() to run (default all; the first "
                      "is checked against numpy and the others against it)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--iters", type=int, default=20, help="timed samples per variant and round")
  p.add_argument("--inner", type=int, default=4, help="calls per looped sample")
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = p.parse_args(argv)
  triton_gemm = bgg.require_triton_gemm("bench_dw_variants")

  chosen = variants()
  if args.variants:
    unknown = set(args.variants.split(",")) - set(chosen)
    if unknown:
      p.error(f"--variants: unknown {sorted(unknown)}; choose from {sorted(chosen)}")
    chosen = {k: chosen[k] for k in args.variants.split(",")}
  now = datetime.datetime.now(datetime.timezone.utc)
  rows_out = []
  print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | {now:%Y-%m-%d %H:%M} UTC",
        flush=True)
  for si, name in enumerate(s for s in args.shapes.split(",") if s):
    (rows, e, k, n), (sizes, layout, x, _, dy, _) = bgg.diagnostic_inputs(name, si)
    s, o = layout.group_sizes, layout.group_offsets
    flops = 2.0 * rows * k * n
    ref = None
    for rnd in range(args.rounds):
      for label, cfg in chosen.items():
        f = lambda x, dy, cfg=cfg: triton_gemm._grouped_dw(x, dy, s, o, e, config=cfg)  # noqa
        got = np.asarray(jax.jit(f)(x, dy), np.float32)
        if ref is None:  # the default's dw, checked on its largest expert against numpy
          big = int(np.argmax(sizes))
          lo = int(np.asarray(o)[big])
          xe = np.asarray(x[lo:lo + sizes[big]], np.float32)
          want = xe.T @ np.asarray(dy[lo:lo + sizes[big]], np.float32)
          err = np.abs(got[big] - want).max() / (np.abs(want).max() + 1e-6)
          assert err < 2e-2, f"{name}: default dw off numpy by {err:.2e}"
          ref = got
        rel = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-6))
        alone = time_alone(f, (x, dy), args.iters)
        looped = time_looped(f, (x, dy), args.inner, args.iters)
        row = dict(shape=name, variant=label, round=rnd, alone_ms=alone * 1e3,
                   looped_ms=looped * 1e3, tflops_looped=flops / looped / 1e12,
                   rel_err_vs_default=rel, correct=rel < 2e-2)
        rows_out.append(row)
        print(f"{name:18s} {label:8s} round {rnd}: alone {alone * 1e3:7.3f} ms  looped "
              f"{looped * 1e3:7.3f} ms  {row['tflops_looped']:5.0f} TFLOP/s  "
              f"{'ok' if row['correct'] else f'WRONG ({rel:.1e})'}", flush=True)
    dense = time_alone(lambda x, dy: jnp.dot(x.T, dy), (x, dy), args.iters)
    rows_out.append(dict(shape=name, variant="dense", alone_ms=dense * 1e3,
                         tflops_alone=flops / dense / 1e12))
    print(f"{name:18s} dense    alone {dense * 1e3:7.3f} ms  {flops / dense / 1e12:5.0f} TFLOP/s",
          flush=True)
    del x, dy
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"dw_variants_{now:%Y%m%d-%H%M%S}.json")
  with open(path, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, date_utc=now.isoformat(timespec="seconds"),
                   args=vars(args), rows=rows_out), f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
