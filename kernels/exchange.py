"""In-kernel barrier + all-gather of a small int32 vector across the ranks of the symmetric world.

It backs ``jax_ep.launch.all_gather_int32`` (dispatch exchanges its counts inside its own launch,
``kernels/layout.py``): every rank contributes ``x [N] int32`` and
every rank receives ``out [world, N] int32`` with ``out[r] = x`` of rank r. It doubles as a
barrier: a rank leaves only after every peer has arrived at the same call.

How (one CTA, grid ``(1,)``):
  1. push   x into slot ``[seq % 2][rank]`` of every rank's exchange area (plain stores to peer
            addresses taken from ``sym_table``), then ``fence.acq_rel.sys`` + ``__syncthreads``;
  2. signal ``FLAGS[rank] = epoch`` in every rank's area (release store at system scope);
  3. wait   until ``FLAGS[s] >= epoch`` for every s here (acquire loads at system scope),
            bounded by ``timeout_ns`` (``status[s] = 1`` for a peer that did not arrive);
  4. gather ``out[s] = DATA[seq % 2][s]`` and store ``SEQ = seq + 1``.

``epoch`` is the handler's per-device launch counter (docs/RUNTIME.md): it only grows and is the
same on every rank for the same call when every rank runs the same sequence of symmetric
kernels (SPMD), so flags are never reset. ``SEQ`` counts this kernel's calls on this rank; the
data slot alternates with it, which is safe because a rank can be at most one exchange ahead of
any peer (each call is a barrier), so it never overwrites a slot a peer still reads.

Exchange area (bytes from ``area_offset`` within each rank's symmetric region):
  SEQ   int64 [1]                at SEQ_OFF
  FLAGS int64 [MAX_WORLD]        at FLAGS_OFF   FLAGS[s]: epoch of the last call whose data rank s
                                                 delivered here
  DATA  int32 [2, world, N]      at DATA_OFF

Memory traffic per call: world stores of N int32 + world flag stores to peers (NVLink), world
flag loads and world x N int32 loads locally.

Kernel parameters follow the jax_ep launch ABI (docs/RUNTIME.md): inputs, outputs, then
``sym_table, rank, world, epoch``, then the scalars ``area_offset, timeout_ns``, then constexprs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ep_sync import _now

# Layout of the exchange area (bytes). Host code reads these Python ints.
SEQ_OFF = 0
FLAGS_OFF = 256
MAX_WORLD = 256
DATA_OFF = 4096


def area_bytes(world: int, n: int) -> int:
  """Bytes of the exchange area needed for ``world`` ranks and vectors of ``n`` int32."""
  return DATA_OFF + 2 * world * n * 4


@triton.jit
def _fence_sys():
  # Orders this thread's earlier stores before its later ones for every observer in the system.
  tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                            is_pure=False, pack=1)


@triton.jit
def _ld_acquire_sys(ptrs):
  # Acquire loads at system scope: once a peer's release store is seen, the data it wrote
  # before that store is visible to this thread.
  return tl.inline_asm_elementwise("ld.global.acquire.sys.b64 $0, [$1];", "=l,l", [ptrs],
                                   dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def all_gather_kernel(
    x_ptr,          # in:  [N] int32, this rank's vector
    out_ptr,        # out: [world, N] int32
    status_ptr,     # out: [world] int32, 1 where rank s did not arrive within timeout_ns
    sym_table,      # [world] int64: every rank's symmetric region base, as mapped here
    rank,           # i32
    world,          # i32
    epoch,          # i64, handler launch counter (same on all ranks for this call)
    area_offset,    # i64 scalar: byte offset of the exchange area in every region
    timeout_ns,     # i64 scalar: how long to wait for peers
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,      # next power of two >= N
    BLOCK_W: tl.constexpr,      # next power of two >= world
    FLAGS_OFF_: tl.constexpr,
    DATA_OFF_: tl.constexpr,
    SEQ_OFF_: tl.constexpr,
):
  offs_n = tl.arange(0, BLOCK_N)
  mask_n = offs_n < N
  offs_w = tl.arange(0, BLOCK_W)
  mask_w = offs_w < world

  my_area = tl.load(sym_table + rank) + area_offset
  seq_ptr = (my_area + SEQ_OFF_).to(tl.pointer_type(tl.int64))
  seq = tl.load(seq_ptr)
  slot = seq % 2

  # 1. push x into slot [slot][rank] of every rank (self included).
  x = tl.load(x_ptr + offs_n, mask=mask_n, other=0)
  for r in range(world):
    area = tl.load(sym_table + r) + area_offset
    data = (area + DATA_OFF_).to(tl.pointer_type(tl.int32))
    tl.store(data + (slot * world + rank) * N + offs_n, x, mask=mask_n)
  _fence_sys()
  tl.debug_barrier()  # every thread's stores precede the flag stores below

  # 2. signal: FLAGS[rank] = epoch in every rank's area (one thread per scalar atomic).
  for r in range(world):
    area = tl.load(sym_table + r) + area_offset
    flag = (area + FLAGS_OFF_).to(tl.pointer_type(tl.int64)) + rank
    tl.atomic_xchg(flag, epoch, sem="release", scope="sys")

  # 3. wait for every rank's flag here (masked lanes read our own flag 0, always valid).
  my_flags = (my_area + FLAGS_OFF_).to(tl.pointer_type(tl.int64))
  flag_ptrs = my_flags + tl.where(mask_w, offs_w, 0)
  vals = _ld_acquire_sys(flag_ptrs)
  missing = tl.sum(((vals < epoch) & mask_w).to(tl.int32), axis=0)
  t0 = _now(True)
  elapsed = t0 - t0
  while (missing > 0) & (elapsed < timeout_ns):
    vals = _ld_acquire_sys(flag_ptrs)
    missing = tl.sum(((vals < epoch) & mask_w).to(tl.int32), axis=0)
    elapsed = _now(True) - t0
  tl.store(status_ptr + offs_w, ((vals < epoch) & mask_w).to(tl.int32), mask=mask_w)
  tl.debug_barrier()  # the acquiring threads' view is passed on to the whole CTA ...
  _fence_sys()        # ... and made visible to every thread's loads below

  # 4. gather DATA[slot][s] -> out[s].
  data_here = (my_area + DATA_OFF_).to(tl.pointer_type(tl.int32))
  rows = offs_w[:, None]
  cols = offs_n[None, :]
  mask = mask_w[:, None] & mask_n[None, :]
  vals_x = tl.load(data_here + (slot * world + rows) * N + cols, mask=mask, other=0,
                   volatile=True)
  tl.store(out_ptr + rows * N + cols, vals_x, mask=mask)
  tl.debug_barrier()
  tl.store(seq_ptr, seq + 1)
