"""Combine kernels (and the small slot exchange behind ``gather_slots``), one launch per op.

combine_kernel: program 0 first runs the op's start barrier (``leader_barrier``); then every
program pushes its share of partial rows and afterwards reduces its share of tokens:

push (expert rank; persistent over (token block, owner rank) items, block-major)
  For each token t of owner s with at least one row here, it sums its rows in k order:
  ``partial = sum_k f32(row_weights[p_k]) * f32(y[p_k])`` (p_k = recv_pos[s, t, k] >= 0) in
  float32, casts to y's dtype, and stores that single row into ROWS[me, t] of rank s's region
  plus ROW_MARK[me, t] = seq. Then ARRIVE_FLAG[me, pid] = seq in every rank.
  The K slots of a token are compacted in registers first: level j holds each token's j-th
  present slot (in k order, so the sum order is unchanged), and levels 0..J_UNROLL-1 load
  their rows together. With top-8 of 256 experts on 4 ranks a token has ~2 rows here, so
  the dense levels carry the traffic instead of 8 mostly-masked loads.
  Traffic per rank: reads every received row of y once (C x H at most), writes one row per
  (owner rank, token) that sent something here (over NVLink unless s is this rank).

reduce (token owner)
  Waits for all ARRIVE_FLAGs of the op, then ``out[t] = sum_{r = 0..W-1, in order}
  f32(ROWS[r, t])`` over the ranks r whose ROW_MARK[r, t] == seq (no partial = 0), cast to
  y's dtype; the marks are loaded once per block and the ranks' rows of a chunk together.
  Traffic per rank: reads one row per (token, rank it reached), writes T rows.

Few tokens (``EPPlan.combine_push_parts``): where the (token block, owner) push items are
fewer than the programs, each is split into PUSH_PARTS column ranges with DONE flags of their
own, and the owners reduce each (block, range) on its own: a decode batch of 128 tokens at
W = 1 moves its rows with 32 programs instead of 8.

gather_kernel: the same pattern for ``[T, K]`` float32 values:
  the expert rank sends ``values[recv_pos[s, t, k]]`` (0 where absent) to SLOT_VAL[me, t, k] of
  rank s; the owner picks, for each slot, the value from the rank its expert lives on.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_sync import (_ERR_OFF, P_ARRIVED, P_END, P_GO, P_PUSH, P_SELF, P_START, _now, claim,
                      flags_ready, leader_barrier, leader_turn, prof_mark, prof_span, row_align,
                      signal_peers, store_release, sym_ptr, take_item, wait_all_arrivals,
                      wait_flags, wait_go, zero_own)

# Row-chunk loops are software-pipelined (cp.async into shared memory, STAGES - 1 chunks ahead;
# STAGES: ``EPPlan.combine_stages``).


@triton.jit
def _push_chunks(dst, ps, ws, have, y_ptr, HIDDEN: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_HC: tl.constexpr, STAGES: tl.constexpr, LEVELS: tl.constexpr, h_lo,
                 h_hi):
  """dst[t] = sum of the block's first LEVELS present rows of each token t, weighted, chunk by
  chunk of BLOCK_HC columns over columns [h_lo, h_hi) (the LEVELS row loads of a chunk are
  unrolled: in flight together). ``ps``, ``ws``: ``_slot_levels``' positions and weights, a
  [BLOCK_T] vector per level."""
  h = tl.arange(0, BLOCK_HC)
  A: tl.constexpr = row_align(HIDDEN, dst.dtype.element_ty)
  for h0 in tl.range(h_lo, h_hi, BLOCK_HC, num_stages=STAGES):
    cols = h0 + h
    hmask = cols < h_hi
    acc = _weighted_rows(ps, ws, y_ptr, cols, hmask, HIDDEN, BLOCK_T, BLOCK_HC, LEVELS)
    tl.store(tl.multiple_of(dst + cols[None, :], [A, A]), acc.to(dst.dtype.element_ty),
             mask=have[:, None] & hmask[None, :])


@triton.jit
def _weighted_rows(ps, ws, y_ptr, cols, hmask, HIDDEN: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_HC: tl.constexpr, LEVELS: tl.constexpr):
  """sum_{j < LEVELS} ws[j] * f32(y[ps[j], cols]) in level order (float32 [BLOCK_T, BLOCK_HC];
  0 where ps[j] < 0): one chunk of a push's partial rows."""
  acc = tl.zeros([BLOCK_T, BLOCK_HC], tl.float32)
  for j in tl.static_range(LEVELS):
    yj = tl.load(y_ptr + ps[j][:, None].to(tl.int64) * HIDDEN + cols[None, :],
                 mask=(ps[j] >= 0)[:, None] & hmask[None, :], other=0.0)
    acc = acc + ws[j][:, None] * yj.to(tl.float32)
  return acc


@triton.jit
def _slot_levels(recv_pos_ptr, row_weights_ptr, s, t, NUM_TOKENS: tl.constexpr,
                 TOPK: tl.constexpr, CAPACITY: tl.constexpr, LEVELS: tl.constexpr):
  """For owner s's tokens ``t [BLOCK_T]`` (t >= NUM_TOKENS: none) in recv_pos: the positions
  and weights of their first LEVELS present slots in k order, as two tuples of LEVELS
  ``[BLOCK_T]`` vectors (-1 and 0.0 past a token's count), and the counts.

  One ``[BLOCK_T]`` load per slot column and elementwise selects: nothing is reduced across
  the block's threads, so the vectors come out in the row tile's token layout with no CTA
  barrier or warp shuffle. (Until session 17 the push loaded a [BLOCK_T, TOPK_P] tile and
  took each level out of it by prefix counts and per-level sums: ~36 barriers and ~67
  shuffles per item in the compiled push: combine 0.86 vs 0.79 ms, DeepSeek-V3 shape, 4 H200,
  16-token blocks, same run.)"""
  ps, cnt = _levels(_slot_cols(recv_pos_ptr, s, t, NUM_TOKENS, TOPK), CAPACITY, LEVELS)
  return ps, _level_weights(row_weights_ptr, ps), cnt


