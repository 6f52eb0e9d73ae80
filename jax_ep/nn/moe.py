"""``MoE``: a Flax NNX Mixture-of-Experts block on jax_ep's dispatch / combine.

The block owns parameters and routing; the token movement is jax_ep's functional API. For
``N`` tokens of width ``H`` on a mesh whose EP axis has ``W`` devices:

  router      logits = x @ w_router ``[N, E]`` in float32; probs = softmax(logits);
              (topk_weights, topk_idx) = top_k(probs, K), optionally renormalised to sum 1.
              Computed on the token-sharded global arrays, so the auxiliary losses below are
              means over all N tokens (the same numbers a single device would get).
  experts     one ``jax.shard_map`` over the EP axis: each rank holds ``N / W`` tokens and
              ``E / W`` experts; ``jax_ep.dispatch`` -> ``jax_ep.experts.swiglu_fused``
              (grouped matmuls: gate and up in one, then down) -> ``jax_ep.combine`` (which
              applies the routing weights).
  shared      optional dense SwiGLU every token goes through (DeepSeek-style shared expert),
              added to the routed output.

Auxiliary losses (returned in ``MoEAux``; add ``aux.loss`` to the training loss):
  load balancing  ``E * sum_e f_e * P_e`` (Switch Transformer / GShard), f_e the fraction of the
                  N*K selections that chose expert e (no gradient), P_e the mean router
                  probability of e. Equals 1 for perfectly uniform routing.
  router z-loss   ``mean_t logsumexp(logits_t)^2`` (ST-MoE): keeps router logits small.

Parameter shapes and their ``out_sharding`` metadata (visible to ``nnx.get_partition_spec``):
  w_router ``[H, E]`` replicated; w_gate_up ``[E, H, 2F]`` (gate columns ``[..., :F]``, up
  columns ``[..., F:]``: one grouped matmul computes both) and w_down ``[E, F, H]`` sharded
  over the EP axis on their expert dimension; shared expert weights replicated. (Until
  2026-11-23 the gate and up weights were two parameters, w_gate and w_up ``[E, H, F]``: a state
  saved then converts with ``w_gate_up = concatenate([w_gate, w_up], axis=-1)``.)
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep.config import EPConfig

Initializer = tp.Callable[..., jax.Array]

# Fan-in scaling over the middle ("in") axis of a [E, in, out] stack of expert matrices.
default_expert_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
default_kernel_init = jax.nn.initializers.lecun_normal()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEAux:
  """What one ``MoE`` call reports beside its output (a pytree: returns through jit and scan).

  Attributes:
    loss: ``[] float32``; ``load_balancing_coef * load_balancing_loss + z_loss_coef *
      router_z_loss``: add it to the training loss.
    load_balancing_loss: ``[] float32``; E * sum_e f_e * P_e over all tokens (1 when uniform).
    router_z_loss: ``[] float32``; mean over tokens of logsumexp(router logits)^2.
    tokens_per_expert: ``[num_experts] int32``; (token, slot) selections of each expert.
    num_dropped: ``[] int32``; selections dropped for lack of capacity, over all ranks (0 unless
      ``capacity_factor`` is set).
  """

  loss: jax.Array
  load_balancing_loss: jax.Array
  router_z_loss: jax.Array
  tokens_per_expert: jax.Array
  num_dropped: jax.Array


def route(logits: jax.Array, topk: int, *, renormalize: bool = True):
  """Top-k softmax routing.

  Args:
    logits: ``[num_tokens, num_experts]`` router logits (computed in float32).
    topk: K, experts per token.
    renormalize: rescale each token's K weights to sum to 1 (Mixtral / Qwen-MoE style);
      otherwise keep the softmax probabilities of the chosen experts (Switch / DeepSeek-V2).

  Returns:
    topk_weights ``[num_tokens, topk] float32``, topk_idx ``[num_tokens, topk] int32`` (in
    descending probability), probs ``[num_tokens, num_experts] float32``.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  topk_weights, topk_idx = lax.top_k(probs, topk)
  if renormalize:
    topk_weights = topk_weights / jnp.sum(topk_weights, axis=-1, keepdims=True)
  return topk_weights, topk_idx.astype(jnp.int32), probs


