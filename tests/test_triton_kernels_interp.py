"""The triton backend's kernels, run by the Triton interpreter on the CPU with W simulated ranks.

Each simulated rank owns a host "symmetric region" (a numpy buffer); every rank's ``sym_table``
holds all regions' addresses, so peer stores land where a GPU's NVLink stores would. Ops run
phase by phase (every rank's launch of one kernel before the next kernel), which is what the
flag waits allow on GPUs, and the results are compared with the xla backend (run on W virtual
CPU devices) bit for bit, and with numpy for combine.

Needs triton (the interpreter); skipped without it. Kept small: the CPU is shared.
Also here: the triton backend's jitted ops lower for CUDA on this machine (every kernel compiles
for sm_90) into our custom calls and no XLA all-to-all.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
import types
import zlib

import numpy as np
import pytest
from triton_interp import patch_interpreter

triton = pytest.importorskip("triton")
ml_dtypes = pytest.importorskip("ml_dtypes")

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"

# Filled by the ``kernels`` fixture: the kernel modules loaded afresh in interpreter mode.
kl = kd = kc = ep_sync = None
EPPlan = None
interpreter_phases = None


def _load_interpreted() -> types.SimpleNamespace:
  """kernels/{ep_sync,ep_plan,layout,dispatch,combine}.py as a fresh package, decorated with
  TRITON_INTERPRET=1 (so @triton.jit gives InterpretedFunctions; the real package is untouched)."""
  name = "_jax_ep_kernels_interpreted"
  old = os.environ.get("TRITON_INTERPRET")
  os.environ["TRITON_INTERPRET"] = "1"
  try:
    spec = importlib.util.spec_from_file_location(
        name, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    mods = {}
    for sub in ("ep_sync", "ep_plan", "layout", "dispatch", "combine"):
      mods[sub] = importlib.import_module(f"{name}.{sub}")
  finally:
    if old is None:
      del os.environ["TRITON_INTERPRET"]
    else:
      os.environ["TRITON_INTERPRET"] = old
  return types.SimpleNamespace(**mods)


@pytest.fixture(scope="module")
def kernels():
  global kl, kd, kc, ep_sync, EPPlan, interpreter_phases
  m = _load_interpreted()
  if type(m.dispatch.dispatch_kernel).__name__ != "InterpretedFunction":
    pytest.skip("this Triton does not honour TRITON_INTERPRET at decoration time")
  kl, kd, kc, ep_sync, EPPlan = m.layout, m.dispatch, m.combine, m.ep_sync, m.ep_plan.EPPlan
  interpreter_phases = m.ep_plan.interpreter_phases
  return m


@pytest.fixture
def interp(kernels, monkeypatch):
  """The interpreter, patched for this test only."""
  ti = patch_interpreter(monkeypatch)
  # It copies torch tensors to the host around a launch; our arrays already live on the host
  # (and peers' regions are reached through raw addresses), so pass them through as they are.
  monkeypatch.setattr(ti.GridExecutor, "_init_args_hst", lambda self, args, kwargs: (args, kwargs))
  monkeypatch.setattr(ti.GridExecutor, "_restore_args_dev", lambda self, *a, **k: None)
  return kernels


class Arr:
  """A numpy array as the interpreter's kernels see a tensor: ``data_ptr()`` and ``dtype``."""

  def __init__(self, a: np.ndarray):
    self.a = np.ascontiguousarray(a)
    if self.a.size == 0:  # a valid address even for empty arrays
      self._keep = np.zeros(16, np.uint8)
    self.dtype = self.a.dtype

  def data_ptr(self) -> int:
    return (self._keep if self.a.size == 0 else self.a).ctypes.data


def empty(shape, dtype) -> Arr:
  """Garbage-filled (0x5A bytes), so a missed write shows up."""
  n = int(np.prod(shape)) * np.dtype(dtype).itemsize
  return Arr(np.full(n, 0x5A, np.uint8).view(dtype).reshape(shape))


