"""Expert functions built on ``grouped_matmul``: what runs between dispatch and combine.

``swiglu`` takes the gate and up weights as two arrays; ``swiglu_fused`` takes them side by
side in one ``[E_local, hidden, 2 * ffn]`` array and multiplies both with one grouped matmul
(``recv_x`` read once, twice the columns per launch, one backward launch each for dx and dw
instead of two). Same values; the fused form is faster on the triton path (one H200,
2026-11-23, forward + backward of the whole block: 15.6 vs 16.7 ms at DeepSeek-V3 sizes, 2.09
vs 2.41 ms at Qwen3-MoE sizes; docs/GROUPED_GEMM.md, "SwiGLU"), and it is what
``jax_ep.nn.MoE`` stores. On the triton backend its forward (not differentiated: inference)
runs gate, up and the activation as one kernel whose epilogue writes ``silu(gate) * up`` from
the f32 accumulators, so the ``[C, 2 * ffn]`` product never goes to memory
(``jax_ep.backends.triton_gemm.grouped_glu``); under ``jax.grad`` it runs the product and the
activation apart, since the backward needs both halves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep.api import _gmm_checked, grouped_matmul
from jax_ep.layout import DispatchLayout


def _glu(gate, up):
  """``silu(gate) * up`` in float32, in the dtype of ``gate``."""
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _glu_of(gate_up):
  """``_glu`` of ``[gate | up]`` (``[C, 2 * ffn]``, gate the first half)."""
  ffn = gate_up.shape[1] // 2
  return _glu(gate_up[:, :ffn], gate_up[:, ffn:])


def _check_down(name: str, w_down, experts: int, hidden: int, ffn: int):
  if w_down.shape != (experts, ffn, hidden):
    raise ValueError(
        f"jax_ep.experts.{name}: w_down must be [E_local, ffn, hidden] = "
        f"{(experts, ffn, hidden)}; got {w_down.shape=}.")


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
    ``[C, hidden]``, zero on rows outside groups. ``swiglu_fused`` computes the same with the
    gate and up weights in one array, faster.
  """
  if w_gate.shape != w_up.shape:
    raise ValueError(f"jax_ep.experts.swiglu: {w_gate.shape=} must equal {w_up.shape=}.")
  _check_down("swiglu", w_down, w_gate.shape[0], w_gate.shape[1], w_gate.shape[2])
  gate = grouped_matmul(recv_x, w_gate, layout, backend=backend)
  up = grouped_matmul(recv_x, w_up, layout, backend=backend)
  return grouped_matmul(_glu(gate, up), w_down, layout, backend=backend)


def swiglu_fused(recv_x, w_gate_up, w_down, layout: DispatchLayout, *,
                 backend: str = "auto"):
  """``swiglu`` with the gate and up weights side by side: one grouped matmul for both.

  Args:
    recv_x: ``[C, hidden]`` rows from ``jax_ep.dispatch``.
    w_gate_up: ``[E_local, hidden, 2 * ffn]``: columns ``[:ffn]`` the gate weights, ``[ffn:]``
      the up weights (``jnp.concatenate([w_gate, w_up], axis=-1)``).
    w_down: ``[E_local, ffn, hidden]``.
    layout: the DispatchLayout from dispatch.
    backend: grouped_matmul's backend ("auto", "xla" or "triton").

  Returns:
    ``[C, hidden]``, zero on rows outside groups.
  """
  if w_gate_up.ndim != 3 or w_gate_up.shape[2] % 2:
    raise ValueError(
        f"jax_ep.experts.swiglu_fused: w_gate_up must be [E_local, hidden, 2 * ffn] (gate "
        f"columns, then up columns); got {w_gate_up.shape=}.")
  experts, hidden, ffn = w_gate_up.shape[0], w_gate_up.shape[1], w_gate_up.shape[2] // 2
  _check_down("swiglu_fused", w_down, experts, hidden, ffn)
  recv_x, w_gate_up, impl = _gmm_checked("jax_ep.experts.swiglu_fused", recv_x, w_gate_up,
                                         layout, backend, w_name="w_gate_up")
  if hasattr(impl, "grouped_glu"):  # the product and the activation in one kernel
    h = impl.grouped_glu(recv_x, w_gate_up, layout)
  else:
    h = _glu_of(impl.grouped_matmul(recv_x, w_gate_up, layout))
  return grouped_matmul(h, w_down, layout, backend=backend)
