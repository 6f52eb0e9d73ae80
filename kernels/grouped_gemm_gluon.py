"""Grouped GEMM kernels in Gluon (Hopper): dw (TMA in, TMA out), the same dw warp-specialized,
and a warp-specialized forward/dx.

``grouped_gemm_dw_ws_kernel``: the dw kernel below with a producer warp and two consumer
warpgroups (64 of the tile's K rows each), the second optionally a few row steps behind the
first so that their tile epilogues fall at different times (``TileConfig.stagger``). Measured
on H200 (2026-11-23, docs/GROUPED_GEMM.md): dw 6-11 % faster at the Qwen3 up shape, within
noise at the other benchmark shapes.

``grouped_gemm_ws_kernel`` (forward and dx, below ``grouped_gemm_dw_gluon_kernel``): a producer
warp issues each K step's TMA loads into a ring of stages ("ready" mbarriers); two consumer
warpgroups, each its own partition, compute the upper and lower 64-row halves of a 128-row tile
and release each stage on an "empty" mbarrier that counts both; a half with no row of its group
skips its MMAs; each half is stored through shared memory, by TMA when whole. Its tiles can be
walked GROUP_M m-tiles at a time, M fastest (``TileConfig.group_m``), so the m-tiles of an
expert that read the same w tile run side by side, and launched one program per tile instead
of persistently. Measured on H200 (2026-11-22, docs/GROUPED_GEMM.md): 3-8 % faster than the
flattened Triton kernel at the Qwen3 down shape as it is; with ``group_m=8`` 4-7 % faster at
the DeepSeek-V3 down forward, DeepSeek-V3 up dx and (in sweeps) the Qwen3 up products, and one
program per tile 1-3.5 % at the DeepSeek-V3 up forward; not at the DeepSeek-V3 down dx.
With ``GLU`` it runs SwiGLU's gate | up product (w = [w_gate | w_up]) and writes only
``silu(gate) * up`` from its f32 accumulators (``triton_gemm.grouped_glu``, inference):
measured on H200 (2026-11-24) 1-3 % faster than the product followed by the activation in XLA.

The dw kernel:

``dw[e] = x[rows of e]^T @ dy[rows of e]`` over the same row-step table and program layout as
``grouped_gemm_dw_flat_kernel`` (kernels/grouped_gemm.py): program (segment, K tile, N tile)
owns that dw tile of a segment of experts and walks their row steps (BLOCK_K rows of one expert
each) in one software-pipelined loop. Nsight Compute on H200 (docs/GROUPED_GEMM.md,
2026-11-22) put a third of the stock kernels' dw time at the DeepSeek-V3 up shape (64 groups
of ~512 rows: 8 steps per tile) in each tile's prologue, epilogue and store drain, and most of
their loop's ~164 instructions per step in cp.async address and mask arithmetic. Gluon lets us
write what stock Triton does not:

  - operands by TMA from descriptors made once per program, STAGES - 1 steps ahead across
    tile boundaries (one mbarrier per stage). A group's last step usually ends inside its
    64-row block: the rows past the group (the next group's, or padding that may not even be
    finite) are set to zero in shared memory before that step's MMA;
  - the finished tile goes to shared memory once (``stmatrix``) and out by TMA, which runs on
    while the next expert's steps compute; the next tile's first MMA runs with
    ``use_acc=False`` instead of a zeroed accumulator.

Measured on H200 (2026-11-22, dw alone, ``benchmarks/bench_dw_variants.py``): at the
DeepSeek-V3 up shape 4.12-4.21 ms against the per-(expert, tile) kernel's 4.18-4.49 on four
machines, equal within noise or up to 7 % faster (dense cuBLAS 2.56-2.82); at DeepSeek-V3 down,
once ``dw_flat_segments`` filled the last wave, 2.13-2.18 vs 2.21-2.29. ``TUNED`` takes it for
both; at the Qwen3 shapes the flat Triton kernel is faster still. It is also the base for a
warp-specialized version.
Two lessons of writing it: ptxas serializes every MMA with the next step (a wait "injected
... to allow use of registers defined by GMMA") unless the MMAs are waited for before the
loop exits; and a TMA store wait (``cp.async.bulk.wait_group``) shares scoreboard SB0 with
``cp.async``, so a cp.async-fed pipeline drains at every tile store (hence TMA loads).

Requirements (``gluon_dw_supported``): 16-bit inputs, K % BLOCK_M == 0 (a TMA store box must
not cross into the next expert's rows of the [E * K, N] view) and N % BLOCK_N == 0. Gluon is
Triton's explicit-layout dialect: it compiles for sm_90 without a GPU but has no interpreter,
so its tests run on the GPU (tests/gpu/test_grouped_gemm_gpu.py).
"""
from __future__ import annotations

import triton

from .grouped_gemm import dw_max_steps, expert_raster_ok, table_bounds

# Gluon's Python API is experimental and changes between releases (Triton 3.9 renamed the CTA
# barrier and the TMA store, among others): this file is written against 3.5 / 3.6, the
# Triton of our GPU image. Elsewhere the kernel is not offered and callers fall back.
GLUON_ERROR = None
if tuple(int(v) for v in triton.__version__.split(".")[:2]) not in ((3, 5), (3, 6)):
  GLUON_ERROR = f"written against Triton 3.5/3.6's Gluon API, not {triton.__version__}'s"
else:
  try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
  except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    GLUON_ERROR = f"{type(e).__name__}: {e}"


def _gluon_tile_why_not(kernel: str, cfg, elem_bytes: int, block_ms: tuple[int, ...]):
  """What every Gluon grouped-GEMM kernel here needs of ``cfg`` and the inputs, or why not."""
  if GLUON_ERROR is not None:
    return f"the {kernel} is not available here: {GLUON_ERROR}"
  if cfg.num_warps != 8 or cfg.block_m not in block_ms:
    rows = " or ".join(map(str, block_ms))
    return f"the {kernel} runs {rows}-row tiles on two warpgroups (num_warps=8)"
  if elem_bytes != 2:
    return f"the {kernel} takes 16-bit inputs only"
  return None


def _band_why_not(cfg) -> str | None:
  if cfg.band_n < 0:
    return f"band_n={cfg.band_n} must be >= 0 (n-tiles per band of dw programs; 0: all of N)"
  return None