@triton.jit
def _slot_cols(recv_pos_ptr, s, t, NUM_TOKENS: tl.constexpr, TOPK: tl.constexpr):
  """recv_pos[s, t, k] for owner s's tokens ``t [BLOCK_T]``, a tuple of TOPK ``[BLOCK_T]``
  vectors (-1 for t >= NUM_TOKENS): the loads only, so that a caller can issue them an item
  ahead (``_combine_push`` with PREFETCH)."""
  slot0 = (s * NUM_TOKENS + t) * TOPK
  cols = ()
  for kk in tl.static_range(TOPK):
    cols = cols + (tl.load(recv_pos_ptr + slot0 + kk, mask=t < NUM_TOKENS, other=-1),)
  return cols


@triton.jit
def _levels(cols, CAPACITY: tl.constexpr, LEVELS: tl.constexpr):
  """``_slot_cols``' columns compacted: per level j < LEVELS each token's j-th present slot in
  k order (-1 past its count), and the counts."""
  cnt = tl.zeros_like(cols[0])
  ps = ()
  for j in tl.static_range(LEVELS):
    ps = ps + (tl.full(cols[0].shape, -1, tl.int32),)
  for kk in tl.static_range(len(cols)):
    p = cols[kk]
    pres = (p >= 0) & (p < CAPACITY)  # a corrupt layout cannot address past y
    nxt = ()
    for j in tl.static_range(LEVELS):
      nxt = nxt + (tl.where(pres & (cnt == j), p, ps[j]),)
    ps = nxt
    cnt += pres.to(tl.int32)
  return ps, cnt


@triton.jit
def _level_weights(row_weights_ptr, ps):
  """The routing weight of each level's row (0.0 where there is none)."""
  ws = ()
  for j in tl.static_range(len(ps)):
    ws = ws + (tl.load(row_weights_ptr + ps[j], mask=ps[j] >= 0, other=0.0),)
  return ws


@triton.jit
def _only(ps, ws, keep):
  """_slot_levels' ``ps``, ``ws`` for the tokens where ``keep`` holds (none elsewhere)."""
  kp = ()
  kw = ()
  for j in tl.static_range(len(ps)):
    kp = kp + (tl.where(keep, ps[j], -1),)
    kw = kw + (tl.where(keep, ws[j], 0.0),)
  return kp, kw


@triton.jit
def _heavy_tokens(heavy, BLOCK_T: tl.constexpr, HEAVY_T: tl.constexpr):
  """For ``heavy [BLOCK_T]``: the block offsets of its first HEAVY_T set entries, in order
  ([HEAVY_T] int32), and which of those exist. (Prefix counts by a [BLOCK_T, BLOCK_T]
  comparison: tl.cumsum's lowering fails for narrow tiles at 16 warps in Triton 3.6.)"""
  tt = tl.arange(0, BLOCK_T)
  h = heavy.to(tl.int32)
  before = tl.sum(tl.where(tt[None, :] < tt[:, None], h[None, :], 0), axis=1)   # [BLOCK_T]
  i = tl.arange(0, HEAVY_T)
  m = (h[None, :] > 0) & (before[None, :] == i[:, None])                      # [HEAVY_T, BLOCK_T]
  return tl.sum(tl.where(m, tt[None, :], 0), axis=1), tl.sum(m.to(tl.int32), axis=1) > 0


