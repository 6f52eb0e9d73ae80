"""Benchmark: Triton grouped GEMM vs cuBLAS dense ``jnp.dot`` vs ``jax.lax.ragged_dot``.

Protocol (docs/GROUPED_GEMM.md):
  1. Correctness first: for every shape, the triton forward and backward (dx, dw) are compared
     with the xla backend (``jax.lax.ragged_dot`` + masking) on the benchmark's own inputs; a
     mismatch is printed as FAILED and recorded (``"correct": false``) next to the timings.
  2. Timing, all three in the same run on the same device: each sample is one jitted call that
     runs the op ``inner`` times in a ``fori_loop`` (the input changes by one element per
     iteration so nothing is hoisted), divided by ``inner``; median of ``--iters`` (>= 20)
     samples after warm-up. Forward and backward (dx + dw) are timed separately.
       triton     jax_ep.backends.triton_gemm (our kernels via the FFI launch path)
       dense      one ``jnp.dot`` [R, K] @ [K, N] of the same FLOPs (cuBLAS), R = rows in groups
       ragged_dot ``jax.lax.ragged_dot`` on the same groups
     TFLOP/s = 2*R*K*N (forward) or 4*R*K*N (backward) / time.
  3. Results: a table on stdout, JSON + PNG in ``benchmarks/results/`` named with the device and
     the UTC date. ``--sweep`` also times a few tile configurations per shape (forward and dw) so
     the tile table in kernels/grouped_gemm.py can be checked against measurements: forward
     persistent (the default) / one program per tile / TMA descriptors / half-height partial
     tiles on (the default) and off, dw pointer / TMA; each
     variant is checked against the xla backend before it is timed. Sweeps run after the main
     results are written.

Shapes (rows, local experts, K, N): DeepSeek-V3-like per rank at EP=4 (4096 tokens x top-8 =
32768 rows, 64 local experts, hidden 7168, expert FFN 2048: up = gate|up fused N=4096, down
K=2048 -> N=7168) and Qwen3-MoE-like (hidden 2048, FFN 768, 128 experts, 32768 rows).
Targets on H200: triton >= 0.8x dense TFLOP/s and >= 1.5x ragged_dot.

``--swiglu`` also times the expert block as models run it (``jax_ep.experts.swiglu``: gate, up,
down; forward and forward+backward), triton vs xla.

Run (one GPU):  python benchmarks/bench_grouped_gemm.py [--swiglu] [--sweep] [--shapes dsv3_up,qwen3_up]
"""
from __future__ import annotations

import argparse
import datetime
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
SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 3),   # small enough for 2 programs per SM (overlaps epilogues)
    (64, 256, 64, 4, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
]


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

def _looped(fn, inner: int):
  """jit(args -> fn(*args) run ``inner`` times); args[0] changes by one element per iteration."""
  def run(x, *rest):
    out0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, x, *rest))

    def body(i, carry):
      x, _ = carry
      x = lax.dynamic_update_slice(x, jnp.full((1, 1), i, x.dtype), (0, 0))
      return x, fn(x, *rest)

    return lax.fori_loop(0, inner, body, (x, out0))[1]
  return jax.jit(run)