def router_losses(logits: jax.Array, probs: jax.Array, topk_idx: jax.Array):
  """The load-balancing loss and router z-loss over all tokens given.

  Args:
    logits: ``[num_tokens, num_experts]`` router logits.
    probs: ``[num_tokens, num_experts]`` softmax of the logits.
    topk_idx: ``[num_tokens, topk] int32`` chosen experts.

  Returns:
    (load_balancing_loss ``[] f32``, router_z_loss ``[] f32``, tokens_per_expert
    ``[num_experts] int32``).
  """
  num_tokens, num_experts = probs.shape
  topk = topk_idx.shape[-1]
  tokens_per_expert = jnp.sum(
      jax.nn.one_hot(topk_idx, num_experts, dtype=jnp.int32), axis=(0, 1))
  fraction = lax.stop_gradient(tokens_per_expert.astype(jnp.float32) / (num_tokens * topk))
  mean_prob = jnp.mean(probs, axis=0)
  load_balancing = num_experts * jnp.sum(fraction * mean_prob)
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  z_loss = jnp.mean(jnp.square(z))
  return load_balancing, z_loss, tokens_per_expert


def _ep_options(timeout_s, num_sms) -> dict:
  """The EPConfig fields the layer sets only when given (else EPConfig's defaults)."""
  return {k: v for k, v in (("timeout_s", timeout_s), ("num_sms", num_sms)) if v is not None}


