"""GPU tests of the triton backend's dispatch / combine against the xla backend (2 or 4 GPUs).

Single process driving every visible GPU (peer provider), and, in ``test_multiprocess_*``, one
process per GPU (NVSHMEM provider; this file is also the worker script). For every case:
recv_x, recv_weights and every layout field equal the xla backend's bit for bit; combine matches
within bf16/f32 tolerance; all of it is identical over 20 runs; gradients of x and topk_weights
match; the jitted step's HLO holds our custom calls and no all-to-all. A rank whose peers never
arrive gets a TimeoutError naming the op and rank instead of hanging.

Outputs reach GBs (4 x 4096 x 7168), so every comparison runs on the devices
(``jax_ep.testing.assert_same``: counts of differing rows, first indices, largest difference) and
the 20 repeats compare on-device digests with the first run's; only a few numbers are fetched.

Run (all visible GPUs; needs libjax_ep_ffi.so, see docs/RUNTIME.md):
  python -m pytest tests/gpu/test_dispatch_combine_gpu.py -m gpu -x -q
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import zlib

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

# (T, H, E, K, capacity kind, alignment, routing, dtype)
CASES = [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (4096, 2048, 128, 8, None, 16, "zipf", "bfloat16"),
    (128, 7168, 256, 8, None, 1, "uniform", "bfloat16"),
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32"),
    (128, 128, 64, 4, "tiny", 16, "one_expert", "bfloat16"),   # capacity overflow: drops
    (128, 2048, 64, 4, "one", 1, "duplicates", "bfloat16"),    # C = 1: all but one row dropped
    (128, 128, 64, 4, None, 1, "empty", "bfloat16"),           # nothing selected
    (128, 128, 64, 4, None, 1, "empty_rank", "bfloat16"),      # one rank receives nothing
    (1, 128, 64, 4, None, 1, "uniform", "bfloat16"),
    (0, 128, 64, 4, None, 1, "uniform", "bfloat16"),
    (4096, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),     # skewed + C = T K / 2: overflow
]
DROPPING = ("half", "tiny", "one")  # capacity kinds whose cases must drop rows
# The region is sized for the largest shape used here.
SIZING = dict(num_experts=256, topk=8, hidden=7168, max_tokens_per_rank=4096)


def _case_id(c):
  return f"T{c[0]}-H{c[1]}-E{c[2]}-K{c[3]}-cap{c[4]}-A{c[5]}-{c[6]}-{c[7]}"


def _config(case, world, backend):
  import jax_ep
  from jax_ep import testing
  t, h, e, k, cap, align, _, _ = case
  # timeout_s: generous, as processes may reach their first kernel seconds apart (compiles).
  base = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=max(t, 1),
                         expert_alignment=align, backend=backend, timeout_s=120.0)
  return testing.with_capacity(base, world, cap)


def _inputs(case, world, seed):
  """Global ``[W*T, H]`` x, ``[W*T, K]`` idx and weights (numpy)."""
  import ml_dtypes
  from jax_ep import testing
  t, h, e, k, _, _, routing, dtype = case
  rng = np.random.default_rng(seed)
  idx = np.concatenate([testing.make_routing(rng, routing, t, e, k, world)
                        for _ in range(world)]) if t else np.zeros((0, k), np.int32)
  dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  x = rng.standard_normal((world * t, h), dtype=np.float32).astype(dt)
  w = rng.random((world * t, k)).astype(np.float32)
  return x, idx.astype(np.int32), w


def _step_fns(mesh, cfg):
  """Jitted per-backend functions: fwd -> tuple named testing.OUTPUT_NAMES (recv_x, recv_w,
  every layout field, combine of 1.5 recv_x - 0.25), each ``[W, ...]``; grads -> (dx, d_w)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jax_ep
  from jax_ep import testing

  spec = P("ep")

  def loss(x, idx, w):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=cfg)
    y = jnp.tanh(recv_x.astype(jnp.float32)).astype(recv_x.dtype)
    out = jax_ep.combine(y, layout, config=cfg)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(x.astype(jnp.float32)))

  def grads(x, idx, w):
    gx, gw = jax.grad(loss, argnums=(0, 2))(x, idx, w)
    return gx, gw

  f_fwd = testing.device_fwd_fn(cfg, mesh)
  f_grad = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 2))
  return f_fwd, f_grad


