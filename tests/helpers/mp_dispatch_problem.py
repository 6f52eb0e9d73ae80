"""The problem both the multi-process run and the single-process run of the test compute."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing


def make_problem(seed, ep_size, t=6, h=8, n=5, e=8, k=3):
  rng = np.random.default_rng(seed)
  config = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                           capacity=2 * t * k, expert_alignment=2, backend="xla")
  idx = np.concatenate([testing.make_routing(rng, "zipf", t, e, k) for _ in range(ep_size)])
  x = rng.standard_normal((ep_size * t, h)).astype(np.float32)
  weights = rng.random((ep_size * t, k)).astype(np.float32)
  w1 = rng.standard_normal((e, h, h)).astype(np.float32)
  return config, x, idx, weights, w1


def step_fn(config, mesh):
  """dispatch -> grouped_matmul -> combine, plus gradients; every output sharded over 'ep'."""
  def per_shard(x, idx, weights, w1):
    def loss(x, weights, w1):
      recv_x, recv_w, layout = jax_ep.dispatch(x, idx, weights, config=config)
      y = jnp.tanh(jax_ep.grouped_matmul(recv_x, w1, layout))
      out = jax_ep.combine(y, layout, config=config)
      return jnp.sum(out ** 2), (out, recv_x, layout)
    (_, (out, recv_x, layout)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                            has_aux=True)(x, weights, w1)
    return (out, recv_x, layout.group_sizes[None], layout.num_dropped[None]) + grads
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep"))
