"""Grouped GEMM over the expert-major layout of ``recv_x`` (forward and both backward products).

After ``jax_ep.dispatch`` the rows of ``recv_x [C, K]`` are grouped by local expert: the rows of
expert ``e`` are ``[offset[e], offset[e] + size[e])``, groups appear in expert order, each starts at
a multiple of the alignment, and rows between groups (alignment padding) and after the last group
(unused capacity) belong to no expert. The expert computation is the grouped product

    y[rows of e] = recv_x[rows of e] @ w[e]         w: [E_local, K, N], y: [C, N]
    y[rows in no group] = 0

and its two backward products

    d recv_x[rows of e] = dy[rows of e] @ w[e]^T     (the forward kernel with w's strides swapped)
    d w[e]              = recv_x[rows of e]^T @ dy[rows of e]   (``grouped_gemm_dw_kernel``)

Group sizes and offsets are read on the device, so nothing syncs with the host and the launch
grid is static (a function of C, E_local and the tile sizes only).

Cost, with R = sum(size) rows in groups:
  FLOPs        2 * R * K * N (each product; the backward pass does two)
  HBM bytes    forward: R*K (x) + E_local*K*N (w) + C*N (y, zeros included), times the element
               size; x rows are re-read once per N tile and w[e] once per M tile of group e, and
               both re-reads are meant to hit L2 (see "tile order" below).
               dw: R*K + R*N read, E_local*K*N written.

Forward tiling and the static grid (``grouped_gemm_kernel``)
  Rows 0..C are cut into *segments*, in order: for each expert e, the gap before its group
  ``[end of group e-1, offset[e])`` then the group ``[offset[e], offset[e]+size[e])``; finally the
  tail ``[end of group E_local-1, C)``. Each segment is covered by ceil(len / BLOCK_M) M tiles
  that start at the segment's first row, so a tile never straddles two experts. Group tiles run
  the K loop; gap and tail tiles run zero K iterations and store zeros. Since
  sum(ceil(len_s / BLOCK_M)) < C / BLOCK_M + (2 E_local + 1), the grid
  ``(cdiv(C, BLOCK_M) + 2 * E_local) * cdiv(N, BLOCK_N)`` always suffices. Program p handles
  tiles p, p + P, p + 2P, ... of the real tile count (computed on the device), so the same
  kernel runs either one tile per program (P = that bound; programs past the real count exit
  at once) or persistently (P = the programs resident on the GPU; none idle, no tail of empty
  launches), which is the default (``resident_programs``).

  Each program finds its segment on the device: it loads the E_local sizes and offsets, computes
  every segment's tile count, takes an inclusive cumsum and counts the entries <= its M tile
  index (an in-register search over at most a few hundred values: no prologue kernel, no host
  sync). Offsets are clamped to [0, C] and sizes to [0, C - offset], so even a corrupt layout
  can never address a row outside ``[0, C)``.

  Tile order: tile = m_tile * num_n_tiles + n_tile (N fastest). The ~130-260 programs resident
  at once cover a few M tiles across all N tiles: each x row tile is fetched from HBM once and
  re-read by the other N tiles from L2, and a group's M tiles run together so w[e] is fetched
  about once.

  Inside a group tile the x rows past the group's end are loaded anyway (row indices clamped to
  C-1, so loads need no row mask and stay in bounds) and computed, but never stored; this keeps
  the K loop free of row masks. The output store is masked to the segment's rows. That wasted
  work is the partial last tile of each group (half a tile per group on average: ~12% of the
  MMA work at 512 rows per group and BLOCK_M = 128). With HALF_TILES a tile holding at most
  BLOCK_M/2 rows runs a second, half-height copy of the K loop, which halves that waste.

  Operand loads: pointer tensors + ``cp.async`` multi-stage pipelining (default), or, with
  USE_TMA, device-side TMA descriptors made once per program (x as [C, K]; w as one
  [E*K, N] or [E*N, K] matrix, so B tiles must not cross experts along the reduction:
  ``tma_supported`` checks that on the host).

dw tiling (``grouped_gemm_dw_kernel``)
  Grid ``E_local * cdiv(K, BLOCK_M) * cdiv(N, BLOCK_N)``: one program per (expert, K tile, N tile)
  of dw, experts taken largest group first (an ``order`` permutation computed beside the launch),
  looping over the group's rows BLOCK_K at a time (rows past the group masked to zero on
  both operands, so values in neighbouring groups can never leak in, NaNs included). An empty
  group stores a zero tile. x tiles are loaded as [BLOCK_K rows, BLOCK_M] and transposed in
  registers/shared memory (``tl.trans``), which Hopper's wgmma takes as an MN-major operand.
  With USE_TMA each program makes descriptors whose row count ends at its group's last row,
  so TMA zero-fills the rows past the group instead of a mask. dw programs are not persistent:
  their work varies with the group size, and the hardware scheduler balances them.

Numerics: ``tl.dot`` accumulates in float32; bf16/fp16 inputs use tensor cores (wgmma on sm_90);
float32 inputs use ``INPUT_PRECISION`` ("ieee": exact float32 products; "tf32": tensor cores,
XLA's default GPU precision; the JAX backend follows ``jax_default_matmul_precision``). Outputs
are cast to the output pointer's element type. No atomics: results are deterministic.

All shapes and strides are compile-time constants (JAX shapes are static): contiguity is then
known to the compiler, which vectorizes loads and picks the async-copy/wgmma path.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl


@triton.jit
def _segment_table(sizes_ptr, offsets_ptr, C: tl.constexpr, E: tl.constexpr,
                   E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
  """Per-expert segment vectors (``[E_POW2]``, lanes >= E are empty) and the real M-tile count.

  Segment pair e = (gap before group e, group e); after the last pair comes the tail.
  Returns ``(cum, seg_tiles, gap_tiles, off, end, prev_end, pair_tiles, last_end, num_m_tiles)``:
  ``cum`` is the inclusive cumsum of ``seg_tiles`` (tiles of pair e), ``pair_tiles`` their sum,
  ``num_m_tiles`` all real M tiles, tail included.
  """
  idx = tl.arange(0, E_POW2)
  valid = idx < E
  # Sanitized layout: 0 <= off <= C, 0 <= size <= C - off. Invalid lanes are empty groups at C.
  off = tl.load(offsets_ptr + idx, mask=valid, other=C)
  off = tl.minimum(tl.maximum(off, 0), C)
  size = tl.load(sizes_ptr + idx, mask=valid, other=0)
  size = tl.minimum(tl.maximum(size, 0), C - off)
  end = off + size
  # End of the previous group (0 before the first), loaded shifted by one lane.
  has_prev = valid & (idx > 0)
  prev_off = tl.load(offsets_ptr + idx - 1, mask=has_prev, other=0)
  prev_off = tl.minimum(tl.maximum(prev_off, 0), C)
  prev_size = tl.load(sizes_ptr + idx - 1, mask=has_prev, other=0)
  prev_size = tl.minimum(tl.maximum(prev_size, 0), C - prev_off)
  prev_end = prev_off + prev_size
  gap = tl.maximum(off - prev_end, 0)

  gap_tiles = tl.where(valid, (gap + BLOCK_M - 1) // BLOCK_M, 0)
  group_tiles = tl.where(valid, (size + BLOCK_M - 1) // BLOCK_M, 0)
  seg_tiles = gap_tiles + group_tiles
  cum = tl.cumsum(seg_tiles, axis=0)  # inclusive
  pair_tiles = tl.sum(seg_tiles, axis=0)
  last_end = tl.max(tl.where(valid, end, 0), axis=0)
  num_m_tiles = pair_tiles + (C - last_end + BLOCK_M - 1) // BLOCK_M
  return cum, seg_tiles, gap_tiles, off, end, prev_end, pair_tiles, last_end, num_m_tiles


@triton.jit
def _locate(m_tile, cum, seg_tiles, gap_tiles, off, end, prev_end, pair_tiles, last_end,
            C: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
  """Map real M tile ``m_tile`` to ``(row_start, row_end, expert, is_group)``.

  The tile covers rows ``[row_start, min(row_start + BLOCK_M, row_end))``; ``is_group`` says
  whether they belong to expert ``expert`` (then the K loop runs) or to a gap/the tail (zeros
  are stored). The search is a count over the inclusive cumsum: the pair holding the tile is
  the number of pairs that end at or before it.
  """
  idx = tl.arange(0, E_POW2)
  e = tl.sum((cum <= m_tile).to(tl.int32), axis=0)
  sel = idx == e
  first = tl.sum(tl.where(sel, cum - seg_tiles, 0), axis=0)  # first tile of pair e
  e_gap_tiles = tl.sum(tl.where(sel, gap_tiles, 0), axis=0)
  e_off = tl.sum(tl.where(sel, off, 0), axis=0)
  e_end = tl.sum(tl.where(sel, end, 0), axis=0)
  e_prev_end = tl.sum(tl.where(sel, prev_end, 0), axis=0)

  in_pairs = e < E  # else: the tail [end of the last group, C)
  local = m_tile - tl.where(in_pairs, first, pair_tiles)
  in_gap = local < e_gap_tiles
  is_group = in_pairs & (local >= e_gap_tiles)
  seg_start = tl.where(in_pairs, tl.where(in_gap, e_prev_end, e_off), last_end)
  seg_end = tl.where(in_pairs, tl.where(in_gap, e_off, e_end), C)
  local = tl.where(is_group, local - e_gap_tiles, local)
  row_start = tl.minimum(seg_start + local * BLOCK_M, seg_end)
  return row_start, seg_end, e, is_group


@triton.jit
def _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row_start, row_end, e, is_group, n_tile,
               C: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
               STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
               STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr,
               STRIDE_YM: tl.constexpr, STRIDE_YN: tl.constexpr,
               TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
  """One output tile: rows ``[row_start, min(row_start + TILE_M, row_end))`` x N tile ``n_tile``.

  Group tiles run the K loop over ``x @ B[e]``; gap/tail tiles (``is_group`` false) store zeros.
  """
  offs_m = row_start + tl.arange(0, TILE_M)
  offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.arange(0, BLOCK_K)
  # Rows past the group are computed but never stored; clamping keeps their loads in bounds.
  rows = tl.minimum(offs_m, C - 1).to(tl.int64)
  if N % BLOCK_N == 0:
    cols = offs_n
  else:
    cols = tl.minimum(offs_n, N - 1)  # columns >= N are computed but never stored
  e_safe = tl.minimum(e, E - 1).to(tl.int64)
  a_ptrs = x_ptr + rows[:, None] * STRIDE_XM + offs_k[None, :] * STRIDE_XK
  b_ptrs = (w_ptr + e_safe * STRIDE_WE + offs_k[:, None] * STRIDE_WK
            + cols[None, :] * STRIDE_WN)

  k_iters = tl.where(is_group, (K + BLOCK_K - 1) // BLOCK_K, 0)
  acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
  for ki in range(0, k_iters):
    if USE_TMA:
      k0 = ki * BLOCK_K
      a = x_desc.load([row_start, k0])
      if STRIDE_WN == 1:
        b = w_desc.load([e_safe.to(tl.int32) * K + k0, n_tile * BLOCK_N])
      else:
        b = tl.trans(w_desc.load([e_safe.to(tl.int32) * N + n_tile * BLOCK_N, k0]))
    elif K % BLOCK_K == 0:
      a = tl.load(a_ptrs)
      b = tl.load(b_ptrs)
    else:
      k_left = K - ki * BLOCK_K
      a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
      b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    a_ptrs += BLOCK_K * STRIDE_XK
    b_ptrs += BLOCK_K * STRIDE_WK

  y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * STRIDE_YM + offs_n[None, :] * STRIDE_YN
  mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
  tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_gemm_kernel(
    x_ptr,        # [C, K] rows grouped by expert (recv_x, or dy for the dx product)
    w_ptr,        # [E, ...] expert weights; B[e][k, n] = w_ptr[e*STRIDE_WE + k*STRIDE_WK + n*STRIDE_WN]
    sizes_ptr,    # [E] int32 group sizes
    offsets_ptr,  # [E] int32 group offsets (non-decreasing, groups disjoint)
    y_ptr,        # [C, N] output; rows in no group get zeros
    C: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
    STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr,
    STRIDE_YM: tl.constexpr, STRIDE_YN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr,             # next power of two >= E (tl.arange needs one)
    INPUT_PRECISION: tl.constexpr,    # "ieee" | "tf32": only used for float32 inputs
    USE_TMA: tl.constexpr = False,    # operands through TMA descriptors (see ``tma_supported``)
    HALF_TILES: tl.constexpr = False,  # run tiles with <= BLOCK_M/2 rows as BLOCK_M/2-row tiles
):
  """y[rows of e] = x[rows of e] @ B[e]; zeros elsewhere. Grid: see the module docstring.

  Program p handles tiles p, p + P, p + 2P, ... of the real tile count (P = programs launched):
  with P = the static upper bound each program has at most one tile; with P = #SMs the kernel
  is persistent and no program is idle. With HALF_TILES, a tile holding at most BLOCK_M/2 rows
  (typically a group's last, partial tile) runs a second, half-height copy of the tile loop:
  the MMA work wasted on rows past the group's end halves.
  """
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  num_n_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
  cum, seg_tiles, gap_tiles, off, end, prev_end, pair_tiles, last_end, num_m_tiles = (
      _segment_table(sizes_ptr, offsets_ptr, C, E, E_POW2, BLOCK_M))
  num_tiles = num_m_tiles * num_n_tiles
  x_desc = 0  # placeholders when USE_TMA is off (never read)
  x_desc_half = 0
  w_desc = 0
  if USE_TMA:
    # Device-side TMA descriptors, made once per program (in Triton's global scratch). Rows
    # past C and columns past K/N read as zeros; w is seen as one 2-D matrix over all experts,
    # so a B tile must not cross into the next expert along the reduction dimension: either K
    # is a multiple of BLOCK_K (row-major B) or K is the contiguous, bounded dimension.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[C, K], strides=[STRIDE_XM, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if HALF_TILES:
      x_desc_half = tl.make_tensor_descriptor(x_ptr, shape=[C, K], strides=[STRIDE_XM, 1],
                                              block_shape=[BLOCK_M // 2, BLOCK_K])
    if STRIDE_WN == 1:
      w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * K, N], strides=[STRIDE_WK, 1],
                                         block_shape=[BLOCK_K, BLOCK_N])
    else:
      w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * N, K], strides=[STRIDE_WN, 1],
                                         block_shape=[BLOCK_N, BLOCK_K])

  for tile in range(pid, num_tiles, num_programs):
    m_tile = tile // num_n_tiles
    n_tile = tile % num_n_tiles
    row_start, row_end, e, is_group = _locate(
        m_tile, cum, seg_tiles, gap_tiles, off, end, prev_end, pair_tiles, last_end,
        C, E, E_POW2, BLOCK_M)
    if HALF_TILES and (row_end - row_start <= BLOCK_M // 2):
      _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc_half, w_desc, row_start, row_end, e, is_group,
                 n_tile, C, K, N, E, STRIDE_XM, STRIDE_XK, STRIDE_WE, STRIDE_WK, STRIDE_WN,
                 STRIDE_YM, STRIDE_YN, BLOCK_M // 2, BLOCK_N, BLOCK_K, INPUT_PRECISION, USE_TMA)
    else:
      _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row_start, row_end, e, is_group,
                 n_tile, C, K, N, E, STRIDE_XM, STRIDE_XK, STRIDE_WE, STRIDE_WK, STRIDE_WN,
                 STRIDE_YM, STRIDE_YN, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, USE_TMA)


@triton.jit
def grouped_gemm_dw_kernel(
    x_ptr,        # [C, K] recv_x
    dy_ptr,       # [C, N] output cotangent
    sizes_ptr,    # [E] int32
    offsets_ptr,  # [E] int32
    order_ptr,    # [E] int32 permutation: experts by decreasing group size (launch order)
    dw_ptr,       # [E, K, N] weight cotangent: dw[e] = x[rows of e]^T @ dy[rows of e]
    C: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
    STRIDE_DYM: tl.constexpr, STRIDE_DYN: tl.constexpr,
    STRIDE_DWE: tl.constexpr, STRIDE_DWK: tl.constexpr, STRIDE_DWN: tl.constexpr,
    BLOCK_M: tl.constexpr,   # tile of dw's K dimension
    BLOCK_N: tl.constexpr,   # tile of dw's N dimension
    BLOCK_K: tl.constexpr,   # rows reduced per step
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,  # TMA descriptors whose row count ends at the group's end
):
  """dw[e] = x[rows of e]^T @ dy[rows of e]. Grid: E * cdiv(K, BLOCK_M) * cdiv(N, BLOCK_N).

  Programs take experts in ``order`` (largest group first), so the longest reductions start
  first and small groups fill in behind them (longest-processing-time-first scheduling).
  """
  pid = tl.program_id(0)
  num_n_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
  num_k_tiles: tl.constexpr = (K + BLOCK_M - 1) // BLOCK_M
  e = tl.load(order_ptr + pid // (num_k_tiles * num_n_tiles))
  e = tl.minimum(tl.maximum(e, 0), E - 1)  # a corrupt order stays in bounds
  rest = pid % (num_k_tiles * num_n_tiles)
  k_tile = rest // num_n_tiles
  n_tile = rest % num_n_tiles

  off = tl.load(offsets_ptr + e)
  off = tl.minimum(tl.maximum(off, 0), C)
  size = tl.load(sizes_ptr + e)
  size = tl.minimum(tl.maximum(size, 0), C - off)
  end = off + size

  offs_k = k_tile * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_r = tl.arange(0, BLOCK_K)
  ks = offs_k if K % BLOCK_M == 0 else tl.minimum(offs_k, K - 1)
  ns = offs_n if N % BLOCK_N == 0 else tl.minimum(offs_n, N - 1)
  rows = off + offs_r
  x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * STRIDE_XM + ks[None, :] * STRIDE_XK
  dy_ptrs = dy_ptr + rows.to(tl.int64)[:, None] * STRIDE_DYM + ns[None, :] * STRIDE_DYN

  if USE_TMA:
    # Descriptors that end at the group's last row: TMA zero-fills the rows past it.
    rows_end = tl.maximum(end, 1)  # an empty group loads nothing; keep the descriptor valid
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[rows_end, K], strides=[STRIDE_XM, 1],
                                       block_shape=[BLOCK_K, BLOCK_M])
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[rows_end, N], strides=[STRIDE_DYM, 1],
                                        block_shape=[BLOCK_K, BLOCK_N])

  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  for ri in range(0, (size + BLOCK_K - 1) // BLOCK_K):
    if USE_TMA:
      r0 = off + ri * BLOCK_K
      xt = x_desc.load([r0, k_tile * BLOCK_M])
      g = dy_desc.load([r0, n_tile * BLOCK_N])
    else:
      in_group = (rows < end)[:, None]
      xt = tl.load(x_ptrs, mask=in_group, other=0.0)    # [BLOCK_K, BLOCK_M]
      g = tl.load(dy_ptrs, mask=in_group, other=0.0)    # [BLOCK_K, BLOCK_N]
    acc = tl.dot(tl.trans(xt), g, acc, input_precision=INPUT_PRECISION)
    rows += BLOCK_K
    x_ptrs += BLOCK_K * STRIDE_XM
    dy_ptrs += BLOCK_K * STRIDE_DYM

  dw_ptrs = (dw_ptr + e.to(tl.int64) * STRIDE_DWE + offs_k.to(tl.int64)[:, None] * STRIDE_DWK
             + offs_n[None, :] * STRIDE_DWN)
  mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
  tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host-side helpers (plain ints; no framework): tile table, grid sizes and compile-time constants.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """One launch configuration of a grouped GEMM kernel."""

  block_m: int
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int


def _pow2_at_least(n: int, floor: int = 1) -> int:
  p = floor
  while p < n:
    p *= 2
  return p


def _clamp_block(block: int, extent: int, floor: int = 16) -> int:
  """``block`` shrunk to the next power of two >= extent (never below ``floor``)."""
  return min(block, _pow2_at_least(extent, floor))


def _base_config(N: int, dtype: str, input_precision: str) -> TileConfig:
  if dtype in ("float32", "fp32"):
    if input_precision == "ieee":  # CUDA-core FMA products: small tiles
      return TileConfig(64, 64, 32, 4, 3)
    return TileConfig(128, 128, 32, 8, 3)  # tf32 tensor cores: half the bf16 K depth
  if N >= 256:
    # Two consumer warpgroups, each a 64x256 wgmma; 3 stages x (128x64 + 64x256) x 2 B = 144 KiB.
    return TileConfig(128, 256, 64, 8, 3)
  return TileConfig(128, 128, 64, 8, 4)


def forward_config(K: int, N: int, dtype: str, input_precision: str = "ieee") -> TileConfig:
  """Tiles for y[C, N] = x[C, K] @ w[e][K, N] (also used for dx, with K and N swapped).

  Hopper, 16-bit inputs: 128x256x64 with 8 warps when N is wide, 128x128x64 / 4 stages
  otherwise; blocks shrink to the next power of two >= the dimension for small shapes.
  """
  cfg = _base_config(N, dtype, input_precision)
  return TileConfig(cfg.block_m, _clamp_block(cfg.block_n, N), _clamp_block(cfg.block_k, K),
                    cfg.num_warps, cfg.num_stages)


def dw_config(K: int, N: int, dtype: str, input_precision: str = "ieee") -> TileConfig:
  """Tiles for dw[e][K, N] = x_e^T @ dy_e (block_m tiles K, block_k runs over the group's rows)."""
  cfg = _base_config(N, dtype, input_precision)
  return TileConfig(_clamp_block(cfg.block_m, K), _clamp_block(cfg.block_n, N), cfg.block_k,
                    cfg.num_warps, cfg.num_stages)


def forward_grid(C: int, N: int, E: int, cfg: TileConfig, max_programs: int | None = None) -> int:
  """Programs of ``grouped_gemm_kernel``.

  The static upper bound on the real tiles (M tiles of all segments x N tiles), or, when
  ``max_programs`` is given (e.g. resident CTAs on the GPU, see ``resident_programs``), at most
  that many: the kernel is then persistent, each program looping over tiles.
  """
  bound = (triton.cdiv(C, cfg.block_m) + 2 * E) * triton.cdiv(N, cfg.block_n)
  return bound if max_programs is None else max(1, min(bound, max_programs))


def resident_programs(num_sms: int, cfg: TileConfig, elem_bytes: int) -> int:
  """Programs of ``cfg`` that are surely resident at once (a persistent launch must not ask for
  more: the extra programs would only start after the first ones finish all their tiles).

  Bounded by shared memory (227 KiB per Hopper SM) and, conservatively, registers (64 Ki per
  SM; the f32 accumulator tile plus ~96 registers a thread), at most 2 per SM.
  """
  smem = cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * elem_bytes
  by_smem = (227 * 1024) // max(smem, 1)
  threads = cfg.num_warps * 32
  regs = min(255, cfg.block_m * cfg.block_n // threads + 96)
  by_regs = 65536 // (threads * regs)
  return num_sms * max(1, min(2, by_smem, by_regs))


def dw_grid(K: int, N: int, E: int, cfg: TileConfig) -> int:
  """Programs of ``grouped_gemm_dw_kernel``."""
  return E * triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n)


def tma_supported(K: int, N: int, E: int, cfg: TileConfig, *, w_strides: tuple[int, int, int],
                  elem_bytes: int, dw: bool = False) -> bool:
  """Whether the TMA variant applies: 16-byte aligned strides, one contiguous dimension per
  operand, B tiles that never cross experts along the reduction, int32 descriptor shapes."""
  if (K * elem_bytes) % 16 or (N * elem_bytes) % 16:
    return False
  if dw:
    return True
  we, wk, wn = w_strides
  if wn == 1:
    return we == K * wk and K % cfg.block_k == 0 and E * K < 2**31
  if wk == 1:
    return we == N * wn and E * N < 2**31
  return False


def forward_constexprs(C: int, K: int, N: int, E: int, cfg: TileConfig, *,
                       x_strides: tuple[int, int], w_strides: tuple[int, int, int],
                       y_strides: tuple[int, int], input_precision: str = "ieee",
                       use_tma: bool = False, half_tiles: bool = False) -> dict:
  """Compile-time constants of ``grouped_gemm_kernel`` (strides in elements).

  ``w_strides`` are (expert, k, n) strides of the B operand: for the forward product on a
  row-major ``w [E, K, N]`` they are ``(K*N, N, 1)``; for dx = dy @ w[e]^T on the same ``w
  [E, H, N]`` (now K = N_fwd and N = H) they are ``(H*N_fwd, 1, N_fwd)``.
  """
  return dict(C=C, K=K, N=N, E=E,
              STRIDE_XM=x_strides[0], STRIDE_XK=x_strides[1],
              STRIDE_WE=w_strides[0], STRIDE_WK=w_strides[1], STRIDE_WN=w_strides[2],
              STRIDE_YM=y_strides[0], STRIDE_YN=y_strides[1],
              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              E_POW2=_pow2_at_least(E, 2), INPUT_PRECISION=input_precision, USE_TMA=use_tma,
              HALF_TILES=half_tiles and cfg.block_m >= 32)  # tl.dot needs M >= 16


def dw_constexprs(C: int, K: int, N: int, E: int, cfg: TileConfig, *,
                  input_precision: str = "ieee", use_tma: bool = False) -> dict:
  """Compile-time constants of ``grouped_gemm_dw_kernel`` for row-major x [C,K], dy [C,N], dw [E,K,N]."""
  return dict(C=C, K=K, N=N, E=E,
              STRIDE_XM=K, STRIDE_XK=1, STRIDE_DYM=N, STRIDE_DYN=1,
              STRIDE_DWE=K * N, STRIDE_DWK=N, STRIDE_DWN=1,
              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              INPUT_PRECISION=input_precision, USE_TMA=use_tma)
