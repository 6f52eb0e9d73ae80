"""Copy rate of the row-moving loops of dispatch's expansion, on one GPU, per number of programs.

A diagnostic, not a target: dispatch at 32 SMs is bound by how fast a few programs move rows
(docs/KERNELS.md "Where the time goes"). This times the building blocks alone, one program per
SM, at the DeepSeek-V3 receiver's load (16,384 source rows of 7,168 bf16 from 4 sources, top-8
of 256 experts, this rank's 64 experts: ~32,768 expert rows):

  zero       store zeros to every row of recv_x (the receivers' fill of rows outside groups)
  copy       contiguous copy of the source rows (a read and a write per row, no indexing)
  copy_sS    the copy with its loads pipelined S stages deep (S - 1 tiles in flight; copy = 3)
  copy_flat  the copy as one pipelined loop over (row block, chunk) items (never drained)
  *_wN       N warps (default 16, ROWS_WARPS); *_tma_* through TMA descriptors
  expand     dispatch's expansion (``_expand_block`` of kernels/dispatch.py), checked against the
             rows it should write (expand_sS: S pipeline stages instead of the plan's)
  xla_*      XLA's own zero fill, copy and row gather (the expansion) on every SM

Bytes counted: what reaches HBM at least once (reads of distinct source rows + writes). Time
per op: the slope between jitted loops of --inner and 3 x --inner ops (median of --iters calls
each), so a call's fixed cost cancels (the session-4 numbers were per-call medians). An
expansion by (source row, destination row) pairs, timed here on 2026-11-21 (2390092), moved no
more bytes per program than ``expand`` and was removed.

  python benchmarks/bench_copy_rate.py [--programs 16,32,132] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _results import write_json  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from jax_ep import testing  # noqa: E402
from jax_ep.kernels.dispatch import _expand_block  # noqa: E402


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
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
  """A contiguous copy; its loads software-pipelined STAGES deep (cp.async into shared memory,
  STAGES - 1 tiles in flight), as dispatch's row loops are."""
  pid = tl.program_id(0)
  h = tl.arange(0, BLOCK_H)
  for rb in range(pid, (ROWS + BLOCK_R - 1) // BLOCK_R, tl.num_programs(0)):
    row = (rb * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64) * HIDDEN
    for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):
      m = ((rb * BLOCK_R + tl.arange(0, BLOCK_R)) < ROWS)[:, None] & ((h0 + h) < HIDDEN)[None, :]
      v = tl.load(src_ptr + row + (h0 + h)[None, :], mask=m, cache_modifier=".cg")
      tl.store(out_ptr + row + (h0 + h)[None, :], v, mask=m)


