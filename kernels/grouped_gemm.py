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

Forward tiling: the tile table and the static grid (``grouped_gemm_kernel``)
  Rows 0..C are cut into *group tiles* and *zero tiles*. Group e is covered by
  ceil(size[e] / BLOCK_M) M tiles starting at its first row, so a tile never straddles two
  experts; the rows in no group (the gap before each group and the tail after the last) are
  covered, segment by segment, by zero tiles. ``tile_table`` lists both, as (row_start, row_end,
  expert) records, computed beside the launch on the device from the device-resident sizes and
  offsets (no host sync): by one small Triton launch (kernels/gemm_tables.py), with
  ``tile_table`` below as its specification in array code. Each program then finds
  its tile with three scalar loads instead of a search over the experts (the in-kernel search it
  replaces cost about twenty CTA barriers per tile, which mattered at short K).

  Program p handles group tiles p, p + P, p + 2P, ... of the real count (read from the table),
  then zero tiles in reverse program order (P-1-p, 2P-1-p, ...: the programs that got one group
  tile fewer take the zero tiles first). Group tiles all run the same constant-trip-count K loop
  (``K / BLOCK_K`` iterations), which is what lets Triton flatten the tile and K loops (FLATTEN)
  and warp-specialize the K loop (WARP_SPEC). The grid is either one program per possible tile
  (P = ``forward_grid``'s bound; programs past the real count exit at once) or persistent
  (P = the programs resident on the GPU, ``resident_programs``), the default.

  Tile order: group tile = m_tile * num_n_tiles + n_tile (N fastest). The ~130-260 programs
  resident at once cover a few M tiles across all N tiles: each x row tile is fetched from HBM
  once and re-read by the other N tiles from L2, and a group's M tiles run together, so each
  column block of w[e] is streamed through L2 about once.

  Inside a group tile the x rows past the group's end are loaded anyway (row indices clamped to
  C-1, so loads need no row mask and stay in bounds) and computed, but never stored; this keeps
  the K loop free of row masks. The output store is masked to the group's rows. That wasted
  work is the partial last tile of each group (half a tile per group on average: ~11% of the
  MMA work at 512 rows per group and BLOCK_M = 128, ~18% at 256). With HALF_TILES a tile holding
  at most BLOCK_M/2 rows runs a second, half-height copy of the K loop, which halves that waste
  (it needs an if/else around two loops, so it excludes FLATTEN and WARP_SPEC).

  Operand loads: pointer tensors + ``cp.async`` multi-stage pipelining, or, with USE_TMA (the
  default for 16-bit inputs where ``tma_supported``), device-side TMA descriptors made once per
  program (x as [C, K]; w as one [E*K, N] or [E*N, K] matrix, so B tiles must not cross
  experts along the reduction: ``tma_supported`` checks that on the host). Device-side
  descriptors live in Triton's global scratch (128-byte aligned), which the FFI launcher must
  provide. WARP_SPEC (TMA only; 4 warps
  per group) lets Triton's Hopper warp specialization split each program into a producer
  warpgroup issuing the TMA loads and two consumer warpgroups (64 rows of the tile each,
  ``setmaxnreg`` 232/40): 12 warps in all, and the producer runs ahead into the next tile while
  the consumers store the current one.

