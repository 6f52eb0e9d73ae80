"""dispatch / combine against the contract (jax_ep.testing's loop references), on CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing
from conftest import cpu_mesh

def run_dispatch_combine(config, ep_size, x, idx, weights, y=None):
  """Dispatch [W, T, ...] inputs over an ep_size mesh; combine ``y`` ([W, C, H]) or recv_x * 1.5.

  Returns numpy: recv_x [W,C,H], recv_w [W,C], public layout fields [W, ...], out [W,T,H].
  """
  mesh = cpu_mesh(ep_size, config.axis_name)
  w_, t_ = idx.shape[:2]
  flat = lambda a: jnp.asarray(a).reshape((w_ * t_,) + np.shape(a)[2:])
  if y is None:
    outputs = testing.roundtrip_fn(config, mesh)(flat(x), flat(idx), flat(weights))
  else:
    def per_shard(x, idx, weights, y):
      _, _, layout = jax_ep.dispatch(x, idx, weights, config=config)
      return jax_ep.combine(y[0], layout, config=config)
    out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"),) * 4,
                                out_specs=P("ep")))(flat(x), flat(idx), flat(weights), y)
    outputs = (None, None, None, out)
  return tuple(outputs[:3]) + (np.asarray(outputs[3]).reshape(w_, t_, np.shape(x)[-1]),)


def check_against_reference(config, ep_size, x, idx, weights):
  outputs = testing.roundtrip_fn(config, cpu_mesh(ep_size, config.axis_name))(
      *(jnp.asarray(a).reshape((ep_size * idx.shape[1],) + np.shape(a)[2:])
        for a in (x, idx, weights)))
  ref = testing.check_roundtrip(config, x, idx, weights, outputs)
  assert np.all((ref.group_offsets % config.expert_alignment == 0)
                | (ref.group_offsets == config.capacity_rows(ep_size)))
  return ref


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", testing.ROUTINGS)
def test_dispatch_matches_reference(rng, ep_size, kind):
  t, h, e, k = 6, 8, 16, 4
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                           backend="xla")
  idx = np.stack([testing.make_routing(rng, kind, t, e, k, ep_size) for _ in range(ep_size)])
  x = testing.token_identity_rows(ep_size, t, h)
  weights = rng.random((ep_size, t, k)).astype(np.float32)
  ref = check_against_reference(config, ep_size, x, idx, weights)
  if kind == "empty":
    assert ref.num_recv_rows.sum() == 0


@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("num_tokens", [0, 1])
def test_tiny_token_counts(rng, ep_size, num_tokens):
  config = jax_ep.EPConfig(num_experts=8, topk=2, hidden=4, max_tokens_per_rank=4, backend="xla")
  idx = np.stack([testing.make_routing(rng, "uniform", num_tokens, 8, 2) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size, num_tokens, 4)).astype(np.float32)
  weights = rng.random((ep_size, num_tokens, 2)).astype(np.float32)
  check_against_reference(config, ep_size, x, idx, weights)


@pytest.mark.parametrize("ep_size", [2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "one_expert"])
def test_capacity_drops_and_alignment(rng, ep_size, kind):
  t, h, e, k = 8, 4, 16, 3
  capacity = int(rng.integers(1, t * k))
  alignment = int(rng.choice([1, 2, 4]))
  capacity = -(-capacity // alignment) * alignment
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                           capacity=capacity, expert_alignment=alignment, backend="xla")
  idx = np.stack([testing.make_routing(rng, kind, t, e, k, ep_size) for _ in range(ep_size)])
  x = testing.token_identity_rows(ep_size, t, h)
  weights = rng.random((ep_size, t, k)).astype(np.float32)
  ref = check_against_reference(config, ep_size, x, idx, weights)
  if kind == "one_expert":
    assert ref.num_dropped.sum() > 0  # every rank's tokens pile onto rank 0: it must overflow


@pytest.mark.parametrize("ep_size", [1, 4])
def test_alignment_without_drops(rng, ep_size):
  config = jax_ep.EPConfig(num_experts=8, topk=2, hidden=4, max_tokens_per_rank=5,
                           expert_alignment=8, backend="xla")
  idx = np.stack([testing.make_routing(rng, "zipf", 5, 8, 2) for _ in range(ep_size)])
  x = testing.token_identity_rows(ep_size, 5, 4)
  weights = rng.random((ep_size, 5, 2)).astype(np.float32)
  ref = check_against_reference(config, ep_size, x, idx, weights)
  assert ref.num_dropped.sum() == 0
  assert np.all(ref.group_offsets % 8 == 0)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_invalid_ids_are_counted_not_sent(rng, ep_size):
  e = 8
  config = jax_ep.EPConfig(num_experts=e, topk=3, hidden=4, max_tokens_per_rank=6, backend="xla")
  idx = np.stack([testing.make_routing(rng, "uniform", 6, e, 3) for _ in range(ep_size)])
  bad = rng.random(idx.shape) < 0.3
  idx = np.where(bad, rng.choice([-7, -2, e, e + 5, 2**30], size=idx.shape), idx).astype(np.int32)
  x = testing.token_identity_rows(ep_size, 6, 4)
  weights = rng.random((ep_size, 6, 3)).astype(np.float32)
  ref = check_against_reference(config, ep_size, x, idx, weights)
  np.testing.assert_array_equal(ref.num_invalid, bad.reshape(ep_size, -1).sum(1))


def test_combine_random_y_bf16(rng):
  """combine of arbitrary y (not derived from recv_x), bf16, against the loop reference."""
  ep_size, t, h, e, k = 4, 7, 16, 8, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  idx = np.stack([testing.make_routing(rng, "with_unselected", t, e, k) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size, t, h)).astype(jnp.bfloat16)
  weights = rng.random((ep_size, t, k)).astype(np.float32)
  c = config.capacity_rows(ep_size)
  y = rng.standard_normal((ep_size, c, h)).astype(jnp.bfloat16)
  _, _, _, out = run_dispatch_combine(config, ep_size, x, idx, weights, y=y)
  assert out.dtype == jnp.bfloat16
  ref = testing.reference_dispatch(np.asarray(x, np.float32), idx, weights, e, c)
  expected = testing.reference_combine(np.asarray(y, np.float32), ref, t, k)
  np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2e-2, atol=2e-2)


def test_runs_repeat_bit_for_bit(rng):
  ep_size, t, h, e, k = 4, 16, 32, 16, 4
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  idx = np.stack([testing.make_routing(rng, "zipf", t, e, k) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size, t, h)).astype(np.float32)
  weights = rng.random((ep_size, t, k)).astype(np.float32)
  first = run_dispatch_combine(config, ep_size, x, idx, weights)
  for _ in range(3):
    again = run_dispatch_combine(config, ep_size, x, idx, weights)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[3], again[3])


def test_weights_default_to_one(rng):
  ep_size, t, h, e, k = 2, 5, 4, 4, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  mesh = cpu_mesh(ep_size)
  idx = testing.make_routing(rng, "uniform", ep_size * t, e, k)
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)

  def per_shard(x, idx):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, config=config)
    return recv_w[None], jax_ep.combine(recv_x, layout, config=config)

  recv_w, out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"), P("ep")),
                                      out_specs=P("ep")))(x, idx)
  assert set(np.unique(np.asarray(recv_w))) <= {0.0, 1.0}
  # each token comes back times the number of its selected slots
  np.testing.assert_allclose(np.asarray(out), x * k, rtol=1e-6)