def compare_case(case, mesh, world, put, seed=0, repeats=20) -> dict:
  """Run one case on both backends; raise AssertionError on any mismatch. ``put``: numpy ->
  global sharded array. Every comparison runs on the devices; a mismatch's message names the
  array, the count of differing rows and elements and the first row indices."""
  from jax_ep import testing
  t0 = time.time()
  name = _case_id(case)
  x, idx, w = _inputs(case, world, seed)
  args = (put(x), put(idx), put(w))
  del x
  outs = {}
  for backend in ("xla", "triton"):
    cfg = _config(case, world, backend)
    f_fwd, f_grad = _step_fns(mesh, cfg)
    outs[backend] = (f_fwd(*args), f_grad(*args))
    if backend == "triton":
      text = f_fwd.lower(*args).as_text()
      # T = 0 launches nothing (no rank has rows to move); every other T runs our kernels.
      assert ("jax_ep_triton_launch" in text) == (case[0] > 0), "custom call present iff T > 0"
      assert "all_to_all" not in text and "all-to-all" not in text, "triton step has all-to-all"
      first = outs[backend][0]
      first_digest = testing.device_digest(first)
      for i in range(repeats - 1):  # dispatch and combine repeat bit for bit
        again = f_fwd(*args)
        if not np.array_equal(testing.device_digest(again), first_digest):
          testing.assert_same({n: (a, b, None) for n, a, b in
                               zip(testing.OUTPUT_NAMES, again, first)},
                              context=f"{name}: triton run {i + 2} differs from run 1")
          raise AssertionError(f"{name}: triton run {i + 2}: digests differ from run 1's but no "
                               f"element does")
        del again
  t_run = time.time() - t0
  fwd_t, (gx_t, gw_t) = outs["triton"]
  fwd_x, (gx_x, gw_x) = outs["xla"]
  bf16 = case[7] == "bfloat16"
  tol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-5)
  gtol = (3e-2, 3e-2) if bf16 else tol
  pairs = {n: (a, b, tol if n == "combine" else None)
           for n, a, b in zip(testing.OUTPUT_NAMES, fwd_t, fwd_x)}
  pairs["dx"] = (gx_t, gx_x, gtol)
  pairs["d_topk_weights"] = (gw_t, gw_x,
                             testing.weight_grad_tolerance(case[1], case[7]) if bf16 else gtol)
  diffs = testing.assert_same(pairs, context=f"{name} (triton vs xla)")
  counts = testing.to_host((fwd_t[testing.OUTPUT_NAMES.index("num_recv_rows")],
                            fwd_t[testing.OUTPUT_NAMES.index("num_dropped")]))
  res = {"recv_rows": int(np.sum(counts[0])), "dropped": int(np.sum(counts[1])),
         "combine_bit_equal": diffs["combine"].bit_equal,
         "combine_max_abs_err": diffs["combine"].max_err}
  if case[4] in DROPPING:
    assert res["dropped"] > 0, f"{name}: capacity {case[4]!r} dropped no rows"
  print(f"{name}: ok in {time.time() - t0:.1f} s (runs {t_run:.1f} s); rows {res['recv_rows']}, "
        f"dropped {res['dropped']}; combine bit-equal to xla: {res['combine_bit_equal']} "
        f"(max |diff| {res['combine_max_abs_err']:.3g})", flush=True)
  return res


# -- single process, every visible GPU (peer provider) ---------------------------------------------

def _gpus():
  try:
    import jax
    return jax.devices("gpu")
  except Exception:  # noqa: BLE001
    return []


@pytest.fixture(scope="module")
def any_world():
  """(mesh, W) over every visible GPU under the peer provider, its runtime initialized for
  SIZING; one GPU included (W = 1: no NVLink, the same kernels and layout)."""
  gpus = _gpus()
  if not gpus:
    pytest.skip("needs a CUDA GPU")
  from jax_ep import EPConfig, _ffi, runtime
  if not _ffi.available():
    pytest.skip("libjax_ep_ffi.so not built (see docs/RUNTIME.md)")
  os.environ.setdefault("JAX_EP_CHECK_TIMEOUTS", "1")
  runtime.shutdown()
  runtime.initialize([EPConfig(**SIZING)], provider="peer", devices=gpus)
  import jax
  mesh = jax.sharding.Mesh(np.array(gpus), ("ep",))
  yield mesh, len(gpus)
  runtime.shutdown()


