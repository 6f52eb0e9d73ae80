"""Dispatch kernels: push each token row once per destination rank, then expand on the receiver.

dispatch_push_kernel (sender; grid (NP,) persistent over blocks of BLOCK_T tokens, NP <= num_sms)
  For a block it loads topk_idx [BLOCK_T, K]; with COMPUTE_POS it finishes the layout: the rank
  of each slot among the block's earlier slots choosing the same expert (an [N, N] comparison,
  N = BLOCK_T x K, no atomics) added to ``base[b, g]`` gives the slot's row on its destination;
  rows >= C are dropped (-1). For every destination rank r it stores, into r's region,
  SLOT_POS[me, t, :] (row or -1 for slots not kept there) and SLOT_VAL[me, t, :] (weights), and
  copies x[t] into ROWS[me, t] of every *other* rank r that keeps at least one of t's slots:
  a token row crosses NVLink at most once per destination; tokens that select nothing (or only
  this rank) send nothing. Self rows are read from x by the expand kernel instead.
  Without COMPUTE_POS (``dispatch_rows``, combine's backward) it only copies rows, to every rank
  a slot of t is addressed to. Then each program raises ARRIVE_FLAG[me, pid] = seq everywhere.
  Traffic per rank: reads x rows once per block (L2), writes one row (H x itemsize bytes) per
  (token, remote destination) over NVLink, plus 8 x K bytes of metadata per (token, rank).

dispatch_expand_kernel (receiver; grid (NP,))
  Waits for ARRIVE_FLAG[s, p] >= seq from every source s and program p, then for each (s, token
  block): reads SLOT_POS (dispatch) or the layout's recv_pos (dispatch_rows), loads each staged
  row once (from x when s is this rank) and stores it to its up to K rows of recv_x, and the
  slot weight to recv_weights. Then it writes zeros to every row outside the expert groups.
  Traffic per rank: reads one row per (source, token) received, writes C rows of H.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_sync import signal_peers, sym_ptr, wait_arrivals, current_seq


@triton.jit
def _in_block_rank(g, BLOCK_T: tl.constexpr, TOPK_P: tl.constexpr):
  """For g ``[BLOCK_T, TOPK_P]`` (-1 = none): number of earlier slots (row-major) with equal g."""
  n: tl.constexpr = BLOCK_T * TOPK_P
  gf = tl.reshape(g, [n])
  i = tl.arange(0, n)
  same = (gf[:, None] == gf[None, :]) & (i[None, :] < i[:, None])
  return tl.reshape(tl.sum(same.to(tl.int32), axis=1), [BLOCK_T, TOPK_P])


@triton.jit
def dispatch_push_kernel(x_ptr, topk_idx_ptr, topk_weights_ptr, base_ptr,
                         token_ptr,
                         sym_table, rank, world, epoch,
                         NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                         HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                         NUM_EXPERTS: tl.constexpr, E_LOCAL: tl.constexpr,
                         CAPACITY: tl.constexpr, COMPUTE_POS: tl.constexpr,
                         SLOT_POS_OFF: tl.constexpr, SLOT_VAL_OFF: tl.constexpr,
                         ROWS_OFF: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
  """Sender side of dispatch / dispatch_rows.

  Inputs:
    x_ptr: ``[T, H]`` token rows.
    topk_idx_ptr: ``[T, K] int32`` sanitized expert ids.
    topk_weights_ptr: ``[T, K] float32`` (read only with COMPUTE_POS).
    base_ptr: ``[NB, E] int32`` from ``layout_exchange_kernel`` (read only with COMPUTE_POS).
  Outputs:
    token_ptr: ``[1] int32``: the op's seq (a data dependency for the expand kernel).
  """
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  seq = current_seq(sym_table, rank)
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  dtype = x_ptr.dtype.element_ty
  k = tl.arange(0, TOPK_P)
  h = tl.arange(0, BLOCK_H)
  for blk in range(pid, num_blocks, num_programs):
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < NUM_TOKENS
    smask = tmask[:, None] & (k < TOPK)[None, :]
    sl = t[:, None] * TOPK + k[None, :]
    g = tl.load(topk_idx_ptr + sl, mask=smask, other=-1)
    valid = g >= 0
    dest = tl.where(valid, g // E_LOCAL, -1)
    if COMPUTE_POS:
      base = tl.load(base_ptr + blk * NUM_EXPERTS + g, mask=valid, other=0)
      pos = base + _in_block_rank(g, BLOCK_T, TOPK_P)
      kept = valid & (pos < CAPACITY)
      pos = tl.where(kept, pos, -1)
      wt = tl.load(topk_weights_ptr + sl, mask=smask, other=0.0)
      dest = tl.where(kept, dest, -1)
      slot = (rank * MAX_TOKENS + t)[:, None] * TOPK + k[None, :]
      for r in range(world):
        to_r = dest == r
        tl.store(sym_ptr(sym_table, r, SLOT_POS_OFF, tl.int32) + slot,
                 tl.where(to_r, pos, -1), mask=smask)
        tl.store(sym_ptr(sym_table, r, SLOT_VAL_OFF, tl.float32) + slot,
                 tl.where(to_r, wt, 0.0), mask=smask)
    # Rows: load each chunk of the block once, store it to every remote rank that needs it.
    remote = tl.max(((dest >= 0) & (dest != rank)).to(tl.int32), axis=1) > 0   # [BLOCK_T]
    for h0 in range(0, HIDDEN, BLOCK_H):
      hmask = (h0 + h) < HIDDEN
      rows = tl.load(x_ptr + t[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
                     mask=remote[:, None] & hmask[None, :])
      for r in range(world):
        if r != rank:
          send = tl.max((dest == r).to(tl.int32), axis=1) > 0
          dst = sym_ptr(sym_table, r, ROWS_OFF, dtype)
          tl.store(dst + (rank * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN
                   + (h0 + h)[None, :], rows, mask=send[:, None] & hmask[None, :])
  signal_peers(sym_table, rank, world, pid, seq)
  if pid == 0:
    tl.store(token_ptr, seq)


@triton.jit
def _expand_body(x_ptr, pos_ptr, pos_stride, val_ptr, go_ptr, gs_ptr,
                 recv_x_ptr, recv_w_ptr, recv_pos_ptr, sym_table, rank, world,
                 NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                 TOPK: tl.constexpr, TOPK_P: tl.constexpr, E_LOCAL: tl.constexpr,
                 EL_P: tl.constexpr, CAPACITY: tl.constexpr, ROWS_OFF: tl.constexpr,
                 WITH_META: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_R: tl.constexpr):
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  dtype = recv_x_ptr.dtype.element_ty
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  h = tl.arange(0, BLOCK_H)
  # 1. Rows that arrived: (source rank, token block) items.
  for item in range(pid, world * num_blocks, num_programs):
    s = item // num_blocks
    blk = item % num_blocks
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < NUM_TOKENS
    smask = tmask[:, None] & (k < TOPK)[None, :]
    slot = (s * pos_stride + t)[:, None] * TOPK + k[None, :]
    pos = tl.load(pos_ptr + slot, mask=smask, other=-1, cache_modifier=".cg")
    if WITH_META:
      w = tl.load(val_ptr + slot, mask=smask, other=0.0, cache_modifier=".cg")
      tl.store(recv_pos_ptr + (s * NUM_TOKENS + t)[:, None] * TOPK + k[None, :], pos,
               mask=smask)
      tl.store(recv_w_ptr + pos, w, mask=pos >= 0)
    have = tl.max((pos >= 0).to(tl.int32), axis=1) > 0
    if s == rank:
      src = x_ptr + t[:, None].to(tl.int64) * HIDDEN
    else:
      src = (sym_ptr(sym_table, rank, ROWS_OFF, dtype)
             + (s * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN)
    for h0 in range(0, HIDDEN, BLOCK_H):
      hmask = (h0 + h) < HIDDEN
      rows = tl.load(src + (h0 + h)[None, :], mask=have[:, None] & hmask[None, :],
                     cache_modifier=".cg")
      for kk in range(TOPK):
        pk = tl.load(pos_ptr + (s * pos_stride + t) * TOPK + kk, mask=tmask, other=-1,
                     cache_modifier=".cg")
        tl.store(recv_x_ptr + pk[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :], rows,
                 mask=(pk >= 0)[:, None] & hmask[None, :])
  # 2. Zeros for every row outside the groups [go[e], go[e] + gs[e]).
  el = tl.arange(0, EL_P)
  go = tl.load(go_ptr + el, mask=el < E_LOCAL, other=0)
  ge = go + tl.load(gs_ptr + el, mask=el < E_LOCAL, other=0)
  for rb in range(pid, (CAPACITY + BLOCK_R - 1) // BLOCK_R, num_programs):
    row = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    inside = tl.max(((row[:, None] >= go[None, :]) & (row[:, None] < ge[None, :])).to(tl.int32),
                    axis=1) > 0
    zero = (~inside) & (row < CAPACITY)
    if WITH_META:
      tl.store(recv_w_ptr + row, tl.zeros([BLOCK_R], tl.float32), mask=zero)
    if tl.max(zero.to(tl.int32), axis=0) > 0:
      for h0 in range(0, HIDDEN, BLOCK_H):
        hmask = (h0 + h) < HIDDEN
        tl.store(recv_x_ptr + row[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
                 tl.zeros([BLOCK_R, BLOCK_H], dtype), mask=zero[:, None] & hmask[None, :])


@triton.jit
def dispatch_expand_kernel(x_ptr, token_ptr, group_offsets_ptr, group_sizes_ptr,
                           recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr,
                           sym_table, rank, world, epoch, timeout_ns, op,
                           NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                           HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                           E_LOCAL: tl.constexpr, EL_P: tl.constexpr, CAPACITY: tl.constexpr,
                           SLOT_POS_OFF: tl.constexpr, SLOT_VAL_OFF: tl.constexpr,
                           ROWS_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                           USE_TIMER: tl.constexpr):
  """Receiver side of dispatch.

  Inputs: x ``[T, H]`` (this rank's own rows), token ``[1] int32`` (from the push kernel),
    group_offsets, group_sizes ``[E_local] int32``.
  Outputs: recv_x ``[C, H]``, recv_weights ``[C] f32``, recv_pos ``[W, T, K] int32``,
    status ``[NP] int32`` (0, or the op code of a timed-out wait, per program).
  NUM_SENDERS: programs of each peer's push kernel (the same NP on every rank).
  """
  pid = tl.program_id(0)
  tl.store(status_ptr + pid, 0)
  seq = current_seq(sym_table, rank)
  wait_arrivals(sym_table, rank, world, NUM_SENDERS, seq, timeout_ns, status_ptr + pid, op,
                USE_TIMER, BLOCK_P)
  pos_ptr = sym_ptr(sym_table, rank, SLOT_POS_OFF, tl.int32)
  val_ptr = sym_ptr(sym_table, rank, SLOT_VAL_OFF, tl.float32)
  _expand_body(x_ptr, pos_ptr, MAX_TOKENS, val_ptr, group_offsets_ptr, group_sizes_ptr,
               recv_x_ptr, recv_w_ptr, recv_pos_ptr, sym_table, rank, world,
               NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, E_LOCAL, EL_P, CAPACITY, ROWS_OFF,
               True, BLOCK_T, BLOCK_H, BLOCK_R)


@triton.jit
def dispatch_rows_expand_kernel(x_ptr, token_ptr, recv_pos_ptr, group_offsets_ptr,
                                group_sizes_ptr,
                                recv_x_ptr, status_ptr,
                                sym_table, rank, world, epoch, timeout_ns, op,
                                NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                                HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                                E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
                                CAPACITY: tl.constexpr, ROWS_OFF: tl.constexpr,
                                NUM_SENDERS: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr):
  """Receiver side of dispatch_rows: expand along an existing layout's ``recv_pos [W, T, K]``.

  Outputs: recv_x ``[C, H]``, status ``[NP] int32``.
  """
  pid = tl.program_id(0)
  tl.store(status_ptr + pid, 0)
  seq = current_seq(sym_table, rank)
  wait_arrivals(sym_table, rank, world, NUM_SENDERS, seq, timeout_ns, status_ptr + pid, op,
                USE_TIMER, BLOCK_P)
  _expand_body(x_ptr, recv_pos_ptr, NUM_TOKENS, recv_pos_ptr, group_offsets_ptr,
               group_sizes_ptr, recv_x_ptr, recv_x_ptr, recv_pos_ptr, sym_table, rank, world,
               NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, E_LOCAL, EL_P, CAPACITY, ROWS_OFF,
               False, BLOCK_T, BLOCK_H, BLOCK_R)
