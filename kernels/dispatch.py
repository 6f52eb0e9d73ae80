"""Dispatch kernels: each token row crosses NVLink once per destination; receivers expand it.

Pull mode (``EPPlan.dispatch_pull`` 1 and 2): a sender copies
each token row that another rank keeps once into ROWS[me] of its *own* region, and the
receivers load it from there over NVLink while they expand it, so the NVLink transfer is
spread over every expanding program instead of being the senders' remote stores. Push mode
(dispatch_pull = 0), described below where it differs: the sender stores the row into
ROWS[me] of every rank that keeps it. Pull 3
(the peer provider's default, where every GPU's XLA buffers are mapped on the others): no
staging copy at all; the receivers load a peer's rows from its x itself, whose address the
leader publishes (XPTR) before it announces the op, and each program says when it has read
the peers' x for the last time (ARRIVE_FLAG); the leader's launch ends only when every
program of every rank has, so no x is freed or overwritten while a peer still reads it.
Pull 4 (the default with one process per GPU, where a peer's x cannot be read): 3's
protocol over ROWS[me] of each rank's region, into which the launcher copies all of x
before the kernel (``EPPlan.dispatch_stage``); the senders copy nothing.

dispatch_kernel: the whole op in one launch (grid NUM_SENDERS + NUM_RECEIVERS programs, from
``EPConfig.num_sms``). Every program first histograms its token blocks and scans its expert
columns of the histograms; program 0 (the leader, ``kernels/layout.py``) exchanges the counts
with the peers, which is the op's start barrier, derives the layout and raises GO; then
senders push and receivers expand, so the receivers' HBM work overlaps the senders' NVLink
work.

  senders (``_push_body``; persistent over blocks of BLOCK_T tokens: blocks pid, pid + NS, ...)
    For a block it loads topk_idx [BLOCK_T, K] and finishes the layout: the rank of each slot
    among the block's earlier slots choosing the same expert (an [N, N] comparison, N =
    BLOCK_T x K, no atomics) added to ``base[b, g] + base[NB + 2, g]`` gives the slot's row
    on its destination; rows >= C are dropped (-1). For every rank r it stores
    SLOT_POS[me, t, :] (row or -1) and SLOT_VAL[me, t, :] (weights) into r's region, and
    copies x[t] into ROWS[me, t] of its own region (push: of every *other* rank that keeps one
    of t's slots; 16-byte stores of [BLOCK_T, BLOCK_H] tiles) when another rank keeps one of
    t's slots: a token row crosses NVLink at most once per destination; tokens that select
    nothing, or only this rank, send nothing. Then
    BLOCK_FLAG[me, block] = seq in every rank (release, system scope), so receivers start on a
    block as soon as it is there. PULL 2 (the default): a sender takes GROUP blocks at a time
    (the expansion's items), copies their rows as one tile and raises the group's first flag.
    Traffic: reads x once per block, writes one row (H x itemsize) per (token, remote
    destination) plus 8 K bytes of metadata per (token, rank).

  receivers (``_expand_body``; blocks pid, pid + NR, ... of every source)
    First zero the rows outside the expert groups (and their weights): nothing to wait for.
    Then this rank's own blocks (rows read straight from x), then block by block the other
    sources', each after its BLOCK_FLAG: load SLOT_POS / SLOT_VAL once, write recv_pos and
    recv_weights, and per row chunk load the staged rows once (from ROWS[s] of the source s's
    region; push: of this rank's) and store them to their up to K rows (the K row indices are
    taken from the loaded tile in registers, not reloaded). With the queue (orders 2, 3) an
    item is ``EPPlan.dispatch_group`` consecutive blocks of one source, one tile, or one of
    ``EPPlan.dispatch_parts`` column ranges of it (few tokens).
    Traffic: reads one row per (source, token) received, writes C rows of H.
    Expand order 2 (``EPPlan.expand_order``): no static share; every program (the receivers
    after their zero fill, the senders after their push) takes (source, block) items from one
    atomic counter per launch, own blocks first, then block-major over the other sources,
    until none are left: the work balances itself whatever the shape. Expand order 3 (the
    default): the same queue, block-major over every source (own first within a block), so
    programs expand whichever blocks the senders of all ranks have just finished instead of
    waiting for this rank's own later blocks while the peers' earlier ones pile up. Which
    program expands a block never changes what is written where.

dispatch_rows_kernel: the same for ``dispatch_rows`` (combine's backward): senders copy rows to
every rank a slot is addressed to (no positions), receivers expand with the layout's recv_pos.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_sync import (P_END, P_GO, P_PUSH, P_SELF, P_START, P_ZERO, _now,
                      leader_barrier, leader_turn, peer_ptr, prof_mark, prof_span, publish_ptr,
                      row_align, signal_block, signal_peers, sym_ptr, take_item,
                      wait_all_arrivals, wait_block, wait_go)
from .layout import hist_blocks, leader_layout, scan_columns
from .slots import column, present_rank

# Row-chunk loops are software-pipelined: Triton turns their loads into cp.async copies into
# shared memory, STAGES - 1 chunks in flight (STAGES: ``EPPlan.dispatch_stages``), so a program
# does not wait one full memory latency per chunk.


@triton.jit
def _in_block_rank(g, BLOCK_T: tl.constexpr, TOPK_P: tl.constexpr):
  """For g ``[BLOCK_T, TOPK_P]`` (-1 = none): number of earlier slots (row-major) with equal g."""
  n: tl.constexpr = BLOCK_T * TOPK_P
  gf = tl.reshape(g, [n])
  i = tl.arange(0, n)
  same = (gf[:, None] == gf[None, :]) & (i[None, :] < i[:, None])
  return tl.reshape(tl.sum(same.to(tl.int32), axis=1), [BLOCK_T, TOPK_P])


@triton.jit
def _block_slots(blk, topk_idx_ptr, topk_weights_ptr, base_ptr, sym_table, rank, world,
                 NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, TOPK: tl.constexpr,
                 TOPK_P: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_LOCAL: tl.constexpr,
                 CAPACITY: tl.constexpr, COMPUTE_POS: tl.constexpr,
                 SLOT_POS_OFF: tl.constexpr, SLOT_VAL_OFF: tl.constexpr, BLOCK_T: tl.constexpr):
  """Token block ``blk``'s slots: with COMPUTE_POS their rows on the destinations (stored as
  SLOT_POS / SLOT_VAL into every rank's region). Returns dest ``[BLOCK_T, TOPK_P]``: the
  slot's destination rank, -1 for none (and, with COMPUTE_POS, for a dropped slot)."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
  smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
  sl = t[:, None] * TOPK + k[None, :]
  g = tl.load(topk_idx_ptr + sl, mask=smask, other=-1)
  valid = g >= 0
  dest = tl.where(valid, g // E_LOCAL, -1)
  if COMPUTE_POS:
    # base rows (kernels/layout.py): [blk] this block's prefix, [NB + 2] the sender base.
    base = (tl.load(base_ptr + blk * NUM_EXPERTS + g, mask=valid, other=0, cache_modifier=".cg")
            + tl.load(base_ptr + (num_blocks + 2) * NUM_EXPERTS + g, mask=valid, other=0,
                      cache_modifier=".cg"))
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
  return dest


@triton.jit
def _copy_rows(src, dst, remote, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
               STAGES: tl.constexpr):
  """Rows ``remote`` of a tile, chunk by chunk: ``src`` / ``dst`` [rows, 1] row pointers."""
  A: tl.constexpr = row_align(HIDDEN, src.dtype.element_ty)
  h = tl.arange(0, BLOCK_H)
  for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):  # cp.async, pipelined
    hmask = (h0 + h) < HIDDEN
    rows = tl.load(src + (h0 + h)[None, :], mask=remote[:, None] & hmask[None, :])
    tl.store(tl.multiple_of(dst + (h0 + h)[None, :], [A, A]), rows,
             mask=remote[:, None] & hmask[None, :])


