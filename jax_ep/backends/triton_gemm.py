"""Triton grouped matmul for the triton backend: ``y[rows of e] = recv_x[rows of e] @ w[e]``.

The three products of ``jax_ep.grouped_matmul`` and its gradient run as Triton kernels
(kernels/grouped_gemm.py) launched through ``jax_ep.launch.triton_call`` (one XLA FFI custom
call each, on XLA's stream):

  forward   y  [C, N]          = recv_x[rows of e] @ w[e]        (zeros outside groups)
  backward  dx [C, H]          = dy[rows of e] @ w[e]^T          (same kernel, w read transposed)
            dw [E_local, H, N] = recv_x[rows of e]^T @ dy[rows of e]

Group sizes and offsets stay on the device; grids are static. ``jax.custom_vjp`` ties the
three together, so ``jax.grad`` through ``grouped_matmul`` never falls back to XLA.

The triton backend module re-exports ``grouped_matmul``, ``gmm_usable`` and
``check_gmm_usable`` from here. Nothing here needs the symmetric-memory runtime: the grouped
matmul can run on any CUDA GPU where the FFI library is built, without
``jax_ep.runtime.initialize``.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from jax_ep.experts import _glu_of  # silu(gate) * up of [gate | up], in XLA
from jax_ep.layout import DispatchLayout

_API = "jax_ep.grouped_matmul"
_DTYPES = ("bfloat16", "float16", "float32")


# -- availability ----------------------------------------------------------------------------------

def _why_not_usable() -> str | None:
  """None when the Triton grouped matmul can run here, else the reason."""
  from jax_ep import launch
  return launch.unavailable_reason()


def gmm_usable() -> bool:
  """Whether the Triton grouped matmul can run here (triton, a CUDA GPU, the FFI library)."""
  return _why_not_usable() is None


def check_gmm_usable() -> None:
  """Raise RuntimeError saying what is missing when ``gmm_usable()`` is False."""
  why = _why_not_usable()
  if why is not None:
    raise RuntimeError(f"{_API}: backend='triton' cannot run here: {why}. Use backend='xla' "
                       f"(or 'auto') instead.")


# -- precision -------------------------------------------------------------------------------------

def _input_precision(dtype) -> str:
  """``tl.dot`` precision for float32 operands, following ``jax_default_matmul_precision``.

  XLA's default for float32 dots on NVIDIA GPUs uses TF32 tensor cores; "highest"/"float32"
  asks for exact float32 products ("ieee"). 16-bit inputs ignore this.
  """
  if jnp.dtype(dtype) != jnp.float32:
    return "ieee"
  setting = jax.config.jax_default_matmul_precision
  if setting is not None and str(setting).lower() in ("highest", "float32"):
    return "ieee"
  return "tf32"


# -- the three launches ----------------------------------------------------------------------------

def _triton_call(*args, **kwargs):
  """``jax_ep.launch.triton_call`` (a seam: CPU tests swap in Triton's interpreter)."""
  from jax_ep.launch import triton_call
  return triton_call(*args, **kwargs)


def _kernels():
  from jax_ep.kernels import grouped_gemm
  return grouped_gemm


def _switch_on(name: str) -> bool:
  """An on-by-default switch of the environment: off when set to "", 0 or false."""
  return os.environ.get(name, "1") not in ("", "0", "false", "False")


def _table_kernels():
  from jax_ep.kernels import gemm_tables
  return gemm_tables


def _int32(a):
  return jnp.asarray(a).astype(jnp.int32)


def _table_kernel_on(kernel: bool | None) -> bool:
  """``kernel``, or where None the environment's ``JAX_EP_GMM_TABLE_KERNEL`` (on by default)."""
  return _switch_on("JAX_EP_GMM_TABLE_KERNEL") if kernel is None else kernel


def _tile_table(sizes, offsets, c: int, e: int, block_m: int, kernel: bool | None = None):
  """``grouped_gemm.tile_table`` on the device: one Triton launch (``gemm_tables``), or with
  ``kernel=False`` (default: ``JAX_EP_GMM_TABLE_KERNEL``, on) the jax.numpy version, which XLA
  runs as a dozen small kernels."""
  if not _table_kernel_on(kernel):
    return _kernels().tile_table(sizes, offsets, c, e, block_m, jnp)
  gt = _table_kernels()
  grid, constexprs = gt.tile_table_launch(c, e, block_m)
  rows = 1 + constexprs["MAX_G"] + constexprs["MAX_Z"]
  (table,) = _triton_call(
      gt.tile_table_kernel, _int32(sizes), _int32(offsets),
      out_shapes=jax.ShapeDtypeStruct((rows, 4), jnp.int32), grid=grid, num_warps=4,
      num_stages=1, constexprs=constexprs, name="jax_ep_gemm_tile_table")
  return table


def _dw_step_table(sizes, offsets, c: int, e: int, block_k: int, kernel: bool | None = None):
  """``grouped_gemm.dw_step_table`` on the device, like ``_tile_table``."""
  if not _table_kernel_on(kernel):
    return _kernels().dw_step_table(sizes, offsets, c, e, block_k, jnp)
  gt = _table_kernels()
  grid, constexprs = gt.dw_step_table_launch(c, e, block_k)
  steps, first = _triton_call(
      gt.dw_step_table_kernel, _int32(sizes), _int32(offsets),
      out_shapes=(jax.ShapeDtypeStruct((constexprs["MAX_S"], 4), jnp.int32),
                  jax.ShapeDtypeStruct((e + 1,), jnp.int32)),
      grid=grid, num_warps=4, num_stages=1, constexprs=constexprs,
      name="jax_ep_gemm_dw_step_table")
  return steps, first


def _gluon_kernels():
  from jax_ep.kernels import grouped_gemm_gluon
  return grouped_gemm_gluon


def _gluon_available() -> bool:
  """Whether the Gluon kernels (Triton 3.5/3.6) can be built here and are not turned off
  (``JAX_EP_GMM_GLUON=0``: the Triton kernels of ``TUNED`` and the tile rules run instead)."""
  return _switch_on("JAX_EP_GMM_GLUON") and _gluon_kernels().GLUON_ERROR is None


def _gluon_kernels_for(cfg):
  """The Gluon kernels' module when ``cfg`` asks for them (``gluon=True``, also in a config
  passed explicitly) and they are available and not turned off, else None."""
  return _gluon_kernels() if cfg.gluon and _gluon_available() else None


def _num_sms() -> int:
  """Streaming multiprocessors of the first GPU (132 on H100/H200 SXM when unknown)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  count = getattr(gpus[0], "core_count", None) if gpus else None
  return int(count) if count else 132


def _use_tma_default() -> bool:
  """TMA descriptor variant where the shape allows it: on by default (the fastest measured
  forward/dx kernels), off with JAX_EP_GMM_TMA=0 (pointer loads through cp.async)."""
  return _switch_on("JAX_EP_GMM_TMA")


def _grouped(x, w, sizes, offsets, *, transpose_w: bool, config=None,
             persistent: bool | None = None, use_tma: bool | None = None,
             half_tiles: bool | None = None):
  """``y[rows of e] = x[rows of e] @ (w[e]^T if transpose_w else w[e])``; zeros elsewhere.

  x: ``[C, K]``; w: ``[E, K, N]`` (or ``[E, N, K]`` with ``transpose_w``); returns ``[C, N]``.
  ``config``: a ``TileConfig`` overriding the tile table (benchmark sweeps). ``persistent``
  (default: the config's): launch one program per resident CTA, each looping over tiles,
  instead of one program per possible tile. ``use_tma``: load operands through TMA
  descriptors where the shape allows (default: ``$JAX_EP_GMM_TMA``, on). ``half_tiles``:
  overrides the config's switch (tiles holding at most half a block of rows run a half-height
  MMA loop). A config with ``gluon=True`` (``TUNED_GLUON`` where the Gluon kernels
  build) runs the warp-specialized Gluon kernel on the TMA path where it takes the shape.

  The tile table (``tile_table``: which rows and expert each program's tiles cover) is computed
  here, beside the launch, from the device-resident sizes and offsets (``_tile_table``).
  """
  gg = _kernels()
  c, k = x.shape
  e = w.shape[0]
  if transpose_w:
    n = w.shape[1]
    w_strides = (w.shape[1] * w.shape[2], 1, k)  # B[e][kk, nn] = w[e, nn, kk]
  else:
    n = w.shape[2]
    w_strides = (w.shape[1] * w.shape[2], n, 1)
  out = jax.ShapeDtypeStruct((c, n), x.dtype)
  if c == 0 or n == 0 or k == 0:
    return jnp.zeros(out.shape, out.dtype)
  precision = _input_precision(x.dtype)
  dtype = jnp.dtype(x.dtype).name
  itemsize = jnp.dtype(x.dtype).itemsize
  phase = "dx" if transpose_w else "fwd"
  want_tma = _use_tma_default() if use_tma is None else use_tma
  cfg = config or gg.forward_config(k, n, dtype, precision, phase=phase, tma=want_tma,
                                    gluon=_gluon_available())
  use_tma = want_tma and gg.tma_supported(k, n, e, cfg, w_strides=w_strides, elem_bytes=itemsize)
  if want_tma and not use_tma and config is None:  # the TMA tiles do not suit the pointer path
    cfg = gg.forward_config(k, n, dtype, precision, phase=phase, tma=False)
  table = _tile_table(sizes, offsets, c, e, cfg.block_m)
  name = "jax_ep_grouped_gemm_dx" if transpose_w else "jax_ep_grouped_gemm"
  ggl = _gluon_kernels_for(cfg) if use_tma else None
  if ggl and ggl.gluon_fwd_supported(k, n, itemsize, cfg) is None:
    # Warp-specialized (a TMA producer warp, two consumer warpgroups, 4 warps each):
    # one program per SM, or per possible tile.
    (y,) = _triton_call(
        ggl.grouped_gemm_ws_kernel, x, w, table, out_shapes=out,
        grid=gg.forward_grid(c, n, e, cfg, _num_sms() if cfg.persistent else None), num_warps=4,
        num_stages=1, constexprs=ggl.gluon_fwd_constexprs(c, k, n, e, cfg,
                                                          b_kmajor=transpose_w),
        name=name)
    return y
  persistent = cfg.persistent if persistent is None else persistent
  max_programs = gg.resident_programs(_num_sms(), cfg, itemsize) if persistent else None
  constexprs = gg.forward_constexprs(c, k, n, e, cfg, x_strides=(k, 1), w_strides=w_strides,
                                     y_strides=(n, 1), input_precision=precision,
                                     use_tma=use_tma, half_tiles=half_tiles)
  (y,) = _triton_call(
      gg.grouped_gemm_kernel, x, w, table, out_shapes=out,
      grid=gg.forward_grid(c, n, e, cfg, max_programs), num_warps=cfg.num_warps,
      num_stages=cfg.num_stages, constexprs=constexprs, name=name)
  return y


def _grouped_glu(x, w, sizes, offsets, config=None):
  """``silu(g) * u`` where ``[g | u] = x[rows of e] @ w[e]`` (g the first N/2 columns), by the
  warp-specialized Gluon kernel whose epilogue applies the activation: ``[C, N/2]``, zeros
  outside groups, the activation taken of the f32 accumulators. Returns None where that
  kernel cannot run (inputs not 16-bit; Gluon, TMA or the fused activation turned off or
  unavailable; the shape), and the caller then runs the product and the activation apart.

  ``config``: a ``TileConfig`` overriding the tiles; by default the forward's tiles for
  ``x @ w`` (``TUNED_GLUON``), made a Gluon config where they are not one."""
  gg = _kernels()
  c, k = x.shape
  e, n = w.shape[0], w.shape[2]
  itemsize = jnp.dtype(x.dtype).itemsize
  if not (itemsize == 2 and _use_tma_default() and _gluon_available()
          and _switch_on("JAX_EP_GMM_FUSED_GLU")):
    return None
  out = jax.ShapeDtypeStruct((c, n // 2), x.dtype)
  if c == 0 or n == 0 or k == 0:
    return jnp.zeros(out.shape, out.dtype)
  dtype = jnp.dtype(x.dtype).name
  cfg = config or gg.forward_config(k, n, dtype, phase="fwd", tma=True, gluon=True)
  if not cfg.gluon:
    cfg = dataclasses.replace(cfg, gluon=True, flatten=False, half_tiles=False)
  ggl = _gluon_kernels()
  w_strides = (w.shape[1] * w.shape[2], n, 1)
  if (ggl.gluon_fwd_supported(k, n, itemsize, cfg, glu=True) is not None
      or not gg.tma_supported(k, n, e, cfg, w_strides=w_strides, elem_bytes=itemsize)):
    return None
  table = _tile_table(sizes, offsets, c, e, cfg.block_m)
  (h,) = _triton_call(
      ggl.grouped_gemm_ws_kernel, x, w, table, out_shapes=out,
      grid=gg.forward_grid(c, n, e, cfg, _num_sms() if cfg.persistent else None), num_warps=4,
      num_stages=1, constexprs=ggl.gluon_fwd_constexprs(c, k, n, e, cfg, b_kmajor=False,
                                                        glu=True),
      name="jax_ep_grouped_gemm_glu")
  return h


def _grouped_dw(x, dy, sizes, offsets, num_experts: int, config=None, use_tma: bool = False):
  """``dw[e] = x[rows of e]^T @ dy[rows of e]``: x ``[C, H]``, dy ``[C, N]`` -> ``[E, H, N]``.

  ``config``: a ``TileConfig`` overriding the tile table; with ``flatten=True`` the flat
  kernel (``grouped_gemm_dw_flat_kernel``, pointer loads) runs instead of one program per
  (expert, tile), with ``gluon=True`` its Gluon counterpart (``grouped_gemm_dw_gluon_kernel``:
  TMA loads and stores) where Gluon and the shape allow, else the flat kernel."""
  gg = _kernels()
  c, h = x.shape
  n = dy.shape[1]
  out = jax.ShapeDtypeStruct((num_experts, h, n), x.dtype)
  if c == 0 or h == 0 or n == 0:
    return jnp.zeros(out.shape, out.dtype)
  precision = _input_precision(x.dtype)
  dtype = jnp.dtype(x.dtype).name
  # dw stays on pointer loads unless asked: its TMA variant measured slower on H200
  # (2026-11-21: 0.54x vs 0.57x cuBLAS on the DeepSeek-V3 up shape).
  cfg = config or gg.dw_config(h, n, dtype, precision, tma=use_tma)
  itemsize = jnp.dtype(x.dtype).itemsize
  ggl = _gluon_kernels_for(cfg)
  ws = bool(ggl and cfg.warp_spec and ggl.gluon_dw_ws_supported(h, n, itemsize, cfg) is None)
  if cfg.gluon and cfg.warp_spec and not ws:
    # The warp-specialized dw kernel cannot run here (Gluon off or unavailable, or the shape):
    # the same tiles on the Gluon dw kernel's three stages (or the flat kernel's).
    cfg = dataclasses.replace(cfg, warp_spec=False, num_stages=min(cfg.num_stages, 3),
                              stagger=0)
  if cfg.flatten or cfg.gluon:  # one flat loop over the row steps of a segment of experts
    segs = gg.dw_flat_segments(h, n, num_experts, cfg, _num_sms())
    steps, first = _dw_step_table(sizes, offsets, c, num_experts, cfg.block_k)
    num_warps = cfg.num_warps
    if ws:
      kernel = ggl.grouped_gemm_dw_ws_kernel
      constexprs = ggl.gluon_dw_ws_constexprs(c, h, n, num_experts, cfg, segs)
      num_warps = 4  # the first consumer warpgroup; the others are worker partitions
    elif ggl and ggl.gluon_dw_supported(h, n, itemsize, cfg) is None:
      kernel = ggl.grouped_gemm_dw_gluon_kernel
      constexprs = ggl.gluon_dw_constexprs(c, h, n, num_experts, cfg, segs)
    else:
      kernel = gg.grouped_gemm_dw_flat_kernel
      constexprs = gg.dw_flat_constexprs(c, h, n, num_experts, cfg, segs,
                                         input_precision=precision)
    (dw,) = _triton_call(
        kernel, x, dy, steps, first, out_shapes=out,
        grid=gg.dw_flat_grid(h, n, num_experts, cfg, segs), num_warps=num_warps,
        num_stages=cfg.num_stages, constexprs=constexprs, name="jax_ep_grouped_gemm_dw")
    return dw
  tma = use_tma and gg.tma_supported(h, n, num_experts, cfg, w_strides=(h * n, n, 1),
                                     elem_bytes=jnp.dtype(x.dtype).itemsize, dw=True)
  if use_tma and not tma and config is None:
    cfg = gg.dw_config(h, n, dtype, precision, tma=False)
  # Largest groups first: their long reductions start before the short ones (a stable sort,
  # so the order, and with it every result, is deterministic).
  order = jnp.argsort(-sizes, stable=True).astype(jnp.int32)
  (dw,) = _triton_call(
      gg.grouped_gemm_dw_kernel, x, dy, sizes, offsets, order, out_shapes=out,
      grid=gg.dw_grid(h, n, num_experts, cfg), num_warps=cfg.num_warps,
      num_stages=cfg.num_stages,
      constexprs=gg.dw_constexprs(c, h, n, num_experts, cfg, input_precision=precision,
                                  use_tma=tma),
      name="jax_ep_grouped_gemm_dw")
  return dw


# -- custom_vjp ------------------------------------------------------------------------------------

@jax.custom_vjp
def _gmm(x, w, sizes, offsets):
  return _grouped(x, w, sizes, offsets, transpose_w=False)


def _gmm_fwd(x, w, sizes, offsets):
  return _grouped(x, w, sizes, offsets, transpose_w=False), (x, w, sizes, offsets)


def _gmm_bwd(res, dy):
  x, w, sizes, offsets = res
  dy = dy.astype(x.dtype)
  dx = _grouped(dy, w, sizes, offsets, transpose_w=True)
  dw = _grouped_dw(x, dy, sizes, offsets, w.shape[0])
  return dx, dw, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@jax.custom_vjp
def _gmm_glu(x, w, sizes, offsets):
  h = _grouped_glu(x, w, sizes, offsets)
  return _glu_of(_grouped(x, w, sizes, offsets, transpose_w=False)) if h is None else h


def _gmm_glu_fwd(x, w, sizes, offsets):
  # Differentiated: the product and the activation apart, since the backward needs gate and
  # up (keeping them costs what the fused kernel saves), exactly as grouped_matmul then the
  # activation would run; only the primal (inference) takes the fused kernel.
  gate_up = _grouped(x, w, sizes, offsets, transpose_w=False)
  return _glu_of(gate_up), (x, w, sizes, offsets, gate_up)


def _gmm_glu_bwd(res, dh):
  x, w, sizes, offsets, gate_up = res
  (d_gate_up,) = jax.vjp(_glu_of, gate_up)[1](dh)
  return _gmm_bwd((x, w, sizes, offsets), d_gate_up)


_gmm_glu.defvjp(_gmm_glu_fwd, _gmm_glu_bwd)


def _promoted(recv_x, w):
  """recv_x and w in their promoted dtype, which the kernels must take."""
  dtype = jnp.result_type(recv_x.dtype, w.dtype)
  if jnp.dtype(dtype).name not in _DTYPES:
    raise TypeError(f"{_API}: backend='triton' supports {_DTYPES}; recv_x.dtype={recv_x.dtype} "
                    f"and w.dtype={w.dtype} promote to {dtype}. Cast the inputs, or use "
                    f"backend='xla'.")
  return recv_x.astype(dtype), w.astype(dtype)


def _layout_groups(layout: DispatchLayout):
  return (jnp.asarray(layout.group_sizes, jnp.int32),
          jnp.asarray(layout.group_offsets, jnp.int32))


def grouped_matmul(recv_x: jax.Array, w: jax.Array, layout: DispatchLayout) -> jax.Array:
  """Per-expert product over the groups of ``recv_x`` with the Triton kernels.

  Args:
    recv_x: ``[C, hidden]`` rows in dispatch's expert-major order.
    w: ``[E_local, hidden, N]``.
    layout: the DispatchLayout; its ``group_sizes`` / ``group_offsets`` (``[E_local] int32``)
      are read on the device. Groups must be in expert order and disjoint, as dispatch lays
      them out; offsets are clamped to ``[0, C]`` and sizes to ``[0, C - offset]``.

  Returns:
    ``[C, N]`` in the promoted dtype of recv_x and w (bf16, f16 or f32), accumulated in f32;
    rows outside every group are zero. Differentiable in recv_x and w.
  """
  return _gmm(*_promoted(recv_x, w), *_layout_groups(layout))


def grouped_glu(recv_x: jax.Array, w_gate_up: jax.Array, layout: DispatchLayout) -> jax.Array:
  """``silu(recv_x @ w_gate[e]) * (recv_x @ w_up[e])`` per group, ``w_gate_up = [w_gate |
  w_up]`` (``[E_local, hidden, 2 * ffn]``): the first half of SwiGLU experts.

  Not differentiated (inference), one kernel whose epilogue applies the activation to the f32
  accumulators (``_grouped_glu``), so ``[C, 2 * ffn]`` never goes to memory; where that kernel
  cannot run, and under ``jax.grad``, ``grouped_matmul`` then the activation in XLA (the
  backward needs gate and up). Returns ``[C, ffn]``, zero on rows outside groups.
  """
  return _gmm_glu(*_promoted(recv_x, w_gate_up), *_layout_groups(layout))
