"""Benchmark: Triton grouped GEMM vs cuBLAS dense ``jnp.dot`` vs ``jax.lax.ragged_dot``.

Protocol (docs/GROUPED_GEMM.md):
  1. Correctness first: for every shape, the triton forward and backward (dx, dw) are compared
     with a per-group ``jnp.dot`` reference on the benchmark's own inputs; a mismatch is printed
     as FAILED and recorded (``"correct": false``) next to the timings.
  2. Timing, all three in the same run on the same device: each sample is one jitted call that
     runs the op ``inner`` times in a ``fori_loop`` (the input changes by one element per
     iteration so nothing is hoisted), divided by ``inner``; median of ``--iters`` (>= 20)
     samples after warm-up. Forward and backward (dx + dw) are timed separately. Group sizes
     and offsets are arguments of the jitted call (as in a model: the tile table that the
     triton path computes beside its launch is timed, not constant-folded), and every
     iteration passes them, with the weights, through an optimization barrier beside the
     perturbed input, so XLA cannot hoist what is computed from them alone (the tile table,
     ragged_dot's group bookkeeping) out of the loop either. (Until 2026-11-23, session 25,
     it did: the results recorded until then time the tile table once per sample, not per op.)
       triton     jax_ep.backends.triton_gemm (our kernels via the FFI launch path)
       dense      one ``jnp.dot`` [R, K] @ [K, N] of the same FLOPs (cuBLAS), R = rows in groups
       ragged_dot ``jax.lax.ragged_dot`` on the same groups
     TFLOP/s = 2*R*K*N (forward) or 4*R*K*N (backward) / time.
  3. Results: a table on stdout, JSON + PNG in ``--out`` named with the device and the UTC date.

``--sweep`` then times candidate tile configurations (``SWEEP_FWD`` for the forward and dx
products, ``SWEEP_DW`` for dw; pointer loads and, where the launcher provides TMA scratch, TMA /
warp-specialized / flattened variants) on every shape, within ``--sweep-budget`` seconds:
  * every candidate kernel is compiled first, in parallel worker processes (``--jobs``) that
    only trace (CPU JAX, no GPU), into the kernel cache; a compiler crash costs one worker and
    marks that candidate failed instead of ending the run;
  * each candidate is timed like the main protocol but with a fixed ``inner`` per shape and
    ``--sweep-iters`` samples, and its output (after the same perturbations) is checked on the
    device against the default configuration's, which step 1 checked against the reference;
  * the table gives TFLOP/s and the ratio to the dense ``jnp.dot`` of the same size; the
    fastest correct candidate per (shape, product, TMA) is printed as a ``TUNED`` entry of
    kernels/grouped_gemm.py, ready to paste.

Shapes (rows, local experts, K, N): DeepSeek-V3-like per rank at EP=4 (4096 tokens x top-8 =
32768 rows, 64 local experts, hidden 7168, expert FFN 2048: up = gate|up fused N=4096, down
K=2048 -> N=7168) and Qwen3-MoE-like (hidden 2048, FFN 768, 128 experts, 32768 rows; up =
gate|up N=1536). Targets on H200: triton >= 0.8x dense TFLOP/s and >= 1.5x ragged_dot.

``--swiglu`` also times the expert block as models run it (``jax_ep.experts.swiglu``: gate, up,
down; forward and forward+backward; each variant first checked against the xla backend):
``--swiglu-variants`` picks from the two-weight form on triton or xla, ``swiglu_fused`` (gate and
up in one weight) on either, ``swiglu_fused``'s triton form with the activation in XLA instead of
in the gate | up kernel's epilogue (``triton-fused-xla-act``), and one dense MLP of the same
FLOPs; ``--swiglu-only`` skips the main shapes.

Run (one GPU):  python benchmarks/bench_grouped_gemm.py [--swiglu] [--sweep] [--shapes dsv3_up,qwen3_up]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

SHAPES = {
    # name: (rows, experts, K, N)
    "dsv3_up": (32768, 64, 7168, 4096),
    "dsv3_down": (32768, 64, 2048, 7168),
    "qwen3_up": (32768, 128, 2048, 1536),
    "qwen3_down": (32768, 128, 768, 2048),
}
QUICK_SHAPES = {
    "small_up": (4096, 16, 1024, 1024),
    "small_down": (4096, 16, 512, 1024),
}


def _sweep_candidates():
  """(label, TileConfig, tma) per product, most promising first (the time budget cuts from the
  end of each list). None as the config: the shape's default from kernels/grouped_gemm.py
  without the Gluon kernels (``TUNED`` and the rules), "gluon" the default with them
  (``TUNED_GLUON`` first: what the main path runs where Gluon builds); the first entry is the
  product's reference for the correctness check."""
  from jax_ep.kernels.grouped_gemm import TileConfig as T

  fwd = [
      ("default", None, False),
      ("tma default", None, True),
      ("gluon default", "gluon", True),
      ("128x256x64 w8 s3", T(128, 256, 64, 8, 3), False),
      ("tma 128x256x64 w8 s3 flat", T(128, 256, 64, 8, 3, half_tiles=False, flatten=True), True),
      # Gluon, warp-specialized: a TMA producer warp and two consumer warpgroups, each its
      # own half of the tile (skipped when it holds no rows), whole halves stored by TMA. At
      # 3 or 4 stages (the output then leaves in two 128-column chunks); tiles walked g m-tiles
      # at a time, M fastest, so the m-tiles reading one w tile run side by side (w[e] of the
      # DeepSeek-V3 up shape exceeds L2, and m-tiles at different K phases re-read it); and
      # one program per tile, which the hardware starts in order, so they stay side by side.
      *[(f"gluon ws 128x256x64 s{st}" + (f" g{g}" if g > 1 else "")
         + ("" if persistent else " per-tile"),
         T(128, 256, 64, 8, st, half_tiles=False, gluon=True, group_m=g,
           persistent=persistent), True)
        for st, g, persistent in ((3, 1, True), (4, 1, True), (3, 8, True), (3, 8, False),
                                  (3, 4, True), (3, 16, True), (3, 4, False), (3, 16, False),
                                  (4, 8, False))],
      ("gluon ws 128x128x64 s6", T(128, 128, 64, 8, 6, half_tiles=False, gluon=True), True),
      # The same rasters with the runs of g m-tiles cut per expert (expert_raster), so that
      # no run straddles two experts (whose w tiles would then be read by two runs far apart
      # in time: with uneven group sizes the fixed runs do).
      *[(f"gluon ws 128x256x64 s3 g{g} expert" + ("" if persistent else " per-tile"),
         T(128, 256, 64, 8, 3, half_tiles=False, gluon=True, group_m=g,
           persistent=persistent, expert_raster=True), True)
        for g, persistent in ((8, True), (8, False), (4, True), (4, False), (16, False))],
      # 64-row tiles halve the partial last tile's waste (24 % of the rows at the Qwen3
      # shapes' ~256-row groups, 12 % with 64-row tiles), at 1.6x the L2 bytes per FLOP.
      ("tma 64x256x64 w4 s4 flat", T(64, 256, 64, 4, 4, half_tiles=False, flatten=True), True),
      ("tma 64x256x64 w4 s2 flat (2/SM)",
       T(64, 256, 64, 4, 2, half_tiles=False, flatten=True), True),
      ("128x256x64 w8 s3 nohalf", T(128, 256, 64, 8, 3, half_tiles=False), False),
      ("128x128x64 w4 s3 (2/SM)", T(128, 128, 64, 4, 3), False),
      ("tma 128x256x64 w8 s3", T(128, 256, 64, 8, 3), True),
      ("256x128x64 w8 s3", T(256, 128, 64, 8, 3), False),
      ("tma 128x256x64 w4 s3 ws", T(128, 256, 64, 4, 3, half_tiles=False, warp_spec=True), True),
      ("128x256x64 w8 s3 per-tile", T(128, 256, 64, 8, 3, persistent=False), False),
      ("tma 128x128x64 w4 s4 ws", T(128, 128, 64, 4, 4, half_tiles=False, warp_spec=True), True),
      ("128x128x64 w8 s4", T(128, 128, 64, 8, 4), False),
      ("64x256x64 w4 s4", T(64, 256, 64, 4, 4, half_tiles=False), False),
      ("tma 128x256x64 w8 s4", T(128, 256, 64, 8, 4), True),
  ]
  dw = [
      ("default", None, False),
      ("tma default", None, True),
      # The flat kernel's loop in Gluon, tiles stored by TMA while the next steps compute:
      # in 4 or 8 column chunks over the following steps, partial steps trimmed to their
      # 16-row slices (the defaults since session 24), the programs in bands of 8 n-tiles
      # (the DeepSeek-V3 defaults since session 31), or at once, untrimmed.
      ("gluon 128x256x64 w8 s3 c8 trim band8",
       T(128, 256, 64, 8, 3, gluon=True, store_chunks=8, trim_partial=True, band_n=8), False),
      ("gluon 128x256x64 w8 s3 c8 trim",
       T(128, 256, 64, 8, 3, gluon=True, store_chunks=8, trim_partial=True), False),
      ("gluon 128x256x64 w8 s3 c4 trim",
       T(128, 256, 64, 8, 3, gluon=True, store_chunks=4, trim_partial=True), False),
      ("gluon 128x256x64 w8 s3", T(128, 256, 64, 8, 3, gluon=True), False),
      ("gluon 128x128x64 w8 s4", T(128, 128, 64, 8, 4, gluon=True), False),
      # The flat kernel: one pipelined loop over a segment of experts' row steps (shared
      # memory on sm_90: 176 KiB, 224 KiB, 224 KiB).
      ("flat 128x256x64 w8 s3", T(128, 256, 64, 8, 3, flatten=True), False),
      ("flat 128x256x128 w8 s2", T(128, 256, 128, 8, 2, flatten=True), False),
      ("flat 128x128x128 w8 s3", T(128, 128, 128, 8, 3, flatten=True), False),
      ("tma 128x256x64 w4 s3 ws", T(128, 256, 64, 4, 3, warp_spec=True), True),
      ("128x128x64 w8 s3 (2/SM)", T(128, 128, 64, 8, 3), False),
      ("128x128x64 w4 s3 (2/SM)", T(128, 128, 64, 4, 3), False),
      ("128x256x64 w8 s4", T(128, 256, 64, 8, 4), False),
      ("256x128x64 w8 s3", T(256, 128, 64, 8, 3), False),
      ("128x256x32 w8 s4", T(128, 256, 32, 8, 4), False),
  ]
  return {"fwd": fwd, "dx": fwd, "dw": dw}


