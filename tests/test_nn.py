"""jax_ep.nn.MoE against a dense MoE computed without expert parallelism, same parameters.

The dense reference below evaluates every expert on every token on one device and picks the
top-k outputs, so it shares no code with the layer (no dispatch, no grouped matmul, no
shard_map). Forward outputs, auxiliary losses and gradients (all parameters and the input)
must agree for EP sizes 1, 4 and 8, under jit, remat and a scan over a stack of layers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_ep.nn  # noqa: E402

HIDDEN, FFN, EXPERTS, TOPK, SHARED = 16, 24, 8, 2, 12
LB_COEF, Z_COEF = 0.05, 0.01


def _mesh(ep_size: int) -> jax.sharding.Mesh:
  devices = jax.devices()
  if len(devices) < ep_size:
    pytest.skip(f"needs {ep_size} devices, have {len(devices)}")
  return jax.make_mesh((ep_size,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:ep_size])


def _layer(mesh, seed, **kw):
  kw.setdefault("shared_intermediate", SHARED)
  return jax_ep.nn.MoE(HIDDEN, FFN, num_experts=EXPERTS, topk=TOPK, mesh=mesh, backend="xla",
                       load_balancing_coef=LB_COEF, z_loss_coef=Z_COEF,
                       rngs=nnx.Rngs(seed), **kw)


def dense_moe(p, x, renormalize=True):
  """Dense MoE on one device: returns (out [..., H], aux_loss, lb, z)."""
  t = x.reshape(-1, HIDDEN).astype(jnp.float32)
  logits = jnp.einsum("th,he->te", t, p["w_router"], precision="highest")
  probs = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
  probs = probs / jnp.sum(probs, -1, keepdims=True)
  w, idx = jax.lax.top_k(probs, TOPK)
  if renormalize:
    w = w / jnp.sum(w, -1, keepdims=True)
  silu = lambda a: a / (1 + jnp.exp(-a))
  gate_up = jnp.einsum("th,ehf->tef", t, p["w_gate_up"], precision="highest")
  hid = silu(gate_up[..., :FFN]) * gate_up[..., FFN:]
  every = jnp.einsum("tef,efh->teh", hid, p["w_down"], precision="highest")  # [T, E, H]
  chosen = jnp.take_along_axis(every, idx[:, :, None], axis=1)  # [T, K, H]
  out = jnp.sum(w[:, :, None] * chosen, axis=1)
  if "shared_gate" in p:
    out = out + jnp.dot(silu(t @ p["shared_gate"]) * (t @ p["shared_up"]), p["shared_down"],
                        precision="highest")
  selected = (idx[:, :, None] == jnp.arange(EXPERTS)).sum((0, 1)).astype(jnp.float32)
  f = jax.lax.stop_gradient(selected / (t.shape[0] * TOPK))
  lb = EXPERTS * jnp.sum(f * probs.mean(0))
  lse = jnp.log(jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  z = jnp.mean(lse ** 2)
  return out.reshape(x.shape), LB_COEF * lb + Z_COEF * z, lb, z


def _close(a, b, what, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("ep_size", [1, 4, 8])
def test_forward_and_grad_match_dense(ep_size, rng):
  mesh = _mesh(ep_size)
  layer = _layer(mesh, seed=int(rng.integers(1 << 30)),
                 renormalize=bool(ep_size != 4))  # both router variants get covered
  x = jnp.asarray(rng.standard_normal((4, 8, HIDDEN)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((4, 8, HIDDEN)), jnp.float32)
  graphdef, params = nnx.split(layer)

  @jax.jit
  def ep_loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * ct) + aux.loss, (y, aux)

  @jax.jit
  def dense_loss(p, x):
    y, aux_loss, lb, z = dense_moe(p, x, renormalize=layer.renormalize)
    return jnp.sum(y * ct) + aux_loss, (y, lb, z)

  (loss, (y, aux)), (g_params, g_x) = jax.value_and_grad(
      ep_loss, argnums=(0, 1), has_aux=True)(params, x)
  p = nnx.to_pure_dict(params)
  (ref_loss, (ref_y, lb, z)), (ref_g_params, ref_g_x) = jax.value_and_grad(
      dense_loss, argnums=(0, 1), has_aux=True)(p, x)

  _close(y, ref_y, "output")
  _close(loss, ref_loss, "loss")
  _close(aux.load_balancing_loss, lb, "load-balancing loss")
  _close(aux.router_z_loss, z, "router z-loss")
  assert int(aux.num_dropped) == 0
  assert int(aux.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * TOPK
  _close(g_x, ref_g_x, "d x")
  g = nnx.to_pure_dict(g_params)
  assert set(g) == set(ref_g_params)
  for name in ref_g_params:
    _close(g[name], ref_g_params[name], f"d {name}")
  # The expert weights really live split over the EP axis.
  assert params["w_gate_up"][...].sharding.spec == jax.sharding.PartitionSpec("ep", None, None)


def test_scan_remat_stack_matches_dense(rng):
  """Two layers created with nnx.vmap, applied with nnx.scan + nnx.remat, under jax.set_mesh."""
  mesh = _mesh(4)
  num_layers = 2
  with jax.set_mesh(mesh):

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(key):
      return jax_ep.nn.MoE(HIDDEN, FFN, num_experts=EXPERTS, topk=TOPK, backend="xla",
                           load_balancing_coef=LB_COEF, z_loss_coef=Z_COEF,
                           rngs=nnx.Rngs(params=key))

    stack = make(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), num_layers))
    specs = nnx.get_partition_spec(nnx.state(stack))
    assert specs["w_gate_up"].get_value() == jax.sharding.PartitionSpec(None, "ep", None, None)
    assert specs["w_router"].get_value() == jax.sharding.PartitionSpec(None, None, None)

    x = jnp.asarray(rng.standard_normal((2, 16, HIDDEN)), jnp.float32)
    graphdef, params = nnx.split(stack)

    @jax.jit
    def ep_loss(params, x):
      model = nnx.merge(graphdef, params)

      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: None})
      @nnx.remat
      def body(layer, h):
        y, aux = layer(h)
        return h + y, aux.loss

      h, aux_losses = body(model, x)
      return jnp.sum(h ** 2) + jnp.sum(aux_losses)

    loss, grads = jax.value_and_grad(ep_loss)(params, x)

  p = nnx.to_pure_dict(params)

  def dense_loss(p, x):
    h, total = x, 0.0
    for i in range(num_layers):
      y, aux_loss, _, _ = dense_moe(jax.tree.map(lambda a: a[i], p), h)
      h, total = h + y, total + aux_loss
    return jnp.sum(h ** 2) + total

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(dense_loss))(p, x)
  _close(loss, ref_loss, "loss", tol=1e-4)
  g = nnx.to_pure_dict(grads)
  for name in ref_grads:
    _close(g[name], ref_grads[name], f"d {name}", tol=1e-4)


def _kept_slots(idx: np.ndarray, ep_size: int, capacity: int) -> np.ndarray:
  """``[N, K] bool``: which (token, slot) rows fit, by the contract's drop rule.

  Rank r holds global experts r*E_local .. (r+1)*E_local-1, one group each in that order;
  inside a group rows come in (source rank, token, k) order, which for contiguous token shards
  is global (token, k) order; a row whose position is >= capacity is dropped.
  """
  e_local = EXPERTS // ep_size
  kept = np.zeros(idx.shape, bool)
  for rank in range(ep_size):
    position = 0
    for g in range(rank * e_local, (rank + 1) * e_local):
      for t, k in zip(*np.nonzero(idx == g)):  # row-major: (token, k) order
        kept[t, k] = position < capacity
        position += 1
  return kept


def test_capacity_factor_drops_the_tail_and_counts_it(rng):
  """A tight capacity drops exactly the rows past it; the rest equals the dense MoE."""
  ep_size, num_tokens = 4, 64
  mesh = _mesh(ep_size)
  layer = _layer(mesh, seed=int(rng.integers(1 << 30)), shared_intermediate=None,
                 capacity_factor=0.5)
  config = layer.ep_config(num_tokens)
  assert config.capacity == config.balanced_capacity(ep_size, 0.5)
  x = jnp.asarray(rng.standard_normal((num_tokens, HIDDEN)), jnp.float32)
  y, aux = jax.jit(lambda x: layer(x))(x)

  # Dense per-expert outputs, then only the rows the drop rule keeps.
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layer)))
  logits = x @ p["w_router"]
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  w, idx = (np.asarray(a) for a in jax.lax.top_k(probs, TOPK))
  w = w / w.sum(-1, keepdims=True)
  kept = _kept_slots(idx, ep_size, config.capacity)
  silu = lambda a: a / (1 + np.exp(-a))
  xs = np.asarray(x)
  gate_up = np.einsum("th,ehf->tef", xs, p["w_gate_up"])
  every = np.einsum("tef,efh->teh", silu(gate_up[..., :FFN]) * gate_up[..., FFN:], p["w_down"])
  chosen = np.take_along_axis(every, idx[:, :, None], axis=1)
  expected = np.sum((w * kept)[:, :, None] * chosen, axis=1)

  assert int(aux.num_dropped) == int((~kept).sum()) >= num_tokens * TOPK // 2
  _close(y, expected, "output with drops", tol=5e-5)


def test_bfloat16_compute_is_close(rng):
  """bf16 experts: within bf16 rounding of the float32 dense MoE on the same (bf16) tokens."""
  mesh = _mesh(4)
  layer = _layer(mesh, seed=int(rng.integers(1 << 30)), dtype=jnp.bfloat16)
  # Tokens exactly representable in bf16, so the float32 router picks the same experts.
  x = jnp.asarray(rng.standard_normal((32, HIDDEN)), jnp.bfloat16).astype(jnp.float32)
  y, _ = jax.jit(lambda x: layer(x))(x)
  assert y.dtype == jnp.bfloat16
  ref, _, _, _ = dense_moe(nnx.to_pure_dict(nnx.state(layer)), x)
  y, ref = np.asarray(y, np.float32), np.asarray(ref)
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-2
  np.testing.assert_allclose(y, ref, rtol=0.1, atol=0.1)


def test_errors_name_the_problem():
  mesh = _mesh(4)
  with pytest.raises(ValueError, match="axis_name='experts' is not an axis"):
    jax_ep.nn.MoE(8, 8, num_experts=4, topk=1, mesh=mesh, axis_name="experts",
                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="topk=5 must be <= num_experts=4"):
    jax_ep.nn.MoE(8, 8, num_experts=4, topk=5, mesh=mesh, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    jax_ep.nn.MoE(8, 8, num_experts=6, topk=1, mesh=mesh, rngs=nnx.Rngs(0))(jnp.ones((8, 8)))
  layer = jax_ep.nn.MoE(8, 8, num_experts=4, topk=1, mesh=mesh, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="6 tokens do not split evenly over the 4 devices"):
    layer(jnp.ones((6, 8)))
  with pytest.raises(ValueError, match=r"x must be \[..., hidden=8\]"):
    layer(jnp.ones((8, 5)))
  unplaced = jax_ep.nn.MoE(8, 8, num_experts=4, topk=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="call it under `with jax.set_mesh"):
    unplaced(jnp.ones((8, 8)))


def test_ep_config_carries_the_triton_knobs():
  """timeout_s and num_sms reach the EPConfig a call uses (and the runtime is sized with)."""
  mesh = _mesh(4)
  layer = _layer(mesh, 0, timeout_s=45.0, num_sms=24, capacity_factor=2.0)
  config = layer.ep_config(64)
  assert (config.timeout_s, config.num_sms, config.max_tokens_per_rank) == (45.0, 24, 16)
  assert config.capacity == config.balanced_capacity(4, 2.0)
  default = _layer(mesh, 0).ep_config(64)
  reference = jax_ep.EPConfig(num_experts=EXPERTS, topk=TOPK, hidden=HIDDEN,
                              max_tokens_per_rank=16)
  assert (default.timeout_s, default.num_sms) == (reference.timeout_s, reference.num_sms)
  with pytest.raises(ValueError, match="timeout_s=0 must be a positive number"):
    _layer(mesh, 0, timeout_s=0)
  with pytest.raises(ValueError, match="num_sms=0 must be a positive int"):
    _layer(mesh, 0, num_sms=0)


def test_explicit_mesh_under_set_mesh(rng):
  """A mesh with Explicit axes (jax.make_mesh's default in jax >= 0.11), unsharded input."""
  devices = jax.devices()[:4]
  if len(devices) < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.make_mesh((4,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=devices)
  x = jnp.asarray(rng.standard_normal((16, HIDDEN)), jnp.float32)
  with jax.set_mesh(mesh):
    layer = jax_ep.nn.MoE(HIDDEN, FFN, num_experts=EXPERTS, topk=TOPK, backend="xla",
                          load_balancing_coef=LB_COEF, z_loss_coef=Z_COEF,
                          rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y ** 2) + aux.loss

    value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))  # the reference: one device, no mesh

  def dense_loss(p, x):
    y, aux_loss, _, _ = dense_moe(p, x)
    return jnp.sum(y ** 2) + aux_loss

  ref, ref_grads = jax.jit(jax.value_and_grad(dense_loss))(p, x)
  _close(value, ref, "loss")
  g = nnx.to_pure_dict(grads)
  for name in ref_grads:
    _close(g[name], ref_grads[name], f"d {name}")


