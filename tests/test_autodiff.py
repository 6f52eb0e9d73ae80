"""Gradients through dispatch -> experts -> combine against jax.grad of the dense computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing
from conftest import cpu_mesh


def make_problem(rng, ep_size, t, h, n, e, k, kind="uniform"):
  idx = np.concatenate([testing.make_routing(rng, kind, t, e, k, ep_size) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)
  weights = rng.random((ep_size * t, k)).astype(np.float32)
  w1 = (rng.standard_normal((e, h, n)) / np.sqrt(h)).astype(np.float32)
  w2 = (rng.standard_normal((e, n, h)) / np.sqrt(n)).astype(np.float32)
  return x, idx, weights, w1, w2


def dense_loss(x, idx, weights, w1, w2, num_experts):
  def expert(e, rows):
    return jnp.tanh(rows @ w1[e]) @ w2[e]
  out = testing.dense_moe(x, idx, weights, expert, num_experts)
  return jnp.sum(out * jnp.cos(out)), out


def ep_loss_fn(config, mesh):
  ax = config.axis_name

  def per_shard(x, idx, weights, w1, w2):
    recv_x, _, layout = jax_ep.dispatch(x, idx, weights, config=config)
    hid = jnp.tanh(jax_ep.grouped_matmul(recv_x, w1, layout))
    y = jax_ep.grouped_matmul(hid, w2, layout)
    return jax_ep.combine(y, layout, config=config)

  f = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(ax), P(ax), P(ax), P(ax), P(ax)),
                    out_specs=P(ax))

  def loss(x, idx, weights, w1, w2):
    out = f(x, idx, weights, w1, w2)
    return jnp.sum(out * jnp.cos(out)), out
  return loss


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "with_unselected", "duplicates"])
def test_gradients_match_dense(rng, ep_size, kind):
  t, h, n, e, k = 5, 8, 6, 8, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                           expert_alignment=2, backend="xla")
  x, idx, weights, w1, w2 = make_problem(rng, ep_size, t, h, n, e, k, kind)
  mesh = cpu_mesh(ep_size)
  ep = jax.jit(jax.value_and_grad(ep_loss_fn(config, mesh), argnums=(0, 2, 3, 4), has_aux=True))
  dense = jax.jit(jax.value_and_grad(lambda *a: dense_loss(*a, e), argnums=(0, 2, 3, 4),
                                     has_aux=True))
  (l_ep, out_ep), g_ep = ep(x, idx, weights, w1, w2)
  (l_d, out_d), g_d = dense(x, idx, weights, w1, w2)
  np.testing.assert_allclose(out_ep, out_d, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(l_ep, l_d, rtol=1e-4, atol=1e-5)
  for name, a, b in zip(("x", "topk_weights", "w1", "w2"), g_ep, g_d):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d {name}")


@pytest.mark.parametrize("ep_size", [1, 2])
def test_gradients_of_zero_tokens(rng, ep_size):
  """T = 0 on every rank: the gradients are empty arrays of the inputs' types. At W = 1 the
  xla backend skips its exchanges, whose outputs vary over the EP axis: the backward must
  still give x's cotangent that type (found by the W = 1 GPU run, 2026-11-24)."""
  t, h, n, e, k = 0, 8, 6, 8, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=4,
                           backend="xla")
  x, idx, weights, w1, w2 = make_problem(rng, ep_size, t, h, n, e, k)
  grads = jax.jit(jax.grad(lambda *a: ep_loss_fn(config, cpu_mesh(ep_size))(*a)[0],
                           argnums=(0, 2, 3, 4)))(x, idx, weights, w1, w2)
  assert [g.shape for g in grads] == [(0, h), (0, k), w1.shape, w2.shape]
  for g in grads:
    np.testing.assert_array_equal(g, 0)


def test_recv_weights_gradient(rng):
  """Weights used on the expert side (through recv_weights) get gradients too."""
  ep_size, t, h, e, k = 4, 4, 6, 8, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  mesh = cpu_mesh(ep_size)
  idx = np.concatenate([testing.make_routing(rng, "uniform", t, e, k) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)
  weights = rng.random((ep_size * t, k)).astype(np.float32)

  def per_shard(x, idx, weights):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, weights, config=config)
    return jax_ep.combine(recv_x * recv_w[:, None], layout, config=config)  # w^2 * x per slot

  f = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
  g = jax.grad(lambda w: jnp.sum(f(x, idx, w)))(weights)
  expected = 2 * weights * x.sum(-1, keepdims=True)  # d/dw of sum_k w^2 * sum_h x
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def test_jit_checkpoint_and_scan(rng):
  """The layout crosses jit, remat and scan; a scanned stack of EP layers matches the dense one."""
  ep_size, t, h, e, k, layers = 4, 4, 8, 8, 2, 3
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  mesh = cpu_mesh(ep_size)
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)
  idx = np.stack([np.concatenate([testing.make_routing(rng, "zipf", t, e, k)
                                  for _ in range(ep_size)]) for _ in range(layers)])
  weights = rng.random((layers, ep_size * t, k)).astype(np.float32)
  ws = (rng.standard_normal((layers, e, h, h)) / np.sqrt(h)).astype(np.float32)

  @jax.checkpoint
  def layer(x, idx, weights, w):
    recv_x, _, layout = jax_ep.dispatch(x, idx, weights, config=config)
    y = jnp.tanh(jax_ep.grouped_matmul(recv_x, w, layout))
    return x + jax_ep.combine(y, layout, config=config)

  def per_shard(x, idx, weights, ws):
    def body(x, args):
      return layer(x, *args), None
    return jax.lax.scan(body, x, (idx, weights, ws))[0]

  ep = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(P("ep"), P(None, "ep"), P(None, "ep"), P(None, "ep")),
                     out_specs=P("ep"))

  def dense(x, idx, weights, ws):
    for l in range(layers):
      x = x + testing.dense_moe(x, idx[l], weights[l], lambda e_, r: jnp.tanh(r @ ws[l, e_]), e)
    return x

  loss = lambda f: (lambda x, w, ws: jnp.sum(jnp.sin(f(x, idx, w, ws))))
  g_ep = jax.jit(jax.grad(loss(ep), argnums=(0, 1, 2)))(x, weights, ws)
  g_d = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(x, weights, ws)
  for a, b in zip(g_ep, g_d):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_layout_is_a_pytree_through_jit_and_shard_map(rng):
  ep_size, t, h, e, k = 2, 3, 4, 4, 2
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, backend="xla")
  mesh = cpu_mesh(ep_size)
  idx = testing.make_routing(rng, "uniform", ep_size * t, e, k)
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)

  def first(x, idx):
    _, _, layout = jax_ep.dispatch(x, idx, config=config)
    return jax.tree.map(lambda a: a[None], layout)  # the layout leaves the shard_map

  def second(x, layout):
    layout = jax.tree.map(lambda a: a[0], layout)
    recv = jax_ep.dispatch(x, layout.topk_idx, config=config)[0]
    return jax_ep.combine(recv, layout, config=config)

  layout = jax.jit(jax.shard_map(first, mesh=mesh, in_specs=(P("ep"), P("ep")),
                                 out_specs=P("ep")))(x, idx)
  assert isinstance(layout, jax_ep.DispatchLayout)
  out = jax.jit(jax.shard_map(second, mesh=mesh, in_specs=(P("ep"), P("ep")),
                              out_specs=P("ep")))(x, layout)
  np.testing.assert_allclose(out, x * k, rtol=1e-6)
