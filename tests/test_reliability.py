"""Reliability on CPU (xla backend): randomized soak, determinism, NaN isolation.

The CI share of the soak is small; ``scripts/soak.py`` runs the full 10,000 rounds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing
from conftest import cpu_mesh


def test_soak_ci_share(rng):
  seed = int(rng.integers(1 << 31))
  stats = testing.soak(rounds=150, seed=seed)
  assert stats["rounds"] == 150
  assert stats["dropped"] > 0 and stats["invalid"] > 0  # the pool really exercises both


def test_fixed_seed_repeats_identically():
  """The same seed gives the same output hash 20 times (fresh inputs, same compiled program)."""
  shape, kind = (4, 12, 16, 8, 3, 40, 8), "zipf"
  devices = jax.devices()
  hashes = {testing.output_hash(testing.soak_round(np.random.default_rng(1234), shape, kind,
                                                   devices)) for _ in range(20)}
  assert len(hashes) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_one_token_stays_in_that_token(rng, bad):
  ep_size, t, h, e, k = 4, 6, 8, 8, 3
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  mesh = cpu_mesh(ep_size)
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)
  idx = np.concatenate([testing.make_routing(rng, "zipf", t, e, k) for _ in range(ep_size)])
  weights = rng.random((ep_size * t, k)).astype(np.float32)
  w = rng.standard_normal((e, h, h)).astype(np.float32)
  poisoned = int(rng.integers(ep_size * t))
  x_bad = x.copy()
  x_bad[poisoned, int(rng.integers(h))] = bad

  def per_shard(x, idx, weights, w):
    def loss(x):
      recv_x, _, layout = jax_ep.dispatch(x, idx, weights, config=config)
      out = jax_ep.combine(jax_ep.grouped_matmul(recv_x, w, layout), layout, config=config)
      return jnp.sum(out), out
    g, out = jax.grad(loss, has_aux=True)(x)
    return out, g

  f = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"),) * 4,
                            out_specs=(P("ep"), P("ep"))))
  out_clean, g_clean = f(x, idx, weights, w)
  out_bad, g_bad = f(x_bad, idx, weights, w)
  others = np.arange(ep_size * t) != poisoned
  np.testing.assert_array_equal(np.asarray(out_bad)[others], np.asarray(out_clean)[others])
  np.testing.assert_array_equal(np.asarray(g_bad)[others], np.asarray(g_clean)[others])
  if np.any(idx[poisoned] >= 0):
    assert not np.all(np.isfinite(np.asarray(out_bad)[poisoned]))


# -- the device-side comparison and the GPU soak's code path, run on CPU devices ---------------

def test_compare_on_device_names_the_array_count_and_first_rows(rng):
  mesh = cpu_mesh(4)
  sharding = jax.sharding.NamedSharding(mesh, P("ep"))
  a = rng.standard_normal((4, 10, 6)).astype(np.float32)
  b = a.copy()
  b[2, 7, 3] += 1.0
  b[0, 1, 0] = np.nan
  i = np.arange(8, dtype=np.int32)
  pairs = {"recv_x": (jax.device_put(b, sharding), jax.device_put(a, sharding), None),
           "recv_pos": (jax.device_put(i + (i == 5), sharding), jax.device_put(i, sharding), None),
           "same": (jax.device_put(a, sharding), jnp.asarray(a), None),
           "empty": (jnp.zeros((4, 0, 3)), jnp.zeros((4, 0, 3)), (1e-3, 1e-3))}
  with pytest.raises(AssertionError) as info:
    testing.assert_same(pairs, context="case X")
  msg = str(info.value)
  assert msg.startswith("case X: mismatch:")
  assert "recv_x [4, 10, 6] float32: 2 of 40 rows" in msg and "[(0, 1), (2, 7)]" in msg
  assert "recv_pos [8] int32: 1 of 8 rows" in msg and "[(5,)]" in msg
  assert "same" not in msg and "empty" not in msg
  # within tolerance passes, bit equality is still reported
  close = a * (1 + 1e-7)
  diffs = testing.assert_same({"combine": (jnp.asarray(close), jnp.asarray(a), (1e-5, 1e-5))})
  assert diffs["combine"].ok and not diffs["combine"].bit_equal
  # digests: equal arrays (however sharded) agree, one changed element does not
  d1 = testing.device_digest((jax.device_put(a, sharding), i))
  d2 = testing.device_digest((jnp.asarray(a), jnp.asarray(i)))
  d3 = testing.device_digest((jnp.asarray(b), jnp.asarray(i)))
  np.testing.assert_array_equal(d1, d2)
  assert not np.array_equal(d1[0], d3[0]) and np.array_equal(d1[1], d3[1])


@pytest.fixture(scope="module")
def cpu_soak():
  return testing.DeviceSoak(jax.devices()[:4], "xla", testing.DEVICE_SOAK_SMALL_SHAPES)


def test_soak_routings_are_what_they_say():
  rng = np.random.default_rng(0)
  for kind in testing.DEVICE_SOAK_KINDS:
    for w, t, e, k in ((4, 5, 16, 3), (4, 0, 16, 2), (2, 9, 8, 8), (1, 3, 8, 2), (8, 6, 16, 4)):
      idx = testing.soak_routing(rng, kind, w, t, e, k)
      assert idx.shape == (w, t, k) and idx.dtype == np.int32
      flat = idx.reshape(-1, k)
      if kind in ("uniform", "zipf", "empty_rank", "overflow", "all_dropped"):
        assert ((flat >= 0) & (flat < e)).all(), kind
        if kind != "overflow" or e // w >= k:
          assert all(len(set(row)) == k for row in flat), kind
      if kind == "empty_rank" and w > 1 and t and e - e // w >= k:
        assert len(set((flat // (e // w)).ravel())) <= w - 1
      if kind == "overflow" and t:
        assert len(set((flat // (e // w)).ravel())) == 1
      if kind == "empty":
        assert (flat == -1).all()
      if kind == "invalid" and t * k >= 40:
        assert ((flat < -1) | (flat >= e)).any()


def test_device_soak_path_on_cpu(cpu_soak):
  """The GPU soak's path (xla against xla): every kind runs, nothing differs, repeats hash once."""
  res = testing.device_soak(60, 5, devices=cpu_soak.devices, soak=cpu_soak)
  assert res["error"] is None, res["error"]
  assert res["mismatches"] == 0 and res["rounds"] == 60
  assert res["combine"]["bit_for_bit"] and res["self_repeats"]["identical"] == 6
  assert res["dropped_rows"] > 0 and res["invalid_ids"] > 0
  hashes = testing.device_repeat_hashes(cpu_soak, 3, 5, shape=testing.DEVICE_SOAK_SMALL_SHAPES[2])
  assert len(set(hashes)) == 1
  again = testing.device_soak(60, 5, devices=cpu_soak.devices, soak=cpu_soak)
  assert again["soak_digest"] == res["soak_digest"]