@triton.jit
def copy_flat_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, HIDDEN: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
  """copy over flattened (row block, chunk) items: one pipelined loop per program, so the
  cp.async pipeline does not drain at every row block (``copy`` refills it HIDDEN / BLOCK_H
  chunks at a time)."""
  pid = tl.program_id(0)
  h = tl.arange(0, BLOCK_H)
  n_h: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
  n_items = ((ROWS + BLOCK_R - 1) // BLOCK_R) * n_h
  for it in tl.range(pid, n_items, tl.num_programs(0), num_stages=STAGES):
    r = (it // n_h) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (it % n_h) * BLOCK_H + h
    m = (r < ROWS)[:, None] & (c < HIDDEN)[None, :]
    off = r[:, None].to(tl.int64) * HIDDEN + c[None, :]
    tl.store(out_ptr + off, tl.load(src_ptr + off, mask=m, cache_modifier=".cg"), mask=m)


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
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
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
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
  pid = tl.program_id(0)
  for blk in range(pid, (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T, tl.num_programs(0)):
    _expand_block(0, blk, src_ptr, 0, pos_ptr, 0, pos_ptr, out_ptr, out_ptr, pos_ptr,
                  NUM_TOKENS, CAPACITY, HIDDEN, TOPK, TOPK_P, False, BLOCK_T, BLOCK_H, STAGES, 0)


def expert_rows(rng, tokens, topk, experts, world):
  """(pos [tokens, topk], rows): rank 0's expert-major row of each slot (-1 for other ranks'
  experts), the rows of one expert in (token, slot) order, as dispatch lays them out."""
  idx = testing.make_routing(rng, "uniform", tokens, experts, topk)
  kept = np.nonzero(idx.ravel() < experts // world)[0]
  order = kept[np.argsort(idx.ravel()[kept], kind="stable")]
  pos = np.full(idx.size, -1, np.int32)
  pos[order] = np.arange(len(order), dtype=np.int32)
  return pos.reshape(idx.shape), len(order)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--programs", default="16,32,132")
  p.add_argument("--tokens", type=int, default=16384, help="source rows (all sources)")
  p.add_argument("--hidden", type=int, default=7168)
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--world", type=int, default=4)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--inner", type=int, default=5, help="ops per timed call (n and 3n)")
  p.add_argument("--variants", default="", help="comma-separated names (default: all)")
  p.add_argument("--out", default=None, help="directory for copy_rate_<time>.json")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp

  from bench_dispatch_combine import repeat, time_per_op
  from jax_ep.kernels.ep_plan import EPPlan, ROWS_WARPS
  from jax_ep.launch import triton_call

  rng = np.random.default_rng(0)
  t, h, k = args.tokens, args.hidden, args.topk
  pos_np, rows = expert_rows(rng, t, k, args.experts, args.world)
  src_of_row = np.zeros(rows, np.int32)
  src_of_row[pos_np[pos_np >= 0]] = np.nonzero(pos_np >= 0)[0]
  plan = EPPlan(world=args.world, num_tokens=t, max_tokens=t, hidden=h, topk=k,
                num_experts=args.experts, capacity=rows, alignment=1)
  bt, bh = plan.block_t, plan.block_h
  src = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
  pos, rows_src = jnp.asarray(pos_np), jnp.asarray(src_of_row)
  out_rows = jax.ShapeDtypeStruct((rows, h), jnp.bfloat16)
  src_rows = jax.ShapeDtypeStruct((t, h), jnp.bfloat16)
  row_b = h * 2
  zero_b, copy_b = rows * row_b, 2 * t * row_b
  expand_b = (int((pos_np >= 0).any(axis=1).sum()) + rows) * row_b

  ins = dict(src=src, pos=pos, rows_src=rows_src)  # passed as arguments, not constants

  def launch(kernel, inputs, out, warps, stages=3, **constexprs):
    return lambda g, a: triton_call(kernel, *(a[n] for n in inputs), out_shapes=out, grid=g,
                                    num_warps=warps, num_stages=stages,
                                    constexprs=constexprs)[0]

  def copy(kernel, warps, stages, block_r, block_h=bh):
    return (launch(kernel, ("src",), src_rows, warps, ROWS=t, HIDDEN=h, BLOCK_R=block_r,
                   BLOCK_H=block_h, STAGES=stages), copy_b, False, False)

  def expand(stages):
    return (launch(expand_kernel, ("src", "pos"), out_rows, ROWS_WARPS, NUM_TOKENS=t,
                   CAPACITY=rows, HIDDEN=h, TOPK=k, TOPK_P=plan.topk_p, BLOCK_T=bt, BLOCK_H=bh,
                   STAGES=stages), expand_b, False, True)

  # name: (fn(programs, ins) -> output, bytes moved, XLA on every SM, is an expansion)
  variants = {
      "zero": (launch(zero_kernel, (), out_rows, ROWS_WARPS, ROWS=rows, HIDDEN=h, BLOCK_R=16,
                      BLOCK_H=bh), zero_b, False, False),
      # dispatch's row loops: [BLOCK_T, BLOCK_H] tiles, 3 stages (2 tiles in flight), the
      # pipeline refilled at every row block
      "copy": copy(copy_kernel, ROWS_WARPS, 3, bt),
      "copy_s5": copy(copy_kernel, ROWS_WARPS, 5, bt),
      "copy_s7": copy(copy_kernel, ROWS_WARPS, 7, bt),
      "copy_s5_w8": copy(copy_kernel, 8, 5, bt),
      "copy_s5_w4": copy(copy_kernel, 4, 5, bt),
      # one pipelined loop over (row block, chunk) items: never drained
      "copy_flat_s3": copy(copy_flat_kernel, ROWS_WARPS, 3, bt),
      "copy_flat_s5": copy(copy_flat_kernel, ROWS_WARPS, 5, bt),
      "copy_flat_s5_w8": copy(copy_flat_kernel, 8, 5, bt),
      "copy_flat_s7_w8_16k": copy(copy_flat_kernel, 8, 7, bt, bh // 2),
      "zero_tma_w4": (launch(zero_tma_kernel, (), out_rows, 4, ROWS=rows, HIDDEN=h,
                             BLOCK_R=16, BLOCK_H=256), zero_b, False, False),
      "copy_tma_w4_s3": copy(copy_tma_kernel, 4, 3, 16, 256),
      "copy_tma_w4_s5": copy(copy_tma_kernel, 4, 5, 32, 256),
      "expand": expand(plan.dispatch_stages),
      "expand_s4": expand(4),
      "expand_s5": expand(5),
      # XLA's own kernels on every SM, for the device's ceiling: a zero fill, a copy, and the
      # expansion as a row gather (what an XLA implementation of it runs).
      # (a fill with a value read from the input: a constant zero array would be hoisted)
      "xla_zero": (lambda g, a: jnp.broadcast_to(a["src"][0, 0] * 0, (rows, h)), zero_b, True,
                   False),
      "xla_copy": (lambda g, a: a["src"] + jnp.bfloat16(1), copy_b, True, False),
      "xla_gather": (lambda g, a: jnp.take(a["src"], a["rows_src"], axis=0), expand_b, True,
                     True),
  }
  wanted = [v for v in args.variants.split(",") if v] or list(variants)
  unknown = sorted(set(wanted) - set(variants))
  if unknown:
    p.error(f"--variants: unknown {unknown}; choose from {list(variants)}")
  want = np.asarray(src.view(jnp.uint16))[src_of_row]  # the expansion, on the host
  sms = getattr(jax.devices()[0], "core_count", None) or 132
  results = []
  for name in wanted:
    fn, nbytes, xla, expands = variants[name]
    for g in [0] if xla else [int(v) for v in args.programs.split(",")]:
      f = jax.jit(lambda a, fn=fn, g=g: fn(g, a))
      if expands and not np.array_equal(np.asarray(f(ins).view(jnp.uint16)), want):
        raise SystemExit(f"{name} at {g or 'all'} programs: rows differ from their sources")
      loops = {n: jax.jit(lambda a, fn=fn, g=g, n=n: repeat(n, lambda a: fn(g, a), (a,),
                                                           jnp.zeros((1, 1), jnp.float32)))
               for n in (args.inner, 3 * args.inner)}
      s = time_per_op(loops, (ins,), args.inner, args.iters)[0]
      n = g or sms
      r = dict(variant=name, programs=g or "all", seconds=s, bytes=nbytes,
               gbps=nbytes / s / 1e9, gbps_per_sm=nbytes / s / 1e9 / n)
      results.append(r)
      print(f"{name:12s} programs {g or 'all':>4}: {s * 1e6:8.1f} us  {r['gbps']:7.1f} GB/s  "
            f"{r['gbps_per_sm']:6.1f} GB/s per SM", flush=True)
  if args.out:
    write_json(args.out, "copy_rate", device=str(jax.devices()[0].device_kind),
               args=vars(args), expert_rows=rows, results=results)


if __name__ == "__main__":
  main()