@pytest.fixture(scope="module")
def peer_world(any_world):
  """any_world's mesh and runtime, where there are 2 or more GPUs."""
  if any_world[1] < 2:
    pytest.skip("needs 2 or more CUDA GPUs")
  return any_world


def _put_fetch(mesh):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  sharding = NamedSharding(mesh, P("ep"))
  return (lambda a: jax.device_put(a, sharding)), (lambda a: np.asarray(jax.device_get(a)))


def _put(mesh):
  return _put_fetch(mesh)[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_xla_backend(case, any_world):
  mesh, world = any_world
  compare_case(case, mesh, world, _put(mesh), seed=zlib.crc32(_case_id(case).encode()))


@pytest.mark.parametrize("frac,order,share", [
    (0.5, 0, 1.0), (0.5, 1, 0.6), (0.375, 1, 0.75), (0.5, 0, 0.6), (0.625, 2, 1.0),
    (0.5, 2, 1.0), (0.5, 3, 1.0), (0.4375, 3, 1.0), (0.375, 3, 1.0)])
def test_dispatch_tuning_variants_match_xla(frac, order, share, peer_world, monkeypatch):
  """The dispatch knobs the benchmark's sweep times without comparing (sender fraction,
  expand order 0/1/2/3 with 2 and 3 = the work queue, receiver share) give xla's results too."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_SENDER_FRACTION", str(frac))
  monkeypatch.setenv("JAX_EP_EXPAND_ORDER", str(order))
  monkeypatch.setenv("JAX_EP_RECEIVER_SHARE", str(share))
  case = (1024, 2048, 64, 8, None, 8, "zipf", "bfloat16")
  compare_case(case, mesh, world, _put(mesh), seed=31 + order, repeats=3)


@pytest.mark.parametrize("levels", [1, 4])
def test_expand_levels_match_xla(levels, peer_world, monkeypatch):
  """Dispatch's expansion by levels (JAX_EP_EXPAND_LEVELS; opt-in) gives xla's results: with
  one level most blocks take the all-levels path, with four few do."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_EXPAND_LEVELS", str(levels))
  case = (1024, 7168, 256, 8, None, 1, "zipf", "bfloat16")
  compare_case(case, mesh, world, _put(mesh), seed=61 + levels, repeats=3)


@pytest.mark.parametrize("acc_bytes,stages,queue,wide,tokens", [
    (131072, 2, 1, 1, 0), (65536, 3, 1, 1, 0), (32768, 6, 1, 1, 0), (65536, 4, 0, 1, 0),
    (65536, 4, 2, 1, 0), (65536, 4, 1, 0, 0), (65536, 4, 1, 1, 16), (65536, 4, 1, 1, 64)])