dw tiling (``grouped_gemm_dw_kernel``)
  Grid ``E_local * cdiv(K, BLOCK_M) * cdiv(N, BLOCK_N)``: one program per (expert, K tile, N tile)
  of dw, experts taken largest group first (an ``order`` permutation computed beside the launch),
  looping over the group's rows BLOCK_K at a time (rows past the group masked to zero on
  both operands, so values in neighbouring groups can never leak in, NaNs included). An empty
  group stores a zero tile. x tiles are loaded as [BLOCK_K rows, BLOCK_M] and transposed in
  registers/shared memory (``tl.trans``), which Hopper's wgmma takes as an MN-major operand.
  With USE_TMA each program makes descriptors whose row count ends at its group's last row,
  so TMA zero-fills the rows past the group instead of a mask. dw programs are not persistent:
  their work varies with the group size, and the hardware scheduler balances them. A group of
  256-512 rows gives each program only 4-8 steps of its loop, so the prologue and the store of
  every tile weigh; tiles small enough for two programs per SM (128 x 128, 3 stages: 96 KiB,
  ~100 registers at 8 warps) would overlap one program's store with another's loop, at 4/3 the
  L2 bytes per FLOP of 128 x 256 (the benchmark's sweep weighs the two).
  ``grouped_gemm_dw_flat_kernel`` (``TileConfig.flatten``, opt-in) removes those
  per-tile drains: program (expert segment, K tile, N tile) walks the row steps of every expert
  of its segment in one pipelined loop (a step table beside the launch, like the forward's tile
  table) and stores each expert's tile at its last step; segments split the experts only where
  the dw tiles alone are too few to fill the GPU. Same per-expert steps, masks and order. Each
  step's table record is loaded one step ahead into registers: with the load inside the step,
  Triton 3.6 saw the tile addresses hang on it and prefetched tiles only one step ahead (2
  buffers); now it keeps num_stages - 1 steps in flight (3 buffers at 3 stages).

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

# Tile table: int32 [1 + max_group_tiles + max_zero_tiles, TABLE_COLS] (see ``tile_table``).
TABLE_COLS = 4


@triton.jit
def _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row_start, row_end, e, n_tile,
               C: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
               STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
               STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr,
               STRIDE_YM: tl.constexpr, STRIDE_YN: tl.constexpr,
               TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr):
  """One group tile: rows ``[row_start, min(row_start + TILE_M, row_end))`` x N tile ``n_tile``
  of ``x @ B[e]`` (K loop of constant length), stored masked to those rows."""
  offs_m = row_start + tl.arange(0, TILE_M)
  offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.arange(0, BLOCK_K)
  # Rows past the group are computed but never stored; clamping keeps their loads in bounds.
  rows = tl.minimum(offs_m, C - 1).to(tl.int64)
  if N % BLOCK_N == 0:
    cols = offs_n
  else:
    cols = tl.minimum(offs_n, N - 1)  # columns >= N are computed but never stored
  a_ptrs = x_ptr + rows[:, None] * STRIDE_XM + offs_k[None, :] * STRIDE_XK
  b_ptrs = (w_ptr + e.to(tl.int64) * STRIDE_WE + offs_k[:, None] * STRIDE_WK
            + cols[None, :] * STRIDE_WN)

  K_ITERS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
  acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
  for ki in tl.range(0, K_ITERS, warp_specialize=WARP_SPEC):
    if USE_TMA:
      k0 = ki * BLOCK_K
      a = x_desc.load([row_start, k0])
      if STRIDE_WN == 1:
        b = w_desc.load([e * K + k0, n_tile * BLOCK_N])
      else:
        b = tl.trans(w_desc.load([e * N + n_tile * BLOCK_N, k0]))
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
    tiles_ptr,    # int32 tile table from ``tile_table`` (same C, E, BLOCK_M)
    y_ptr,        # [C, N] output; rows in no group get zeros
    C: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
    STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr,
    STRIDE_YM: tl.constexpr, STRIDE_YN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAX_GROUP_TILES: tl.constexpr,    # table rows of group tiles (``table_bounds``)
    MAX_ZERO_TILES: tl.constexpr,     # table rows of zero tiles
    INPUT_PRECISION: tl.constexpr,    # "ieee" | "tf32": only used for float32 inputs
    USE_TMA: tl.constexpr = False,    # operands through TMA descriptors (see ``tma_supported``)
    HALF_TILES: tl.constexpr = False,  # run tiles with <= BLOCK_M/2 rows as BLOCK_M/2-row tiles
    WARP_SPEC: tl.constexpr = False,  # Hopper warp specialization of the K loop (USE_TMA only)
    FLATTEN: tl.constexpr = False,    # fuse the tile and K loops into one pipelined loop
):
  """y[rows of e] = x[rows of e] @ B[e]; zeros elsewhere. Grid: see the module docstring."""
  pid = tl.program_id(0)
  num_programs = tl.num_programs(0)
  NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
  # Counts from the table's header, clamped to its size: a corrupt table stays in bounds.
  num_group = tl.minimum(tl.maximum(tl.load(tiles_ptr), 0), MAX_GROUP_TILES)
  num_zero = tl.minimum(tl.maximum(tl.load(tiles_ptr + 1), 0), MAX_ZERO_TILES)
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

  for tile in tl.range(pid, num_group * NUM_N, num_programs, flatten=FLATTEN):
    m_tile = tile // NUM_N
    n_tile = tile % NUM_N
    rec = tiles_ptr + (1 + m_tile) * 4
    row_start = tl.minimum(tl.maximum(tl.load(rec), 0), C)
    row_end = tl.minimum(tl.maximum(tl.load(rec + 1), row_start), C)
    e = tl.minimum(tl.maximum(tl.load(rec + 2), 0), E - 1)
    if HALF_TILES and (row_end - row_start <= BLOCK_M // 2):
      _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc_half, w_desc, row_start, row_end, e, n_tile,
                 C, K, N, STRIDE_XM, STRIDE_XK, STRIDE_WE, STRIDE_WK, STRIDE_WN,
                 STRIDE_YM, STRIDE_YN, BLOCK_M // 2, BLOCK_N, BLOCK_K, INPUT_PRECISION, USE_TMA,
                 WARP_SPEC)
    else:
      _gemm_tile(x_ptr, w_ptr, y_ptr, x_desc, w_desc, row_start, row_end, e, n_tile,
                 C, K, N, STRIDE_XM, STRIDE_XK, STRIDE_WE, STRIDE_WK, STRIDE_WN,
                 STRIDE_YM, STRIDE_YN, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, USE_TMA,
                 WARP_SPEC)

  # Rows in no group: zeros, BLOCK_M x BLOCK_N at a time, in reverse program order.
  zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
  for z in range(num_programs - 1 - pid, num_zero * NUM_N, num_programs):
    rec = tiles_ptr + (1 + MAX_GROUP_TILES + z // NUM_N) * 4
    row_start = tl.minimum(tl.maximum(tl.load(rec), 0), C)
    row_end = tl.minimum(tl.maximum(tl.load(rec + 1), row_start), C)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = (z % NUM_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * STRIDE_YM + offs_n[None, :] * STRIDE_YN
    tl.store(y_ptrs, zeros, mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))


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
    WARP_SPEC: tl.constexpr = False,  # Hopper warp specialization of the row loop (USE_TMA only)
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
  for ri in tl.range(0, (size + BLOCK_K - 1) // BLOCK_K, warp_specialize=WARP_SPEC):
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


@triton.jit
def _field(rec, col, i: tl.constexpr):
  """Field ``i`` of a step record held in registers (``col = arange(4)``)."""
  return tl.sum(tl.where(col == i, rec, 0), axis=0)


@triton.jit
def grouped_gemm_dw_flat_kernel(
    x_ptr,        # [C, K] recv_x
    dy_ptr,       # [C, N] output cotangent
    steps_ptr,    # int32 [MAX_STEPS, 4] row steps from ``dw_step_table`` (MAX_STEPS >= 1)
    first_ptr,    # int32 [E + 1]: expert e's steps are [first[e], first[e + 1])
    dw_ptr,       # [E, K, N] weight cotangent
    C: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_XM: tl.constexpr, STRIDE_XK: tl.constexpr,
    STRIDE_DYM: tl.constexpr, STRIDE_DYN: tl.constexpr,
    STRIDE_DWE: tl.constexpr, STRIDE_DWK: tl.constexpr, STRIDE_DWN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_SEGS: tl.constexpr,   # expert segments (``dw_flat_segments``)
    MAX_STEPS: tl.constexpr,  # rows of the step table
    INPUT_PRECISION: tl.constexpr,
):
  """dw[e] = x[rows of e]^T @ dy[rows of e], one flat loop per program.

  Grid: NUM_SEGS * cdiv(K, BLOCK_M) * cdiv(N, BLOCK_N). Program (segment s, K tile, N tile)
  owns that dw tile of the experts [s * E // NUM_SEGS, (s + 1) * E // NUM_SEGS) and walks all
  their row steps (BLOCK_K rows of one expert each) in one pipelined loop, storing and
  clearing the accumulator at each expert's last step: the loads of the next expert's rows are
  in flight while this one's tile is stored, where the per-expert kernel drains its pipeline
  every 256-512 rows. Same steps, masks and order per expert as ``grouped_gemm_dw_kernel``.
  """
  pid = tl.program_id(0)
  num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
  num_k: tl.constexpr = (K + BLOCK_M - 1) // BLOCK_M
  seg = pid // (num_k * num_n)
  rest = pid % (num_k * num_n)
  k_tile = rest // num_n
  n_tile = rest % num_n
  e_lo = seg * E // NUM_SEGS
  e_hi = (seg + 1) * E // NUM_SEGS

  offs_k = k_tile * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_r = tl.arange(0, BLOCK_K)
  ks = offs_k if K % BLOCK_M == 0 else tl.minimum(offs_k, K - 1)
  ns = offs_n if N % BLOCK_N == 0 else tl.minimum(offs_n, N - 1)
  tile = offs_k.to(tl.int64)[:, None] * STRIDE_DWK + offs_n[None, :] * STRIDE_DWN
  mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)

  # Experts of the segment with no rows: a zero tile (their steps are empty).
  zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=dw_ptr.dtype.element_ty)
  for e in range(e_lo, e_hi):
    if tl.load(first_ptr + e + 1) <= tl.load(first_ptr + e):
      tl.store(dw_ptr + tl.cast(e, tl.int64) * STRIDE_DWE + tile, zeros, mask=mask)

  # Step bounds clamped to the table: a corrupt table stays in bounds.
  s_lo = tl.minimum(tl.maximum(tl.load(first_ptr + e_lo), 0), MAX_STEPS)
  s_hi = tl.minimum(tl.maximum(tl.load(first_ptr + e_hi), s_lo), MAX_STEPS)
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  # Each step's record is loaded one iteration ahead into registers, so the tile addresses of
  # a step do not hang on a load of that step: Triton then prefetches the tiles STAGES - 1
  # steps ahead (loading the record inside the step left it one step ahead).
  col = tl.arange(0, 4)
  nxt = tl.load(steps_ptr + tl.minimum(s_lo, MAX_STEPS - 1) * 4 + col)
  for st in tl.range(s_lo, s_hi):
    rec = nxt
    nxt = tl.load(steps_ptr + tl.minimum(st + 1, MAX_STEPS - 1) * 4 + col)
    r0 = tl.minimum(tl.maximum(_field(rec, col, 0), 0), C)
    r1 = tl.minimum(tl.maximum(_field(rec, col, 1), r0), C)
    rows = r0 + offs_r
    in_step = (rows < r1)[:, None]
    xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * STRIDE_XM + ks[None, :] * STRIDE_XK,
                 mask=in_step, other=0.0)                                   # [BLOCK_K, BLOCK_M]
    g = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * STRIDE_DYM + ns[None, :] * STRIDE_DYN,
                mask=in_step, other=0.0)                                    # [BLOCK_K, BLOCK_N]
    acc = tl.dot(tl.trans(xt), g, acc, input_precision=INPUT_PRECISION)
    if _field(rec, col, 3) != 0:  # the expert's last step: store its tile, start the next
      e = tl.minimum(tl.maximum(_field(rec, col, 2), 0), E - 1)
      tl.store(dw_ptr + e.to(tl.int64) * STRIDE_DWE + tile, acc.to(dw_ptr.dtype.element_ty),
               mask=mask)
      acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


