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


# -- running and checking a dispatch/combine round trip -----------------------------------------

PUBLIC_FIELDS = ("group_sizes", "group_offsets", "num_recv_rows", "num_dropped", "num_invalid")


def roundtrip_fn(config, mesh, combine_scale: float = 1.5):
  """A jitted ``f(x, idx, weights)`` over ``mesh`` (inputs ``[W * T, ...]`` sharded on the EP axis).

  Per shard it dispatches, combines ``combine_scale * recv_x`` and returns
  ``(recv_x [W, C, H], recv_weights [W, C], {public layout field: [W, ...]}, out [W * T, H])``.
  """
  import jax
  from jax.sharding import PartitionSpec as P
  import jax_ep

  ax = config.axis_name

  def per_shard(x, idx, weights):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, weights, config=config)
    out = jax_ep.combine(recv_x * combine_scale, layout, config=config)
    public = {f: getattr(layout, f)[None] for f in PUBLIC_FIELDS}
    return recv_x[None], recv_w[None], public, out

  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(ax),) * 3, out_specs=P(ax)))


def check_roundtrip(config, x, idx, weights, outputs, combine_scale: float = 1.5,
                    combine_tol: float = 1e-6):
  """Assert that ``roundtrip_fn``'s outputs obey API.md for ``[W, T, ...]`` inputs.

  recv_x, recv_weights and every public layout field must equal the loop reference exactly
  (which also proves provenance, order and zero padding); combine within ``combine_tol``.
  Returns the ReferenceDispatch.
  """
  recv_x, recv_w, public, out = (np.asarray(outputs[0]), np.asarray(outputs[1]),
                                 {k: np.asarray(v) for k, v in outputs[2].items()},
                                 np.asarray(outputs[3]))
  w_, t_ = np.shape(idx)[:2]
  ref = reference_dispatch(x, idx, weights, config.num_experts, config.capacity_rows(w_),
                           config.expert_alignment)
  np.testing.assert_array_equal(recv_x, ref.recv_x, err_msg="recv_x")
  np.testing.assert_array_equal(recv_w, ref.recv_weights, err_msg="recv_weights")
  for f in PUBLIC_FIELDS:
    np.testing.assert_array_equal(public[f], getattr(ref, f), err_msg=f)
  expected = reference_combine(ref.recv_x.astype(np.float64) * combine_scale, ref, t_,
                               np.shape(idx)[2])
  np.testing.assert_allclose(out.reshape(w_, t_, out.shape[-1]).astype(np.float64), expected,
                             rtol=combine_tol, atol=combine_tol, err_msg="combine")
  return ref


SOAK_SHAPES = (  # (W, T, H, E, K, capacity, alignment): a fixed pool, so each compiles once
    (1, 5, 8, 4, 2, None, 1),
    (2, 0, 8, 8, 2, None, 1),
    (2, 1, 8, 8, 3, None, 2),
    (2, 16, 16, 8, 4, 24, 4),
    (4, 7, 8, 16, 4, None, 1),
    (4, 16, 8, 16, 2, 8, 1),
    (4, 12, 16, 8, 3, 40, 8),
    (8, 4, 8, 16, 2, None, 1),
    (8, 9, 8, 32, 4, 16, 2),
    (8, 16, 4, 8, 8, 64, 1),
)
SOAK_KINDS = ROUTINGS + ("invalid",)


def soak_round(rng, shape, kind, devices):
  """One randomized round: build inputs of ``shape`` and routing ``kind``, run, check.

  Returns the (config, inputs) so callers can repeat it.
  """
  import jax
  import jax_ep
  w_, t_, h_, e_, k_, cap, align = shape
  config = jax_ep.EPConfig(num_experts=e_, topk=k_, hidden=h_, max_tokens_per_rank=max(t_, 1),
                           capacity=cap, expert_alignment=align, backend="xla")
  base = "uniform" if kind == "invalid" else kind
  idx = np.stack([make_routing(rng, base, t_, e_, k_, w_) for _ in range(w_)])
  if kind == "invalid":
    bad = rng.random(idx.shape) < 0.2
    idx = np.where(bad, rng.choice([-9, -2, e_, e_ + 3], size=idx.shape), idx).astype(np.int32)
  x = token_identity_rows(w_, t_, h_)
  weights = rng.random((w_, t_, k_)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(devices[:w_]), (config.axis_name,))
  fn = _cached_roundtrip(config, mesh)
  flat = lambda a: a.reshape((w_ * t_,) + a.shape[2:])
  outputs = fn(flat(x), flat(idx), flat(weights))
  check_roundtrip(config, x, idx, weights, outputs)
  return outputs


_ROUNDTRIP_CACHE: dict = {}


def _cached_roundtrip(config, mesh):
  key = (config, mesh)
  if key not in _ROUNDTRIP_CACHE:
    _ROUNDTRIP_CACHE[key] = roundtrip_fn(config, mesh)
  return _ROUNDTRIP_CACHE[key]


def soak(rounds: int, seed: int, devices=None, log=None) -> dict:
  """``rounds`` randomized dispatch/combine rounds against the loop references.

  Draws a shape from SOAK_SHAPES (1 to 8 ranks, T from 0 to 16, drops and alignment) and a routing
  from SOAK_KINDS per round. Raises AssertionError (with the round, shape and kind) on the first
  mismatch; returns counts of rounds per kind and the total rows dropped and invalid ids seen.
  """
  import jax
  devices = list(devices or jax.devices())
  shapes = [s for s in SOAK_SHAPES if s[0] <= len(devices)]
  rng = np.random.default_rng(seed)
  stats = {"rounds": 0, "dropped": 0, "invalid": 0, "kinds": {}}
  for i in range(rounds):
    shape = shapes[rng.integers(len(shapes))]
    kind = SOAK_KINDS[rng.integers(len(SOAK_KINDS))]
    try:
      outputs = soak_round(rng, shape, kind, devices)
    except AssertionError as e:
      raise AssertionError(f"soak round {i} (seed {seed}, shape {shape}, kind {kind}): {e}") from e
    stats["rounds"] += 1
    stats["dropped"] += int(np.sum(np.asarray(outputs[2]["num_dropped"])))
    stats["invalid"] += int(np.sum(np.asarray(outputs[2]["num_invalid"])))
    stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
    if log and (i + 1) % max(1, rounds // 20) == 0:
      log(f"soak: {i + 1}/{rounds} rounds ok")
  return stats


def output_hash(outputs) -> str:
  """A hex digest of every array in a pytree of outputs (for run-to-run determinism checks)."""
  import hashlib
  import jax
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(outputs):
    a = np.asarray(leaf)
    h.update(str((a.shape, a.dtype)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()
