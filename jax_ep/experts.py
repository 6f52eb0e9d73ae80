"""Expert functions built on ``grouped_matmul``: what runs between dispatch and combine."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.api import grouped_matmul
from jax_ep.layout import DispatchLayout


def swiglu(recv_x, w_gate, w_up, w_down, layout: DispatchLayout, *, backend: str = "auto"):
  """SwiGLU experts: ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` for each group e.

  Args:
    recv_x: ``[C, hidden]`` rows from ``jax_ep.dispatch``.
    w_gate: ``[E_local, hidden, ffn]``.
    w_up: ``[E_local, hidden, ffn]``.
    w_down: ``[E_local, ffn, hidden]``.
    layout: the DispatchLayout from dispatch.
    backend: grouped_matmul's backend ("auto", "xla" or "triton").

  Returns:
    ``[C, hidden]``, zero on rows outside groups.
  """
  if w_gate.shape != w_up.shape:
    raise ValueError(f"jax_ep.experts.swiglu: {w_gate.shape=} must equal {w_up.shape=}.")
  if w_down.shape != (w_gate.shape[0], w_gate.shape[2], w_gate.shape[1]):
    raise ValueError(
        f"jax_ep.experts.swiglu: w_down must be [E_local, ffn, hidden] = "
        f"{(w_gate.shape[0], w_gate.shape[2], w_gate.shape[1])}; got {w_down.shape=}.")
  gate = grouped_matmul(recv_x, w_gate, layout, backend=backend)
  up = grouped_matmul(recv_x, w_up, layout, backend=backend)
  h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)
  return grouped_matmul(h, w_down, layout, backend=backend)
