"""Launch plan of the intra-node EP kernels: grids, block sizes and constexprs for one shape.

Framework-agnostic (plain ints): the JAX triton backend and the CPU interpreter tests both build
their launches from ``EPPlan``, so what the tests check is what the GPU runs.
"""
from __future__ import annotations

import dataclasses

from .ep_sync import RegionSpec, next_pow2

MAX_RESIDENT = 128
ROWS_WARPS = 16            # warps of the row-moving kernels (one program per SM)
TILE_BYTES = 32 * 1024     # dispatch: bytes of one row tile (loaded once, stored up to K times)
ACC_BYTES = 64 * 1024      # combine: register budget of its row tiles plus the f32 accumulator
SMEM_BYTES = 200 * 1024    # shared memory the pipelined row loops may take (sm_90: 227 KB)
REDUCE_MAX_BYTES = 128 * 1024  # combine's reduce: register budget when widened to 16-byte vectors


def _pow2_floor(n: int, lo: int, hi: int) -> int:
  """The largest power of two <= n, clamped to [lo, hi] (hi itself a power of two)."""
  n = max(n, 1)
  return max(lo, min(1 << (n.bit_length() - 1), hi)) if hi >= lo else hi


def column_ranges(chunks: int, items: int, programs: int, asked: int = 0,
                  most: int | None = None) -> int:
  """Column ranges per work item (dispatch's expansion items, combine's push items) of
  ``chunks`` row chunks: ``asked`` where set (1: whole rows), else 1 where the ``items``
  cover the launch's ``programs``, and otherwise as many as cover them; at most one per chunk
  (and at most ``most``), and as few as leave no range empty."""
  if asked:
    parts = asked
  elif items == 0 or items >= programs:
    return 1
  else:
    parts = -(-programs // items)
  parts = max(1, min(parts, chunks, chunks if most is None else most))
  return -(-chunks // -(-chunks // parts))


def interpreter_phases(kernel: str, num_senders: int, num_receivers: int, num_programs: int,
                       receiver_blocks: int, kernel_blocks: int,
                       pull: int = 0) -> list[tuple[int, int]]:
  """(PHASE, grid) launches that replace one GPU launch of ``kernel`` in the CPU interpreter
  (``EPPlan.interpreter_phases``; also from a launch's constexprs alone, in the tests).
  Dispatch with pull 3 or 4 ends with phase 8: the leader's wait for every peer's programs."""
  ns, nr, npg = num_senders, num_receivers, num_programs
  tail = [(6, ns)] if receiver_blocks < kernel_blocks else []
  tail += [(8, 1)] if pull >= 3 else []
  if kernel == "dispatch_kernel":
    return [(1, ns + nr), (7, ns + nr), (2, 1), (3, 1), (4, ns), (5, nr)] + tail
  if kernel == "dispatch_rows_kernel":
    return [(2, 1), (3, 1), (4, ns), (5, nr)] + tail
  return [(2, 1), (3, 1), (4, npg), (5, npg)]


@dataclasses.dataclass(frozen=True)
class EPPlan:
  """Static launch parameters of dispatch / combine for one (config, world, T, dtype).

  Args:
    world: W. num_tokens: T (this call). max_tokens: T_max (staging rows per source).
    hidden: H. topk: K. num_experts: E. capacity: C. alignment: expert_alignment.
    num_sms: upper bound on the programs of the row-moving kernels.
    row_itemsize: bytes per staged element the region was sized for.
    use_timer: read %globaltimer for timeouts (False in the interpreter).
    itemsize: bytes per element of the rows this op moves (sizes the row tiles).
    profile: compile the kernels with PROFILE=1 (phase timestamps; ``ep_sync.PROF_*``).
    sender_fraction: share of a dispatch launch's programs that push (the rest expand).
      0.375 (12 of 32) by default: with expand order 3, dispatch 0.787 / 0.826 / 0.802 ms vs
      0.808 / 0.852 / 0.856 ms at 0.4375 in three runs (4x H200, DeepSeek-V3 shape,
      2026-11-21 19:35, 19:46, 19:55), 0.830 ms at 0.5 (19:35); 0.4375 had beaten 0.5 and
      0.625 at 18:46.
    expand_order: dispatch receivers' block order: 0 = this rank's blocks first, then the
      others' (block-major); 1 = block-major over every source; 2 = a work queue shared by
      receivers and senders, own blocks first (``receiver_share`` is then not used); 3 = the
      same queue, block-major over every source (own first in a block). 3 by default since
      2026-11-21 18:46: 0.928 ms vs 0.985 ms for order 2 in the same run (4x H200,
      DeepSeek-V3 shape, 32 SMs; with order 2 the receivers waited ~200 us for this rank's
      own later blocks while the peers' earlier ones queued behind them). Order 2 beat 0 and
      1 on 2026-11-21 14:25 (1.068 ms vs 1.165 ms for order 0 at share 0.6).
    receiver_share: with orders 0 and 1, the share of the token blocks the receivers expand
      (the first ones); the senders expand the rest after their push (1.0: receivers expand
      everything). 0.6 was the fastest static share (dispatch 1.38 ms vs 1.73 ms at 1.0,
      12:45, per-call timing).
    dispatch_stages, combine_stages: software-pipeline depth of the row-chunk loops (Triton
      ``num_stages``: STAGES - 1 chunks loaded ahead into shared memory, one row tile each);
      combine's is lowered to what fits in SMEM_BYTES (``combine_pipeline``). Dispatch 4 vs 3
      (pull, zero queue; 4x H200, DeepSeek-V3 shape, 2026-11-22, same runs): 0.692 / 0.694 vs
      0.705 / 0.709 ms (08:17), 0.680 / 0.651 / 0.705 vs 0.700 / 0.670 / 0.688 ms (08:34).
    expand_levels: dispatch expansion's stores: 0 = one masked store per slot (K a chunk), L > 0
      = by level (``_expand_block``); opt-in: measured no faster (L = 2 / 4: 1.200 / 1.056 ms
      vs 1.069 ms by slot, 4x H200, DeepSeek-V3 shape, 2026-11-21 17:58).
    combine_queue: 1 (default) = combine's reducers take token blocks from a work queue as
      soon as every rank has pushed its rows for the block (per-block DONE flags), so a program
      reduces while others still push; 0 = every program reduces its fixed blocks after all
      programs of all ranks finished pushing (the triton backend's choice at W = 2, where it
      measured 5-6 % faster: ``TWO_RANK_COMBINE_QUEUE`` in ``jax_ep/backends/triton.py``);
      2 = the queue with each program's DONE flags raised two items at a time (one
      system-scope release, which waits for the program's remote stores to land, per two
      items instead of per item); opt-in: 0.904 vs 0.947 ms and 0.922 vs 0.897 ms for mode
      1 in two runs (4x H200, 2026-11-21 19:55, 20:00);
      3 = the queue, and a program also reduces blocks between its push items, as soon as
      every rank has pushed them (one look at their DONE flags, no wait): at 4x H200 the
      reduce ran after the pushes, ~120 us of a ~660 us combine (session 19), while the
      pushes are NVLink-bound; the queue after the pushes then takes the blocks left in
      ``combine_reduce_parts`` column ranges each. Opt-in: at 2x H200 (W = 2, where the
      pushes are HBM-bound) 0.515-0.539 vs 0.519 ms, the reduce between pushes (65 us per
      program) lengthening them by as much (2026-11-22 20:10); not yet timed at W = 4.
    combine_wide: 1 (default) = combine's common push path (J_UNROLL levels) takes chunks
      TOPK_P / J_UNROLL times wider than the all-TOPK path's (512 vs 256 columns at top-8), in
      the same shared memory per stage: each chunk iteration costs ~0.2 us beyond its bytes
      (32 KB x 6 chunks: 1.275 ms, 64 KB x 4: 0.916 ms, 2026-11-21 21:31); 0 = one chunk width.
      (Widening the reduce's chunks the same way, 512 vs 256 columns at W = 4, gave nothing:
      0.872 / 0.876 vs 0.873 / 0.849 ms, 4x H200, 2026-11-21 22:43, same run.)
    combine_tokens: tokens per combine item (push) and block (reduce); 0 (default) = max(32,
      128 / K_pow2), 32 at top-8 (16 until session 17; measured at top-8 only, smaller K
      keep the 128 rows a block in narrower chunks). Larger blocks raise one DONE flag (a
      system-scope release, which waits for the program's remote stores) and load one
      position vector per slot column for more tokens, in narrower chunks of the same bytes;
      the sums are the same bits. 4x H200, DeepSeek-V3 shape (2026-11-22, session 17, same
      runs): combine 0.670-0.677 ms with split and 32 tokens vs 0.742 ms with split and 16,
      0.704 ms with 64; at 8x H200 (tile path, no split) 32 tokens took combine from 1.41 to
      1.22 ms (session 15).
    combine_split: 1 (default) = a push item whose tokens mostly have <= J_UNROLL rows here,
      but a few (<= ``combine_heavy_t``) more, runs the J_UNROLL-level path for the others
      and sums the few in a [HEAVY_T, wide] tile over all TOPK levels, instead of running the
      whole block on the all-TOPK path (twice the chunk iterations); 0 = the whole block.
      Uniform top-8 of 256 on 4 ranks: 35 % of 16-token blocks (58 % of 32-token ones) have
      such a token, 1-4 % on 8 ranks (``scripts/kernel_stats.py`` prints the shares). The
      sums are the same bits. 4x H200 (session 17, same runs): 0.670-0.677 vs 0.816 ms
      without it (32-token blocks), 0.742 vs 0.790 ms (16).
    combine_narrow: 1 = a push item whose tokens all have <= 2 rows here runs a 2-level path
      in chunks twice as wide as the J_UNROLL path's (1,024 vs 512 columns at top-8, the same
      bytes a stage): half the chunk iterations. Uniform top-8 of 256 on 8 ranks: a third of
      the 16-token items (none on 4 ranks). The same bits; opt-in: at 4x H200 (session 17)
      0.679 vs 0.670 ms without it; not yet timed at 8 GPUs, where it was meant to help.
    combine_prefetch: 1 = each push item's slot positions are loaded an item ahead
      (``_combine_push``), during the chunk loops of the program's previous item: one
      dependent load round trip (the weights) before its first row load instead of two (~16
      items per program at W = 4). The same bits; opt-in until timed.
    combine_halves: 1 = a combine push item that would take the split or all-TOPK path, but
      whose tokens, ordered by their rows here, have at most J_UNROLL in the second half, runs
      as two [BLOCK_T / 2] tiles in one chunk loop: the first half over all TOPK_P levels, the
      second over J_UNROLL (``_push_halves``). At W = 2 and top-8 every 32-token item holds a
      token of more than 4 rows here (96 % can take halves: ``scripts/kernel_stats.py``), so
      every item ran all 8 levels of [32, 128] tiles, about half of them masked rows (a token
      has ~4 rows per rank); with halves a chunk holds 12 [16, 256] tiles, a quarter fewer
      bytes, 16 bytes a thread, in half the chunk iterations. The same sums: the same bits.
      The triton backend's default at W = 2 (``TWO_RANK_COMBINE_HALVES``): 2x H200,
      DeepSeek-V3 shape, 32 SMs, 2026-11-22: 442.7 / 456.0 vs 486.5 / 492.5 us (22:44),
      464.5 vs 508.0 us (22:47; one process per GPU 455.3 / 463.5 vs 494.5); in [16, 128]
      tiles (8 bytes a thread) it was slower, 569.0 / 567.5 vs 503.1 / 495.3 us (22:33).
      Not timed at W = 4 (58 % of the items there could take it instead of the split path).
    dispatch_pull: 1 = senders copy each token row that some other rank keeps once
      into ROWS[me] of their own region (a local copy) and the receivers load it from the
      source's region (NVLink loads, software-pipelined like every row loop), so the NVLink
      transfer is spread over every program that expands; 2 (default) = the same, the senders
      working in the expansion's items (``expand_group`` blocks: each block's slots, then the
      group's rows as one tile, then one flag; only with expand orders 2, 3 and groups > 1,
      else as 1): the senders' copies end 293-366 us after launch instead of 405-484 us (4x
      H200, DeepSeek-V3 shape, profiles of 2026-11-22 08:27 and 08:17), since per block the
      copy pipeline filled and drained on 7 chunks and W flags were raised; dispatch 0.676 /
      0.698 vs 0.746 / 0.712 ms (08:27, same run); 0 = senders store the row into
      ROWS[me] of every remote rank that keeps one of its slots (NVLink stores) and receivers
      expand from their own region; 3 = no staging copy: the receivers load the peers' rows
      from each peer's x itself (its address published in the start barrier, XPTR), and each
      rank's launch ends only when every program of every rank says it has read the peers'
      x for the last time (no x is freed while a peer reads it). 3 needs every GPU's XLA
      buffers mapped on the others: the backend's default under the peer provider, refused
      under nvshmem (a process cannot map another's XLA buffers: a CUDA IPC export of XLA's
      pool was refused, session 18). 2x H200, DeepSeek-V3 shape, 32 SMs, 2026-11-22 16:10
      and 16:27, same runs: 0.469 / 0.476 / 0.459 ms vs 0.596 / 0.591 ms with 2, 0.78-0.80x
      (a version that chose between 3 and staging at run time, per rank, had 184 B of stack
      instead of 32 and measured 0.494-0.516 vs 0.573-0.579 ms with 2 in its runs, 0.86-0.89x;
      16:46-16:56). 4x H200, same shape (session 19, 2026-11-22 18:10 and 18:25, same
      runs): 0.601 / 0.605 ms vs 0.656 / 0.665 ms with 2. 4 = 3's protocol over a copy of
      x: the launcher copies x whole into ROWS[me] of this rank's region (a device-to-device
      copy by the copy engines, in stream order before the kernel: ``dispatch_stage``), the
      receivers load the peers' rows from there as in 1 and 2, the senders copy nothing, and
      the launch ends as in 3 only when no peer reads this rank's ROWS[me] any more (the next
      launch's copy overwrites it before its start barrier). It needs no mapping of XLA's
      buffers, so it runs under either provider. Either way a row crosses NVLink once per
      destination.
      4x H200, DeepSeek-V3 shape, 32 SMs, 2026-11-22: 0.776 / 0.773 vs 0.854 / 0.823 ms
      (06:19, 06:20), 0.754 vs 0.875 ms (06:24). (Pulling the slot metadata too, and raising
      the block flags after one system fence instead of W release atomics, gave nothing:
      0.748-0.755 ms, 06:33, since reverted. Combine's partial rows pulled by the owners
      instead of pushed were slower: 1.17-1.21 vs 0.84 ms, 06:19, since removed.)
    expand_parts: with expand orders 2 and 3, column ranges per item of the queue
      (``dispatch_parts``): 0 (default) = as many as give every program an item where the
      items are fewer than the programs (few tokens), else 1; n = n ranges (1: whole rows).
    combine_parts: column ranges per combine push item and reduce block
      (``combine_push_parts``; combine queues 0, 1 and 2): 0 (default) = as many as give
      every program an item where the push items are fewer than the programs (few tokens),
      else 1; n = n ranges (1: whole rows).
    expand_group: with expand orders 2 and 3, an item of the queue is this many consecutive
      token blocks of one source, expanded as one tile of GROUP x BLOCK_T tokens by BLOCK_H /
      GROUP columns (the same bytes per chunk): fewer items, so fewer per-item waits (the
      queue's atomic, the flags, the slot metadata, the pipeline's fill) per byte. Pull, 4x
      H200 as above: 4 blocks 0.749 / 0.746 ms, 2 blocks 0.761 ms, 1 block 0.790 / 0.823 ms,
      8 blocks 0.765 ms (06:24, 06:25); push: 0.807 ms with 2 vs 0.875 ms with 1 (06:24).
      (Taking the next item before expanding the current one gave nothing, since removed.)
    zero_queue: 1 = with expand orders 2 and 3, the zeros for the rows outside the groups are
      items of the queue (GROUP x BLOCK_T zero rows each), spread evenly among the expansion
      items, instead of the receivers' first step: in pull mode nothing crosses NVLink while
      the receivers zero-fill (~140 us of the 4x H200 profile), and spread out the zeros
      overlap the NVLink loads; 0 = the receivers zero-fill first; 2 (default) = as 1, with
      the first quarter of the zero items at the head of the queue, taken while the senders
      copy the first groups (the receivers waited 32-54 us for flags with 1). 4x H200,
      DeepSeek-V3 shape, 32 SMs, 2026-11-22, same runs: 1: 0.710 / 0.718 ms vs 0.754 / 0.760
      ms with 0 (08:15); 2 (with 4 stages and pull 2): 0.664 / 0.673 ms vs 0.651-0.705 ms
      with 1 (08:34).
    combine_acc_bytes: combine's register budget per chunk (``ACC_BYTES``): smaller chunks
      leave shared memory for deeper pipelines. 64 KB chunks 4 stages deep: combine 0.913 ms
      vs 1.115 ms for 128 KB chunks 2 deep (4x H200, DeepSeek-V3 shape, 32 SMs, 2026-11-21
      16:24, same run); 64 KB 2 deep was slower (1.48 ms), 3 deep 0.966 ms.
  """

  world: int
  num_tokens: int
  max_tokens: int
  hidden: int
  topk: int
  num_experts: int
  capacity: int
  alignment: int
  num_sms: int = 32
  row_itemsize: int = 4
  use_timer: bool = True
  itemsize: int = 2
  profile: bool = False
  sender_fraction: float = 0.375
  expand_order: int = 3
  receiver_share: float = 0.6
  dispatch_stages: int = 4
  expand_levels: int = 0
  combine_stages: int = 4
  combine_acc_bytes: int = ACC_BYTES
  combine_queue: int = 1
  combine_wide: int = 1
  combine_tokens: int = 0
  combine_split: int = 1
  combine_narrow: int = 0
  combine_prefetch: int = 0
  combine_halves: int = 0
  dispatch_pull: int = 2
  expand_group: int = 4
  zero_queue: int = 2
  expand_parts: int = 0
  combine_parts: int = 0

  @property
  def region(self) -> RegionSpec:
    return RegionSpec(self.world, self.max_tokens, self.topk, self.num_experts, self.hidden,
                      self.row_itemsize)

  @property
  def e_local(self) -> int:
    return self.num_experts // self.world

  @property
  def topk_p(self) -> int:
    return next_pow2(self.topk)

  @property
  def block_t(self) -> int:
    """Tokens per block: BLOCK_T x K_pow2 = 128 slots (the in-block rank compares 128 x 128)."""
    return max(1, 128 // self.topk_p)

  @property
  def num_blocks(self) -> int:
    """NB >= 1 (a T = 0 call still has one, empty, block so the layout arrays are non-empty)."""
    return max(1, -(-self.num_tokens // self.block_t))

  @property
  def base_rows(self) -> int:
    """Rows of dispatch's ``base`` scratch: NB block prefixes, the counts, a scratch row and
    the sender bases (``kernels/layout.py``)."""
    return self.num_blocks + 3

  @property
  def block_h(self) -> int:
    """Dispatch's row chunk: a [BLOCK_T, BLOCK_H] tile of about TILE_BYTES (16-byte vectors,
    no spills at ROWS_WARPS warps): the bytes a program keeps in flight per load."""
    return _pow2_floor(TILE_BYTES // (self.block_t * self.itemsize), 64,
                       next_pow2(self.hidden))

  @property
  def block_r(self) -> int:
    return 16

  @property
  def max_programs(self) -> int:
    """Programs of one launch wait for each other, so they must all be resident: at most 128
    (an H100/H200 has 132 SMs, and these kernels run one program per SM)."""
    return max(2, min(self.num_sms, MAX_RESIDENT))

  @property
  def num_programs(self) -> int:
    """NP: programs of the combine / gather_slots launches (push, then reduce): one per push
    item (combine's blocks times W; at least gather's token blocks times W) up to
    ``max_programs``."""
    blocks = max(self.num_blocks, -(-self.num_tokens // self.combine_block_t))
    return max(1, min(self.max_programs, blocks * self.world * self.combine_push_parts))

  @property
  def num_senders(self) -> int:
    """Sender programs of the dispatch launches: ``sender_fraction`` of the programs (at
    least 1, at most one per token block)."""
    want = int(round(self.max_programs * self.sender_fraction))
    return max(1, min(want, self.max_programs - 1, self.num_blocks))

  @property
  def num_receivers(self) -> int:
    """Receiver programs of the dispatch launches: the rest (at least 1)."""
    work = max(self.world * self.num_blocks, -(-self.capacity // self.block_r))
    return max(1, min(self.max_programs - self.num_senders, work))

  @property
  def kernel_blocks(self) -> int:
    """The token blocks the kernels loop over: ceil(T / BLOCK_T), 0 when T = 0 (``num_blocks``
    is at least 1 for the layout arrays' shapes)."""
    return -(-self.num_tokens // self.block_t)

  @property
  def receiver_blocks(self) -> int:
    """RECV_BLOCKS: the token blocks [0, RECV_BLOCKS) the receivers expand (the senders expand
    the rest). 0 with expand orders 2 and 3: nobody has a static share, all take from the
    queue."""
    if self.expand_order >= 2:
      return 0
    return min(self.kernel_blocks, int(round(self.kernel_blocks * self.receiver_share)))

  def grid(self, kernel: str) -> int:
    """Programs of one GPU launch (PHASE 0) of ``kernel``."""
    if kernel in ("dispatch_kernel", "dispatch_rows_kernel"):
      return self.num_senders + self.num_receivers
    return self.num_programs

  def status_size(self, kernel: str) -> int:
    """Length of the kernel's status output (slot 0: the leader; then one per program)."""
    return 1 + self.grid(kernel)

  def interpreter_phases(self, kernel: str) -> list[tuple[int, int]]:
    """(PHASE, grid) launches that replace one GPU launch in the CPU interpreter, where the
    programs of a launch run one after another (each phase runs on every rank in turn)."""
    return interpreter_phases(kernel, self.num_senders, self.num_receivers, self.num_programs,
                              self.receiver_blocks, self.kernel_blocks, self.dispatch_pull)

  def dispatch_stage(self, itemsize: int) -> tuple[int, int, int] | None:
    """Pull 4: the launcher's copy of x (dispatch input 0, ``itemsize`` bytes per element)
    into ROWS[rank] of the rank's region, as ``jax_ep.launch.triton_call``'s ``stage``
    (input, byte offset, byte stride per rank); None for the other pull modes."""
    if self.dispatch_pull != 4:
      return None
    return (0, self.region.rows_off, self.max_tokens * self.hidden * itemsize)

  def _common(self) -> dict:
    return dict(NUM_TOKENS=self.num_tokens, MAX_TOKENS=self.max_tokens, TOPK=self.topk,
                TOPK_P=self.topk_p, BLOCK_T=self.block_t, W_P=next_pow2(self.world),
                USE_TIMER=self.use_timer, PROFILE=self.profile)

  @property
  def _expand_store(self) -> int:
    """_expand_block's EXPAND_LEVELS: L > 0 levels, 0 by slot."""
    return min(self.expand_levels, self.topk)

  def dispatch(self, from_layout: bool, phase: int = 0) -> dict:
    """Constexprs of dispatch_kernel (from_layout=False) or dispatch_rows_kernel (True)."""
    r = self.region
    d = dict(**self._common(), HIDDEN=self.hidden, NUM_EXPERTS=self.num_experts,
             E_LOCAL=self.e_local, EL_P=next_pow2(self.e_local), CAPACITY=self.capacity,
             ROWS_OFF=r.rows_off, BLOCK_FLAG_OFF=r.block_flag_off,
             NUM_SENDERS=self.num_senders, NUM_RECEIVERS=self.num_receivers,
             BLOCK_H=self.block_h, STAGES=self.dispatch_stages,
             EXPAND_LEVELS=self._expand_store, BLOCK_R=self.block_r,
             PHASE=phase,
             ORDER=self.expand_order, RECV_BLOCKS=self.receiver_blocks,
             PULL=int(self.dispatch_pull),
             GROUP=self.dispatch_group, PARTS=self.dispatch_parts,
             ZERO_QUEUE=int(self.zero_queue) if self.expand_order >= 2 else 0,
             BLOCK_PROG=next_pow2(self.num_senders + self.num_receivers))
    if not from_layout:
      e_p = next_pow2(self.num_experts)
      cols = next_pow2(-(-self.num_experts // (self.num_senders + self.num_receivers)))
      d.update(E_P=e_p, ALIGNMENT=self.alignment, NUM_BLOCKS=self.num_blocks,
               COUNTS_OFF=r.counts_off, SLOT_POS_OFF=r.slot_pos_off,
               SLOT_VAL_OFF=r.slot_val_off, COLS=cols,
               BLOCK_BC=min(next_pow2(self.num_blocks), max(1, 4096 // cols)))
    return d

  @property
  def dispatch_group(self) -> int:
    """Dispatch's GROUP: ``expand_group`` token blocks per expansion item (orders 2 and 3; 1
    otherwise), halved while the items (per source, times W) would be fewer than the launch's
    programs. At few tokens the groups would leave most programs idle while a few copy every
    row: one H200, W = 1, DeepSeek-V3 row size, 128 tokens (8 blocks): groups of 4 (2 items
    for 32 programs) 158.0 us, of 1 (8 items) 54.2 us (2026-11-24, session 34)."""
    if self.expand_order < 2:
      return 1
    g = self.expand_group
    while g > 1 and -(-self.kernel_blocks // g) * self.world < self.grid("dispatch_kernel"):
      g //= 2
    return g

  @property
  def dispatch_parts(self) -> int:
    """Dispatch's PARTS: column ranges per expansion item (orders 2 and 3), so that an item
    of few tokens is expanded by several programs at once. ``expand_parts`` where set (1:
    whole rows), else 1 where the items (after ``dispatch_group``) cover the launch's
    programs, and otherwise as many as cover them, at most one per row chunk, and no range
    left empty."""
    if self.expand_order < 2:
      return 1
    return column_ranges(-(-self.hidden // (self.block_h // self.dispatch_group)),
                         -(-self.kernel_blocks // self.dispatch_group) * self.world,
                         self.grid("dispatch_kernel"), self.expand_parts)

  @property
  def combine_block_t(self) -> int:
    """Tokens per combine block (any size works: combine reads the layout, not its blocks):
    ``combine_tokens``, or max(32, 128 / K_pow2) (32 at top-8) halved, down to 16, while the
    push items (blocks times W) would be fewer than the programs: at few tokens the large
    blocks leave programs idle (one H200, W = 1, DeepSeek-V3 row size, 128 tokens: 72.3 us
    with 32-token blocks, 41.0 us with 16; 2026-11-24, session 34)."""
    if self.combine_tokens:
      return self.combine_tokens
    bt = max(32, 128 // self.topk_p)
    while bt > 16 and -(-self.num_tokens // bt) * self.world < self.max_programs:
      bt //= 2
    return bt

  @property
  def combine_reduce_parts(self) -> int:
    """Combine queue 3: column ranges per token block in the reduce queue after the pushes.
    The blocks of the pushes' last step (NP / W of them) are reduced there; W ranges each
    give every program one (fewer where a block has fewer reduce chunks)."""
    chunks = self._reduce_chunks
    return min(next_pow2(self.world), 1 << (chunks.bit_length() - 1))  # a power of two

  @property
  def _reduce_chunks(self) -> int:
    """Combine's reduce: BLOCK_HR-column chunks per row."""
    return -(-self.hidden // self.combine_block_hr)

  @property
  def _combine_queue(self) -> int:
    """combine's QUEUE: ``combine_queue``, but 1 for 3 where its claims (PARTS int32 per
    token block after the W DONE flags of each) do not fit the region's block-flag area
    (only at a token or two per rank)."""
    nb = -(-self.num_tokens // self.combine_block_t)
    parts = self.combine_reduce_parts
    if self.combine_queue == 3 and (self.world + parts) * nb > self.world * self.max_tokens:
      return 1
    return int(self.combine_queue)

  def _combine_parts(self) -> dict:
    parts = self.combine_reduce_parts if self._combine_queue == 3 else 1
    pp = self.combine_push_parts
    return dict(PARTS=parts, PART_COLS=-(-self._reduce_chunks // parts) * self.combine_block_hr,
                PUSH_PARTS=pp, PUSH_COLS=-(-self._push_part_chunks // pp) * self._push_part_unit)

  @property
  def _push_part_unit(self) -> int:
    """Columns of one step of ``combine_push_parts``' ranges: the widest chunk of the push's
    common paths and of the reduce (powers of two), so a range holds whole chunks."""
    return max(self.combine_block_hc, self.combine_block_hc_all, self.combine_block_hr)

  @property
  def _push_part_chunks(self) -> int:
    return -(-self.hidden // self._push_part_unit)

  @property
  def combine_push_parts(self) -> int:
    """Combine's PUSH_PARTS: column ranges per push item and per reduce block, so that a
    batch of few tokens is pushed and reduced by several programs at once (each (block,
    range) has its own DONE flags; queues 0, 1 and 2, 1 with queue 3). ``combine_parts`` where
    set (1: whole rows), else 1 where the push items (blocks times W) cover the programs
    this launch may use, and otherwise as many as cover them; at most one per
    ``_push_part_unit`` columns, none empty, and no more DONE flags than the region holds.
    One H200, W = 1, DeepSeek-V3 row size, 128 tokens: 8 push items of 16 tokens for 32
    programs; the push took 27 us of the 37 us combine (session 34); with 4 ranges the
    combine took 17.2-17.7 us against 37.0-37.2 with whole rows, same run (2026-11-24,
    session 35; hidden 2048: 11.9-12.1 vs 16.9-17.2 us)."""
    if self._combine_queue == 3:
      return 1
    nb = -(-self.num_tokens // self.combine_block_t)
    return column_ranges(self._push_part_chunks, nb * self.world, self.max_programs,
                         self.combine_parts,
                         most=self.max_tokens // max(nb, 1))  # W DONE flags a (block, range)

  @property
  def j_unroll(self) -> int:
    """Combine push: slot levels whose rows are loaded together (a token's j-th present slot
    for j < J_UNROLL). A block where some token has more rows on this rank runs all TOPK
    levels instead (``_push_chunks``; rare at top-8 over 4+ ranks)."""
    return min(4, self.topk_p)

  @property
  def combine_block_hc_all(self) -> int:
    """Push chunk of the all-TOPK path (and of both paths with ``combine_wide`` off):
    J_UNROLL [BLOCK_T, BLOCK_HC] row tiles + an f32 accumulator in ACC_BYTES (sized for the
    J_UNROLL path; the all-TOPK path keeps more rows in flight: no spills at the DeepSeek-V3
    shape, ``scripts/kernel_stats.py``)."""
    per_col = self.combine_block_t * (self.j_unroll * self.itemsize + 4)
    return _pow2_floor(self.combine_acc_bytes // per_col, 32, next_pow2(self.hidden))

  @property
  def combine_block_hc(self) -> int:
    """Push chunk of the J_UNROLL-level path: with ``combine_wide``, TOPK_P / J_UNROLL times
    the all-TOPK path's, so a stage of either path holds the same bytes of rows (one shared
    memory budget, half the chunk iterations at top-8)."""
    hc = self.combine_block_hc_all
    if self.combine_wide:
      hc = min(hc * (self.topk_p // self.j_unroll), next_pow2(self.hidden))
    return hc

  @property
  def combine_block_hr(self) -> int:
    """Reduce chunk: one [BLOCK_T, BLOCK_HR] row tile per rank (W_P, all loaded together) + an
    f32 accumulator, in ``combine_acc_bytes``; widened, up to REDUCE_MAX_BYTES of registers,
    until each thread moves 16-byte vectors (with 64 KB at W = 8 the tile would be 128 columns,
    8 bytes a thread). Past W = 8 the W_P tiles do not all fit with 16-byte vectors: correct,
    and narrower (no such machine measured)."""
    per_col = self.combine_block_t * (next_pow2(self.world) * self.itemsize + 4)
    cap = next_pow2(self.hidden)
    hr = _pow2_floor(self.combine_acc_bytes // per_col, 32, cap)
    vector_cols = 16 * 32 * ROWS_WARPS // (self.combine_block_t * self.itemsize)
    if hr < vector_cols:
      hr = max(hr, min(vector_cols, _pow2_floor(REDUCE_MAX_BYTES // per_col, 32, cap)))
    return hr

  @property
  def combine_block_hc_narrow(self) -> int:
    """``combine_narrow``'s chunk: 2 row tiles in a stage of the all-TOPK path's bytes."""
    return min(self.combine_block_hc_all * max(1, self.topk_p // 2), next_pow2(self.hidden))

  @property
  def combine_heavy_t(self) -> int:
    """``combine_split``: tokens of an item summed over all TOPK levels in their own tile (at
    most; an item with more such tokens runs the all-TOPK path): one per 8 tokens, >= 2."""
    return max(2, self.combine_block_t // 8)

  @property
  def _combine_stage_bytes(self) -> int:
    """Shared memory of one pipeline stage of combine's largest loop (the push paths' row
    tiles, the reduce's W_P partial rows)."""
    return self.combine_block_t * self.itemsize * max(
        self.topk_p * self.combine_block_hc_all, self.j_unroll * self.combine_block_hc,
        next_pow2(self.world) * self.combine_block_hr)

  @property
  def combine_block_hc_heavy(self) -> int:
    """``combine_split``'s chunk: TOPK_P [HEAVY_T, BLOCK_HC_H] row tiles in a stage of the
    other loops' bytes (2,048 columns at the DeepSeek-V3 shape: 4 chunk iterations where the
    all-TOPK path takes 28)."""
    per_col = self.topk_p * self.combine_heavy_t * self.itemsize
    return _pow2_floor(self._combine_stage_bytes // per_col, 32, next_pow2(self.hidden))

  @property
  def _combine_halves(self) -> int:
    """combine's HALVES: ``combine_halves`` where a token can have more than J_UNROLL rows on
    a rank (J_UNROLL < TOPK_P; else no item reaches that path)."""
    return int(bool(self.combine_halves) and self.j_unroll < self.topk_p)

  @property
  def combine_block_hc_halves(self) -> int:
    """``combine_halves``' chunk: [BLOCK_T / 2, BLOCK_HC_HV] row tiles of at least 16 bytes a
    thread (256 columns at the DeepSeek-V3 shape; with 128 each thread moved 8 bytes, and the
    push measured 18 % slower, 2x H200, 2026-11-22 22:33)."""
    vector_cols = 16 * 32 * ROWS_WARPS // (self.combine_block_t // 2 * self.itemsize)
    return max(32, min(next_pow2(self.hidden), next_pow2(vector_cols)))

  @property
  def _halves_stage_bytes(self) -> int:
    """Shared memory of one stage of the halves loop (TOPK_P + J_UNROLL half tiles)."""
    half_tile = self.combine_block_t // 2 * self.combine_block_hc_halves * self.itemsize
    return self._combine_halves * (self.topk_p + self.j_unroll) * half_tile

  @property
  def combine_pipeline(self) -> int:
    """combine's STAGES: ``combine_stages``, lowered until STAGES - 1 chunks of its largest
    loop fit in SMEM_BYTES (Triton reuses one buffer across the kernel's loops; the largest
    holds TOPK_P push rows or W_P partial rows of a chunk; ``combine_split``'s tile fits in
    the same bytes; ``combine_halves``' 12 half tiles of 256 columns take more, 3 stages)."""
    stage = max(self._combine_stage_bytes, self._halves_stage_bytes)
    return max(1, min(self.combine_stages, 1 + SMEM_BYTES // stage))

  def combine(self, phase: int = 0) -> dict:
    r = self.region
    return {**self._common(), **dict(
        HIDDEN=self.hidden, CAPACITY=self.capacity, ROWS_OFF=r.rows_off,
        ROW_MARK_OFF=r.row_mark_off, BLOCK_FLAG_OFF=r.block_flag_off,
        NUM_PROGRAMS=self.num_programs, BLOCK_P=next_pow2(self.num_programs),
        BLOCK_T=self.combine_block_t, BLOCK_HC=self.combine_block_hc,
        BLOCK_HC_ALL=self.combine_block_hc_all,
        BLOCK_HR=self.combine_block_hr, STAGES=self.combine_pipeline, J_UNROLL=self.j_unroll,
        QUEUE=self._combine_queue, SPLIT=int(self.combine_split),
        NARROW=int(self.combine_narrow and self.j_unroll > 2),
        BLOCK_HC2=self.combine_block_hc_narrow,
        HEAVY_T=self.combine_heavy_t, BLOCK_HC_H=self.combine_block_hc_heavy,
        PREFETCH=int(self.combine_prefetch), **self._combine_parts(),
        HALVES=self._combine_halves, BLOCK_HC_HV=self.combine_block_hc_halves, PHASE=phase)}

  def gather(self, phase: int = 0) -> dict:
    return dict(**self._common(), E_LOCAL=self.e_local, CAPACITY=self.capacity,
                SLOT_VAL_OFF=self.region.slot_val_off,
                NUM_PROGRAMS=self.num_programs, BLOCK_P=next_pow2(self.num_programs),
                PHASE=phase)
