"""Layout (preprocess) of dispatch: deterministic destination rows, no atomics deciding them.

Contract (the xla backend's): rank r receives the entries (s, t, k) with
``topk_idx_s[t, k] // E_local == r`` in (source rank s, token t, slot k) order; entry j of local
expert e lands in row ``offset[e] + j`` where ``offset`` is the exclusive prefix sum of the
expert counts, each rounded up to ``expert_alignment``; rows >= C are dropped.

Split into ``pos(s, t, k) = sender_base_s[g] + block_prefix_s[b, g] + in_block_rank(t, k)``
(g = topk_idx_s[t, k], b = t // BLOCK_T):
  * ``sender_base_s[g] = offset_{g // E_local}[g % E_local] + sum_{s' < s} count_{s'}[g]``
    needs every rank's expert histogram: the exchange.
  * ``block_prefix_s[b, g]`` = entries for g in earlier token blocks of rank s (a scan).
  * ``in_block_rank`` = entries for g earlier in the same block (computed by the senders of
    ``kernels/dispatch.py`` from a [N, N] comparison, N = BLOCK_T x K).

These run inside ``dispatch_kernel`` (one launch per op), spread over all its programs so the
only serial part left before GO is the count exchange:
  ``hist_blocks``   every program: ``hist[b, g]`` for its token blocks, then HIST_FLAG[pid].
      Traffic: reads T x K int32, writes NB x E int32.
  ``scan_columns``  every program, once all histograms are in: for its COLS expert columns,
      ``base[b, g] = block_prefix[b, g]`` (exclusive scan over b) and the column total
      ``base[NB, g] = count[g]``, then COL_FLAG[pid]. This overlaps the wait for the peers
      (the scan used to run on the leader alone, after the exchange: ~50 us at T = 4096,
      E = 256 on H200).
      Traffic: reads and writes NB x E int32 in all, NB x COLS per program.
  ``leader_layout`` program 0: waits for every program's column flag, reads the counts, writes
      them into every peer's COUNTS[seq % 2, me] and announces seq (the op's start barrier);
      waits for all peers and compares their fingerprints; derives this rank's group_sizes /
      group_offsets / num_recv_rows / num_dropped and ``base[NB + 2, g] = sender_base[g]``
      (E values); then GO. A sender adds ``base[NB + 2, g] + base[b, g]``.
      Traffic: W x E int32 read, E written to each peer.
``base`` is ``[NB + 3, E]``: NB block prefixes, the counts, a scratch row, sender_base.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import ep_sync
from .ep_sync import _COL_FLAG, _ERR_OFF, _HIST_FLAG_OFF, _SEQ_OFF, sym_ptr


@triton.jit
def hist_blocks(pid, num_programs, topk_idx_ptr, hist_ptr, sym_table, rank, epoch,
                NUM_TOKENS: tl.constexpr, NUM_BLOCKS: tl.constexpr, TOPK: tl.constexpr,
                TOPK_P: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_P: tl.constexpr,
                BLOCK_T: tl.constexpr, PROFILE: tl.constexpr):
  """``hist[b, g]`` = slots of tokens [b*BLOCK_T, (b+1)*BLOCK_T) choosing global expert g, for
  b = pid, pid + num_programs, ...; then HIST_FLAG[pid] = epoch (release, GPU scope)."""
  k = tl.arange(0, TOPK_P)
  e = tl.arange(0, E_P)
  for b in range(pid, NUM_BLOCKS, num_programs):
    t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
    g = tl.load(topk_idx_ptr + t[:, None] * TOPK + k[None, :], mask=smask, other=-1)
    g = tl.reshape(g, [BLOCK_T * TOPK_P])
    h = tl.histogram(tl.maximum(g, 0), E_P, mask=g >= 0)
    tl.store(hist_ptr + b * NUM_EXPERTS + e, h.to(tl.int32), mask=e < NUM_EXPERTS)
  tl.debug_barrier()
  tl.atomic_xchg(sym_ptr(sym_table, rank, _HIST_FLAG_OFF, tl.int64) + pid, epoch,
                 sem="release", scope="gpu")
  ep_sync.prof_mark(sym_table, rank, pid, ep_sync.P_HIST, PROFILE)


@triton.jit
def scan_columns(pid, num_programs, hist_ptr, base_ptr, status_ptr, sym_table, rank, epoch,
                 timeout_ns, op, NUM_BLOCKS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                 COLS: tl.constexpr, BLOCK_BC: tl.constexpr, BLOCK_PROG: tl.constexpr,
                 USE_TIMER: tl.constexpr):
  """Program ``pid``, after every program's histograms (HIST_FLAG, GPU scope): for the expert
  columns g in [pid * COLS, (pid + 1) * COLS), ``base[b, g]`` = entries for g in blocks before
  b and ``base[NB, g]`` = all entries for g; then COL_FLAG[pid] = epoch (release, GPU scope).
  A timed-out wait (a program of this launch never ran) leaves the flag unset: the leader's
  wait for it then fails the op."""
  flags = sym_ptr(sym_table, rank, _HIST_FLAG_OFF, tl.int64)
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
  ok = ep_sync.wait_flags(flags, num_programs, epoch, timeout_ns, err, status_ptr + 1 + pid,
                          op + 16, rank, -1, seq, USE_TIMER, BLOCK_PROG, "gpu")
  if ok:
    c = pid * COLS + tl.arange(0, COLS)
    cmask = c < NUM_EXPERTS
    bb = tl.arange(0, BLOCK_BC)
    running = tl.zeros([COLS], tl.int32)
    for b0 in range(0, NUM_BLOCKS, BLOCK_BC):
      m = ((b0 + bb) < NUM_BLOCKS)[:, None] & cmask[None, :]
      at = (b0 + bb)[:, None] * NUM_EXPERTS + c[None, :]
      tile = tl.load(hist_ptr + at, mask=m, other=0, cache_modifier=".cg")
      tl.store(base_ptr + at, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=m)
      running += tl.sum(tile, axis=0)
    tl.store(base_ptr + NUM_BLOCKS * NUM_EXPERTS + c, running, mask=cmask)
    tl.debug_barrier()
    tl.atomic_xchg(flags + _COL_FLAG + pid, epoch, sem="release", scope="gpu")


@triton.jit
def leader_layout(base_ptr, group_sizes_ptr, group_offsets_ptr, num_recv_ptr,
                  num_dropped_ptr, status_ptr, sym_table, rank, world, epoch, timeout_ns, op,
                  fingerprint, num_programs,
                  NUM_BLOCKS: tl.constexpr, NUM_EXPERTS: tl.constexpr, E_P: tl.constexpr,
                  E_LOCAL: tl.constexpr, EL_P: tl.constexpr, CAPACITY: tl.constexpr,
                  ALIGNMENT: tl.constexpr, COUNTS_OFF: tl.constexpr,
                  BLOCK_FLAG_OFF: tl.constexpr, MAX_TOKENS: tl.constexpr, W_P: tl.constexpr,
                  BLOCK_PROG: tl.constexpr, USE_TIMER: tl.constexpr,
                  PHASE: tl.constexpr, PROFILE: tl.constexpr):
  """The count exchange, the start barrier and the senders' bases (program 0 only).

  Args:
    base_ptr: ``[NB + 3, E] int32``: rows [0, NB) and NB (the counts) from ``scan_columns``;
      row NB + 1 is scratch; out: row NB + 2, ``sender_base[g]``, the row of recv_x on rank
      g // E_local for this rank's first entry choosing expert g.
    group_sizes_ptr, group_offsets_ptr: ``[E_local] int32`` out; num_recv_ptr, num_dropped_ptr:
      ``[1] int32`` out: this rank's receive layout (as in the xla backend).
    status_ptr: ``[1] int32`` out: 0, or the code of a timed-out wait.
  PHASE 0 (GPU) runs everything; the interpreter runs PHASE 2 (send counts, announce) on
  every rank and then PHASE 3 (wait, derive, GO).
  """
  e = tl.arange(0, E_P)
  emask = e < NUM_EXPERTS
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
  slot_bytes = (seq % 2).to(tl.int64) * (4 * world * NUM_EXPERTS)
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  counts_row = base_ptr + NUM_BLOCKS * NUM_EXPERTS
  scratch = counts_row + NUM_EXPERTS
  if PHASE == 0 or PHASE == 2:
    tl.store(status_ptr, 0)
    # 1. Every program scanned its columns (local flags, GPU scope): the counts are in.
    ep_sync.wait_flags(sym_ptr(sym_table, rank, _HIST_FLAG_OFF, tl.int64) + _COL_FLAG,
                       num_programs, epoch, timeout_ns, err, status_ptr, op + 16, rank, -1, seq,
                       USE_TIMER, BLOCK_PROG, "gpu")
    counts = tl.load(counts_row + e, mask=emask, other=0, cache_modifier=".cg")
    # 2. This op's block flags start from 0 (the area may hold another config's bytes; peers
    #    write them only after our announce). Then counts into every peer's
    #    COUNTS[seq % 2, rank], then announce seq.
    ep_sync.zero_own(sym_table, rank, BLOCK_FLAG_OFF, world, MAX_TOKENS, NUM_BLOCKS, 1024)
    for r in range(world):
      dst = sym_ptr(sym_table, r, COUNTS_OFF + slot_bytes, tl.int32) + rank * NUM_EXPERTS
      tl.store(dst + e, counts, mask=emask)
    ep_sync.leader_announce(sym_table, rank, world, fingerprint)
  if PHASE == 0 or PHASE == 3:
    abort = ep_sync.leader_wait(sym_table, rank, world, seq, fingerprint, timeout_ns, status_ptr,
                                op, USE_TIMER, W_P)
    ep_sync.prof_mark(sym_table, rank, 0, ep_sync.P_LEADER, PROFILE)
    # 3. The [W, E] counts matrix (written by peers: bypass L1).
    s = tl.arange(0, W_P)
    src = sym_ptr(sym_table, rank, COUNTS_OFF + slot_bytes, tl.int32)
    mat = tl.load(src + s[:, None] * NUM_EXPERTS + e[None, :],
                  mask=(s < world)[:, None] & emask[None, :], other=0, cache_modifier=".cg")
    total = tl.sum(mat, axis=0)                                           # [E_P]
    before_me = tl.sum(tl.where((s < rank)[:, None], mat, 0), axis=0)     # [E_P]
    # Aligned exclusive prefix within each destination rank's block of E_local experts:
    # offset[e+1] = align_up(offset[e] + count[e]) = offset[e] + align_up(count[e]).
    aligned = (total + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    csum = tl.cumsum(aligned, axis=0) - aligned                           # exclusive, global
    # Subtract the prefix at the start of each rank's block (through memory: no register
    # gather in Triton; base row NB + 1 is the scratch).
    tl.store(scratch + e, csum, mask=emask)
    tl.debug_barrier()
    block_start = tl.load(scratch + (e // E_LOCAL) * E_LOCAL, mask=emask, other=0)
    tl.debug_barrier()
    offset = csum - block_start                                           # offset on g's rank
    sender_base = offset + before_me
    # 4. This rank's receive layout.
    el = tl.arange(0, EL_P)
    elmask = el < E_LOCAL
    my_g = rank * E_LOCAL + el
    tl.store(scratch + e, offset, mask=emask)
    tl.debug_barrier()
    my_off = tl.load(scratch + my_g, mask=elmask, other=0)
    tl.debug_barrier()
    tl.store(scratch + e, total, mask=emask)
    tl.debug_barrier()
    my_cnt = tl.load(scratch + my_g, mask=elmask, other=0)
    tl.debug_barrier()
    sizes = tl.minimum(tl.maximum(CAPACITY - my_off, 0), my_cnt)
    tl.store(group_sizes_ptr + el, sizes, mask=elmask)
    tl.store(group_offsets_ptr + el, tl.minimum(my_off, CAPACITY), mask=elmask)
    kept = tl.sum(tl.where(elmask, sizes, 0), axis=0)
    tl.store(num_recv_ptr, kept)
    tl.store(num_dropped_ptr, tl.sum(tl.where(elmask, my_cnt, 0), axis=0) - kept)
    # 5. The senders' bases (a sender adds its block prefix, base[b, g]).
    tl.store(scratch + NUM_EXPERTS + e, sender_base, mask=emask)
    tl.debug_barrier()
    # 6. The layout is out: let the launch's senders and receivers go (or skip the op).
    ep_sync.leader_go(sym_table, rank, seq, epoch, abort)