def phases_of(kernel_name: str, cx: dict) -> list[tuple[int, int]]:
  """The interpreter's (PHASE, grid) launches for one GPU launch, from its constexprs."""
  if kernel_name in ("dispatch_kernel", "dispatch_rows_kernel"):
    return interpreter_phases(kernel_name, cx["NUM_SENDERS"], cx["NUM_RECEIVERS"], 0,
                              cx["RECV_BLOCKS"], -(-cx["NUM_TOKENS"] // cx["BLOCK_T"]),
                              cx["PULL"])
  return interpreter_phases(kernel_name, 0, 0, cx["NUM_PROGRAMS"], 0, 0)


def stage_copy(regions, srcs, stage, ranks):
  """What the launch handler does for ``triton_call(..., stage=(input, offset, stride))``:
  rank r's input ``srcs[r]`` copied whole into its region at ``offset + r * stride``."""
  arg, off, stride = stage
  for r in ranks:
    src = np.ascontiguousarray(srcs[r]).reshape(-1).view(np.uint8)
    regions[r][off + r * stride:off + r * stride + src.size] = src


class SimWorld:
  """W simulated ranks with their symmetric regions; runs one op's launch on every rank,
  phase by phase (each phase on every rank before the next), as EPPlan.interpreter_phases
  says. ``epoch`` counts launches, as the runtime's launcher does."""

  def __init__(self, plan: EPPlan, reorder=None):
    self.plan = plan
    self.reorder = reorder  # optional: phases list -> the order to run them in
    w = plan.world
    # The control block starts zeroed (as runtime.initialize leaves it); the config-dependent
    # part holds garbage whose int32 view is a huge positive number, as another config's rows
    # may leave it: a flag there that is not reset would read as "arrived".
    self.regions = [np.full(plan.region.total_bytes, 0x7F, np.uint8) for _ in range(w)]
    for r in self.regions:
      r[:ep_sync.CONTROL_BYTES] = 0
    self.table = Arr(np.array([r.ctypes.data for r in self.regions], np.int64))
    self.timeout_ns = 2_000_000  # interpreter: spins = timeout_ns // 1000
    self.epoch = 0

  def err(self, rank):
    return self.regions[rank][ep_sync.ERR_OFF:ep_sync.ERR_OFF + 32].view(np.int32)

  def launch(self, kernel, per_rank_args, cx, op, ranks=None, phases=None, fingerprints=None,
             skip=(), stage=None):
    """per_rank_args[r]: the kernel's inputs and outputs on rank r (Arr's); fingerprints[r]:
    rank r's op fingerprint (default: the same on every rank); skip: (phase, rank) pairs not
    run (programs that never get there, as if their GPU had stopped); stage: the launcher's
    copy of an input into each rank's region first (triton_call's ``stage``)."""
    self.epoch += 1
    if stage is not None:
      stage_copy(self.regions, [a[stage[0]].a for a in per_rank_args], stage,
                 range(self.plan.world) if ranks is None else ranks)
    if phases is None:
      phases = self.plan.interpreter_phases(kernel.__name__)
      if self.reorder is not None:
        phases = self.reorder(phases)
    for phase, grid in phases:
      for r in (range(self.plan.world) if ranks is None else ranks):
        if (phase, r) in skip:
          continue
        fp = 1234 if fingerprints is None else fingerprints[r]
        kernel[(grid,)](*per_rank_args[r], self.table, r, self.plan.world, self.epoch,
                        self.timeout_ns, op, fp, **{**cx, "PHASE": phase})

  # -- ops ----------------------------------------------------------------------------------------

  def dispatch(self, xs, idxs, ws, skip=()):
    p, w = self.plan, self.plan.world
    nb, e, el = p.num_blocks, p.num_experts, p.e_local
    outs = [dict(recv_x=empty((p.capacity, p.hidden), xs[r].dtype),
                 recv_w=empty((p.capacity,), np.float32),
                 recv_pos=empty((w, p.num_tokens, p.topk), np.int32),
                 gs=empty((el,), np.int32), go=empty((el,), np.int32),
                 nrecv=empty((1,), np.int32), ndrop=empty((1,), np.int32),
                 hist=empty((nb, e), np.int32), base=empty((p.base_rows, e), np.int32),
                 status=empty((p.status_size("dispatch_kernel"),), np.int32))
            for r in range(w)]
    args = [[Arr(xs[r]), Arr(idxs[r]), Arr(ws[r])] + [outs[r][n] for n in (
        "recv_x", "recv_w", "recv_pos", "gs", "go", "nrecv", "ndrop", "hist", "base", "status")]
            for r in range(w)]
    self.launch(kd.dispatch_kernel, args, p.dispatch(False), ep_sync.OP_DISPATCH, skip=skip,
                stage=p.dispatch_stage(xs[0].dtype.itemsize))
    return outs

  def combine(self, ys, row_ws, recv_pos):
    p, w = self.plan, self.plan.world
    outs = [empty((p.num_tokens, p.hidden), ys[r].dtype) for r in range(w)]
    sts = [empty((p.status_size("combine_kernel"),), np.int32) for _ in range(w)]
    args = [[Arr(ys[r]), Arr(row_ws[r]), Arr(recv_pos[r]), outs[r], sts[r]] for r in range(w)]
    self.launch(kc.combine_kernel, args, p.combine(), ep_sync.OP_COMBINE)
    for st in sts:
      assert not st.a.any(), st.a
    return [o.a for o in outs]

  def dispatch_rows(self, xs, idxs, recv_pos, gos, gss):
    p, w = self.plan, self.plan.world
    outs = [empty((p.capacity, p.hidden), xs[r].dtype) for r in range(w)]
    sts = [empty((p.status_size("dispatch_rows_kernel"),), np.int32) for _ in range(w)]
    args = [[Arr(xs[r]), Arr(idxs[r]), Arr(recv_pos[r]), Arr(gos[r]), Arr(gss[r]), outs[r],
             sts[r]] for r in range(w)]
    self.launch(kd.dispatch_rows_kernel, args, p.dispatch(True), ep_sync.OP_DROWS,
                stage=p.dispatch_stage(xs[0].dtype.itemsize))
    for st in sts:
      assert not st.a.any(), st.a
    return [o.a for o in outs]

  def gather_slots(self, values, recv_pos, idxs):
    p, w = self.plan, self.plan.world
    outs = [empty((p.num_tokens, p.topk), np.float32) for _ in range(w)]
    sts = [empty((p.status_size("gather_kernel"),), np.int32) for _ in range(w)]
    args = [[Arr(values[r]), Arr(recv_pos[r]), Arr(idxs[r]), outs[r], sts[r]]
            for r in range(w)]
    self.launch(kc.gather_kernel, args, p.gather(), ep_sync.OP_GATHER)
    for st in sts:
      assert not st.a.any(), st.a
    return [o.a for o in outs]


# -- an independent numpy model of the contract ----------------------------------------------------

def ref_dispatch(xs, idxs, ws, world, e_local, capacity, alignment):
  """Per receiver: recv_x, recv_w, recv_pos [W,T,K], group_sizes, group_offsets, nrecv, ndrop."""
  t, k = idxs[0].shape
  res = []
  for r in range(world):
    counts = np.zeros(e_local, np.int64)
    for s in range(world):
      for g in idxs[s].reshape(-1):
        if g >= 0 and g // e_local == r:
          counts[g % e_local] += 1
    offset = np.zeros(e_local, np.int64)
    for e in range(1, e_local):
      offset[e] = -(-(offset[e - 1] + counts[e - 1]) // alignment) * alignment
    seen = np.zeros(e_local, np.int64)
    recv_x = np.zeros((capacity,) + xs[0].shape[1:], xs[0].dtype)
    recv_w = np.zeros(capacity, np.float32)
    recv_pos = np.full((world, t, k), -1, np.int32)
    for s in range(world):
      for tt in range(t):
        for kk in range(k):
          g = idxs[s][tt, kk]
          if g < 0 or g // e_local != r:
            continue
          e = g % e_local
          pos = offset[e] + seen[e]
          seen[e] += 1
          if pos < capacity:
            recv_pos[s, tt, kk] = pos
            recv_x[pos] = xs[s][tt]
            recv_w[pos] = ws[s][tt, kk]
    gs = np.clip(capacity - offset, 0, counts).astype(np.int32)
    go = np.minimum(offset, capacity).astype(np.int32)
    res.append(dict(recv_x=recv_x, recv_w=recv_w, recv_pos=recv_pos, gs=gs, go=go,
                    nrecv=int(gs.sum()), ndrop=int(counts.sum() - gs.sum())))
  return res


def ref_combine(ys, row_ws, recv_pos, world):
  """Each rank's weighted sum per owner rounded to the dtype, then summed by the owner.

  Also returns, per output, what rounding may move it by (see ``assert_combine_matches_ref``).
  """
  t, k = recv_pos[0].shape[1:]
  eps, eps32 = float(ml_dtypes.finfo(ys[0].dtype).eps), float(np.finfo(np.float32).eps)
  partial = [[None] * world for _ in range(world)]  # [expert rank][owner]
  terms = [np.zeros((t, ys[0].shape[1]), np.float32) for _ in range(world)]  # sum |w y| per owner
  for r in range(world):
    for s in range(world):
      acc = np.zeros((t, ys[r].shape[1]), np.float32)
      for kk in range(k):
        p = recv_pos[r][s, :, kk]
        m = p >= 0
        row = row_ws[r][p[m]][:, None] * ys[r][p[m]].astype(np.float32)
        acc[m] += row
        terms[s][m] += np.abs(row)
      partial[r][s] = acc.astype(ys[r].dtype)
  outs, bounds = [], []
  for s in range(world):
    acc = np.zeros((t, ys[0].shape[1]), np.float32)
    mag = np.zeros_like(acc)
    for r in range(world):
      acc += partial[r][s].astype(np.float32)
      mag += np.abs(partial[r][s].astype(np.float32))
    outs.append(acc.astype(ys[0].dtype))
    bounds.append(2 * eps * (mag + np.abs(acc)) + k * world * eps32 * terms[s] + 1e-6)
  return outs, bounds


def assert_combine_matches_ref(got, ys, row_ws, recv_pos, world, msg=""):
  """``got`` against :func:`ref_combine`, allowing what rounding can move, and nothing more.

  The kernel and the reference both round each rank's partial sum and the owner's total to the
  dtype, but they add the rows of a partial in other orders (in float32), so a partial may
  round to the neighbouring value: up to one unit in its last place (CI once saw a 4..8-sized
  bf16 partial 1/32 apart, the sum cancelling to -0.004 against -0.035, beyond a fixed 3e-2).
  The bound is two such units (eps times the magnitude) of every partial and of the total, plus
  float32's reordering error over the rows; a misplaced, missing or doubled row moves the sum
  by a whole weighted row and still fails.
  """
  ref, bounds = ref_combine(ys, row_ws, recv_pos, world)
  for r in range(world):
    g, w, bound = got[r].astype(np.float32), ref[r].astype(np.float32), bounds[r]
    bad = np.abs(g - w) > bound
    assert not bad.any(), (
        f"{msg} rank {r}: {bad.sum()} of {bad.size} outputs off the reference beyond rounding; "
        f"first at {np.argwhere(bad)[0].tolist()}: got {g[bad][0]}, want {w[bad][0]}, "
        f"bound {bound[bad][0]}")


def routing(rng, kind, world, t, k, e):
  if kind == "uniform":
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
                    if t else np.zeros((0, k), np.int64) for _ in range(world)])
  elif kind == "skewed":  # zipf-like: low expert ids are hot; duplicates in a row allowed
    p = 1.0 / np.arange(1, e + 1) ** 1.2
    idx = rng.choice(e, size=(world, t, k), p=p / p.sum())
  elif kind == "empty":
    idx = np.full((world, t, k), -1)
  else:
    raise ValueError(kind)
  idx = idx.astype(np.int32)
  if kind != "empty" and t:
    idx[rng.random(idx.shape) < 0.15] = -1  # some unselected slots
  return [idx[r] for r in range(world)]


CASES = [
    # world, T, H, K, E, capacity, alignment, routing, dtype
    (2, 5, 48, 2, 4, None, 1, "uniform", np.float32),
    (2, 40, 64, 4, 8, None, 4, "skewed", ml_dtypes.bfloat16),
    (4, 33, 32, 3, 8, 20, 1, "skewed", np.float32),          # capacity overflow -> drops
    (4, 17, 40, 2, 8, 6, 4, "uniform", ml_dtypes.bfloat16),  # heavy drops, aligned
    (2, 0, 32, 2, 4, None, 1, "uniform", np.float32),        # T = 0
    (3, 9, 16, 2, 6, None, 2, "empty", np.float32),          # nothing selected
    (2, 7, 300, 2, 4, None, 1, "uniform", np.float32),        # rows in 3 chunks (128 + tail)
    (4, 40, 64, 8, 256, 200, 1, "uniform", ml_dtypes.bfloat16),  # DeepSeek-V3 routing, 3 blocks
    (2, 24, 32, 8, 8, None, 2, "skewed", np.float32),  # > 4 of a token's 8 rows on one rank
    # both push paths of combine with different chunks: 256 columns (4 levels), 128 (all 8)
    (2, 24, 600, 8, 8, None, 1, "skewed", ml_dtypes.bfloat16),
]


def _capacity(world, t, k, e, capacity, alignment):
  if capacity is not None:
    return capacity
  e_local = e // world
  pairs = world * t * k
  return -(-(pairs + (alignment - 1) * e_local) // alignment) * alignment


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}T{c[1]}H{c[2]}K{c[3]}E{c[4]}"
                         f"C{c[5]}A{c[6]}{c[7]}{np.dtype(c[8]).name}")