# ---------------------------------------------------------------------------------------------
# Host-side helpers (plain ints, or array code generic over numpy / jax.numpy): the tile table,
# tile configurations, grid sizes and compile-time constants.
# ---------------------------------------------------------------------------------------------


def table_bounds(C: int, E: int, block_m: int) -> tuple[int, int]:
  """(max group tiles, max zero tiles) of ``tile_table``: sum(ceil(len / BLOCK_M)) over E groups
  is < C / BLOCK_M + E, and over the E gaps and the tail < C / BLOCK_M + E + 1."""
  m = triton.cdiv(C, block_m)
  return m + E, m + E + 1


def tile_table(sizes, offsets, C: int, E: int, block_m: int, xp):
  """The forward kernel's tile table, computed with ``xp`` (numpy, or jax.numpy on the device).

  Returns int32 ``[1 + max_group_tiles + max_zero_tiles, 4]``:
    row 0                        (number of group tiles, number of zero tiles, 0, 0)
    row 1 + m                    group M tile m: (row_start, row_end, expert, span); the tile
                                 covers rows [row_start, min(row_start + BLOCK_M, row_end));
                                 span = first << 16 | count: the expert's group tiles are
                                 first .. first + count - 1 (count clipped to 65535; 0 where
                                 first >= 32768: see ``expert_raster_ok``)
    row 1 + max_group_tiles + z  zero M tile z: (row_start, row_end, 0, 0)
  Group tiles are in expert order, each group cut from its first row; zero tiles cover the gap
  before each group and the tail after the last, in row order. Offsets are clamped to [0, C] and
  sizes to [0, C - offset] (a corrupt layout never yields a row outside [0, C)); groups must be
  in expert order and disjoint, as dispatch lays them out. Rows past the counts are zeros.
  """
  max_g, max_z = table_bounds(C, E, block_m)
  off, size = _clamp_groups(sizes, offsets, C, xp)
  end = off + size

  g_tiles = (size + block_m - 1) // block_m
  ge, g_local, g_valid, num_g = _locate(g_tiles, max_g, xp)
  g_start = xp.where(g_valid, off[ge] + g_local * block_m, 0)
  g_end = xp.where(g_valid, end[ge], 0)
  first = xp.arange(max_g, dtype=xp.int32) - g_local
  span = xp.where(g_valid & (first < 32768),
                  first * 65536 + xp.minimum(g_tiles[ge], 65535), 0).astype(xp.int32)
  group_rows = xp.stack([g_start, g_end, xp.where(g_valid, ge, 0), span], axis=1)

  # Segments in no group: the gap before each group (from the previous group's end), the tail.
  prev_end = xp.concatenate([xp.zeros((1,), xp.int32), end[:-1]])
  seg_start = xp.concatenate([prev_end, xp.max(end, keepdims=True)])
  seg_end = xp.concatenate([off, xp.full((1,), C, xp.int32)])
  z_len = xp.maximum(seg_end - seg_start, 0)
  zs, z_local, z_valid, num_z = _locate((z_len + block_m - 1) // block_m, max_z, xp)
  z_start = xp.where(z_valid, seg_start[zs] + z_local * block_m, 0)
  z_end = xp.where(z_valid, seg_end[zs], 0)
  zero = xp.zeros_like(zs)
  zero_rows = xp.stack([z_start, z_end, zero, zero], axis=1)

  header = xp.stack([xp.minimum(num_g, max_g), xp.minimum(num_z, max_z),
                     xp.zeros_like(num_g), xp.zeros_like(num_g)])[None, :]
  return xp.concatenate([header, group_rows, zero_rows], axis=0).astype(xp.int32)


def expert_raster_ok(C: int, E: int, block_m: int) -> bool:
  """Whether every group tile's span (``tile_table``'s column 3) fits its 16-bit fields, so a
  kernel may walk the tiles expert by expert (``TileConfig.expert_raster``)."""
  return table_bounds(C, E, block_m)[0] < 32768


def _clamp_groups(sizes, offsets, C: int, xp):
  """(offsets clamped to [0, C], sizes to [0, C - offset]) as int32: a corrupt layout never
  yields a row outside [0, C)."""
  off = xp.clip(xp.asarray(offsets).astype(xp.int32), 0, C)
  return off, xp.clip(xp.asarray(sizes).astype(xp.int32), 0, C - off)


def _locate(seg_tiles, count: int, xp):
  """For each of ``count`` tiles laid out segment after segment (``seg_tiles[i]`` tiles in
  segment i): (segment index, tile index within the segment, valid, total tiles)."""
  cum = xp.cumsum(seg_tiles)
  t = xp.arange(count, dtype=xp.int32)
  seg = xp.sum((cum[None, :] <= t[:, None]).astype(xp.int32), axis=1)  # searchsorted right
  seg = xp.minimum(seg, seg_tiles.shape[0] - 1)
  return seg, t - (cum[seg] - seg_tiles[seg]), t < cum[-1], cum[-1]


def dw_max_steps(C: int, E: int, block_k: int) -> int:
  """Rows of ``dw_step_table``: sum(ceil(size / BLOCK_K)) over E disjoint groups in C rows."""
  return triton.cdiv(C, block_k) + E


def dw_step_table(sizes, offsets, C: int, E: int, block_k: int, xp):
  """The row steps of ``grouped_gemm_dw_flat_kernel``, computed with ``xp`` beside the launch.

  Returns (steps int32 ``[dw_max_steps, 4]``, first int32 ``[E + 1]``): expert e's steps are
  rows first[e] .. first[e + 1] - 1 of ``steps``, each (row_start, row_end, e, last): rows
  [row_start, min(row_start + BLOCK_K, row_end)) of its group, last = 1 on its final step.
  Offsets and sizes are clamped as in ``tile_table``; rows past the real steps are zeros.
  """
  max_s = dw_max_steps(C, E, block_k)
  off, size = _clamp_groups(sizes, offsets, C, xp)
  n_steps = (size + block_k - 1) // block_k
  ge, local, valid, _ = _locate(n_steps, max_s, xp)
  start = xp.where(valid, off[ge] + local * block_k, 0)
  end = xp.where(valid, off[ge] + size[ge], 0)
  last = xp.where(valid & (local == n_steps[ge] - 1), 1, 0)
  steps = xp.stack([start, end, xp.where(valid, ge, 0), last], axis=1).astype(xp.int32)
  first = xp.concatenate([xp.zeros((1,), xp.int32), xp.cumsum(n_steps).astype(xp.int32)])
  return steps, xp.minimum(first, max_s).astype(xp.int32)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """One launch configuration of a grouped GEMM kernel.

  ``half_tiles``, ``warp_spec``, ``flatten`` and ``persistent`` are forward-kernel switches;
  ``warp_spec`` and ``flatten`` take effect only on the TMA path, never together, and
  ``half_tiles`` excludes both (see the module docstring). ``persistent``: one program per
  resident CTA looping over tiles, else one program per possible tile. For dw, ``warp_spec``
  (TMA only) and ``flatten``: ``grouped_gemm_dw_flat_kernel``, each program one flat loop over
  the row steps of a segment of experts (pointer loads). ``gluon``: a Gluon kernel of
  kernels/grouped_gemm_gluon.py (16-bit inputs, 128-row tiles on 8 warps, K and N multiples of
  the tile; elsewhere the Triton kernels run): for dw the flat kernel's loop with TMA loads and
  stores (else the flat kernel), for fwd/dx on the TMA path the warp-specialized
  ``grouped_gemm_ws_kernel`` (also 256-row tiles; shared memory for the stages and one output
  tile, or half of one: 3 or 4 stages at 128 x 256 x 64). ``group_m`` (that kernel only): its
  tiles walked ``group_m`` group tiles at a time, M fastest, instead of N fastest; with
  ``persistent=False`` it runs one program per tile. ``expert_raster`` (with ``group_m``):
  those runs of ``group_m`` group tiles never cross an expert (each expert's tiles are cut
  into runs from its first), so every w tile of an expert is read by its m-tiles side by side
  rather than by two runs far apart in time. ``store_chunks`` (Gluon dw): each finished tile
  goes out in that many column chunks, one per following row step, instead of all at once;
  ``trim_partial`` (Gluon dw): a group's partial last row step multiplies only the 16-row
  slices that hold its rows. ``warp_spec`` with ``gluon`` for dw: the warp-specialized Gluon dw
  kernel (a producer warp, two consumer warpgroups each owning 64 of the tile's rows), whose
  second warpgroup starts ``stagger`` row steps behind the first, so that their tile
  epilogues do not coincide; there ``store_chunks`` (1 or 2) splits each half's store.
  ``band_n`` (both Gluon dw kernels): the programs walk the (K tile, N tile) grid in bands of
  that many n-tiles, n fastest within a band (0: n fastest over all of N), so that the
  programs resident at once read fewer distinct columns of x and dy (``dw_program_coords``).
  """

  block_m: int
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int
  half_tiles: bool = True
  warp_spec: bool = False
  flatten: bool = False
  persistent: bool = True
  gluon: bool = False
  group_m: int = 1
  expert_raster: bool = False
  store_chunks: int = 1
  trim_partial: bool = False
  stagger: int = 0
  band_n: int = 0

  def table_entry(self) -> str:
    """This config as a ``TUNED`` value (what the benchmark's sweep prints for its winners)."""
    extra = "".join(f", {f}={getattr(self, f)}" for f, d in (("half_tiles", True),
                                                             ("warp_spec", False),
                                                             ("flatten", False),
                                                             ("persistent", True),
                                                             ("gluon", False),
                                                             ("group_m", 1),
                                                             ("expert_raster", False),
                                                             ("store_chunks", 1),
                                                             ("trim_partial", False),
                                                             ("stagger", 0),
                                                             ("band_n", 0))
                    if getattr(self, f) != d)
    return (f"TileConfig({self.block_m}, {self.block_n}, {self.block_k}, {self.num_warps}, "
            f"{self.num_stages}{extra})")


# Measured winners for exact shapes, checked before the rules in ``_base_config``:
# (phase, K, N, dtype, tma) -> TileConfig, phase "fwd" | "dx" | "dw" (K, N as the kernel sees
# them: dx of an [E, H, F] weight is K=F, N=H; dw's K is H). ``benchmarks/bench_grouped_gemm.py
# --sweep`` prints its winners in this format.
TUNED: dict[tuple[str, int, int, str, bool], TileConfig] = {
    # Qwen3-MoE-like shapes (short reductions): the flattened TMA tiles with 4 stages instead
    # of 3, measured on one H200 (2026-11-21 15:11-15:12, 5 samples each, outputs bit-equal
    # to the 3-stage default): qwen3_up fwd 486 vs 447 TFLOP/s, dx 484 vs 450; qwen3_down fwd
    # 424 vs 411, dx 433 vs 409. (The DeepSeek-V3 up shape lost 8 % with 4 stages; down even.)
    ("fwd", 2048, 1536, "bfloat16", True): TileConfig(128, 256, 64, 8, 4, half_tiles=False,
                                                      flatten=True),
    ("dx", 1536, 2048, "bfloat16", True): TileConfig(128, 256, 64, 8, 4, half_tiles=False,
                                                     flatten=True),
    ("fwd", 768, 2048, "bfloat16", True): TileConfig(128, 256, 64, 8, 4, half_tiles=False,
                                                     flatten=True),
    ("dx", 2048, 768, "bfloat16", True): TileConfig(128, 256, 64, 8, 4, half_tiles=False,
                                                    flatten=True),
    # DeepSeek-V3 up (H=7168, N=4096): the Gluon dw kernel (TMA loads and stores). dw alone on
    # three H200 machines (2026-11-22, benchmarks/bench_dw_variants.py and its predecessor,
    # two rounds each): 4.12 / 4.15 vs 4.42 / 4.49 ms for the per-(expert, tile) kernel,
    # 4.18 / 4.17 vs 4.18 / 4.20, 4.20 / 4.16 vs 4.40 / 4.41; a fourth (01:16) 4.21 / 4.20 vs
    # 4.22 / 4.19: equal within noise or up to 7 % faster. Where Gluon is unavailable (Triton
    # other than 3.5/3.6) the flat kernel runs. Its tiles leave in 8 column chunks over the
    # following row steps (``store_chunks``) and a group's partial last step multiplies only
    # its rows' 16-row slices (``trim_partial``): 2026-11-23 03:34, one H200, dw looped, two
    # rounds, 3.450 / 3.602 ms vs 4.022 / 4.053 without either (4 chunks alone 3.828 / 3.769,
    # 8 alone 3.828 / 3.735); DeepSeek-V3 down 1.886 / 1.809 vs 2.048 / 2.079. Programs in
    # bands of 8 n-tiles (``band_n``; with n fastest over all of N each wave re-read all of
    # dy from DRAM per expert): 2026-11-23 21:44, one H200, dw looped, three rounds, 3.705 /
    # 3.664 / 3.657 ms vs 3.747 / 3.736 / 3.744; DeepSeek-V3 down 1.879 / 1.857 / 1.853 vs
    # 1.930 / 1.915 / 1.960 (bands of 4: 3.706 / 3.714 / 3.669 and 1.866 / 1.798 / 1.874);
    # on another machine (22:40) means 0.4 % and 0.9 % lower, inside its spread.
    ("dw", 7168, 4096, "bfloat16", False): TileConfig(128, 256, 64, 8, 3, gluon=True,
                                                      store_chunks=8, trim_partial=True,
                                                      band_n=8),
    # Once the flat kernels' programs fill their last wave of SMs (``dw_flat_segments``,
    # 2026-11-22 01:16-01:20, one H200, dw alone, five rounds): the flat kernel at the Qwen3
    # shapes, qwen3_up 0.616-0.632 ms vs 0.714-0.754 (per-(expert, tile) kernel), qwen3_down
    # 0.333-0.394 vs 0.388-0.489; the Gluon kernel at DeepSeek-V3 down, 2.127-2.175 vs
    # 2.213-2.286. At the Qwen3 shapes the Gluon kernel with 4 store chunks and trimmed partial
    # steps since (2026-11-23 03:38, one H200, dw looped, three rounds): qwen3_up 0.548 /
    # 0.535 / 0.562 ms vs flat 0.734 / 0.627 / 0.638, qwen3_down 0.371 / 0.308 /
    # 0.344 vs 0.395 / 0.391 / 0.381 (8 chunks 0.582-0.612 and 0.321-0.371).
    # Qwen3 up since session 27: the warp-specialized Gluon dw kernel (4 stages, each half
    # tile out in 2 chunks; where it cannot run, the same tiles on the Gluon dw kernel's 3
    # stages). dw looped on one H200 (2026-11-23 09:14, two rounds): 0.512 / 0.501 ms vs
    # 0.543 / 0.565 for the Gluon dw kernel (second warpgroup a step behind: 0.521 / 0.504).
    # At the other three shapes it measured within noise of the Gluon dw kernel.
    ("dw", 2048, 1536, "bfloat16", False): TileConfig(128, 256, 64, 8, 4, gluon=True,
                                                      warp_spec=True, store_chunks=2,
                                                      trim_partial=True),
    ("dw", 768, 2048, "bfloat16", False): TileConfig(128, 256, 64, 8, 3, gluon=True,
                                                     store_chunks=4, trim_partial=True),
    ("dw", 2048, 7168, "bfloat16", False): TileConfig(128, 256, 64, 8, 3, gluon=True,
                                                      store_chunks=8, trim_partial=True,
                                                      band_n=8),
}

# Winners that need the Gluon kernels (Triton 3.5/3.6, kernels/grouped_gemm_gluon.py), used
# where they are available (``forward_config(..., gluon=True)``); TUNED is the fallback. All
# are the warp-specialized forward/dx kernel:
# - at the Qwen3 down shape (memory-bound: 128 experts' weights, 403 MB, against 50 MB of x),
#   in three sweeps on H200 (2026-11-22 02:36-02:45, same-run pairs against the flattened TMA
#   kernel of TUNED): fwd 0.231 / 0.243 / 0.239 ms vs 0.245 / 0.250 / 0.258, dx 0.240 / 0.246 /
#   0.244 vs 0.240 / 0.250 / 0.256;
# - with its tiles walked 8 m-tiles at a time, M fastest (``group_m=8``), at four more
#   products, in two sweeps on one H200 (2026-11-22 04:23 and 04:25, 5 and 9 samples, against
#   the flattened TMA kernel): DeepSeek-V3 down fwd 1.713 / 1.736 ms vs 1.834 / 1.878,
#   DeepSeek-V3 up dx 3.452 / 3.524 vs 3.702 / 3.809, Qwen3 up fwd 0.422 / 0.421 vs 0.439 /
#   0.448 and dx 0.432 / 0.427 vs 0.457 / 0.442; and one program per tile (which the
#   hardware starts in order, keeping the m-tiles that read one w tile of the 58.7 MB w[e]
#   side by side) at DeepSeek-V3 up fwd, 3.470 / 3.608 vs 3.495 / 3.740. Not at DeepSeek-V3
#   down dx (1.910 / 1.801 vs 1.751 / 1.755).
# - with those runs of m-tiles cut per expert (``expert_raster``), at the DeepSeek-V3 shapes, in
#   three sweeps on one H200 (2026-11-23 02:13-02:16, 7 samples): up fwd with 4-tile runs,
#   persistent, 3.088 / 3.245 / 3.220 ms vs 3.386 / 3.300 / 3.493 for the previous winner
#   (8-tile runs, one program per tile); down fwd 1.572 / 1.556 / 1.654 vs 1.615 / 1.670 /
#   1.689 (8-tile runs); down dx with 4-tile runs 1.574 / 1.575 / 1.639 (the plain 4- and
#   8-tile runs 1.692 / 1.611 and 1.678 / 1.746; the flattened TMA kernel, the previous
#   default, 1.692 in the third).
# - and at DeepSeek-V3 up dx, 8-tile runs cut per expert: Nsight Compute on one H100
#   (2026-11-23 05:37) 2.73 ms and 53 % of DRAM bandwidth against 3.02 ms and 66 % for the
#   uncut runs; three same-run sweeps on one H200 (05:39-05:40, 7 samples) 3.112 / 3.060 /
#   3.183 ms against 3.325 / 3.312 / 3.303 (4-tile expert runs 3.163 / 3.203 / 3.130); the
#   main benchmark's backward, A/B/A/B in one call (05:47-05:52): 7.372 / 7.333 ms against
#   7.576 / 7.526. Likewise Qwen3 up dx (sweeps at 05:46, 7 samples: 0.426 / 0.423 ms vs
#   0.441 / 0.457; main benchmark's backward A/B/A/B, 05:54-06:00: 0.991 / 0.973 vs 1.014 /
#   0.992). Not its forward: 0.415 / 0.412 vs 0.439 / 0.422 in the sweeps, but 0.479 /
#   0.480 vs 0.456 / 0.463 in the main benchmark (the sweep's short loops do not always
#   rank as the main benchmark's long ones do).
TUNED_GLUON: dict[tuple[str, int, int, str, bool], TileConfig] = {
    ("fwd", 768, 2048, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                     gluon=True),
    ("dx", 2048, 768, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                    gluon=True),
    ("fwd", 2048, 7168, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                      gluon=True, group_m=8,
                                                      expert_raster=True),
    ("dx", 7168, 2048, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                     gluon=True, group_m=4,
                                                     expert_raster=True),
    ("dx", 4096, 7168, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                     gluon=True, group_m=8,
                                                     expert_raster=True),
    ("fwd", 2048, 1536, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                      gluon=True, group_m=8),
    ("dx", 1536, 2048, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                     gluon=True, group_m=8,
                                                     expert_raster=True),
    ("fwd", 7168, 4096, "bfloat16", True): TileConfig(128, 256, 64, 8, 3, half_tiles=False,
                                                      gluon=True, group_m=4,
                                                      expert_raster=True),
}


def _pow2_at_least(n: int, floor: int = 1) -> int:
  p = floor
  while p < n:
    p *= 2
  return p


def _clamp_block(block: int, extent: int, floor: int = 16) -> int:
  """``block`` shrunk to the next power of two >= extent (never below ``floor``)."""
  return min(block, _pow2_at_least(extent, floor))


def _base_config(phase: str, N: int, dtype: str, input_precision: str, tma: bool) -> TileConfig:
  if dtype in ("float32", "fp32"):
    if input_precision == "ieee":  # CUDA-core FMA products: small tiles
      return TileConfig(64, 64, 32, 4, 3)
    return TileConfig(128, 128, 32, 8, 3)  # tf32 tensor cores: half the bf16 K depth
  if phase == "dw":
    # 128 x 256 (K x N of dw) over 64 rows a step: the widest tile one program can hold, so
    # the fewest L2 bytes per FLOP (48 KiB per 4.2 MFLOP); 3 stages = 144 KiB, one per SM.
    return TileConfig(128, 256, 64, 8, 3) if N >= 256 else TileConfig(128, 128, 64, 8, 4)
  if tma and N >= 256:
    # Tile and K loops flattened into one pipelined loop (the next tile's TMA loads overlap
    # this tile's store); 3 stages of 128x64 + 64x256 bf16 = 144 KiB. Measured on H200
    # (2026-11-21, DeepSeek-V3 shapes): 0.80-0.84x cuBLAS, the sweep's best. The
    # warp-specialized variant (warp_spec=True) was faster still but gave wrong rows under
    # Triton 3.6 (tests/gpu/test_grouped_gemm_gpu.py caught it): not a default.
    return TileConfig(128, 256, 64, 8, 3, half_tiles=False, flatten=True)
  if N >= 256:
    # Two consumer warpgroups, each a 64x256 wgmma; 3 stages x (128x64 + 64x256) x 2 B =
    # 144 KiB; one program per tile (the sweep's best pointer variant on H200, 2026-11-21:
    # 0.76-0.81x cuBLAS vs 0.67-0.74x for the persistent 4-stage one).
    return TileConfig(128, 256, 64, 8, 3, persistent=False)
  return TileConfig(128, 128, 64, 8, 4)


def _config(phase: str, K: int, N: int, dtype: str, input_precision: str,
            tma: bool, gluon: bool = False) -> TileConfig:
  tuned = TUNED_GLUON.get((phase, K, N, dtype, tma)) if gluon else None
  tuned = tuned or TUNED.get((phase, K, N, dtype, tma))
  return tuned if tuned is not None else _base_config(phase, N, dtype, input_precision, tma)


def forward_config(K: int, N: int, dtype: str, input_precision: str = "ieee", *,
                   phase: str = "fwd", tma: bool = False, gluon: bool = False) -> TileConfig:
  """Tiles for y[C, N] = x[C, K] @ w[e][K, N] (``phase="dx"``: the dx product, K and N swapped).

  ``TUNED_GLUON`` first when ``gluon`` (the Gluon kernels are available), then ``TUNED``,
  then Hopper rules for 16-bit inputs (``_base_config``): 128x256x64 with 8 warps and 3
  stages when N is wide (TMA: tile and K loops flattened; pointer loads: one program per
  tile), 128x128x64 otherwise; blocks shrink to the next power of two >= the dimension for
  small shapes.
  """
  cfg = _config(phase, K, N, dtype, input_precision, tma, gluon)
  return dataclasses.replace(cfg, block_n=_clamp_block(cfg.block_n, N),
                             block_k=_clamp_block(cfg.block_k, K))


def dw_config(K: int, N: int, dtype: str, input_precision: str = "ieee", *,
              tma: bool = False) -> TileConfig:
  """Tiles for dw[e][K, N] = x_e^T @ dy_e (block_m tiles K, block_k runs over the group's rows)."""
  cfg = _config("dw", K, N, dtype, input_precision, tma)
  return dataclasses.replace(cfg, block_m=_clamp_block(cfg.block_m, K),
                             block_n=_clamp_block(cfg.block_n, N))


def forward_grid(C: int, N: int, E: int, cfg: TileConfig, max_programs: int | None = None) -> int:
  """Programs of ``grouped_gemm_kernel``.

  The static upper bound on the tiles of either kind (table rows x N tiles), or, when
  ``max_programs`` is given (e.g. resident CTAs on the GPU, see ``resident_programs``), at most
  that many: the kernel is then persistent, each program looping over tiles.
  """
  bound = max(table_bounds(C, E, cfg.block_m)) * triton.cdiv(N, cfg.block_n)
  return bound if max_programs is None else max(1, min(bound, max_programs))


def resident_programs(num_sms: int, cfg: TileConfig, elem_bytes: int) -> int:
  """Programs of ``cfg`` that are surely resident at once (a persistent launch must not ask for
  more: the extra programs would only start after the first ones finish all their tiles).

  Bounded by shared memory (227 KiB per Hopper SM) and, conservatively, registers (64 Ki per
  SM; the f32 accumulator tile plus ~96 registers a thread), at most 2 per SM. A
  warp-specialized program (producer + two consumer warpgroups, ``setmaxnreg``) takes a whole SM.
  """
  if cfg.warp_spec:
    return num_sms
  smem = cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * elem_bytes
  by_smem = (227 * 1024) // max(smem, 1)
  threads = cfg.num_warps * 32
  regs = min(255, cfg.block_m * cfg.block_n // threads + 96)
  by_regs = 65536 // (threads * regs)
  return num_sms * max(1, min(2, by_smem, by_regs))


def dw_grid(K: int, N: int, E: int, cfg: TileConfig) -> int:
  """Programs of ``grouped_gemm_dw_kernel``."""
  return E * triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n)


def dw_flat_segments(K: int, N: int, E: int, cfg: TileConfig, num_sms: int) -> int:
  """Expert segments of the flat dw kernels (``grouped_gemm_dw_flat_kernel`` and its Gluon
  counterpart), at most E: enough programs for two per SM where the dw tiles alone are fewer
  (Qwen3's 768 x 2048 dw has 48 tiles of 128 x 256), then the fewest segments whose programs
  fill their last wave of SMs to >= 95 % (one program per SM at a time: at the DeepSeek-V3
  down shape's 448 tiles, one segment would leave 60 % of the SMs idle in the fourth wave;
  two fill 97 % of seven waves), else the fullest."""
  tiles = triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n)
  first = max(1, min(E, triton.cdiv(2 * num_sms, tiles)))

  def filled(segs: int) -> float:
    programs = segs * tiles
    return programs / (triton.cdiv(programs, num_sms) * num_sms)

  return next((s for s in range(first, E + 1) if filled(s) >= 0.95),
              max(range(first, E + 1), key=filled, default=first))