# -- inputs --------------------------------------------------------------------------------------

def group_sizes(rng, rows: int, experts: int, routing: str) -> np.ndarray:
  """Rows per expert: multinomial over experts, uniform or Zipf(1)-skewed; sums to ``rows``."""
  if routing == "uniform":
    p = np.full(experts, 1.0 / experts)
  elif routing == "zipf":
    p = 1.0 / np.arange(1, experts + 1)
    p = rng.permutation(p / p.sum())
  elif routing == "balanced":
    p = None
  else:
    raise ValueError(f"--routing={routing!r} must be uniform, zipf or balanced")
  if p is None:
    sizes = np.full(experts, rows // experts)
    sizes[: rows - sizes.sum()] += 1
  else:
    sizes = rng.multinomial(rows, p)
  return sizes.astype(np.int32)


def layout_for(sizes: np.ndarray, capacity: int):
  from jax_ep.layout import DispatchLayout

  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  z = jnp.zeros((), jnp.int32)
  return DispatchLayout(
      group_sizes=jnp.asarray(sizes), group_offsets=jnp.asarray(offsets),
      num_recv_rows=jnp.asarray(int(sizes.sum()), jnp.int32), num_dropped=z, num_invalid=z,
      topk_idx=jnp.zeros((1, 1), jnp.int32), recv_pos=jnp.zeros((1, 1, 1), jnp.int32),
      row_weights=jnp.zeros((capacity,), jnp.float32))


# -- timing --------------------------------------------------------------------------------------

def loop_inputs(i, x, rest):
  """(x with element (0, 0) set to ``i``, ``rest``), both through one optimization barrier: an
  iteration's op then depends on the loop in every argument, so XLA hoists nothing computed
  from ``rest`` alone (group sizes -> tile table) out of the timing loop."""
  x = lax.dynamic_update_slice(x, jnp.full((1, 1), i, x.dtype), (0, 0))
  return lax.optimization_barrier((x, rest))


def _looped(fn, inner: int):
  """jit(args -> fn(*args) run ``inner`` times); args[0] changes by one element per iteration
  and every argument is recomputed per iteration as far as XLA can tell (``loop_inputs``)."""
  def run(x, *rest):
    out0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, x, *rest))

    def body(i, carry):
      x, rest_i = loop_inputs(i, carry[0], rest)
      return x, fn(x, *rest_i)

    return lax.fori_loop(0, inner, body, (x, out0))[1]
  return jax.jit(run)


def looped_keep_one(f, inner: int):
  """jit(args -> ``f`` run ``inner`` times in a ``fori_loop``): args[0] changes by one element
  per iteration and everything passes ``loop_inputs``' barrier, as in ``_looped``, but the
  carry keeps one element of each output instead of the output (a large one, dw's, is then not
  carried; a custom call cannot be sliced, so every call still runs in full)."""
  def run(x, *rest):
    def body(i, carry):
      x, acc = carry
      x, rest_i = loop_inputs(i, x, rest)
      out = f(x, *rest_i)
      return x, acc + out.reshape(-1)[:1].astype(jnp.float32).sum()
    return lax.fori_loop(0, inner, body, (x, jnp.zeros((), jnp.float32)))[1]
  return jax.jit(run)


