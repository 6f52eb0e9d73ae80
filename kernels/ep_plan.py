"""Launch plan of the intra-node EP kernels: grids, block sizes and constexprs for one shape.

Framework-agnostic (plain ints): the JAX triton backend and the CPU interpreter tests both build
their launches from ``EPPlan``, so what the tests check is what the GPU runs.
"""
from __future__ import annotations

import dataclasses

from .ep_sync import MAX_PROGRAMS, RegionSpec, next_pow2


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
  def num_programs(self) -> int:
    """NP: programs of every row-moving kernel (push, expand, reduce); equal on all ranks."""
    return max(1, min(self.num_sms, MAX_PROGRAMS, self.num_blocks * self.world))

  @property
  def block_h(self) -> int:
    """Row chunk: a [BLOCK_T, BLOCK_H] tile of about 32 KB (16-byte vectors, no spills)."""
    target = max(64, 32768 // (self.block_t * self.itemsize))
    return min(1 << (target.bit_length() - 1), 1024, next_pow2(self.hidden))

  @property
  def block_r(self) -> int:
    return 16

  def common(self) -> dict:
    return dict(NUM_TOKENS=self.num_tokens, MAX_TOKENS=self.max_tokens, TOPK=self.topk,
                TOPK_P=self.topk_p, BLOCK_T=self.block_t)

  def histogram(self) -> dict:
    return dict(NUM_TOKENS=self.num_tokens, TOPK=self.topk, TOPK_P=self.topk_p,
                NUM_EXPERTS=self.num_experts, E_P=next_pow2(self.num_experts),
                BLOCK_T=self.block_t)

  def exchange(self) -> dict:
    e_p = next_pow2(self.num_experts)
    return dict(NUM_BLOCKS=self.num_blocks, NUM_EXPERTS=self.num_experts, E_P=e_p,
                E_LOCAL=self.e_local, EL_P=next_pow2(self.e_local), CAPACITY=self.capacity,
                ALIGNMENT=self.alignment, COUNTS_OFF=self.region.counts_off,
                W_P=next_pow2(self.world), BLOCK_B=max(1, 4096 // e_p),
                USE_TIMER=self.use_timer, ANNOUNCE=True, FINISH=True)

  @property
  def num_senders(self) -> int:
    """Sender programs of the dispatch kernels: half of num_sms (at least 1)."""
    return max(1, min(MAX_PROGRAMS, self.num_sms // 2, self.num_blocks))

  @property
  def num_receivers(self) -> int:
    """Receiver programs of the dispatch kernels: the rest of num_sms (at least 1)."""
    work = max(self.world * self.num_blocks, -(-self.capacity // self.block_r))
    return max(1, min(MAX_PROGRAMS, self.num_sms - self.num_senders, work))

  def dispatch_grid(self, role: int = 0) -> int:
    """Programs of dispatch_kernel / dispatch_rows_kernel for ROLE 0 (both), 1 or 2."""
    return {0: self.num_senders + self.num_receivers, 1: self.num_senders,
            2: self.num_receivers}[role]

  def dispatch(self, from_layout: bool, role: int = 0) -> dict:
    """Constexprs of dispatch_kernel (from_layout=False) or dispatch_rows_kernel (True)."""
    r = self.region
    d = dict(**self.common(), HIDDEN=self.hidden, NUM_EXPERTS=self.num_experts,
             E_LOCAL=self.e_local, EL_P=next_pow2(self.e_local), CAPACITY=self.capacity,
             ROWS_OFF=r.rows_off, NUM_SENDERS=self.num_senders,
             NUM_RECEIVERS=self.num_receivers, BLOCK_P=next_pow2(self.num_senders),
             BLOCK_H=self.block_h, BLOCK_R=self.block_r, USE_TIMER=self.use_timer, ROLE=role)
    if not from_layout:
      d.update(SLOT_POS_OFF=r.slot_pos_off, SLOT_VAL_OFF=r.slot_val_off)
    return d

  def _wait(self) -> dict:
    return dict(NUM_SENDERS=self.num_programs, BLOCK_P=next_pow2(self.num_programs),
                USE_TIMER=self.use_timer)

  def barrier(self) -> dict:
    return dict(USE_TIMER=self.use_timer, BLOCK_W=next_pow2(self.world), ANNOUNCE=True,
                FINISH=True)

  @property
  def combine_block_h(self) -> int:
    """Combine's row chunk: K unrolled [BLOCK_T, BLOCK_H] loads of ~8 KB each in flight."""
    target = max(64, 8192 // (self.block_t * self.itemsize))
    return min(1 << (target.bit_length() - 1), 1024, next_pow2(self.hidden))

  def combine_push(self) -> dict:
    r = self.region
    return dict(**self.common(), HIDDEN=self.hidden, ROWS_OFF=r.rows_off,
                ROW_MARK_OFF=r.row_mark_off, BLOCK_H=self.combine_block_h)

  def combine_reduce(self) -> dict:
    r = self.region
    return dict(**self._wait(), NUM_TOKENS=self.num_tokens, MAX_TOKENS=self.max_tokens,
                HIDDEN=self.hidden, ROWS_OFF=r.rows_off, ROW_MARK_OFF=r.row_mark_off,
                BLOCK_T=self.block_t, BLOCK_H=self.block_h)

  def gather_push(self) -> dict:
    return dict(**self.common(), SLOT_VAL_OFF=self.region.slot_val_off)

  def gather_reduce(self) -> dict:
    return dict(**self.common(), **self._wait(), E_LOCAL=self.e_local,
                SLOT_VAL_OFF=self.region.slot_val_off)