def time_op(fn, args, iters: int, max_inner: int) -> dict:
  """Median seconds per op over ``iters`` samples (see the module docstring)."""
  single = _looped(fn, 1)
  jax.block_until_ready(single(*args))  # compile + warm up
  t0 = time.perf_counter()
  jax.block_until_ready(single(*args))
  one = time.perf_counter() - t0
  inner = int(min(max_inner, max(1, math.ceil(0.02 / max(one, 1e-6)))))
  f = _looped(fn, inner) if inner > 1 else single
  jax.block_until_ready(f(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    samples.append((time.perf_counter() - t0) / inner)
  return dict(median_s=statistics.median(samples), min_s=min(samples), inner=inner,
              iters=iters)


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


def bench_shape(name, rows, experts, k, n, args, seed: int) -> dict:
  from jax_ep.backends import triton_gemm, xla
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
             fwd_config=str(gg.forward_config(k, n, dtype.name, "tf32")),
             dx_config=str(gg.forward_config(n, k, dtype.name, "tf32")),
             dw_config=str(gg.dw_config(k, n, dtype.name, "tf32")),
             tma_default=triton_gemm._use_tma_default())
  fwd_flops = 2.0 * r * k * n
  print(f"\n== {name}: R={r} rows, E={experts}, K={k}, N={n}, {dtype.name}, {args.routing} "
        f"(group sizes {sizes.min()}..{sizes.max()}, {int((sizes == 0).sum())} empty)",
        flush=True)

  # The ops (each takes x first: the timing loop perturbs it).
  def tri_fwd(x, w):
    return triton_gemm.grouped_matmul(x, w, layout)

  def tri_bwd(x, w, dy):
    return triton_gemm._gmm_bwd((x, w, sizes_d, offsets_d), dy)

  def rag_fwd(x, w):
    return lax.ragged_dot(x, w, sizes_d)

  def rag_bwd(x, w, dy):
    return jax.vjp(lambda x, w: lax.ragged_dot(x, w, sizes_d), x, w)[1](dy)

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
      "triton": ((tri_fwd, (x, w)), (tri_bwd, (x, w, dy))),
      "dense": ((dense_fwd, (x_dense, w_dense)), (dense_bwd, (x_dense, w_dense, dy_dense))),
      "ragged_dot": ((rag_fwd, (x, w)), (rag_bwd, (x, w, dy))),
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
      t = _try(f"{impl} {phase}", lambda: time_op(fn, fargs_, args.iters, args.inner))
      if "median_s" in t:
        t["tflops"] = flops / t["median_s"] / 1e12
        print(f"  {impl:>10} {phase}: {t['median_s'] * 1e3:8.3f} ms  {t['tflops']:7.1f} TFLOP/s"
              f"  (inner {t['inner']})", flush=True)
      res.setdefault(impl, {})[phase] = t
      gc.collect()

  for phase in ("fwd", "bwd"):
    tri = res["triton"][phase].get("tflops")
    for base in ("dense", "ragged_dot"):
      b = res[base][phase].get("tflops")
      if tri and b:
        res.setdefault("ratios", {})[f"{phase}_vs_{base}"] = tri / b

  del x, w, dy, w_dense, x_dense, dy_dense
  gc.collect()
  return res


def sweep_shape(name, rows, experts, k, n, args, seed: int) -> list[dict]:
  """Time candidate tile configs (forward: persistent/per-tile, pointer/TMA; dw: pointer/TMA),
  each checked against the xla backend on the same inputs first."""
  from jax_ep.backends import triton_gemm, xla

  from jax_ep.kernels import grouped_gemm as gg

  sizes, layout, x, w, dy, _ = make_inputs(rows, experts, k, n, args, seed)
  s_d, o_d = layout.group_sizes, layout.group_offsets
  flops = 2.0 * int(sizes.sum()) * k * n
  tol = 3e-2 if jnp.dtype(args.dtype) == jnp.bfloat16 else 1e-2
  y_ref = np.asarray(jax.jit(lambda x, w: xla.grouped_matmul(x, w, layout))(x, w), np.float32)
  dw_ref = np.asarray(jax.jit(lambda x, w, dy: jax.vjp(
      lambda w: xla.grouped_matmul(x, w, layout), w)[1](dy)[0])(x, w, dy), np.float32)
  print(f"\n== sweep {name}", flush=True)
  out = []
  for cfg_t in SWEEP:
    cfg = gg.TileConfig(*cfg_t)
    runs = []
    for pers, tma, half in ((True, False, True), (True, False, False), (False, False, True),
                            (True, True, True)):
      runs.append((f"fwd persistent={pers} tma={tma} half={half}", y_ref,
                   lambda x, w, c=cfg, p=pers, t=tma, h=half: triton_gemm._grouped(
                       x, w, s_d, o_d, transpose_w=False, config=c, persistent=p, use_tma=t,
                       half_tiles=h),
                   (x, w)))
    for tma in (False, True):
      runs.append((f"dw tma={tma}", dw_ref,
                   lambda x, dy, c=cfg, t=tma: triton_gemm._grouped_dw(
                       x, dy, s_d, o_d, experts, config=c, use_tma=t), (x, dy)))
    for kind, ref, fn, fargs in runs:
      def run():
        got = np.asarray(jax.jit(fn)(*fargs), np.float32)
        rel = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
        t = time_op(fn, fargs, args.iters, args.inner)
        t.update(rel_err=rel, correct=bool(np.isfinite(got).all() and rel < tol))
        return t
      t = _try(f"sweep {kind} {cfg_t}", run)
      if "median_s" in t:
        t["tflops"] = flops / t["median_s"] / 1e12
        print(f"  {kind:<40} {str(cfg_t):<24} {t['median_s'] * 1e3:8.3f} ms  "
              f"{t['tflops']:7.1f} TFLOP/s  {'ok' if t['correct'] else 'WRONG'}", flush=True)
      out.append(dict(shape=name, kind=kind, config=list(cfg_t), **t))
      gc.collect()
  del x, w, dy, y_ref, dw_ref
  gc.collect()
  return out


SWIGLU_SHAPES = {
    # name: (rows, experts, hidden, ffn)
    "dsv3_swiglu": (32768, 64, 7168, 2048),
    "qwen3_swiglu": (32768, 128, 2048, 768),
}
QUICK_SWIGLU_SHAPES = {"small_swiglu": (4096, 16, 1024, 512)}


def bench_swiglu(name, rows, experts, hidden, ffn, args, seed: int) -> dict:
  """The expert block as models run it (jax_ep.experts.swiglu: gate, up, down), triton vs xla,
  forward and forward+backward (value_and_grad over x and the three weights)."""
  from jax_ep import experts as expert_fns

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
  for backend in ("triton", "xla"):
    def fwd(x, wg, wu, wd, b=backend):
      return expert_fns.swiglu(x, wg, wu, wd, layout, backend=b)

    def train(x, wg, wu, wd, b=backend):
      loss = lambda *a: jnp.sum(fwd(*a, b=b).astype(jnp.float32))  # noqa: E731
      return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    for phase, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", train, 3 * flops)):
      t = _try(f"swiglu {backend} {phase}",
               lambda: time_op(fn, (x, wg, wu, wd), args.iters, args.inner))
      if "median_s" in t:
        t["tflops"] = fl / t["median_s"] / 1e12
        print(f"  {backend:>7} {phase:<8}: {t['median_s'] * 1e3:8.3f} ms  "
              f"{t['tflops']:7.1f} TFLOP/s", flush=True)
      res.setdefault(backend, {})[phase] = t
      gc.collect()
  for phase in ("fwd", "fwd+bwd"):
    a, b = (res[k][phase].get("median_s") for k in ("triton", "xla"))
    if a and b:
      res.setdefault("speedup_vs_xla", {})[phase] = b / a
  del x, wg, wu, wd
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
                 help=f"comma-separated names from {list(SHAPES) + list(QUICK_SHAPES)}")
  p.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
  p.add_argument("--routing", default="uniform", choices=["uniform", "zipf", "balanced"])
  p.add_argument("--iters", type=int, default=20, help="timed samples per op (>= 20)")
  p.add_argument("--inner", type=int, default=50, help="max ops per timed sample")
  p.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
  p.add_argument("--swiglu", action="store_true",
                 help="also time the SwiGLU expert block (jax_ep.experts.swiglu), triton vs xla")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  args = p.parse_args(argv)
  if args.iters < 20:
    p.error(f"--iters={args.iters} must be >= 20 (benchmark protocol)")

  from jax_ep.backends import triton_gemm
  why = triton_gemm._why_not_usable()
  if why:
    sys.exit(f"bench_grouped_gemm: the triton grouped matmul cannot run here: {why}")

  table = dict(SHAPES, **QUICK_SHAPES)
  names = list(QUICK_SHAPES) if args.quick else [s for s in args.shapes.split(",") if s]
  for s in names:
    if s not in table:
      p.error(f"unknown shape {s!r}; choose from {list(table)}")
  device = jax.devices()[0]
  now = datetime.datetime.now(datetime.timezone.utc)
  import triton
  meta = dict(device=device.device_kind, platform=device.platform,
              date_utc=now.isoformat(timespec="seconds"), jax=jax.__version__,
              triton=triton.__version__, args=vars(args))
  print(f"{meta['device']} | jax {jax.__version__} | triton {triton.__version__} | "
        f"{meta['date_utc']}", flush=True)
  seeds = {s: args.seed + i for i, s in enumerate(names)}
  results = [bench_shape(s, *table[s], args, seeds[s]) for s in names]
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
    record["sweep"] = []
    for s in names:
      record["sweep"] += sweep_shape(s, *table[s], args, seeds[s])
      with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
  try:
    plot(results, stem + ".png",
         f"grouped GEMM, {args.dtype}, {args.routing} routing - {meta['device']} - "
         f"{meta['date_utc']}")
  except Exception as e:  # matplotlib missing: the JSON still stands
    print(f"plot skipped: {e}")
  print(f"\nwrote {stem}.json and .png")


if __name__ == "__main__":
  main()