def test_device_soak_reports_a_difference(cpu_soak, monkeypatch):
  shape = testing.DEVICE_SOAK_SMALL_SHAPES[1]
  fns = cpu_soak._get(shape)
  good = fns["test"]

  def bad(*args):
    out = list(good(*args))
    j = testing.OUTPUT_NAMES.index("group_sizes")
    out[j] = out[j] + 1
    return tuple(out)

  monkeypatch.setitem(fns, "test", bad)
  soak = testing.DeviceSoak(cpu_soak.devices, "xla", (shape,))
  soak._fns = cpu_soak._fns
  res = testing.device_soak(3, 0, devices=soak.devices, soak=soak)
  assert res["mismatches"] == 3 and res["error"] is None
  assert "group_sizes" in res["mismatch_details"][0]["arrays"][0]


def test_resource_check_with_a_stand_in_runtime(cpu_soak, monkeypatch):
  """resource_check's cycles and memory records run with a stand-in runtime (the real one needs
  GPUs): every cycle re-initializes and is followed by a correct op; errors say what to raise."""
  from jax_ep import runtime
  calls = []
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "initialize", lambda *a, **k: calls.append("initialize"))
  monkeypatch.setattr(runtime, "shutdown", lambda: calls.append("shutdown"))
  monkeypatch.setattr(runtime, "device_info", lambda d: {"bytes": 1 << 21, "epoch": 7})
  res = testing.resource_check(cpu_soak, shape=testing.DEVICE_SOAK_SMALL_SHAPES[1], steps=12,
                               cycles=2)
  assert not res["failures"], res["failures"]
  assert calls == ["shutdown", "initialize"] * 2
  assert len(res["cycles"]) == 2 and all(c["ok"] for c in res["cycles"])
  assert res["delta"]["symmetric_bytes"] == [0] * 4
  assert res["symmetric_launches_per_step"] == [0] * 4
  assert res["errors"]["max_tokens_per_rank"]["says_what_to_raise"]
  assert res["errors"]["capacity"]["dropped_rows"] > 0


def test_weight_gradient_tolerance_separates_rounding_from_misrouting():
  """``testing.weight_grad_tolerance`` (the GPU tests' d_topk_weights bound): bfloat16 rounding
  of the expert output y, which XLA may or may not keep in one backend's fused backward, stays
  inside it; a row of the wrong token does not."""
  import ml_dtypes

  from jax_ep import testing

  h = 2048
  rtol, atol = testing.weight_grad_tolerance(h, "bfloat16")
  rng = np.random.default_rng(5)
  bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)
  x = bf(rng.standard_normal((1024, h), dtype=np.float32))
  dout = bf(np.cos(x))
  exact = np.sum(dout * np.tanh(x), axis=1)
  rounded = np.sum(dout * bf(np.tanh(x)), axis=1)
  assert np.all(np.abs(exact - rounded) <= atol + rtol * np.abs(rounded))
  assert np.mean(np.abs(exact - rounded) > 3e-2 + 3e-2 * np.abs(rounded)) > 0  # old bound failed
  misrouted = np.sum(dout * np.tanh(np.roll(x, 1, axis=0)), axis=1)
  assert np.mean(np.abs(misrouted - exact) > atol + rtol * np.abs(exact)) > 0.9
  assert testing.weight_grad_tolerance(h, "float32") == testing.GRAD_TOL["float32"]
