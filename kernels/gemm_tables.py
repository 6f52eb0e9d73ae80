"""The grouped GEMM's work tables, built on the device by one small Triton launch each.

``grouped_gemm.tile_table`` (the forward/dx tiles) and ``grouped_gemm.dw_step_table`` (dw's row
steps) are written there as array code over numpy or jax.numpy: the specification, and what the
CPU tests compare against. Under XLA that code becomes a dozen or more tiny GPU kernels (a
cumsum alone is several reduce-windows), each a few microseconds of launch and latency in front
of every grouped product, which is not small beside a Qwen3-sized product (~250 us). The kernels
here compute the same tables bit for bit in one launch: programs ``0 .. G-1`` each own
``T_BLOCK`` rows of the table and recompute the per-expert counts and their running sums from
the E sizes and offsets (a few hundred integers), so no program waits on another.

Locating a row: table row t (0-based within the group or zero part) belongs to the segment s
with ``cum[s-1] <= t < cum[s]`` (``cum`` the inclusive running sum of tiles per segment); it
is found as the number of segments whose ``cum <= t`` (a [T_BLOCK, E] comparison and one
reduction), and its tile index within the segment as ``t`` minus the tiles of those segments.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group(sizes_ptr, offsets_ptr, i, C: tl.constexpr, E: tl.constexpr):
  """(offset, size) of groups ``i`` clamped as ``grouped_gemm._clamp_groups`` does; indices
  outside [0, E) read as an empty group at row C."""
  ok = (i >= 0) & (i < E)
  off = tl.minimum(tl.maximum(tl.load(offsets_ptr + i, mask=ok, other=C), 0), C)
  size = tl.minimum(tl.maximum(tl.load(sizes_ptr + i, mask=ok, other=0), 0), C - off)
  return off, size


@triton.jit
def _gap(sizes_ptr, offsets_ptr, i, tail_start, C: tl.constexpr, E: tl.constexpr):
  """(start, end) of the rows in no group before group ``i`` (from the previous group's end;
  ``i == E``: the tail, from ``tail_start``, the largest group end, to C)."""
  prev_off, prev_size = _group(sizes_ptr, offsets_ptr, i - 1, C, E)
  start = tl.where(i == 0, 0, tl.where(i == E, tail_start, prev_off + prev_size))
  off, _ = _group(sizes_ptr, offsets_ptr, i, C, E)
  end = tl.where(i == E, C, off)
  return start, end


@triton.jit
def _locate(t, cum, count, NSEG: tl.constexpr):
  """(segment, index within it) of each row ``t`` given each segment's ``count`` and their
  inclusive running sum ``cum`` (padding segments past NSEG must count 0)."""
  before = cum[None, :] <= t[:, None]
  seg = tl.minimum(tl.sum(before.to(tl.int32), axis=1), NSEG - 1)
  local = t - tl.sum(tl.where(before, count[None, :], 0), axis=1)
  return seg, local


@triton.jit
def _store_rows(ptr, t, mask, c0, c1, c2, c3):
  """Columns 0..3 of rows ``t`` of an int32 [rows, 4] table."""
  tl.store(ptr + t * 4 + 0, c0, mask=mask)
  tl.store(ptr + t * 4 + 1, c1, mask=mask)
  tl.store(ptr + t * 4 + 2, c2, mask=mask)
  tl.store(ptr + t * 4 + 3, c3, mask=mask)


@triton.jit
def tile_table_kernel(sizes_ptr, offsets_ptr, table_ptr, C: tl.constexpr, E: tl.constexpr,
                      BLOCK_M: tl.constexpr, MAX_G: tl.constexpr, MAX_Z: tl.constexpr,
                      E_PAD: tl.constexpr, T_BLOCK: tl.constexpr):
  """``grouped_gemm.tile_table`` (same layout, bit for bit). Grid: ``tile_table_launch``:
  programs ``0 .. cdiv(MAX_G, T_BLOCK) - 1`` write the group tiles, the rest the zero tiles
  (the first of those also the header)."""
  pid = tl.program_id(0)
  g_blocks = tl.cdiv(MAX_G, T_BLOCK)
  i = tl.arange(0, E_PAD)
  off, size = _group(sizes_ptr, offsets_ptr, i, C, E)
  g_tiles = (size + BLOCK_M - 1) // BLOCK_M
  num_g = tl.sum(g_tiles, axis=0)
  if pid < g_blocks:
    t = pid * T_BLOCK + tl.arange(0, T_BLOCK)
    e, local = _locate(t, tl.cumsum(g_tiles, axis=0), g_tiles, E)
    valid = t < num_g
    e_off, e_size = _group(sizes_ptr, offsets_ptr, e, C, E)
    first = t - local
    count = tl.minimum((e_size + BLOCK_M - 1) // BLOCK_M, 65535)
    _store_rows(table_ptr + 4, t, t < MAX_G,
                tl.where(valid, e_off + local * BLOCK_M, 0),
                tl.where(valid, e_off + e_size, 0),
                tl.where(valid, e, 0),
                tl.where(valid & (first < 32768), first * 65536 + count, 0))
  else:
    # Gaps: E + 1 segments (before each group, then the tail from the largest group end).
    tail = tl.max(tl.where(i < E, off + size, 0), axis=0)
    z_start, z_end = _gap(sizes_ptr, offsets_ptr, i, tail, C, E)
    z_tiles = tl.where(i <= E, (tl.maximum(z_end - z_start, 0) + BLOCK_M - 1) // BLOCK_M, 0)
    num_z = tl.sum(z_tiles, axis=0)
    if pid == g_blocks:
      h = tl.arange(0, 4)
      tl.store(table_ptr + h, tl.where(h == 0, tl.minimum(num_g, MAX_G),
                                       tl.where(h == 1, tl.minimum(num_z, MAX_Z), 0)))
    t = (pid - g_blocks) * T_BLOCK + tl.arange(0, T_BLOCK)
    s, local = _locate(t, tl.cumsum(z_tiles, axis=0), z_tiles, E + 1)
    valid = t < num_z
    s_start, s_end = _gap(sizes_ptr, offsets_ptr, s, tail, C, E)
    _store_rows(table_ptr + 4 * (1 + MAX_G), t, t < MAX_Z,
                tl.where(valid, s_start + local * BLOCK_M, 0),
                tl.where(valid, s_end, 0), 0, 0)


@triton.jit
def dw_step_table_kernel(sizes_ptr, offsets_ptr, steps_ptr, first_ptr, C: tl.constexpr,
                         E: tl.constexpr, BLOCK_K: tl.constexpr, MAX_S: tl.constexpr,
                         E_PAD: tl.constexpr, T_BLOCK: tl.constexpr):
  """``grouped_gemm.dw_step_table`` (same layout, bit for bit). Grid: ``cdiv(MAX_S, T_BLOCK)``."""
  pid = tl.program_id(0)
  i = tl.arange(0, E_PAD)
  off, size = _group(sizes_ptr, offsets_ptr, i, C, E)
  n_steps = (size + BLOCK_K - 1) // BLOCK_K
  cum = tl.cumsum(n_steps, axis=0)
  num = tl.sum(n_steps, axis=0)
  if pid == 0:  # first[0] = 0, first[e + 1] = steps of experts 0..e
    tl.store(first_ptr, 0)
    tl.store(first_ptr + 1 + i, tl.minimum(cum, MAX_S), mask=i < E)
  t = pid * T_BLOCK + tl.arange(0, T_BLOCK)
  e, local = _locate(t, cum, n_steps, E)
  valid = t < num
  e_off, e_size = _group(sizes_ptr, offsets_ptr, e, C, E)
  last = valid & (local == (e_size + BLOCK_K - 1) // BLOCK_K - 1)
  _store_rows(steps_ptr, t, t < MAX_S,
              tl.where(valid, e_off + local * BLOCK_K, 0),
              tl.where(valid, e_off + e_size, 0),
              tl.where(valid, e, 0),
              tl.where(last, 1, 0))


# -- launch parameters ---------------------------------------------------------------------------

def _pad(n: int) -> int:
  return max(16, triton.next_power_of_2(n))


def _t_block(e_pad: int) -> int:
  """Rows per program: the [T_BLOCK, E_PAD] comparison stays within ~8K elements (64 registers
  a thread at 4 warps)."""
  return max(1, min(64, 8192 // e_pad))


def tile_table_launch(C: int, E: int, block_m: int) -> tuple[int, dict]:
  """(grid, constexprs) of ``tile_table_kernel``; its output is int32
  ``[1 + MAX_G + MAX_Z, 4]`` (``grouped_gemm.table_bounds``)."""
  from .grouped_gemm import table_bounds

  max_g, max_z = table_bounds(C, E, block_m)
  e_pad = _pad(E + 1)
  tb = _t_block(e_pad)
  grid = triton.cdiv(max_g, tb) + triton.cdiv(max_z, tb)
  return grid, dict(C=C, E=E, BLOCK_M=block_m, MAX_G=max_g, MAX_Z=max_z, E_PAD=e_pad,
                    T_BLOCK=tb)


def dw_step_table_launch(C: int, E: int, block_k: int) -> tuple[int, dict]:
  """(grid, constexprs) of ``dw_step_table_kernel``; its outputs are int32
  ``[MAX_S, 4]`` and ``[E + 1]`` (``grouped_gemm.dw_max_steps``)."""
  from .grouped_gemm import dw_max_steps

  max_s = dw_max_steps(C, E, block_k)
  e_pad = _pad(E)
  tb = _t_block(e_pad)
  return triton.cdiv(max_s, tb), dict(C=C, E=E, BLOCK_K=block_k, MAX_S=max_s, E_PAD=e_pad,
                                      T_BLOCK=tb)
