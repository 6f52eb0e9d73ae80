"""CPU tests of the Triton grouped GEMM (kernels/grouped_gemm.py).

* The kernels compile for sm_90 (no GPU needed) and the bf16 forward/backward products use
  Hopper's wgmma path.
* The kernel logic runs in Triton's interpreter on small shapes against numpy: random group
  sizes with empty groups, alignment padding, one giant group, an overflowing layout whose tail
  groups are clamped to C, blocks that do not divide K or N; float32 and bfloat16. Outputs start
  as NaN so a row the kernel forgets to write fails the test.
* The JAX backend (jax_ep/backends/triton_gemm.py: custom_vjp, strides, tile choice) runs with
  its launcher replaced by the interpreter inside ``jax.pure_callback``; value and gradients
  must match the xla backend.

Triton's interpreter needs torch-like tensors, TRITON_INTERPRET set before triton is first
imported (for triton.language's own helpers), and, with NumPy >= 2.5, one fix (``int()`` of a
size-1 array); it computes ``tl.dot`` on bf16 bit patterns, and its device-function calls leave
triton.language patched. The ``interp`` fixture supplies a
NumPy-backed stand-in tensor and patches those spots for the duration of this module only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import types

import numpy as np
import pytest
from triton_interp import patch_interpreter

from jax_ep import testing

triton = pytest.importorskip("triton")
ml_dtypes = pytest.importorskip("ml_dtypes")

import triton.language as tl  # noqa: E402

KERNEL_FILE = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "grouped_gemm.py"
TABLES_FILE = KERNEL_FILE.with_name("gemm_tables.py")
BF16 = np.dtype(ml_dtypes.bfloat16)


# -- interpreter harness --------------------------------------------------------------------------

class HostArray:
  """The slice of the torch.Tensor interface Triton's interpreter uses, over a NumPy array.

  The interpreter copies every tensor argument "to the host" and back; a NumPy array already is
  host memory, so every copy is the identity and the kernel writes straight into ``self.a``.
  """

  def __init__(self, a: np.ndarray):
    if not a.flags.c_contiguous:
      raise ValueError(f"HostArray needs a C-contiguous array; got strides {a.strides}.")
    self.a = a
    self.dtype = a.dtype

  def data_ptr(self):
    return self.a.ctypes.data

  def untyped_storage(self):
    return self

  def cpu(self):
    return self

  def new_empty(self, *args, **kwargs):
    return self

  def set_(self, *args):
    return self

  def copy_(self, other):
    pass

  def storage_offset(self):
    return 0

  def size(self):
    return self.a.shape

  def stride(self):
    return tuple(s // self.a.itemsize for s in self.a.strides)


def _as_f32(handle, interp):
  """bf16 tensors live in the interpreter as uint16 bit patterns: widen them to float32."""
  if handle.dtype.scalar == tl.bfloat16:
    bits = handle.data.astype(np.uint32) << 16
    return interp.TensorHandle(bits.view(np.float32), tl.float32)
  return handle


def _load_interpreted(path: pathlib.Path, name: str):
  """The kernel file at ``path`` loaded afresh with TRITON_INTERPRET=1 (a module of its own)."""
  old = os.environ.get("TRITON_INTERPRET")
  os.environ["TRITON_INTERPRET"] = "1"
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
  finally:
    if old is None:
      del os.environ["TRITON_INTERPRET"]
    else:
      os.environ["TRITON_INTERPRET"] = old
  return module


@pytest.fixture(scope="module")
def interp_module():
  """kernels/grouped_gemm.py loaded afresh with TRITON_INTERPRET=1, with the table kernels of
  kernels/gemm_tables.py (interpreted too) as its attributes, for ``_interpreter_launcher``."""
  module = _load_interpreted(KERNEL_FILE, "_grouped_gemm_interpreted")
  if type(module.grouped_gemm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("this Triton does not honour TRITON_INTERPRET at decoration time")
  tables = _load_interpreted(TABLES_FILE, "_gemm_tables_interpreted")
  module.tile_table_kernel = tables.tile_table_kernel
  module.dw_step_table_kernel = tables.dw_step_table_kernel
  return module


@pytest.fixture
def interp(interp_module, monkeypatch):
  """The interpreted kernel module, with the interpreter patched for this test only."""
  ti = patch_interpreter(monkeypatch)
  orig_dot = ti.InterpreterBuilder.create_dot

  def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return orig_dot(self, _as_f32(a, ti), _as_f32(b, ti), d, input_precision,
                    max_num_imprecise_acc)

  monkeypatch.setattr(ti.InterpreterBuilder, "create_dot", create_dot)
  return interp_module


def run_interpreted(kernel, grid: int, arrays, constexprs):
  """Launch an interpreted kernel on NumPy arrays (written in place)."""
  kernel[(grid,)](*[HostArray(a) for a in arrays], **constexprs)


# -- layouts and references -----------------------------------------------------------------------


def ref_forward(x, w, sizes, offsets):
  """y[rows of e] = x[rows of e] @ w[e] in float64; zeros elsewhere."""
  y = np.zeros((x.shape[0], w.shape[2]), np.float64)
  for e, (o, s) in enumerate(zip(offsets, sizes)):
    y[o:o + s] = x[o:o + s].astype(np.float64) @ w[e].astype(np.float64)
  return y


def ref_dw(x, dy, sizes, offsets):
  dw = np.zeros((len(sizes), x.shape[1], dy.shape[1]), np.float64)
  for e, (o, s) in enumerate(zip(offsets, sizes)):
    dw[e] = x[o:o + s].astype(np.float64).T @ dy[o:o + s].astype(np.float64)
  return dw


def assert_close(got, want, dtype, scale):
  got = np.asarray(got).astype(np.float64)
  assert not np.isnan(got).any(), f"{np.isnan(got).sum()} unwritten (NaN) outputs"
  # bf16 output rounding: 2^-8 relative; float32 ieee products: tiny.
  rtol = 1e-2 if dtype == BF16 else 1e-5
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _inputs(rng, shape, dtype):
  return rng.standard_normal(shape).astype(np.float32).astype(dtype)


# -- interpreter tests ------------------------------------------------------------------------------

SMALL_TILE = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)

CASES = [
    # (C, K, N, E, alignment, kind)
    (64, 32, 32, 4, 1, "random"),
    (72, 40, 24, 5, 8, "random"),     # K, N not multiples of 16; padding between groups
    (48, 16, 48, 3, 1, "giant"),
    (40, 16, 16, 4, 4, "empty"),      # every row is outside groups: all zeros
    (56, 24, 40, 6, 8, "overflow"),   # groups past C clamped to offset C, size 0
]


@pytest.mark.parametrize(
    "programs,use_tma,half,ws", [(None, False, False, False), (3, False, True, False),
                                 (3, True, True, False), (3, True, False, True)],
    ids=["tile-per-program", "persistent3-half", "persistent3-half-tma", "persistent3-tma-ws"])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + f"-C{c[0]}" for c in CASES])
def test_forward_and_dx_interpreted(interp, rng, case, dtype, programs, use_tma, half, ws):
  """programs=None: one program per possible tile; 3: three programs loop over all tiles.
  use_tma: operands through device-side TMA descriptors (where ``tma_supported``); half: tiles
  with <= BLOCK_M/2 rows run the half-height loop; ws: the warp-specialized, flattened
  configuration (the interpreter runs its loops plainly: this checks the tile logic it uses)."""
  c, k, n, e, align, kind = case
  gg = interp
  sizes, offsets = testing.group_layout(rng, kind, c, e, align)
  x = _inputs(rng, (c, k), dtype)
  w = _inputs(rng, (e, k, n), dtype)
  # Half tiles need BLOCK_M / 2 >= 16 (the smallest tl.dot M).
  cfg = gg.TileConfig(**dict(SMALL_TILE, block_m=32 if half else 16), half_tiles=half,
                      warp_spec=ws, flatten=ws)

  itemsize = np.dtype(dtype).itemsize
  tma_fwd = gg.tma_supported(k, n, e, cfg, w_strides=(k * n, n, 1), elem_bytes=itemsize)
  tma_dx = gg.tma_supported(n, k, e, cfg, w_strides=(k * n, 1, n), elem_bytes=itemsize)
  if use_tma and not (tma_fwd or tma_dx):
    pytest.skip("shape not eligible for the TMA variant")

  table = gg.tile_table(sizes, offsets, c, e, cfg.block_m, np)

  # Forward: y = x @ w[e] per group.
  y = np.full((c, n), np.nan, dtype)
  ce = gg.forward_constexprs(c, k, n, e, cfg, x_strides=(k, 1), w_strides=(k * n, n, 1),
                             y_strides=(n, 1), use_tma=use_tma and tma_fwd, half_tiles=half)
  run_interpreted(gg.grouped_gemm_kernel, gg.forward_grid(c, n, e, cfg, programs),
                  (x, w, table, y), ce)
  assert_close(y, ref_forward(x, w, sizes, offsets), np.dtype(dtype), np.sqrt(k))

  # dx = dy @ w[e]^T per group: the same kernel, w read through swapped strides.
  dy = _inputs(rng, (c, n), dtype)
  dx = np.full((c, k), np.nan, dtype)
  ce = gg.forward_constexprs(c, n, k, e, cfg, x_strides=(n, 1), w_strides=(k * n, 1, n),
                             y_strides=(k, 1), use_tma=use_tma and tma_dx, half_tiles=half)
  run_interpreted(gg.grouped_gemm_kernel, gg.forward_grid(c, k, e, cfg, programs),
                  (dy, w, table, dx), ce)
  assert_close(dx, ref_forward(dy, np.swapaxes(w, 1, 2), sizes, offsets), np.dtype(dtype),
               np.sqrt(n))


@pytest.mark.parametrize("variant", ["ptr", "tma", "flat1", "flat3"])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] + f"-C{c[0]}" for c in CASES])
def test_dw_interpreted(interp, rng, case, dtype, variant):
  """dw per (expert, tile) program (ptr, tma), and the flat kernel with 1 or 3 expert
  segments (every program walks its segment's row steps in one loop)."""
  use_tma = variant == "tma"
  c, k, n, e, align, kind = case
  gg = interp
  sizes, offsets = testing.group_layout(rng, kind, c, e, align)
  x = _inputs(rng, (c, k), dtype)
  dy = _inputs(rng, (c, n), dtype)
  # Rows outside groups hold NaN: the kernel must never let them into any dw[e].
  inside = np.zeros(c, bool)
  for o, s in zip(offsets, sizes):
    inside[o:o + s] = True
  x[~inside] = np.nan
  dy[~inside] = np.nan
  cfg = gg.TileConfig(**SMALL_TILE)
  dw = np.full((e, k, n), np.nan, dtype)
  if use_tma and not gg.tma_supported(k, n, e, cfg, w_strides=(k * n, n, 1),
                                      elem_bytes=np.dtype(dtype).itemsize, dw=True):
    pytest.skip("shape not eligible for the TMA variant")
  if variant.startswith("flat"):
    segs = min(e, int(variant[4:]))
    steps, first = gg.dw_step_table(sizes, offsets, c, e, cfg.block_k, np)
    run_interpreted(gg.grouped_gemm_dw_flat_kernel, gg.dw_flat_grid(k, n, e, cfg, segs),
                    (x, dy, steps, first, dw), gg.dw_flat_constexprs(c, k, n, e, cfg, segs))
  else:
    order = np.argsort(-sizes, kind="stable").astype(np.int32)
    run_interpreted(gg.grouped_gemm_dw_kernel, gg.dw_grid(k, n, e, cfg),
                    (x, dy, sizes, offsets, order, dw),
                    gg.dw_constexprs(c, k, n, e, cfg, use_tma=use_tma))
  x0 = np.where(inside[:, None], x.astype(np.float32), 0)
  dy0 = np.where(inside[:, None], dy.astype(np.float32), 0)
  assert_close(dw, ref_dw(x0, dy0, sizes, offsets), np.dtype(dtype),
               np.sqrt(max(int(sizes.max(initial=0)), 1)))


def test_tile_search_covers_every_row_once(interp, rng):
  """Every row of C is stored by exactly one program (checked by counting stores)."""
  gg = interp
  c, k, n, e = 96, 16, 16, 7
  for kind in ("random", "giant", "empty", "overflow"):
    sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
    # x = 1, w = 1, K = 16: every in-group output equals 16 exactly; gaps give 0.
    x = np.ones((c, k), np.float32)
    w = np.ones((e, k, n), np.float32)
    y = np.full((c, n), np.nan, np.float32)
    cfg = gg.TileConfig(**SMALL_TILE)
    ce = gg.forward_constexprs(c, k, n, e, cfg, x_strides=(k, 1), w_strides=(k * n, n, 1),
                               y_strides=(n, 1))
    run_interpreted(gg.grouped_gemm_kernel, gg.forward_grid(c, n, e, cfg),
                    (x, w, gg.tile_table(sizes, offsets, c, e, cfg.block_m, np), y), ce)
    want = np.zeros(c)
    for o, s in zip(offsets, sizes):
      want[o:o + s] = k
    np.testing.assert_array_equal(y, np.broadcast_to(want[:, None], y.shape), err_msg=kind)


@pytest.mark.parametrize("kind", ["random", "giant", "empty", "overflow"])
def test_tile_table_covers_every_row_once(rng, kind):
  """Group tiles cover each group's rows once, one expert per tile, in expert order; zero tiles
  cover exactly the rows in no group; each group tile records its expert's span of group tiles
  (first, count); jax.numpy (as the backend runs it) gives the same table."""
  import jax.numpy as jnp
  from kernels import grouped_gemm as gg

  c, e, bm = 200, 9, 16
  sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
  table = gg.tile_table(sizes, offsets, c, e, bm, np)
  max_g, max_z = gg.table_bounds(c, e, bm)
  assert table.shape == (1 + max_g + max_z, gg.TABLE_COLS) and table.dtype == np.int32
  num_g, num_z = table[0, :2]
  owner = np.full(c, -1)
  covered = np.zeros(c, int)
  experts = []
  for rs, end, ex, _ in table[1:1 + num_g]:
    assert offsets[ex] <= rs < end == offsets[ex] + sizes[ex]
    rows = np.arange(rs, min(rs + bm, end))
    covered[rows] += 1
    owner[rows] = ex
    experts.append(ex)
  for rs, end, _, _ in table[1 + max_g:1 + max_g + num_z]:
    rows = np.arange(rs, min(rs + bm, end))
    covered[rows] += 1
    owner[rows] = -2
  np.testing.assert_array_equal(covered, 1)
  want = np.full(c, -2)
  for ex, (o, s) in enumerate(zip(offsets, sizes)):
    want[o:o + s] = ex
  np.testing.assert_array_equal(owner, want)
  assert experts == sorted(experts)
  # Column 3 (the expert raster's span): first << 16 | count of the expert's group tiles.
  group_experts = table[1:1 + num_g, 2]
  for m, span in enumerate(table[1:1 + num_g, 3]):
    mine = np.flatnonzero(group_experts == group_experts[m])
    assert (span >> 16, span & 65535) == (mine[0], len(mine))
  assert not table[1 + num_g:1 + max_g, 3].any()
  on_device = gg.tile_table(jnp.asarray(sizes), jnp.asarray(offsets), c, e, bm, jnp)
  np.testing.assert_array_equal(np.asarray(on_device), table)


def test_tile_table_of_a_corrupt_layout_stays_in_bounds(rng):
  """Negative, overflowing and overlapping groups: every listed row is inside [0, C] and the
  counts never exceed the table (the kernel clamps them again)."""
  from kernels import grouped_gemm as gg

  c, e, bm = 100, 6, 16
  for _ in range(20):
    sizes = rng.integers(-50, 3 * c, e).astype(np.int32)
    offsets = rng.integers(-50, 2 * c, e).astype(np.int32)
    table = gg.tile_table(sizes, offsets, c, e, bm, np)
    max_g, max_z = gg.table_bounds(c, e, bm)
    assert 0 <= table[0, 0] <= max_g and 0 <= table[0, 1] <= max_z
    assert table[1:, :2].min() >= 0 and table[1:, :2].max() <= c
    assert 0 <= table[1:1 + max_g, 2].min() and table[1:1 + max_g, 2].max() < e


@pytest.mark.parametrize("kind", ["random", "giant", "empty", "overflow", "corrupt"])
@pytest.mark.parametrize("c,e,block", [(200, 9, 16), (96, 1, 32), (300, 40, 8)])
def test_table_kernels_equal_the_array_tables(interp, rng, kind, c, e, block):
  """The one-launch table kernels (kernels/gemm_tables.py, as the backend runs them) write the
  same tile table and dw step table as ``tile_table`` / ``dw_step_table`` bit for bit, every
  row of their outputs included (outputs start as a sentinel), corrupt layouts too."""
  from kernels import gemm_tables as gt
  from kernels import grouped_gemm as gg

  if kind == "corrupt":  # negative, overflowing, overlapping groups
    sizes = rng.integers(-50, 3 * c, e).astype(np.int32)
    offsets = rng.integers(-50, 2 * c, e).astype(np.int32)
  else:
    sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
  grid, ce = gt.tile_table_launch(c, e, block)
  table = np.full((1 + ce["MAX_G"] + ce["MAX_Z"], 4), -7, np.int32)
  run_interpreted(interp.tile_table_kernel, grid, (sizes, offsets, table), ce)
  np.testing.assert_array_equal(table, gg.tile_table(sizes, offsets, c, e, block, np))
  grid, ce = gt.dw_step_table_launch(c, e, block)
  steps = np.full((ce["MAX_S"], 4), -7, np.int32)
  first = np.full((e + 1,), -7, np.int32)
  run_interpreted(interp.dw_step_table_kernel, grid, (sizes, offsets, steps, first), ce)
  want_steps, want_first = gg.dw_step_table(sizes, offsets, c, e, block, np)
  np.testing.assert_array_equal(steps, want_steps)
  np.testing.assert_array_equal(first, want_first)


# -- sm_90 compile ----------------------------------------------------------------------------------

def _compile(kernel, pointer_types, constexprs, cfg):
  """The kernel for sm_90 as a launch builds it (``jax_ep._compile``: 16-byte aligned
  pointers), uncached."""
  from jax_ep import _compile as compile_mod
  return compile_mod.build(kernel, dict(zip(kernel.arg_names, pointer_types)), constexprs,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@pytest.mark.parametrize("c,e,block", [(32768, 128, 128), (32768, 64, 64), (4096, 512, 128)])
def test_table_kernels_compile_for_sm90(c, e, block):
  """The table kernels build for sm_90 at benchmark-sized layouts, as one small launch each."""
  from kernels import gemm_tables as gt

  one = types.SimpleNamespace(num_warps=4, num_stages=1)
  grid, ce = gt.tile_table_launch(c, e, block)
  assert grid <= 2 * 132  # one wave on an H100/H200
  assert "ld.global" in _compile(gt.tile_table_kernel, ["*i32"] * 3, ce, one).asm["ptx"]
  grid, ce = gt.dw_step_table_launch(c, e, block)
  assert grid <= 2 * 132
  assert "ld.global" in _compile(gt.dw_step_table_kernel, ["*i32"] * 4, ce, one).asm["ptx"]


@pytest.mark.parametrize("variant", ["ptr", "tma", "tma-ws"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiles_for_sm90(dtype, variant):
  """Every product compiles for sm_90 with the Hopper instructions it is meant to use: wgmma
  for 16-bit inputs, cp.async or TMA loads, and (tma-ws) warp specialization: a producer and
  two consumer warpgroups (12 warps) with setmaxnreg."""
  from kernels import grouped_gemm as gg  # the compiled (not interpreted) kernels

  tma = variant != "ptr"
  ws = variant == "tma-ws"
  if ws and dtype == "float32":
    pytest.skip("the warp-specialized tiles are for 16-bit inputs")
  t = {"bfloat16": "*bf16", "float32": "*fp32"}[dtype]
  c, h, n, e = 1024, 512, 256, 8  # Hopper-sized tiles, small enough to compile quickly
  kernels = []
  # "tma": the TMA default tiles (flattened tile + K loop for 16-bit inputs); "tma-ws": the
  # opt-in warp-specialized switch (not a default: wrong rows under Triton 3.6 on H200).

  def fwd_config(k, n_, phase):
    cfg = gg.forward_config(k, n_, dtype, phase=phase, tma=tma)
    assert not cfg.warp_spec  # no default is warp-specialized
    if tma and dtype == "bfloat16":
      assert cfg.flatten
    if ws:
      cfg = dataclasses.replace(cfg, num_warps=4, warp_spec=True, flatten=False)
    return cfg

  cfg = fwd_config(h, n, "fwd")
  ce = gg.forward_constexprs(c, h, n, e, cfg, x_strides=(h, 1), w_strides=(h * n, n, 1),
                             y_strides=(n, 1), use_tma=tma)
  kernels.append(_compile(gg.grouped_gemm_kernel, [t, t, "*i32", t], ce, cfg))
  cfg = fwd_config(n, h, "dx")
  ce = gg.forward_constexprs(c, n, h, e, cfg, x_strides=(n, 1), w_strides=(h * n, 1, n),
                             y_strides=(h, 1), use_tma=tma)
  kernels.append(_compile(gg.grouped_gemm_kernel, [t, t, "*i32", t], ce, cfg))
  cfg = gg.dw_config(h, n, dtype, tma=tma)
  if ws:
    cfg = dataclasses.replace(cfg, num_warps=4, warp_spec=True)
  kernels.append(_compile(gg.grouped_gemm_dw_kernel, [t, t, "*i32", "*i32", "*i32", t],
                          gg.dw_constexprs(c, h, n, e, cfg, use_tma=tma), cfg))
  if variant == "ptr":  # the flat dw kernel (pointer loads only), two expert segments
    cfg = dataclasses.replace(gg.dw_config(h, n, dtype), flatten=True)
    kernels.append(_compile(gg.grouped_gemm_dw_flat_kernel, [t, t, "*i32", "*i32", t],
                            gg.dw_flat_constexprs(c, h, n, e, cfg, 2), cfg))
  for k in kernels:
    ptx = k.asm["ptx"]
    assert ".target sm_90a" in ptx
    if dtype == "bfloat16":
      # Hopper MMA path: asynchronous warpgroup MMA on bf16 operands with f32 accumulators.
      assert "wgmma.mma_async.sync.aligned" in ptx and ".f32.bf16.bf16" in ptx
    if tma:
      assert "cp.async.bulk.tensor" in ptx  # TMA loads
    elif dtype == "bfloat16":
      assert "cp.async.cg" in ptx or "cp.async.ca" in ptx  # pipelined global->shared copies
    if ws:
      assert k.metadata.num_warps == 12 and "setmaxnreg" in ptx
    # The grid's residency estimate relies on these: no spills, shared memory within an SM.
    assert k.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("shape", [(7168, 4096, 64), (2048, 7168, 64), (768, 2048, 128),
                                   (2048, 1536, 128), (512, 512, 3)])
def test_flat_dw_segments_fill_the_last_wave(shape):
  """The flat dw kernels' segment count: at most E, at least two programs per SM where E
  allows, and where some count fills the last wave of 132 SMs to 95 %, one that does."""
  from kernels import grouped_gemm as gg

  k, n, e = shape
  cfg = gg.TileConfig(128, 256, 64, 8, 3)
  tiles = -(-k // 128) * -(-n // 256)
  segs = gg.dw_flat_segments(k, n, e, cfg, 132)
  assert 1 <= segs <= e
  programs = segs * tiles
  assert programs >= min(2 * 132, e * tiles)
  fill = [s * tiles / (-(-s * tiles // 132) * 132) for s in range(1, e + 1)]
  if max(fill[segs - 1:]) >= 0.95:
    assert fill[segs - 1] >= 0.95
  else:
    assert fill[segs - 1] == max(fill[segs - 1:])


def _ptxas_keeps_mma_async(tmp_path, ptx: str) -> str:
  """Assembles ``ptx`` with Triton's ptxas for sm_90a and checks that ptxas kept the MMAs
  asynchronous (no wait "injected ... to allow use of registers defined by GMMA", C7517, and
  no "wgmma.mma_async instructions are serialized", C7515: either serializes every step);
  returns ptxas's ``-v`` report."""
  import subprocess

  from triton.backends.nvidia.compiler import get_ptxas
  src = tmp_path / "kernel.ptx"
  src.write_text(ptx)
  info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o",
                         str(tmp_path / "kernel.cubin")], capture_output=True, text=True,
                        check=True)
  assert "C7517" not in info.stderr + info.stdout, info.stderr
  assert "C7515" not in info.stderr + info.stdout, info.stderr
  return info.stderr


@pytest.mark.parametrize("chunks,trim,band", [(1, False, 0), (4, False, 0), (8, True, 0),
                                              (8, True, 1)])
def test_gluon_dw_compiles_for_sm90(tmp_path, chunks, trim, band):
  """The Gluon dw kernel compiles for sm_90 with what it exists for: TMA loads completing on
  mbarriers, wgmma, the tile through stmatrix and out by a TMA store, within an SM's shared
  memory; and ptxas keeps its MMAs asynchronous (no wait "injected ... to allow use of
  registers defined by GMMA", which would serialize every step), without spills; with
  ``store_chunks`` the tile leaves in narrower TMA stores; ``trim_partial`` multiplies a
  partial step's 16- or 32-row slices (m64n256k16 either way)."""
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  if ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon dw kernel not offered here: {ggl.GLUON_ERROR}")

  c, h, n, e = 4096, 1024, 512, 8
  cfg = gg.TileConfig(128, 256, 64, 8, 3, gluon=True, store_chunks=chunks,
                      trim_partial=trim, band_n=band)
  assert ggl.gluon_dw_supported(h, n, 2, cfg) is None
  ce = ggl.gluon_dw_constexprs(c, h, n, e, cfg, 2)
  assert ce["STORE_CHUNKS"] == chunks and ce["BAND_N"] == band
  assert ce["MAX_STEPS"] == gg.dw_max_steps(c, e, cfg.block_k)
  k = _compile(ggl.grouped_gemm_dw_gluon_kernel, ["*bf16", "*bf16", "*i32", "*i32", "*bf16"],
               ce, cfg)
  ptx = k.asm["ptx"]
  assert ".target sm_90a" in ptx
  assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx" in ptx
  assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in ptx  # the TMA store
  assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16" in ptx
  assert "stmatrix" in ptx and "cp.async.cg" not in ptx
  assert k.metadata.shared <= 227 * 1024
  assert "spill" not in _ptxas_keeps_mma_async(tmp_path, ptx).replace("0 bytes spill", "")
  # Shapes the kernel cannot take are refused with the reason (then the flat kernel runs).
  assert "multiples" in ggl.gluon_dw_supported(1000, 512, 2, cfg)
  assert "16-bit" in ggl.gluon_dw_supported(1024, 512, 4, cfg)
  four_warps = dataclasses.replace(cfg, num_warps=4)
  assert "num_warps=8" in ggl.gluon_dw_supported(1024, 512, 2, four_warps)
  assert "store_chunks=3" in ggl.gluon_dw_supported(1024, 512, 2,
                                                    dataclasses.replace(cfg, store_chunks=3))
  # Four stages of 128 x 256 x 64 do not fit beside the output tile (the flat kernel runs).
  four = dataclasses.replace(cfg, num_stages=4)
  assert "shared memory" in ggl.gluon_dw_supported(1024, 512, 2, four)
  assert "band_n=-1" in ggl.gluon_dw_supported(1024, 512, 2, dataclasses.replace(cfg, band_n=-1))


@pytest.mark.parametrize("k,n,band,segs", [(7168, 4096, 0, 1), (7168, 4096, 8, 1),
                                           (2048, 7168, 8, 2), (2048, 7168, 3, 2),
                                           (512, 768, 2, 5), (512, 768, 7, 1)])
def test_dw_program_coords_cover_every_tile_once(k, n, band, segs):
  """The Gluon dw kernels' program map (``dw_program_coords``, which ``_dw_program`` mirrors):
  every (segment, K tile, N tile) exactly once over the grid, bands of ``band_n`` n-tiles
  walked n fastest (the last band narrower where they do not divide N), and with bands the
  programs of one wave touch fewer columns of x and dy than n-fastest order."""
  from kernels import grouped_gemm as gg

  e = 64
  cfg = gg.TileConfig(128, 256, 64, 8, 3, gluon=True, band_n=band)
  num_k, num_n = k // 128, n // 256
  grid = gg.dw_flat_grid(k, n, e, cfg, segs)
  coords = [gg.dw_program_coords(p, k, n, e, cfg, segs) for p in range(grid)]
  assert len(set(coords)) == grid == segs * num_k * num_n
  for seg in range(segs):
    lo, hi = seg * e // segs, (seg + 1) * e // segs
    tiles = {(k0, n0) for k0, n0, a, b in coords if (a, b) == (lo, hi)}
    assert tiles == {(i * 128, j * 256) for i in range(num_k) for j in range(num_n)}
  if 0 < band < num_n:
    wave = coords[:band * 4]  # the first programs: 4 k-tiles of the first band
    assert {n0 for _, n0, _, _ in wave} == {j * 256 for j in range(band)}
    assert {k0 for k0, _, _, _ in wave} == {i * 128 for i in range(4)}


@pytest.mark.parametrize("stages,chunks,stagger", [(4, 2, 1), (3, 1, 0), (4, 2, 2)])
def test_gluon_dw_ws_compiles_for_sm90(tmp_path, stages, chunks, stagger):
  """The warp-specialized Gluon dw kernel compiles for sm_90 as designed: 12 warps (two
  consumer warpgroups and a producer warp), TMA loads completing on mbarriers, m64n256 wgmma
  per consumer, each half tile out by TMA through stmatrix, within an SM's shared memory (4
  stages fit beside two 64 x 128 output chunks); and ptxas keeps the MMAs asynchronous in
  its 168 registers a thread: no serialization for want of registers (C7512), no injected
  waits (C7517, C7515), no spills."""
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  if ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon dw kernel not offered here: {ggl.GLUON_ERROR}")

  c, h, n, e = 4096, 1024, 512, 8
  cfg = gg.TileConfig(128, 256, 64, 8, stages, gluon=True, warp_spec=True, store_chunks=chunks,
                      trim_partial=True, stagger=stagger)
  assert ggl.gluon_dw_ws_supported(h, n, 2, cfg) is None
  ce = ggl.gluon_dw_ws_constexprs(c, h, n, e, cfg, 2)
  assert ce["EPI_N"] == 256 // chunks and ce["STAGGER"] == stagger
  k = _compile(ggl.grouped_gemm_dw_ws_kernel, ["*bf16", "*bf16", "*i32", "*i32", "*bf16"], ce,
               dataclasses.replace(cfg, num_warps=4))
  ptx = k.asm["ptx"]
  assert k.metadata.num_warps == 12
  assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx" in ptx
  assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in ptx
  assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16" in ptx
  assert "stmatrix" in ptx
  assert k.metadata.shared <= 227 * 1024
  info = _ptxas_keeps_mma_async(tmp_path, ptx)
  assert "C7512" not in info, info
  assert "spill" not in info.replace("0 bytes spill", "")
  # What it cannot take is refused with the reason (the Gluon dw kernel runs instead).
  assert "stagger" in ggl.gluon_dw_ws_supported(h, n, 2, dataclasses.replace(cfg, stagger=3))
  assert "store_chunks" in ggl.gluon_dw_ws_supported(h, n, 2,
                                                     dataclasses.replace(cfg, store_chunks=4))
  assert "shared memory" in ggl.gluon_dw_ws_supported(
      h, n, 2, dataclasses.replace(cfg, num_stages=5, stagger=0))
  assert "trimmed" in ggl.gluon_dw_ws_supported(h, n, 2,
                                                dataclasses.replace(cfg, trim_partial=False))


def _build_ws_kernel(constexprs):
  """``grouped_gemm_ws_kernel`` for sm_90 with bf16 operands, launched as the backend does
  (four warps: its first consumer warpgroup; the others are partitions)."""
  from kernels import grouped_gemm_gluon as ggl
  return _compile(ggl.grouped_gemm_ws_kernel, ["*bf16", "*bf16", "*i32", "*bf16"], constexprs,
                  types.SimpleNamespace(num_warps=4, num_stages=1))


@pytest.mark.parametrize("tile", [(128, 256, 64, 3, 1), (128, 256, 64, 4, 8), (128, 256, 32, 6, 1),
                                  (128, 128, 64, 6, 1), (256, 128, 64, 3, 1)],
                         ids=["128x256x64s3", "128x256x64s4g8", "128x256x32s6", "128x128x64s6",
                              "256x128x64s3"])
@pytest.mark.parametrize("b_kmajor", [False, True], ids=["fwd", "dx"])
def test_gluon_ws_forward_compiles_for_sm90(tmp_path, b_kmajor, tile):
  """The warp-specialized Gluon forward/dx kernel compiles for sm_90 as designed: 12 warps
  (two consumer warpgroups + a producer warp, rounded to a warpgroup) with setmaxnreg, TMA
  loads completing on mbarriers, 64-row wgmma per consumer, halves stored by TMA, within an
  SM's shared memory (4 stages of 128 x 256 x 64 fit with the output in two chunks); and ptxas
  keeps the MMAs asynchronous (no C7517 wait, no C7515 serialization), without spills."""
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  if ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon kernels not offered here: {ggl.GLUON_ERROR}")

  c, k, n, e = 4096, 1024, 512, 8
  block_m, block_n, block_k, stages, group_m = tile
  cfg = gg.TileConfig(block_m, block_n, block_k, 8, stages, half_tiles=False, gluon=True,
                      group_m=group_m)
  assert ggl.gluon_fwd_supported(k, n, 2, cfg) is None
  chunk = ggl.ws_epilogue_cols(cfg, 2)
  assert chunk == (block_n // 2 if stages == 4 else block_n)
  ce = ggl.gluon_fwd_constexprs(c, k, n, e, cfg, b_kmajor=b_kmajor)
  km = _build_ws_kernel(ce)
  ptx = km.asm["ptx"]
  assert km.metadata.num_warps == 12 and "setmaxnreg" in ptx
  assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx" in ptx
  assert f"wgmma.mma_async.sync.aligned.m64n{block_n}k16.f32.bf16.bf16" in ptx
  assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in ptx
  assert km.metadata.shared <= 227 * 1024
  assert "spill" not in _ptxas_keeps_mma_async(tmp_path, ptx).replace("0 bytes spill", "")
  # What the kernel cannot take is refused with the reason (then the Triton kernel runs).
  assert "multiples" in ggl.gluon_fwd_supported(1000, 512, 2, cfg)
  assert "16-bit" in ggl.gluon_fwd_supported(k, n, 4, cfg)
  deep = dataclasses.replace(cfg, num_stages=2 * stages + 2)
  assert "shared memory" in ggl.gluon_fwd_supported(k, n, 2, deep)
  four = dataclasses.replace(cfg, num_warps=4)
  assert "num_warps=8" in ggl.gluon_fwd_supported(k, n, 2, four)


@pytest.mark.parametrize("tile", [(128, 256, 64, 3, 4), (128, 256, 64, 4, 8), (128, 128, 64, 4, 1)],
                         ids=["128x256x64s3g4", "128x256x64s4g8", "128x128x64s4"])
def test_gluon_glu_forward_compiles_for_sm90(tmp_path, tile):
  """The warp-specialized forward with the SwiGLU epilogue (``GLU``) compiles for sm_90 as the
  plain forward does (12 warps, setmaxnreg, TMA loads on mbarriers, one m64 x block_n wgmma
  per consumer and K step over the gate | up halves of its w stage, the output by TMA), with
  the activation's exponential (``ex2``) and a half-width output tile; within shared memory
  at 4 stages (the output whole); ptxas keeps the MMAs asynchronous, without spills."""
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  if ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon kernels not offered here: {ggl.GLUON_ERROR}")
  c, k, n, e = 4096, 1024, 512, 8
  block_m, block_n, block_k, stages, group_m = tile
  cfg = gg.TileConfig(block_m, block_n, block_k, 8, stages, half_tiles=False, gluon=True,
                      group_m=group_m, expert_raster=group_m > 1)
  assert ggl.gluon_fwd_supported(k, n, 2, cfg, glu=True) is None
  assert ggl.ws_epilogue_cols(cfg, 2, glu=True) == block_n // 2
  ce = ggl.gluon_fwd_constexprs(c, k, n, e, cfg, b_kmajor=False, glu=True)
  assert ce["GLU"] and ce["EPI_N"] == block_n // 2
  km = _build_ws_kernel(ce)
  ptx = km.asm["ptx"]
  assert km.metadata.num_warps == 12 and "setmaxnreg" in ptx
  loads = ptx.count("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx")
  plain = _build_ws_kernel(ggl.gluon_fwd_constexprs(c, k, n, e, cfg, b_kmajor=False)
                           ).asm["ptx"]
  # The w tile as two half-width boxes (gate, up): the TMA boxes of the plain forward's tile,
  # which is cut into 128-byte wide boxes anyway.
  assert loads == plain.count("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier")
  assert f"wgmma.mma_async.sync.aligned.m64n{block_n}k16.f32.bf16.bf16" in ptx
  assert "ex2.approx" in ptx and "ex2.approx" not in plain
  assert "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group" in ptx
  assert km.metadata.shared <= 227 * 1024
  assert "spill" not in _ptxas_keeps_mma_async(tmp_path, ptx).replace("0 bytes spill", "")
  narrow = dataclasses.replace(cfg, block_n=64)
  assert "128 bytes" in ggl.gluon_fwd_supported(k, n, 2, narrow, glu=True)
  with pytest.raises(ValueError, match="forward"):
    ggl.gluon_fwd_constexprs(c, k, n, e, cfg, b_kmajor=True, glu=True)


def test_tuned_gluon_entries_have_a_fallback():
  """Every ``TUNED_GLUON`` winner is a Gluon config the warp-specialized kernel takes, is
  chosen only when the Gluon kernels are available, and leaves a stock-Triton choice (its
  ``TUNED`` entry or the rules) where they are not."""
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  assert gg.TUNED_GLUON
  for (phase, k, n, dtype, tma), cfg in gg.TUNED_GLUON.items():
    assert cfg.gluon and phase in ("fwd", "dx") and tma
    assert gg.forward_config(k, n, dtype, phase=phase, tma=tma, gluon=True) == cfg
    fallback = gg.forward_config(k, n, dtype, phase=phase, tma=tma, gluon=False)
    assert not fallback.gluon
    assert fallback == gg.TUNED.get((phase, k, n, dtype, tma), fallback)
    if ggl.GLUON_ERROR is None:
      assert ggl.gluon_fwd_supported(k, n, 2, cfg) is None


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_gluon_kernels_can_be_turned_off(monkeypatch, value):
  """``JAX_EP_GMM_GLUON=0`` turns the Gluon kernels off (A/B runs, or a Gluon bug in the
  field): the Triton kernels run instead, whatever Triton is installed."""
  from jax_ep.backends import triton_gemm
  from kernels import grouped_gemm_gluon as ggl

  from kernels.grouped_gemm import TileConfig

  asks = TileConfig(128, 256, 64, 8, 3, half_tiles=False, gluon=True)
  monkeypatch.setenv("JAX_EP_GMM_GLUON", value)
  assert not triton_gemm._gluon_available()
  assert triton_gemm._gluon_kernels_for(asks) is None  # also for a config passed explicitly
  monkeypatch.setenv("JAX_EP_GMM_GLUON", "1")
  assert triton_gemm._gluon_available() == (ggl.GLUON_ERROR is None)
  assert (triton_gemm._gluon_kernels_for(asks) is None) == (ggl.GLUON_ERROR is not None)
  assert triton_gemm._gluon_kernels_for(dataclasses.replace(asks, gluon=False)) is None


# -- the JAX backend, with the interpreter as its launcher ------------------------------------------

def _interpreter_launcher(interp_module):
  """A stand-in for ``jax_ep.launch.triton_call`` running the interpreted kernel on the host."""
  import jax

  def triton_call(kernel, *inputs, out_shapes, grid, num_warps=4, num_stages=3, constexprs=None,
                  scalars=(), symmetric=False, name=None):
    del num_warps, num_stages, name
    if symmetric or scalars:
      raise NotImplementedError("the grouped GEMM passes no scalars and no symmetric memory")
    fn = getattr(interp_module, kernel.fn.__name__)
    if isinstance(out_shapes, jax.ShapeDtypeStruct):
      out_shapes = (out_shapes,)
    out_shapes = tuple(out_shapes)

    def host(*arrays):
      arrays = [np.array(a, copy=True, order="C") for a in arrays]
      # NaN-filled outputs: an element the kernel forgets to write shows up in the comparison.
      outs = [np.full(s.shape, np.nan, s.dtype) for s in out_shapes]
      run_interpreted(fn, grid, arrays + outs, constexprs)
      return tuple(outs)

    return tuple(jax.pure_callback(host, out_shapes, *inputs))

  return triton_call


def _layout(sizes, offsets, capacity):
  import jax.numpy as jnp
  from jax_ep.layout import DispatchLayout

  z = jnp.zeros((), jnp.int32)
  return DispatchLayout(
      group_sizes=jnp.asarray(sizes), group_offsets=jnp.asarray(offsets),
      num_recv_rows=jnp.asarray(int(np.sum(sizes)), jnp.int32), num_dropped=z, num_invalid=z,
      topk_idx=jnp.zeros((1, 1), jnp.int32), recv_pos=jnp.zeros((1, 1, 1), jnp.int32),
      row_weights=jnp.zeros((capacity,), jnp.float32))


@pytest.mark.parametrize("kind", ["random", "giant", "empty"])
def test_backend_flat_dw_matches_default(interp, rng, monkeypatch, kind):
  """``_grouped_dw`` with a ``flatten=True`` config (the flat kernel: step table beside the
  launch, expert segments) equals the per-(expert, tile) kernel exactly, and numpy."""
  import jax.numpy as jnp
  from jax_ep.backends import triton_gemm

  monkeypatch.setattr(triton_gemm, "_triton_call", _interpreter_launcher(interp))
  monkeypatch.setattr(triton_gemm, "_num_sms", lambda: 9)  # 3 expert segments
  c, h, n, e = 160, 32, 48, 6
  sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
  x = _inputs(rng, (c, h), np.float32)
  dy = _inputs(rng, (c, n), np.float32)
  s, o = jnp.asarray(sizes), jnp.asarray(offsets)
  base = interp.TileConfig(**SMALL_TILE)
  assert interp.dw_flat_segments(h, n, e, base, 9) == 3
  flat = triton_gemm._grouped_dw(jnp.asarray(x), jnp.asarray(dy), s, o, e,
                                 config=dataclasses.replace(base, flatten=True))
  per_tile = triton_gemm._grouped_dw(jnp.asarray(x), jnp.asarray(dy), s, o, e, config=base)
  np.testing.assert_array_equal(np.asarray(flat), np.asarray(per_tile))
  assert_close(flat, ref_dw(x, dy, sizes, offsets), np.dtype(np.float32),
               np.sqrt(max(int(sizes.max(initial=0)), 1)))


@pytest.mark.parametrize("kind,tma,dtype", [
    (kind, tma, dtype) for kind, tma in (("random", False), ("giant", False), ("empty", False),
                                         ("random", True))
    for dtype in ("float32", "bfloat16")] + [("random", False, "float16")])
def test_backend_value_and_grad_match_xla(interp, rng, monkeypatch, kind, tma, dtype):
  """triton_gemm.grouped_matmul (custom_vjp, strides, tiles) == the xla backend, value and grads."""
  import jax
  import jax.numpy as jnp
  from jax_ep.backends import triton_gemm, xla

  monkeypatch.setattr(triton_gemm, "_triton_call", _interpreter_launcher(interp))
  monkeypatch.setenv("JAX_EP_GMM_TMA", "1" if tma else "0")
  c, h, n, e = 200, 40, 24, 5
  sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
  layout = _layout(sizes, offsets, c)
  x = jnp.asarray(_inputs(rng, (c, h), np.float32), dtype)
  w = jnp.asarray(_inputs(rng, (e, h, n), np.float32), dtype)
  g = jnp.asarray(_inputs(rng, (c, n), np.float32), jnp.float32)

  def loss(impl):
    def f(x, w):
      y = impl.grouped_matmul(x, w, layout)
      return jnp.sum(y.astype(jnp.float32) * g), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, y), (dx, dw) = loss(triton_gemm)(x, w)
  (_, y_ref), (dx_ref, dw_ref) = loss(xla)(x, w)
  assert y.dtype == y_ref.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
  tol = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}[dtype]
  for got, want, scale in ((y, y_ref, np.sqrt(h)), (dx, dx_ref, np.sqrt(n)),
                           (dw, dw_ref, np.sqrt(c / e))):
    got = np.asarray(got, np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=tol, atol=tol * scale)


def _recording_launcher(launches):
  """A stand-in for ``triton_call`` that records (kernel name, keywords) and returns zeros."""
  import jax.numpy as jnp

  def fake_call(kernel, *args, out_shapes, **kw):
    outs = out_shapes if isinstance(out_shapes, (list, tuple)) else (out_shapes,)
    launches.append((kernel.__name__, dict(kw, out_shapes=outs)))
    return tuple(jnp.zeros(o.shape, o.dtype) for o in outs)
  return fake_call


@pytest.mark.parametrize("gluon", [True, False], ids=["gluon", "no-gluon"])
def test_dw_runs_the_warp_specialized_kernel_or_falls_back(monkeypatch, gluon):
  """At the shape whose tuned dw is the warp-specialized Gluon kernel (Qwen3 up) the triton
  path launches it (four warps: the first consumer warpgroup; the others are partitions);
  with the Gluon kernels off it runs the same tiles on three stages in the flat Triton kernel
  instead of failing or overflowing shared memory."""
  import jax
  import jax.numpy as jnp
  from jax_ep.backends import triton_gemm
  from kernels import grouped_gemm as gg
  from kernels import grouped_gemm_gluon as ggl

  if gluon and ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon kernels not offered here: {ggl.GLUON_ERROR}")
  h, n, e, c = 2048, 1536, 4, 512
  assert gg.dw_config(h, n, "bfloat16").warp_spec
  launches = []
  monkeypatch.setattr(triton_gemm, "_triton_call", _recording_launcher(launches))
  monkeypatch.setenv("JAX_EP_GMM_GLUON", "1" if gluon else "0")
  sizes = jnp.full((e,), c // e, jnp.int32)
  offsets = jnp.arange(e, dtype=jnp.int32) * (c // e)
  x = jax.ShapeDtypeStruct((c, h), jnp.bfloat16)
  dy = jax.ShapeDtypeStruct((c, n), jnp.bfloat16)
  jax.eval_shape(lambda x, dy: triton_gemm._grouped_dw(x, dy, sizes, offsets, e), x, dy)
  name, kw = launches[-1]
  if gluon:
    assert name == "grouped_gemm_dw_ws_kernel" and kw["num_warps"] == 4
    assert kw["constexprs"]["STAGES"] == 4 and kw["constexprs"]["EPI_N"] == 128
  else:
    assert name == "grouped_gemm_dw_flat_kernel" and kw["num_stages"] == 3


@pytest.mark.parametrize("case", ["fused", "grad", "switch-off", "gluon-off", "float32"])
def test_grouped_glu_runs_the_fused_kernel_or_falls_back(monkeypatch, case):
  """``triton_gemm.grouped_glu`` (the first half of ``swiglu_fused``): its primal launches the
  warp-specialized kernel with the SwiGLU epilogue (``GLU``; output [C, F]) at the forward's
  tuned tiles; under ``jax.grad`` the plain product runs (the backward needs gate and up),
  and so it does with ``JAX_EP_GMM_FUSED_GLU=0``, with the Gluon kernels off, or for f32."""
  import jax
  import jax.numpy as jnp
  from jax_ep.backends import triton_gemm
  from kernels import grouped_gemm_gluon as ggl

  if case in ("fused", "grad") and ggl.GLUON_ERROR is not None:
    pytest.skip(f"Gluon kernels not offered here: {ggl.GLUON_ERROR}")
  c, h, f, e = 1024, 7168, 2048, 4  # the DeepSeek-V3 gate | up product (N = 4096)
  launches = []
  monkeypatch.setattr(triton_gemm, "_triton_call", _recording_launcher(launches))
  monkeypatch.setenv("JAX_EP_GMM_FUSED_GLU", "0" if case == "switch-off" else "1")
  monkeypatch.setenv("JAX_EP_GMM_GLUON", "0" if case == "gluon-off" else "1")
  dtype = jnp.float32 if case == "float32" else jnp.bfloat16
  layout = _layout(np.full(e, c // e, np.int32), np.arange(e, dtype=np.int32) * (c // e), c)
  x = jax.ShapeDtypeStruct((c, h), dtype)
  w = jax.ShapeDtypeStruct((e, h, 2 * f), dtype)
  if case == "grad":
    out = jax.eval_shape(jax.grad(lambda x, w: jnp.sum(
        triton_gemm.grouped_glu(x, w, layout).astype(jnp.float32)), argnums=(0, 1)), x, w)
    assert out[0].shape == (c, h) and out[1].shape == (e, h, 2 * f)
  else:
    out = jax.eval_shape(lambda x, w: triton_gemm.grouped_glu(x, w, layout), x, w)
    assert out.shape == (c, f) and out.dtype == dtype
  glu = [kw for name, kw in launches if name == "grouped_gemm_ws_kernel"
         and kw["constexprs"].get("GLU")]
  if case == "fused":
    assert len(glu) == 1 and len(launches) == 2  # the tile table, then the fused kernel
    ce = glu[0]["constexprs"]
    assert ce["N"] == 2 * f and ce["EPI_N"] == 128 and ce["GROUP_M"] == 4
    assert [o.shape for o in glu[0]["out_shapes"]] == [(c, f)]
  else:
    assert not glu
    assert any(name.startswith("grouped_gemm") for name, _ in launches)


@pytest.mark.parametrize("kind", ["random", "giant", "empty"])
def test_grouped_glu_value_and_grad_match_xla(interp, rng, monkeypatch, kind):
  """``triton_gemm.grouped_glu`` where the fused kernel cannot run (Gluon off: the stock
  kernels in the interpreter) equals the xla backend's product then the activation, value
  and gradients: the custom_vjp's primal, forward and backward rules."""
  import jax
  import jax.numpy as jnp
  from jax_ep import experts
  from jax_ep.backends import triton_gemm, xla

  monkeypatch.setattr(triton_gemm, "_triton_call", _interpreter_launcher(interp))
  monkeypatch.setenv("JAX_EP_GMM_GLUON", "0")
  c, h, f, e = 160, 32, 16, 5
  sizes, offsets = testing.group_layout(rng, kind, c, e, alignment=8)
  layout = _layout(sizes, offsets, c)
  x = jnp.asarray(_inputs(rng, (c, h), np.float32))
  w = jnp.asarray(_inputs(rng, (e, h, 2 * f), np.float32))
  g = jnp.asarray(_inputs(rng, (c, f), np.float32))

  def ref_glu(x, w, layout):
    gu = xla.grouped_matmul(x, w, layout)
    return experts._glu(gu[:, :f], gu[:, f:])

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w, layout) * g),
                                      argnums=(0, 1)))

  h_got = jax.jit(lambda x, w: triton_gemm.grouped_glu(x, w, layout))(x, w)
  h_ref = ref_glu(x, w, layout)
  assert h_got.shape == (c, f)
  np.testing.assert_allclose(np.asarray(h_got), np.asarray(h_ref), rtol=1e-4, atol=1e-4)
  (v, (dx, dw)), (v_ref, (dx_ref, dw_ref)) = loss(triton_gemm.grouped_glu)(x, w), loss(ref_glu)(
      x, w)
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-4)
  for got, want in ((dx, dx_ref), (dw, dw_ref)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(want)).max() + 1))


def test_backend_lowers_to_the_ffi_launch():
  """Under jit the triton path is three FFI custom calls (forward, dx, dw), no ragged_dot."""
  import jax
  import jax.numpy as jnp
  from jax_ep.backends import triton_gemm

  try:
    from jax_ep import _ffi
  except ImportError:
    pytest.skip("jax_ep.launch is not available")
  c, h, n, e = 256, 128, 64, 4
  layout = _layout(np.full(e, 64, np.int32), np.arange(e, dtype=np.int32) * 64, c)
  x = jnp.zeros((c, h), jnp.bfloat16)
  w = jnp.zeros((e, h, n), jnp.bfloat16)
  f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(triton_gemm.grouped_matmul(x, w, layout)
                                                       .astype(jnp.float32)), argnums=(0, 1)))
  text = f.lower(x, w).as_text()
  debug = f.lower(x, w).as_text(debug_info=True)
  # The forward, dx and dw products, and the tile tables of forward and dx, one launch each
  # (dw at this small shape is the per-(expert, tile) kernel: no step table).
  assert text.count(_ffi.TARGET_NAME) == 5, text
  for scope in ("jax_ep_grouped_gemm", "jax_ep_grouped_gemm_dx", "jax_ep_grouped_gemm_dw",
                "jax_ep_gemm_tile_table"):
    assert f"{scope})" in debug, scope
  assert "ragged_dot" not in text