def _swiglu(x, w_gate, w_up, w_down):
  """Dense SwiGLU: ``[N, H] -> [N, H]`` with ``[H, F]``, ``[H, F]``, ``[F, H]`` weights."""
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class MoE(nnx.Module):
  """Mixture-of-Experts feed-forward block with expert parallelism (jax_ep dispatch / combine).

  Tokens and experts are both split over the mesh axis ``axis_name`` (W devices): each device
  routes its ``N / W`` tokens, sends them to the devices holding their experts, runs its
  ``E / W`` SwiGLU experts, and gets the weighted outputs back.

  Example usage::

    >>> import jax, jax.numpy as jnp, jax_ep.nn
    >>> from flax import nnx
    >>> mesh = jax.make_mesh((jax.device_count(),), ("ep",),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> moe = jax_ep.nn.MoE(64, 128, num_experts=8, topk=2, mesh=mesh, rngs=nnx.Rngs(0))
    >>> y, aux = moe(jnp.ones((4, 16, 64)))    # y: [4, 16, 64]; add aux.loss to the loss

  Args:
    hidden: H, the width of a token.
    intermediate: F, the hidden width of each expert's SwiGLU.
    num_experts: E, routed experts; divisible by the size of the EP axis.
    topk: K, experts per token.
    mesh: the device mesh holding ``axis_name``. None: use the mesh set with
      ``jax.set_mesh`` when the layer is created and called.
    axis_name: the mesh axis that experts and tokens are split over.
    data_axes: further mesh axes the tokens (not the experts) are split over: plain data
      parallelism around expert parallelism. Each group of devices that shares these axes'
      coordinates is one EP group holding every expert once; expert weights are replicated
      over these axes (their gradients are summed over them).
    renormalize: rescale each token's top-k weights to sum to 1.
    shared_intermediate: hidden width of a shared expert every token goes through; None for
      no shared expert.
    capacity_factor: None (default) never drops: receive buffers hold the worst case. A number
      c sizes each rank's buffer to c x the mean rows it receives (``EPConfig.balanced_capacity``);
      rows beyond it are dropped deterministically and counted in ``MoEAux.num_dropped``.
    expert_alignment: each local expert's rows start at a multiple of this (GEMM tiles).
    backend: jax_ep backend: "auto" (triton when its runtime is initialized on GPU, else xla),
      "xla" or "triton".
    timeout_s: how long the triton backend's kernels wait for a peer GPU before they give up
      and report a timeout (``EPConfig.timeout_s``; None: EPConfig's default). Raise it where
      GPUs can reach an op seconds apart (first steps, one process per GPU).
    num_sms: programs (SMs) the triton backend's communication kernels may take
      (``EPConfig.num_sms``; None: EPConfig's default).
    load_balancing_coef: weight of the load-balancing loss in ``MoEAux.loss``.
    z_loss_coef: weight of the router z-loss in ``MoEAux.loss``.
    dtype: compute dtype of the experts (None: the input's dtype). The router always
      computes in float32.
    param_dtype: dtype of the parameters.
    kernel_init: initializer of the router and shared-expert matrices.
    expert_init: initializer of the ``[E, in, out]`` expert matrices.
    rngs: ``nnx.Rngs`` for parameter initialization.
  """

  def __init__(
      self,
      hidden: int,
      intermediate: int,
      *,
      num_experts: int,
      topk: int,
      mesh: jax.sharding.Mesh | None = None,
      axis_name: str = "ep",
      data_axes: tp.Sequence[str] = (),
      renormalize: bool = True,
      shared_intermediate: int | None = None,
      capacity_factor: float | None = None,
      expert_alignment: int = 1,
      backend: str = "auto",
      timeout_s: float | None = None,
      num_sms: int | None = None,
      load_balancing_coef: float = 1e-2,
      z_loss_coef: float = 1e-3,
      dtype: tp.Any = None,
      param_dtype: tp.Any = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      expert_init: Initializer = default_expert_init,
      rngs: nnx.Rngs,
  ):
    for name, value in (("hidden", hidden), ("intermediate", intermediate),
                        ("num_experts", num_experts), ("topk", topk)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"jax_ep.nn.MoE: {name}={value!r} must be a positive int.")
    if topk > num_experts:
      raise ValueError(
          f"jax_ep.nn.MoE: topk={topk} must be <= num_experts={num_experts}.")
    if shared_intermediate is not None and (
        not isinstance(shared_intermediate, int) or shared_intermediate <= 0):
      raise ValueError(
          f"jax_ep.nn.MoE: shared_intermediate={shared_intermediate!r} must be a positive int "
          f"or None (no shared expert).")
    if capacity_factor is not None and not capacity_factor > 0:
      raise ValueError(
          f"jax_ep.nn.MoE: capacity_factor={capacity_factor!r} must be > 0, or None for "
          f"buffers that never drop.")
    # Validates backend / alignment / axis_name / timeout / SMs with EPConfig's own messages.
    EPConfig(num_experts=num_experts, topk=topk, hidden=hidden, max_tokens_per_rank=1,
             axis_name=axis_name, expert_alignment=expert_alignment, backend=backend,
             **_ep_options(timeout_s, num_sms))
    data_axes = tuple(data_axes)
    if axis_name in data_axes or len(set(data_axes)) != len(data_axes):
      raise ValueError(
          f"jax_ep.nn.MoE: data_axes={data_axes!r} must be distinct mesh axes other than "
          f"axis_name={axis_name!r}.")
    if mesh is not None:
      if axis_name not in mesh.axis_names:
        raise ValueError(
            f"jax_ep.nn.MoE: axis_name={axis_name!r} is not an axis of the mesh "
            f"{dict(mesh.shape)}; pass the name of the mesh axis to split experts over.")
      missing = [a for a in data_axes if a not in mesh.axis_names]
      if missing:
        raise ValueError(
            f"jax_ep.nn.MoE: data_axes {missing} are not axes of the mesh {dict(mesh.shape)}.")
      EPConfig(num_experts=num_experts, topk=topk, hidden=hidden, max_tokens_per_rank=1,
               axis_name=axis_name).check_ep_size(mesh.shape[axis_name])

    self.hidden = hidden
    self.intermediate = intermediate
    self.num_experts = num_experts
    self.topk = topk
    self.mesh = mesh
    self.axis_name = axis_name
    self.data_axes = data_axes
    self.renormalize = renormalize
    self.shared_intermediate = shared_intermediate
    self.capacity_factor = capacity_factor
    self.expert_alignment = expert_alignment
    self.backend = backend
    self.timeout_s = timeout_s
    self.num_sms = num_sms
    self.load_balancing_coef = load_balancing_coef
    self.z_loss_coef = z_loss_coef
    self.dtype = dtype
    self.param_dtype = param_dtype

    ep, e, h, f = axis_name, num_experts, hidden, intermediate
    self.w_router = self._param(kernel_init, rngs, (h, e), (None, None))
    # Fan-in scaling over H, as for separate [E, H, F] gate and up weights.
    self.w_gate_up = self._param(expert_init, rngs, (e, h, 2 * f), (ep, None, None))
    self.w_down = self._param(expert_init, rngs, (e, f, h), (ep, None, None))
    if shared_intermediate is not None:
      s = shared_intermediate
      self.shared_gate = self._param(kernel_init, rngs, (h, s), (None, None))
      self.shared_up = self._param(kernel_init, rngs, (h, s), (None, None))
      self.shared_down = self._param(kernel_init, rngs, (s, h), (None, None))

  def _param(self, init, rngs, shape, spec) -> nnx.Param:
    """A parameter with ``out_sharding`` metadata; placed on the mesh when one is known."""
    value = init(rngs.params(), shape, self.param_dtype)
    metadata: dict[str, tp.Any] = {"out_sharding": spec}
    if self.mesh is not None:
      metadata["mesh"] = self.mesh
    elif jax.sharding.get_abstract_mesh().empty:
      metadata["eager_sharding"] = False  # metadata only; the user places the state later
    return nnx.Param(value, **metadata)

  # -- sizes ------------------------------------------------------------------------------------

  def _resolve_mesh(self):
    mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
    needed = (self.axis_name, *self.data_axes)
    if mesh.empty or any(a not in mesh.axis_names for a in needed):
      raise ValueError(
          f"jax_ep.nn.MoE: no mesh with the axes {needed} (got "
          f"{dict(mesh.shape) if not mesh.empty else 'no mesh'}); pass mesh= to MoE(...) or "
          f"call it under `with jax.set_mesh(mesh):`.")
    return mesh

  def ep_config(self, num_tokens: int, mesh=None) -> EPConfig:
    """The ``EPConfig`` a call on ``num_tokens`` (global) tokens uses.

    Pass it to ``jax_ep.runtime.initialize([...])`` before using the triton backend.

    Args:
      num_tokens: tokens of the whole call (all devices), e.g. batch x sequence.
      mesh: the mesh (default: the layer's, or the one set with ``jax.set_mesh``).
    """
    mesh = self._resolve_mesh() if mesh is None else mesh
    ep_size = mesh.shape[self.axis_name]
    shards = ep_size * math.prod(mesh.shape[a] for a in self.data_axes)
    if num_tokens % shards:
      axes = (*self.data_axes, self.axis_name)
      raise ValueError(
          f"jax_ep.nn.MoE: {num_tokens} tokens do not split evenly over the {shards} devices "
          f"of axes {axes}; make batch x sequence a multiple of {shards}.")
    config = EPConfig(
        num_experts=self.num_experts, topk=self.topk, hidden=self.hidden,
        max_tokens_per_rank=num_tokens // shards, axis_name=self.axis_name,
        expert_alignment=self.expert_alignment, backend=self.backend,
        **_ep_options(self.timeout_s, self.num_sms))
    if self.capacity_factor is not None:
      capacity = config.balanced_capacity(ep_size, self.capacity_factor)
      config = dataclasses.replace(config, capacity=capacity)
    return config

  # -- forward ----------------------------------------------------------------------------------

  def __call__(self, x: jax.Array) -> tuple[jax.Array, MoEAux]:
    """Apply the block.

    Args:
      x: ``[..., hidden]`` tokens (e.g. ``[batch, seq, hidden]``); the token count (product of
        the leading dimensions) must be a multiple of the devices on the EP and data axes.
        Sharding the leading dimension over those axes beforehand avoids a reshuffle.

    Returns:
      (``[..., hidden]`` output in the compute dtype, ``MoEAux``).
    """
    if x.ndim < 1 or x.shape[-1] != self.hidden:
      raise ValueError(
          f"jax_ep.nn.MoE: x must be [..., hidden={self.hidden}]; got x.shape={x.shape}.")
    mesh = self._resolve_mesh()
    ep = self.axis_name
    num_tokens = math.prod(x.shape[:-1])
    config = self.ep_config(num_tokens, mesh)
    dtype = self.dtype if self.dtype is not None else x.dtype
    tokens = x.reshape(num_tokens, self.hidden).astype(dtype)

    logits = tokens.astype(jnp.float32) @ self.w_router[...].astype(jnp.float32)
    topk_weights, topk_idx, probs = route(logits, self.topk, renormalize=self.renormalize)
    load_balancing, z_loss, tokens_per_expert = router_losses(logits, probs, topk_idx)

    gmm_backend = "xla" if self.backend == "xla" else "auto"

    def experts(x, topk_idx, topk_weights, w_gate_up, w_down):
      # Per shard: x [N/(D*W), H], topk_* [N/(D*W), K], w_* [E/W, ...] (D: data shards).
      recv_x, _, layout = jax_ep.dispatch(x, topk_idx, topk_weights, config=config)
      y = jax_ep.experts.swiglu_fused(recv_x, w_gate_up, w_down, layout, backend=gmm_backend)
      out = jax_ep.combine(y.astype(recv_x.dtype), layout, config=config)
      return out, lax.psum(layout.num_dropped, (*self.data_axes, ep))

    weights = [self.w_gate_up[...].astype(dtype), self.w_down[...].astype(dtype)]
    operands = [tokens, topk_idx, topk_weights, *weights]
    token_spec = P((*self.data_axes, ep)) if self.data_axes else P(ep)
    specs = (token_spec,) * 3 + (P(ep),) * 2
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(axis_types[a] == jax.sharding.AxisType.Explicit for a in (ep, *self.data_axes)):
      # Explicit axes: shard_map takes inputs only as already sharded as its in_specs.
      operands = [jax.sharding.reshard(a, NamedSharding(mesh, spec))
                  for a, spec in zip(operands, specs)]
    out, num_dropped = jax.shard_map(
        experts, mesh=mesh, in_specs=specs, out_specs=(token_spec, P()), check_vma=False,
    )(*operands)

    if self.shared_intermediate is not None:
      out = out + _swiglu(tokens, self.shared_gate[...].astype(dtype),
                          self.shared_up[...].astype(dtype),
                          self.shared_down[...].astype(dtype))

    aux = MoEAux(
        loss=self.load_balancing_coef * load_balancing + self.z_loss_coef * z_loss,
        load_balancing_loss=load_balancing,
        router_z_loss=z_loss,
        tokens_per_expert=tokens_per_expert,
        num_dropped=num_dropped,
    )
    return out.reshape(x.shape[:-1] + (self.hidden,)), aux