@triton.jit
def _push_body(pid, num_programs, x_ptr, topk_idx_ptr, topk_weights_ptr, base_ptr,
               sym_table, rank, world, seq,
               NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
               TOPK: tl.constexpr, TOPK_P: tl.constexpr, NUM_EXPERTS: tl.constexpr,
               E_LOCAL: tl.constexpr, CAPACITY: tl.constexpr, COMPUTE_POS: tl.constexpr,
               SLOT_POS_OFF: tl.constexpr, SLOT_VAL_OFF: tl.constexpr,
               BLOCK_FLAG_OFF: tl.constexpr, ROWS_OFF: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_H: tl.constexpr, STAGES: tl.constexpr, PULL: tl.constexpr,
               GROUP: tl.constexpr):
  """Sender program ``pid`` of ``num_programs``: token blocks pid, pid + num_programs, ...
  PULL 2 with GROUP > 1: groups of GROUP blocks instead (the expansion's items): the slots of
  each block, then the group's rows as one tile of GROUP x BLOCK_T rows by BLOCK_H / GROUP
  columns (28 chunks of a [64, 256] tile at the DeepSeek-V3 shape instead of 7 per block, so
  the pipeline fills once per group), then one BLOCK_FLAG, the group's first block's."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  dtype = x_ptr.dtype.element_ty
  rows_me = sym_ptr(sym_table, rank, ROWS_OFF, dtype)
  if PULL >= 2 and GROUP > 1:
    BT: tl.constexpr = BLOCK_T * GROUP
    kk = tl.arange(0, TOPK_P)
    for grp in range(pid, (num_blocks + GROUP - 1) // GROUP, num_programs):
      for j in tl.static_range(GROUP):
        if grp * GROUP + j < num_blocks:
          _block_slots(grp * GROUP + j, topk_idx_ptr, topk_weights_ptr, base_ptr, sym_table,
                       rank, world, NUM_TOKENS, MAX_TOKENS, TOPK, TOPK_P, NUM_EXPERTS,
                       E_LOCAL, CAPACITY, COMPUTE_POS, SLOT_POS_OFF, SLOT_VAL_OFF, BLOCK_T)
      if PULL == 2:  # (PULL 3: the receivers load the rows from x itself; 4: from the
        # launcher's copy of it; no copy here)
        # Rows some other rank is addressed by (dropped slots included: the copy is local,
        # and the receivers load only the rows they keep).
        t = grp * BT + tl.arange(0, BT)
        g = tl.load(topk_idx_ptr + t[:, None] * TOPK + kk[None, :],
                    mask=(t < NUM_TOKENS)[:, None] & (kk < TOPK)[None, :], other=-1)
        remote = tl.max(((g >= 0) & (g // E_LOCAL != rank)).to(tl.int32), axis=1) > 0
        if tl.max(remote.to(tl.int32), axis=0) > 0:
          _copy_rows(x_ptr + t[:, None].to(tl.int64) * HIDDEN,
                     rows_me + (rank * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN, remote,
                     HIDDEN, BLOCK_H // GROUP, STAGES)
      signal_block(sym_table, rank, world, BLOCK_FLAG_OFF, MAX_TOKENS, grp * GROUP, seq)
  else:
    for blk in range(pid, num_blocks, num_programs):
      dest = _block_slots(blk, topk_idx_ptr, topk_weights_ptr, base_ptr, sym_table, rank,
                          world, NUM_TOKENS, MAX_TOKENS, TOPK, TOPK_P, NUM_EXPERTS, E_LOCAL,
                          CAPACITY, COMPUTE_POS, SLOT_POS_OFF, SLOT_VAL_OFF, BLOCK_T)
      # Rows: load each chunk of the block once, store it to every remote rank that needs it
      # (PULL: once, into ROWS[me] of this rank's region, where the receivers load it from).
      t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
      remote = tl.max(((dest >= 0) & (dest != rank)).to(tl.int32), axis=1) > 0   # [BLOCK_T]
      if PULL < 3 and tl.max(remote.to(tl.int32), axis=0) > 0:
        src = x_ptr + t[:, None].to(tl.int64) * HIDDEN
        dst_row = (rank * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN
        if PULL:
          _copy_rows(src, rows_me + dst_row, remote, HIDDEN, BLOCK_H, STAGES)
        else:
          _push_rows(src, dst_row, remote, dest, sym_table, rank, world, HIDDEN, ROWS_OFF,
                     BLOCK_H, STAGES)
      signal_block(sym_table, rank, world, BLOCK_FLAG_OFF, MAX_TOKENS, blk, seq)


@triton.jit
def _push_rows(src, dst_row, remote, dest, sym_table, rank, world, HIDDEN: tl.constexpr,
               ROWS_OFF: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
  """A block's rows, chunk by chunk, into ROWS[me] of every other rank that keeps a slot."""
  dtype = src.dtype.element_ty
  A: tl.constexpr = row_align(HIDDEN, dtype)
  h = tl.arange(0, BLOCK_H)
  for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):  # not pipelined (rank loop)
    hmask = (h0 + h) < HIDDEN
    rows = tl.load(src + (h0 + h)[None, :], mask=remote[:, None] & hmask[None, :])
    for r in range(world):
      if r != rank:
        send = tl.max((dest == r).to(tl.int32), axis=1) > 0
        dst = sym_ptr(sym_table, r, ROWS_OFF, dtype)
        tl.store(tl.multiple_of(dst + dst_row + (h0 + h)[None, :], [A, A]), rows,
                 mask=send[:, None] & hmask[None, :])


