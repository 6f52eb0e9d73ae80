"""Layout (preprocess) kernels of dispatch: deterministic destination rows, no atomics.

Contract (the xla backend's): rank r receives the entries (s, t, k) with
``topk_idx_s[t, k] // E_local == r`` in (source rank s, token t, slot k) order; entry j of local
expert e lands in row ``offset[e] + j`` where ``offset`` is the exclusive prefix sum of the
expert counts, each rounded up to ``expert_alignment``; rows >= C are dropped.

Split into ``pos(s, t, k) = sender_base_s[g] + block_prefix_s[b, g] + in_block_rank(t, k)``
(g = topk_idx_s[t, k], b = t // BLOCK_T):
  * ``sender_base_s[g] = offset_{g // E_local}[g % E_local] + sum_{s' < s} count_{s'}[g]``
    needs every rank's expert histogram: the exchange.
  * ``block_prefix_s[b, g]`` = entries for g in earlier token blocks of rank s (a scan).
  * ``in_block_rank`` = entries for g earlier in the same block (computed by the push kernel,
    ``kernels/dispatch.py``, from a [N, N] comparison, N = BLOCK_T x K).

Kernels:
  layout_histogram_kernel  grid (NB,):  hist[b, g] over each block of BLOCK_T tokens.
      Traffic: reads T x K int32, writes NB x E int32.
  layout_exchange_kernel   grid (1,):   sums hist -> my counts [E]; writes them into every
      peer's COUNTS[seq % 2, me] and announces seq (this is the op's start barrier); waits for
      all peers; derives this rank's group_sizes / group_offsets / num_recv_rows / num_dropped
      and ``base[b, g] = sender_base[g] + block_prefix[b, g]``.
      Traffic: reads NB x E (twice) + W x E int32, writes NB x E int32, W x E int32 to peers.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import ep_sync
from .ep_sync import _SEQ_OFF, OP_LAYOUT_C, sym_ptr


@triton.jit
def layout_histogram_kernel(topk_idx_ptr, hist_ptr,
                            NUM_TOKENS: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                            NUM_EXPERTS: tl.constexpr, E_P: tl.constexpr,
                            BLOCK_T: tl.constexpr):
  """``hist[b, g]`` = slots of tokens [b*BLOCK_T, (b+1)*BLOCK_T) choosing global expert g.

  Args:
    topk_idx_ptr: ``[T, K] int32`` sanitized expert ids (-1 = unselected).
    hist_ptr: ``[NB, E] int32`` output, NB = cdiv(T, BLOCK_T).
  """
  b = tl.program_id(0)
  t = b * BLOCK_T + tl.arange(0, BLOCK_T)
  k = tl.arange(0, TOPK_P)
  smask = (t < NUM_TOKENS)[:, None] & (k < TOPK)[None, :]
  g = tl.load(topk_idx_ptr + t[:, None] * TOPK + k[None, :], mask=smask, other=-1)
  g = tl.reshape(g, [BLOCK_T * TOPK_P])
  h = tl.histogram(tl.maximum(g, 0), E_P, mask=g >= 0)
  e = tl.arange(0, E_P)
  tl.store(hist_ptr + b * NUM_EXPERTS + e, h.to(tl.int32), mask=e < NUM_EXPERTS)


@triton.jit
def layout_exchange_kernel(hist_ptr, token_in_ptr,
                           base_ptr, group_sizes_ptr, group_offsets_ptr, num_recv_ptr,
                           num_dropped_ptr, status_ptr,
                           sym_table, rank, world, epoch, timeout_ns,
                           NUM_BLOCKS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                           E_P: tl.constexpr, E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
                           CAPACITY: tl.constexpr, ALIGNMENT: tl.constexpr,
                           COUNTS_OFF: tl.constexpr, W_P: tl.constexpr, BLOCK_B: tl.constexpr,
                           USE_TIMER: tl.constexpr, ANNOUNCE: tl.constexpr = True,
                           FINISH: tl.constexpr = True):
  """The count exchange and every position base (one CTA; grid (1,)).

  Inputs:
    hist_ptr: ``[NB, E] int32`` from ``layout_histogram_kernel``.
    token_in_ptr: any array from the previous jax_ep op (not read): orders this launch after it.
  Outputs:
    base_ptr: ``[NB, E] int32``; row of recv_x on rank g // E_local for the first entry of
      block b choosing expert g (before the in-block rank is added).
    group_sizes_ptr, group_offsets_ptr: ``[E_local] int32``; num_recv_ptr, num_dropped_ptr:
      ``[1] int32``: this rank's receive layout (as in the xla backend).
    status_ptr: ``[1] int32``; 0, or the op code when a peer's counts did not arrive in time.
  ANNOUNCE / FINISH: run the first half (send counts, announce) / the second half (wait, derive
  positions). The GPU runs both in one launch; the CPU interpreter, which runs simulated ranks
  one after another, launches the halves separately so no rank waits for a later one.
  """
  e = tl.arange(0, E_P)
  emask = e < NUM_EXPERTS
  bb = tl.arange(0, BLOCK_B)
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
  slot_bytes = (seq % 2).to(tl.int64) * (4 * world * NUM_EXPERTS)
  if ANNOUNCE:
    tl.store(status_ptr, 0)
    # 1. This rank's histogram over global experts.
    counts = tl.zeros([E_P], tl.int32)
    for b0 in range(0, NUM_BLOCKS, BLOCK_B):
      m = ((b0 + bb) < NUM_BLOCKS)[:, None] & emask[None, :]
      tile = tl.load(hist_ptr + (b0 + bb)[:, None] * NUM_EXPERTS + e[None, :], mask=m, other=0)
      counts += tl.sum(tile, axis=0)
    # 2. Exchange: counts into every peer's COUNTS[seq % 2, rank], then announce seq.
    for r in range(world):
      dst = sym_ptr(sym_table, r, COUNTS_OFF + slot_bytes, tl.int32) + rank * NUM_EXPERTS
      tl.store(dst + e, counts, mask=emask)
    ep_sync.announce_start(sym_table, rank, world)
  if FINISH:
    _layout_finish(hist_ptr, base_ptr, group_sizes_ptr, group_offsets_ptr, num_recv_ptr,
                   num_dropped_ptr, status_ptr, sym_table, rank, world, timeout_ns, seq,
                   slot_bytes, NUM_BLOCKS, NUM_EXPERTS, E_P, E_LOCAL, EL_P, CAPACITY,
                   ALIGNMENT, COUNTS_OFF, W_P, BLOCK_B, USE_TIMER)


@triton.jit
def _layout_finish(hist_ptr, base_ptr, group_sizes_ptr, group_offsets_ptr, num_recv_ptr,
                   num_dropped_ptr, status_ptr, sym_table, rank, world, timeout_ns, seq,
                   slot_bytes, NUM_BLOCKS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                   E_P: tl.constexpr, E_LOCAL: tl.constexpr, EL_P: tl.constexpr,
                   CAPACITY: tl.constexpr, ALIGNMENT: tl.constexpr, COUNTS_OFF: tl.constexpr,
                   W_P: tl.constexpr, BLOCK_B: tl.constexpr, USE_TIMER: tl.constexpr):
  e = tl.arange(0, E_P)
  emask = e < NUM_EXPERTS
  bb = tl.arange(0, BLOCK_B)
  ep_sync.wait_start(sym_table, rank, world, seq, timeout_ns, status_ptr, OP_LAYOUT_C,
                     USE_TIMER, W_P)
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
  # Subtract the prefix at the start of each rank's block (through memory: no register gather).
  tl.store(base_ptr + e, csum, mask=emask)
  tl.debug_barrier()
  block_start = tl.load(base_ptr + (e // E_LOCAL) * E_LOCAL, mask=emask, other=0)
  tl.debug_barrier()
  offset = csum - block_start                                           # offset on g's rank
  sender_base = offset + before_me
  # 4. This rank's receive layout.
  el = tl.arange(0, EL_P)
  elmask = el < E_LOCAL
  my_g = rank * E_LOCAL + el
  # Gather offset/total of my experts: store the vectors and reload (no register gather).
  tl.store(base_ptr + e, offset, mask=emask)
  tl.debug_barrier()
  my_off = tl.load(base_ptr + my_g, mask=elmask, other=0)
  tl.debug_barrier()
  tl.store(base_ptr + e, total, mask=emask)
  tl.debug_barrier()
  my_cnt = tl.load(base_ptr + my_g, mask=elmask, other=0)
  tl.debug_barrier()
  sizes = tl.minimum(tl.maximum(CAPACITY - my_off, 0), my_cnt)
  tl.store(group_sizes_ptr + el, sizes, mask=elmask)
  tl.store(group_offsets_ptr + el, tl.minimum(my_off, CAPACITY), mask=elmask)
  kept = tl.sum(tl.where(elmask, sizes, 0), axis=0)
  tl.store(num_recv_ptr, kept)
  tl.store(num_dropped_ptr, tl.sum(tl.where(elmask, my_cnt, 0), axis=0) - kept)
  # 5. base[b, g] = sender_base[g] + entries for g in blocks before b (exclusive scan).
  running = sender_base
  for b0 in range(0, NUM_BLOCKS, BLOCK_B):
    m = ((b0 + bb) < NUM_BLOCKS)[:, None] & emask[None, :]
    tile = tl.load(hist_ptr + (b0 + bb)[:, None] * NUM_EXPERTS + e[None, :], mask=m, other=0)
    incl = tl.cumsum(tile, axis=0)
    tl.store(base_ptr + (b0 + bb)[:, None] * NUM_EXPERTS + e[None, :],
             running[None, :] + incl - tile, mask=m)
    running += tl.sum(tile, axis=0)
