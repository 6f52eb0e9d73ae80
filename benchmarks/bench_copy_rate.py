"""Copy rate of the row-moving loops of dispatch's expansion, on one GPU, per number of programs.

A diagnostic, not a target: dispatch at 32 SMs is bound by how fast a few programs move rows
(docs/KERNELS.md "Where the time goes"). This times the building blocks alone, one program per
SM, at the DeepSeek-V3 receiver's load (16,384 source rows of 7,168 bf16 from 4 sources, top-8
of 256 experts, this rank's 64 experts: ~32,768 expert rows):

  zero      store zeros to every row of recv_x (the receivers' fill of rows outside groups)
  copy      contiguous copy of the source rows (a read and a write per row, no indexing)
  *_tma_wN  the same through TMA descriptors (N warps), for the per-program ceiling of bulk copies
  columns   the expansion by slot columns (EPPlan.expand_t = 0; kernels/dispatch.py)
  pairs16   the expansion by row pairs, 16 per tile (expand_t = 16)
  pairs8    the same, 8 per tile

Bytes counted: what reaches HBM at least once (reads of distinct source rows + writes).

  python benchmarks/bench_copy_rate.py [--programs 16,32,132] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from jax_ep.kernels.dispatch import STAGES, _expand_block  # noqa: E402


@triton.jit
def zero_kernel(out_ptr, ROWS: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_H: tl.constexpr):
  pid = tl.program_id(0)
  h = tl.arange(0, BLOCK_H)
  for rb in range(pid, (ROWS + BLOCK_R - 1) // BLOCK_R, tl.num_programs(0)):
    row = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    for h0 in range(0, HIDDEN, BLOCK_H):
      m = (row < ROWS)[:, None] & ((h0 + h) < HIDDEN)[None, :]
      tl.store(out_ptr + row[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
               tl.zeros([BLOCK_R, BLOCK_H], out_ptr.dtype.element_ty), mask=m)


@triton.jit
def copy_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, HIDDEN: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
  pid = tl.program_id(0)
  h = tl.arange(0, BLOCK_H)
  for rb in range(pid, (ROWS + BLOCK_R - 1) // BLOCK_R, tl.num_programs(0)):
    row = (rb * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64) * HIDDEN
    for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):
      m = ((rb * BLOCK_R + tl.arange(0, BLOCK_R)) < ROWS)[:, None] & ((h0 + h) < HIDDEN)[None, :]
      v = tl.load(src_ptr + row + (h0 + h)[None, :], mask=m, cache_modifier=".cg")
      tl.store(out_ptr + row + (h0 + h)[None, :], v, mask=m)


@triton.jit
def zero_tma_kernel(out_ptr, ROWS: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
  """zero through TMA stores ([BLOCK_R, BLOCK_H] boxes; BLOCK_H <= 256 elements)."""
  pid = tl.program_id(0)
  desc = tl.make_tensor_descriptor(out_ptr, shape=[ROWS, HIDDEN], strides=[HIDDEN, 1],
                                   block_shape=[BLOCK_R, BLOCK_H])
  z = tl.zeros([BLOCK_R, BLOCK_H], out_ptr.dtype.element_ty)
  for rb in range(pid, (ROWS + BLOCK_R - 1) // BLOCK_R, tl.num_programs(0)):
    for h0 in range(0, HIDDEN, BLOCK_H):
      desc.store([rb * BLOCK_R, h0], z)


@triton.jit
def copy_tma_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, HIDDEN: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
  """copy through TMA loads and stores."""
  pid = tl.program_id(0)
  src = tl.make_tensor_descriptor(src_ptr, shape=[ROWS, HIDDEN], strides=[HIDDEN, 1],
                                  block_shape=[BLOCK_R, BLOCK_H])
  dst = tl.make_tensor_descriptor(out_ptr, shape=[ROWS, HIDDEN], strides=[HIDDEN, 1],
                                  block_shape=[BLOCK_R, BLOCK_H])
  n_h: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
  n_items = ((ROWS + BLOCK_R - 1) // BLOCK_R) * n_h
  for it in tl.range(pid, n_items, tl.num_programs(0), num_stages=STAGES):
    rb = it // n_h
    h0 = (it % n_h) * BLOCK_H
    dst.store([rb * BLOCK_R, h0], src.load([rb * BLOCK_R, h0]))


@triton.jit
def expand_kernel(src_ptr, pos_ptr, out_ptr, NUM_TOKENS: tl.constexpr, CAPACITY: tl.constexpr,
                  HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, EXPAND_T: tl.constexpr):
  pid = tl.program_id(0)
  for blk in range(pid, (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T, tl.num_programs(0)):
    _expand_block(0, blk, src_ptr, 0, pos_ptr, 0, pos_ptr, out_ptr, out_ptr, pos_ptr,
                  NUM_TOKENS, CAPACITY, HIDDEN, TOPK, TOPK_P, False, BLOCK_T, BLOCK_H, EXPAND_T)


def expert_rows(rng, tokens, topk, experts, world):
  """pos [tokens, topk]: rank 0's expert-major row of each slot (-1 for other ranks' experts),
  rows of one expert in (token, slot) order, as dispatch lays them out."""
  idx = np.stack([rng.choice(experts, topk, replace=False) for _ in range(tokens)])
  local = experts // world
  pos = np.full(idx.shape, -1, np.int32)
  row = 0
  for e in range(local):
    hit = np.nonzero(idx == e)
    pos[hit] = np.arange(row, row + len(hit[0]))
    row += len(hit[0])
  return pos, row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--programs", default="16,32,132")
  p.add_argument("--tokens", type=int, default=16384, help="source rows (all sources)")
  p.add_argument("--hidden", type=int, default=7168)
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--world", type=int, default=4)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--variants", default="", help="comma-separated names (default: all)")
  p.add_argument("--out", default=None, help="directory for copy_rate_<time>.json")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from jax_ep.kernels.ep_plan import EPPlan, ROWS_WARPS
  from jax_ep.launch import triton_call

  rng = np.random.default_rng(0)
  t, h, k = args.tokens, args.hidden, args.topk
  pos_np, rows = expert_rows(rng, t, k, args.experts, args.world)
  plan = EPPlan(world=args.world, num_tokens=t, max_tokens=t, hidden=h, topk=k,
                num_experts=args.experts, capacity=rows, alignment=1)
  bt, bh = plan.block_t, plan.block_h
  src = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
  pos = jnp.asarray(pos_np)
  out_rows = jax.ShapeDtypeStruct((rows, h), jnp.bfloat16)
  src_rows = jax.ShapeDtypeStruct((t, h), jnp.bfloat16)
  touched = int((pos_np >= 0).any(axis=1).sum())
  row_b = h * 2
  variants = {
      "zero": (lambda g, src, pos: triton_call(zero_kernel, out_shapes=out_rows, grid=g,
                                     num_warps=ROWS_WARPS, constexprs=dict(
                                         ROWS=rows, HIDDEN=h, BLOCK_R=16, BLOCK_H=bh))[0],
               rows * row_b),
      "copy": (lambda g, src, pos: triton_call(copy_kernel, src, out_shapes=src_rows, grid=g,
                                     num_warps=ROWS_WARPS, constexprs=dict(
                                         ROWS=t, HIDDEN=h, BLOCK_R=bt, BLOCK_H=bh))[0],
               2 * t * row_b),
  }
  for name, warps, br in (("zero_tma_w4", 4, 16), ("zero_tma_w16", 16, 32)):
    variants[name] = (lambda g, src, pos, warps=warps, br=br: triton_call(
        zero_tma_kernel, out_shapes=out_rows, grid=g, num_warps=warps, constexprs=dict(
            ROWS=rows, HIDDEN=h, BLOCK_R=br, BLOCK_H=256))[0], rows * row_b)
  for name, warps, br in (("copy_tma_w4", 4, 16), ("copy_tma_w8", 8, 32)):
    variants[name] = (lambda g, src, pos, warps=warps, br=br: triton_call(
        copy_tma_kernel, src, out_shapes=src_rows, grid=g, num_warps=warps, constexprs=dict(
            ROWS=t, HIDDEN=h, BLOCK_R=br, BLOCK_H=256))[0], 2 * t * row_b)
  for name, et in (("columns", 0), ("pairs16", 16), ("pairs8", 8)):
    variants[name] = (lambda g, src, pos, et=et: triton_call(
        expand_kernel, src, pos, out_shapes=out_rows, grid=g, num_warps=ROWS_WARPS,
        constexprs=dict(NUM_TOKENS=t, CAPACITY=rows, HIDDEN=h, TOPK=k, TOPK_P=plan.topk_p,
                        BLOCK_T=bt, BLOCK_H=bh, EXPAND_T=et))[0], (touched + rows) * row_b)

  # XLA's own kernels on every SM, for the device's ceiling: a zero fill, a copy, and the
  # expansion as a row gather (what an XLA implementation of it runs).
  src_of_row = np.zeros(rows, np.int32)
  src_of_row[pos_np[pos_np >= 0]] = np.nonzero(pos_np >= 0)[0]
  src_of_row = jnp.asarray(src_of_row)
  xla = {"xla_zero": (lambda g, src, pos: jnp.zeros((rows, h), jnp.bfloat16), rows * row_b),
         "xla_copy": (lambda g, src, pos: src + jnp.bfloat16(1), 2 * t * row_b),
         "xla_gather": (lambda g, src, pos: jnp.take(src, pos, axis=0),
                        (touched + rows) * row_b)}

  want = None
  results = []
  todo = [(n, fn, b, g) for n, (fn, b) in variants.items()
          for g in [int(v) for v in args.programs.split(",")]]
  todo += [(n, fn, b, 0) for n, (fn, b) in xla.items()]
  if args.variants:
    todo = [x for x in todo if x[0] in args.variants.split(",")]
  for name, fn, nbytes, g in todo:
    f = jax.jit(lambda src, pos, fn=fn, g=g: fn(g, src, pos))
    args_ = (src, src_of_row if name == "xla_gather" else pos)
    out = jax.block_until_ready(f(*args_))
    if name in ("columns", "pairs16", "pairs8", "xla_gather"):  # expansions agree bitwise
      got = np.asarray(out.view(jnp.uint16))
      if want is None:
        want = got
      elif not np.array_equal(got, want):
        raise SystemExit(f"{name} at {g} programs differs from the first expansion")
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args_))
      times.append(time.perf_counter() - t0)
    s = float(np.median(times))
    r = dict(variant=name, programs=g or "all", seconds=s, bytes=nbytes,
             gbps=nbytes / s / 1e9, gbps_per_program=nbytes / s / 1e9 / (g or 132))
    results.append(r)
    print(f"{name:8s} programs {g or 'all':>4}: {s * 1e6:8.1f} us  {r['gbps']:7.1f} GB/s  "
          f"{r['gbps_per_program']:6.1f} GB/s per program", flush=True)
  src_expected = np.asarray(src.view(jnp.uint16))
  ok = all(np.array_equal(want[pos_np[i, j]], src_expected[i])
           for i, j in zip(*np.nonzero(pos_np >= 0)) if i % 97 == 0)
  print(f"expansion rows equal their source rows (every 97th token checked): {ok}")
  if not ok:
    raise SystemExit(1)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%MZ")
    with open(os.path.join(args.out, f"copy_rate_{stamp}.json"), "w") as f:
      json.dump(dict(device=str(jax.devices()[0].device_kind), date=stamp, args=vars(args),
                     expert_rows=rows, results=results), f, indent=1)


if __name__ == "__main__":
  main()