@triton.jit
def _expand_block(s, blk, src_base, src_row, pos_ptr, pos_stride, val_ptr, recv_x_ptr,
                  recv_w_ptr, recv_pos_ptr, NUM_TOKENS: tl.constexpr, CAPACITY: tl.constexpr,
                  HIDDEN: tl.constexpr,
                  TOPK: tl.constexpr, TOPK_P: tl.constexpr, WITH_META: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr,
                  EXPAND_LEVELS: tl.constexpr, part, PARTS: tl.constexpr):
  """Token block ``blk`` of source ``s``: its slot rows (and weights) into recv_x (recv_w,
  recv_pos). Row chunks are loaded once and stored to each of their up to K rows: by slot
  (EXPAND_LEVELS = 0: K masked stores a chunk), or by level (EXPAND_LEVELS = L > 0: the j-th
  kept slot of every token for j < L, then the other levels only when a token of the block
  keeps more than L slots here; at top-8 over 4 ranks a token keeps ~2 per rank).
  PARTS > 1: the row chunks of column range ``part`` only (ceil(chunks / PARTS) chunks of
  BLOCK_H each), and the weights and positions by part 0 alone."""
  k = tl.arange(0, TOPK_P)
  h = tl.arange(0, BLOCK_H)
  t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
  tmask = t < NUM_TOKENS
  smask = tmask[:, None] & (k < TOPK)[None, :]
  slot = (s * pos_stride + t)[:, None] * TOPK + k[None, :]
  pos = tl.load(pos_ptr + slot, mask=smask, other=-1, cache_modifier=".cg")
  pos = tl.where(pos < CAPACITY, pos, -1)  # a corrupt layout cannot address past recv_x
  if WITH_META:
    if PARTS == 1:
      meta = smask
      kept = pos >= 0
    else:  # one part writes them (its test as a [BLOCK_T] vector: Triton 3.9's interpreter
      # refused a mask made with a scalar comparison)
      meta = smask & ((t * 0 + part) == 0)[:, None]
      kept = (pos >= 0) & meta
    w = tl.load(val_ptr + slot, mask=meta, other=0.0, cache_modifier=".cg")
    tl.store(recv_pos_ptr + (s * NUM_TOKENS + t)[:, None] * TOPK + k[None, :], pos, mask=meta)
    tl.store(recv_w_ptr + pos, w, mask=kept)
  have = tl.max((pos >= 0).to(tl.int32), axis=1) > 0
  if tl.max(have.to(tl.int32), axis=0) > 0:
    A: tl.constexpr = row_align(HIDDEN, recv_x_ptr.dtype.element_ty)
    src = src_base + (src_row + t)[:, None].to(tl.int64) * HIDDEN
    if EXPAND_LEVELS > 0:
      rnk = present_rank(pos >= 0, k, TOPK_P)          # level of each kept slot in its token
      deep = tl.max(tl.sum((pos >= 0).to(tl.int32), axis=1), axis=0) > EXPAND_LEVELS
    if PARTS == 1:
      h_lo = 0
      h_hi = HIDDEN
    else:
      PART_H: tl.constexpr = (HIDDEN + BLOCK_H * PARTS - 1) // (BLOCK_H * PARTS) * BLOCK_H
      h_lo = part * PART_H
      h_hi = tl.minimum(h_lo + PART_H, HIDDEN)
    for h0 in tl.range(h_lo, h_hi, BLOCK_H, num_stages=STAGES):  # cp.async, STAGES - 1 ahead
      hmask = (h0 + h) < HIDDEN
      rows = tl.load(tl.multiple_of(src + (h0 + h)[None, :], [A, A]),
                     mask=have[:, None] & hmask[None, :], cache_modifier=".cg")
      if EXPAND_LEVELS == 0:
        for kk in tl.static_range(TOPK):
          pk = column(pos, k, kk)
          tl.store(recv_x_ptr + pk[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
                   rows, mask=(pk >= 0)[:, None] & hmask[None, :])
      else:
        for j in tl.static_range(EXPAND_LEVELS):
          _store_level(rows, pos, rnk, j, recv_x_ptr, h0 + h, hmask, HIDDEN)
        if deep:
          for j in tl.static_range(EXPAND_LEVELS, TOPK):
            _store_level(rows, pos, rnk, j, recv_x_ptr, h0 + h, hmask, HIDDEN)


@triton.jit
def _store_level(rows, pos, rnk, j: tl.constexpr, recv_x_ptr, cols, hmask, HIDDEN: tl.constexpr):
  """Store each token's row chunk to the row of its j-th kept slot (tokens with fewer: none)."""
  sel = (pos >= 0) & (rnk == j)
  pj = tl.sum(tl.where(sel, pos, 0), axis=1)
  has = tl.sum(sel.to(tl.int32), axis=1) > 0
  tl.store(recv_x_ptr + pj[:, None].to(tl.int64) * HIDDEN + cols[None, :], rows,
           mask=has[:, None] & hmask[None, :])


@triton.jit
def _expand_body(pid, num_programs, blk_lo, blk_hi, x_ptr, pos_ptr, pos_stride, val_ptr, go_ptr,
                 gs_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank,
                 world, seq, timeout_ns, op,
                 NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                 TOPK: tl.constexpr, TOPK_P: tl.constexpr, E_LOCAL: tl.constexpr,
                 EL_P: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_FLAG_OFF: tl.constexpr,
                 ROWS_OFF: tl.constexpr, WITH_META: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_H: tl.constexpr, STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr,
                 BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr,
                 ZERO_FILL: tl.constexpr, ORDER: tl.constexpr, PROF_ID, PROFILE: tl.constexpr,
                 PULL: tl.constexpr, GROUP: tl.constexpr, ZERO_QUEUE: tl.constexpr,
                 PARTS: tl.constexpr):
  """Expander program ``pid`` of ``num_programs``, over token blocks [blk_lo, blk_hi).

  1. (ZERO_FILL, the receivers) zero rows outside the groups: needs nothing from peers, so it
     overlaps their pushes. ZERO_QUEUE (orders 2, 3): not here; the zero rows are items of the
     queue instead, spread among the expansion items (``_zero_item``).
  2. ORDER 0: this rank's own blocks pid, pid + num_programs, ... (rows from x), then the same
     blocks of every other source s = rank + 1, ... (mod W), block-major. ORDER 1: block-major
     over all sources, own first in each block (no program waits for its own senders while
     other sources' blocks are there). ORDERS 2 and 3: items from the launch's queue
     (``_expand_queue``; blk_lo, blk_hi and pid are not used). Each block after its
     BLOCK_FLAG says it arrived.
  """
  if ZERO_FILL and not ZERO_QUEUE:  # 1. Zeros for every row outside the groups.
    start, gs, n_rows = _zero_rows(go_ptr, gs_ptr, E_LOCAL, EL_P, CAPACITY)
    for z in range(pid, (n_rows + BLOCK_R - 1) // BLOCK_R, num_programs):
      _zero_item(z, start, gs, n_rows, recv_x_ptr, recv_w_ptr, HIDDEN, WITH_META, BLOCK_R,
                 BLOCK_H)
    prof_mark(sym_table, rank, PROF_ID, P_ZERO, PROFILE)
  if ORDER == 0 or ORDER == 1:
    # 2a. ORDER 0: this rank's own blocks (no NVLink, rows straight from x), then the others'.
    # 2b. ORDER 1: block-major over every source, this rank first within a block.
    split = 1 if ORDER == 0 else world
    _expand_sources(pid, num_programs, blk_lo, blk_hi, 0, split, x_ptr, pos_ptr, pos_stride,
                    val_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank,
                    world, seq, timeout_ns, op, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P,
                    CAPACITY, BLOCK_FLAG_OFF, ROWS_OFF, WITH_META, BLOCK_T, BLOCK_H, STAGES,
                    EXPAND_LEVELS, USE_TIMER, PULL)
    if ORDER == 0:
      if ZERO_FILL:
        prof_mark(sym_table, rank, PROF_ID, P_SELF, PROFILE)
      _expand_sources(pid, num_programs, blk_lo, blk_hi, 1, world, x_ptr, pos_ptr, pos_stride,
                      val_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table,
                      rank, world, seq, timeout_ns, op, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK,
                      TOPK_P, CAPACITY, BLOCK_FLAG_OFF, ROWS_OFF, WITH_META, BLOCK_T, BLOCK_H,
                      STAGES, EXPAND_LEVELS, USE_TIMER, PULL)
  else:
    # 2c. Work queue over (source, block) items, shared by every program of the launch.
    #     Profiled: slot P_SELF holds start + the ns this program waited for block flags.
    waited = _expand_queue(x_ptr, pos_ptr, pos_stride, val_ptr, go_ptr, gs_ptr, recv_x_ptr,
                           recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank, world, seq,
                           timeout_ns, op, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P,
                           E_LOCAL, EL_P, CAPACITY, BLOCK_FLAG_OFF, ROWS_OFF, WITH_META,
                           BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS, USE_TIMER, ORDER, PROFILE,
                           PULL, GROUP, ZERO_QUEUE, PARTS)
    prof_span(sym_table, rank, PROF_ID, P_SELF, waited, PROFILE)


@triton.jit
def _expand_queue(x_ptr, pos_ptr, pos_stride, val_ptr, go_ptr, gs_ptr, recv_x_ptr, recv_w_ptr,
                  recv_pos_ptr, status_ptr, sym_table, rank, world, seq, timeout_ns, op,
                  NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                  TOPK: tl.constexpr, TOPK_P: tl.constexpr, E_LOCAL: tl.constexpr,
                  EL_P: tl.constexpr, CAPACITY: tl.constexpr,
                  BLOCK_FLAG_OFF: tl.constexpr, ROWS_OFF: tl.constexpr,
                  WITH_META: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                  STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr, USE_TIMER: tl.constexpr,
                  ORDER: tl.constexpr, PROFILE: tl.constexpr, PULL: tl.constexpr,
                  GROUP: tl.constexpr, ZERO_QUEUE: tl.constexpr, PARTS: tl.constexpr):
  """Take items from the launch's queue until none are left (returns the ns this program
  waited for block flags, PROFILE only). An item is GROUP consecutive token blocks of one
  source (``nb`` below counts such groups). Items 0 .. NB-1 are this rank's
  own blocks (rows from x; they still wait for their BLOCK_FLAG, as this rank's senders write
  the block's SLOT_POS); then item NB + j is block j // (W-1) of source rank + 1 + j % (W-1):
  block-major, the order in which the senders' blocks arrive. ORDER 3: item i is block
  i // W of source rank + i % W: block-major over every source, this rank first.
  ZERO_QUEUE: the queue also holds the zero-fill items (``_zero_item``), spread evenly among
  the expansion items (queue item i is zero item Z(i) when Z(i + 1) > Z(i), Z(i) =
  floor(i * n_zero / total); else expansion item i - Z(i)), so the programs write zeros while
  their NVLink loads are in flight instead of before the first of them. ZERO_QUEUE 2: the
  first quarter of the zero items come first (while the senders copy the first blocks), the
  rest spread as above among the items after them.
  PARTS > 1: each (source, group) item is PARTS items, one per range of the rows' columns
  (``EPPlan.dispatch_parts``: where there are fewer items than programs), taken one after
  another."""
  nb: tl.constexpr = (NUM_TOKENS + BLOCK_T * GROUP - 1) // (BLOCK_T * GROUP)
  ZR: tl.constexpr = BLOCK_T * GROUP
  n_exp = nb * world * PARTS
  n_zero = tl.full([], 0, tl.int32)
  if ZERO_QUEUE:  # the layout's groups, loaded once for every zero item of this program
    start, gs, n_rows = _zero_rows(go_ptr, gs_ptr, E_LOCAL, EL_P, CAPACITY)
    n_zero = (n_rows + ZR - 1) // ZR
  total = n_exp + n_zero
  n_front = n_zero // 4 if ZERO_QUEUE == 2 else 0  # zero items first, before any flag is up
  # after the front: zero item n_front + Z(i) where Z steps, Z(i) = floor(i * nz / tot) over
  # i = item - n_front of tot = total - n_front items holding nz = n_zero - n_front zeros
  nz = (n_zero - n_front).to(tl.int64)  # (int64: no overflow in the products)
  tot = total - n_front
  item = take_item(sym_table, rank)
  waited = tl.full([], 0, tl.int64)
  while item < total:
    i = tl.maximum(item - n_front, 0)
    z = ((i * nz) // tot).to(tl.int32)
    front = item < n_front
    if ZERO_QUEUE and (front or ((i + 1) * nz) // tot > z):
      _zero_item(tl.where(front, item, n_front + z), start, gs, n_rows, recv_x_ptr,
                 recv_w_ptr, HIDDEN, WITH_META, ZR, BLOCK_H // GROUP)
    else:
      e = i - z
      waited += _expand_queue_item(e // PARTS, e % PARTS, x_ptr, pos_ptr, pos_stride, val_ptr,
                                   recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table,
                                   rank, world, seq, timeout_ns, op, NUM_TOKENS, MAX_TOKENS,
                                   HIDDEN, TOPK, TOPK_P, CAPACITY, BLOCK_FLAG_OFF, ROWS_OFF,
                                   WITH_META, BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS,
                                   USE_TIMER, ORDER, PROFILE, PULL, GROUP, PARTS)
    item = take_item(sym_table, rank)
  return waited


@triton.jit
def _zero_rows(go_ptr, gs_ptr, E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
               CAPACITY: tl.constexpr):
  """The layout's groups as ``_zero_item`` takes them: (start [EL_P]: the rows outside the
  groups before group e starts, gs [EL_P]: the group sizes, n_rows: the rows outside every
  group)."""
  el = tl.arange(0, EL_P)
  go = tl.load(go_ptr + el, mask=el < E_LOCAL, other=CAPACITY, cache_modifier=".cg")
  gs = tl.load(gs_ptr + el, mask=el < E_LOCAL, other=0, cache_modifier=".cg")
  return go - (tl.cumsum(gs, axis=0) - gs), gs, CAPACITY - tl.sum(gs, axis=0)


@triton.jit
def _zero_item(z, start, gs, n_rows, recv_x_ptr, recv_w_ptr, HIDDEN: tl.constexpr,
               WITH_META: tl.constexpr, ZR: tl.constexpr, BH: tl.constexpr):
  """Zero rows j in [z * ZR, z * ZR + ZR) of the ``n_rows`` rows outside the groups, counted
  in order (and their weights): zero row j is row j + (rows of the groups before it), where
  group e (``gs[e]`` rows) comes before zero row j when ``start[e]`` (the zero rows before
  group e starts) <= j."""
  j = z * ZR + tl.arange(0, ZR)
  ok = j < n_rows
  row = j + tl.sum(tl.where(start[None, :] <= j[:, None], gs[None, :], 0), axis=1)
  if WITH_META:
    tl.store(recv_w_ptr + row, tl.zeros([ZR], tl.float32), mask=ok)
  h = tl.arange(0, BH)
  for h0 in range(0, HIDDEN, BH):
    hmask = (h0 + h) < HIDDEN
    tl.store(recv_x_ptr + row[:, None].to(tl.int64) * HIDDEN + (h0 + h)[None, :],
             tl.zeros([ZR, BH], recv_x_ptr.dtype.element_ty), mask=ok[:, None] & hmask[None, :])


@triton.jit
def _expand_queue_item(item, part, x_ptr, pos_ptr, pos_stride, val_ptr, recv_x_ptr, recv_w_ptr,
                       recv_pos_ptr, status_ptr, sym_table, rank, world, seq, timeout_ns, op,
                       NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                       HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                       CAPACITY: tl.constexpr, BLOCK_FLAG_OFF: tl.constexpr,
                       ROWS_OFF: tl.constexpr, WITH_META: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, STAGES: tl.constexpr,
                       EXPAND_LEVELS: tl.constexpr, USE_TIMER: tl.constexpr,
                       ORDER: tl.constexpr, PROFILE: tl.constexpr, PULL: tl.constexpr,
                       GROUP: tl.constexpr, PARTS: tl.constexpr):
  """Expansion item ``item`` of the queue (see ``_expand_queue``), its columns of range
  ``part`` of PARTS; returns the ns waited."""
  nb: tl.constexpr = (NUM_TOKENS + BLOCK_T * GROUP - 1) // (BLOCK_T * GROUP)
  if ORDER == 3:
    blk = item // world
    s = (rank + item % world) % world
  elif item < nb:
    blk = item
    s = rank
  else:
    j = item - nb
    blk = j // (world - 1)
    s = (rank + 1 + j % (world - 1)) % world
  return _expand_item(s, blk, x_ptr, pos_ptr, pos_stride, val_ptr, recv_x_ptr, recv_w_ptr,
                      recv_pos_ptr, status_ptr, sym_table, rank, seq, timeout_ns, op,
                      NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY, BLOCK_FLAG_OFF,
                      ROWS_OFF, WITH_META, BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS, USE_TIMER,
                      PROFILE, PULL, GROUP, part, PARTS)


@triton.jit
def _expand_sources(pid, num_programs, blk_lo, blk_hi, i_lo, i_hi, x_ptr, pos_ptr, pos_stride,
                    val_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank,
                    world, seq, timeout_ns, op, NUM_TOKENS: tl.constexpr,
                    MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr,
                    TOPK_P: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_FLAG_OFF: tl.constexpr,
                    ROWS_OFF: tl.constexpr, WITH_META: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr, STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr,
                    USE_TIMER: tl.constexpr, PULL: tl.constexpr):
  """Blocks pid, pid + num_programs, ... of [blk_lo, blk_hi), block-major, of the sources
  s = rank + i (mod W) for i in [i_lo, i_hi)."""
  for blk in range(blk_lo + pid, blk_hi, num_programs):
    for i in range(i_lo, i_hi):
      _expand_item((rank + i) % world, blk, x_ptr, pos_ptr, pos_stride, val_ptr, recv_x_ptr,
                   recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank, seq, timeout_ns, op,
                   NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY, BLOCK_FLAG_OFF,
                   ROWS_OFF, WITH_META, BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS, USE_TIMER,
                   False, PULL, 1, 0, 1)


@triton.jit
def _expand_item(s, blk, x_ptr, pos_ptr, pos_stride, val_ptr, recv_x_ptr, recv_w_ptr,
                 recv_pos_ptr, status_ptr, sym_table, rank, seq, timeout_ns, op,
                 NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                 TOPK: tl.constexpr, TOPK_P: tl.constexpr, CAPACITY: tl.constexpr,
                 BLOCK_FLAG_OFF: tl.constexpr, ROWS_OFF: tl.constexpr, WITH_META: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr,
                 EXPAND_LEVELS: tl.constexpr, USE_TIMER: tl.constexpr,
                 PROFILE: tl.constexpr, PULL: tl.constexpr, GROUP: tl.constexpr, part,
                 PARTS: tl.constexpr):
  """Token blocks [blk * GROUP, blk * GROUP + GROUP) of source ``s``, after their BLOCK_FLAGs,
  as one tile of GROUP x BLOCK_T tokens by BLOCK_H / GROUP columns: this rank's rows come from
  x, the others' from ROWS[s] of this rank's region (PULL: of s's region, loaded over NVLink).
  PARTS > 1: only the columns of range ``part`` (``_expand_block``).
  Returns the ns spent waiting for the flags (PROFILE only; else 0)."""
  nb: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  BT: tl.constexpr = BLOCK_T * GROUP
  BH: tl.constexpr = BLOCK_H // GROUP
  if s == rank:
    src_base = x_ptr
    src_row = 0
  elif PULL == 3:  # rank s's x itself, over NVLink
    src_base = peer_ptr(sym_table, rank, s, recv_x_ptr.dtype.element_ty)
    src_row = 0
  else:  # (PULL 4: ROWS[s] of s's region holds all of s's x, copied there by its launcher)
    src_base = sym_ptr(sym_table, s if PULL else rank, ROWS_OFF, recv_x_ptr.dtype.element_ty)
    src_row = s * MAX_TOKENS
  t0 = _now(PROFILE)
  for g in tl.static_range(1 if PULL >= 2 else GROUP):  # PULL 2, 3: one flag per group
    if blk * GROUP + g < nb:
      wait_block(sym_table, rank, s, BLOCK_FLAG_OFF, MAX_TOKENS, blk * GROUP + g, seq,
                 timeout_ns, status_ptr, op, USE_TIMER)
  waited = _now(PROFILE) - t0
  _expand_block(s, blk, src_base, src_row, pos_ptr, pos_stride, val_ptr, recv_x_ptr,
                recv_w_ptr, recv_pos_ptr, NUM_TOKENS, CAPACITY, HIDDEN, TOPK, TOPK_P, WITH_META,
                BT, BH, STAGES, EXPAND_LEVELS, part, PARTS)
  return waited


@triton.jit
def _roles(pid, x_ptr, topk_idx_ptr, topk_weights_ptr, base_ptr, pos_ptr, pos_stride, val_ptr,
           group_offsets_ptr, group_sizes_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr,
           status_ptr, sym_table, rank, world, epoch, timeout_ns, op,
           NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
           TOPK: tl.constexpr, TOPK_P: tl.constexpr, NUM_EXPERTS: tl.constexpr,
           E_LOCAL: tl.constexpr, EL_P: tl.constexpr, CAPACITY: tl.constexpr,
           FROM_LAYOUT: tl.constexpr, SLOT_POS_OFF: tl.constexpr, SLOT_VAL_OFF: tl.constexpr,
           BLOCK_FLAG_OFF: tl.constexpr, ROWS_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
           NUM_RECEIVERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
           STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr,
           BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr, PHASE: tl.constexpr,
           PROFILE: tl.constexpr, ORDER: tl.constexpr, RECV_BLOCKS: tl.constexpr,
           PULL: tl.constexpr, GROUP: tl.constexpr, ZERO_QUEUE: tl.constexpr,
           BLOCK_PROG: tl.constexpr, PARTS: tl.constexpr):
  """Senders (pid < NUM_SENDERS) push, receivers expand token blocks [0, RECV_BLOCKS); senders
  then expand the rest [RECV_BLOCKS, NB), which arrive last. ORDERS 2, 3 (RECV_BLOCKS = 0):
  receivers and senders take every block from the launch's queue instead. All after GO.
  PHASE 0 (GPU) or the interpreter's 4 (push), 5 (receivers), 6 (senders' expansion)."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  if PHASE == 0:
    sender = pid < NUM_SENDERS
    rid = pid - NUM_SENDERS
  else:
    sender = tl.full([], PHASE == 4 or PHASE == 6, tl.int1)
    rid = pid
  prof_id = tl.where(sender, pid, NUM_SENDERS + rid)
  st = status_ptr + 1 + prof_id
  if PHASE != 6 and PHASE != 8:  # phases 6, 8 continue phase 4's programs: keep their status
    tl.store(st, 0)
  seq = wait_go(sym_table, rank, epoch, timeout_ns, st, op, USE_TIMER)
  if PHASE != 8:
    prof_mark(sym_table, rank, prof_id, P_GO, PROFILE)
  if seq > 0 and PHASE == 8:  # the interpreter's last phase: the leader's end wait alone
    _x_release(sym_table, rank, world, seq, timeout_ns, st, op, NUM_SENDERS + NUM_RECEIVERS,
               BLOCK_PROG, USE_TIMER)
  elif seq > 0:  # -1: the start barrier failed on this rank; the op is skipped
    if sender:
      if PHASE != 6:
        _push_body(pid, NUM_SENDERS, x_ptr, topk_idx_ptr, topk_weights_ptr, base_ptr,
                   sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P,
                   NUM_EXPERTS, E_LOCAL, CAPACITY, not FROM_LAYOUT, SLOT_POS_OFF, SLOT_VAL_OFF,
                   BLOCK_FLAG_OFF, ROWS_OFF, BLOCK_T, BLOCK_H, STAGES, PULL, GROUP)
        prof_mark(sym_table, rank, prof_id, P_PUSH, PROFILE)
      if (PHASE == 0 or PHASE == 6) and RECV_BLOCKS < num_blocks:
        _expand_body(pid, NUM_SENDERS, RECV_BLOCKS, num_blocks, x_ptr, pos_ptr, pos_stride,
                     val_ptr, group_offsets_ptr, group_sizes_ptr, recv_x_ptr, recv_w_ptr,
                     recv_pos_ptr, st, sym_table, rank, world, seq, timeout_ns, op, NUM_TOKENS,
                     MAX_TOKENS, HIDDEN, TOPK, TOPK_P, E_LOCAL, EL_P, CAPACITY, BLOCK_FLAG_OFF,
                     ROWS_OFF, not FROM_LAYOUT, BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS, BLOCK_R,
                     USE_TIMER, False, ORDER, prof_id, PROFILE, PULL, GROUP, ZERO_QUEUE,
                     PARTS)
    else:
      _expand_body(rid, NUM_RECEIVERS, 0, RECV_BLOCKS, x_ptr, pos_ptr, pos_stride, val_ptr,
                   group_offsets_ptr, group_sizes_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, st,
                   sym_table, rank, world, seq, timeout_ns, op, NUM_TOKENS, MAX_TOKENS, HIDDEN,
                   TOPK, TOPK_P, E_LOCAL, EL_P, CAPACITY, BLOCK_FLAG_OFF, ROWS_OFF,
                   not FROM_LAYOUT, BLOCK_T, BLOCK_H, STAGES, EXPAND_LEVELS, BLOCK_R, USE_TIMER,
                   True, ORDER, prof_id, PROFILE, PULL, GROUP, ZERO_QUEUE, PARTS)
    if PULL >= 3:
      # This program has read the peers' x (4: their copies of it) for the last time (its
      # last phase, in the interpreter): say so to every rank. The leader then waits until
      # every program of every rank has, so that no rank's x is freed (4: its copy
      # overwritten by the next launch's) while a peer still reads it.
      last = PHASE == 0 or PHASE == 5 or PHASE == 6 or (PHASE == 4 and
                                                         RECV_BLOCKS >= num_blocks)
      if last:
        signal_peers(sym_table, rank, world, prof_id, seq)
      if PHASE == 0 and pid == 0:
        _x_release(sym_table, rank, world, seq, timeout_ns, st, op,
                   NUM_SENDERS + NUM_RECEIVERS, BLOCK_PROG, USE_TIMER)
  prof_mark(sym_table, rank, prof_id, P_END, PROFILE)


@triton.jit
def _x_release(sym_table, rank, world, seq, timeout_ns, status_ptr, op,
               NUM_PROGRAMS: tl.constexpr, BLOCK_PROG: tl.constexpr, USE_TIMER: tl.constexpr):
  """Pull 3 and 4: wait until ARRIVE_FLAG[s, p] >= seq here for every program p of every
  rank s, i.e. until no peer reads this rank's x (4: ROWS[me]) any more: the launch (program
  0) ends only then."""
  wait_all_arrivals(sym_table, rank, world, NUM_PROGRAMS, seq, timeout_ns, status_ptr, op,
                    USE_TIMER, BLOCK_PROG)


@triton.jit
def dispatch_kernel(x_ptr, topk_idx_ptr, topk_weights_ptr,
                    recv_x_ptr, recv_w_ptr, recv_pos_ptr, group_sizes_ptr, group_offsets_ptr,
                    num_recv_ptr, num_dropped_ptr, hist_ptr, base_ptr, status_ptr,
                    sym_table, rank, world, epoch, timeout_ns, op, fingerprint,
                    NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                    TOPK: tl.constexpr, TOPK_P: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                    E_P: tl.constexpr, E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
                    CAPACITY: tl.constexpr, ALIGNMENT: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                    COUNTS_OFF: tl.constexpr, SLOT_POS_OFF: tl.constexpr,
                    SLOT_VAL_OFF: tl.constexpr, BLOCK_FLAG_OFF: tl.constexpr,
                    ROWS_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
                    NUM_RECEIVERS: tl.constexpr, W_P: tl.constexpr, COLS: tl.constexpr,
                    BLOCK_BC: tl.constexpr, BLOCK_PROG: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr, STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr,
                    BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr, PHASE: tl.constexpr,
                    PROFILE: tl.constexpr, ORDER: tl.constexpr, RECV_BLOCKS: tl.constexpr,
                    PULL: tl.constexpr, GROUP: tl.constexpr, ZERO_QUEUE: tl.constexpr,
                    PARTS: tl.constexpr = 1):
  """The dispatch op.

  Inputs: x ``[T, H]``, topk_idx ``[T, K] int32`` (sanitized), topk_weights ``[T, K] f32``.
  Outputs: recv_x ``[C, H]``, recv_weights ``[C] f32``, recv_pos ``[W, T, K] int32``,
    group_sizes / group_offsets ``[E_local] int32``, num_recv_rows / num_dropped ``[1] int32``,
    hist ``[NB, E]`` / base ``[NB + 3, E] int32`` (scratch), status
    ``[1 + NUM_SENDERS + NUM_RECEIVERS] int32`` (0, or the code of a failed wait / check:
    slot 0 leader, 1 + pid the others).
  Scalars: timeout_ns (i64), op (i32), fingerprint (i32, the same on every rank for the same
    op, config and shapes; the start barrier refuses a mismatch).
  PHASE: 0 = everything (GPU; every program of the launch must be resident, which a grid of
    <= num_sms programs is). The interpreter, which runs programs one after another, launches
    1 (histograms; all programs), 7 (column scans; all programs), 2 and 3 (leader: announce,
    then wait + layout; grid 1), 4 (senders' push), 5 (receivers) and 6 (the senders'
    expansion of the blocks past RECV_BLOCKS), each over every rank before the next
    (``EPPlan.interpreter_phases``).
  PROFILE: stamp %globaltimer into PROF[pid] at the phase boundaries (``ep_sync.PROF_*``).
  """
  pid = tl.program_id(0)
  num_programs: tl.constexpr = NUM_SENDERS + NUM_RECEIVERS
  prof_mark(sym_table, rank, pid, P_START, PROFILE)
  if PHASE == 0 or PHASE == 1:
    hist_blocks(pid, num_programs, topk_idx_ptr, hist_ptr, sym_table, rank, epoch, NUM_TOKENS,
                NUM_BLOCKS, TOPK, TOPK_P, NUM_EXPERTS, E_P, BLOCK_T, PROFILE)
  if PHASE == 0 or PHASE == 7:
    scan_columns(pid, num_programs, hist_ptr, base_ptr, status_ptr, sym_table, rank, epoch,
                 timeout_ns, op, NUM_BLOCKS, NUM_EXPERTS, COLS, BLOCK_BC, BLOCK_PROG, USE_TIMER)
  if PULL == 3 and leader_turn(pid, PHASE) and PHASE != 3:
    publish_ptr(sym_table, rank, world, x_ptr)  # before the announce: the peers read x itself
  if leader_turn(pid, PHASE):
    leader_layout(base_ptr, group_sizes_ptr, group_offsets_ptr, num_recv_ptr,
                  num_dropped_ptr, status_ptr, sym_table, rank, world, epoch, timeout_ns, op,
                  fingerprint, num_programs, NUM_BLOCKS, NUM_EXPERTS, E_P, E_LOCAL, EL_P,
                  CAPACITY, ALIGNMENT, COUNTS_OFF, BLOCK_FLAG_OFF, MAX_TOKENS, W_P,
                  BLOCK_PROG, USE_TIMER, PHASE, PROFILE)
  if PHASE == 0 or (PHASE >= 4 and PHASE != 7):  # (7: the column scans, above)
    _roles(pid, x_ptr, topk_idx_ptr, topk_weights_ptr, base_ptr,
           sym_ptr(sym_table, rank, SLOT_POS_OFF, tl.int32), MAX_TOKENS,
           sym_ptr(sym_table, rank, SLOT_VAL_OFF, tl.float32), group_offsets_ptr,
           group_sizes_ptr, recv_x_ptr, recv_w_ptr, recv_pos_ptr, status_ptr, sym_table, rank,
           world, epoch, timeout_ns, op, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P,
           NUM_EXPERTS, E_LOCAL, EL_P, CAPACITY, False, SLOT_POS_OFF, SLOT_VAL_OFF,
           BLOCK_FLAG_OFF, ROWS_OFF, NUM_SENDERS, NUM_RECEIVERS, BLOCK_T, BLOCK_H, STAGES,
           EXPAND_LEVELS, BLOCK_R, USE_TIMER, PHASE, PROFILE, ORDER, RECV_BLOCKS, PULL, GROUP,
           ZERO_QUEUE, BLOCK_PROG, PARTS)


@triton.jit
def dispatch_rows_kernel(x_ptr, topk_idx_ptr, recv_pos_in_ptr, group_offsets_ptr,
                         group_sizes_ptr,
                         recv_x_ptr, status_ptr,
                         sym_table, rank, world, epoch, timeout_ns, op, fingerprint,
                         NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                         HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                         NUM_EXPERTS: tl.constexpr, E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
                         CAPACITY: tl.constexpr, BLOCK_FLAG_OFF: tl.constexpr,
                         ROWS_OFF: tl.constexpr, NUM_SENDERS: tl.constexpr,
                         NUM_RECEIVERS: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_H: tl.constexpr, STAGES: tl.constexpr, EXPAND_LEVELS: tl.constexpr,
                         BLOCK_R: tl.constexpr, USE_TIMER: tl.constexpr, PHASE: tl.constexpr,
                         PROFILE: tl.constexpr, ORDER: tl.constexpr,
                         RECV_BLOCKS: tl.constexpr, PULL: tl.constexpr, GROUP: tl.constexpr,
                         ZERO_QUEUE: tl.constexpr, BLOCK_PROG: tl.constexpr,
                         PARTS: tl.constexpr = 1):
  """The dispatch_rows op (combine's backward): rows along an existing layout.

  Program 0 runs the start barrier; senders copy x[t] to every rank one of t's slots is
  addressed to (kept or not: senders do not know the drops); receivers expand with the
  layout's ``recv_pos_in [W, T, K]``.
  Inputs: x ``[T, H]``, topk_idx ``[T, K]``, recv_pos_in ``[W, T, K]``, group_offsets,
    group_sizes ``[E_local]``.
  Outputs: recv_x ``[C, H]``, status ``[1 + NUM_SENDERS + NUM_RECEIVERS] int32``.
  PHASE as in dispatch_kernel (without 1).
  """
  pid = tl.program_id(0)
  prof_mark(sym_table, rank, pid, P_START, PROFILE)
  if PULL == 3 and leader_turn(pid, PHASE) and PHASE != 3:
    publish_ptr(sym_table, rank, world, x_ptr)  # before the announce: the peers read x itself
  if leader_turn(pid, PHASE):
    leader_barrier(sym_table, rank, world, epoch, fingerprint, timeout_ns, status_ptr, op,
                   USE_TIMER, W_P, PHASE, BLOCK_FLAG_OFF, MAX_TOKENS,
                   (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T)
  if PHASE == 0 or PHASE >= 4:
    _roles(pid, x_ptr, topk_idx_ptr, topk_idx_ptr, topk_idx_ptr, recv_pos_in_ptr, NUM_TOKENS,
           recv_pos_in_ptr, group_offsets_ptr, group_sizes_ptr, recv_x_ptr, recv_x_ptr,
           recv_pos_in_ptr, status_ptr, sym_table, rank, world, epoch, timeout_ns, op,
           NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, NUM_EXPERTS, E_LOCAL, EL_P, CAPACITY,
           True, 0, 0, BLOCK_FLAG_OFF, ROWS_OFF, NUM_SENDERS, NUM_RECEIVERS, BLOCK_T, BLOCK_H,
           STAGES, EXPAND_LEVELS,
           BLOCK_R, USE_TIMER, PHASE, PROFILE, ORDER, RECV_BLOCKS, PULL, GROUP, ZERO_QUEUE,
           BLOCK_PROG, PARTS)