def median_per_op(f, args, iters: int, inner: int = 1):
  """(last output, timings) of ``f(*args)``: one warm-up call, then ``iters`` synchronized
  samples, each divided by the ``inner`` ops one call of ``f`` makes."""
  out = jax.block_until_ready(f(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    samples.append((time.perf_counter() - t0) / inner)
  return out, dict(median_s=statistics.median(samples), min_s=min(samples), inner=inner,
                   iters=iters)


def time_op(fn, args, iters: int, max_inner: int) -> dict:
  """Median seconds per op over ``iters`` samples (see the module docstring)."""
  single = _looped(fn, 1)
  jax.block_until_ready(single(*args))  # compile + warm up
  t0 = time.perf_counter()
  jax.block_until_ready(single(*args))
  one = time.perf_counter() - t0
  inner = int(min(max_inner, max(1, math.ceil(0.02 / max(one, 1e-6)))))
  return median_per_op(_looped(fn, inner) if inner > 1 else single, args, iters, inner)[1]


def time_fixed(fn, args, inner: int, iters: int):
  """(output of the last call, timings): like ``time_op`` with a given ``inner`` and one compile.

  The output is ``fn``'s after the loop's ``inner`` perturbations of ``args[0]``: equal for two
  implementations of the same op called with the same ``inner``.
  """
  return median_per_op(_looped(fn, inner), args, iters, inner)


def _try(label, thunk):
  try:
    return thunk()
  except Exception as e:  # an OOM or an unsupported baseline must not end the run
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(f"  {label}: ERROR {msg}", flush=True)
    return dict(error=msg)


# -- one shape -----------------------------------------------------------------------------------

def make_inputs(rows, experts, k, n, args, seed: int):
  """Group sizes, layout and random operands of one shape (same seed -> same inputs)."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(args.dtype)
  sizes = group_sizes(rng, rows, experts, args.routing)
  layout = layout_for(sizes, rows)
  kx, kw, kg, kd = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (experts, k, n), jnp.float32) / math.sqrt(k)).astype(dtype)
  dy = jax.random.normal(kg, (rows, n), jnp.float32).astype(dtype)
  w_dense = (jax.random.normal(kd, (k, n), jnp.float32) / math.sqrt(k)).astype(dtype)
  return sizes, layout, x, w, dy, w_dense


def require_triton_gemm(script: str):
  """``jax_ep.backends.triton_gemm``, or exit naming ``script`` and what is missing when the
  triton grouped matmul cannot run here (this benchmark and the diagnostics beside it)."""
  from jax_ep.backends import triton_gemm
  why = triton_gemm._why_not_usable()
  if why:
    sys.exit(f"{script}: the triton grouped matmul cannot run here: {why}")
  return triton_gemm


def shape_dims(name: str) -> tuple[int, int, int, int]:
  """(rows, experts, K, N) of a name of ``SHAPES`` or of ``ROWSxEXPERTSxKxN``."""
  return SHAPES.get(name) or tuple(int(v) for v in name.split("x"))


def diagnostic_inputs(name: str, seed: int):
  """((rows, experts, K, N), make_inputs' (sizes, layout, x, w, dy, w_dense)) of shape
  ``name`` with uniform routing in bf16: the inputs of the diagnostics beside this benchmark
  (bench_dw_variants, bench_gemm_clocks, the probes)."""
  dims = shape_dims(name)
  return dims, make_inputs(*dims, argparse.Namespace(dtype="bfloat16", routing="uniform"), seed)


def bench_shape(name, rows, experts, k, n, args, seed: int) -> dict:
  from jax_ep.backends import triton_gemm
  from jax_ep.kernels import grouped_gemm as gg

  dtype = jnp.dtype(args.dtype)
  sizes, layout, x, w, dy, w_dense = make_inputs(rows, experts, k, n, args, seed)
  r = int(sizes.sum())
  sizes_d = layout.group_sizes
  offsets_d = layout.group_offsets
  res = dict(name=name, rows=rows, experts=experts, K=k, N=n, dtype=dtype.name,
             routing=args.routing, rows_in_groups=r, seed=seed,
             group_sizes=dict(min=int(sizes.min()), max=int(sizes.max()),
                              mean=float(sizes.mean()), zeros=int((sizes == 0).sum())),
             tma_default=triton_gemm._use_tma_default())
  tma = res["tma_default"]
  gluon = triton_gemm._gluon_available()
  fwd_cfg = gg.forward_config(k, n, dtype.name, "tf32", tma=tma, gluon=gluon)
  dx_cfg = gg.forward_config(n, k, dtype.name, "tf32", phase="dx", tma=tma, gluon=gluon)
  res.update(fwd_config=str(fwd_cfg), dx_config=str(dx_cfg),
             dw_config=str(gg.dw_config(k, n, dtype.name, "tf32")))  # dw: pointer loads
  # Rows the forward tiles compute beyond the rows in groups (each group's partial last tile;
  # half_tiles, where it applies, halves it): the MMA work the dense product does not do.
  bm = fwd_cfg.block_m
  res["tile_rows_overhead"] = float(np.ceil(sizes / bm).sum() * bm / max(r, 1) - 1)
  fwd_flops = 2.0 * r * k * n
  print(f"\n== {name}: R={r} rows, E={experts}, K={k}, N={n}, {dtype.name}, {args.routing} "
        f"(group sizes {sizes.min()}..{sizes.max()}, {int((sizes == 0).sum())} empty; "
        f"{bm}-row tiles compute {100 * res['tile_rows_overhead']:.1f}% extra rows)", flush=True)
  print(f"  fwd {fwd_cfg.table_entry()}; dx {dx_cfg.table_entry()}", flush=True)

  # The ops (each takes x first: the timing loop perturbs it; group sizes and offsets are
  # arguments, as in a model, so nothing derived from them is constant-folded).
  def tri_fwd(x, w, s, o):
    return triton_gemm._gmm(x, w, s, o)

  def tri_bwd(x, w, dy, s, o):
    return triton_gemm._gmm_bwd((x, w, s, o), dy)

  def rag_fwd(x, w, s):
    return lax.ragged_dot(x, w, s)

  def rag_bwd(x, w, dy, s):
    return jax.vjp(lambda x, w: lax.ragged_dot(x, w, s), x, w)[1](dy)

  def dense_fwd(x, w):
    return jnp.dot(x, w)

  def dense_bwd(x, w, dy):
    return jax.vjp(jnp.dot, x, w)[1](dy)

  # 1. Correctness: triton against a per-group dense reference (jnp.dot per group, f32
  # accumulation). Not the xla backend: its ragged_dot backward densifies to [E, R, K] f32 on
  # GPU (32 GiB at the DeepSeek-V3 shape) and runs out of memory.
  offs_h = np.asarray(offsets_d)
  def reference(x, w, dy):
    ys, dxs, dws = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32), jnp.zeros(
        x.shape, jnp.float32), []
    for e in range(experts):
      o, s_ = int(offs_h[e]), int(sizes[e])
      xe, dye = x[o:o + s_], dy[o:o + s_]
      ys = ys.at[o:o + s_].set(jnp.dot(xe, w[e], preferred_element_type=jnp.float32))
      dxs = dxs.at[o:o + s_].set(jnp.dot(dye, w[e].T, preferred_element_type=jnp.float32))
      dws.append(jnp.dot(xe.T, dye, preferred_element_type=jnp.float32))
    return ys, dxs, jnp.stack(dws)

  def check():
    def tri(x, w, dy):
      y, vjp = jax.vjp(lambda x, w: triton_gemm.grouped_matmul(x, w, layout), x, w)
      return (y, *vjp(dy))
    out = {}
    got = jax.jit(tri)(x, w, dy)
    want = jax.jit(reference)(x, w, dy)
    ok = True
    for label, a, b in zip(("y", "dx", "dw"), got, want):
      a = np.asarray(a, np.float32)
      b = np.asarray(b, np.float32)
      err = float(np.max(np.abs(a - b))) if a.size else 0.0
      scale = float(np.max(np.abs(b))) if b.size else 0.0
      rel = err / max(scale, 1e-30)
      good = bool(np.isfinite(a).all()) and rel < (3e-2 if dtype == jnp.bfloat16 else 1e-2)
      ok &= good
      out[label] = dict(max_abs_err=err, max_abs_ref=scale, rel=rel, ok=good)
    del got, want
    out["correct"] = ok
    print(f"  correctness vs per-group jnp.dot: {'ok' if ok else 'FAILED'} "
          + ", ".join(f"{l} rel {out[l]['rel']:.2e}" for l in ("y", "dx", "dw")), flush=True)
    return out

  res["check"] = _try("correctness", check)

  # 2. Timing.
  x_dense = x[:r]
  dy_dense = dy[:r]
  impls = {
      "triton": ((tri_fwd, (x, w, sizes_d, offsets_d)), (tri_bwd, (x, w, dy, sizes_d, offsets_d))),
      "dense": ((dense_fwd, (x_dense, w_dense)), (dense_bwd, (x_dense, w_dense, dy_dense))),
      "ragged_dot": ((rag_fwd, (x, w, sizes_d)), (rag_bwd, (x, w, dy, sizes_d))),
  }
  # ragged_dot's backward on this XLA materialises [E, R, max(K, N)] in f32; skip it when that
  # cannot fit (it is recorded as skipped, with the reason, in the JSON).
  rag_bwd_bytes = 4 * experts * rows * max(k, n)
  for impl, ((ffn, fargs), (bfn, bargs)) in impls.items():
    for phase, fn, fargs_, flops in (("fwd", ffn, fargs, fwd_flops),
                                     ("bwd", bfn, bargs, 2 * fwd_flops)):
      if impl == "ragged_dot" and phase == "bwd" and rag_bwd_bytes > 16 * 2**30:
        res.setdefault(impl, {})[phase] = dict(
            skipped=f"ragged_dot backward densifies to {rag_bwd_bytes / 2**30:.0f} GiB f32")
        print(f"  {impl:>10} {phase}: skipped ({res[impl][phase]['skipped']})", flush=True)
        continue
      res.setdefault(impl, {})[phase] = _timed(impl, phase, fn, fargs_, flops, args)

  res["tables"] = time_tables(x, sizes_d, offsets_d, k, n, experts, fwd_cfg, dx_cfg,
                              gg.dw_config(k, n, dtype.name, "tf32"), args)
  if args.breakdown:
    res["breakdown"] = time_breakdown(x, w, dy, sizes_d, offsets_d, x_dense, w_dense, dy_dense,
                                      experts, fwd_flops, args)
  if args.dump_hlo:
    res["hlo"] = dump_loop_hlo(name, tri_bwd, (x, w, dy, sizes_d, offsets_d), args.out)

  for phase in ("fwd", "bwd"):
    tri = res["triton"][phase].get("tflops")
    for base in ("dense", "ragged_dot"):
      b = res[base][phase].get("tflops")
      if tri and b:
        res.setdefault("ratios", {})[f"{phase}_vs_{base}"] = tri / b

  del x, w, dy, w_dense, x_dense, dy_dense
  gc.collect()
  return res


def time_tables(x, sizes, offsets, k, n, experts, fwd_cfg, dx_cfg, dw_cfg, args) -> dict:
  """Per-op time of the work tables the triton ops compute beside their kernels (included in
  the triton timings above): the forward's tile table, and the backward's dx tile table and dw
  step table, built by the one-launch table kernels (the default) and by the jax.numpy code
  under XLA (``JAX_EP_GMM_TABLE_KERNEL=0``)."""
  from jax_ep.backends import triton_gemm

  c = x.shape[0]
  out = {}
  for impl, kernel in (("kernel", True), ("xla", False)):
    def fwd(x, s, o, kernel=kernel):
      return triton_gemm._tile_table(s, o, c, experts, fwd_cfg.block_m, kernel)

    def bwd(x, s, o, kernel=kernel):
      dw = (triton_gemm._dw_step_table(s, o, c, experts, dw_cfg.block_k, kernel)
            if dw_cfg.flatten or dw_cfg.gluon else ())
      return triton_gemm._tile_table(s, o, c, experts, dx_cfg.block_m, kernel), dw

    for phase, fn in (("fwd", fwd), ("bwd", bwd)):
      t = _try(f"tables {impl} {phase}",
               lambda: time_op(fn, (x, sizes, offsets), args.iters, args.inner))
      if "median_s" in t:
        print(f"  {'tables':>10} {phase}: {t['median_s'] * 1e6:8.1f} us  ({impl})", flush=True)
      out.setdefault(impl, {})[phase] = t
  return out


def product_ops(product, x, w, dy, sizes, offsets, experts, x_dense, w_dense, dy_dense) -> dict:
  """{"triton": (fn, args), "dense": (fn, args)} of one product: ``fwd`` (x[rows of e] @ w[e]),
  ``dx`` (dy @ w[e]^T) or ``dw`` (x[rows of e]^T @ dy[rows of e]) on our kernels, and the
  dense ``jnp.dot`` of the same FLOPs on the ``*_dense`` operands (cuBLAS). Each fn takes x
  (or dy) first, as the timing loops perturb it."""
  from jax_ep.backends import triton_gemm

  if product == "fwd":
    return {"triton": (lambda x, w, s, o: triton_gemm._gmm(x, w, s, o), (x, w, sizes, offsets)),
            "dense": (lambda x, w: jnp.dot(x, w), (x_dense, w_dense))}
  if product == "dx":
    return {"triton": (lambda dy, w, s, o: triton_gemm._grouped(dy, w, s, o, transpose_w=True),
                       (dy, w, sizes, offsets)),
            "dense": (lambda dy, w: jnp.dot(dy, w.T), (dy_dense, w_dense))}
  if product == "dw":
    return {"triton": (lambda x, dy, s, o: triton_gemm._grouped_dw(x, dy, s, o, experts),
                       (x, dy, sizes, offsets)),
            "dense": (lambda x, dy: jnp.dot(x.T, dy), (x_dense, dy_dense))}
  raise ValueError(f"unknown product {product!r}; choose from fwd, dx, dw")


def time_breakdown(x, w, dy, sizes, offsets, x_dense, w_dense, dy_dense, experts, fwd_flops,
                   args) -> dict:
  """The backward's two products timed alone, triton and dense, in the main protocol's loop:
  dx (``dy @ w[e]^T``) and dw (``x[rows of e]^T @ dy[rows of e]``), so the backward's time can
  be split into its kernels and whatever else its step runs."""
  out = {}
  for phase in ("dx", "dw"):
    ops = product_ops(phase, x, w, dy, sizes, offsets, experts, x_dense, w_dense, dy_dense)
    for impl in ("triton", "dense"):
      fn, fargs = ops[impl]
      out.setdefault(impl, {})[phase] = _timed(impl, phase, fn, fargs, fwd_flops, args,
                                               "; alone")
  return out


def _timed(impl, phase, fn, fargs, flops, args, note="") -> dict:
  """``time_op`` of one op (its error instead, if it fails), with TFLOP/s, printed."""
  t = _try(f"{impl} {phase}", lambda: time_op(fn, fargs, args.iters, args.inner))
  if "median_s" in t:
    t["tflops"] = flops / t["median_s"] / 1e12
    print(f"  {impl:>10} {phase}: {t['median_s'] * 1e3:8.3f} ms  {t['tflops']:7.1f} TFLOP/s"
          f"  (inner {t['inner']}{note})", flush=True)
  gc.collect()
  return t


def dump_loop_hlo(name, fn, fargs, out_dir) -> dict:
  """The optimized HLO of ``fn``'s two-op timing loop, written to ``<out_dir>/hlo_<name>.txt``;
  returns its file name and the copies and custom calls in it (a copy of a large carried
  output would be time the op does not spend)."""
  text = _looped(fn, 2).lower(*fargs).compile().as_text()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"hlo_{name}.txt")
  with open(path, "w") as f:
    f.write(text)
  copies = re.findall(r"= (\S+) copy(?:-start)?\(", text)
  calls = re.findall(r'custom_call_target="([^"]+)"', text)
  print(f"  hlo of the triton bwd loop: {os.path.basename(path)}; copies {copies or 'none'}; "
        f"custom calls {len(calls)}", flush=True)
  return dict(file=os.path.basename(path), copies=copies, custom_calls=calls)


# -- sweep ---------------------------------------------------------------------------------------

PHASE_NOTES = {"fwd": "y = x @ w[e]", "dx": "dx = dy @ w[e]^T", "dw": "dw[e] = x^T dy"}


def _phase_kn(phase, k, n):
  """(K, N) as the phase's kernel sees them (the ``TUNED`` key): dx swaps the forward's."""
  return (n, k) if phase == "dx" else (k, n)


def _phase_op(phase, cfg, tma, experts):
  """The product as a function of (perturbed input, other operand, sizes, offsets)."""
  from jax_ep.backends import triton_gemm

  if phase == "dw":
    return lambda x, dy, s, o: triton_gemm._grouped_dw(x, dy, s, o, experts, config=cfg,
                                                       use_tma=tma)
  return lambda a, w, s, o: triton_gemm._grouped(a, w, s, o, transpose_w=phase == "dx",
                                                 config=cfg, use_tma=tma)


def _phase_specs(phase, rows, experts, k, n, dtype):
  """ShapeDtypeStructs of the phase's (a, b, sizes, offsets)."""
  sd = jax.ShapeDtypeStruct
  a = {"fwd": (rows, k), "dx": (rows, n), "dw": (rows, k)}[phase]
  b = (rows, n) if phase == "dw" else (experts, k, n)
  i32 = jnp.dtype(jnp.int32)
  return sd(a, dtype), sd(b, dtype), sd((experts,), i32), sd((experts,), i32)


def _resolve(phase, cfg, tma, k, n, experts, dtype):
  """The candidate's actual TileConfig, or None when the shape cannot take it (TMA rules)."""
  from jax_ep.kernels import grouped_gemm as gg

  kk, nn = _phase_kn(phase, k, n)
  if phase == "dw":
    cfg = cfg or gg.dw_config(kk, nn, dtype.name, tma=tma)
    ok = not tma or gg.tma_supported(kk, nn, experts, cfg, w_strides=(kk * nn, nn, 1),
                                     elem_bytes=dtype.itemsize, dw=True)
  else:
    if cfg == "gluon":
      from jax_ep.backends import triton_gemm
      cfg = gg.forward_config(kk, nn, dtype.name, phase=phase, tma=tma,
                              gluon=triton_gemm._gluon_available())
    cfg = cfg or gg.forward_config(kk, nn, dtype.name, phase=phase, tma=tma)
    w_strides = (k * n, 1, kk) if phase == "dx" else (k * n, n, 1)
    ok = not tma or gg.tma_supported(kk, nn, experts, cfg, w_strides=w_strides,
                                     elem_bytes=dtype.itemsize)
  return cfg if ok else None


def sweep_jobs(names, table, dtype, with_tma: bool, phases=None, labels=None):
  """Every (shape, phase, label, config, tma) the sweep will time: per shape, the products'
  candidate lists interleaved by priority, each deduplicated. ``phases``: only these products;
  ``labels``: only candidates whose label starts with one of these (the "default" reference
  of each product is always kept)."""
  jobs = []
  for name in names:
    rows, experts, k, n = table[name]
    per_phase = []
    for phase, cands in _sweep_candidates().items():
      if phases and phase not in phases:
        continue
      seen, mine = set(), []
      for label, cfg, tma in cands:
        if tma and not with_tma:
          continue
        if labels and label != "default" and not any(label.startswith(x) for x in labels):
          continue
        cfg = _resolve(phase, cfg, tma, k, n, experts, dtype)
        if cfg is None or (cfg, tma) in seen:
          continue
        seen.add((cfg, tma))
        mine.append(dict(shape=name, phase=phase, label=label, cfg=cfg, tma=tma))
      per_phase.append(mine)
    for rank in range(max(map(len, per_phase))):
      jobs += [mine[rank] for mine in per_phase if rank < len(mine)]
  return jobs


def _job_key(j):
  return (j["shape"], j["phase"], j["cfg"], j["tma"])


def _compile_worker(spec_path: str, start: int) -> None:
  """Worker process: trace jobs[start:] (compiling their kernels into the cache); one line each."""
  from jax_ep import _ffi

  _ffi.available = lambda: False  # trace only: no cubin registration, no GPU
  from jax_ep.kernels import grouped_gemm as gg

  with open(spec_path) as f:
    spec = json.load(f)
  dtype = jnp.dtype(spec["dtype"])
  for i, j in enumerate(spec["jobs"][start:], start):
    rows, experts, k, n = spec["shapes"][j["shape"]]
    cfg = gg.TileConfig(**j["cfg"])
    t0 = time.perf_counter()
    try:
      jax.eval_shape(_phase_op(j["phase"], cfg, j["tma"], experts),
                     *_phase_specs(j["phase"], rows, experts, k, n, dtype))
      status = "ok"
    except Exception as e:  # noqa: BLE001 - reported to the parent, which skips the job
      status = f"error {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"JOB {i} {time.perf_counter() - t0:.1f}s {status}", flush=True)


def precompile(jobs, table, dtype, workers: int, log_dir: str):
  """Compile every job's kernels in ``workers`` CPU-only processes; returns a Popen-like handle
  whose ``wait()`` gives {job index: "ok" | error}. A crashed worker's current job is marked
  crashed and the worker restarted after it."""
  import subprocess
  import tempfile
  import threading

  spec = dict(dtype=dtype.name, shapes={s: table[s] for s in {j["shape"] for j in jobs} if s in table},
              jobs=[dict(shape=j["shape"], phase=j["phase"], tma=j["tma"],
                         cfg=dataclasses.asdict(j["cfg"])) for j in jobs])
  os.makedirs(log_dir, exist_ok=True)
  results: dict[int, str] = {}
  lock = threading.Lock()
  # Interleave the jobs over the workers so each gets a mix of shapes (and compile times).
  slices = [list(range(w, len(jobs), workers)) for w in range(workers)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")

  def run(w, idx):
    if not idx:
      return
    fd, path = tempfile.mkstemp(suffix=".json", prefix=f"gmm_sweep_{w}_", dir=log_dir)
    sub = dict(spec, jobs=[spec["jobs"][i] for i in idx])
    with os.fdopen(fd, "w") as f:
      json.dump(sub, f)
    start = 0
    while start < len(idx):
      p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_compile-worker", path,
                          str(start)], env=env, capture_output=True, text=True)
      done = start
      for line in p.stdout.splitlines():
        if line.startswith("JOB "):
          _, i, _, status = line.split(" ", 3)
          with lock:
            results[idx[int(i)]] = status
          done = int(i) + 1
      if done < len(idx):  # the worker died on job `done` (a compiler abort, say)
        with lock:
          results[idx[done]] = f"crashed (exit {p.returncode}): {p.stderr.strip()[-200:]}"
        done += 1
      start = done

  threads = [threading.Thread(target=run, args=(w, idx), daemon=True)
             for w, idx in enumerate(slices)]
  for t in threads:
    t.start()

  class Handle:
    def wait(self):
      for t in threads:
        t.join()
      return results

  return Handle()


def tma_probe():
  """None when the TMA variant launches here (the FFI launcher gave Triton its aligned global
  scratch), else the error: a tiny forward through device-side descriptors."""
  from jax_ep.backends import triton_gemm

  x = jnp.ones((256, 64), jnp.bfloat16)
  w = jnp.ones((2, 64, 64), jnp.bfloat16)
  s = jnp.array([100, 150], jnp.int32)
  o = jnp.array([0, 100], jnp.int32)
  try:
    y = jax.jit(lambda x, w: triton_gemm._grouped(x, w, s, o, transpose_w=False,
                                                   use_tma=True))(x, w)
    y = np.asarray(y, np.float32)
    if not (np.all(y[:250] == 64) and np.all(y[250:] == 0)):
      return "wrong results"
    return None
  except Exception as e:  # noqa: BLE001
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def sweep(names, table, args, seeds, results, compiled, jobs, deadline, save=None):
  """Time every compiled job (see the module docstring); returns (rows, winners). ``save(rows,
  winners)`` runs after each shape, so a run cut short keeps what it measured."""
  dtype = jnp.dtype(args.dtype)
  tol = 3e-2 if dtype == jnp.bfloat16 else 1e-2
  by_shape = {}
  for i, j in enumerate(jobs):
    by_shape.setdefault(j["shape"], []).append((i, j))
  out, winners = [], {}
  check = jax.jit(lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
  for si, name in enumerate(names):
    rows, experts, k, n = table[name]
    res = next((r for r in results if r["name"] == name), {})
    dense = res.get("dense", {}).get("fwd", {}).get("tflops")
    sizes, layout, x, w, dy, _ = make_inputs(rows, experts, k, n, args, seeds[name])
    s_d, o_d = layout.group_sizes, layout.group_offsets
    flops = 2.0 * int(sizes.sum()) * k * n
    # One inner count per shape (same perturbations for every candidate): ~15 ms samples at
    # about 0.6x the dense rate.
    est = flops / (0.6 * (dense or 400.0) * 1e12)
    inner = int(min(args.inner, max(1, round(0.015 / est))))
    shape_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(names) - si)
    print(f"\n== sweep {name} (R={int(sizes.sum())}, E={experts}, K={k}, N={n}; inner {inner}, "
          f"{args.sweep_iters} samples; dense {dense or float('nan'):.1f} TFLOP/s)", flush=True)
    refs = {}
    for i, j in by_shape.get(name, []):
      phase, cfg, tma, label = j["phase"], j["cfg"], j["tma"], j["label"]
      row = dict(shape=name, phase=phase, label=label, config=cfg.table_entry(), tma=tma,
                 K=_phase_kn(phase, k, n)[0], N=_phase_kn(phase, k, n)[1])
      status = compiled.get(i, "not compiled")
      if status != "ok":
        row["error"] = f"compile: {status}"
      elif time.monotonic() > shape_deadline and label != "default":
        row["error"] = "skipped: sweep budget"
      else:
        a, b = {"fwd": (x, w), "dx": (dy, w), "dw": (x, dy)}[phase]

        def run():
          got, t = time_fixed(_phase_op(phase, cfg, tma, experts), (a, b, s_d, o_d), inner,
                              args.sweep_iters)
          if phase not in refs:  # the first (default) candidate is the phase's reference
            refs[phase] = got
            t["rel_err"] = 0.0
          else:
            t["rel_err"] = float(check(got, refs[phase]))
          t["correct"] = bool(np.isfinite(t["rel_err"]) and t["rel_err"] < tol)
          t["tflops"] = flops / t["median_s"] / 1e12
          if dense:
            t["vs_dense"] = t["tflops"] / dense
          return t

        row.update(_try(f"sweep {name} {phase} {label}", run))
      what = f"{label} = {row['config'][11:-1]}" if "default" in label else label
      if "median_s" in row:
        vd = f"{row['vs_dense']:5.2f}x" if "vs_dense" in row else "     "
        print(f"  {phase:<3} {what:<44} {row['median_s'] * 1e3:7.3f} ms {row['tflops']:6.1f} "
              f"TFLOP/s {vd} {'ok' if row['correct'] else 'WRONG'}", flush=True)
        key = (phase, row["K"], row["N"], dtype.name, tma)
        if row["correct"] and (key not in winners or row["tflops"] > winners[key]["tflops"]):
          winners[key] = dict(row, shape=name)
      else:
        print(f"  {phase:<3} {what:<44} {row.get('error', '')[:70]}", flush=True)
      out.append(row)
      gc.collect()
    del x, w, dy, refs
    gc.collect()
    if save is not None:
      save(out, winners)
  return out, winners


def print_winners(winners):
  print("\nFastest correct candidate per shape and product (paste into TUNED in "
        "kernels/grouped_gemm.py):")
  for key, r in sorted(winners.items(), key=lambda kv: (kv[1]["shape"], kv[0])):
    vd = f"{r['vs_dense']:.2f}x dense" if "vs_dense" in r else ""
    print(f"    {key!r}: {r['config']},  # {r['shape']} {r['phase']}: {r['tflops']:.0f} "
          f"TFLOP/s {vd} ({r['label']})")


SWIGLU_SHAPES = {
    # name: (rows, experts, hidden, ffn)
    "dsv3_swiglu": (32768, 64, 7168, 2048),
    "qwen3_swiglu": (32768, 128, 2048, 768),
}
QUICK_SWIGLU_SHAPES = {"small_swiglu": (4096, 16, 1024, 512)}


def _swiglu_dense(x, wgu, wd):
  """The same FLOPs as one dense MLP over all rows (cuBLAS): the baseline of the ratios."""
  g, u = jnp.split(jnp.dot(x, wgu).astype(jnp.float32), 2, axis=-1)
  return jnp.dot((jax.nn.silu(g) * u).astype(x.dtype), wd)


def bench_swiglu(name, rows, experts, hidden, ffn, args, seed: int) -> dict:
  """The expert block as models run it (jax_ep.experts.swiglu: gate, up, down), forward and
  forward+backward (grads of x and the weights): triton and xla, ``jax_ep.experts.swiglu_fused``
  (gate and up in one weight ``[E, H, 2F]``) on either (``triton-fused``, ``xla-fused``; on
  triton its forward runs the activation in the gate | up kernel's epilogue, and
  ``triton-fused-xla-act`` is the same block with the activation in XLA), and one dense MLP of
  the same FLOPs (``dense``: ``[H, 2F]`` and ``[F, H]`` weights, cuBLAS)."""
  from jax_ep import experts as expert_fns
  from jax_ep import grouped_matmul

  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(args.dtype)
  sizes = group_sizes(rng, rows, experts, args.routing)
  layout = layout_for(sizes, rows)
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (rows, hidden), jnp.float32).astype(dtype)
  wg, wu = ((jax.random.normal(k, (experts, hidden, ffn), jnp.float32) / math.sqrt(hidden))
            .astype(dtype) for k in keys[1:3])
  wd = (jax.random.normal(keys[3], (experts, ffn, hidden), jnp.float32) / math.sqrt(ffn)
        ).astype(dtype)
  flops = 3 * 2.0 * int(sizes.sum()) * hidden * ffn
  res = dict(name=name, rows=rows, experts=experts, hidden=hidden, ffn=ffn, dtype=dtype.name,
             routing=args.routing, seed=seed)
  print(f"\n== {name}: swiglu experts, R={int(sizes.sum())}, E={experts}, H={hidden}, "
        f"F={ffn}", flush=True)
  wgu = jnp.concatenate([wg, wu], axis=-1)

  def variant_fn(variant):
    """(fwd, operands) of one variant; fwd's last operand is the layout (an argument, not a
    constant of the jitted loop: its group sizes then cannot be folded into the tile tables at
    compile time)."""
    if variant == "dense":  # one expert's shapes, [H, 2F] and [F, H], over all rows
      return (lambda x, wgu, wd, layout: _swiglu_dense(x, wgu, wd)), (x, wgu[0], wd[0], layout)
    if variant == "triton-fused-xla-act":  # swiglu_fused before the fused activation kernel
      def apart(x, wgu, wd, layout):
        h = expert_fns._glu_of(grouped_matmul(x, wgu, layout, backend="triton"))
        return grouped_matmul(h, wd, layout, backend="triton")
      return apart, (x, wgu, wd, layout)
    backend = variant.removesuffix("-fused")
    if variant.endswith("-fused"):
      return (functools.partial(expert_fns.swiglu_fused, backend=backend),
              (x, wgu, wd, layout))
    return functools.partial(expert_fns.swiglu, backend=backend), (x, wg, wu, wd, layout)

  variants = {v: variant_fn(v) for v in args.swiglu_variants.split(",") if v}
  # Correctness first: each grouped variant's output against the xla backend's (computed once).
  want = np.asarray(jax.jit(variant_fn("xla")[0])(x, wg, wu, wd, layout), np.float32)
  scale = float(np.abs(want).max()) + 1e-6
  res["max_rel_err_vs_xla"] = {}
  for variant, (fwd, operands) in variants.items():
    if variant == "dense":
      continue
    got = _try(f"swiglu {variant} check",
               lambda: np.asarray(jax.jit(fwd)(*operands), np.float32))
    if isinstance(got, np.ndarray):
      err = float(np.abs(got - want).max()) / scale
      res["max_rel_err_vs_xla"][variant] = err
      print(f"  {variant}: max |y - y_xla| / max |y_xla| = {err:.2e}", flush=True)
      if not err < 2e-2:
        raise SystemExit(f"bench_swiglu: {variant} differs from the xla backend ({err:.2e})")
  for backend, (fwd, operands) in variants.items():
    def train(*a, fwd=fwd):
      loss = lambda *w: jnp.sum(fwd(*w, a[-1]).astype(jnp.float32))  # noqa: E731
      return jax.grad(loss, argnums=tuple(range(len(a) - 1)))(*a[:-1])

    for phase, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", train, 3 * flops)):
      t = _try(f"swiglu {backend} {phase}",
               lambda: time_op(fn, operands, args.iters, args.inner))
      if "median_s" in t:
        t["tflops"] = fl / t["median_s"] / 1e12
        print(f"  {backend:>7} {phase:<8}: {t['median_s'] * 1e3:8.3f} ms  "
              f"{t['tflops']:7.1f} TFLOP/s", flush=True)
      res.setdefault(backend, {})[phase] = t
      gc.collect()
  for phase in ("fwd", "fwd+bwd"):
    for ours in ("triton", "triton-fused", "triton-fused-xla-act"):
      a = res.get(ours, {}).get(phase, {}).get("median_s")
      for base, key in (("xla", "speedup_vs_xla"), ("dense", "vs_dense")):
        b = res.get(base, {}).get(phase, {}).get("median_s")
        if a and b:
          res.setdefault(key, {}).setdefault(ours, {})[phase] = b / a
          print(f"  {ours} {phase}: {b / a:.2f}x {base}", flush=True)
  del x, wg, wu, wd, wgu, variants
  gc.collect()
  return res


# -- report --------------------------------------------------------------------------------------

def print_table(results):
  print("\nshape        phase  triton ms  TFLOP/s | dense ms  TFLOP/s | ragged ms  TFLOP/s |"
        " vs dense  vs ragged  correct")
  for r in results:
    for phase in ("fwd", "bwd"):
      def col(impl):
        t = r.get(impl, {}).get(phase, {})
        if "median_s" not in t:
          return f"{'err':>9} {'':>8}"
        return f"{t['median_s'] * 1e3:9.3f} {t['tflops']:8.1f}"
      ratios = r.get("ratios", {})
      vd = ratios.get(f"{phase}_vs_dense")
      vr = ratios.get(f"{phase}_vs_ragged_dot")
      print(f"{r['name']:<12} {phase:<5} {col('triton')} | {col('dense')} | {col('ragged_dot')} |"
            f" {vd if vd is None else f'{vd:8.2f}x'} {vr if vr is None else f'{vr:9.2f}x'}"
            f"  {r.get('check', {}).get('correct')}")


def plot(results, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  impls = ("triton", "dense", "ragged_dot")
  for ax, phase in zip(axes, ("fwd", "bwd")):
    xs = np.arange(len(results))
    for i, impl in enumerate(impls):
      vals = [r.get(impl, {}).get(phase, {}).get("tflops", 0.0) for r in results]
      ax.bar(xs + (i - 1) * 0.27, vals, 0.27, label=impl)
    ax.set_xticks(xs, [r["name"] for r in results], rotation=15)
    ax.set_title(f"{phase} ({'y' if phase == 'fwd' else 'dx + dw'})")
    ax.set_ylabel("TFLOP/s")
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=",".join(SHAPES),
                 help=f"comma-separated names from {list(SHAPES) + list(QUICK_SHAPES)}, or "
                 "ROWSxEXPERTSxKxN for any other shape")
  p.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--routing", default="uniform", choices=["uniform", "zipf", "balanced"])
  p.add_argument("--iters", type=int, default=20, help="timed samples per op (>= 20)")
  p.add_argument("--inner", type=int, default=50, help="max ops per timed sample")
  p.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
  p.add_argument("--sweep-budget", type=float, default=150.0,
                 help="seconds for the sweep's timing (compiles run in parallel before)")
  p.add_argument("--sweep-iters", type=int, default=5, help="timed samples per sweep candidate")
  p.add_argument("--sweep-phases", default="", help="comma-separated products (fwd,dx,dw)")
  p.add_argument("--sweep-labels", default="",
                 help="comma-separated label prefixes of the candidates to time (e.g. flat)")
  p.add_argument("--sweep-only", action="store_true",
                 help="skip the main benchmark (the sweep then reports no ratio to dense)")
  p.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                 help="parallel compile workers for the sweep")
  p.add_argument("--swiglu", action="store_true",
                 help="also time the SwiGLU expert block (--swiglu-variants)")
  p.add_argument("--swiglu-only", action="store_true",
                 help="time the SwiGLU block only (implies --swiglu; no main shapes)")
  p.add_argument("--swiglu-variants", default="triton,triton-fused,xla,dense",
                 help="with --swiglu: comma-separated variants of the block to time "
                      "(triton, triton-fused, triton-fused-xla-act, xla, xla-fused, dense)")
  p.add_argument("--breakdown", action="store_true",
                 help="also time the backward's dx and dw alone (triton and dense)")
  p.add_argument("--dump-hlo", action="store_true",
                 help="write the optimized HLO of each shape's triton backward loop to --out")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  p.add_argument("--_compile-worker", nargs=2, metavar=("SPEC", "START"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._compile_worker:
    _compile_worker(args._compile_worker[0], int(args._compile_worker[1]))
    return
  if args.iters < 20:
    p.error(f"--iters={args.iters} must be >= 20 (benchmark protocol)")
  if (args.sweep_only or args.sweep_phases or args.sweep_labels) and not args.sweep:
    p.error("--sweep-only / --sweep-phases / --sweep-labels need --sweep")
  bad = set(filter(None, args.sweep_phases.split(","))) - set(_sweep_candidates())
  if bad:
    p.error(f"--sweep-phases: unknown {sorted(bad)}; choose from {list(_sweep_candidates())}")

  table = dict(SHAPES, **QUICK_SHAPES)
  names = list(QUICK_SHAPES) if args.quick else [s for s in args.shapes.split(",") if s]
  for s in names:
    custom = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", s)
    if custom and all(int(v) > 0 for v in custom.groups()):
      table[s] = tuple(int(v) for v in custom.groups())
    elif s not in table:
      p.error(f"unknown shape {s!r}; choose from {list(table)} or give ROWSxEXPERTSxKxN "
              f"(e.g. 32768x8x7168x4096)")

  require_triton_gemm("bench_grouped_gemm")

  device = jax.devices()[0]
  now = datetime.datetime.now(datetime.timezone.utc)
  import triton
  meta = dict(device=device.device_kind, platform=device.platform,
              date_utc=now.isoformat(timespec="seconds"), jax=jax.__version__,
              triton=triton.__version__, args=vars(args))
  print(f"{meta['device']} | jax {jax.__version__} | triton {triton.__version__} | "
        f"{meta['date_utc']}", flush=True)
  seeds = {s: args.seed + i for i, s in enumerate(names)}

  compiling = None
  if args.sweep:
    # Compile the sweep's kernels in the background while the main benchmark runs.
    import tempfile
    meta["tma_probe"] = tma_probe()
    print(f"TMA variant: {'available' if meta['tma_probe'] is None else meta['tma_probe']}",
          flush=True)
    jobs = sweep_jobs(names, table, jnp.dtype(args.dtype), meta["tma_probe"] is None,
                      [x for x in args.sweep_phases.split(",") if x],
                      [x for x in args.sweep_labels.split(",") if x])
    t_compile = time.monotonic()
    compiling = precompile(jobs, table, jnp.dtype(args.dtype), args.jobs,
                           tempfile.mkdtemp(prefix="gmm_sweep_"))
    print(f"compiling {len(jobs)} sweep candidates in {args.jobs} worker processes", flush=True)

  args.swiglu = args.swiglu or args.swiglu_only
  results = [] if args.sweep_only or args.swiglu_only else [
      bench_shape(s, *table[s], args, seeds[s]) for s in names]
  print_table(results)

  os.makedirs(args.out, exist_ok=True)
  slug = re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-").lower()
  stem = os.path.join(args.out, f"grouped_gemm_{slug}_{now.strftime('%Y%m%d-%H%M%S')}")
  record = dict(meta=meta, results=results)
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
  if args.swiglu:
    shapes = QUICK_SWIGLU_SHAPES if args.quick else SWIGLU_SHAPES
    record["swiglu"] = [bench_swiglu(s, *shape, args, args.seed + 100 + i)
                        for i, (s, shape) in enumerate(shapes.items())]
    with open(stem + ".json", "w") as f:
      json.dump(record, f, indent=1)
  if args.sweep:  # after the main results are on disk: a failing variant cannot lose them
    deadline = time.monotonic() + args.sweep_budget
    compiled = compiling.wait()
    bad = {i: st for i, st in compiled.items() if st != "ok"}
    print(f"\nsweep kernels compiled in {time.monotonic() - t_compile:.0f} s "
          f"({len(compiled) - len(bad)} ok, {len(bad)} failed)", flush=True)
    for i, st in sorted(bad.items()):
      j = jobs[i]
      print(f"  compile failed: {j['shape']} {j['phase']} {j['label']}: {st[:160]}")
    def save(rows, winners):
      record["sweep"] = rows
      record["sweep_winners"] = [dict(key=list(k), **v) for k, v in winners.items()]
      with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)

    rows, winners = sweep(names, table, args, seeds, results, compiled, jobs, deadline, save)
    print_winners(winners)
  try:
    plot(results, stem + ".png",
         f"grouped GEMM, {args.dtype}, {args.routing} routing - {meta['device']} - "
         f"{meta['date_utc']}")
  except Exception as e:  # matplotlib missing: the JSON still stands
    print(f"plot skipped: {e}")
  print_table(results)
  print(f"\nwrote {stem}.json and .png")


if __name__ == "__main__":
  main()
