"""Test helpers: routings that stress the contract, and independent reference computations.

The references here are written from API.md's sentences with plain numpy loops, independently of
any backend, so that tests compare a backend against the contract and not against itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np

ROUTINGS = ("uniform", "zipf", "one_expert", "empty", "empty_rank", "duplicates", "with_unselected")


def make_routing(rng: np.random.Generator, kind: str, num_tokens: int, num_experts: int,
                 topk: int, ep_size: int = 1) -> np.ndarray:
  """``[num_tokens, topk] int32`` expert ids of one of the ROUTINGS kinds.

  uniform: K distinct experts per token, uniformly at random.
  zipf: K distinct experts per token, expert popularity ~ 1 / rank^1.2 (skewed).
  one_expert: every slot of every token selects expert 0 ... K-1 (all on rank 0's first experts).
  empty: every slot is -1 (nothing is sent).
  empty_rank: uniform over experts, avoiding every expert of the last rank.
  duplicates: each token selects the same expert in several slots.
  with_unselected: uniform, then about a third of the slots set to -1.
  """
  t, e, k = num_tokens, num_experts, topk
  if kind in ("uniform", "with_unselected", "empty_rank"):
    allowed = e - (e // ep_size if kind == "empty_rank" and ep_size > 1 else 0)
    if allowed < k:
      allowed = e
    scores = rng.random((t, allowed))
    idx = np.argsort(scores, axis=1)[:, :k]
    if kind == "with_unselected":
      idx = np.where(rng.random((t, k)) < 0.33, -1, idx)
  elif kind == "zipf":
    p = 1.0 / np.arange(1, e + 1) ** 1.2
    p = p / p.sum()
    perm = rng.permutation(e)
    idx = np.stack([perm[rng.choice(e, size=k, replace=False, p=p)] for _ in range(t)]) \
        if t else np.zeros((0, k), np.int64)
  elif kind == "one_expert":
    idx = np.tile(np.arange(k) % e, (t, 1))
  elif kind == "empty":
    idx = -np.ones((t, k), np.int64)
  elif kind == "duplicates":
    first = rng.integers(0, e, size=(t, 1))
    idx = np.repeat(first, k, axis=1)
    if k > 2:
      idx[:, -1] = rng.integers(0, e, size=t)
  else:
    raise ValueError(f"make_routing: kind={kind!r} is not one of {ROUTINGS}.")
  return np.asarray(idx, np.int32).reshape(t, k)


def token_identity_rows(ep_size: int, num_tokens: int, hidden: int, dtype=np.float32) -> np.ndarray:
  """``[W, T, H]`` rows that prove their origin: row (s, t) holds s * 1000 + t + 1 in column 0,
  then a per-column pattern (exactly representable in bf16 for small sizes)."""
  s = np.arange(ep_size)[:, None, None]
  t = np.arange(num_tokens)[None, :, None]
  h = np.arange(hidden)[None, None, :]
  rows = np.where(h == 0, s * 1000 + t + 1, (s * 7 + t * 3 + h) % 61 - 30)
  return rows.astype(dtype)


@dataclasses.dataclass
class ReferenceDispatch:
  """What each rank should receive, per API.md, computed with loops.

  recv_x [W, C, H], recv_weights [W, C], group_sizes / group_offsets [W, E_local],
  num_dropped / num_recv_rows / num_invalid [W], and row_of[(s, t, k)] = (rank, row) for every
  delivered pair.
  """
  recv_x: np.ndarray
  recv_weights: np.ndarray
  group_sizes: np.ndarray
  group_offsets: np.ndarray
  num_recv_rows: np.ndarray
  num_dropped: np.ndarray
  num_invalid: np.ndarray
  row_of: dict


def reference_dispatch(x, topk_idx, topk_weights, num_experts, capacity, alignment=1):
  """Reference dispatch over all ranks at once.

  Args:
    x: ``[W, T, H]``; topk_idx: ``[W, T, K]``; topk_weights: ``[W, T, K]`` (or None).
  """
  x = np.asarray(x)
  idx = np.asarray(topk_idx)
  w_, t_, k_ = idx.shape
  weights = np.ones(idx.shape, np.float32) if topk_weights is None else np.asarray(
      topk_weights, np.float32)
  e_local = num_experts // w_
  invalid = (idx < -1) | (idx >= num_experts)
  idx = np.where(invalid, -1, idx)
  recv_x = np.zeros((w_, capacity, x.shape[-1]), x.dtype)
  recv_w = np.zeros((w_, capacity), np.float32)
  sizes = np.zeros((w_, e_local), np.int32)
  offsets = np.zeros((w_, e_local), np.int32)
  dropped = np.zeros((w_,), np.int32)
  row_of = {}
  for r in range(w_):
    entries = [[] for _ in range(e_local)]
    for s in range(w_):
      for t in range(t_):
        for k in range(k_):
          g = idx[s, t, k]
          if g >= 0 and g // e_local == r:
            entries[g % e_local].append((s, t, k))
    off = 0
    for e in range(e_local):
      offsets[r, e] = min(off, capacity)
      for j, (s, t, k) in enumerate(entries[e]):
        pos = off + j
        if pos < capacity:
          recv_x[r, pos] = x[s, t]
          recv_w[r, pos] = weights[s, t, k]
          row_of[(s, t, k)] = (r, pos)
          sizes[r, e] += 1
        else:
          dropped[r] += 1
      off = -(-(off + len(entries[e])) // alignment) * alignment
  return ReferenceDispatch(recv_x, recv_w, sizes, offsets, sizes.sum(1).astype(np.int32), dropped,
                           invalid.reshape(w_, -1).sum(1).astype(np.int32), row_of)


def reference_combine(y, ref: ReferenceDispatch, num_tokens: int, topk: int):
  """``[W, T, H] float64``: out[s, t] = sum_k w[s,t,k] * y[rank, row(s,t,k)] over delivered pairs."""
  y = np.asarray(y, np.float64)
  w_ = y.shape[0]
  out = np.zeros((w_, num_tokens, y.shape[-1]), np.float64)
  for (s, t, k), (r, pos) in ref.row_of.items():
    out[s, t] += float(ref.recv_weights[r, pos]) * y[r, pos]
  return out


def dense_moe(x, topk_idx, topk_weights, expert_fn, num_experts):
  """Dense single-device MoE (jax): out[t] = sum_k w[t, k] * expert_fn(idx[t, k], x[t]).

  ``expert_fn(e, x)`` maps ``[N, H]`` rows of expert e to outputs; unselected (-1) or invalid
  slots contribute 0. Differentiable in x, topk_weights and whatever expert_fn closes over.
  """
  import jax.numpy as jnp
  out = 0.0
  for e in range(num_experts):
    w_e = jnp.sum(jnp.where(topk_idx == e, topk_weights, 0.0), axis=-1)  # [T]
    out = out + w_e[:, None] * expert_fn(e, x).astype(jnp.float32)
  return out
