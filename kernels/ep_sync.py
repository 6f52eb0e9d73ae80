"""Shared pieces of the intra-node EP kernels: the symmetric-region layout and the flag protocol.

Every rank owns one *symmetric region* (same size and layout on every rank), mapped into every
peer's address space; a kernel receives ``sym_table`` (``[world] int64``: each rank's region base
address as seen from this device) and reaches rank r's region at ``sym_table[r] + byte_offset``.

Region layout (byte offsets from the base; every area is 256-byte aligned). The first
``CONTROL_BYTES`` are the same for every config, so one region serves several configs:

  SEQ          int32 [1]               this rank's op counter (written only by this rank)
  ERR          int32 [8]               first timeout seen: (1, op, rank, peer, seq, 0, 0, 0)
  SYNC_FLAG    int32 [MAX_WORLD]       SYNC_FLAG[s] = seq of the last op rank s announced
  ARRIVE_FLAG  int32 [MAX_WORLD, MAX_PROGRAMS]
                                       ARRIVE_FLAG[s, p] = seq when program p of rank s finished
                                       writing its rows/metadata for that op into this region
  --- config-dependent part (``RegionSpec``) ---
  COUNTS       int32 [2, W, E]         per-source expert histograms, double-buffered by seq parity
  SLOT_POS     int32 [W, T_max, K]     dispatch: row of recv_x for each slot sent here (or -1)
  SLOT_VAL     f32   [W, T_max, K]     dispatch: routing weight of each slot; gather_slots: values
  ROW_MARK     int32 [W, T_max]        combine: seq when rank s's partial row for token t arrived
  ROWS         [W, T_max, H] x row_itemsize   token rows staged by source rank (dispatch) or
                                       partial rows staged by expert rank (combine)

Flag protocol (no flag is ever reset; values only grow):
  * Every op starts with a one-program "sync" kernel: it reads SEQ, uses seq = SEQ + 1 for the op,
    writes ``SYNC_FLAG[me] = seq`` into every peer (release, system scope) and waits until
    ``SYNC_FLAG[s] >= seq`` for every s. Passing it proves every peer has finished all its earlier
    ops (stream order), so the staging areas are free to overwrite. Then it stores SEQ = seq.
  * Producers write rows and metadata into peers with plain stores, then each program does
    ``__syncthreads`` + ``ARRIVE_FLAG[me, pid] = seq`` (release, system scope) in every peer.
  * Consumers spin (acquire, system scope) until every ``ARRIVE_FLAG[s, p] >= seq``.
  * Every wait is bounded by ``timeout_ns``: on expiry the kernel records (op, rank, peer, seq) in
    ERR (and its own status output), stops waiting and finishes; the host turns that into an
    error naming the op and rank.
Requirement: every rank runs the same sequence of ops (as SPMD programs do), so seq agrees.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

# Python ints for host code, and tl.constexpr twins (the only globals @triton.jit code may read).
MAX_WORLD = 64
MAX_PROGRAMS = 256
ALIGN = 256
SEQ_OFF = 0
ERR_OFF = 256
SYNC_FLAG_OFF = 512
ARRIVE_FLAG_OFF = SYNC_FLAG_OFF + 4 * MAX_WORLD
CONTROL_BYTES = ARRIVE_FLAG_OFF + 4 * MAX_WORLD * MAX_PROGRAMS

_MAX_PROGRAMS = tl.constexpr(MAX_PROGRAMS)
_SEQ_OFF = tl.constexpr(SEQ_OFF)
_ERR_OFF = tl.constexpr(ERR_OFF)
_SYNC_FLAG_OFF = tl.constexpr(SYNC_FLAG_OFF)
_ARRIVE_FLAG_OFF = tl.constexpr(ARRIVE_FLAG_OFF)

# Op codes recorded in ERR[1] on a timeout.
OP_NAMES = {
    1: "dispatch (layout exchange)",
    2: "dispatch (row arrival)",
    3: "combine (start barrier)",
    4: "combine (row arrival)",
    5: "dispatch_rows (start barrier)",
    6: "dispatch_rows (row arrival)",
    7: "gather_slots (start barrier)",
    8: "gather_slots (value arrival)",
}
OP_LAYOUT, OP_DISPATCH, OP_COMBINE_SYNC, OP_COMBINE, OP_DROWS_SYNC, OP_DROWS, OP_GATHER_SYNC, \
    OP_GATHER = range(1, 9)
OP_LAYOUT_C = tl.constexpr(OP_LAYOUT)


def describe_error(err) -> str | None:
  """Text for an ERR record ``(flag, op, rank, peer, seq, ...)``, or None when flag is 0."""
  flag, op, rank, peer, seq = (int(v) for v in list(err)[:5])
  if not flag:
    return None
  name = OP_NAMES.get(op, f"op {op}")
  return (f"jax_ep {name}: rank {rank} timed out waiting for rank {peer} (op sequence number "
          f"{seq}). A peer rank did not reach the same op: every rank must run the same "
          f"sequence of jax_ep ops; raise EPConfig.timeout_s if a peer is just slow.")


def _align(n: int) -> int:
  return -(-n // ALIGN) * ALIGN


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class RegionSpec:
  """Byte offsets of the config-dependent areas of the symmetric region.

  Args:
    world: W, ranks of the EP group.
    max_tokens: T_max, tokens per rank the staging is sized for.
    topk: K.
    num_experts: E (global).
    hidden: H.
    row_itemsize: bytes per element of a staged row (4 lets float32 combine inputs through).
  """

  world: int
  max_tokens: int
  topk: int
  num_experts: int
  hidden: int
  row_itemsize: int = 4

  def __post_init__(self):
    if not 1 <= self.world <= MAX_WORLD:
      raise ValueError(f"jax_ep kernels: world={self.world} must be in [1, {MAX_WORLD}].")

  @property
  def counts_off(self) -> int:
    return _align(CONTROL_BYTES)

  @property
  def slot_pos_off(self) -> int:
    return _align(self.counts_off + 4 * 2 * self.world * self.num_experts)

  @property
  def slot_val_off(self) -> int:
    return _align(self.slot_pos_off + 4 * self.world * self.max_tokens * self.topk)

  @property
  def row_mark_off(self) -> int:
    return _align(self.slot_val_off + 4 * self.world * self.max_tokens * self.topk)

  @property
  def rows_off(self) -> int:
    return _align(self.row_mark_off + 4 * self.world * self.max_tokens)

  @property
  def total_bytes(self) -> int:
    return _align(self.rows_off
                  + self.row_itemsize * self.world * self.max_tokens * self.hidden)


# -- device helpers ------------------------------------------------------------------------------

@triton.jit
def sym_ptr(sym_table, rank, byte_off, dtype: tl.constexpr):
  """Pointer to ``byte_off`` bytes into rank ``rank``'s symmetric region, typed ``dtype``.

  Region bases are 2 MiB aligned and every area offset is a multiple of 256 bytes: say so, or
  Triton cannot prove alignment and copies rows with 2-byte loads and stores.
  """
  base = tl.multiple_of(tl.load(sym_table + rank), 256)
  return tl.multiple_of((base + byte_off).to(tl.pointer_type(dtype)), 16)


@triton.jit
def load_acquire(ptr):
  """Acquire load at system scope (an atomic add of 0, which the interpreter also runs)."""
  return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def store_release(ptr, value):
  """Release store at system scope; call ``tl.debug_barrier()`` first so that the whole CTA's
  earlier stores are ordered before it."""
  tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def _now(USE_TIMER: tl.constexpr):
  if USE_TIMER:
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                  is_pure=False, pack=1)
  else:
    t = tl.full([], 0, tl.int64)
  return t


@triton.jit
def wait_flags(flag_ptr, n, target, timeout_ns, err_ptr, status_ptr, op, rank, peer, seq,
               USE_TIMER: tl.constexpr, BLOCK: tl.constexpr):
  """Spin until ``flag_ptr[i] >= target`` for all i < n (n <= BLOCK); True when all arrived.

  Every thread of the CTA loads a part of the flags (acquire, system scope); the loop ends when
  all arrived or ``timeout_ns`` passed (with ``USE_TIMER=False``, the interpreter path, it spins
  ``timeout_ns // 1000`` times instead). On timeout it records (1, op, rank, peer, seq) in ERR
  (``peer < 0``: the first missing flag index) and stores ``op`` at ``status_ptr``.
  """
  offs = tl.arange(0, BLOCK)
  mask = offs < n
  vals = tl.atomic_add(flag_ptr + offs, tl.zeros([BLOCK], tl.int32), mask=mask, sem="acquire",
                       scope="sys")
  missing = tl.sum(((vals < target) & mask).to(tl.int32), axis=0)
  t0 = _now(USE_TIMER)
  spins = tl.full([], 0, tl.int64)
  expired = tl.full([], 0, tl.int32)
  while (missing > 0) & (expired == 0):
    vals = tl.atomic_add(flag_ptr + offs, tl.zeros([BLOCK], tl.int32), mask=mask,
                         sem="acquire", scope="sys")
    missing = tl.sum(((vals < target) & mask).to(tl.int32), axis=0)
    spins += 1
    if USE_TIMER:
      expired = (_now(USE_TIMER) - t0 > timeout_ns).to(tl.int32)
    else:
      expired = (spins > timeout_ns // 1000).to(tl.int32)
  if missing > 0:
    first = tl.min(tl.where((vals < target) & mask, offs, BLOCK), axis=0)
    who = tl.where(peer >= 0, peer, first)
    tl.atomic_cas(err_ptr, 0, 1, sem="relaxed", scope="gpu")
    tl.store(err_ptr + 1, op)
    tl.store(err_ptr + 2, rank)
    tl.store(err_ptr + 3, who)
    tl.store(err_ptr + 4, seq)
    tl.store(status_ptr, op)
  tl.debug_barrier()
  return missing == 0


@triton.jit
def signal_peers(sym_table, rank, world, flag_index, seq):
  """``ARRIVE_FLAG[rank, flag_index] = seq`` in every rank's region (after a CTA barrier)."""
  tl.debug_barrier()
  for r in range(world):
    flag = sym_ptr(sym_table, r, _ARRIVE_FLAG_OFF, tl.int32) + rank * _MAX_PROGRAMS + flag_index
    store_release(flag, seq)


@triton.jit
def wait_arrivals(sym_table, rank, world, num_programs, seq, timeout_ns, status_ptr, op,
                  USE_TIMER: tl.constexpr, BLOCK_P: tl.constexpr):
  """Wait until ``ARRIVE_FLAG[s, p] >= seq`` in this rank's region for all s < world,
  p < num_programs (<= BLOCK_P). True when everything arrived."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flags = sym_ptr(sym_table, rank, _ARRIVE_FLAG_OFF, tl.int32)
  ok = True
  for s in range(world):
    ok = ok & wait_flags(flags + s * _MAX_PROGRAMS, num_programs, seq, timeout_ns, err,
                         status_ptr, op, rank, s, seq, USE_TIMER, BLOCK_P)
  return ok


@triton.jit
def announce_start(sym_table, rank, world):
  """First half of an op's start barrier: seq = SEQ + 1; ``SYNC_FLAG[rank] = seq`` in every
  rank's region (after a CTA barrier, so earlier stores of this CTA to peers go first)."""
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
  tl.debug_barrier()
  for r in range(world):
    store_release(sym_ptr(sym_table, r, _SYNC_FLAG_OFF, tl.int32) + rank, seq)
  return seq


@triton.jit
def wait_start(sym_table, rank, world, seq, timeout_ns, status_ptr, op,
               USE_TIMER: tl.constexpr, BLOCK_W: tl.constexpr):
  """Second half: wait until every rank announced ``seq`` here; then SEQ = seq."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flags = sym_ptr(sym_table, rank, _SYNC_FLAG_OFF, tl.int32)
  ok = wait_flags(flags, world, seq, timeout_ns, err, status_ptr, op, rank, -1, seq, USE_TIMER,
                  BLOCK_W)
  tl.store(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32), seq)
  return ok


@triton.jit
def current_seq(sym_table, rank):
  """The seq of the op in progress (written by its start kernel, an earlier launch)."""
  return tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32))


@triton.jit
def barrier_kernel(token_in_ptr, status_ptr, sym_table, rank, world, epoch, timeout_ns, op,
                   USE_TIMER: tl.constexpr, BLOCK_W: tl.constexpr, ANNOUNCE: tl.constexpr = True,
                   FINISH: tl.constexpr = True):
  """Start barrier of combine / dispatch_rows / gather_slots. Grid (1,).

  Inputs: ``token_in [1] int32`` (orders this launch after the data it follows; not read).
  Outputs: ``status [1] int32``: 0, or ``op`` when a peer did not arrive within ``timeout_ns``.
  Memory traffic: W flag stores to peers and W flag loads.
  ANNOUNCE / FINISH: both on GPUs; the CPU interpreter, which runs simulated ranks one after
  another, launches the two halves separately.
  """
  if ANNOUNCE:
    tl.store(status_ptr, 0)
    announce_start(sym_table, rank, world)
  if FINISH:
    seq = current_seq(sym_table, rank) + 1
    wait_start(sym_table, rank, world, seq, timeout_ns, status_ptr, op, USE_TIMER, BLOCK_W)
