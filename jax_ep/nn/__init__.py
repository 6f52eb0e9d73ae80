"""Flax NNX layers built on jax_ep's dispatch / grouped_matmul / combine.

Needs flax (the ``flax`` extra: ``pip install jax_ep[flax]``); ``import jax_ep`` alone does not
import it.

  MoE          a Mixture-of-Experts feed-forward block: top-k softmax router, SwiGLU experts
               sharded over the EP mesh axis, optional shared expert.
  MoEAux       what the block reports beside its output: auxiliary losses and routing counts.
  route        the router as a plain function (logits -> top-k ids and weights).
  router_losses  the load-balancing loss and router z-loss as functions of the router outputs.
"""
from __future__ import annotations

try:
  import flax.nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "jax_ep.nn needs flax (Flax NNX). Install it with `pip install 'jax_ep[flax]'` or "
      "`pip install flax`; the functional API (jax_ep.dispatch / combine) works without it."
  ) from e

from jax_ep.nn.moe import MoE, MoEAux, route, router_losses

__all__ = ["MoE", "MoEAux", "route", "router_losses"]
