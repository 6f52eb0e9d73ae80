"""Shared pieces of the intra-node EP kernels: the symmetric-region layout and the flag protocol.

Every rank owns one *symmetric region* (same size and layout on every rank), mapped into every
peer's address space; a kernel receives ``sym_table`` (``[world] int64``: each rank's region base
address as seen from this device) and reaches rank r's region at ``sym_table[r] + byte_offset``.

Region layout (byte offsets from the base; every area is 256-byte aligned). The first
``CONTROL_BYTES`` are the same for every config, so one region serves several configs:

  SEQ          int32 [1]               this rank's op counter (written only by this rank)
  ABORT        int32 [1]               = 1 when this op's start barrier found a fingerprint
                                       mismatch (the launch's programs then skip their work)
  GO           int64 [1]               = epoch once this launch's leader passed the barrier
  QUEUE        int32 [1]               dispatch with expand order 2: the next expansion work item
                                       (zeroed by the leader before GO, taken with atomics)
  ERR          int32 [8]               first failure seen: (1, code, rank, peer, seq, 0, 0, 0)
  SYNC_FLAG    int32 [MAX_WORLD]       SYNC_FLAG[s] = seq of the last op rank s announced
  FINGERPRINT  int32 [MAX_WORLD]       FINGERPRINT[s] = hash of rank s's (op, config, shapes)
                                       for the op it announced (written before SYNC_FLAG[s])
  ARRIVE_FLAG  int32 [MAX_WORLD, MAX_PROGRAMS]
                                       ARRIVE_FLAG[s, p] = seq when program p of rank s finished
                                       writing its rows/metadata for that op into this region
  HIST_FLAG    int64 [MAX_PROGRAMS]    dispatch: [p] = epoch when program p wrote its
                                       histograms, [COL_FLAG + p] its column scan (p < 128)
  PROF         int64 [MAX_PROGRAMS, 8] %globaltimer stamps of the last profiled launch
                                       (kernels compiled with PROFILE=1 only; see ``PROF_*``)
  XPTR         int64 [MAX_WORLD]       dispatch with pull 3: XPTR[s] = the address of rank s's
                                       x in this launch (peer provider: every XLA buffer is
                                       mapped on every GPU), written before s announces
  --- config-dependent part (``RegionSpec``) ---
  COUNTS       int32 [2, W, E]         per-source expert histograms, double-buffered by seq parity
  BLOCK_FLAG   int32 [W, T_max]        dispatch: BLOCK_FLAG[s, b] = seq when source s's token
                                       block b (rows and slot metadata) is in this region
  SLOT_POS     int32 [W, T_max, K]     dispatch: row of recv_x for each slot sent here (or -1)
  SLOT_VAL     f32   [W, T_max, K]     dispatch: routing weight of each slot; gather_slots: values
  ROW_MARK     int32 [W, T_max]        combine: seq when rank s's partial row for token t arrived
  ROWS         [W, T_max, H] x row_itemsize   token rows staged by source rank (dispatch) or
                                       partial rows staged by expert rank (combine)

Every op (dispatch, dispatch_rows, combine, gather_slots) is ONE kernel launch, so XLA can
never interleave the work of two ops on a GPU's stream. Its programs take roles:
  * leader (program 0): the op's start barrier. seq = SEQ + 1; it writes its fingerprint and
    then SYNC_FLAG[me] = seq into every rank (release, system scope) and waits until
    SYNC_FLAG[s] >= seq for every s. A peer that announced seq has finished its earlier ops
    (stream order), so every staging area is free. It compares the peers' fingerprints with
    its own (a rank running another op, config or token count is refused: ABORT = 1 and an
    error record, on every rank, since every rank sees the same fingerprints). Then SEQ = seq
    and GO = epoch (the launcher's per-device launch counter, so the program-to-program flags
    of this launch never need a reset).
  * senders: wait for GO >= epoch, write rows/metadata into peers with plain stores, then
    ``__syncthreads`` + a flag (ARRIVE_FLAG per program, or BLOCK_FLAG per token block) = seq
    in every rank (release, system scope).
  * receivers: wait for GO >= epoch, then spin (acquire, system scope) until the flags they
    need reach seq.
  Dispatch's programs first build the per-block expert histogram (HIST_FLAG[pid] = epoch when
  done) and scan their expert columns of it (HIST_FLAG[COL_FLAG + pid]; ``kernels/layout.py``);
  its leader exchanges the counts as part of the start barrier.
  Every wait is bounded by ``timeout_ns``: on expiry the kernel records (op, rank, peer, seq) in
  ERR (and its status output), stops waiting and finishes; the host turns that into an error
  naming the op and rank.
  All programs of a launch must be resident together (they wait for each other): the grid is
  at most ``EPConfig.num_sms`` (<= 128) programs, far fewer than an H100/H200's 132 SMs.
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
ABORT_OFF = 64
GO_OFF = 128
QUEUE_OFF = 192
ERR_OFF = 256
SYNC_FLAG_OFF = 512
FINGERPRINT_OFF = SYNC_FLAG_OFF + 4 * MAX_WORLD
ARRIVE_FLAG_OFF = FINGERPRINT_OFF + 4 * MAX_WORLD
HIST_FLAG_OFF = ARRIVE_FLAG_OFF + 4 * MAX_WORLD * MAX_PROGRAMS
COL_FLAG = MAX_PROGRAMS // 2   # HIST_FLAG index of program 0's column-scan flag
PROF_OFF = HIST_FLAG_OFF + 8 * MAX_PROGRAMS
PROF_SLOTS = 8
XPTR_OFF = PROF_OFF + 8 * MAX_PROGRAMS * PROF_SLOTS
CONTROL_BYTES = XPTR_OFF + 8 * MAX_WORLD

# Profile stamps (PROF[pid, slot], ns of %globaltimer), written only by kernels compiled with
# PROFILE=1 (``JAX_EP_PROFILE=1`` at trace time; ``jax_ep.backends.triton.read_profile``).
PROF_START, PROF_GO, PROF_ZERO, PROF_SELF, PROF_PUSH, PROF_ARRIVED, PROF_END, PROF_LEADER = range(8)
PROF_HIST = PROF_ARRIVED  # dispatch programs: their histograms are written (slot 5 is free there)
PROF_NAMES = ("start", "go", "zero_fill", "self_rows", "push_done", "arrived", "end",
              "peers_arrived")  # slot 7: the leader passed the start barrier

_MAX_PROGRAMS = tl.constexpr(MAX_PROGRAMS)
_SEQ_OFF = tl.constexpr(SEQ_OFF)
_ABORT_OFF = tl.constexpr(ABORT_OFF)
_ERR_OFF = tl.constexpr(ERR_OFF)
_SYNC_FLAG_OFF = tl.constexpr(SYNC_FLAG_OFF)
_FINGERPRINT_OFF = tl.constexpr(FINGERPRINT_OFF)
_ARRIVE_FLAG_OFF = tl.constexpr(ARRIVE_FLAG_OFF)
_GO_OFF = tl.constexpr(GO_OFF)
_QUEUE_OFF = tl.constexpr(QUEUE_OFF)
_HIST_FLAG_OFF = tl.constexpr(HIST_FLAG_OFF)
_COL_FLAG = tl.constexpr(COL_FLAG)
_PROF_OFF = tl.constexpr(PROF_OFF)
_PROF_SLOTS = tl.constexpr(PROF_SLOTS)
_XPTR_OFF = tl.constexpr(XPTR_OFF)
# The profile slots as constexprs, for the kernels' prof_mark calls.
P_START, P_GO, P_ZERO, P_SELF, P_PUSH, P_ARRIVED, P_END, P_LEADER, P_HIST = (
    tl.constexpr(v) for v in (PROF_START, PROF_GO, PROF_ZERO, PROF_SELF, PROF_PUSH,
                              PROF_ARRIVED, PROF_END, PROF_LEADER, PROF_HIST))

# Op codes (what a launch is): recorded in ERR[1] and the status outputs as op + 8 * phase,
# the phase saying what failed (a wait that timed out, or the fingerprint check).
OP_NAMES = {1: "dispatch", 2: "dispatch_rows", 3: "combine", 4: "gather_slots"}
OP_DISPATCH, OP_DROWS, OP_COMBINE, OP_GATHER = 1, 2, 3, 4
PHASE_NAMES = {0: "start barrier", 1: "row arrival", 2: "waiting for this GPU's programs",
               3: "fingerprint mismatch"}
PHASE_MISMATCH = 3


def describe_error(err) -> str | None:
  """Text for an ERR record ``(flag, code, rank, peer, seq, ...)``, or None when flag is 0.
  ``code = op + 8 * phase`` (see ``OP_NAMES``, ``PHASE_NAMES``)."""
  flag, code, rank, peer, seq = (int(v) for v in list(err)[:5])
  if not flag:
    return None
  name = OP_NAMES.get(code % 8, f"op {code % 8}")
  phase = PHASE_NAMES.get(code // 8, f"phase {code // 8}")
  if code // 8 == 2:
    return (f"jax_ep.{name}: rank {rank} timed out {phase} (program {peer}, op sequence "
            f"number {seq}): the GPU did not run all of the op's programs at once; lower "
            f"EPConfig.num_sms.")
  if code // 8 == PHASE_MISMATCH:
    return (f"jax_ep.{name}: rank {rank} and rank {peer} disagree about op number {seq}: a "
            f"different op, EPConfig, token count or dtype (their fingerprints differ). Every "
            f"rank must run the same sequence of jax_ep ops with the same EPConfig and shapes; "
            f"the op was skipped on every rank (its outputs are garbage).")
  return (f"jax_ep.{name} ({phase}): rank {rank} timed out waiting for rank {peer} (op "
          f"sequence number {seq}). A peer rank did not reach the same op: every rank must run "
          f"the same sequence of jax_ep ops; raise EPConfig.timeout_s if a peer is just slow.")


def fingerprint(*parts) -> int:
  """A 31-bit hash of an op's identity (op code, config, shapes) that is the same in every
  process (Python's ``hash`` of str is salted per process; this is not)."""
  import zlib
  return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


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
  def block_flag_off(self) -> int:
    return _align(self.counts_off + 4 * 2 * self.world * self.num_experts)

  @property
  def slot_pos_off(self) -> int:
    return _align(self.block_flag_off + 4 * self.world * self.max_tokens)

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
  Triton cannot prove alignment and copies rows with 2-byte loads and stores. (Triton 3.9 loses
  this hint on the way to the row addresses: the row loops also declare ``row_align``.)
  """
  base = tl.multiple_of(tl.load(sym_table + rank), 256)
  return tl.multiple_of((base + byte_off).to(tl.pointer_type(dtype)), 16)


@triton.constexpr_function
def row_align(hidden, dtype):
  """Bytes (at most 16) that every row start of a [rows, hidden] ``dtype`` array with a 16-byte
  aligned base is aligned to: what the row loops declare with ``tl.multiple_of(ptrs, [a, a])``
  on their address tiles (x, recv_x, a region's ROWS; chunks start at multiples of the chunk
  width), so Triton moves 16-byte vectors. 3.6 proves it alone; 3.9 loses the alignment of
  ``sym_ptr`` on the way and would move 2 bytes at a time. The hint must sit on the address
  expression itself (a helper's argument drops it)."""
  pitch = hidden * (dtype.primitive_bitwidth // 8)
  return min(16, pitch & -pitch)


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
def _poll_flags(flag_ptr, offs, mask, target, SCOPE: tl.constexpr):
  """One acquire load (``SCOPE``) of ``flag_ptr[offs]`` where ``mask``: the values, and how
  many are still below ``target``."""
  zero = tl.zeros(offs.shape, flag_ptr.dtype.element_ty)
  vals = tl.atomic_add(flag_ptr + offs, zero, mask=mask, sem="acquire", scope=SCOPE)
  return vals, tl.sum(((vals < target) & mask).to(tl.int32), axis=0)


@triton.jit
def flags_ready(flag_ptr, n, target, BLOCK: tl.constexpr, SCOPE: tl.constexpr):
  """Whether ``flag_ptr[i] >= target`` for all i < n (n <= BLOCK) now: one look, no wait, no
  error. Ends with a CTA barrier like ``wait_flags``, so that when it says True the whole CTA
  may read what the flags guard."""
  offs = tl.arange(0, BLOCK)
  _, missing = _poll_flags(flag_ptr, offs, offs < n, target, SCOPE)
  tl.debug_barrier()
  return missing == 0


@triton.jit
def wait_flags(flag_ptr, n, target, timeout_ns, err_ptr, status_ptr, code, rank, peer, seq,
               USE_TIMER: tl.constexpr, BLOCK: tl.constexpr, SCOPE: tl.constexpr):
  """Spin until ``flag_ptr[i] >= target`` for all i < n (n <= BLOCK); True when all arrived.

  Works for int32 and int64 flags. Every thread of the CTA loads a part of the flags (acquire,
  ``SCOPE``); the loop ends when all arrived or ``timeout_ns`` passed (with ``USE_TIMER=False``,
  the interpreter path, it spins ``timeout_ns // 1000`` times instead). On timeout it records
  (1, code, rank, peer, seq) in ERR (``peer < 0``: the first missing flag index) and stores
  ``code`` at ``status_ptr``. Ends with a CTA barrier, so the whole CTA may read what the
  flags guard.
  """
  offs = tl.arange(0, BLOCK)
  mask = offs < n
  vals, missing = _poll_flags(flag_ptr, offs, mask, target, SCOPE)
  t0 = _now(USE_TIMER)
  spins = tl.full([], 0, tl.int64)
  expired = tl.full([], 0, tl.int32)
  while (missing > 0) & (expired == 0):
    vals, missing = _poll_flags(flag_ptr, offs, mask, target, SCOPE)
    spins += 1
    if USE_TIMER:
      expired = (_now(USE_TIMER) - t0 > timeout_ns).to(tl.int32)
    else:
      expired = (spins > timeout_ns // 1000).to(tl.int32)
  if missing > 0:
    first = tl.min(tl.where((vals < target) & mask, offs, BLOCK), axis=0)
    who = tl.where(peer >= 0, peer, first)
    if tl.atomic_cas(err_ptr, 0, 1, sem="relaxed", scope="gpu") == 0:  # keep the first one
      tl.store(err_ptr + 1, code)
      tl.store(err_ptr + 2, rank)
      tl.store(err_ptr + 3, who)
      tl.store(err_ptr + 4, seq)
    tl.store(status_ptr, code)
  tl.debug_barrier()
  return missing == 0


@triton.jit
def signal_peers(sym_table, rank, world, flag_index, seq):
  """``ARRIVE_FLAG[rank, flag_index] = seq`` in every rank's region (after a CTA barrier, so
  the CTA's earlier stores are ordered before it)."""
  tl.debug_barrier()
  for r in range(world):
    flag = sym_ptr(sym_table, r, _ARRIVE_FLAG_OFF, tl.int32) + rank * _MAX_PROGRAMS + flag_index
    store_release(flag, seq)


@triton.jit
def publish_ptr(sym_table, rank, world, ptr):
  """``XPTR[rank] = ptr`` (as an address) in every rank's region: the leader, before it
  announces the op (its announce's CTA barrier and release order these stores first)."""
  for r in range(world):
    tl.store(sym_ptr(sym_table, r, _XPTR_OFF, tl.int64) + rank, ptr.to(tl.int64))


@triton.jit
def peer_ptr(sym_table, rank, s, dtype: tl.constexpr):
  """Rank s's published pointer (``publish_ptr``), typed ``dtype``, read from this rank's
  region: valid once s's start-barrier announce has been seen (after GO)."""
  p = tl.load(sym_ptr(sym_table, rank, _XPTR_OFF, tl.int64) + s, cache_modifier=".cg")
  return tl.multiple_of(p.to(tl.pointer_type(dtype)), 16)


@triton.jit
def wait_arrivals(sym_table, rank, s, num_senders, seq, timeout_ns, status_ptr, op,
                  USE_TIMER: tl.constexpr, BLOCK_P: tl.constexpr):
  """Wait until ``ARRIVE_FLAG[s, p] >= seq`` here for every sender p < num_senders of rank s."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flags = sym_ptr(sym_table, rank, _ARRIVE_FLAG_OFF, tl.int32) + s * _MAX_PROGRAMS
  return wait_flags(flags, num_senders, seq, timeout_ns, err, status_ptr, op + 8, rank, s,
                    seq, USE_TIMER, BLOCK_P, "sys")


@triton.jit
def wait_all_arrivals(sym_table, rank, world, num_senders, seq, timeout_ns, status_ptr, op,
                      USE_TIMER: tl.constexpr, BLOCK_P: tl.constexpr):
  """``wait_arrivals`` for every rank s < world."""
  ok = True
  for s in range(world):
    ok = ok & wait_arrivals(sym_table, rank, s, num_senders, seq, timeout_ns, status_ptr, op,
                            USE_TIMER, BLOCK_P)
  return ok


@triton.jit
def signal_block(sym_table, rank, world, block_flag_off, max_tokens, blk, seq):
  """``BLOCK_FLAG[rank, blk] = seq`` in every rank's region (after a CTA barrier, so the CTA's
  earlier stores, the block's rows and slot metadata, are ordered before it)."""
  tl.debug_barrier()
  for r in range(world):
    flag = sym_ptr(sym_table, r, block_flag_off, tl.int32) + rank * max_tokens + blk
    store_release(flag, seq)


@triton.jit
def wait_block(sym_table, rank, s, block_flag_off, max_tokens, blk, seq, timeout_ns, status_ptr,
               op, USE_TIMER: tl.constexpr):
  """Wait until ``BLOCK_FLAG[s, blk] >= seq`` here: source s's token block blk has arrived."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flag = sym_ptr(sym_table, rank, block_flag_off, tl.int32) + s * max_tokens + blk
  return wait_flags(flag, 1, seq, timeout_ns, err, status_ptr, op + 8, rank, s, seq, USE_TIMER,
                    2, "sys")


@triton.jit
def prof_mark(sym_table, rank, pid, slot: tl.constexpr, PROFILE: tl.constexpr):
  """PROF[pid, slot] = %globaltimer (kernels compiled with PROFILE=1 only)."""
  if PROFILE:
    ptr = sym_ptr(sym_table, rank, _PROF_OFF, tl.int64) + pid * _PROF_SLOTS + slot
    tl.store(ptr, _now(True))


@triton.jit
def prof_span(sym_table, rank, pid, slot: tl.constexpr, ns, PROFILE: tl.constexpr):
  """PROF[pid, slot] = PROF[pid, START] + ns: a duration, read back like a stamp (relative to
  the launch's start it is the duration itself, give or take the programs' start skew)."""
  if PROFILE:
    row = sym_ptr(sym_table, rank, _PROF_OFF, tl.int64) + pid * _PROF_SLOTS
    tl.store(row + slot, tl.load(row) + ns)


@triton.jit
def zero_own(sym_table, rank, byte_off, rows, stride, n, BLOCK: tl.constexpr):
  """Zero the first ``n`` int32 of each of ``rows`` rows (``stride`` int32 apart) at
  ``byte_off`` of this rank's region: the flags an op will read (the leader, before it
  announces: the config-dependent part may hold another config's bytes, and a peer writes the
  flags only after the announce)."""
  i = tl.arange(0, BLOCK)
  for r in range(rows):
    ptr = sym_ptr(sym_table, rank, byte_off, tl.int32) + r * stride
    for i0 in range(0, n, BLOCK):
      tl.store(ptr + i0 + i, tl.zeros([BLOCK], tl.int32), mask=(i0 + i) < n)


@triton.jit
def leader_turn(pid, PHASE: tl.constexpr):
  """Whether this program runs the leader's part of a launch: program 0 on the GPU (PHASE 0);
  the interpreter's leader phases 2 and 3 run with a grid of one."""
  if PHASE == 0:
    turn = pid == 0
  else:
    turn = tl.full([], PHASE == 2 or PHASE == 3, tl.int1)
  return turn


@triton.jit
def leader_announce(sym_table, rank, world, fingerprint):
  """Leader, first half of the start barrier: seq = SEQ + 1; ``FINGERPRINT[rank] =
  fingerprint`` and then ``SYNC_FLAG[rank] = seq`` in every rank's region (after a CTA barrier:
  the CTA's earlier stores to peers go first)."""
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
  for r in range(world):
    tl.store(sym_ptr(sym_table, r, _FINGERPRINT_OFF, tl.int32) + rank, fingerprint)
  tl.debug_barrier()
  for r in range(world):
    store_release(sym_ptr(sym_table, r, _SYNC_FLAG_OFF, tl.int32) + rank, seq)
  return seq


@triton.jit
def leader_wait(sym_table, rank, world, seq, fingerprint, timeout_ns, status_ptr, op,
                USE_TIMER: tl.constexpr, BLOCK_W: tl.constexpr):
  """Leader, second half: wait until every rank announced ``seq`` here, then compare their
  fingerprints with ours. Returns 1 when the op must be skipped (a wait timed out or a
  fingerprint differs; ERR and the status say which), else 0."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  flags = sym_ptr(sym_table, rank, _SYNC_FLAG_OFF, tl.int32)
  ok = wait_flags(flags, world, seq, timeout_ns, err, status_ptr, op, rank, -1, seq,
                  USE_TIMER, BLOCK_W, "sys")
  s = tl.arange(0, BLOCK_W)
  fps = tl.load(sym_ptr(sym_table, rank, _FINGERPRINT_OFF, tl.int32) + s, mask=s < world,
                other=0, cache_modifier=".cg")
  bad = (s < world) & (fps != fingerprint)
  abort = (1 - ok.to(tl.int32))
  if ok & (tl.sum(bad.to(tl.int32), axis=0) > 0):
    code = op + 8 * 3
    first = tl.min(tl.where(bad, s, BLOCK_W), axis=0)
    if tl.atomic_cas(err, 0, 1, sem="relaxed", scope="gpu") == 0:
      tl.store(err + 1, code)
      tl.store(err + 2, rank)
      tl.store(err + 3, first)
      tl.store(err + 4, seq)
    tl.store(status_ptr, code)
    abort = 1
  return abort


@triton.jit
def leader_go(sym_table, rank, seq, epoch, abort):
  """Leader: SEQ = seq, ABORT = abort, QUEUE = 0, then GO = epoch (release, GPU scope): the
  launch's other programs may start (they read SEQ and ABORT, and take QUEUE items, after they
  see GO)."""
  tl.store(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32), seq)
  tl.store(sym_ptr(sym_table, rank, _ABORT_OFF, tl.int32), abort)
  tl.store(sym_ptr(sym_table, rank, _QUEUE_OFF, tl.int32), 0)
  tl.debug_barrier()
  tl.atomic_xchg(sym_ptr(sym_table, rank, _GO_OFF, tl.int64), epoch, sem="release", scope="gpu")


@triton.jit
def claim(ptr):
  """True for the first program of this GPU to claim the int32 flag at ``ptr`` (zeroed before
  the op), False for every later one (atomic exchange, gpu scope). ``ptr`` may be a block of
  pointers: one answer per flag."""
  return tl.atomic_xchg(ptr, 1, sem="relaxed", scope="gpu") == 0


@triton.jit
def take_item(sym_table, rank):
  """The next work item of this launch's queue (0, 1, 2, ... across its programs; atomic, so
  every item is taken once). Which program takes an item never changes where data goes."""
  return tl.atomic_add(sym_ptr(sym_table, rank, _QUEUE_OFF, tl.int32), 1, sem="relaxed",
                       scope="gpu")


@triton.jit
def wait_go(sym_table, rank, epoch, timeout_ns, status_ptr, op, USE_TIMER: tl.constexpr):
  """Wait for this launch's leader (GO >= epoch); returns the op's seq, or -1 when the op is
  skipped (the leader's barrier failed, or this wait timed out). The leader itself may wait up
  to ``timeout_ns`` for its peers (and for this GPU's programs), so this waits 3x."""
  err = sym_ptr(sym_table, rank, _ERR_OFF, tl.int32)
  ok = wait_flags(sym_ptr(sym_table, rank, _GO_OFF, tl.int64), 1, epoch, 3 * timeout_ns, err,
                  status_ptr, op + 16, rank, 0, 0, USE_TIMER, 2, "gpu")
  seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32), cache_modifier=".cg")
  abort = tl.load(sym_ptr(sym_table, rank, _ABORT_OFF, tl.int32), cache_modifier=".cg")
  return tl.where(ok & (abort == 0), seq, -1)


@triton.jit
def leader_barrier(sym_table, rank, world, epoch, fingerprint, timeout_ns, status_ptr, op,
                   USE_TIMER: tl.constexpr, BLOCK_W: tl.constexpr, PHASE: tl.constexpr,
                   ZERO_OFF: tl.constexpr = 0, ZERO_STRIDE: tl.constexpr = 0,
                   ZERO_N: tl.constexpr = 0):
  """The start barrier of combine / dispatch_rows / gather_slots, run by program 0.

  ZERO_N > 0: first zero the op's flags at ZERO_OFF of this rank's region: ``ZERO_N`` int32 per
  source rank, rows ``ZERO_STRIDE`` apart (in the config-dependent part; see ``zero_own``).
  PHASE 0 (GPU): announce, wait, go. The interpreter runs PHASE 2 (announce) on every rank,
  then PHASE 3 (wait, go).
  """
  if PHASE == 0 or PHASE == 2:
    tl.store(status_ptr, 0)
    if ZERO_N > 0:
      zero_own(sym_table, rank, ZERO_OFF, world, ZERO_STRIDE, ZERO_N, 1024)
    leader_announce(sym_table, rank, world, fingerprint)
  if PHASE == 0 or PHASE == 3:
    seq = tl.load(sym_ptr(sym_table, rank, _SEQ_OFF, tl.int32)) + 1
    abort = leader_wait(sym_table, rank, world, seq, fingerprint, timeout_ns, status_ptr, op,
                        USE_TIMER, BLOCK_W)
    leader_go(sym_table, rank, seq, epoch, abort)