def dw_program_coords(pid: int, K: int, N: int, E: int, cfg: TileConfig,
                      num_segs: int) -> tuple[int, int, int, int]:
  """(k0, n0, e_lo, e_hi) of program ``pid`` of the Gluon dw kernels (their ``_dw_program``,
  the same map): its tile's first row of K and column of N, and its segment of experts. The
  (K tile, N tile) grid is walked in bands of ``cfg.band_n`` n-tiles (all of N when 0), n
  fastest within a band, then k; the last band may be narrower."""
  num_n, num_k = N // cfg.block_n, K // cfg.block_m
  band = num_n if cfg.band_n == 0 or cfg.band_n > num_n else cfg.band_n
  seg, rest = divmod(pid, num_k * num_n)
  b, r = divmod(rest, num_k * band)
  width = min(band, num_n - b * band)
  return ((r // width) * cfg.block_m, (b * band + r % width) * cfg.block_n, seg * E // num_segs,
          (seg + 1) * E // num_segs)


def dw_flat_grid(K: int, N: int, E: int, cfg: TileConfig, num_segs: int) -> int:
  """Programs of ``grouped_gemm_dw_flat_kernel``."""
  return num_segs * triton.cdiv(K, cfg.block_m) * triton.cdiv(N, cfg.block_n)


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
                       use_tma: bool = False, half_tiles: bool | None = None) -> dict:
  """Compile-time constants of ``grouped_gemm_kernel`` (strides in elements).

  ``w_strides`` are (expert, k, n) strides of the B operand: for the forward product on a
  row-major ``w [E, K, N]`` they are ``(K*N, N, 1)``; for dx = dy @ w[e]^T on the same ``w
  [E, H, N]`` (now K = N_fwd and N = H) they are ``(H*N_fwd, 1, N_fwd)``. ``half_tiles``
  overrides ``cfg.half_tiles``. Warp specialization and loop flattening apply on the TMA path
  only, and not together with half tiles (an if/else around two K loops).
  """
  half = cfg.half_tiles if half_tiles is None else half_tiles
  half = half and cfg.block_m >= 32  # tl.dot needs M >= 16
  max_g, max_z = table_bounds(C, E, cfg.block_m)
  return dict(C=C, K=K, N=N, E=E,
              STRIDE_XM=x_strides[0], STRIDE_XK=x_strides[1],
              STRIDE_WE=w_strides[0], STRIDE_WK=w_strides[1], STRIDE_WN=w_strides[2],
              STRIDE_YM=y_strides[0], STRIDE_YN=y_strides[1],
              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              MAX_GROUP_TILES=max_g, MAX_ZERO_TILES=max_z,
              INPUT_PRECISION=input_precision, USE_TMA=use_tma, HALF_TILES=half,
              WARP_SPEC=bool(use_tma and cfg.warp_spec and not half),
              # Triton 3.6 aborts (an assertion in its Hopper warp-specialization pass) on a
              # flattened, warp-specialized loop nest: one or the other.
              FLATTEN=bool(use_tma and cfg.flatten and not half and not cfg.warp_spec))


def dw_flat_constexprs(C: int, K: int, N: int, E: int, cfg: TileConfig, num_segs: int, *,
                       input_precision: str = "ieee") -> dict:
  """Compile-time constants of ``grouped_gemm_dw_flat_kernel`` (row-major x, dy, dw)."""
  return dict(C=C, K=K, N=N, E=E,
              STRIDE_XM=K, STRIDE_XK=1, STRIDE_DYM=N, STRIDE_DYN=1,
              STRIDE_DWE=K * N, STRIDE_DWK=N, STRIDE_DWN=1,
              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              NUM_SEGS=num_segs, MAX_STEPS=dw_max_steps(C, E, cfg.block_k),
              INPUT_PRECISION=input_precision)


def dw_constexprs(C: int, K: int, N: int, E: int, cfg: TileConfig, *,
                  input_precision: str = "ieee", use_tma: bool = False) -> dict:
  """Compile-time constants of ``grouped_gemm_dw_kernel`` for row-major x [C,K], dy [C,N], dw [E,K,N]."""
  return dict(C=C, K=K, N=N, E=E,
              STRIDE_XM=K, STRIDE_XK=1, STRIDE_DYM=N, STRIDE_DYN=1,
              STRIDE_DWE=K * N, STRIDE_DWK=N, STRIDE_DWN=1,
              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              INPUT_PRECISION=input_precision, USE_TMA=use_tma,
              WARP_SPEC=bool(use_tma and cfg.warp_spec))