def test_nnx_jit_optimizer_step_keeps_expert_sharding(rng):
  """The usual NNX loop: nnx.jit + nnx.value_and_grad + nnx.Optimizer on the layer itself."""
  optax = pytest.importorskip("optax")
  mesh = _mesh(4)
  layer = _layer(mesh, seed=int(rng.integers(1 << 30)))
  optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
  x = jnp.asarray(rng.standard_normal((32, HIDDEN)), jnp.float32)
  before = nnx.to_pure_dict(nnx.state(layer))
  ref_loss, ref_grads = jax.value_and_grad(
      lambda p: jnp.sum(dense_moe(p, x)[0] ** 2) + dense_moe(p, x)[1])(before)

  @nnx.jit
  def step(layer, optimizer, x):
    def loss_fn(layer):
      y, aux = layer(x)
      return jnp.sum(y ** 2) + aux.loss
    loss, grads = nnx.value_and_grad(loss_fn)(layer)
    optimizer.update(layer, grads)
    return loss

  loss = step(layer, optimizer, x)
  _close(loss, ref_loss, "loss")
  after = nnx.to_pure_dict(nnx.state(layer))
  for name in before:  # plain SGD: new = old - 0.1 * dense gradient
    _close(after[name], before[name] - 0.1 * ref_grads[name], f"updated {name}")
  expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep", None, None))
  assert layer.w_down[...].sharding.is_equivalent_to(expected, 3)


def test_data_axes_around_expert_parallelism(rng):
  """Mesh (data=2, ep=4): tokens over both axes, experts over ep, replicated over data."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((2, 4), ("data", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])
  layer = _layer(mesh, seed=int(rng.integers(1 << 30)), data_axes=("data",))
  assert layer.ep_config(64).max_tokens_per_rank == 8
  x = jnp.asarray(rng.standard_normal((8, 8, HIDDEN)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((8, 8, HIDDEN)), jnp.float32)
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * ct) + aux.loss

  def dense_loss(p, x):
    y, aux_loss, _, _ = dense_moe(p, x)
    return jnp.sum(y * ct) + aux_loss

  value, (grads, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  ref, (ref_grads, ref_g_x) = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))(
      nnx.to_pure_dict(params), x)
  _close(value, ref, "loss")
  _close(g_x, ref_g_x, "d x")
  g = nnx.to_pure_dict(grads)
  for name in ref_grads:
    _close(g[name], ref_grads[name], f"d {name}")
  assert params["w_gate_up"][...].sharding.spec == jax.sharding.PartitionSpec("ep", None, None)
