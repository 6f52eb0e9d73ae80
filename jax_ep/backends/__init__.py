"""Backends of jax_ep. Each one is a module with the same five functions; ``api.py`` wraps them
in ``custom_vjp`` and input checks, so a backend only moves rows.

Every function runs per shard, where ``config.axis_name`` is bound (inside ``shard_map``):

  dispatch(x [T,H], topk_idx [T,K] int32 (already sanitized: -1 or in [0,E)),
           topk_weights [T,K] f32, num_invalid [] int32, config)
      -> recv_x [C,H], recv_weights [C] f32, layout (DispatchLayout)
  dispatch_rows(x [T,H], layout, config) -> [C,H]
      send rows again along an existing layout (combine's backward), unweighted.
  combine_rows(y [C,H], row_weights [C] f32, layout, config) -> [T,H] (dtype of y)
      out[t] = sum_k row_weights[row(t,k)] * y[row(t,k)] over delivered pairs; the expert rank
      sums a token's rows first (in k order), the owner adds ranks in rank order.
  gather_slots(values [C] f32, layout, config) -> [T,K] f32
      values[row(t,k)] for delivered pairs, else 0 (weight gradients).
  grouped_matmul(recv_x [C,H], w [E_local,H,N], layout) -> [C,N]

A backend may also provide, and ``jax_ep.experts.swiglu_fused`` then calls instead of
``grouped_matmul`` followed by the activation in XLA:

  grouped_glu(recv_x [C,H], w_gate_up [E_local,H,2F], layout) -> [C,F]
      silu(recv_x @ w_gate_up[e][:, :F]) * (recv_x @ w_gate_up[e][:, F:]) per group.

A backend other than xla also provides the checks ``api.py`` calls when choosing it:

  usable(config) -> bool        can it run this config here (GPU, runtime sized for it)?
  check_usable(config) -> None  raise an error that says what to do when it cannot
                                (e.g. "call jax_ep.runtime.initialize([config]) first").
  gmm_usable() -> bool, check_gmm_usable() -> None   the same for grouped_matmul alone.

The xla backend is the reference: every other backend must give the same recv_x,
recv_weights and layout bit for bit, and combine within float tolerance.
"""
from __future__ import annotations

import importlib

_MODULES = {"xla": "jax_ep.backends.xla", "triton": "jax_ep.backends.triton"}


def get(name: str):
  """The backend module for ``name`` ("xla" or "triton")."""
  return importlib.import_module(_MODULES[name])


def varying(x, axis_name: str):
  """``x`` typed as varying over the EP axis ``axis_name`` (shard_map's type check), as the
  output of an all-to-all over it is: for outputs that every rank computes on its own (a
  custom call, the zeros of a T = 0 call, the exchange that W = 1 skips). Outside a
  shard_map over that axis, or where ``x`` already varies over it, ``x`` unchanged."""
  import jax
  from jax import lax
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  if axis_name not in manual:  # e.g. under vmap(axis_name=...): nothing to mark
    return x
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)          # jax >= 0.11
  vary = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
  if vary is None or axis_name in vary:
    return x
  return lax.pcast(x, axis_name, to="varying")