@triton.jit
def _halves(cnt, blk, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
  """The block's tokens ordered by their row count here, most first (ties in token order):
  the first HALF as tokens ``[HALF]``, the others likewise, and the count of the token right
  after the first half (the most any token of the second half has). By [HALF, BLOCK_T]
  comparisons: no cross-thread scan."""
  tt = tl.arange(0, BLOCK_T)
  ci = cnt[:, None]
  cj = cnt[None, :]
  ahead = (cj > ci) | ((cj == ci) & (tt[None, :] < tt[:, None]))  # [i, j]: j before i
  order = tl.sum(ahead.to(tl.int32), axis=1)  # [BLOCK_T]: each token's place in that order
  i = tl.arange(0, HALF)
  first = order[None, :] == i[:, None]            # [HALF, BLOCK_T]
  second = order[None, :] == (i + HALF)[:, None]
  t_hi = blk * BLOCK_T + tl.sum(tl.where(first, tt[None, :], 0), axis=1)
  t_lo = blk * BLOCK_T + tl.sum(tl.where(second, tt[None, :], 0), axis=1)
  c_lo = tl.max(tl.where(order == HALF, cnt, 0), axis=0)
  return t_hi, t_lo, c_lo


@triton.jit
def _push_halves(rows, rank, t_hi, t_lo, s, y_ptr, row_weights_ptr, recv_pos_ptr,
                 NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                 TOPK: tl.constexpr, TOPK_P: tl.constexpr, CAPACITY: tl.constexpr,
                 HALF: tl.constexpr, L_LO: tl.constexpr, BLOCK_HC_HV: tl.constexpr,
                 STAGES: tl.constexpr, h_lo, h_hi):
  """HALVES: one push item as two [HALF]-token tiles in one chunk loop: the tokens with the
  most rows here over all TOPK_P levels, the others over L_LO (they have at most that many).
  Each token's sum is the same as on the other paths (its rows in k order)."""
  ph, wh, ch = _slot_levels(recv_pos_ptr, row_weights_ptr, s, t_hi, NUM_TOKENS, TOPK,
                            CAPACITY, TOPK_P)
  pl, wl, cl = _slot_levels(recv_pos_ptr, row_weights_ptr, s, t_lo, NUM_TOKENS, TOPK,
                            CAPACITY, L_LO)
  dh = rows + (rank * MAX_TOKENS + t_hi)[:, None].to(tl.int64) * HIDDEN
  dl = rows + (rank * MAX_TOKENS + t_lo)[:, None].to(tl.int64) * HIDDEN
  hh = ch > 0
  hl = cl > 0
  h = tl.arange(0, BLOCK_HC_HV)
  A: tl.constexpr = row_align(HIDDEN, rows.dtype.element_ty)
  for h0 in tl.range(h_lo, h_hi, BLOCK_HC_HV, num_stages=STAGES):
    cols = h0 + h
    hmask = cols < h_hi
    acc_h = _weighted_rows(ph, wh, y_ptr, cols, hmask, HIDDEN, HALF, BLOCK_HC_HV, TOPK_P)
    acc_l = _weighted_rows(pl, wl, y_ptr, cols, hmask, HIDDEN, HALF, BLOCK_HC_HV, L_LO)
    tl.store(tl.multiple_of(dh + cols[None, :], [A, A]), acc_h.to(rows.dtype.element_ty),
             mask=hh[:, None] & hmask[None, :])
    tl.store(tl.multiple_of(dl + cols[None, :], [A, A]), acc_l.to(rows.dtype.element_ty),
             mask=hl[:, None] & hmask[None, :])


@triton.jit
def _push_heavy(blk, s, ps, ws, cnt, have, dst, rows, rank, y_ptr, row_weights_ptr,
                recv_pos_ptr, NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                CAPACITY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HC: tl.constexpr,
                BLOCK_HC_ALL: tl.constexpr, STAGES: tl.constexpr, J_UNROLL: tl.constexpr,
                SPLIT: tl.constexpr, HEAVY_T: tl.constexpr, BLOCK_HC_H: tl.constexpr, h_lo,
                h_hi):
  """A push item where a token has more than J_UNROLL rows here: with SPLIT, where at most
  HEAVY_T tokens do, the others on the J_UNROLL-level path and those few over all TOPK levels
  in a tile of their own; else the whole block over all TOPK levels."""
  heavy = cnt > J_UNROLL
  if SPLIT and tl.sum(heavy.to(tl.int32), axis=0) <= HEAVY_T:
    light = have & ~heavy
    if tl.sum(light.to(tl.int32), axis=0) > 0:
      lp, lw = _only(ps, ws, light)
      _push_chunks(dst, lp, lw, light, y_ptr, HIDDEN, BLOCK_T, BLOCK_HC, STAGES, J_UNROLL,
                   h_lo, h_hi)
    th, hv = _heavy_tokens(heavy, BLOCK_T, HEAVY_T)
    t_h = tl.where(hv, blk * BLOCK_T + th, NUM_TOKENS)  # NUM_TOKENS: no token
    # the few tokens' slots loaded again: taking them out of the block's vectors would
    # need a gather across the block's threads
    hp, hw, _ = _slot_levels(recv_pos_ptr, row_weights_ptr, s, t_h, NUM_TOKENS, TOPK,
                             CAPACITY, TOPK_P)
    dst_h = rows + (rank * MAX_TOKENS + t_h)[:, None].to(tl.int64) * HIDDEN
    _push_chunks(dst_h, hp, hw, hv, y_ptr, HIDDEN, HEAVY_T, BLOCK_HC_H, STAGES, TOPK, h_lo,
                 h_hi)
  else:
    _push_chunks(dst, ps, ws, have, y_ptr, HIDDEN, BLOCK_T, BLOCK_HC_ALL, STAGES, TOPK, h_lo,
                 h_hi)


@triton.jit
def _push_item(blk, s, ps, ws, cnt, rank, seq, y_ptr, row_weights_ptr, recv_pos_ptr,
               sym_table, ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr,
               NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
               TOPK: tl.constexpr, TOPK_P: tl.constexpr, CAPACITY: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_HC_ALL: tl.constexpr,
               STAGES: tl.constexpr, J_UNROLL: tl.constexpr, SPLIT: tl.constexpr,
               HEAVY_T: tl.constexpr, BLOCK_HC_H: tl.constexpr, NARROW: tl.constexpr,
               BLOCK_HC2: tl.constexpr, HALVES: tl.constexpr, BLOCK_HC_HV: tl.constexpr,
               h_lo, h_hi):
  """One push item: token block ``blk`` of owner ``s`` (see _combine_push) over columns
  [h_lo, h_hi), whose slot levels ``ps``, ``ws``, ``cnt`` (``_slot_levels``, TOPK_P levels:
  at least TOPK and J_UNROLL) the caller loaded."""
  t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
  jmax = tl.max(cnt, axis=0)
  if jmax > 0:
    have = cnt > 0
    rows = sym_ptr(sym_table, s, ROWS_OFF, y_ptr.dtype.element_ty)
    dst = rows + (rank * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN
    # Versions of the chunk loop, each with a static level count so Triton can
    # software-pipeline its loads: J_UNROLL levels (most blocks; 2 in wider chunks with
    # NARROW where no token has more than 2 rows here), or all TOPK levels when a token of
    # the block has more rows here (with SPLIT, for those few tokens only; with HALVES, the
    # block's tokens in two halves by their rows here, ``_push_halves``).
    if jmax <= J_UNROLL:
      if NARROW and jmax <= 2:
        _push_chunks(dst, ps, ws, have, y_ptr, HIDDEN, BLOCK_T, BLOCK_HC2, STAGES, 2, h_lo,
                     h_hi)
      else:
        _push_chunks(dst, ps, ws, have, y_ptr, HIDDEN, BLOCK_T, BLOCK_HC, STAGES, J_UNROLL,
                     h_lo, h_hi)
    elif HALVES:
      t_hi, t_lo, c_lo = _halves(cnt, blk, BLOCK_T, BLOCK_T // 2)
      if c_lo <= J_UNROLL:
        _push_halves(rows, rank, t_hi, t_lo, s, y_ptr, row_weights_ptr, recv_pos_ptr,
                     NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY, BLOCK_T // 2,
                     J_UNROLL, BLOCK_HC_HV, STAGES, h_lo, h_hi)
      else:
        _push_heavy(blk, s, ps, ws, cnt, have, dst, rows, rank, y_ptr, row_weights_ptr,
                    recv_pos_ptr, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY,
                    BLOCK_T, BLOCK_HC, BLOCK_HC_ALL, STAGES, J_UNROLL, SPLIT, HEAVY_T,
                    BLOCK_HC_H, h_lo, h_hi)
    else:
      _push_heavy(blk, s, ps, ws, cnt, have, dst, rows, rank, y_ptr, row_weights_ptr,
                  recv_pos_ptr, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY,
                  BLOCK_T, BLOCK_HC, BLOCK_HC_ALL, STAGES, J_UNROLL, SPLIT, HEAVY_T,
                  BLOCK_HC_H, h_lo, h_hi)
    marks = sym_ptr(sym_table, s, ROW_MARK_OFF, tl.int32)
    tl.store(marks + rank * MAX_TOKENS + t, tl.zeros([BLOCK_T], tl.int32) + seq, mask=have)


@triton.jit
def _done(sym_table, s, fb, rank, world, seq, BLOCK_FLAG_OFF: tl.constexpr):
  """DONE[fb, rank] = seq in owner s's region (release, system scope; call after a CTA
  barrier, so the item's rows and marks are ordered before it). ``fb``: the token block, or
  with PUSH_PARTS > 1 the (block, column range) ``blk * PUSH_PARTS + part``."""
  store_release(sym_ptr(sym_table, s, BLOCK_FLAG_OFF, tl.int32) + fb * world + rank, seq)


@triton.jit
def _claims(sym_table, rank, world, BLOCK_FLAG_OFF: tl.constexpr, NUM_TOKENS: tl.constexpr,
            BLOCK_T: tl.constexpr):
  """QUEUE = 3: PARTS int32 per token block after the DONE flags (``EPPlan._combine_queue``
  keeps QUEUE 1 where they would not fit), zeroed with them by the leader: the first program
  to claim a block's column range reduces it, between its pushes or from the queue after
  them."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  return sym_ptr(sym_table, rank, BLOCK_FLAG_OFF, tl.int32) + world * num_blocks


@triton.jit
def _combine_push(pid, num_programs, y_ptr, row_weights_ptr, recv_pos_ptr, out_ptr, sym_table,
                  rank, world, seq, NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr,
                  HIDDEN: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                  CAPACITY: tl.constexpr, ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr,
                  BLOCK_FLAG_OFF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HC: tl.constexpr,
                  BLOCK_HC_ALL: tl.constexpr, STAGES: tl.constexpr, J_UNROLL: tl.constexpr,
                  QUEUE: tl.constexpr, SPLIT: tl.constexpr, HEAVY_T: tl.constexpr,
                  BLOCK_HC_H: tl.constexpr, NARROW: tl.constexpr, BLOCK_HC2: tl.constexpr,
                  PREFETCH: tl.constexpr, W_P: tl.constexpr, BLOCK_HR: tl.constexpr,
                  PARTS: tl.constexpr, PART_COLS: tl.constexpr, HALVES: tl.constexpr,
                  BLOCK_HC_HV: tl.constexpr, PUSH_PARTS: tl.constexpr,
                  PUSH_COLS: tl.constexpr, PROFILE: tl.constexpr):
  """Expert side: one weighted partial row per (owner rank, token) into the owner's ROWS.
  Chunks of BLOCK_HC columns on the J_UNROLL-level path, BLOCK_HC_ALL on the all-TOPK one.
  SPLIT: a block with at most HEAVY_T tokens of more than J_UNROLL rows here runs the
  J_UNROLL-level path for the others and those few tokens over all TOPK levels in one
  [HEAVY_T, BLOCK_HC_H] tile (each token's sum is the same either way). NARROW: a block whose
  tokens have at most 2 rows here sums 2 levels in BLOCK_HC2-column chunks.
  QUEUE: after each item, DONE[blk, me] = seq in the owner's region (its reducers start on a
  block once every rank's item for it is done); else one ARRIVE_FLAG per program at the end.
  QUEUE = 2: the DONE flags two items at a time (a release at system scope waits until the
  program's earlier remote stores have landed: one such drain per two items).
  QUEUE = 3: as 1, and between its push items a program also reduces: after an item it looks
  once (no wait) at the DONE flags of its next candidate block (blocks pid, pid + P, ...,
  each looked at only once this program's loop is a step past the step in which every
  rank's programs push that block), and reduces the block if every rank has pushed it and no
  other program claimed it first (``_claims``). Pushes are NVLink-bound, so the reduce's HBM
  traffic fits beside them instead of running after the last push; what is left goes
  through the queue after the pushes, in PARTS column ranges per block (the last step's
  blocks would otherwise leave most programs idle). Returns the ns spent reducing between
  push items (PROFILE and QUEUE = 3 only; else 0).
  PREFETCH: an item's slot positions are loaded an item ahead, during the chunk loops of the
  item before it: one dependent load round trip at the start of each item (the weights at
  those positions) instead of two.
  HALVES: an item that would take the split or all-TOPK path, but whose tokens ordered by
  their rows here have at most J_UNROLL in the second half, runs as two half-height tiles,
  the first half over all TOPK levels and the second over J_UNROLL (``_push_halves``): at W =
  2 every item holds a token of more than 4 rows here, and its 8 levels of row tiles are
  about half masked rows; this way a chunk carries 12 half tiles instead of 8 whole ones.
  PUSH_PARTS > 1 (few tokens; queues 0, 1, 2): each (block, owner) item is PUSH_PARTS items of
  PUSH_COLS columns each (consecutive, so different programs take them), each with its own
  DONE flag, DONE[blk * PUSH_PARTS + part, me]."""
  tl.static_assert(PUSH_PARTS == 1 or QUEUE != 3)
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  # QUEUE = 2: the owner rank whose DONE flag is still to be raised (-1: none), and its flag
  prev_s = tl.full([], -1, tl.int32)
  prev_fb = tl.full([], 0, tl.int32)
  total_bs = world * num_blocks  # (block, owner) pairs
  total = total_bs * PUSH_PARTS
  cand = pid  # QUEUE = 3: this program's next block to reduce between its push items
  step = 0
  between = tl.full([], 0, tl.int64)
  if QUEUE == 3:  # (sym_ptr reads the region table: once, not per item)
    flags = sym_ptr(sym_table, rank, BLOCK_FLAG_OFF, tl.int32)
    claims = _claims(sym_table, rank, world, BLOCK_FLAG_OFF, NUM_TOKENS, BLOCK_T)
  if PREFETCH:  # item pid's slot columns
    cols = _slot_cols(recv_pos_ptr, (pid // PUSH_PARTS + rank) % world,
                      _item_tokens(pid // PUSH_PARTS, total_bs, world, NUM_TOKENS, BLOCK_T),
                      NUM_TOKENS, TOPK)
  for item in range(pid, total, num_programs):
    bs = item // PUSH_PARTS  # the (block, owner) pair
    blk = bs // world
    s = (bs + rank) % world  # consecutive items of a program go to different owners
    if PUSH_PARTS == 1:
      fb = blk
      h_lo = 0
      h_hi = HIDDEN
    else:
      part = item % PUSH_PARTS
      fb = blk * PUSH_PARTS + part
      h_lo, h_hi = _col_range(part, PUSH_COLS, HIDDEN)
    if PREFETCH:
      # This item's slot columns were loaded during the previous item's chunk loops; the
      # next item's are issued now, before this item's chunk loops, which hide their round
      # trip (they are used an item later). (Weights an item ahead too cost ~50 registers a
      # thread: 128 and 88 B of spills at the DeepSeek-V3 shape.)
      cur_ps, cur_cnt = _levels(cols, CAPACITY, TOPK_P)
      cur_ws = _level_weights(row_weights_ptr, cur_ps)
      nxt = (item + num_programs) // PUSH_PARTS
      cols = _slot_cols(recv_pos_ptr, (nxt + rank) % world,
                        _item_tokens(nxt, total_bs, world, NUM_TOKENS, BLOCK_T), NUM_TOKENS,
                        TOPK)
    else:
      cur_ps, cur_ws, cur_cnt = _slot_levels(recv_pos_ptr, row_weights_ptr, s,
                                             blk * BLOCK_T + tl.arange(0, BLOCK_T),
                                             NUM_TOKENS, TOPK, CAPACITY, TOPK_P)
    _push_item(blk, s, cur_ps, cur_ws, cur_cnt, rank, seq, y_ptr, row_weights_ptr,
               recv_pos_ptr, sym_table, ROWS_OFF, ROW_MARK_OFF, NUM_TOKENS, MAX_TOKENS, HIDDEN,
               TOPK, TOPK_P, CAPACITY, BLOCK_T, BLOCK_HC, BLOCK_HC_ALL, STAGES, J_UNROLL,
               SPLIT, HEAVY_T, BLOCK_HC_H, NARROW, BLOCK_HC2, HALVES, BLOCK_HC_HV, h_lo, h_hi)
    if QUEUE == 1 or QUEUE == 3:
      tl.debug_barrier()  # the item's rows and marks before its flag
      _done(sym_table, s, fb, rank, world, seq, BLOCK_FLAG_OFF)
    if QUEUE == 3:
      # block cand's items are pushed in step (cand * W + W - 1) // P of every rank's programs
      if (cand < num_blocks) & (step > (cand * world + world - 1) // num_programs):
        if flags_ready(flags + cand * world, world, seq, W_P, "sys"):
          t0 = _now(PROFILE)
          _reduce_claimed(cand, claims, out_ptr, sym_table, rank, world, seq, NUM_TOKENS,
                          MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR,
                          STAGES, PARTS, PART_COLS)
          between += _now(PROFILE) - t0
          cand += num_programs
      step += 1
    if QUEUE == 2:
      if prev_s >= 0:
        tl.debug_barrier()  # both items' rows and marks before their flags
        _done(sym_table, prev_s, prev_fb, rank, world, seq, BLOCK_FLAG_OFF)
        _done(sym_table, s, fb, rank, world, seq, BLOCK_FLAG_OFF)
        prev_s = -1
      else:
        prev_s = s
        prev_fb = fb
  if QUEUE == 2:
    if prev_s >= 0:
      tl.debug_barrier()
      _done(sym_table, prev_s, prev_fb, rank, world, seq, BLOCK_FLAG_OFF)
  if not QUEUE:
    signal_peers(sym_table, rank, world, pid, seq)
  return between


@triton.jit
def _item_tokens(item, total, world, NUM_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr):
  """The tokens ``[BLOCK_T]`` of (block, owner) pair ``item`` of ``total`` (block item // W);
  all NUM_TOKENS (none) past the last, so that a prefetch past the end loads nothing."""
  t = (item // world) * BLOCK_T + tl.arange(0, BLOCK_T)
  return tl.where(item < total, t, NUM_TOKENS)


@triton.jit
def _combine_reduce(pid, num_programs, out_ptr, sym_table, rank, world, seq,
                    NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                    ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr, W_P: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_HR: tl.constexpr, STAGES: tl.constexpr,
                    PUSH_PARTS: tl.constexpr, PUSH_COLS: tl.constexpr):
  """Owner side: out[t] = sum over ranks in order of the partial rows that arrived, for blocks
  pid, pid + num_programs, ... (after every rank's ARRIVE_FLAGs); with PUSH_PARTS > 1 for
  (block, column range) items."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  for fb in range(pid, num_blocks * PUSH_PARTS, num_programs):
    _reduce_flag_block(fb, out_ptr, sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS,
                       HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES,
                       PUSH_PARTS, PUSH_COLS)


@triton.jit
def _reduce_flag_block(fb, out_ptr, sym_table, rank, world, seq, NUM_TOKENS: tl.constexpr,
                       MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr, ROWS_OFF: tl.constexpr,
                       ROW_MARK_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_HR: tl.constexpr, STAGES: tl.constexpr, PUSH_PARTS: tl.constexpr,
                       PUSH_COLS: tl.constexpr):
  """``_reduce_block`` of the unit one DONE flag per rank covers: token block ``fb``, or with
  PUSH_PARTS > 1 column range fb % PUSH_PARTS of block fb // PUSH_PARTS."""
  if PUSH_PARTS == 1:
    _reduce_block(fb, out_ptr, sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS, HIDDEN,
                  ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES)
  else:
    _reduce_part(fb // PUSH_PARTS, fb % PUSH_PARTS, out_ptr, sym_table, rank, world, seq,
                 NUM_TOKENS, MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T,
                 BLOCK_HR, STAGES, PUSH_COLS)


@triton.jit
def _reduce_claimed(blk, claims, out_ptr, sym_table, rank, world, seq, NUM_TOKENS: tl.constexpr,
                    MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr, ROWS_OFF: tl.constexpr,
                    ROW_MARK_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_HR: tl.constexpr, STAGES: tl.constexpr, PARTS: tl.constexpr,
                    PART_COLS: tl.constexpr):
  """QUEUE = 3, between push items: claim block ``blk``'s PARTS column ranges at once and
  reduce those this program won (all of them, one range, unless the queue after the pushes
  took some first). The block's flags must have been seen complete."""
  part = tl.arange(0, PARTS)
  won = tl.sum(tl.where(claim(claims + blk * PARTS + part), 1 << part, 0), axis=0)
  if won == (1 << PARTS) - 1:
    _reduce_block(blk, out_ptr, sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS, HIDDEN,
                  ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES)
  elif won != 0:
    for p in range(PARTS):
      if ((won >> p) & 1) != 0:
        _reduce_part(blk, p, out_ptr, sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS,
                     HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES, PART_COLS)


@triton.jit
def _reduce_queue(out_ptr, status_ptr, sym_table, rank, world, seq, timeout_ns, op,
                  NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                  ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr,
                  BLOCK_FLAG_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_HR: tl.constexpr, STAGES: tl.constexpr, QUEUE: tl.constexpr,
                  PARTS: tl.constexpr, PART_COLS: tl.constexpr, PUSH_PARTS: tl.constexpr,
                  PUSH_COLS: tl.constexpr, USE_TIMER: tl.constexpr, PROFILE: tl.constexpr):
  """Owner side with the launch's work queue: take token blocks in order (the order the
  pushes finish them), each once DONE[blk, r] = seq for every rank r; a program starts as
  soon as its own push is over, while other programs still push (QUEUE = 3: items of PARTS
  column ranges of a block, those no program claimed between its pushes; PUSH_PARTS > 1:
  (block, column range) items, each once its own DONE flags are set). Returns the ns
  waited for flags (PROFILE only). Stops at the first timed-out wait (the status says
  which)."""
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flags = sym_ptr(sym_table, rank, BLOCK_FLAG_OFF, tl.int32)
  claims = _claims(sym_table, rank, world, BLOCK_FLAG_OFF, NUM_TOKENS, BLOCK_T)
  waited = tl.full([], 0, tl.int64)
  ok = tl.full([], 1, tl.int1)
  item = take_item(sym_table, rank)
  while (item < num_blocks * PUSH_PARTS * PARTS) & ok:
    mine = tl.full([], 1, tl.int1)
    if QUEUE == 3:  # a range reduced between the pushes was claimed there: skip it here
      mine = claim(claims + item)
    if mine:
      fb = item // PARTS  # the flags' unit: a block, or with PUSH_PARTS > 1 a block's range
      blk = fb // PUSH_PARTS
      t0 = _now(PROFILE)
      ok = wait_flags(flags + fb * world, world, seq, timeout_ns, err, status_ptr, op + 8,
                      rank, -1, seq, USE_TIMER, W_P, "sys")
      waited += _now(PROFILE) - t0
      if ok:
        if PARTS == 1:
          _reduce_flag_block(fb, out_ptr, sym_table, rank, world, seq, NUM_TOKENS,
                             MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T,
                             BLOCK_HR, STAGES, PUSH_PARTS, PUSH_COLS)
        else:
          _reduce_part(blk, item % PARTS, out_ptr, sym_table, rank, world, seq, NUM_TOKENS,
                       MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR,
                       STAGES, PART_COLS)
    if ok:
      item = take_item(sym_table, rank)
  return waited


@triton.jit
def _reduce_part(blk, p, out_ptr, sym_table, rank, world, seq, NUM_TOKENS: tl.constexpr,
                 MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr, ROWS_OFF: tl.constexpr,
                 ROW_MARK_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_HR: tl.constexpr, STAGES: tl.constexpr, PART_COLS: tl.constexpr):
  """``_reduce_block`` over block ``blk``'s column range ``p`` (PART_COLS columns each)."""
  h_lo, h_hi = _col_range(p, PART_COLS, HIDDEN)
  _reduce_block(blk, out_ptr, sym_table, rank, world, seq, NUM_TOKENS, MAX_TOKENS, HIDDEN,
                ROWS_OFF, ROW_MARK_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES, h_lo, h_hi)


@triton.jit
def _col_range(p, COLS: tl.constexpr, HIDDEN: tl.constexpr):
  """Columns [lo, hi) of range ``p`` of COLS columns each (the last one ends at HIDDEN)."""
  lo = p * COLS
  return lo, tl.minimum(lo + COLS, HIDDEN)


@triton.jit
def _reduce_block(blk, out_ptr, sym_table, rank, world, seq, NUM_TOKENS: tl.constexpr,
                  MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr, ROWS_OFF: tl.constexpr,
                  ROW_MARK_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_HR: tl.constexpr, STAGES: tl.constexpr, h_lo=0, h_hi=None):
  """out[t] for the tokens of block ``blk``: the ranks' partial rows with ROW_MARK = seq;
  columns ``h_lo`` to ``h_hi`` (default: all)."""
  dtype = out_ptr.dtype.element_ty
  A: tl.constexpr = row_align(HIDDEN, dtype)
  rows = sym_ptr(sym_table, rank, ROWS_OFF, dtype)
  marks = sym_ptr(sym_table, rank, ROW_MARK_OFF, tl.int32)
  h = tl.arange(0, BLOCK_HR)
  t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
  tmask = t < NUM_TOKENS
  gs = ()  # one [BLOCK_T] vector of marks per rank: no reduction over a [W_P, BLOCK_T] tile
  for rr in tl.static_range(W_P):
    # rank rr as a [BLOCK_T] vector: the interpreter of Triton 3.9 refuses a scalar mask term
    mr = tmask & (tl.zeros_like(t) + rr < world)
    gs = gs + (mr & (tl.load(marks + rr * MAX_TOKENS + t, mask=mr, other=0,
                             cache_modifier=".cg") == seq),)
  if h_hi is None:
    h_hi = HIDDEN
  for h0 in tl.range(h_lo, h_hi, BLOCK_HR, num_stages=STAGES):
    cols = h0 + h
    hmask = cols < h_hi
    acc = tl.zeros([BLOCK_T, BLOCK_HR], tl.float32)
    for rr in tl.static_range(W_P):  # static: the ranks' rows of a chunk load together
      g = gs[rr]
      v = tl.load(tl.multiple_of(rows + (rr * MAX_TOKENS + t)[:, None].to(tl.int64) * HIDDEN
                                 + cols[None, :], [A, A]),
                  mask=g[:, None] & hmask[None, :], other=0.0, cache_modifier=".cg")
      acc += v.to(tl.float32)
    tl.store(out_ptr + t[:, None].to(tl.int64) * HIDDEN + cols[None, :], acc.to(dtype),
             mask=tmask[:, None] & hmask[None, :])


@triton.jit
def combine_kernel(y_ptr, row_weights_ptr, recv_pos_ptr,
                   out_ptr, status_ptr,
                   sym_table, rank, world, epoch, timeout_ns, op, fingerprint,
                   NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, HIDDEN: tl.constexpr,
                   TOPK: tl.constexpr, TOPK_P: tl.constexpr, CAPACITY: tl.constexpr,
                   ROWS_OFF: tl.constexpr, ROW_MARK_OFF: tl.constexpr,
                   BLOCK_FLAG_OFF: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                   W_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_HC: tl.constexpr, BLOCK_HC_ALL: tl.constexpr, BLOCK_HR: tl.constexpr,
                   STAGES: tl.constexpr, J_UNROLL: tl.constexpr, QUEUE: tl.constexpr,
                   SPLIT: tl.constexpr, HEAVY_T: tl.constexpr, BLOCK_HC_H: tl.constexpr,
                   NARROW: tl.constexpr, BLOCK_HC2: tl.constexpr, PREFETCH: tl.constexpr,
                   PARTS: tl.constexpr, PART_COLS: tl.constexpr, HALVES: tl.constexpr,
                   BLOCK_HC_HV: tl.constexpr, PUSH_PARTS: tl.constexpr, PUSH_COLS: tl.constexpr,
                   USE_TIMER: tl.constexpr, PHASE: tl.constexpr, PROFILE: tl.constexpr):
  """The combine op.

  Inputs: y ``[C, H]``, row_weights ``[C] f32``, recv_pos ``[W, T, K] int32``.
  Outputs: out ``[T, H]`` (y's dtype), status ``[1 + NUM_PROGRAMS] int32`` (0, or the code of
    a failed wait / check: slot 0 the leader's barrier, 1 + pid the others).
  Scalars: timeout_ns (i64), op (i32), fingerprint (i32; see dispatch_kernel).
  PARTS, PART_COLS: QUEUE = 3's column ranges per block (``EPPlan.combine_reduce_parts``), 1
    and all columns otherwise.
  PUSH_PARTS, PUSH_COLS: column ranges per push item and reduce block, each with its own DONE
    flags (``EPPlan.combine_push_parts``: few tokens; 1 and all columns otherwise).
  HALVES, BLOCK_HC_HV: the push's two half-tile path and its chunk (``EPPlan.combine_halves``).
  PHASE: 0 = everything (GPU; all NUM_PROGRAMS programs resident together). The interpreter
    launches 2 and 3 (leader: announce; wait + GO; grid 1), 4 (push) and 5 (reduce), each over
    every rank before the next.
  """
  pid = tl.program_id(0)
  prof_mark(sym_table, rank, pid, P_START, PROFILE)
  if leader_turn(pid, PHASE):
    if QUEUE and (PHASE == 0 or PHASE == 2):  # this op's DONE flags (and claims) start from 0
      num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
      n_zero = world * num_blocks * PUSH_PARTS
      if QUEUE == 3:
        n_zero += num_blocks * PARTS
      zero_own(sym_table, rank, BLOCK_FLAG_OFF, 1, 0, n_zero, 1024)
    leader_barrier(sym_table, rank, world, epoch, fingerprint, timeout_ns, status_ptr, op,
                   USE_TIMER, W_P, PHASE, ROW_MARK_OFF, MAX_TOKENS, NUM_TOKENS)
  st = status_ptr + 1 + pid
  if PHASE == 0 or PHASE >= 4:
    if PHASE != 5:  # phase 5 continues phase 4's programs: keep their status
      tl.store(st, 0)
    # One wait for GO per launch (in the interpreter phases 4 and 5 are separate launches).
    seq = wait_go(sym_table, rank, epoch, timeout_ns, st, op, USE_TIMER)
    if PHASE != 5:  # push
      prof_mark(sym_table, rank, pid, P_GO, PROFILE)
      if seq > 0:
        between = _combine_push(
            pid, NUM_PROGRAMS, y_ptr, row_weights_ptr, recv_pos_ptr, out_ptr, sym_table, rank,
            world, seq, NUM_TOKENS, MAX_TOKENS, HIDDEN, TOPK, TOPK_P, CAPACITY, ROWS_OFF,
            ROW_MARK_OFF, BLOCK_FLAG_OFF, BLOCK_T, BLOCK_HC, BLOCK_HC_ALL, STAGES, J_UNROLL,
            QUEUE, SPLIT, HEAVY_T, BLOCK_HC_H, NARROW, BLOCK_HC2, PREFETCH, W_P, BLOCK_HR,
            PARTS, PART_COLS, HALVES, BLOCK_HC_HV, PUSH_PARTS, PUSH_COLS, PROFILE)
        if QUEUE == 3:  # slot 3: the ns this program spent reducing between its pushes
          prof_span(sym_table, rank, pid, P_SELF, between, PROFILE)
      prof_mark(sym_table, rank, pid, P_PUSH, PROFILE)
    if PHASE != 4:  # reduce
      if seq > 0:
        if QUEUE:  # blocks from the queue as every rank finishes them
          waited = _reduce_queue(out_ptr, st, sym_table, rank, world, seq, timeout_ns, op,
                                 NUM_TOKENS, MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF,
                                 BLOCK_FLAG_OFF, W_P, BLOCK_T, BLOCK_HR, STAGES, QUEUE,
                                 PARTS, PART_COLS, PUSH_PARTS, PUSH_COLS, USE_TIMER, PROFILE)
          prof_span(sym_table, rank, pid, P_ARRIVED, waited, PROFILE)
        else:  # fixed blocks, after every program of every rank pushed
          ok = wait_all_arrivals(sym_table, rank, world, NUM_PROGRAMS, seq, timeout_ns, st, op,
                                 USE_TIMER, BLOCK_P)
          prof_mark(sym_table, rank, pid, P_ARRIVED, PROFILE)
          if ok:
            _combine_reduce(pid, NUM_PROGRAMS, out_ptr, sym_table, rank, world, seq,
                            NUM_TOKENS, MAX_TOKENS, HIDDEN, ROWS_OFF, ROW_MARK_OFF, W_P,
                            BLOCK_T, BLOCK_HR, STAGES, PUSH_PARTS, PUSH_COLS)
      prof_mark(sym_table, rank, pid, P_END, PROFILE)


@triton.jit
def gather_kernel(values_ptr, recv_pos_ptr, topk_idx_ptr,
                  out_ptr, status_ptr,
                  sym_table, rank, world, epoch, timeout_ns, op, fingerprint,
                  NUM_TOKENS: tl.constexpr, MAX_TOKENS: tl.constexpr, TOPK: tl.constexpr,
                  TOPK_P: tl.constexpr, E_LOCAL: tl.constexpr, CAPACITY: tl.constexpr,
                  SLOT_VAL_OFF: tl.constexpr,
                  NUM_PROGRAMS: tl.constexpr, W_P: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_T: tl.constexpr, USE_TIMER: tl.constexpr, PHASE: tl.constexpr,
                  PROFILE: tl.constexpr):
  """The gather_slots op (weight gradients): ``out [T, K] f32`` = values[row(t, k)] from the
  rank of slot (t, k)'s expert, or 0 for slots not delivered.

  Inputs: values ``[C] f32``, recv_pos ``[W, T, K] int32``, topk_idx ``[T, K] int32``.
  Outputs: out ``[T, K] f32``, status ``[1 + NUM_PROGRAMS] int32``. PHASE as in combine.
  """
  pid = tl.program_id(0)
  if leader_turn(pid, PHASE):
    leader_barrier(sym_table, rank, world, epoch, fingerprint, timeout_ns, status_ptr, op,
                   USE_TIMER, W_P, PHASE)
  st = status_ptr + 1 + pid
  num_blocks: tl.constexpr = (NUM_TOKENS + BLOCK_T - 1) // BLOCK_T
  k = tl.arange(0, TOPK_P)
  if PHASE == 0 or PHASE >= 4:
    if PHASE != 5:  # phase 5 continues phase 4's programs: keep their status
      tl.store(st, 0)
    seq = wait_go(sym_table, rank, epoch, timeout_ns, st, op, USE_TIMER)
    if PHASE != 5:  # push
      if seq > 0:
        for item in range(pid, world * num_blocks, NUM_PROGRAMS):
          s = item // num_blocks
          blk = item % num_blocks
          t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
          smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
          pos = tl.load(recv_pos_ptr + (s * NUM_TOKENS + t)[:, None] * TOPK + k[None, :],
                        mask=smask, other=-1)
          v = tl.load(values_ptr + pos, mask=(pos >= 0) & (pos < CAPACITY), other=0.0)
          dst = sym_ptr(sym_table, s, SLOT_VAL_OFF, tl.float32)
          tl.store(dst + (rank * MAX_TOKENS + t)[:, None] * TOPK + k[None, :], v, mask=smask)
        signal_peers(sym_table, rank, world, pid, seq)
    if PHASE != 4:  # reduce
      if seq > 0:
        ok = wait_all_arrivals(sym_table, rank, world, NUM_PROGRAMS, seq, timeout_ns, st, op,
                               USE_TIMER, BLOCK_P)
        if ok:
          vals = sym_ptr(sym_table, rank, SLOT_VAL_OFF, tl.float32)
          for blk in range(pid, num_blocks, NUM_PROGRAMS):
            t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
            smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
            sl = t[:, None] * TOPK + k[None, :]
            g = tl.load(topk_idx_ptr + sl, mask=smask, other=-1)
            dest = tl.where(g >= 0, g // E_LOCAL, 0)
            v = tl.load(vals + (dest * MAX_TOKENS + t[:, None]) * TOPK + k[None, :], mask=g >= 0,
                        other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + sl, tl.where(g >= 0, v, 0.0), mask=smask)