def test_dispatch_combine_against_numpy(case, interp):
  world, t, h, k, e, cap, align, kind, dtype = case
  rng = np.random.default_rng(zlib.crc32(repr(case[:8]).encode()))
  capacity = _capacity(world, t, k, e, cap, align)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t + 3, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=align, num_sms=3, use_timer=False,
                itemsize=np.dtype(dtype).itemsize)
  idxs = routing(rng, kind, world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(dtype) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  sim = SimWorld(plan)
  got = sim.dispatch(xs, idxs, ws)
  want = ref_dispatch(xs, idxs, ws, world, e // world, capacity, align)
  for r in range(world):
    g, wnt = got[r], want[r]
    assert not g["status"].a.any(), g["status"].a
    np.testing.assert_array_equal(g["gs"].a, wnt["gs"])
    np.testing.assert_array_equal(g["go"].a, wnt["go"])
    assert g["nrecv"].a[0] == wnt["nrecv"] and g["ndrop"].a[0] == wnt["ndrop"]
    np.testing.assert_array_equal(g["recv_pos"].a, wnt["recv_pos"])
    np.testing.assert_array_equal(g["recv_w"].a.view(np.uint32), wnt["recv_w"].view(np.uint32))
    np.testing.assert_array_equal(g["recv_x"].a.view(np.uint8), wnt["recv_x"].view(np.uint8))

  # combine along that layout, twice (identical), then the backward ops.
  recv_pos = [g["recv_pos"].a for g in got]
  ys = [rng.standard_normal((capacity, h)).astype(dtype) for _ in range(world)]
  row_ws = [g["recv_w"].a for g in got]
  out1 = sim.combine(ys, row_ws, recv_pos)
  out2 = sim.combine(ys, row_ws, recv_pos)
  # The reduce after all pushes (combine_queue=0) sums in the same order: the same bits; so
  # does the queue with its flags raised two items at a time (2).
  out3 = SimWorld(dataclasses.replace(plan, combine_queue=0)).combine(ys, row_ws, recv_pos)
  out4 = SimWorld(dataclasses.replace(plan, combine_queue=2)).combine(ys, row_ws, recv_pos)
  # One chunk width for both push paths (combine_wide=0): the same bits too.
  out5 = SimWorld(dataclasses.replace(plan, combine_wide=0)).combine(ys, row_ws, recv_pos)
  # Smaller combine blocks (combine_tokens; the default is 32 at top-8): the same bits.
  out6 = SimWorld(dataclasses.replace(plan, combine_tokens=16)).combine(ys, row_ws, recv_pos)
  # Items with a token of more than J_UNROLL rows here wholly on the all-TOPK path
  # (combine_split=0; the default sums those few tokens in a tile of their own): the same bits
  # (the heavy / skewed cases have such tokens; ``test_combine_push_paths`` aims at it).
  out7 = SimWorld(dataclasses.replace(plan, combine_split=0)).combine(ys, row_ws, recv_pos)
  # Items whose tokens have <= 2 rows here on a 2-level path in wider chunks (combine_narrow).
  out8 = SimWorld(dataclasses.replace(plan, combine_narrow=1)).combine(ys, row_ws, recv_pos)
  # Blocks reduced between the push items as soon as every rank pushed them (combine_queue=3).
  out9 = SimWorld(dataclasses.replace(plan, combine_queue=3)).combine(ys, row_ws, recv_pos)
  # Blocks with a token of many rows here as two half tiles (combine_halves).
  out10 = SimWorld(dataclasses.replace(plan, combine_halves=1)).combine(ys, row_ws, recv_pos)
  assert_combine_matches_ref(out1, ys, row_ws, recv_pos, world)
  for r in range(world):
    np.testing.assert_array_equal(out1[r].view(np.uint8), out2[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out3[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out4[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out5[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out6[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out7[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out8[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out9[r].view(np.uint8))
    np.testing.assert_array_equal(out1[r].view(np.uint8), out10[r].view(np.uint8))

  gos = [g["go"].a for g in got]
  gss = [g["gs"].a for g in got]
  douts = [rng.standard_normal((t, h)).astype(dtype) for _ in range(world)]
  rows = sim.dispatch_rows(douts, idxs, recv_pos, gos, gss)
  want_rows = ref_dispatch(douts, idxs, ws, world, e // world, capacity, align)
  for r in range(world):
    np.testing.assert_array_equal(rows[r].view(np.uint8), want_rows[r]["recv_x"].view(np.uint8))

  # Push mode (senders store rows into the peers; the default pulls): the same bits for
  # every op, run twice in one world (the second time over the first one's rows and flags).
  push = SimWorld(dataclasses.replace(plan, dispatch_pull=0, expand_group=1))
  # The receivers' zero fill as their first step (zero_queue=0; the default spreads it
  # through the expansion queue): the same bits, gaps between aligned groups and dropped rows
  # included.
  zq = SimWorld(dataclasses.replace(plan, zero_queue=0))
  # Senders copying the expansion's groups of blocks, a quarter of the zero items first.
  grouped = SimWorld(dataclasses.replace(plan, dispatch_pull=2, zero_queue=2))
  for sim_v in (push, push, zq, grouped):
    got_p = sim_v.dispatch(xs, idxs, ws)
    for r in range(world):
      assert not got_p[r]["status"].a.any(), got_p[r]["status"].a
      for name in ("recv_pos", "recv_w", "recv_x", "gs", "go"):
        np.testing.assert_array_equal(got_p[r][name].a.view(np.uint8),
                                      got[r][name].a.view(np.uint8))
    out_p = sim_v.combine(ys, row_ws, recv_pos)
    rows_p = sim_v.dispatch_rows(douts, idxs, recv_pos, gos, gss)
    for r in range(world):
      np.testing.assert_array_equal(out_p[r].view(np.uint8), out1[r].view(np.uint8))
      np.testing.assert_array_equal(rows_p[r].view(np.uint8), rows[r].view(np.uint8))

  values = [rng.standard_normal(capacity).astype(np.float32) for _ in range(world)]
  slots = sim.gather_slots(values, recv_pos, idxs)
  e_local = e // world
  for s in range(world):
    want_slots = np.zeros((t, k), np.float32)
    for tt in range(t):
      for kk in range(k):
        g = idxs[s][tt, kk]
        if g >= 0:
          p = recv_pos[g // e_local][s, tt, kk]
          want_slots[tt, kk] = values[g // e_local][p] if p >= 0 else 0.0
    np.testing.assert_array_equal(slots[s], want_slots)


def _senders_expand_first(phases):
  """Run the senders' expansion (phase 6) before the receivers' (5): with the work queue the
  senders then take every item and the receivers only zero-fill."""
  i5, i6 = ([ph for ph, _ in phases].index(n) for n in (5, 6))
  out = list(phases)
  out[i5], out[i6] = phases[i6], phases[i5]
  return out


@pytest.mark.parametrize("tokens", [16, 32])
def test_combine_push_paths(tokens, interp):
  """combine_split (the default) and combine_narrow, alone and together, on a routing built
  for them (W = 4, top-8 of 32 experts): most tokens have 2 rows on every rank, and the
  16-token blocks hold 0, 1, 2 and 3 tokens with 6 rows on rank 0 and 2 on rank 1 (with
  32-token blocks 1 and 5), the last, partial block 2 at its end: items on the 2-level path
  (ranks 2 and 3, and block 0), on the J_UNROLL-level path, split into that path plus the
  heavy tile (<= HEAVY_T such tokens), and on the all-TOPK path (more). Without either, an
  item runs one level count; that kernel equals the numpy model, and every variant equals it
  bit for bit (combine_prefetch too: the slot columns loaded an item ahead); some slots are
  unselected."""
  world, t, h, k, e = 4, 70, 600, 8, 32
  el = e // world
  rng = np.random.default_rng()
  heavy_at = [16, 32, 33, 48, 49, 50, 68, 69]  # block offsets: 0 | 0 | 0, 1 | 0, 1, 2 | 4, 5
  idxs = []
  for _ in range(world):
    idx = np.zeros((t, k), np.int32)
    for tt in range(t):
      if tt in heavy_at:
        ex = np.concatenate([rng.choice(el, 6, replace=False), el + rng.choice(el, 2, False)])
      else:
        ex = np.concatenate([r * el + rng.choice(el, 2, replace=False) for r in range(world)])
      idx[tt] = rng.permutation(ex)
    light = ~np.isin(np.arange(t), heavy_at)
    idx[light[:, None] & (rng.random((t, k)) < 0.1)] = -1
    idxs.append(idx)
  capacity = _capacity(world, t, k, e, None, 1)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=1, num_sms=3, use_timer=False, itemsize=2,
                combine_tokens=tokens, combine_split=0)
  bt, ht = plan.combine_block_t, plan.combine_heavy_t
  # the routing reaches every path: per block, the tokens with > J_UNROLL rows on rank 0
  heavy_counts = [sum(b * bt <= x < (b + 1) * bt for x in heavy_at) for b in range(-(-t // bt))]
  assert any(1 <= c <= ht for c in heavy_counts) and any(c > ht for c in heavy_counts)
  assert tokens != 16 or heavy_counts == [0, 1, 2, 3, 2], heavy_counts
  recv_pos, row_ws, ys = _bf16_layout_and_ys(plan, rng, idxs)
  assert ((recv_pos[0] >= 0).sum(-1) == 6).sum() == world * len(heavy_at)
  base = SimWorld(plan).combine(ys, row_ws, recv_pos)
  assert_combine_matches_ref(base, ys, row_ws, recv_pos, world)
  for kw in ({"combine_split": 1}, {"combine_narrow": 1},  # split: the default
             {"combine_split": 1, "combine_narrow": 1}, {"combine_prefetch": 1},
             {"combine_prefetch": 1, "combine_split": 0, "combine_narrow": 1},
             {"combine_halves": 1}, {"combine_halves": 1, "combine_split": 1}):
    got = SimWorld(dataclasses.replace(plan, **kw)).combine(ys, row_ws, recv_pos)
    for r in range(world):
      np.testing.assert_array_equal(got[r].view(np.uint8), base[r].view(np.uint8), str(kw))


def _bf16_layout_and_ys(plan, rng, idxs):
  """Dispatch random bf16 tokens along ``idxs`` (every rank's), then random expert outputs:
  (recv_pos, recv_w, ys) per rank, the inputs of a combine."""
  dtype, w = ml_dtypes.bfloat16, plan.world
  xs = [rng.standard_normal((plan.num_tokens, plan.hidden)).astype(dtype) for _ in range(w)]
  ws = [rng.random((plan.num_tokens, plan.topk)).astype(np.float32) for _ in range(w)]
  got = SimWorld(plan).dispatch(xs, idxs, ws)
  ys = [rng.standard_normal((plan.capacity, plan.hidden)).astype(dtype) for _ in range(w)]
  return [g["recv_pos"].a for g in got], [g["recv_w"].a for g in got], ys


def _halves_items(plan, recv_pos):
  """How the push items of ``recv_pos`` (one rank's, [W, T, K]) go with combine_halves:
  (items on the two-half path, items with a token of > J_UNROLL rows that are not)."""
  bt, half, j = plan.combine_block_t, plan.combine_block_t // 2, plan.j_unroll
  cnt = (recv_pos >= 0).sum(-1)  # [W, T]
  halves = other = 0
  for s in range(cnt.shape[0]):
    for b0 in range(0, cnt.shape[1], bt):
      c = np.sort(cnt[s, b0:b0 + bt])[::-1]
      if c[0] > j:
        c_lo = c[half] if len(c) > half else 0
        halves += int(c_lo <= j)
        other += int(c_lo > j)
  return halves, other


@pytest.mark.parametrize("tokens", [0, 16])
def test_combine_halves(tokens, interp):
  """combine_halves: at W = 2 and top-8 a token has ~4 of its rows on each rank, so nearly
  every push item holds one with more than J_UNROLL (4) here; those items run as two
  half-height tiles ordered by rows here (all levels, then J_UNROLL), unless more than half
  the block's tokens have more than J_UNROLL rows (the first tokens here: the other paths).
  The same bits as without, and the reference's sums."""
  world, t, h, k, e = 2, 70, 300, 8, 16
  rng = np.random.default_rng(7 + tokens)
  idxs = []
  for _ in range(world):
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    idx[:24] = np.stack([np.concatenate([rng.choice(8, 6, replace=False),
                                         8 + rng.choice(8, 2, replace=False)])
                         for _ in range(24)])  # 6 rows on rank 0 each
    idx[rng.random((t, k)) < 0.05] = -1
    idxs.append(idx)
  capacity = _capacity(world, t, k, e, None, 1)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=1, num_sms=3, use_timer=False, itemsize=2,
                combine_tokens=tokens)
  recv_pos, row_ws, ys = _bf16_layout_and_ys(plan, rng, idxs)
  halves, other = _halves_items(plan, recv_pos[0])
  assert halves >= 2 and other >= 1, (halves, other)  # both ways are taken
  base = SimWorld(plan).combine(ys, row_ws, recv_pos)
  assert_combine_matches_ref(base, ys, row_ws, recv_pos, world)
  for kw in ({"combine_halves": 1}, {"combine_halves": 1, "combine_split": 0},
             {"combine_halves": 1, "combine_prefetch": 1}):
    out = SimWorld(dataclasses.replace(plan, **kw)).combine(ys, row_ws, recv_pos)
    for r in range(world):
      np.testing.assert_array_equal(out[r].view(np.uint8), base[r].view(np.uint8), str(kw))


@pytest.mark.parametrize("world,h,queue,parts,want,dtype,kind", [
    (2, 600, 1, 0, 2, np.float32, "skewed"), (2, 1100, 0, 3, 3, ml_dtypes.bfloat16, "uniform"),
    (1, 1100, 1, 0, 3, ml_dtypes.bfloat16, "uniform"), (3, 300, 2, 2, 2, np.float32, "drops"),
    (2, 600, 1, 0, 2, np.float32, "empty"), (2, 600, 3, 0, 1, np.float32, "uniform")])
def test_combine_column_parts_match_numpy(world, h, queue, parts, want, dtype, kind, interp):
  """Few tokens (2 blocks per owner for 8 programs): each combine push item and each reduce
  block is split into column ranges (EPPlan.combine_push_parts; 0 = the plan's choice, the
  last range short) with DONE flags of their own; queues 0, 1, 2 (3 keeps whole rows). The
  output equals the numpy model and whole rows' bit for bit, and with queues 1 and 2 every
  (block, range) flag of every rank is raised in every owner's region."""
  t, k, e = 20, 4, 4 * world
  rng = np.random.default_rng(900 + 100 * world + 10 * queue + parts)
  cap = None if kind != "drops" else 12
  capacity = _capacity(world, t, k, e, cap, 1)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=1, num_sms=8, use_timer=False,
                itemsize=np.dtype(dtype).itemsize, combine_queue=queue, combine_parts=parts)
  cx = plan.combine()
  unit = plan._push_part_unit
  assert (plan.combine_block_t, cx["PUSH_PARTS"]) == (16, want), cx
  assert -(-h // unit) == 3 and h % unit  # 3 column units (the widest chunk), the last short
  assert cx["PUSH_COLS"] == -(-3 // want) * unit
  assert plan.num_programs == min(8, 2 * world * want)
  idxs = routing(rng, "skewed" if kind == "drops" else kind, world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(dtype) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  got = SimWorld(plan).dispatch(xs, idxs, ws)
  if kind == "drops":
    assert sum(int(g["ndrop"].a[0]) for g in got) > 0
  recv_pos = [g["recv_pos"].a for g in got]
  row_ws = [g["recv_w"].a for g in got]
  ys = [rng.standard_normal((capacity, h)).astype(dtype) for _ in range(world)]
  sim = SimWorld(plan)
  out = sim.combine(ys, row_ws, recv_pos)
  assert_combine_matches_ref(out, ys, row_ws, recv_pos, world)
  whole = SimWorld(dataclasses.replace(plan, combine_parts=1))
  assert whole.plan.combine()["PUSH_PARTS"] == 1
  base = whole.combine(ys, row_ws, recv_pos)
  for r in range(world):
    np.testing.assert_array_equal(out[r].view(np.uint8), base[r].view(np.uint8))
  if queue in (1, 2):  # DONE[blk * PARTS + part, rank] = seq (1: the sim's first op)
    n = 2 * want * world
    for r in range(world):
      off = plan.region.block_flag_off
      flags = sim.regions[r][off:off + 4 * n].view(np.int32)
      np.testing.assert_array_equal(flags, 1)


@pytest.mark.parametrize("order,share,reorder,levels,pull,group,zq", [
    (1, 1.0, None, 0, 0, 1, 0), (0, 1.0, None, 0, 0, 1, 0), (0, 0.5, None, 1, 0, 1, 0),
    (1, 0.25, None, 0, 0, 1, 0), (2, 0.6, None, 2, 0, 1, 0),
    (2, 1.0, _senders_expand_first, 0, 0, 1, 0), (3, 1.0, None, 0, 0, 1, 0),
    (3, 1.0, _senders_expand_first, 1, 0, 1, 0), (0, 0.5, None, 1, 1, 1, 0),
    (3, 1.0, _senders_expand_first, 0, 1, 1, 0), (3, 1.0, None, 0, 1, 2, 0),
    (2, 1.0, _senders_expand_first, 1, 0, 4, 0), (3, 1.0, None, 0, 1, 4, 1),
    (2, 1.0, _senders_expand_first, 0, 0, 1, 1), (3, 1.0, None, 0, 2, 4, 2),
    (2, 1.0, _senders_expand_first, 0, 2, 2, 1), (3, 1.0, None, 1, 2, 8, 0),
    (0, 0.5, None, 0, 0, 1, 0), (3, 1.0, None, 0, 3, 4, 2),
    (2, 1.0, _senders_expand_first, 0, 3, 2, 1), (0, 0.5, None, 1, 3, 1, 0),
    (3, 1.0, None, 0, 4, 4, 2), (2, 1.0, _senders_expand_first, 1, 4, 2, 1),
    (0, 0.5, None, 0, 4, 1, 0)
])
def test_dispatch_variants_match_numpy(order, share, reorder, levels, pull, group, zq, interp):
  """The tuning variants of dispatch (EPPlan.expand_order / receiver_share: block-major
  expansion, senders expanding the last blocks after their push, a work queue shared by every
  program; expand_levels: stores by level, with blocks whose tokens keep more slots than the
  levels on a rank, given the skewed routing; dispatch_pull: receivers loading the rows from
  the source's region, or (3) from the source's x itself, each program then saying so to
  every rank, or (4) from the copy of x that the launcher put in the source's region;
  expand_group: queue items of several blocks, the last one short;
  zero_queue: the zero rows as queue items among them) give the same bits."""
  world, t, h, k, e = 3, 50, 40, 4, 12
  rng = np.random.default_rng(order * 10 + int(share * 8))
  capacity = _capacity(world, t, k, e, None, 2)
  # Groups of blocks: few enough programs that the plan keeps them (EPPlan.dispatch_group
  # halves groups that would leave programs without an item).
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=2, num_sms=6 if group == 1 else 3,
                use_timer=False, itemsize=4, expand_order=order, receiver_share=share,
                expand_levels=levels, dispatch_pull=pull, expand_group=group, zero_queue=zq)
  assert plan.dispatch(False)["GROUP"] == (group if order >= 2 else 1)
  assert share == 1.0 or plan.receiver_blocks < -(-t // plan.block_t)
  idxs = routing(rng, "skewed", world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  sim = SimWorld(plan, reorder)
  got = sim.dispatch(xs, idxs, ws)
  want = ref_dispatch(xs, idxs, ws, world, e // world, capacity, 2)
  if order >= 2:  # every (source, block) item was taken once, then one failed take per program
    ns, nr = plan.num_senders, plan.num_receivers
    for r in range(world):
      queue = sim.regions[r][ep_sync.QUEUE_OFF:ep_sync.QUEUE_OFF + 4].view(np.int32)[0]
      items = -(-plan.kernel_blocks // group) * world
      if zq:  # + the zero-fill items: GROUP x BLOCK_T rows outside the groups each
        zr = plan.block_t * group
        items += -(-(capacity - int(got[r]["gs"].a.sum())) // zr)
      assert queue == items + ns + nr, (queue, plan.kernel_blocks, group, ns, nr)
  _assert_dispatch_outputs(got, want)
  if pull >= 3:  # every program of every rank said it read the peers' x for the last time
    _assert_x_released(sim, plan, seq=1)
  _assert_rows_follow_layout(sim, got, idxs, ws, rng, (t, h, e, capacity, 2))
  if pull >= 3:
    _assert_x_released(sim, plan, seq=2)


def _assert_dispatch_outputs(got, want):
  """Every rank's dispatch: no failed wait, and recv_pos, recv_w, recv_x as numpy's."""
  for r, (g, w) in enumerate(zip(got, want)):
    assert not g["status"].a.any(), (r, g["status"].a)
    for name in ("recv_pos", "recv_w", "recv_x"):
      np.testing.assert_array_equal(g[name].a, w[name], f"rank {r} {name}")


def _assert_rows_follow_layout(sim, got, idxs, ws, rng, dims):
  """dispatch_rows of fresh rows along ``got``'s layout gives numpy's expansion of them
  (``dims``: T, H, E, capacity, alignment)."""
  t, h, e, capacity, align = dims
  world = len(got)
  douts = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
  rows = sim.dispatch_rows(douts, idxs, [g["recv_pos"].a for g in got],
                           [g["go"].a for g in got], [g["gs"].a for g in got])
  want_rows = ref_dispatch(douts, idxs, ws, world, e // world, capacity, align)
  for r in range(world):
    np.testing.assert_array_equal(rows[r], want_rows[r]["recv_x"])


@pytest.mark.parametrize("pull,parts,want", [(3, 0, 3), (4, 2, 2), (0, 3, 3), (2, 0, 3), (1, 2, 2),
                                            (2, 1, 1)])
def test_dispatch_column_parts_match_numpy(pull, parts, want, interp):
  """Few tokens (one block per source for 8 programs): each expansion item is split into
  column ranges (EPPlan.dispatch_parts, 0 = the plan's choice; the last range short) that
  different programs take from the queue; recv_x, recv_w and recv_pos come out the same bits
  as numpy's, and so do dispatch_rows' rows."""
  world, t, h, k, e = 2, 20, 600, 4, 8
  rng = np.random.default_rng(500 + 10 * pull + parts)
  capacity = _capacity(world, t, k, e, None, 1)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=capacity, alignment=1, num_sms=8, use_timer=False, itemsize=4,
                dispatch_pull=pull, expand_parts=parts)
  assert (plan.dispatch_group, plan.dispatch_parts, plan.dispatch(False)["PARTS"]) == (
      1, want, want)
  assert -(-h // plan.block_h) == 3 and h % plan.block_h  # 3 row chunks, the last short
  idxs = routing(rng, "skewed", world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  sim = SimWorld(plan)
  got = sim.dispatch(xs, idxs, ws)
  want_d = ref_dispatch(xs, idxs, ws, world, e // world, capacity, 1)
  ns, nr = plan.num_senders, plan.num_receivers
  for r in range(world):
    # every (source, block, range) item was taken once, then one failed take per program
    queue = sim.regions[r][ep_sync.QUEUE_OFF:ep_sync.QUEUE_OFF + 4].view(np.int32)[0]
    zero_items = -(-(capacity - int(got[r]["gs"].a.sum())) // plan.block_t)
    assert queue == world * want + zero_items + ns + nr, queue
  _assert_dispatch_outputs(got, want_d)
  _assert_rows_follow_layout(sim, got, idxs, ws, rng, (t, h, e, capacity, 1))


def _assert_x_released(sim, plan, seq):
  """Pull 3 and 4: ARRIVE_FLAG[s, p] = seq in every rank for every program p of every rank s
  (what the leader's end wait waits for), and XPTR holds the peers' x addresses (3) or
  nothing (4: the peers read the launcher's copy in the region instead)."""
  n = plan.num_senders + plan.num_receivers
  for r in range(plan.world):
    flags = sim.regions[r][ep_sync.ARRIVE_FLAG_OFF:ep_sync.HIST_FLAG_OFF].view(np.int32)
    flags = flags.reshape(ep_sync.MAX_WORLD, ep_sync.MAX_PROGRAMS)
    np.testing.assert_array_equal(flags[:plan.world, :n], seq)
    assert (flags[:, n:] == 0).all() and (flags[plan.world:] == 0).all()
    xptr = sim.regions[r][ep_sync.XPTR_OFF:ep_sync.XPTR_OFF + 8 * plan.world].view(np.int64)
    if plan.dispatch_pull == 3:
      assert (xptr != 0).all() and len(set(xptr.tolist())) == plan.world
    else:
      assert (xptr == 0).all()


def test_column_scan_spans_several_tiles(interp):
  """The layout's column scans (``scan_columns``, every program) with more token blocks than
  one tile holds, as at T = 32K on a GPU (the other tests fit theirs in one): exclusive block
  prefixes, column totals and each program's flag equal numpy's; programs past the last
  column only raise their flag."""
  nb, e, programs, cols, tile, epoch = 13, 10, 4, 4, 4, 7
  rng = np.random.default_rng(5)
  hist = rng.integers(0, 9, (nb, e)).astype(np.int32)
  base = empty((nb + 3, e), np.int32)
  status = Arr(np.zeros(1 + programs, np.int32))
  region = np.zeros(ep_sync.CONTROL_BYTES, np.uint8)
  flags = region[ep_sync.HIST_FLAG_OFF:ep_sync.HIST_FLAG_OFF + 8 * ep_sync.MAX_PROGRAMS]
  flags.view(np.int64)[:programs] = epoch  # every program's histograms are in
  table = Arr(np.array([region.ctypes.data], np.int64))
  for pid in range(programs):  # one program per launch: the interpreter's grid is sequential
    kl.scan_columns[(1,)](pid, programs, Arr(hist), base, status, table, 0, epoch, 1_000_000,
                          ep_sync.OP_DISPATCH, NUM_BLOCKS=nb, NUM_EXPERTS=e, COLS=cols,
                          BLOCK_BC=tile, BLOCK_PROG=programs, USE_TIMER=False)
  np.testing.assert_array_equal(base.a[:nb], np.cumsum(hist, axis=0) - hist)
  np.testing.assert_array_equal(base.a[nb], hist.sum(axis=0))
  col = flags.view(np.int64)[ep_sync.COL_FLAG:ep_sync.COL_FLAG + programs]
  np.testing.assert_array_equal(col, [epoch] * programs)
  assert not status.a.any(), status.a


def test_timeout_is_recorded_not_hung(interp):
  """A rank whose peer never arrives gives up after the timeout and records who it waited for."""
  plan = EPPlan(world=2, num_tokens=4, max_tokens=4, hidden=16, topk=2, num_experts=4,
                capacity=16, alignment=1, num_sms=2, use_timer=False)
  sim = SimWorld(plan)
  sim.timeout_ns = 20_000  # 20 spins in the interpreter
  y = np.zeros((16, 16), np.float32)
  st = empty((plan.status_size("combine_kernel"),), np.int32)
  args = [[Arr(y), Arr(np.zeros(16, np.float32)), Arr(np.full((2, 4, 2), -1, np.int32)),
           empty((4, 16), np.float32), st]]
  # Only rank 0 runs its leader (start barrier); rank 1 never does.
  sim.launch(kc.combine_kernel, args, plan.combine(), ep_sync.OP_COMBINE, ranks=[0],
             phases=[(2, 1), (3, 1)])
  assert st.a[0] == ep_sync.OP_COMBINE
  err = sim.err(0)
  assert list(err[:5]) == [1, ep_sync.OP_COMBINE, 0, 1, 1]
  msg = ep_sync.describe_error(err)
  assert "jax_ep.combine (start barrier)" in msg and "rank 0" in msg and "rank 1" in msg, msg


@pytest.mark.parametrize("pull", [3, 4])
def test_pull_from_x_end_wait_times_out_when_a_peer_stops(pull, interp):
  """Dispatch reading the peers' x in place (pull 3) or the launcher's copy of it (4): rank
  1's receivers never run (its GPU stopped after its senders): rank 0 still expands
  everything (it needs only rank 1's senders), then its leader's end wait for rank 1's
  programs gives up after the timeout and names rank 1, instead of ending the launch while
  rank 1 might still read rank 0's x (or its copy, which the next launch overwrites), or
  hanging."""
  world, t, h, k, e = 2, 20, 16, 2, 4
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=_capacity(world, t, k, e, None, 1), alignment=1, num_sms=4,
                use_timer=False, itemsize=4, dispatch_pull=pull)
  rng = np.random.default_rng(5)
  idxs = routing(rng, "uniform", world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  sim = SimWorld(plan)
  sim.timeout_ns = 20_000  # 20 spins in the interpreter
  got = sim.dispatch(xs, idxs, ws, skip={(5, 1), (6, 1), (8, 1)})
  want = ref_dispatch(xs, idxs, ws, world, e // world, plan.capacity, 1)
  np.testing.assert_array_equal(got[0]["recv_x"].a, want[0]["recv_x"])
  st = got[0]["status"].a
  assert (st == ep_sync.OP_DISPATCH + 8).sum() == 1, st  # the leader's end wait, one slot
  err = sim.err(0)
  assert list(err[:5]) == [1, ep_sync.OP_DISPATCH + 8, 0, 1, 1], err[:5]
  msg = ep_sync.describe_error(err)
  assert "jax_ep.dispatch" in msg and "rank 0" in msg and "rank 1" in msg, msg


@pytest.mark.parametrize("queue", [1, 0, 2, 3])
def test_combine_reduce_times_out_when_a_rank_never_pushes(queue, interp):
  """Combine where rank 1's programs never push (they die after the start barrier): rank 0's
  reducers wait for its rows (per-block DONE flags with the queue, ARRIVE_FLAGs without), time
  out with the row-arrival code and an error record naming rank 0, and write no output row."""
  plan = EPPlan(world=2, num_tokens=8, max_tokens=8, hidden=16, topk=2, num_experts=4,
                capacity=32, alignment=1, num_sms=2, use_timer=False, combine_queue=queue)
  sim = SimWorld(plan)
  sim.timeout_ns = 5_000
  rng = np.random.default_rng(11)
  recv_pos = [np.where(rng.random((2, 8, 2)) < 0.7, rng.integers(0, 32, (2, 8, 2)), -1)
              .astype(np.int32) for _ in range(2)]
  outs = [empty((8, 16), np.float32) for _ in range(2)]
  sts = [Arr(np.zeros(plan.status_size("combine_kernel"), np.int32)) for _ in range(2)]
  args = [[Arr(rng.standard_normal((32, 16)).astype(np.float32)),
           Arr(rng.random(32).astype(np.float32)), Arr(recv_pos[r]), outs[r], sts[r]]
          for r in range(2)]
  npg = plan.num_programs
  sim.epoch += 1
  for phase, grid, ranks in [(2, 1, (0, 1)), (3, 1, (0, 1)), (4, npg, (0,)), (5, npg, (0,))]:
    for r in ranks:
      kc.combine_kernel[(grid,)](*args[r], sim.table, r, 2, sim.epoch, sim.timeout_ns,
                                 ep_sync.OP_COMBINE, 1234, **{**plan.combine(), "PHASE": phase})
  st = sts[0].a
  assert st[0] == 0, st                                     # the start barrier passed
  assert (st[1:] == ep_sync.OP_COMBINE + 8).any(), st       # a reducer timed out on row arrival
  assert set(st[1:]) <= {0, ep_sync.OP_COMBINE + 8}, st
  err = sim.err(0)
  assert err[0] == 1 and err[1] == ep_sync.OP_COMBINE + 8 and err[2] == 0, err
  assert (outs[0].a.view(np.uint32) == 0x5A5A5A5A).all()   # nothing reduced from missing rows


@pytest.mark.parametrize("taken", [False, True])
def test_combine_reduces_blocks_between_pushes(taken, interp):
  """combine_queue=3: a program reduces a block between its push items once every rank has
  pushed it. The interpreter runs the pushes (phase 4) rank after rank, so rank 1's programs
  find rank 0's rows all there: they must have claimed and reduced blocks before the reduce
  phase (their output rows final already), rank 0's none; phase 5 reduces the rest in column
  ranges (2 per block here, the second a partial one), and the result is queue 1's, bit for
  bit, and the reference's. ``taken``: rank 1's second range of block 0 claimed before the
  pushes (as by a program of the queue after them, on a GPU): the program that reduces block
  0 between its pushes must reduce its first range only, so the second stays unwritten."""
  world, t, h, k, e = 2, 96, 300, 4, 8
  rng = np.random.default_rng(5)
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=e,
                capacity=2 * t * k, alignment=1, num_sms=2, use_timer=False, combine_queue=3,
                itemsize=4)
  cx = plan.combine()
  assert cx["QUEUE"] == 3 and plan.combine_block_t == 32  # 3 blocks, 2 programs
  assert (cx["PARTS"], cx["PART_COLS"], cx["BLOCK_HR"]) == (2, 256, 128)
  sim = SimWorld(plan)
  idxs = routing(rng, "uniform", world, t, k, e)
  xs = [rng.standard_normal((t, h)).astype(np.float32) for _ in range(world)]
  ws = [rng.random((t, k)).astype(np.float32) for _ in range(world)]
  got = sim.dispatch(xs, idxs, ws)
  recv_pos = [g["recv_pos"].a for g in got]
  row_ws = [g["recv_w"].a for g in got]
  ys = [rng.standard_normal((plan.capacity, h)).astype(np.float32) for _ in range(world)]
  outs = [empty((t, h), np.float32) for _ in range(world)]
  sts = [empty((plan.status_size("combine_kernel"),), np.int32) for _ in range(world)]
  args = [[Arr(ys[r]), Arr(row_ws[r]), Arr(recv_pos[r]), outs[r], sts[r]] for r in range(world)]
  npg, nb, parts = plan.num_programs, 3, 2
  off = plan.region.block_flag_off + 4 * world * nb
  sim.launch(kc.combine_kernel, args, cx, ep_sync.OP_COMBINE, phases=[(2, 1), (3, 1)])
  if taken:
    sim.regions[1][off:off + 4 * nb * parts].view(np.int32)[1] = 1  # block 0, range 1
  sim.epoch -= 1  # the pushes continue the same launch
  sim.launch(kc.combine_kernel, args, cx, ep_sync.OP_COMBINE, phases=[(4, npg)])
  claims = [sim.regions[r][off:off + 4 * nb * parts].view(np.int32).reshape(nb, parts).copy()
            for r in range(world)]
  assert not claims[0].any(), claims        # rank 0 pushed first: rank 1's rows not there yet
  assert claims[1][0].all(), claims         # rank 1: every rank's rows for early blocks were
  assert (claims[1].all(1) == claims[1].any(1)).all(), claims  # a block's ranges claimed at once
  early = [outs[r].a.copy() for r in range(world)]
  sim.epoch -= 1  # phase 5 continues the same launch
  sim.launch(kc.combine_kernel, args, cx, ep_sync.OP_COMBINE, phases=[(5, npg)])
  for st in sts:
    assert not st.a.any(), st.a
  final = [o.a.copy() for o in outs]
  want = SimWorld(dataclasses.replace(plan, combine_queue=1)).combine(ys, row_ws, recv_pos)
  if taken:  # nobody reduces a range claimed by a program that never does: garbage stays
    assert (final[1][:32, 256:].view(np.uint32) == 0x5A5A5A5A).all()
    assert (early[1][:32, 256:].view(np.uint32) == 0x5A5A5A5A).all()
    final[1][:32, 256:] = early[1][:32, 256:] = want[1][:32, 256:]
  assert_combine_matches_ref(final, ys, row_ws, recv_pos, world)
  for r in range(world):
    np.testing.assert_array_equal(final[r].view(np.uint32), want[r].view(np.uint32))
  for b in np.flatnonzero(claims[1].all(1)):  # reduced during the pushes: final then already
    rows = slice(32 * b, 32 * (b + 1))
    np.testing.assert_array_equal(early[1][rows].view(np.uint32), want[1][rows].view(np.uint32))
  assert (early[0].view(np.uint32) == 0x5A5A5A5A).all()   # rank 0 reduced nothing before


def test_receivers_do_not_take_stale_bytes_for_arrived_blocks(interp):
  """The block flags live in the config-dependent part of the region, which another config's
  rows may have filled: run the receivers BEFORE the senders (as a slow peer would let them on
  a GPU) and they must wait (and here time out), not expand garbage."""
  plan = EPPlan(world=2, num_tokens=8, max_tokens=8, hidden=16, topk=2, num_experts=4,
                capacity=32, alignment=1, num_sms=4, use_timer=False)
  sim = SimWorld(plan)
  sim.timeout_ns = 5_000
  rng = np.random.default_rng(3)
  idxs = routing(rng, "uniform", 2, 8, 2, 4)
  outs = [dict(recv_x=empty((32, 16), np.float32), recv_w=empty((32,), np.float32),
               recv_pos=empty((2, 8, 2), np.int32), gs=empty((2,), np.int32),
               go=empty((2,), np.int32), nrecv=empty((1,), np.int32),
               ndrop=empty((1,), np.int32), hist=empty((plan.num_blocks, 4), np.int32),
               base=empty((plan.base_rows, 4), np.int32),
               status=empty((plan.status_size("dispatch_kernel"),), np.int32)) for _ in range(2)]
  names = ("recv_x", "recv_w", "recv_pos", "gs", "go", "nrecv", "ndrop", "hist", "base", "status")
  args = [[Arr(np.ones((8, 16), np.float32)), Arr(idxs[r]), Arr(np.ones((8, 2), np.float32))]
          + [outs[r][n] for n in names] for r in range(2)]
  ns, nr = plan.num_senders, plan.num_receivers
  sim.launch(kd.dispatch_kernel, args, plan.dispatch(False), ep_sync.OP_DISPATCH,
             phases=[(1, ns + nr), (7, ns + nr), (2, 1), (3, 1), (5, nr)])
  for r in range(2):
    st = outs[r]["status"].a
    # The receiver owning the (only) block waited for it and timed out; none expanded garbage.
    assert (st[1 + ns:] == ep_sync.OP_DISPATCH + 8).any(), st
    assert set(st[1 + ns:]) <= {0, ep_sync.OP_DISPATCH + 8}, st


def test_fingerprint_mismatch_skips_the_op_on_every_rank(interp):
  """Ranks that disagree about an op (another config, token count or op: another fingerprint)
  are refused by the start barrier on every rank: an error record naming both ranks, the op's
  programs skip their work (nothing written, no wait), and the next agreeing op works."""
  plan = EPPlan(world=3, num_tokens=6, max_tokens=6, hidden=16, topk=2, num_experts=6,
                capacity=40, alignment=1, num_sms=3, use_timer=False)
  sim = SimWorld(plan)
  rng = np.random.default_rng(7)
  idxs = routing(rng, "uniform", 3, 6, 2, 6)
  xs = [rng.standard_normal((6, 16)).astype(np.float32) for _ in range(3)]
  ws = [rng.random((6, 2)).astype(np.float32) for _ in range(3)]
  outs = [dict(recv_x=empty((40, 16), np.float32), recv_w=empty((40,), np.float32),
               recv_pos=empty((3, 6, 2), np.int32), gs=empty((3,), np.int32),
               go=empty((3,), np.int32), nrecv=empty((1,), np.int32),
               ndrop=empty((1,), np.int32), hist=empty((plan.num_blocks, 6), np.int32),
               base=empty((plan.base_rows, 6), np.int32),
               status=empty((plan.status_size("dispatch_kernel"),), np.int32)) for _ in range(3)]
  names = ("recv_x", "recv_w", "recv_pos", "gs", "go", "nrecv", "ndrop", "hist", "base", "status")
  args = [[Arr(xs[r]), Arr(idxs[r]), Arr(ws[r])] + [outs[r][n] for n in names] for r in range(3)]
  sim.launch(kd.dispatch_kernel, args, plan.dispatch(False), ep_sync.OP_DISPATCH,
             fingerprints=[11, 11, 12])
  code = ep_sync.OP_DISPATCH + 8 * ep_sync.PHASE_MISMATCH
  for r in range(3):
    assert outs[r]["status"].a[0] == code, outs[r]["status"].a
    assert not outs[r]["status"].a[1:].any()               # the programs skipped, no timeout
    assert (outs[r]["recv_x"].a.view(np.uint8) == 0x5A).all()  # nothing written
    err = sim.err(r)
    assert list(err[:3]) == [1, code, r] and err[3] == (2 if r < 2 else 0), list(err)
  msg = ep_sync.describe_error(sim.err(0))
  assert "jax_ep.dispatch: rank 0 and rank 2 disagree" in msg and "EPConfig" in msg, msg
  # The ranks' counters stayed in step: an agreeing op afterwards is correct.
  got = sim.dispatch(xs, idxs, ws)
  want = ref_dispatch(xs, idxs, ws, 3, 2, 40, 1)
  for r in range(3):
    assert not got[r]["status"].a.any()
    np.testing.assert_array_equal(got[r]["recv_x"].a, want[r]["recv_x"])


# -- the JAX backend: lowering for CUDA on this machine (no GPU needed) -------------------------

def test_triton_step_lowers_to_our_custom_calls_and_no_all_to_all(monkeypatch, tmp_path):
  """A jitted dispatch -> expert -> combine step with its gradient, triton backend, lowered for
  CUDA: every kernel compiles for sm_90, the HLO holds our FFI launches and no all-to-all."""
  import re

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jax_ep
  from jax_ep.backends import triton as tb

  monkeypatch.setenv("JAX_EP_CACHE_DIR", str(tmp_path / "kernel_cache"))
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "0")  # a host callback cannot lower for CUDA here
  from jax_ep import runtime
  world = 4
  # Pretend the runtime is up (lowering needs no GPU and bakes no addresses into the HLO).
  monkeypatch.setattr(tb, "check_usable", lambda config: None)
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "world_size", lambda: world)
  if len(jax.devices()) < world:
    pytest.skip(f"needs {world} devices")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:world]), ("ep",))
  cfg = jax_ep.EPConfig(num_experts=8, topk=2, hidden=256, max_tokens_per_rank=64,
                        capacity=96, expert_alignment=8, backend="triton")

  def step(x, idx, w):
    def loss(x, w):
      recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
      y = recv_x * 2.0
      out = jax_ep.combine(y, layout, config=cfg)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(x, w)

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
  args = (jax.ShapeDtypeStruct((world * 64, 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((world * 64, 2), jnp.int32),
          jax.ShapeDtypeStruct((world * 64, 2), jnp.float32))
  text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  names = re.findall(r'kernel_name = "(\w+)"', text)
  # One launch per op: dispatch, combine; backward: dispatch_rows, combine, gather.
  assert sorted(names) == sorted(["dispatch_kernel", "combine_kernel", "dispatch_rows_kernel",
                                  "combine_kernel", "gather_kernel"]), names
  assert "all_to_all" not in text and "all-to-all" not in text
  # Pull 4 (the default outside the peer provider; here there is none): dispatch and
  # dispatch_rows ask the handler to copy their x (input 0) into ROWS[rank] of the region
  # first; the other launches do not. Pull 2: none does.
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "2")
  f2 = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
  text2 = f2.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text2.count("stage_arg = -1 : i64") == len(names)
  monkeypatch.delenv("JAX_EP_DISPATCH_PULL")
  rows = tb._plan(cfg, world, 64, jnp.bfloat16).region.rows_off
  for call in re.findall(r"stablehlo.custom_call @jax_ep_triton_launch.*", text):
    name = re.search(r'kernel_name = "(\w+)"', call).group(1)
    staged = name in ("dispatch_kernel", "dispatch_rows_kernel")
    assert ("stage_arg = 0 : i64" in call) == staged, (name, call)
    if staged:
      assert f"stage_offset = {rows} : i64" in call and \
          f"stage_rank_stride = {64 * 256 * 2} : i64" in call, call
  # With timeout checks on (the default), each op adds one host callback on its statuses; the
  # step still lowers (here for the CPU platform, where host callbacks lower).
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "1")
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=(P("ep"),) * 2))
  text = f.trace(*args).lower().as_text()
  assert text.count("kernel_name = ") == len(names)
  assert "callback" in text


# -- the JAX backend end to end on the CPU: launches run by the interpreter ----------------------

class _InterpretedLauncher:
  """Stands in for ``jax_ep.launch.triton_call``: a ``jax.pure_callback`` that runs the kernel
  in the interpreter for every simulated rank with the handler's parameter ABI (inputs, outputs,
  sym_table, rank, world, epoch, scalars). Used under ``jax.vmap(axis_name="ep")``, where one
  callback sees every rank's operands at once and runs the launch phase by phase over all
  ranks (``phases_of``), as SimWorld does."""

  def __init__(self, kernels_ns, world: int, region_bytes: int):
    self.mods = kernels_ns
    self.world = world
    self.regions = [np.zeros(region_bytes, np.uint8) for _ in range(world)]
    self.table = Arr(np.array([r.ctypes.data for r in self.regions], np.int64))
    self.launches = []
    self.epoch = 0

  def _interpreted(self, kernel):
    for mod in (self.mods.dispatch, self.mods.combine):
      fn = getattr(mod, kernel.__name__, None)
      if fn is not None:
        return fn
    raise KeyError(kernel.__name__)

  def __call__(self, kernel, *inputs, out_shapes, grid, num_warps=4, num_stages=3,
               constexprs=None, scalars=(), symmetric=False, symmetric_bytes=0, stage=None,
               name=None):
    import jax
    from jax_ep import runtime
    # The handler's rule: the launch names the bytes it may touch (exchange area + region);
    # a runtime region smaller than that is refused. Here the region is exactly what the
    # config needs, so the launch must ask for exactly the exchange area plus it.
    assert symmetric, kernel.__name__
    assert symmetric_bytes - runtime.EXCHANGE_BYTES == self.regions[0].size, (
        kernel.__name__, symmetric_bytes)
    if isinstance(out_shapes, jax.ShapeDtypeStruct):
      out_shapes = (out_shapes,)
    out_shapes = tuple(out_shapes)
    fn = self._interpreted(kernel)
    cx = dict(constexprs or {})
    cx["USE_TIMER"] = False  # no %globaltimer in the interpreter: spin counts instead
    phases = phases_of(kernel.__name__, cx)
    scal = [int(v[0]) if isinstance(v, tuple) else int(v) for v in scalars]
    world = self.world
    self.launches.append(kernel.__name__)

    def host(*arrays):
      arrays = [np.ascontiguousarray(np.asarray(a)) for a in arrays]
      if any(a.shape[:1] != (world,) for a in arrays):
        raise AssertionError(f"{kernel.__name__}: operands not batched over the {world} ranks: "
                             f"{[a.shape for a in arrays]}")
      outs = [empty((world,) + tuple(s.shape), s.dtype).a for s in out_shapes]
      self.epoch += 1
      if stage is not None:  # the handler's copy of an input into each rank's region
        stage_copy(self.regions, arrays[stage[0]], stage, range(world))
      for phase, g in phases:
        for r in range(world):
          # Arr(o[r]) wraps a view of the batch: the kernel writes into it.
          args = [Arr(a[r]) for a in arrays] + [Arr(o[r]) for o in outs]
          fn[(g,)](*args, self.table, r, world, self.epoch, *scal, **{**cx, "PHASE": phase})
      return tuple(outs)

    return jax.pure_callback(host, out_shapes, *inputs, vmap_method="broadcast_all")


@pytest.mark.parametrize("world,t,h,k,e,cap,align,dtype,provider,pull", [
    (2, 12, 64, 2, 4, None, 1, "float32", "nvshmem", None),
    (4, 9, 40, 3, 8, 10, 4, "bfloat16", "peer", None),       # drops + alignment
    (2, 20, 32, 8, 8, None, 1, "float32", "peer", None),     # K = 8: > 4 rows on one rank
    (4, 9, 40, 3, 8, 10, 4, "bfloat16", "nvshmem", 2),       # senders staging the rows
])
def test_backend_end_to_end_matches_xla(world, t, h, k, e, cap, align, dtype, provider, pull,
                                        interp, monkeypatch):
  """jax_ep.dispatch -> expert -> jax_ep.combine and its gradients with the triton backend
  (kernels interpreted, W ranks under vmap) equal the xla backend's: dispatch bit for bit,
  combine and gradients within float tolerance. Checks the launch ABI and layout wiring, and
  each provider's dispatch (peer: the rows loaded from the peers' x itself; nvshmem: from the
  copy of x the launcher puts in the region first, or with pull 2 the senders' copies)."""
  import jax
  import jax.numpy as jnp

  import jax_ep
  from jax_ep import launch, runtime
  from jax_ep.backends import triton as tb

  rng = np.random.default_rng(world * 100 + t)
  base = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t + 2,
                         capacity=cap, expert_alignment=align)
  launcher = _InterpretedLauncher(interp, world, tb.symmetric_bytes(base, world))
  monkeypatch.setattr(launch, "triton_call", launcher)
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "0")
  monkeypatch.setattr(tb, "check_usable", lambda config: None)
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "world_size", lambda: world)
  monkeypatch.setattr(runtime, "provider", lambda: provider)
  monkeypatch.delenv("JAX_EP_DISPATCH_PULL", raising=False)
  assert tb._plan(base, world, t).dispatch_pull == (3 if provider == "peer" else 4)
  if pull is not None:
    monkeypatch.setenv("JAX_EP_DISPATCH_PULL", str(pull))
    assert tb._plan(base, world, t).dispatch_pull == pull

  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  idx = np.stack(routing(rng, "skewed", world, t, k, e))                 # [W, T, K]
  x = jnp.asarray(rng.standard_normal((world, t, h)), dt)
  w = jnp.asarray(rng.random((world, t, k)), jnp.float32)

  def run(backend):
    import dataclasses
    cfg = dataclasses.replace(base, backend=backend)

    def fwd(x, idx, w):
      recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
      y = (recv_x.astype(jnp.float32) * 1.5 - 0.25).astype(recv_x.dtype)
      return recv_x, recv_w, layout, jax_ep.combine(y, layout, config=cfg)

    def loss(x, w, idx):
      recv_x, _, layout = jax_ep.dispatch(x, idx, w, config=cfg)
      y = jnp.tanh(recv_x.astype(jnp.float32)).astype(recv_x.dtype)
      out = jax_ep.combine(y, layout, config=cfg)
      return jnp.sum(out.astype(jnp.float32) * jnp.cos(x.astype(jnp.float32)))

    outs = jax.jit(jax.vmap(fwd, axis_name="ep"))(x, idx, w)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), axis_name="ep"))(x, w, idx)
    return jax.tree.map(np.asarray, (outs, grads))

  (rx_x, rw_x, lay_x, out_x), g_x = run("xla")
  (rx_t, rw_t, lay_t, out_t), g_t = run("triton")
  assert sorted(set(launcher.launches)) == ["combine_kernel", "dispatch_kernel",
                                            "dispatch_rows_kernel", "gather_kernel"]
  np.testing.assert_array_equal(np.asarray(rx_t).view(np.uint8), np.asarray(rx_x).view(np.uint8))
  np.testing.assert_array_equal(rw_t, rw_x)
  for name in ("group_sizes", "group_offsets", "num_recv_rows", "num_dropped", "num_invalid",
               "topk_idx", "recv_pos", "row_weights"):
    np.testing.assert_array_equal(getattr(lay_t, name), getattr(lay_x, name), err_msg=name)
  tol = dict(rtol=3e-2, atol=3e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out_t, np.float32), np.asarray(out_x, np.float32), **tol)
  for a, b in zip(g_t, g_x):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_zero_tokens_run_no_kernel_and_match_xla(monkeypatch):
  """T = 0 on every rank (static shapes): the triton backend launches nothing (XLA's sharding
  passes reject custom calls on zero-size operands on GPU) and returns the xla backend's
  outputs: empty groups, zero rows, and empty combine / gradients."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jax_ep
  from jax_ep import launch, runtime
  from jax_ep.backends import triton as tb

  world = 2
  if len(jax.devices()) < world:
    pytest.skip(f"needs {world} devices")
  calls = []
  monkeypatch.setattr(launch, "triton_call", lambda *a, **k: calls.append(a) or 1 / 0)
  monkeypatch.setattr(tb, "check_usable", lambda config: None)
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "world_size", lambda: world)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:world]), ("ep",))
  base = jax_ep.EPConfig(num_experts=4, topk=2, hidden=16, max_tokens_per_rank=4,
                         expert_alignment=2)

  def run(backend):
    cfg = dataclasses.replace(base, backend=backend)

    def step(x, idx, w):
      def loss(x, w):
        recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
        out = jax_ep.combine(recv_x * 2, layout, config=cfg)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(recv_w)
      recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
      gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
      return jax.tree.map(lambda a: a[None], (recv_x, recv_w, layout, gx, gw))

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep")))
    return jax.tree.map(np.asarray, f(jnp.zeros((0, 16), jnp.bfloat16),
                                      jnp.zeros((0, 2), jnp.int32),
                                      jnp.zeros((0, 2), jnp.float32)))

  want, got = run("xla"), run("triton")
  assert not calls
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
