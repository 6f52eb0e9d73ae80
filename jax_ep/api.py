"""The public functions: dispatch, combine, grouped_matmul.

Each checks its inputs at trace time, picks a backend (``jax_ep.backends``), and wraps the
backend's row movement in a ``custom_vjp``:

  dispatch backward  = an unweighted combine of d recv_x (-> dx), and the per-slot gather of
                       d recv_weights (-> d topk_weights);
  combine backward   = a dispatch of d out along the same layout (-> d y = w * rows) and one dot
                       product per row (-> d row_weights, which flows back into d topk_weights).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from jax_ep import backends
from jax_ep.config import EPConfig
from jax_ep.layout import DispatchLayout


# -- checks -------------------------------------------------------------------------------------

def _ep_size(api: str, config: EPConfig) -> int:
  """The size of ``config.axis_name``; a clear error when it is not bound here."""
  try:
    size = lax.axis_size(config.axis_name)
  except NameError as e:
    raise ValueError(
        f"{api}: axis_name={config.axis_name!r} is not bound here. Call {api} per shard inside "
        f"jax.shard_map(..., mesh=mesh) over a mesh with an axis named {config.axis_name!r}, or "
        f"set EPConfig(axis_name=...) to the mesh axis the experts are sharded over."
    ) from e
  config.check_ep_size(size)
  return size


def _check_config(api: str, config) -> None:
  if not isinstance(config, EPConfig):
    raise TypeError(f"{api}: config must be a jax_ep.EPConfig, got {type(config).__name__}.")


def _check_dispatch_inputs(x, topk_idx, topk_weights, config: EPConfig):
  api = "jax_ep.dispatch"
  if x.ndim != 2:
    raise ValueError(f"{api}: x must be [num_tokens, hidden]; got {x.shape=}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{api}: x must have a floating dtype (bf16, f16, f32); got {x.dtype=}.")
  t, h = x.shape
  if h != config.hidden:
    raise ValueError(f"{api}: x.shape[1]={h} must equal EPConfig.hidden={config.hidden}.")
  if t > config.max_tokens_per_rank:
    raise ValueError(
        f"{api}: x has {t} tokens, more than EPConfig.max_tokens_per_rank="
        f"{config.max_tokens_per_rank}; raise max_tokens_per_rank or split the batch.")
  if topk_idx.shape != (t, config.topk):
    raise ValueError(
        f"{api}: topk_idx must be [num_tokens, topk] = {(t, config.topk)}; got {topk_idx.shape=}.")
  if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
    raise ValueError(f"{api}: topk_idx must have an integer dtype (int32); got {topk_idx.dtype=}.")
  if topk_weights is not None:
    if topk_weights.shape != (t, config.topk):
      raise ValueError(
          f"{api}: topk_weights must be [num_tokens, topk] = {(t, config.topk)}; got "
          f"{topk_weights.shape=}.")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
      raise ValueError(
          f"{api}: topk_weights must have a floating dtype (float32); got {topk_weights.dtype=}.")


# -- backend choice ------------------------------------------------------------------------------

def _backend(config: EPConfig):
  """The backend module for this config: "auto" takes triton when its runtime is up on GPU."""
  if config.backend == "xla":
    return backends.get("xla")
  from jax_ep import runtime
  if config.backend == "triton":
    if not runtime.is_initialized():
      raise RuntimeError(
          "jax_ep: EPConfig(backend='triton') needs its GPU runtime: call "
          "jax_ep.runtime.initialize([config, ...]) once per process (after "
          "jax.distributed.initialize() in multi-process jobs), or use backend='xla'/'auto'.")
    triton_backend = backends.get("triton")
    triton_backend.check_usable(config)  # raises an error that says what to do
    return triton_backend
  if runtime.is_initialized() and jax.default_backend() == "gpu":
    triton_backend = backends.get("triton")
    if triton_backend.usable(config):
      return triton_backend
  return backends.get("xla")


# -- dispatch ------------------------------------------------------------------------------------

def dispatch(x, topk_idx, topk_weights=None, *, config: EPConfig):
  """Send each token row to the ranks holding its selected experts, expert-major.

  Call per shard inside ``jax.shard_map`` (``config.axis_name`` bound, size W).

  Args:
    x: ``[num_tokens, hidden]`` token rows, floating dtype; num_tokens <= max_tokens_per_rank.
    topk_idx: ``[num_tokens, topk]`` int global expert ids in [-1, E); -1 selects nothing.
      Ids outside that range are treated as unselected and counted in ``layout.num_invalid``.
      With ``EPConfig(check_expert_ids=True)`` dispatch adds a ``checkify.check`` instead: wrap
      the step in ``jax.experimental.checkify.checkify`` and call ``err.throw()``.
    topk_weights: ``[num_tokens, topk]`` float routing weights, or None (all ones).
    config: the EPConfig.

  Returns:
    recv_x: ``[C, hidden]`` (dtype of x) rows for this rank's experts, expert-major; inside a
      group ordered by (source rank, source token, k); rows outside groups are zero.
    recv_weights: ``[C] float32`` the routing weight of each row (0 outside groups).
    layout: the DispatchLayout that ``combine`` needs.
  """
  _check_config("jax_ep.dispatch", config)
  x = jnp.asarray(x)
  topk_idx = jnp.asarray(topk_idx)
  if topk_weights is not None:
    topk_weights = jnp.asarray(topk_weights)
  _check_dispatch_inputs(x, topk_idx, topk_weights, config)
  _ep_size("jax_ep.dispatch", config)
  if topk_weights is None:
    topk_weights = jnp.ones(topk_idx.shape, jnp.float32)
  topk_weights = topk_weights.astype(jnp.float32)
  idx = topk_idx.astype(jnp.int32)
  invalid = (idx < -1) | (idx >= config.num_experts)
  num_invalid = jnp.sum(invalid, dtype=jnp.int32)
  if config.check_expert_ids:
    checkify.check(
        num_invalid == 0,
        f"jax_ep.dispatch: {{n}} topk_idx value(s) lie outside [-1, {config.num_experts}) "
        f"(EPConfig.check_expert_ids=True). Fix the router, or set check_expert_ids=False to "
        f"treat them as unselected and count them in layout.num_invalid.", n=num_invalid)
  idx = jnp.where(invalid, -1, idx)
  return _dispatch(x, idx, topk_weights, num_invalid, config, _backend(config))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dispatch(x, topk_idx, topk_weights, num_invalid, config, backend):
  return backend.dispatch(x, topk_idx, topk_weights, num_invalid, config)


def _dispatch_fwd(x, topk_idx, topk_weights, num_invalid, config, backend):
  recv_x, recv_weights, layout = backend.dispatch(x, topk_idx, topk_weights, num_invalid, config)
  return (recv_x, recv_weights, layout), layout


def _dispatch_bwd(config, backend, layout, cts):
  d_recv_x, d_recv_weights, d_layout = cts
  ones = jnp.ones((layout.capacity,), jnp.float32)
  dx = backend.combine_rows(d_recv_x, ones, layout, config)
  d_rows = d_recv_weights.astype(jnp.float32) + d_layout.row_weights.astype(jnp.float32)
  d_topk_weights = backend.gather_slots(d_rows, layout, config)
  return dx, _zero_cotangent(layout.topk_idx), d_topk_weights, _zero_cotangent(layout.num_invalid)


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _zero_cotangent(a):
  """The zero cotangent of an integer array (float0)."""
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _zero_layout_cotangent(layout: DispatchLayout, d_row_weights) -> DispatchLayout:
  fields = {name: _zero_cotangent(getattr(layout, name))
            for name in ("group_sizes", "group_offsets", "num_recv_rows", "num_dropped",
                         "num_invalid", "topk_idx", "recv_pos")}
  return DispatchLayout(row_weights=d_row_weights, **fields)


# -- combine -------------------------------------------------------------------------------------

def combine(y, layout: DispatchLayout, *, config: EPConfig):
  """Return expert outputs to the tokens' owners, weighted and summed.

  Args:
    y: ``[C, hidden]`` expert outputs in recv_x's row order (dtype of x, or float32).
    layout: the DispatchLayout returned by ``dispatch`` with the same config.
    config: the EPConfig used for dispatch.

  Returns:
    ``[num_tokens, hidden]`` (dtype of y): out[t] = sum_k w[t, k] * y[row(t, k)] over the delivered
    (t, k) pairs, in a fixed order (per rank in k order, then ranks in order).
  """
  api = "jax_ep.combine"
  _check_config(api, config)
  if not isinstance(layout, DispatchLayout):
    raise TypeError(f"{api}: layout must be the DispatchLayout from jax_ep.dispatch; got "
                    f"{type(layout).__name__}.")
  y = jnp.asarray(y)
  if y.ndim != 2 or y.shape[0] != layout.capacity:
    raise ValueError(
        f"{api}: y must be [capacity, hidden] = [{layout.capacity}, hidden] like recv_x; got "
        f"{y.shape=}.")
  if not jnp.issubdtype(y.dtype, jnp.floating):
    raise ValueError(f"{api}: y must have a floating dtype; got {y.dtype=}.")
  w = _ep_size(api, config)
  if layout.recv_pos.shape[0] != w or layout.topk_idx.shape[1] != config.topk:
    raise ValueError(
        f"{api}: the layout was made for another EP size or topk ({layout.recv_pos.shape=}, "
        f"{layout.topk_idx.shape=}); pass the config used for dispatch (axis size {w}, "
        f"topk {config.topk}).")
  if layout.capacity != config.capacity_rows(w):
    raise ValueError(
        f"{api}: layout capacity {layout.capacity} != config.capacity_rows({w}) = "
        f"{config.capacity_rows(w)}; pass the config used for dispatch.")
  return _combine(y, layout, config, _backend(config))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _combine(y, layout, config, backend):
  return backend.combine_rows(y, layout.row_weights, layout, config)


def _combine_fwd(y, layout, config, backend):
  return backend.combine_rows(y, layout.row_weights, layout, config), (y, layout)


def _combine_bwd(config, backend, res, d_out):
  y, layout = res
  rows = backend.dispatch_rows(d_out, layout, config)  # [C, H] d_out of each row's token
  rows32 = rows.astype(jnp.float32)
  d_y = (rows32 * layout.row_weights[:, None]).astype(y.dtype)
  d_row_weights = jnp.sum(rows32 * y.astype(jnp.float32), axis=-1)
  return d_y, _zero_layout_cotangent(layout, d_row_weights)


_combine.defvjp(_combine_fwd, _combine_bwd)


# -- grouped matmul ------------------------------------------------------------------------------

def grouped_matmul(recv_x, w, layout: DispatchLayout, *, backend: str = "auto"):
  """Per-expert matrix product over the groups of ``recv_x``.

  Args:
    recv_x: ``[C, hidden]`` rows from ``dispatch`` (or any [C, H] array in that row order).
    w: ``[E_local, hidden, N]`` one matrix per local expert.
    layout: the DispatchLayout from ``dispatch``.
    backend: "auto" (triton when its kernels can run here), "xla" or "triton".

  Returns:
    ``[C, N]``: rows of group e times ``w[e]``; rows outside groups are zero. Differentiable in
    recv_x and w. Accumulates in float32; the result has the promoted dtype of recv_x and w.
  """
  recv_x, w, impl = _gmm_checked("jax_ep.grouped_matmul", recv_x, w, layout, backend)
  return impl.grouped_matmul(recv_x, w, layout)


def _gmm_checked(api: str, recv_x, w, layout, backend: str, w_name: str = "w"):
  """``grouped_matmul``'s input checks (errors name ``api`` and call w ``w_name``): recv_x and
  w as arrays, and the backend module that runs them."""
  if not isinstance(layout, DispatchLayout):
    raise TypeError(f"{api}: layout must be the DispatchLayout from jax_ep.dispatch; got "
                    f"{type(layout).__name__}.")
  recv_x = jnp.asarray(recv_x)
  w = jnp.asarray(w)
  if recv_x.ndim != 2 or recv_x.shape[0] != layout.capacity:
    raise ValueError(f"{api}: recv_x must be [capacity={layout.capacity}, hidden]; got "
                     f"{recv_x.shape=}.")
  if w.ndim != 3 or w.shape[0] != layout.num_local_experts or w.shape[1] != recv_x.shape[1]:
    raise ValueError(
        f"{api}: {w_name} must be [num_local_experts={layout.num_local_experts}, hidden="
        f"{recv_x.shape[1]}, N]; got {w_name}.shape={w.shape}.")
  for name, a in (("recv_x", recv_x), (w_name, w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{api}: {name} must have a floating dtype; got {a.dtype}.")
  if backend not in ("auto", "xla", "triton"):
    raise ValueError(f"{api}: backend={backend!r} must be 'auto', 'xla' or 'triton'.")
  return recv_x, w, _gmm_backend(backend)


def _gmm_backend(name: str):
  if name == "xla":
    return backends.get("xla")
  if name == "triton":
    triton_backend = backends.get("triton")
    triton_backend.check_gmm_usable()
    return triton_backend
  if jax.default_backend() == "gpu":
    try:
      triton_backend = backends.get("triton")
    except ImportError:
      return backends.get("xla")
    if triton_backend.gmm_usable():
      return triton_backend
  return backends.get("xla")