def test_combine_tile_variants_match_xla(acc_bytes, stages, queue, wide, tokens, peer_world,
                                         monkeypatch):
  """Combine's other chunk budgets and pipeline depths (the default is 64 KB x 4; 128 KB x 2 was
  the default until 2026-11-21 16:25), its reduce after all pushes (JAX_EP_COMBINE_QUEUE=0,
  the default before 2d6b274, 2026-11-21 18:38), the queue with flags raised two items at a
  time (2), and one chunk width for both push paths (JAX_EP_COMBINE_WIDE=0, the default until
  2026-11-21 21:37), and 16- or 64-token combine blocks (JAX_EP_COMBINE_TOKENS; 32 at top-8
  since session 17, 16 before) give xla's results too, gradients included."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_COMBINE_ACC_BYTES", str(acc_bytes))
  monkeypatch.setenv("JAX_EP_COMBINE_STAGES", str(stages))
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", str(queue))
  monkeypatch.setenv("JAX_EP_COMBINE_WIDE", str(wide))
  monkeypatch.setenv("JAX_EP_COMBINE_TOKENS", str(tokens))
  case = (1024, 7168, 256, 8, None, 1, "zipf", "bfloat16")
  if tokens == 64:  # 1000 tokens: the last block partial, drops
    case = (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16")
  compare_case(case, mesh, world, _put(mesh), seed=47 + stages + 10 * wide + tokens,
               repeats=3)


@pytest.mark.parametrize("queue,parts,case", [
    (1, 0, (128, 7168, 256, 8, None, 1, "uniform", "bfloat16")),
    (0, 3, (128, 7168, 256, 8, None, 1, "zipf", "bfloat16")),
    (2, 0, (100, 2048, 64, 4, "half", 8, "zipf", "float32")),     # partial block, drops
    (1, 5, (100, 2048, 64, 4, "half", 8, "zipf", "bfloat16"))],
    ids=["queue1-auto", "queue0-3", "queue2-auto-f32-drops", "queue1-5-drops"])
def test_combine_column_parts_match_xla(queue, parts, case, any_world, monkeypatch):
  """Combine at few tokens with its push items and reduce blocks in column ranges
  (JAX_EP_COMBINE_PARTS; 0 = the plan's choice, which at W <= 2 splits these cases), under
  the three queue modes that take them, gives xla's results, gradients included."""
  from jax_ep.backends import triton as tb
  mesh, world = any_world
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", str(queue))
  monkeypatch.setenv("JAX_EP_COMBINE_PARTS", str(parts))
  pp = tb._plan(_config(case, world, "triton"), world, case[0],
                np.float32 if case[7] == "float32" else "bfloat16").combine()["PUSH_PARTS"]
  assert pp > 1 or (parts == 0 and world > 2), pp  # the ranges are what this test runs
  compare_case(case, mesh, world, _put(mesh), seed=131 + queue + parts, repeats=3)


@pytest.mark.parametrize("split,narrow,tokens,case", [
    (0, 0, 16, (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")),
    (1, 0, 16, (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")),
    (1, 1, 32, (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16")),
    (0, 1, 16, (1024, 7168, 256, 8, None, 1, "uniform", "bfloat16")),
    (0, 0, 16, (128, 2048, 64, 4, None, 8, "with_unselected", "float32"))],
    ids=["whole-16", "split-16", "split-narrow-32", "narrow-16", "f32-16"])
def test_combine_push_paths_match_xla(split, narrow, tokens, case, peer_world, monkeypatch):
  """Combine's push paths give xla's results, gradients included. The default since session
  17 is split in 32-token blocks (test_matches_xla_backend runs it); here: blocks with a token
  of more than 4 rows here wholly on the all-TOPK path (JAX_EP_COMBINE_SPLIT=0), split (an
  item's few such tokens in a tile of their own: ~35 % of 16-token items at W = 4, uniform
  top-8 of 256; at W = 2 most items have more such tokens than the tile and keep the all-TOPK
  path) and JAX_EP_COMBINE_NARROW=1 (items whose tokens have <= 2 rows here on a 2-level path:
  a third of them at W = 8, few at W = 4; the skewed case with drops has some at any W), in
  16- and 32-token blocks."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_COMBINE_SPLIT", str(split))
  monkeypatch.setenv("JAX_EP_COMBINE_NARROW", str(narrow))
  monkeypatch.setenv("JAX_EP_COMBINE_TOKENS", str(tokens))
  compare_case(case, mesh, world, _put(mesh), seed=97 + tokens + 3 * narrow + 7 * split,
               repeats=3)


@pytest.mark.parametrize("dpull,case", [
    (1, (1024, 7168, 256, 8, None, 1, "zipf", "bfloat16")),
    (1, (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")),
    (0, (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")),
    (1, (4096, 2048, 64, 8, "half", 16, "zipf", "bfloat16")),     # overflow: drops
    (1, (128, 128, 64, 4, None, 1, "empty_rank", "bfloat16")),
    (1, (1, 128, 64, 4, None, 1, "uniform", "bfloat16")),
    (2, (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")),
    (2, (4096, 2048, 64, 8, "half", 16, "zipf", "bfloat16"))],
    ids=lambda v: _case_id(v) if isinstance(v, tuple) else str(v))
def test_pull_modes_match_xla(dpull, case, peer_world, monkeypatch):
  """Rows staged by the senders and loaded by the receivers (JAX_EP_DISPATCH_PULL=1; 2: the
  senders in groups, the default until session 18, and the nvshmem provider's until the
  launcher's copy of x, pull 4, replaced it) or stored into the peers by the senders (0): xla's results,
  bit for bit for dispatch, gradients included, over repeated calls. (The peer provider's
  default, 3, runs in test_matches_xla_backend and test_pull_from_x_matches_xla.)"""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", str(dpull))
  compare_case(case, mesh, world, _put(mesh), seed=71 + dpull, repeats=3)


@pytest.mark.parametrize("group,pull,zq", [(2, 1, 0), (4, 0, 0), (1, 1, 0), (4, 1, 1),
                                          (1, 0, 1), (4, 2, 2), (2, 2, 1)])
def test_expand_groups_match_xla(group, pull, zq, peer_world, monkeypatch):
  """Expansion queue items of several token blocks (JAX_EP_EXPAND_GROUP) or one, with rows
  pushed or pulled (2: senders copying whole groups), the zero rows as queue items or not (2:
  a quarter of them first) (JAX_EP_ZERO_QUEUE): xla's results."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_EXPAND_GROUP", str(group))
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", str(pull))
  monkeypatch.setenv("JAX_EP_ZERO_QUEUE", str(zq))
  case = (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16")
  if group == 4:  # 1000 tokens: the last item holds fewer blocks
    case = (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16")
  compare_case(case, mesh, world, _put(mesh), seed=83 + group + 5 * zq, repeats=3)


@pytest.mark.parametrize("case", [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (4096, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),     # overflow: drops
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32"),
    (128, 128, 64, 4, None, 1, "empty_rank", "bfloat16"),
    (1, 128, 64, 4, None, 1, "uniform", "bfloat16"),
    (1024, 7168, 256, 8, None, 1, "zipf", "bfloat16")], ids=_case_id)
def test_pull_from_x_matches_xla(case, peer_world, monkeypatch):
  """JAX_EP_DISPATCH_PULL=3 (the receivers load each peer's rows from its x itself, over
  NVLink, with no staging copy; each rank's launch ends once no peer reads its x any more):
  xla's results, bit for bit for dispatch (the backward's dispatch_rows too), gradients
  included, over repeated calls in which XLA frees and reuses the x buffers."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "3")
  compare_case(case, mesh, world, _put(mesh), seed=151, repeats=3)


@pytest.mark.parametrize("case", [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (4096, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),     # overflow: drops
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32"),
    (128, 128, 64, 4, None, 1, "empty_rank", "bfloat16"),
    (1, 128, 64, 4, None, 1, "uniform", "bfloat16")], ids=_case_id)
def test_pull_staged_matches_xla(case, peer_world, monkeypatch):
  """JAX_EP_DISPATCH_PULL=4 (the launcher copies x into the rank's region by the copy
  engines before the kernel; the receivers load the peers' rows from those copies; each
  rank's launch ends once no peer reads its copy any more, since the next launch's copy
  overwrites it before any barrier): xla's results, bit for bit for dispatch (the backward's
  dispatch_rows too), gradients included, over repeated calls. (The nvshmem provider's
  default: test_multiprocess_matches_xla_backend runs it with one process per GPU.)"""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "4")
  compare_case(case, mesh, world, _put(mesh), seed=173, repeats=3)


@pytest.mark.parametrize("case", [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),        # partial last block, drops
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32")], ids=_case_id)
def test_combine_prefetch_matches_xla(case, peer_world, monkeypatch):
  """JAX_EP_COMBINE_PREFETCH=1 (each push item's slot positions loaded during the previous
  item's chunk loops): xla's results, gradients included, over repeated calls."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_COMBINE_PREFETCH", "1")
  compare_case(case, mesh, world, _put(mesh), seed=173, repeats=3)


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("case", [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),        # partial last block, drops
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32"),
    (1, 128, 64, 4, None, 1, "uniform", "bfloat16")], ids=_case_id)
def test_combine_reduce_between_pushes_matches_xla(case, prefetch, peer_world, monkeypatch):
  """JAX_EP_COMBINE_QUEUE=3 (a program reduces the blocks every rank has pushed between its
  own push items, claims deciding who reduces a block): xla's results, gradients included,
  over repeated calls."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "3")
  monkeypatch.setenv("JAX_EP_COMBINE_PREFETCH", str(prefetch))
  compare_case(case, mesh, world, _put(mesh), seed=191 + prefetch, repeats=3)


@pytest.mark.parametrize("case", [
    (4096, 7168, 256, 8, "balanced", 1, "uniform", "bfloat16"),
    (1000, 2048, 64, 8, "half", 16, "zipf", "bfloat16"),        # partial last block, drops
    (1024, 7168, 256, 8, None, 1, "zipf", "bfloat16"),           # skewed: both ways taken
    (128, 2048, 64, 4, None, 8, "with_unselected", "float32"),
    (1, 128, 64, 4, None, 1, "uniform", "bfloat16")], ids=_case_id)
def test_combine_halves_matches_xla(case, peer_world, monkeypatch):
  """JAX_EP_COMBINE_HALVES=1 (a push item with a token of many rows here as two half tiles,
  its tokens ordered by rows here): xla's results, gradients included, over repeated calls."""
  mesh, world = peer_world
  monkeypatch.setenv("JAX_EP_COMBINE_HALVES", "1")
  compare_case(case, mesh, world, _put(mesh), seed=223, repeats=3)


def test_many_steps_in_one_program(peer_world):
  """Several dispatch/combine ops (and their backward) in one jitted program, called in a loop:
  the per-trace op chain keeps them ordered; results stay equal to xla's."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_ep
  mesh, world = peer_world
  put, fetch = _put_fetch(mesh)
  case = (256, 1024, 64, 4, None, 1, "uniform", "float32")
  x, idx, w = _inputs(case, world, 3)
  args = (put(x), put(idx), put(w))
  res = {}
  for backend in ("xla", "triton"):
    cfg = _config(case, world, backend)

    def layers(x, idx, w):
      def loss(x, w):
        h = x
        for i in range(3):
          recv_x, _, layout = jax_ep.dispatch(h, (idx + i) % cfg.num_experts, w, config=cfg)
          h = h + jax_ep.combine(jnp.sin(recv_x), layout, config=cfg)
        return jnp.sum(h * h)
      return jax.grad(loss, argnums=(0, 1))(x, w)

    f = jax.jit(jax.shard_map(layers, mesh=mesh, in_specs=(P("ep"),) * 3,
                              out_specs=(P("ep"),) * 2))
    outs = [jax.tree.map(fetch, f(*args)) for _ in range(5)]
    for o in outs[1:]:
      for a, b in zip(o, outs[0]):
        np.testing.assert_array_equal(a, b)
    res[backend] = outs[0]
  for a, b in zip(res["triton"], res["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_timeout_is_an_error_not_a_hang(peer_world, monkeypatch):
  """Rank 0 alone launches a combine (its peers never do): after ~1 x timeout (start barrier;
  the failed barrier aborts the op, so its programs do not wait again) its status output names
  the op, and ``check_timeouts()`` raises a
  TimeoutError naming op, rank and peer; no hang. The runtime is re-initialized afterwards
  (the ranks' op counters are out of step)."""
  import time

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from jax_ep import EPConfig, launch, runtime
  from jax_ep.backends import triton as tb
  from jax_ep.kernels import ep_sync
  from jax_ep.kernels.ep_plan import EPPlan
  mesh, world = peer_world
  one = jax.sharding.Mesh(np.array(list(mesh.devices)[:1]), ("ep",))
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "0")  # a raising host callback may abort
  t, h, k, c = 8, 128, 2, 32
  plan = EPPlan(world=world, num_tokens=t, max_tokens=t, hidden=h, topk=k, num_experts=8,
                capacity=c, alignment=1, num_sms=4)

  def alone(y, rw, pos):
    out, st = launch.triton_call(
        tb._kernels()[2].combine_kernel, y, rw, pos,
        out_shapes=(jax.ShapeDtypeStruct((t, h), jnp.float32),
                    jax.ShapeDtypeStruct((plan.status_size("combine_kernel"),), jnp.int32)),
        grid=(plan.grid("combine_kernel"),), constexprs=plan.combine(),
        scalars=((int(0.5e9), "i64"), (ep_sync.OP_COMBINE, "i32"), (1, "i32")),
        symmetric=True)
    return st

  f = jax.jit(jax.shard_map(alone, mesh=one, in_specs=(P(), P(), P()), out_specs=P(),
                            check_vma=False))
  t0 = time.time()
  status = np.asarray(jax.device_get(f(jnp.zeros((c, h), jnp.float32),
                                       jnp.zeros((c,), jnp.float32),
                                       -jnp.ones((world, t, k), jnp.int32))))
  assert time.time() - t0 < 60
  assert status[0] == ep_sync.OP_COMBINE, status                  # leader: start barrier
  assert not status[1:].any(), status  # the failed barrier aborts the op: nobody waits again
  with pytest.raises(TimeoutError, match=r"jax_ep.combine \(start barrier\): rank 0 timed out "
                                         r"waiting for rank 1"):
    tb.check_timeouts()
  with pytest.raises(TimeoutError, match=r"jax_ep.combine: rank 0 timed out"):
    tb._raise_timeout(status, 0, op="jax_ep.combine", timeout_s=0.5)
  runtime.shutdown()
  runtime.initialize([EPConfig(**SIZING)], provider="peer", devices=list(mesh.devices))


def test_step_compiled_for_a_larger_region_is_refused(peer_world):
  """A step compiled while the runtime had a large region, run after shutdown() and
  initialize() with a smaller config, is refused by the FFI handler (the launch carries the
  bytes it needs) with an error saying what to do, instead of writing past the region; a step
  traced for the new region then runs and equals xla."""
  import jax
  from jax_ep import EPConfig, runtime, testing
  mesh, world = peer_world
  devices = list(mesh.devices)
  put = _put(mesh)
  big = (128, 7168, 256, 8, None, 1, "uniform", "bfloat16")
  small = (128, 128, 64, 4, None, 1, "uniform", "bfloat16")
  x, idx, w = _inputs(big, world, 11)
  args = tuple(put(v) for v in (x, idx, w))
  f_big = testing.device_fwd_fn(_config(big, world, "triton"), mesh)
  jax.block_until_ready(f_big(*args))  # runs on the large region
  runtime.shutdown()
  try:
    runtime.initialize([_config(small, world, "triton")], provider="peer", devices=devices)
    refusal = r"symmetric memory per rank but the jax_ep runtime now has .* re-trace the step"
    with pytest.raises(Exception, match=refusal):
      jax.block_until_ready(f_big(*args))
    # The failed launch is also recorded on the step's side-effect token: JAX raises it once
    # more at the next effects barrier (seen on an H200, 2026-11-21); it must be the same one.
    try:
      jax.effects_barrier()
    except Exception as e:  # noqa: BLE001 -- checked below
      assert re.search(refusal, str(e), re.S), e
    compare_case(small, mesh, world, put, seed=12, repeats=2)
  finally:
    runtime.shutdown()
    runtime.initialize([EPConfig(**SIZING)], provider="peer", devices=devices)


# -- one process per GPU (NVSHMEM provider) --------------------------------------------------------

def _num_gpus() -> int:
  from jax_ep import testing
  return testing.ffi_gpu_count()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


MP_CASES = [CASES[0], CASES[3], CASES[4], CASES[9]]
MP_TIMEOUT_S = int(os.environ.get("JAX_EP_MP_TIMEOUT", "240"))  # below pytest's --timeout


def test_multiprocess_matches_xla_backend():
  world = _num_gpus()
  if world < 2:
    pytest.skip("needs 2 or more CUDA GPUs and libjax_ep_ffi.so")
  coord = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
  env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
  env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
  env.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(3 << 30))
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r),
                             str(world), coord], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
           for r in range(world)]
  outs = []
  deadline = time.time() + MP_TIMEOUT_S
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process dispatch/combine test timed out")
    outs.append(out)
  for r, out in enumerate(outs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, f"rank {r} printed no result:\n{out[-4000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in res, f"rank {r}:\n{res['error']}\n{out[-3000:]}"
    assert res["provider"] == "nvshmem" and res["cases"] == len(MP_CASES), res


def _worker(rank: int, world: int, coord: str) -> dict:
  import jax
  jax.distributed.initialize(coord, num_processes=world, process_id=rank,
                             local_device_ids=[rank])
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jax_ep import EPConfig, runtime
  res: dict = {"rank": rank}
  runtime.initialize([EPConfig(**SIZING)])
  res["provider"] = runtime.provider()
  devices = sorted(jax.devices(), key=lambda d: d.process_index)
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  sharding = NamedSharding(mesh, P("ep"))

  def put(a):
    t = a.shape[0] // world
    local = a[rank * t:(rank + 1) * t]
    return jax.make_array_from_process_local_data(sharding, local, a.shape)

  for i, case in enumerate(MP_CASES):
    compare_case(case, mesh, world, put, seed=100 + i, repeats=3)
  res["cases"] = len(MP_CASES)
  runtime.shutdown()
  return res


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "--worker":
  _rank, _world, _coord = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  try:
    _res = _worker(_rank, _world, _coord)
  except Exception:  # noqa: BLE001 -- report to the parent test
    _res = {"rank": _rank, "error": traceback.format_exc()}
  print("RESULT " + json.dumps(_res), flush=True)