def gluon_dw_supported(K: int, N: int, elem_bytes: int, cfg) -> str | None:
  """None when the Gluon dw kernel can run ``cfg`` (a ``TileConfig``) on dw [E, K, N] of
  ``elem_bytes``-byte inputs, else why not (callers then run the flat Triton kernel)."""
  why = _gluon_tile_why_not("Gluon dw kernel", cfg, elem_bytes, (128,))
  if why is None and (K % cfg.block_m or N % cfg.block_n):
    why = f"K={K} and N={N} must be multiples of the tile ({cfg.block_m} x {cfg.block_n})"
  why = why or _band_why_not(cfg)
  chunks = cfg.store_chunks
  if why is None and (chunks < 1 or cfg.block_n % chunks
                      or cfg.block_n // chunks * elem_bytes < 32):
    why = (f"store_chunks={chunks} must split the tile's {cfg.block_n} columns into chunks of "
           f">= 32 bytes")
  if why is None and dw_smem_bytes(cfg, elem_bytes) > _SMEM_BYTES:
    why = (f"{cfg.num_stages} stages of {cfg.block_k} x ({cfg.block_m} + {cfg.block_n}) and "
           f"the output tile exceed shared memory ({dw_smem_bytes(cfg, elem_bytes)} bytes)")
  return why


def gluon_dw_ws_supported(K: int, N: int, elem_bytes: int, cfg) -> str | None:
  """None when the warp-specialized Gluon dw kernel (``TileConfig(..., gluon=True,
  warp_spec=True)``) can run ``cfg`` on dw [E, K, N] of ``elem_bytes``-byte inputs, else why
  not (callers then run the Gluon dw kernel without warp specialization)."""
  why = _gluon_tile_why_not("warp-specialized Gluon dw kernel", cfg, elem_bytes, (128,))
  if why is None and (K % cfg.block_m or N % cfg.block_n):
    why = f"K={K} and N={N} must be multiples of the tile ({cfg.block_m} x {cfg.block_n})"
  why = why or _band_why_not(cfg)
  chunks = cfg.store_chunks
  if why is None and chunks not in (1, 2):
    why = f"store_chunks={chunks}: each warpgroup's half tile leaves whole or in 2 chunks"
  if why is None and not cfg.trim_partial:
    why = "the warp-specialized Gluon dw kernel multiplies partial steps trimmed only"
  if why is None and not 0 <= cfg.stagger < cfg.num_stages - 1:
    why = (f"stagger={cfg.stagger}: the second warpgroup may start 0 to num_stages - 2 = "
           f"{cfg.num_stages - 2} row steps behind (the stages it has not released hold the "
           f"first's next steps)")
  if why is None and dw_ws_smem_bytes(cfg, elem_bytes) > _SMEM_BYTES:
    why = (f"{cfg.num_stages} stages of {cfg.block_k} x ({cfg.block_m} + {cfg.block_n}) and "
           f"the output chunks exceed shared memory ({dw_ws_smem_bytes(cfg, elem_bytes)} "
           f"bytes)")
  return why


def dw_ws_smem_bytes(cfg, elem_bytes: int) -> int:
  """Shared memory of the warp-specialized Gluon dw kernel: the stages and one output chunk
  per consumer warpgroup."""
  return (cfg.num_stages * cfg.block_k * (cfg.block_m + cfg.block_n)
          + cfg.block_m * (cfg.block_n // max(cfg.store_chunks, 1))) * elem_bytes


def dw_smem_bytes(cfg, elem_bytes: int) -> int:
  """Shared memory of the Gluon dw kernel: the stages and the output tile."""
  return (cfg.num_stages * cfg.block_k * (cfg.block_m + cfg.block_n)
          + cfg.block_m * cfg.block_n) * elem_bytes

if GLUON_ERROR is None:

  @gluon.jit
  def _step_record(steps_ptr, s, MAX_STEPS: gl.constexpr, E: gl.constexpr):
    """(row_start, row_end, last, e) of step ``s``: rows [row_start, row_end) (at most BLOCK_K)
    of expert e, last = 1 on its final step. Out-of-range rows of a corrupt table only read
    zeros (TMA bounds) or are zeroed."""
    rec = steps_ptr + gl.minimum(gl.maximum(s, 0), MAX_STEPS - 1) * 4
    r0 = gl.load(rec)
    e = gl.minimum(gl.maximum(gl.load(rec + 2), 0), E - 1)
    return r0, gl.maximum(gl.load(rec + 1), r0), gl.load(rec + 3), e

  @gluon.jit
  def _issue_step(x_desc, g_desc, x_buf, g_buf, ready, r0, s, s_hi, k0, n0):
    """TMA loads of step ``s`` (rows r0 .. r0 + BLOCK_K) into a pipeline stage; nothing past
    the program's last step ``s_hi`` (never waited on). Every step before it is loaded, even
    an empty one, so that every stage the loop waits on completes."""
    nbytes: gl.constexpr = x_desc.block_type.nbytes + g_desc.block_type.nbytes
    if s < s_hi:
      mbarrier.expect(ready, nbytes)
      tma.async_copy_global_to_shared(x_desc, [r0, k0], ready, x_buf)
      tma.async_copy_global_to_shared(g_desc, [r0, n0], ready, g_buf)

  @gluon.jit
  def _zero_rows_from(buf, t, layout: gl.constexpr):
    """Rows t.. of a [BLOCK_K, cols] stage buffer set to zero (through registers)."""
    rows = gl.arange(0, buf.shape[0], layout=gl.SliceLayout(1, layout))
    v = buf.load(layout)
    buf.store(gl.where((rows < t)[:, None], v, gl.zeros_like(v)))

  @gluon.jit
  def _stage_tile(vals, buf):
    """``vals`` (converted to ``buf``'s dtype) into ``buf`` for a TMA store, once the previous
    store from it has left; every thread's part is written and visible to the TMA unit on
    return."""
    tma.store_wait(0)
    gl.thread_barrier()
    buf.store(vals.to(buf.dtype))
    fence_async_shared()
    gl.thread_barrier()

  @gluon.jit
  def _dw_store_tile(vals, out_buf, out_desc, row, n0):
    """A finished dw tile to (row, n0) of dw seen as [E * K, N]: through ``out_buf`` by TMA."""
    _stage_tile(vals, out_buf)
    tma.async_copy_shared_to_global(out_desc, [row, n0], out_buf)

  @gluon.jit
  def _dw_mma(x_view, g_view, acc, use_acc):
    """acc (+)= x_view^T @ g_view, issued asynchronously; returns once the previous step's MMA
    (not this one) is done in this warpgroup."""
    acc = warpgroup_mma(x_view.permute((1, 0)), g_view, acc, use_acc=use_acc, is_async=True)
    return warpgroup_mma_wait(num_outstanding=1, deps=(acc,))

  @gluon.jit
  def _dw_program(K: gl.constexpr, N: gl.constexpr, E: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, NUM_SEGS: gl.constexpr, BAND_N: gl.constexpr):
    """(k0, n0, e_lo, e_hi) of a dw program: its tile's first row of K and column of N, and its
    segment of experts [e_lo, e_hi) (grid: NUM_SEGS * (K / BLOCK_M) * (N / BLOCK_N)). Tiles
    are walked in bands of BAND_N n-tiles (all of N when 0), n fastest within a band, then k
    (``dw_program_coords`` is the same map in Python)."""
    pid = gl.program_id(0)
    num_n: gl.constexpr = N // BLOCK_N
    num_k: gl.constexpr = K // BLOCK_M
    band: gl.constexpr = num_n if (BAND_N == 0) or (BAND_N > num_n) else BAND_N
    seg = pid // (num_k * num_n)
    rest = pid % (num_k * num_n)
    b = rest // (num_k * band)
    r = rest % (num_k * band)
    width = gl.minimum(band, num_n - b * band)  # the last band may be narrower
    return ((r // width) * BLOCK_M, (b * band + r % width) * BLOCK_N, seg * E // NUM_SEGS,
            (seg + 1) * E // NUM_SEGS)

  @gluon.jit
  def _dw_trimmed_mma(xv, gv, t, acc, use_acc, x_layout: gl.constexpr, g_layout: gl.constexpr):
    """A group's last, partial row step (t < BLOCK_K rows) on stage views ``xv``, ``gv``: only
    its first 16, 32 or all rows are multiplied (powers of two, as shared memory views need),
    those past t set to zero in both operands first (an empty step, t = 0, multiplies 16 rows
    of zeros, so that a tile's first step still resets the accumulator)."""
    BLOCK_K: gl.constexpr = gv.shape[0]
    rows = gl.where(t <= 16, 16, gl.where(t <= 32, 32, BLOCK_K))
    for q in gl.static_range(BLOCK_K // 16):
      if (16 * q + 16 > t) & (16 * q < rows):
        _zero_rows_from(xv.slice(16 * q, 16, dim=0), gl.maximum(t - 16 * q, 0), x_layout)
        _zero_rows_from(gv.slice(16 * q, 16, dim=0), gl.maximum(t - 16 * q, 0), g_layout)
    fence_async_shared()
    gl.thread_barrier()
    for q in gl.static_range(2):
      if (16 << q < BLOCK_K) & (rows == 16 << q):
        acc = _dw_mma(xv.slice(0, 16 << q, dim=0), gv.slice(0, 16 << q, dim=0), acc, use_acc)
    if rows == BLOCK_K:
      acc = _dw_mma(xv, gv, acc, use_acc)
    return acc

  @gluon.jit
  def _dw_store_chunks(chunk_desc, out_buf, row, n0, lo, hi):
    """Column chunks lo .. hi - 1 of the tile in ``out_buf`` to (row, n0) of dw seen as
    [E * K, N], by TMA (chunk j: columns j * EPI_N ..; none when lo >= hi)."""
    EPI_N: gl.constexpr = chunk_desc.block_type.shape[1]
    for j in gl.static_range(out_buf.shape[1] // EPI_N):
      if (j >= lo) & (j < hi):
        tma.async_copy_shared_to_global(chunk_desc, [row, n0 + j * EPI_N],
                                        out_buf.slice(j * EPI_N, EPI_N, dim=1))

  @gluon.jit
  def grouped_gemm_dw_gluon_kernel(
      x_ptr,        # [C, K] recv_x
      dy_ptr,       # [C, N] output cotangent
      steps_ptr,    # int32 [MAX_STEPS, 4] row steps from ``dw_step_table`` (MAX_STEPS >= 1)
      first_ptr,    # int32 [E + 1]: expert e's steps are [first[e], first[e + 1])
      dw_ptr,       # [E, K, N] weight cotangent
      C: gl.constexpr, K: gl.constexpr, N: gl.constexpr, E: gl.constexpr,
      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
      NUM_SEGS: gl.constexpr, MAX_STEPS: gl.constexpr, STAGES: gl.constexpr,
      NUM_WARPS: gl.constexpr,  # the launch's num_warps: 8, two warpgroups of 64-row MMAs
      STORE_CHUNKS: gl.constexpr,  # a finished tile goes out in this many column chunks
      TRIM_PARTIAL: gl.constexpr,  # a partial step multiplies only its 16-row slices with rows
      BAND_N: gl.constexpr,        # tiles walked in bands of this many n-tiles (0: all of N)
  ):
    """Grid: NUM_SEGS * (K / BLOCK_M) * (N / BLOCK_N)."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    k0, n0, e_lo, e_hi = _dw_program(K, N, E, BLOCK_M, BLOCK_N, NUM_SEGS, BAND_N)

    # The accumulator: two warpgroups of 64 x BLOCK_N wgmma tiles. The register layouts that
    # zero a partial step's extra rows: 16-byte vectors along the contiguous columns.
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_M, BLOCK_M // 8],
                                              [NUM_WARPS, 1], [1, 0])
    g_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_N, BLOCK_N // 8],
                                              [NUM_WARPS, 1], [1, 0])

    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_M], dtype)
    g_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], dtype)
    EPI_N: gl.constexpr = BLOCK_N // STORE_CHUNKS
    # The output tile's swizzle is its chunks' (whose rows may be narrower than 128 bytes).
    out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, EPI_N], dtype)
    chunk_layout: gl.constexpr = out_layout
    x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_M], x_smem_layout)
    g_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], g_smem_layout)
    out_buf = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], out_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
      mbarrier.init(ready.index(j), count=1)
    # Descriptors made once per program (in Triton's global scratch). Operand rows past C
    # read as zeros; rows past a group's end but inside C are zeroed in shared memory below.
    # dw is seen as one [E * K, N] matrix: a tile never crosses experts (K % BLOCK_M == 0).
    x_desc = tma.make_tensor_descriptor(x_ptr, shape=[C, K], strides=[K, 1],
                                        block_shape=[BLOCK_K, BLOCK_M], layout=x_smem_layout)
    g_desc = tma.make_tensor_descriptor(dy_ptr, shape=[C, N], strides=[N, 1],
                                        block_shape=[BLOCK_K, BLOCK_N], layout=g_smem_layout)
    out_desc = tma.make_tensor_descriptor(dw_ptr, shape=[E * K, N], strides=[N, 1],
                                          block_shape=[BLOCK_M, BLOCK_N], layout=out_layout)
    chunk_desc = tma.make_tensor_descriptor(dw_ptr, shape=[E * K, N], strides=[N, 1],
                                            block_shape=[BLOCK_M, EPI_N], layout=chunk_layout)

    # Experts of the segment with no rows get a zero tile.
    out_buf.store(gl.zeros([BLOCK_M, BLOCK_N], dtype, acc_layout))
    fence_async_shared()
    gl.thread_barrier()
    for e in range(e_lo, e_hi):
      if gl.load(first_ptr + e + 1) <= gl.load(first_ptr + e):
        tma.async_copy_shared_to_global(out_desc, [e * K + k0, n0], out_buf)

    s_lo = gl.minimum(gl.maximum(gl.load(first_ptr + e_lo), 0), MAX_STEPS)
    s_hi = gl.minimum(gl.maximum(gl.load(first_ptr + e_hi), s_lo), MAX_STEPS)

    # Prologue: steps s_lo .. s_lo + STAGES - 2 in flight. Step records are read an
    # iteration ahead of their use, so no step waits on a load of its own record.
    for j in gl.static_range(STAGES - 1):
      r0, _, _, _ = _step_record(steps_ptr, s_lo + j, MAX_STEPS, E)
      _issue_step(x_desc, g_desc, x_bufs.index(j), g_bufs.index(j), ready.index(j), r0,
                  s_lo + j, s_hi, k0, n0)
    p_r0, _, _, _ = _step_record(steps_ptr, s_lo + STAGES - 1, MAX_STEPS, E)
    c_r0, c_r1, c_last, c_e = _step_record(steps_ptr, s_lo, MAX_STEPS, E)

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    use_acc = False
    # STORE_CHUNKS > 1: a finished tile waits in out_buf and leaves one column chunk per
    # step (chunk j of the tile for dw row ``pend_row`` at its j-th step), so that the
    # programs, which finish their tiles together, do not all write 64 KiB at once.
    pend_row = 0
    pend_next = STORE_CHUNKS
    for s in range(s_lo, s_hi):
      i = s - s_lo
      stage = i % STAGES
      mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
      t = c_r1 - c_r0
      if TRIM_PARTIAL:
        if t < BLOCK_K:
          # The group's last, partial step, as ``_dw_trimmed_mma`` does it, written out here:
          # through that helper this kernel compiled to other code, which faulted on an H200
          # (illegal address, 64-row steps of 32 rows at 6 stages, 2026-11-23).
          rows = gl.where(t <= 16, 16, gl.where(t <= 32, 32, BLOCK_K))
          for q in gl.static_range(BLOCK_K // 16):
            if (16 * q + 16 > t) & (16 * q < rows):
              _zero_rows_from(x_bufs.index(stage).slice(16 * q, 16, dim=0),
                              gl.maximum(t - 16 * q, 0), x_layout)
              _zero_rows_from(g_bufs.index(stage).slice(16 * q, 16, dim=0),
                              gl.maximum(t - 16 * q, 0), g_layout)
          fence_async_shared()
          gl.thread_barrier()
          for q in gl.static_range(2):
            if (16 << q < BLOCK_K) & (rows == 16 << q):
              acc = _dw_mma(x_bufs.index(stage).slice(0, 16 << q, dim=0),
                            g_bufs.index(stage).slice(0, 16 << q, dim=0), acc, use_acc)
          if rows == BLOCK_K:
            acc = _dw_mma(x_bufs.index(stage), g_bufs.index(stage), acc, use_acc)
        else:
          acc = _dw_mma(x_bufs.index(stage), g_bufs.index(stage), acc, use_acc)
      else:
        if t < BLOCK_K:
          # The group's last, partial step: the rows past its end are the next group's (or
          # padding, maybe not even finite): zeros instead, in both operands.
          _zero_rows_from(x_bufs.index(stage), t, x_layout)
          _zero_rows_from(g_bufs.index(stage), t, g_layout)
          fence_async_shared()
          gl.thread_barrier()
        acc = _dw_mma(x_bufs.index(stage), g_bufs.index(stage), acc, use_acc)
      # Step s - 1's MMA is done in this warpgroup (the waits above); after the barrier, in
      # both: its stage is free for step s + STAGES - 1.
      gl.thread_barrier()
      nxt = (i + STAGES - 1) % STAGES
      _issue_step(x_desc, g_desc, x_bufs.index(nxt), g_bufs.index(nxt), ready.index(nxt),
                  p_r0, s + STAGES - 1, s_hi, k0, n0)
      p_r0, _, _, _ = _step_record(steps_ptr, s + STAGES, MAX_STEPS, E)
      if STORE_CHUNKS > 1:
        _dw_store_chunks(chunk_desc, out_buf, pend_row, n0, pend_next, pend_next + 1)
        pend_next = gl.minimum(pend_next + 1, STORE_CHUNKS)

      use_acc = True
      if c_last != 0:  # the expert's last step: its tile goes out by TMA
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if STORE_CHUNKS > 1:
          # What the previous tile has left (an expert of fewer steps than chunks).
          _dw_store_chunks(chunk_desc, out_buf, pend_row, n0, pend_next, STORE_CHUNKS)
          _stage_tile(acc, out_buf)
          pend_row = c_e * K + k0
          pend_next = 0
        else:
          _dw_store_tile(acc.to(dtype), out_buf, out_desc, c_e * K + k0, n0)
        use_acc = False
      c_r0, c_r1, c_last, c_e = _step_record(steps_ptr, s + 1, MAX_STEPS, E)
    # Every MMA done before the loop's exit (else ptxas waits at the latch, on every step).
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    if STORE_CHUNKS > 1:
      _dw_store_chunks(chunk_desc, out_buf, pend_row, n0, pend_next, STORE_CHUNKS)
    tma.store_wait(0)
    for j in gl.static_range(STAGES):
      mbarrier.invalidate(ready.index(j))


  # -- dw: warp-specialized, the two consumer warpgroups a few steps apart ------------------

  @gluon.jit
  def _dw_ws_producer(x_desc, g_desc, xa_bufs, xb_bufs, g_bufs, ready, empty, steps_ptr, s_lo,
                      s_hi, k0, n0, MAX_STEPS: gl.constexpr, E: gl.constexpr):
    """One warp: the TMA loads of every row step of the program (both warpgroups' x halves
    and the dy tile they share), STAGES deep, each into the stage both consumers last
    released (``empty``), completing on ``ready``."""
    STAGES: gl.constexpr = g_bufs.shape[0]
    HALF: gl.constexpr = xa_bufs.shape[2]
    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + g_desc.block_type.nbytes
    for s in range(s_lo, s_hi):
      i = s - s_lo
      stage = i % STAGES
      r0, _, _, _ = _step_record(steps_ptr, s, MAX_STEPS, E)
      mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
      mbarrier.expect(ready.index(stage), nbytes)
      tma.async_copy_global_to_shared(x_desc, [r0, k0], ready.index(stage),
                                      xa_bufs.index(stage))
      tma.async_copy_global_to_shared(x_desc, [r0, k0 + HALF], ready.index(stage),
                                      xb_bufs.index(stage))
      tma.async_copy_global_to_shared(g_desc, [r0, n0], ready.index(stage), g_bufs.index(stage))

  @gluon.jit
  def _dw_ws_consumer(WG: gl.constexpr, x_bufs, g_bufs, ready, empty, go, out_bufs, out_desc,
                      steps_ptr, first_ptr, s_lo, s_hi, e_lo, e_hi, k0, n0, K: gl.constexpr,
                      E: gl.constexpr, MAX_STEPS: gl.constexpr, STAGGER: gl.constexpr):
    """Consumer warpgroup WG (4 warps): rows WG * 64 .. + 64 of the program's dw tile (of K),
    over every row step of its segment. WG 1 starts when WG 0 has issued its step STAGGER
    (``go``), so that one warpgroup's tile epilogue (the accumulator's drain, conversion and
    store) runs while the other still multiplies; a stage is released (``empty`` counts both)
    one step after its MMA."""
    STAGES: gl.constexpr = g_bufs.shape[0]
    BLOCK_K: gl.constexpr = g_bufs.shape[1]
    BLOCK_N: gl.constexpr = g_bufs.shape[2]
    HALF: gl.constexpr = x_bufs.shape[2]
    EPI_N: gl.constexpr = out_bufs.shape[2]
    dtype: gl.constexpr = g_bufs.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // HALF, HALF // 8], [4, 1],
                                              [1, 0])
    g_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_N, BLOCK_N // 8],
                                              [4, 1], [1, 0])
    z_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // EPI_N, EPI_N // 8], [4, 1],
                                              [1, 0])
    out_buf = out_bufs.index(WG)
    row_base = k0 + WG * HALF
    if WG == 1:
      if STAGGER > 0:
        mbarrier.wait(go, 0)

    acc = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
    cur = s_lo  # the next row step; the experts' steps follow each other from s_lo to s_hi
    # An expert's steps in an inner loop and its tile's epilogue after it, as in the forward
    # kernel: with the epilogue inside one loop over all steps, the consumer needed more
    # than its 168 registers and ptxas serialized every MMA (C7512).
    for e in range(e_lo, e_hi):
      s1 = gl.minimum(gl.maximum(gl.load(first_ptr + e + 1), cur), s_hi)
      row = e * K + row_base
      if s1 > cur:
        for s in range(cur, s1):
          i = s - s_lo
          stage = i % STAGES
          r0, r1, _, _ = _step_record(steps_ptr, s, MAX_STEPS, E)
          mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
          xv = x_bufs.index(stage)
          gv = g_bufs.index(stage)
          t = r1 - r0
          if t < BLOCK_K:
            # The group's last, partial step, trimmed (required: the untrimmed variant,
            # zeroing every slice past t and multiplying all 64 rows, gave wrong dw on an
            # H200, 2026-11-23), after the previous MMA is done. Both warpgroups write the
            # same zeros into the shared dy rows (and the rows before t back unchanged).
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            acc = _dw_trimmed_mma(xv, gv, t, acc, s > cur, x_layout, g_layout)
          else:
            acc = _dw_mma(xv, gv, acc, s > cur)
          # Step s - 1's MMA is done in this warpgroup: its stage is released.
          mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=s > cur)
          if WG == 0:
            if STAGGER > 0:
              mbarrier.arrive(go, pred=i == STAGGER)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((s1 - 1 - s_lo) % STAGES))
        # This half of the expert's tile out by TMA, a column chunk at a time.
        if EPI_N == BLOCK_N:
          _stage_tile(acc.to(dtype), out_buf)
          tma.async_copy_shared_to_global(out_desc, [row, n0], out_buf)
        else:
          lo, hi = gl.split(acc.reshape([HALF, 2, EPI_N]).permute((0, 2, 1)))
          _stage_tile(lo.to(dtype), out_buf)
          tma.async_copy_shared_to_global(out_desc, [row, n0], out_buf)
          _stage_tile(hi.to(dtype), out_buf)
          tma.async_copy_shared_to_global(out_desc, [row, n0 + EPI_N], out_buf)
      else:  # an expert with no rows: zeros
        _stage_tile(gl.zeros([HALF, EPI_N], dtype, z_layout), out_buf)
        for j in gl.static_range(BLOCK_N // EPI_N):
          tma.async_copy_shared_to_global(out_desc, [row, n0 + j * EPI_N], out_buf)
      cur = s1
    if WG == 0:
      if STAGGER > 0:  # a program of at most STAGGER steps never arrived in the loop
        mbarrier.arrive(go, pred=s_hi - s_lo <= STAGGER)
    tma.store_wait(0)

  @gluon.jit
  def _dw_ws_consumer1(x_bufs, g_bufs, ready, empty, go, out_bufs, out_desc, steps_ptr,
                       first_ptr, s_lo, s_hi, e_lo, e_hi, k0, n0, K: gl.constexpr,
                       E: gl.constexpr, MAX_STEPS: gl.constexpr, STAGGER: gl.constexpr):
    """The second consumer warpgroup (a worker partition): rows 64 .. 128 of the dw tile."""
    _dw_ws_consumer(1, x_bufs, g_bufs, ready, empty, go, out_bufs, out_desc, steps_ptr,
                    first_ptr, s_lo, s_hi, e_lo, e_hi, k0, n0, K, E, MAX_STEPS, STAGGER)

  @gluon.jit
  def grouped_gemm_dw_ws_kernel(
      x_ptr,        # [C, K] recv_x
      dy_ptr,       # [C, N] output cotangent
      steps_ptr,    # int32 [MAX_STEPS, 4] row steps from ``dw_step_table`` (MAX_STEPS >= 1)
      first_ptr,    # int32 [E + 1]: expert e's steps are [first[e], first[e + 1])
      dw_ptr,       # [E, K, N] weight cotangent
      C: gl.constexpr, K: gl.constexpr, N: gl.constexpr, E: gl.constexpr,
      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
      NUM_SEGS: gl.constexpr, MAX_STEPS: gl.constexpr, STAGES: gl.constexpr,
      EPI_N: gl.constexpr,    # each warpgroup's half tile leaves in BLOCK_N / EPI_N chunks
      STAGGER: gl.constexpr,  # row steps the second consumer warpgroup starts behind
      BAND_N: gl.constexpr,   # tiles walked in bands of this many n-tiles (0: all of N)
  ):
    """``grouped_gemm_dw_gluon_kernel``'s product, warp-specialized: a producer warp and two
    consumer warpgroups (each 64 of the tile's K rows, its own x half, the dy tile shared).
    Grid: NUM_SEGS * (K / BLOCK_M) * (N / BLOCK_N); launch with num_warps=4."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    k0, n0, e_lo, e_hi = _dw_program(K, N, E, BLOCK_M, BLOCK_N, NUM_SEGS, BAND_N)

    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, HALF], dtype)
    g_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], dtype)
    out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, EPI_N], dtype)
    xa_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, HALF], x_smem_layout)
    xb_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, HALF], x_smem_layout)
    g_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], g_smem_layout)
    out_bufs = gl.allocate_shared_memory(dtype, [2, HALF, EPI_N], out_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    go = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
      mbarrier.init(ready.index(j), count=1)
      mbarrier.init(empty.index(j), count=2)  # one arrive per consumer warpgroup
    mbarrier.init(go.index(0), count=1)
    x_desc = tma.make_tensor_descriptor(x_ptr, shape=[C, K], strides=[K, 1],
                                        block_shape=[BLOCK_K, HALF], layout=x_smem_layout)
    g_desc = tma.make_tensor_descriptor(dy_ptr, shape=[C, N], strides=[N, 1],
                                        block_shape=[BLOCK_K, BLOCK_N], layout=g_smem_layout)
    out_desc = tma.make_tensor_descriptor(dw_ptr, shape=[E * K, N], strides=[N, 1],
                                          block_shape=[HALF, EPI_N], layout=out_layout)
    s_lo = gl.minimum(gl.maximum(gl.load(first_ptr + e_lo), 0), MAX_STEPS)
    s_hi = gl.minimum(gl.maximum(gl.load(first_ptr + e_hi), s_lo), MAX_STEPS)
    gl.warp_specialize([
        (_dw_ws_consumer, (0, xa_bufs, g_bufs, ready, empty, go.index(0), out_bufs, out_desc,
                           steps_ptr, first_ptr, s_lo, s_hi, e_lo, e_hi, k0, n0, K, E,
                           MAX_STEPS, STAGGER)),
        (_dw_ws_consumer1, (xb_bufs, g_bufs, ready, empty, go.index(0), out_bufs, out_desc,
                            steps_ptr, first_ptr, s_lo, s_hi, e_lo, e_hi, k0, n0, K, E,
                            MAX_STEPS, STAGGER)),
        (_dw_ws_producer, (x_desc, g_desc, xa_bufs, xb_bufs, g_bufs, ready, empty, steps_ptr,
                           s_lo, s_hi, k0, n0, MAX_STEPS, E)),
    ], [4, 1], [232, 40])
    for j in gl.static_range(STAGES):
      mbarrier.invalidate(ready.index(j))
      mbarrier.invalidate(empty.index(j))
    mbarrier.invalidate(go.index(0))

  # -- forward / dx: warp-specialized (a TMA producer warp, two consumer warpgroups) ---------

  @gluon.jit
  def _tile_record(tiles_ptr, m_tile, C: gl.constexpr, E: gl.constexpr):
    """(row_start, row_end, expert) of group tile ``m_tile`` of ``tile_table``, clamped."""
    rec = tiles_ptr + (1 + m_tile) * 4
    row_start = gl.minimum(gl.maximum(gl.load(rec), 0), C)
    row_end = gl.minimum(gl.maximum(gl.load(rec + 1), row_start), C)
    e = gl.minimum(gl.maximum(gl.load(rec + 2), 0), E - 1)
    return row_start, row_end, e

  @gluon.jit
  def _ws_tile_coords(tile, num_group, tiles_ptr, NUM_N: gl.constexpr, GROUP_M: gl.constexpr,
                      EXPERT_RASTER: gl.constexpr):
    """(group tile, N tile) of output tile ``tile``: the N tiles of one group tile in turn
    (GROUP_M = 1), or GROUP_M group tiles at a time walked M-fastest per N tile, so that the
    m-tiles of an expert reading the same w tile run side by side (one read from HBM). With
    EXPERT_RASTER the runs of GROUP_M group tiles are cut from each expert's first tile
    (``tile_table``'s span column), so no run holds two experts' tiles: where experts have
    uneven tile counts, a fixed run straddles two of them and each's w tiles are read by two
    runs far apart in time, twice from HBM when w[e] exceeds L2."""
    if EXPERT_RASTER:
      q = gl.minimum(tile // NUM_N, num_group - 1)  # a group tile of the tile's run
      span = gl.load(tiles_ptr + (1 + q) * 4 + 3)
      first = gl.minimum(span >> 16, q)
      count = gl.maximum(span & 65535, q - first + 1)
      start = first + ((q - first) // GROUP_M) * GROUP_M
      size = gl.minimum(first + count - start, GROUP_M)
      local = tile - start * NUM_N
      m_tile = gl.minimum(start + local % size, num_group - 1)
      n_tile = gl.minimum(local // size, NUM_N - 1)
    elif GROUP_M == 1:
      m_tile = tile // NUM_N
      n_tile = tile % NUM_N
    else:
      first = (tile // (GROUP_M * NUM_N)) * GROUP_M
      size = gl.minimum(num_group - first, GROUP_M)
      local = tile % (GROUP_M * NUM_N)
      m_tile = first + local % size
      n_tile = local // size
    return m_tile, n_tile

  @gluon.jit
  def _ws_fwd_producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, tiles_ptr, num_group,
                       C: gl.constexpr, K: gl.constexpr, N: gl.constexpr, E: gl.constexpr,
                       BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, B_KMAJOR: gl.constexpr,
                       GROUP_M: gl.constexpr, EXPERT_RASTER: gl.constexpr, GLU: gl.constexpr):
    """One warp: the TMA loads of every K step of the program's tiles, STAGES deep, each
    into the stage the consumers last released (``empty``), completing on ``ready``. With
    GLU, n-tile j's w tile is two half-width boxes side by side: gate columns
    ``j * BLOCK_N/2 ..`` and the up columns ``N/2`` further."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    NUM_N: gl.constexpr = N // BLOCK_N
    K_ITERS: gl.constexpr = K // BLOCK_K
    W_BOXES: gl.constexpr = 2 if GLU else 1
    nbytes: gl.constexpr = x_desc.block_type.nbytes + W_BOXES * w_desc.block_type.nbytes
    it = 0
    for tile in range(gl.program_id(0), num_group * NUM_N, gl.num_programs(0)):
      m_tile, n_tile = _ws_tile_coords(tile, num_group, tiles_ptr, NUM_N, GROUP_M,
                                       EXPERT_RASTER)
      row_start, _, e = _tile_record(tiles_ptr, m_tile, C, E)
      n0 = n_tile * BLOCK_N
      for ki in range(K_ITERS):
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), nbytes)
        tma.async_copy_global_to_shared(x_desc, [row_start, ki * BLOCK_K], ready.index(s),
                                        a_bufs.index(s))
        if B_KMAJOR:  # dx: B[e] = w[e]^T, w seen as [E * N, K]
          tma.async_copy_global_to_shared(w_desc, [e * N + n0, ki * BLOCK_K], ready.index(s),
                                          b_bufs.index(s))
        elif GLU:     # gate | up halves of the stage's w tile, w seen as [E * K, N]
          HALF_N: gl.constexpr = BLOCK_N // 2
          tma.async_copy_global_to_shared(w_desc, [e * K + ki * BLOCK_K, n_tile * HALF_N],
                                          ready.index(s), b_bufs.index(s).slice(0, HALF_N, 1))
          tma.async_copy_global_to_shared(w_desc,
                                          [e * K + ki * BLOCK_K, N // 2 + n_tile * HALF_N],
                                          ready.index(s),
                                          b_bufs.index(s).slice(HALF_N, HALF_N, 1))
        else:         # forward: w seen as [E * K, N]
          tma.async_copy_global_to_shared(w_desc, [e * K + ki * BLOCK_K, n0], ready.index(s),
                                          b_bufs.index(s))
        it += 1

  @gluon.jit
  def _ws_fwd_consumer(WG: gl.constexpr, a_bufs, b_bufs, ready, empty, out_bufs, y_desc, y_ptr,
                       tiles_ptr, num_group, C: gl.constexpr, K: gl.constexpr, N: gl.constexpr,
                       E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_K: gl.constexpr, B_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr,
                       EXPERT_RASTER: gl.constexpr, GLU: gl.constexpr):
    """Consumer warpgroup WG (4 warps): rows WG * BLOCK_M/2 .. of every tile. It runs the MMAs
    of each K step as the stage arrives and releases the stage one step later (``empty``
    counts both warpgroups); a half holding no rows of the group (a partial last tile) skips
    its MMAs and releases each stage at once. Then its half goes out through shared memory,
    one EPI_N-column chunk at a time (``out_bufs``' width): by TMA when every row is the
    group's, else by 16-byte stores masked to the group's rows. With GLU the accumulator's
    left half is the gate g and its right half the up product u of the same columns, and
    ``silu(g) * u`` (f32) goes out: an output [C, N/2]."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    HALF: gl.constexpr = BLOCK_M // 2
    NUM_N: gl.constexpr = N // BLOCK_N
    OUT_N: gl.constexpr = N // 2 if GLU else N
    K_ITERS: gl.constexpr = K // BLOCK_K
    EPI_N: gl.constexpr = out_bufs.shape[2]
    dtype: gl.constexpr = y_ptr.dtype.element_ty
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // EPI_N, EPI_N // 8],
                                               [4, 1], [1, 0])
    out_buf = out_bufs.index(WG)
    acc = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
    it = 0
    for tile in range(gl.program_id(0), num_group * NUM_N, gl.num_programs(0)):
      m_tile, n_tile = _ws_tile_coords(tile, num_group, tiles_ptr, NUM_N, GROUP_M,
                                       EXPERT_RASTER)
      row_start, row_end, _ = _tile_record(tiles_ptr, m_tile, C, E)
      r0 = row_start + WG * HALF
      n0 = n_tile * BLOCK_N
      if r0 < row_end:
        for ki in range(K_ITERS):
          s = it % STAGES
          mbarrier.wait(ready.index(s), (it // STAGES) & 1)
          if B_KMAJOR:
            b = b_bufs.index(s).permute((1, 0))
          else:
            b = b_bufs.index(s)
          a = a_bufs.index(s).slice(WG * HALF, HALF, dim=0)
          acc = warpgroup_mma(a, b, acc, use_acc=ki > 0, is_async=True)
          acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
          mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ki > 0)
          it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        if GLU:
          g, u = gl.split(acc.reshape([HALF, 2, BLOCK_N // 2]).permute((0, 2, 1)))
          h = _silu(g) * u
          _ws_store_chunk(h.to(dtype), out_buf, y_desc, y_ptr, r0, row_end,
                          n_tile * (BLOCK_N // 2), OUT_N, st_layout)
        elif EPI_N == BLOCK_N:
          _ws_store_chunk(acc.to(dtype), out_buf, y_desc, y_ptr, r0, row_end, n0, N, st_layout)
        else:  # two chunks (a smaller output buffer leaves room for another stage)
          lo, hi = gl.split(acc.to(dtype).reshape([HALF, 2, EPI_N]).permute((0, 2, 1)))
          _ws_store_chunk(lo, out_buf, y_desc, y_ptr, r0, row_end, n0, N, st_layout)
          _ws_store_chunk(hi, out_buf, y_desc, y_ptr, r0, row_end, n0 + EPI_N, N, st_layout)
      else:
        for ki in range(K_ITERS):
          s = it % STAGES
          mbarrier.wait(ready.index(s), (it // STAGES) & 1)
          mbarrier.arrive(empty.index(s))
          it += 1
    tma.store_wait(0)

  @gluon.jit
  def _silu(g):
    """``g * sigmoid(g)`` in f32 with one ``ex2`` and one approximate division (two MUFU
    operations per element; tiles do not overlap their epilogue with MMAs, so at the
    Qwen3-MoE shape, 32 K steps per tile, this costs ~1 us a tile). Not ``0.5 g (1 +
    tanh(g / 2))`` with ``tanh.approx``: one MUFU operation, but 1 + tanh cancels for
    negative g, an absolute error of ~|g| 2^-12 where silu is ~0."""
    return g / (1.0 + gl.exp2(g * -1.4426950408889634))

  @gluon.jit
  def _ws_store_chunk(vals, out_buf, y_desc, y_ptr, r0, row_end, n0, N: gl.constexpr,
                      st_layout: gl.constexpr):
    """One consumer's [HALF, EPI_N] output chunk at (r0, n0) through ``out_buf``: by TMA when
    every row is before ``row_end``, else by 16-byte stores masked to those rows."""
    HALF: gl.constexpr = out_buf.shape[0]
    EPI_N: gl.constexpr = out_buf.shape[1]
    _stage_tile(vals, out_buf)
    if row_end - r0 >= HALF:
      tma.async_copy_shared_to_global(y_desc, [r0, n0], out_buf)
    else:
      rows = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, st_layout))
      cols = n0 + gl.arange(0, EPI_N, layout=gl.SliceLayout(0, st_layout))
      gl.store(y_ptr + rows.to(gl.int64)[:, None] * N + cols[None, :],
               out_buf.load(st_layout), mask=(rows < row_end)[:, None])

  @gluon.jit
  def _ws_fwd_consumer1(a_bufs, b_bufs, ready, empty, out_bufs, y_desc, y_ptr, tiles_ptr,
                        num_group, C: gl.constexpr, K: gl.constexpr, N: gl.constexpr,
                        E: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, B_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr,
                        EXPERT_RASTER: gl.constexpr, GLU: gl.constexpr):
    """The second consumer warpgroup (a worker partition): rows BLOCK_M/2 .. of each tile."""
    _ws_fwd_consumer(1, a_bufs, b_bufs, ready, empty, out_bufs, y_desc, y_ptr, tiles_ptr,
                     num_group, C, K, N, E, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR, GROUP_M,
                     EXPERT_RASTER, GLU)

  @gluon.jit
  def grouped_gemm_ws_kernel(
      x_ptr,        # [C, K] rows grouped by expert (recv_x, or dy for the dx product)
      w_ptr,        # [E, K, N] (forward) or [E, N, K] (dx: B[e] = w[e]^T), row-major
      tiles_ptr,    # int32 tile table from ``tile_table`` (same C, E, BLOCK_M)
      y_ptr,        # [C, N] output; rows in no group get zeros
      C: gl.constexpr, K: gl.constexpr, N: gl.constexpr, E: gl.constexpr,
      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
      MAX_GROUP_TILES: gl.constexpr, MAX_ZERO_TILES: gl.constexpr, STAGES: gl.constexpr,
      B_KMAJOR: gl.constexpr,
      GROUP_M: gl.constexpr,  # tile raster: see _ws_tile_coords
      EXPERT_RASTER: gl.constexpr,  # runs of GROUP_M tiles cut per expert (_ws_tile_coords)
      EPI_N: gl.constexpr,    # output chunk width (BLOCK_N, or BLOCK_N / 2 to save memory)
      GLU: gl.constexpr = False,  # y [C, N/2] = silu(gate) * up (``_ws_fwd_consumer``)
  ):
    """``grouped_gemm_kernel``'s product, warp-specialized: program p takes output tiles
    p, p + P, ... Grid: one program per SM (persistent), or one per possible group tile.

    With GLU (forward only) w holds the gate columns then the up columns (``[E, K, N]``, N =
    2F) and the output is ``silu(x @ w_gate) * (x @ w_up)``, ``[C, F]``: each tile multiplies
    BLOCK_N/2 gate and the same BLOCK_N/2 up columns in one accumulator (the loads and MMAs
    of the plain product over N), and its epilogue writes the activation only."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    NUM_N: gl.constexpr = N // BLOCK_N
    OUT_N: gl.constexpr = N // 2 if GLU else N  # y's columns
    OUT_BN: gl.constexpr = BLOCK_N // 2 if GLU else BLOCK_N  # y's columns per tile
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
    if B_KMAJOR:
      b_block: gl.constexpr = [BLOCK_N, BLOCK_K]
    else:
      b_block: gl.constexpr = [BLOCK_K, BLOCK_N]
    b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(b_block, dtype)
    if GLU:  # each stage's w tile arrives as two boxes, gate | up
      w_block: gl.constexpr = [BLOCK_K, BLOCK_N // 2]
    else:
      w_block: gl.constexpr = b_block
    y_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, EPI_N], dtype)
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_block, b_layout)
    out_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M // 2, EPI_N], y_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
      mbarrier.init(ready.index(j), count=1)
      mbarrier.init(empty.index(j), count=2)  # one arrive per consumer warpgroup
    # Rows past C read as zeros; a tile's rows past its group are computed, never stored.
    x_desc = tma.make_tensor_descriptor(x_ptr, shape=[C, K], strides=[K, 1],
                                        block_shape=[BLOCK_M, BLOCK_K], layout=a_layout)
    if B_KMAJOR:
      w_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * N, K], strides=[K, 1],
                                          block_shape=b_block, layout=b_layout)
    else:
      w_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * K, N], strides=[N, 1],
                                          block_shape=w_block, layout=b_layout)
    y_desc = tma.make_tensor_descriptor(y_ptr, shape=[C, OUT_N], strides=[OUT_N, 1],
                                        block_shape=[BLOCK_M // 2, EPI_N], layout=y_layout)
    num_group = gl.minimum(gl.maximum(gl.load(tiles_ptr), 0), MAX_GROUP_TILES)
    gl.warp_specialize([
        (_ws_fwd_consumer, (0, a_bufs, b_bufs, ready, empty, out_bufs, y_desc, y_ptr,
                            tiles_ptr, num_group, C, K, N, E, BLOCK_M, BLOCK_N, BLOCK_K,
                            B_KMAJOR, GROUP_M, EXPERT_RASTER, GLU)),
        (_ws_fwd_consumer1, (a_bufs, b_bufs, ready, empty, out_bufs, y_desc, y_ptr,
                             tiles_ptr, num_group, C, K, N, E, BLOCK_M, BLOCK_N, BLOCK_K,
                             B_KMAJOR, GROUP_M, EXPERT_RASTER, GLU)),
        (_ws_fwd_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, tiles_ptr,
                            num_group, C, K, N, E, BLOCK_N, BLOCK_K, B_KMAJOR, GROUP_M,
                            EXPERT_RASTER, GLU)),
    ], [4, 1], [232, 40])

    # Rows in no group: zeros, BLOCK_M x OUT_BN at a time, in reverse program order.
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // OUT_BN, OUT_BN // 8], [4, 1],
                                        [1, 0])
    num_zero = gl.minimum(gl.maximum(gl.load(tiles_ptr + 1), 0), MAX_ZERO_TILES)
    zeros = gl.zeros([BLOCK_M, OUT_BN], dtype, zl)
    pid = gl.program_id(0)
    for z in range(gl.num_programs(0) - 1 - pid, num_zero * NUM_N, gl.num_programs(0)):
      rec = tiles_ptr + (1 + MAX_GROUP_TILES + z // NUM_N) * 4
      row_start = gl.minimum(gl.maximum(gl.load(rec), 0), C)
      row_end = gl.minimum(gl.maximum(gl.load(rec + 1), row_start), C)
      rows = row_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, zl))
      cols = (z % NUM_N) * OUT_BN + gl.arange(0, OUT_BN, layout=gl.SliceLayout(0, zl))
      gl.store(y_ptr + rows.to(gl.int64)[:, None] * OUT_N + cols[None, :], zeros,
               mask=(rows < row_end)[:, None])
    for j in gl.static_range(STAGES):
      mbarrier.invalidate(ready.index(j))
      mbarrier.invalidate(empty.index(j))


def gluon_fwd_supported(K: int, N: int, elem_bytes: int, cfg, *, glu: bool = False
                        ) -> str | None:
  """None when ``grouped_gemm_ws_kernel`` can run ``cfg`` (a ``TileConfig``) for y [C, N] =
  x [C, K] @ B[e] (the forward, or dx with B[e] = w[e]^T), or with ``glu`` for y [C, N/2] =
  silu(x @ w[e][:, :N/2]) * (x @ w[e][:, N/2:]), else why not."""
  why = _gluon_tile_why_not("warp-specialized kernel", cfg, elem_bytes, (128, 256))
  if why is None and (K % cfg.block_k or N % cfg.block_n):
    why = f"K={K} and N={N} must be multiples of the tile's {cfg.block_k} and {cfg.block_n}"
  if why is None and glu and cfg.block_n // 2 * elem_bytes < 128:
    why = (f"block_n={cfg.block_n}: the activation's tile takes gate and up boxes of >= 128 "
           f"bytes each (block_n >= {2 * 128 // elem_bytes})")
  if why is None and ws_smem_bytes(cfg, elem_bytes, glu=glu) > _SMEM_BYTES:
    why = (f"{cfg.num_stages} stages of {cfg.block_m}x{cfg.block_n}x{cfg.block_k} and the "
           f"output tile exceed shared memory ({ws_smem_bytes(cfg, elem_bytes, glu=glu)} "
           f"bytes)")
  return why

_SMEM_BYTES = 227 * 1024 - 1024  # an sm_90 SM's shared memory, less barriers and alignment


def _ws_stages_bytes(cfg, elem_bytes: int) -> int:
  """Shared memory of ``grouped_gemm_ws_kernel``'s pipeline stages (an x and a w tile each)."""
  return cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * elem_bytes


def ws_epilogue_cols(cfg, elem_bytes: int, *, glu: bool = False) -> int:
  """Columns of ``grouped_gemm_ws_kernel``'s output chunks: the whole tile's where that fits
  beside the stages, else half (the tile then goes out in two chunks). With ``glu`` the tile
  is half as wide (the activation of its gate and up halves) and goes out whole."""
  if glu:
    return cfg.block_n // 2
  whole = cfg.block_m * cfg.block_n * elem_bytes
  fits = _ws_stages_bytes(cfg, elem_bytes) + whole <= _SMEM_BYTES
  return cfg.block_n if fits else cfg.block_n // 2


def ws_smem_bytes(cfg, elem_bytes: int, *, glu: bool = False) -> int:
  """Shared memory of ``grouped_gemm_ws_kernel``: the stages and one output chunk per
  consumer warpgroup."""
  return (_ws_stages_bytes(cfg, elem_bytes)
          + cfg.block_m * ws_epilogue_cols(cfg, elem_bytes, glu=glu) * elem_bytes)


def gluon_fwd_constexprs(C: int, K: int, N: int, E: int, cfg, *, b_kmajor: bool,
                         glu: bool = False) -> dict:
  """Compile-time constants of ``grouped_gemm_ws_kernel`` (row-major x, w, y). Launch it with
  ``num_warps=4`` (its default partition is the first consumer warpgroup) on at most one
  program per SM. ``glu``: the fused SwiGLU forward (not with ``b_kmajor``)."""
  if glu and b_kmajor:
    raise ValueError("gluon_fwd_constexprs: glu=True is a forward product (b_kmajor=False)")
  max_group, max_zero = table_bounds(C, E, cfg.block_m)
  return dict(C=C, K=K, N=N, E=E, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, MAX_GROUP_TILES=max_group, MAX_ZERO_TILES=max_zero,
              STAGES=cfg.num_stages, B_KMAJOR=b_kmajor, GROUP_M=cfg.group_m,
              EXPERT_RASTER=(cfg.expert_raster and cfg.group_m > 1
                             and expert_raster_ok(C, E, cfg.block_m)),
              # 16-bit inputs only (gluon_fwd_supported)
              EPI_N=ws_epilogue_cols(cfg, 2, glu=glu), GLU=glu)


def gluon_dw_constexprs(C: int, K: int, N: int, E: int, cfg, num_segs: int) -> dict:
  """Compile-time constants of ``grouped_gemm_dw_gluon_kernel`` (row-major x, dy, dw), for the
  step table of ``dw_step_table`` (same C, E, block_k)."""
  return dict(C=C, K=K, N=N, E=E, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, NUM_SEGS=num_segs,
              MAX_STEPS=dw_max_steps(C, E, cfg.block_k), STAGES=cfg.num_stages,
              NUM_WARPS=cfg.num_warps, STORE_CHUNKS=cfg.store_chunks,
              TRIM_PARTIAL=cfg.trim_partial, BAND_N=cfg.band_n)


def gluon_dw_ws_constexprs(C: int, K: int, N: int, E: int, cfg, num_segs: int) -> dict:
  """Compile-time constants of ``grouped_gemm_dw_ws_kernel`` (row-major x, dy, dw), for the
  step table of ``dw_step_table`` (same C, E, block_k). Launch it with ``num_warps=4``."""
  return dict(C=C, K=K, N=N, E=E, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              BLOCK_K=cfg.block_k, NUM_SEGS=num_segs,
              MAX_STEPS=dw_max_steps(C, E, cfg.block_k), STAGES=cfg.num_stages,
              EPI_N=cfg.block_n // cfg.store_chunks,
              STAGGER=cfg.stagger, BAND_N=cfg.band_n)
