"""Combine kernels (and the small slot exchange behind ``gather_slots``).

combine_push_kernel (expert rank; grid (NP,) persistent over (source rank, token block) items)
  For each token t of source rank s with at least one row here, it sums its rows in k order:
  ``partial = sum_k f32(row_weights[p_k]) * f32(y[p_k])`` (p_k = recv_pos[s, t, k] >= 0) in
  float32, casts to y's dtype, and stores that single row into ROWS[me, t] of rank s's region
  plus ROW_MARK[me, t] = seq. Then ARRIVE_FLAG[me, pid] = seq in every rank.
  Traffic per rank: reads every received row of y once (C x H at most), writes one row per
  (source rank, token) that sent something here (over NVLink unless s is this rank).

combine_reduce_kernel (token owner; grid (NP,))
  Waits for all ARRIVE_FLAGs of the op, then ``out[t] = sum_{r = 0..W-1, in order}
  f32(ROWS[r, t])`` over the ranks r whose ROW_MARK[r, t] == seq (no partial = 0), cast to
  y's dtype. Traffic per rank: reads one row per (token, rank it reached), writes T rows.

gather_push_kernel / gather_reduce_kernel: the same pattern for ``[T, K]`` float32 values:
  the expert rank sends ``values[recv_pos[s, t, k]]`` (0 where absent) to SLOT_VAL[me, t, k] of
  rank s; the owner picks, for each slot, the value from the rank its expert lives on.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_sync import current_seq, signal_peers, sym_ptr, wait_arrivals


@triton.jit
def combine_push_kernel(y_ptr, row_weights_ptr, recv_pos_ptr, token_in_ptr,
                        token_ptr,
                        sym_table, rank, world, epoch,
                        NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                        HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                        ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
  """Expert side of combine.

  Inputs: y ``[C, H]``, row_weights ``[C] f32``, recv_pos ``[W, T, K] int32``,
    token_in ``[1] int32`` (from the op's barrier; orders this launch).
  Outputs: token ``[1] int32`` (the op's seq; a data dependency for the reduce kernel).
  """
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  seq = current_seq(sym_table, rank)
  dtype = y_ptr.dtype.element_ty
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  h = tl.arange(0, BLOCK_H)
  for item in range(pid, world * num_blocks, num_programs):
    s = item // num_blocks
    blk = item % num_blocks
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < NUM_TOKENS
    smask = tmask[:, None] & (k < TOPK)[None, :]
    pos = tl.load(recv_pos_ptr + (s * NUM_TOKENS + t)[:, None] * TOPK + k[None, :], mask=smask,
                  other=-1)
    have = tl.max((pos >= 0).to(tl.int32), axis=1) > 0
    dst = (sym_ptr(sym_table, s, ROWS_OFF, dtype)
           + (rank * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN)
    for h0 in range(0, HIDDEN, BLOCK_H):
      hmask = (h0 + h) < HIDDEN
      acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
      for kk in tl.static_range(TOPK):  # unrolled: the K row loads are in flight together
        pk = tl.load(recv_pos_ptr + (s * NUM_TOKENS + t) * TOPK + kk, mask=tmask, other=-1)
        wk = tl.load(row_weights_ptr + pk, mask=pk >= 0, other=0.0)
        yk = tl.load(y_ptr + pk[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
                     mask=(pk >= 0)[:, None] & hmask[None, :], other=0.0)
        acc += wk[:, None] * yk.to(tl.float32)
      tl.store(dst + (h0 + h)[None, :], acc.to(dtype), mask=have[:, None] & hmask[None, :])
    mark = sym_ptr(sym_table, s, ROW_MARK_OFF, tl.int32) + rank * MAX_TOKENS + t
    tl.store(mark, tl.zeros([BLOCK_T], tl.int32) + seq, mask=have)
  signal_peers(sym_table, rank, world, pid, seq)
  if pid == 0:
    tl.store(token_ptr, seq)


@triton.jit
def combine_reduce_kernel(token_ptr,
                          out_ptr, status_ptr,
                          sym_table, rank, world, epoch, timeout_ns, op,
                          NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                          HIDDEN: tl.constexpr, ROWS_OFF: tl.constexpr,
                          ROW_MARK_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          USE_TIMER: tl.constexpr):
  """Owner side of combine.

  Inputs: token ``[1] int32`` (from the push kernel).
  Outputs: out ``[T, H]`` (y's dtype), status ``[NP] int32``.
  """
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  tl.store(status_ptr + pid, 0)
  seq = current_seq(sym_table, rank)
  wait_arrivals(sym_table, rank, world, NUM_SENDERS, seq, timeout_ns, status_ptr + pid, op,
                USE_TIMER, BLOCK_P)
  dtype = out_ptr.dtype.element_ty
  rows = sym_ptr(sym_table, rank, ROWS_OFF, dtype)
  marks = sym_ptr(sym_table, rank, ROW_MARK_OFF, tl.int32)
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  h = tl.arange(0, BLOCK_H)
  for blk in range(pid, num_blocks, num_programs):
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < NUM_TOKENS
    for h0 in range(0, HIDDEN, BLOCK_H):
      hmask = (h0 + h) < HIDDEN
      acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
      for r in range(world):
        got = tl.load(marks + r * MAX_TOKENS + t, mask=tmask, other=0, cache_modifier=".cg")
        got = tmask & (got == seq)
        v = tl.load(rows + (r * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN
                    + (h0 + h)[None, :], mask=got[:, None] & hmask[None, :], other=0.0,
                    cache_modifier=".cg")
        acc += v.to(tl.float32)
      tl.store(out_ptr + t[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :], acc.to(dtype),
               mask=tmask[:, None] & hmask[None, :])


@triton.jit
def gather_push_kernel(values_ptr, recv_pos_ptr, token_in_ptr,
                       token_ptr,
                       sym_table, rank, world, epoch,
                       NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, TOPK: tl.constexpr,
                       TOPK_P: tl.constexpr, SLOT_VAL_OFF: tl.constexpr, BLOCK_T: tl.constexpr):
  """Expert side of gather_slots: ``values [C] f32``, ``recv_pos [W, T, K]`` -> peers' SLOT_VAL."""
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  seq = current_seq(sym_table, rank)
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  for item in range(pid, world * num_blocks, num_programs):
    s = item // num_blocks
    blk = item % num_blocks
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
    pos = tl.load(recv_pos_ptr + (s * NUM_TOKENS + t)[:, None] * TOPK + k[None, :], mask=smask,
                  other=-1)
    v = tl.load(values_ptr + pos, mask=pos >= 0, other=0.0)
    dst = sym_ptr(sym_table, s, SLOT_VAL_OFF, tl.float32)
    tl.store(dst + (rank * MAX_TOKENS + t)[:, None] * TOPK + k[None, :], v, mask=smask)
  signal_peers(sym_table, rank, world, pid, seq)
  if pid == 0:
    tl.store(token_ptr, seq)


@triton.jit
def gather_reduce_kernel(topk_idx_ptr, token_ptr,
                         out_ptr, status_ptr,
                         sym_table, rank, world, epoch, timeout_ns, op,
                         NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                         TOPK: tl.constexpr, TOPK_P: tl.constexpr, E_LOCAL: tl.constexpr,
                         SLOT_VAL_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         USE_TIMER: tl.constexpr):
  """Owner side of gather_slots: ``out [T, K] f32`` = value from the slot's expert rank, or 0."""
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  tl.store(status_ptr + pid, 0)
  seq = current_seq(sym_table, rank)
  wait_arrivals(sym_table, rank, world, NUM_SENDERS, seq, timeout_ns, status_ptr + pid, op,
                USE_TIMER, BLOCK_P)
  vals = sym_ptr(sym_table, rank, SLOT_VAL_OFF, tl.float32)
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  for blk in range(pid, num_blocks, num_programs):
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
    sl = t[:, None] * TOPK + k[None, :]
    g = tl.load(topk_idx_ptr + sl, mask=smask, other=-1)
    dest = tl.where(g >= 0, g // E_LOCAL, 0)
    v = tl.load(vals + (dest * MAX_TOKENS + t[:, None]) * TOPK + k[None, :], mask=g >= 0,
                other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + sl, tl.where(g >= 0, v, 0.0), mask=smask)
