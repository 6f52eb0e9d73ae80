"""Test helpers: routings that stress the contract, and independent reference computations.

The references here are written from API.md's sentences with plain numpy loops, independently of
any backend, so that tests compare a backend against the contract and not against itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jax_ep.config import align_up

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


# -- comparing large outputs on the device -------------------------------------------------------
#
# Fetching GB-sized outputs to numpy and comparing them there takes minutes; these helpers compare
# on the device (one jitted program per set of shapes) and fetch a few numbers: per array the
# count of differing rows and elements, the first differing row indices and the largest
# difference, plus an order-independent digest of each array's bit pattern.

DISPATCH_OUTPUTS = ("recv_x", "recv_weights", "group_sizes", "group_offsets", "num_recv_rows",
                    "num_dropped", "num_invalid", "topk_idx", "recv_pos", "row_weights")
"""Names of dispatch's outputs in the order ``device_fwd_fn`` returns them (layout fields last)."""
LAYOUT_FIELDS = DISPATCH_OUTPUTS[2:]


def _u32_bits(a):
  """``a``'s bit pattern widened to uint32 (same shape; 8-byte dtypes get a trailing axis of 2)."""
  import jax.numpy as jnp
  from jax import lax
  dt = jnp.dtype(a.dtype)
  if dt == jnp.bool_:
    return a.astype(jnp.uint32)
  if dt.itemsize == 8:
    return lax.bitcast_convert_type(a, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[dt.itemsize]
  u = a if dt == jnp.dtype(unsigned) else lax.bitcast_convert_type(a, unsigned)
  return u.astype(jnp.uint32)


def _fmix32(h):
  """MurmurHash3's 32-bit finalizer (uint32 -> uint32, a bijection that mixes every bit)."""
  import jax.numpy as jnp
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_digest(a):
  """``[2] uint32``: two sums (mod 2^32) of mixed (bits, position) words of ``a``.

  Sums of integers do not depend on the reduction order, so the digest of an array is the same
  however XLA splits the reduction (over shards too); any change of one element changes both
  lanes except with probability ~2^-64.
  """
  import jax.numpy as jnp
  from jax import lax
  u = _u32_bits(a)
  pos = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):
    pos = pos + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % (1 << 32))
    stride *= u.shape[d]
  h1 = jnp.sum(_fmix32(u ^ _fmix32(pos + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  h2 = jnp.sum(_fmix32(u + _fmix32(pos ^ jnp.uint32(0x7F4A7C15)) * jnp.uint32(3)),
               dtype=jnp.uint32)
  return jnp.stack([h1, h2])


def _pair_stats(a, b, tol, n_first: int):
  """Device-side comparison of ``a`` (actual) with ``b`` (expected), same shape and dtype.

  Rows are the last axis (elements for 0-d / 1-d arrays). ``tol`` None compares bit patterns;
  ``(rtol, atol)`` accepts ``|a - b| <= atol + rtol * |b|`` (identical bits always pass, NaNs
  included). Returns int32 [4] (bad rows, bad elements, elements whose bits differ, total rows),
  the flat indices of the first ``n_first`` bad rows (-1 fill) and the largest ``|a - b|`` over
  elements whose bits differ (float dtypes; NaN if a NaN differs).
  """
  import jax.numpy as jnp
  ne = _u32_bits(a) != _u32_bits(b)
  if ne.ndim > a.ndim:  # 8-byte dtypes
    ne = jnp.any(ne, axis=-1)
  floating = jnp.issubdtype(a.dtype, jnp.floating)
  if floating:
    fa, fb = a.astype(jnp.float32), b.astype(jnp.float32)
    diff = jnp.abs(fa - fb)
    max_err = jnp.max(jnp.where(ne, diff, 0.0), initial=0.0)
    nan_differs = jnp.any(ne & (jnp.isnan(fa) | jnp.isnan(fb)))
    max_err = jnp.where(nan_differs, jnp.float32(jnp.nan), max_err)
  else:
    max_err = jnp.zeros((), jnp.float32)
  if tol is None or not floating:
    bad = ne
  else:
    rtol, atol = tol
    bad = ne & ~(diff <= atol + rtol * jnp.abs(fb))
  rows = bad if bad.ndim <= 1 else jnp.any(bad, axis=-1)
  rows = jnp.ravel(rows)
  first = jnp.nonzero(rows, size=n_first, fill_value=-1)[0].astype(jnp.int32)
  counts = jnp.stack([jnp.sum(rows, dtype=jnp.int32), jnp.sum(bad, dtype=jnp.int32),
                      jnp.sum(ne, dtype=jnp.int32), jnp.int32(rows.size)])
  return counts, first, max_err


_STATS_FNS: dict = {}


def _replicated(arrays):
  """A replicated NamedSharding on the mesh of the first mesh-sharded array (None if none)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  for a in arrays:
    s = getattr(a, "sharding", None)
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, P())
  return None


def _stats_fn(tols: tuple, n_first: int, repl):
  """One jitted program: (actuals, expecteds) -> (counts [L, 4], first [L, n], max_err [L],
  digests of the actuals [L, 2]); outputs replicated so every process can read them."""
  key = (tols, n_first, repl)
  if key not in _STATS_FNS:
    import jax
    import jax.numpy as jnp

    def fn(actuals, expecteds):
      stats = [_pair_stats(a, b, t, n_first) for a, b, t in zip(actuals, expecteds, tols)]
      digests = [_leaf_digest(a) for a in actuals]
      if not stats:
        return (jnp.zeros((0, 4), jnp.int32), jnp.zeros((0, n_first), jnp.int32),
                jnp.zeros((0,), jnp.float32), jnp.zeros((0, 2), jnp.uint32))
      return (jnp.stack([s[0] for s in stats]), jnp.stack([s[1] for s in stats]),
              jnp.stack([s[2] for s in stats]), jnp.stack(digests))

    _STATS_FNS[key] = jax.jit(fn) if repl is None else jax.jit(fn, out_shardings=repl)
  return _STATS_FNS[key]


def _to_host(a) -> np.ndarray:
  """numpy copy of a (small) array; a replicated multi-process array is read from this process."""
  if hasattr(a, "is_fully_addressable") and not a.is_fully_addressable:
    if a.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(a)


def to_host(tree):
  """numpy copies of every (small) array of a pytree, in one or many processes."""
  import jax
  return jax.tree.map(_to_host, tree)


@dataclasses.dataclass
class ArrayDiff:
  """What ``compare_on_device`` found for one array.

  rows: rows compared (rows = last axis; elements for 0-d / 1-d arrays), of shape
  ``rows_shape``; bad_rows / bad: rows and elements outside the tolerance (any bit difference
  when exact); bit_diffs: elements whose bits differ at all; first: multi-indices of the first
  bad rows; max_err: largest ``|actual - expected|`` over differing elements (floats).
  """
  name: str
  shape: tuple
  dtype: str
  tol: tuple | None
  rows: int
  rows_shape: tuple
  bad_rows: int
  bad: int
  bit_diffs: int
  first: list
  max_err: float
  details: str = ""

  @property
  def ok(self) -> bool:
    return self.bad == 0

  @property
  def bit_equal(self) -> bool:
    return self.bit_diffs == 0

  def message(self) -> str:
    how = "bits" if self.tol is None else f"rtol={self.tol[0]:g}, atol={self.tol[1]:g}"
    err = f", max |diff| {self.max_err:.3g}" if "float" in self.dtype else ""
    return (f"{self.name} {list(self.shape)} {self.dtype}: {self.bad_rows} of {self.rows} rows "
            f"(of shape {list(self.rows_shape)}) differ ({how}; {self.bad} elements, "
            f"{self.bit_diffs} with different bits{err}); first rows at {self.first}"
            f"{self.details}")


def compare_on_device(pairs: dict, n_first: int = 5) -> tuple[dict, np.ndarray]:
  """Compare arrays on their devices; fetch only counts, first indices and digests.

  Args:
    pairs: ``{name: (actual, expected, tol)}``; tol None for bit-for-bit, else ``(rtol, atol)``.
      Arrays may be sharded global arrays (one or many processes); shapes and dtypes must match.
    n_first: how many first differing row indices to report per array.

  Returns:
    ``({name: ArrayDiff}, digests)``: digests is ``[len(pairs), 2] uint32``, the device digest
    of each actual array (see ``device_digest``).
  """
  names = list(pairs)
  for name in names:
    a, b, _ = pairs[name]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      raise AssertionError(f"{name}: actual is {a.dtype}{list(a.shape)} but expected is "
                           f"{b.dtype}{list(b.shape)}")
  actuals = tuple(pairs[n][0] for n in names)
  expecteds = tuple(pairs[n][1] for n in names)
  tols = tuple(None if pairs[n][2] is None else tuple(float(v) for v in pairs[n][2])
               for n in names)
  fn = _stats_fn(tols, n_first, _replicated(actuals + expecteds))
  counts, first, max_err, digests = to_host(fn(actuals, expecteds))
  out = {}
  for i, name in enumerate(names):
    a = actuals[i]
    shape = tuple(a.shape)
    rows_shape = shape[:-1] if len(shape) >= 2 else (shape or (1,))
    n_bad = min(int(counts[i, 0]), n_first)
    idx = [tuple(int(v) for v in np.unravel_index(int(f), rows_shape)) if len(shape) else ()
           for f in first[i][:n_bad]]
    out[name] = ArrayDiff(name=name, shape=shape, dtype=str(np.dtype(a.dtype)), tol=tols[i],
                          rows=int(counts[i, 3]), rows_shape=rows_shape,
                          bad_rows=int(counts[i, 0]), bad=int(counts[i, 1]),
                          bit_diffs=int(counts[i, 2]), first=idx, max_err=float(max_err[i]))
  return out, np.asarray(digests)


def _row_details(actual, expected, index, tol, limit: int = 4) -> str:
  """The first differing values of one row (fetched only on failure; single-process arrays)."""
  try:
    if hasattr(actual, "is_fully_addressable") and not (actual.is_fully_addressable and
                                                        expected.is_fully_addressable):
      return ""
    a = np.asarray(actual[index] if index else actual).astype(np.float64).ravel()
    b = np.asarray(expected[index] if index else expected).astype(np.float64).ravel()
    if tol is None:
      cols = np.nonzero(~((a == b) | (np.isnan(a) & np.isnan(b))))[0]
    else:
      cols = np.nonzero(~(np.abs(a - b) <= tol[1] + tol[0] * np.abs(b)))[0]
    shown = ", ".join(f"[{int(c)}] {float(a[c]):.6g} vs {float(b[c]):.6g}" for c in cols[:limit])
    return f"; row {index}: {shown}" if shown else ""
  except Exception as e:  # noqa: BLE001 -- details are a courtesy; the verdict stands
    return f"; (no details: {type(e).__name__})"


def assert_same(pairs: dict, n_first: int = 5, context: str = "") -> dict:
  """``compare_on_device`` and raise AssertionError naming every array that differs.

  The message gives, per array, the count of differing rows and elements, the first row indices
  and (single process) the first differing values of the first such row. Returns the
  ``{name: ArrayDiff}`` when everything matches.
  """
  diffs, _ = compare_on_device(pairs, n_first)
  bad = [d for d in diffs.values() if not d.ok]
  if bad:
    for d in bad:
      a, b, tol = pairs[d.name]
      if d.first:
        d.details = _row_details(a, b, d.first[0], tol)
    raise AssertionError((context + ": " if context else "") +
                         "\n  ".join(["mismatch:"] + [d.message() for d in bad]))
  return diffs


def device_digest(tree) -> np.ndarray:
  """``[num_leaves, 2] uint32``: a digest of every array of a pytree, computed on its devices.

  Equal arrays (shape, dtype and bits) give equal digests, however they are sharded; use it to
  check repeats without fetching outputs.
  """
  import jax
  import jax.numpy as jnp
  leaves = tuple(jax.tree.leaves(tree))
  repl = _replicated(leaves)
  key = ("digest", repl)
  if key not in _STATS_FNS:
    fn = lambda arrays: (jnp.stack([_leaf_digest(a) for a in arrays]) if arrays
                         else jnp.zeros((0, 2), jnp.uint32))
    _STATS_FNS[key] = jax.jit(fn) if repl is None else jax.jit(fn, out_shardings=repl)
  return _to_host(_STATS_FNS[key](leaves))


def digest_hex(tree) -> str:
  """A sha256 hex string over every leaf's shape, dtype and ``device_digest``."""
  import hashlib
  import jax
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(str((tuple(leaf.shape), str(np.dtype(leaf.dtype)))).encode())
  h.update(np.ascontiguousarray(device_digest(tree)).tobytes())
  return h.hexdigest()


# -- the device soak: a fast backend against the xla backend, on every local device --------------

DEVICE_SOAK_SHAPES = (
    # (T, max_tokens_per_rank, H, E, K, capacity, alignment, dtype): a fixed pool, so each shape
    # compiles once. capacity: None (never drops), "balanced" (1.25 x T_max K), "half"
    # (0.5 x T_max K: overflows whenever every slot is selected), "tiny" (one alignment unit).
    # E is a multiple of 8, so any W in 1, 2, 4, 8 divides it.
    (0, 16, 128, 16, 2, None, 1, "bfloat16"),
    (1, 1, 256, 32, 4, None, 8, "float32"),
    (37, 64, 512, 64, 6, "balanced", 4, "bfloat16"),
    (128, 128, 2048, 64, 8, None, 1, "bfloat16"),
    (256, 256, 1024, 32, 4, "half", 16, "bfloat16"),
    (300, 512, 128, 128, 8, "tiny", 1, "bfloat16"),
    (64, 64, 256, 16, 3, "tiny", 16, "float32"),
    (1024, 1024, 768, 64, 4, "balanced", 8, "float32"),
    (1024, 1024, 2048, 256, 8, "balanced", 1, "bfloat16"),
)
DEVICE_SOAK_SMALL_SHAPES = (  # the same kinds of shapes, small enough for CPU runs of the path
    (0, 4, 8, 8, 2, None, 1, "float32"),
    (5, 8, 16, 16, 3, "balanced", 2, "bfloat16"),
    (8, 8, 8, 8, 2, "half", 4, "float32"),
    (6, 6, 8, 16, 4, "tiny", 1, "bfloat16"),
)
DEVICE_SOAK_KINDS = ROUTINGS + ("invalid", "overflow", "all_dropped")
RESOURCE_SHAPE = (512, 512, 1024, 64, 4, "balanced", 8, "bfloat16")
"""The shape of the resource checks' 1,000 steps (forward and gradient)."""
REPEAT_SHAPE = DEVICE_SOAK_SHAPES[-1]
"""The shape of the fixed-seed round that is repeated (and must hash the same every time)."""
COMBINE_TOL = {"bfloat16": (2e-2, 2e-2), "float32": (1e-5, 1e-5)}
"""Combine tolerance (rtol, atol) against the xla backend, by dtype (the summation order is the
same; a fused multiply-add in one backend may round differently)."""


def soak_routing(rng: np.random.Generator, kind: str, world: int, num_tokens: int,
                 num_experts: int, topk: int) -> np.ndarray:
  """``[W, T, K] int32`` expert ids of one of DEVICE_SOAK_KINDS, vectorised for large T.

  uniform / with_unselected / empty / empty_rank / one_expert / duplicates: as make_routing
  (empty_rank: a random rank receives nothing; one_expert: every token picks the same K
  consecutive experts from a random start). zipf: K distinct experts per token, popularity
  ~ 1 / rank^1.2 over a random permutation (Gumbel top-k, the same law as draws without
  replacement). invalid: uniform, then ~20% of slots outside [-1, E). overflow: every token
  picks its experts on one random rank. all_dropped: uniform (it is run with a capacity of one
  alignment unit, so all rows but the first few of each rank are dropped).
  """
  w, t, e, k = world, num_tokens, num_experts, topk
  n = w * t
  e_local = e // w

  def top_k_of(scores):  # [n, m] -> [n, k] column indices of the k largest, k <= m
    if scores.shape[1] == k:
      return np.broadcast_to(np.arange(k), (scores.shape[0], k)).copy()
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]

  if n == 0:
    idx = np.zeros((0, k), np.int64)
  elif kind in ("uniform", "with_unselected", "all_dropped", "invalid"):
    idx = top_k_of(rng.random((n, e), np.float32))
    if kind == "with_unselected":
      idx = np.where(rng.random((n, k)) < 0.33, -1, idx)
    elif kind == "invalid":
      bad = rng.random((n, k)) < 0.2
      idx = np.where(bad, rng.choice(np.array([-9, -2, e, e + 3]), size=(n, k)), idx)
  elif kind == "empty_rank":
    r = int(rng.integers(w))
    allowed = e - e_local if w > 1 and e - e_local >= k else e
    idx = top_k_of(rng.random((n, allowed), np.float32))
    if allowed < e:
      idx = np.where(idx >= r * e_local, idx + e_local, idx)
  elif kind == "zipf":
    logits = -1.2 * np.log(np.arange(1, e + 1))[rng.permutation(e)]
    gumbel = -np.log(-np.log(rng.random((n, e), np.float32) + 1e-12) + 1e-12)
    idx = top_k_of(logits.astype(np.float32)[None, :] + gumbel)
  elif kind == "one_expert":
    idx = np.tile((int(rng.integers(e)) + np.arange(k)) % e, (n, 1))
  elif kind == "empty":
    idx = -np.ones((n, k), np.int64)
  elif kind == "duplicates":
    idx = np.repeat(rng.integers(0, e, size=(n, 1)), k, axis=1)
    if k > 2:
      idx[:, -1] = rng.integers(0, e, size=n)
  elif kind == "overflow":
    r = int(rng.integers(w))
    local = (top_k_of(rng.random((n, e_local), np.float32)) if e_local >= k
             else rng.integers(0, e_local, size=(n, k)))
    idx = r * e_local + local
  else:
    raise ValueError(f"soak_routing: kind={kind!r} is not one of {DEVICE_SOAK_KINDS}.")
  return np.asarray(idx, np.int32).reshape(w, t, k)


def device_soak_config(shape, world: int, backend: str, timeout_s: float = 20.0):
  """The EPConfig of one DEVICE_SOAK_SHAPES entry for ``world`` ranks."""
  import jax_ep
  t, t_max, h, e, k, cap, align, _ = shape
  base = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t_max,
                         expert_alignment=align, backend=backend, timeout_s=timeout_s)
  return with_capacity(base, world, cap)


def with_capacity(base, world: int, kind):
  """``base`` (an EPConfig) with the capacity named by ``kind``: None (the no-drop default),
  'balanced' (1.25 x the mean), 'half' (0.5 x the mean: drops), 'tiny' (one alignment unit) or
  'one' (a single row)."""
  capacities = {None: lambda: None, "balanced": lambda: base.balanced_capacity(world),
                "half": lambda: base.balanced_capacity(world, 0.5),
                "tiny": lambda: base.expert_alignment, "one": lambda: 1}
  if kind not in capacities:
    raise ValueError(f"jax_ep.testing.with_capacity: kind={kind!r} must be one of "
                     f"{sorted(capacities, key=str)}.")
  return dataclasses.replace(base, capacity=capacities[kind]())


def group_layout(rng, kind: str, capacity: int, num_experts: int, alignment: int = 1):
  """Random (group_sizes, group_offsets) int32 as dispatch lays them out, for grouped-matmul
  tests: in expert order, each group at the next multiple of ``alignment``, clamped to
  ``capacity`` (the tail is dropped). ``kind``: 'random' (some groups empty), 'giant' (one
  group of about C rows), 'empty', 'overflow' (more rows than C)."""
  e = num_experts
  if kind == "random":
    want = rng.integers(0, 2 * capacity // e + 1, e)
    want[rng.random(e) < 0.3] = 0
  elif kind == "giant":
    want = np.zeros(e, np.int64)
    want[rng.integers(e)] = capacity - rng.integers(0, 3)
  elif kind == "empty":
    want = np.zeros(e, np.int64)
  elif kind == "overflow":
    want = rng.integers(capacity // e, 3 * capacity // e + 2, e)
  else:
    raise ValueError(f"jax_ep.testing.group_layout: unknown kind={kind!r}")
  sizes = np.zeros(e, np.int32)
  offsets = np.zeros(e, np.int32)
  pos = 0
  for i in range(e):
    off = min(align_up(pos, alignment), capacity)
    size = min(int(want[i]), capacity - off)
    offsets[i], sizes[i] = off, size
    pos = off + size
  return sizes, offsets


def ffi_gpu_count() -> int:
  """CUDA devices the jax_ep FFI library sees (0 without it); starts no JAX GPU client, so GPU
  tests can decide to skip (or how many processes to launch) before importing JAX's backend."""
  try:
    from jax_ep import _ffi
    if not _ffi.available():
      return 0
    return max(_ffi.library().jep_cuda_device_count(), 0)
  except Exception:  # noqa: BLE001 -- no library, no driver: no GPUs
    return 0


def device_fwd_fn(config, mesh):
  """Jitted ``f(x [W*T, H], idx [W*T, K], weights [W*T, K])`` over ``mesh``: dispatch, then
  combine of ``y = 1.5 * recv_x - 0.25`` (in x's dtype). Returns a tuple of ``[W, ...]`` arrays
  named DISPATCH_OUTPUTS + ("combine",)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_ep

  def fwd(x, idx, w):
    recv_x, recv_w, layout = jax_ep.dispatch(x, idx, w, config=config)
    y = (recv_x.astype(jnp.float32) * 1.5 - 0.25).astype(recv_x.dtype)
    out = jax_ep.combine(y, layout, config=config)
    outs = (recv_x, recv_w) + tuple(getattr(layout, f) for f in LAYOUT_FIELDS) + (out,)
    return tuple(a[None] for a in outs)

  spec = P(config.axis_name)
  return jax.jit(jax.shard_map(fwd, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))


OUTPUT_NAMES = DISPATCH_OUTPUTS + ("combine",)


class DeviceSoak:
  """Runs rounds of DEVICE_SOAK_SHAPES on ``devices`` with ``backend`` and the xla backend.

  Per shape (built on first use): both configs, the jitted forward of each backend and a
  jitted input maker (x comes from ``jax.random`` on the devices; routing and weights from
  numpy). A round compares every output on the device (``compare_on_device``): dispatch's
  outputs and every layout field bit for bit, combine to COMBINE_TOL (and bit equality is
  recorded).
  """

  def __init__(self, devices, backend: str = "triton", shapes=DEVICE_SOAK_SHAPES,
               timeout_s: float = 20.0, exact_combine: bool = False):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    self.devices = list(devices)
    self.world = len(self.devices)
    self.backend = backend
    self.shapes = tuple(shapes)
    self.timeout_s = timeout_s
    self.exact_combine = exact_combine
    self.mesh = jax.sharding.Mesh(np.array(self.devices), ("ep",))
    self.sharding = NamedSharding(self.mesh, P("ep"))
    self._fns: dict = {}

  def configs(self) -> list:
    """Every config the soak uses with ``backend`` (to size ``jax_ep.runtime.initialize``)."""
    return [device_soak_config(s, self.world, self.backend, self.timeout_s)
            for s in self.shapes + (RESOURCE_SHAPE,)]

  def _get(self, shape):
    if shape not in self._fns:
      import jax
      import jax.numpy as jnp
      t, _, h, _, _, _, _, dtype = shape
      cfg_ref = device_soak_config(shape, self.world, "xla", self.timeout_s)
      cfg_test = device_soak_config(shape, self.world, self.backend, self.timeout_s)

      def make_x(seed):
        key = jax.random.fold_in(jax.random.key(20261121), seed)
        return jax.random.normal(key, (self.world * t, h), jnp.float32).astype(dtype)

      self._fns[shape] = dict(
          make_x=jax.jit(make_x, out_shardings=self.sharding),
          ref=device_fwd_fn(cfg_ref, self.mesh), test=device_fwd_fn(cfg_test, self.mesh))
    return self._fns[shape]

  def inputs(self, shape, kind: str, rng: np.random.Generator, x_seed: int):
    """Device arrays x [W*T, H], idx [W*T, K], weights [W*T, K] for one round."""
    import jax
    t, _, _, e, k, _, _, _ = shape
    idx = soak_routing(rng, "uniform" if kind == "all_dropped" else kind, self.world, t, e, k)
    weights = rng.random((self.world * t, k), np.float32)
    x = self._get(shape)["make_x"](np.uint32(x_seed % (1 << 32)))
    put = lambda a: jax.device_put(a, self.sharding)
    return x, put(idx.reshape(self.world * t, k)), put(weights)

  def run(self, shape, args, which: str = "test"):
    """The forward outputs of ``which`` ("test" or "ref") on ``args``."""
    return self._get(shape)[which](*args)

  def compare(self, shape, got, ref) -> tuple[dict, np.ndarray]:
    """``compare_on_device`` of the test backend's outputs against the reference's."""
    tol = None if self.exact_combine else COMBINE_TOL[shape[7]]
    pairs = {n: (a, b, tol if n == "combine" else None)
             for n, a, b in zip(OUTPUT_NAMES, got, ref)}
    return compare_on_device(pairs, n_first=3)

  def draw(self, rng: np.random.Generator):
    """A (shape, kind) pair: all_dropped runs on the tiny capacities, overflow on bounded ones."""
    kind = DEVICE_SOAK_KINDS[rng.integers(len(DEVICE_SOAK_KINDS))]
    if kind == "all_dropped":
      pool = [s for s in self.shapes if s[0] > 0 and s[5] == "tiny"]
    elif kind == "overflow":
      pool = [s for s in self.shapes if s[0] > 0 and s[5] is not None]
    else:
      pool = []
    pool = pool or list(self.shapes)
    return pool[rng.integers(len(pool))], kind


def shape_id(shape) -> str:
  t, t_max, h, e, k, cap, align, dtype = shape
  return f"T{t}/{t_max}-H{h}-E{e}-K{k}-cap{cap}-A{align}-{dtype}"


def device_soak(rounds: int, seed: int, *, devices, backend: str = "triton",
                shapes=DEVICE_SOAK_SHAPES, exact_combine: bool = False, self_check_every: int = 10,
                check_timeouts_every: int = 100, timeout_s: float = 20.0, log=None,
                soak: DeviceSoak | None = None) -> dict:
  """``rounds`` randomized rounds of ``backend`` against the xla backend on ``devices``.

  Each round draws a shape of ``shapes`` and a routing kind of DEVICE_SOAK_KINDS, makes fresh
  inputs and compares every output on the device. Every ``self_check_every``-th round runs the
  test backend twice and requires identical digests. Mismatches are recorded (the first 10 in
  detail) and the soak goes on; a raised error (e.g. a timeout) stops it and is recorded.

  Returns a JSON-able dict: rounds, seconds, per-kind and per-shape counts, rows received /
  dropped, invalid ids, mismatches (+ details), combine bit-equality, self-repeat counts and a
  digest chaining every round's test outputs (equal for equal seeds).
  """
  import hashlib
  import time
  import traceback
  soak = soak or DeviceSoak(devices, backend, shapes, timeout_s, exact_combine)
  rng = np.random.default_rng(seed)
  chain = hashlib.sha256()
  res = {"backend": backend, "reference": "xla", "world": soak.world, "seed": seed,
         "rounds": 0, "kinds": {}, "shapes": {}, "recv_rows": 0, "dropped_rows": 0,
         "invalid_ids": 0, "mismatches": 0, "mismatch_details": [],
         "combine": {"compared": "bit for bit" if exact_combine else
                     "to tolerance " + str(COMBINE_TOL) + ", bit equality recorded",
                     "bit_equal_rounds": 0, "max_abs_err": 0.0},
         "self_repeats": {"checked": 0, "identical": 0}, "first_use_s": {}, "error": None}
  t0 = time.time()
  i = -1
  try:
    for i in range(rounds):
      shape, kind = soak.draw(rng)
      sid = shape_id(shape)
      t_first = time.time() if sid not in res["first_use_s"] else None
      args = soak.inputs(shape, kind, rng, seed * 1_000_003 + i)
      ref = soak.run(shape, args, "ref")
      got = soak.run(shape, args, "test")
      diffs, digests = soak.compare(shape, got, ref)
      if t_first is not None:
        res["first_use_s"][sid] = round(time.time() - t_first, 2)
      chain.update(digests.tobytes())
      counts = to_host(tuple(ref[OUTPUT_NAMES.index(n)]
                             for n in ("num_recv_rows", "num_dropped", "num_invalid")))
      res["recv_rows"] += int(np.sum(counts[0]))
      res["dropped_rows"] += int(np.sum(counts[1]))
      res["invalid_ids"] += int(np.sum(counts[2]))
      res["kinds"][kind] = res["kinds"].get(kind, 0) + 1
      res["shapes"][sid] = res["shapes"].get(sid, 0) + 1
      comb = diffs["combine"]
      res["combine"]["bit_equal_rounds"] += int(comb.bit_equal)
      if not np.isnan(comb.max_err):
        res["combine"]["max_abs_err"] = max(res["combine"]["max_abs_err"], comb.max_err)
      bad = [d for d in diffs.values() if not d.ok]
      if self_check_every and i % self_check_every == 0:
        again = soak.run(shape, args, "test")
        _, digests2 = soak.compare(shape, again, ref)
        res["self_repeats"]["checked"] += 1
        if np.array_equal(digests, digests2):
          res["self_repeats"]["identical"] += 1
        else:
          bad.append(ArrayDiff(name="self-repeat digests", shape=(), dtype="", tol=None, rows=0,
                               rows_shape=(), bad_rows=0, bad=1, bit_diffs=1, first=[],
                               max_err=0.0))
        del again
      res["rounds"] += 1
      if bad:
        res["mismatches"] += 1
        if len(res["mismatch_details"]) < 10:
          for d in bad:
            if d.first and d.name in OUTPUT_NAMES:
              j = OUTPUT_NAMES.index(d.name)
              d.details = _row_details(got[j], ref[j], d.first[0], d.tol)
          res["mismatch_details"].append(
              {"round": i, "shape": sid, "kind": kind, "arrays": [d.message() for d in bad]})
        if log:
          log(f"soak round {i} ({sid}, {kind}): MISMATCH " + "; ".join(d.name for d in bad))
        if backend == "triton":
          _check_triton_timeouts()
      elif backend == "triton" and check_timeouts_every and (i + 1) % check_timeouts_every == 0:
        _check_triton_timeouts()
      del ref, got, args
      if log and (i + 1) % max(1, rounds // 10) == 0:
        log(f"soak: {i + 1}/{rounds} rounds, {res['mismatches']} mismatched, "
            f"{time.time() - t0:.1f} s")
    if backend == "triton":
      _check_triton_timeouts()
  except Exception as e:  # noqa: BLE001 -- recorded; the caller fails on it
    res["error"] = f"round {i}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
  res["combine"]["bit_for_bit"] = res["combine"]["bit_equal_rounds"] == res["rounds"]
  res["soak_digest"] = chain.hexdigest()
  res["seconds"] = round(time.time() - t0, 2)
  return res


def _check_triton_timeouts() -> None:
  from jax_ep.backends import triton as triton_backend
  triton_backend.check_timeouts()


def device_repeat_hashes(soak: DeviceSoak, seed: int, repeats: int = 20,
                         shape=REPEAT_SHAPE, kind: str = "zipf") -> list[str]:
  """The test backend's output hash (``digest_hex``) of one fixed-seed round, ``repeats`` times
  (fresh inputs from the same seed each time); determinism means one distinct value."""
  hashes = []
  for _ in range(repeats):
    args = soak.inputs(shape, kind, np.random.default_rng(seed), seed)
    hashes.append(digest_hex(soak.run(shape, args, "test")))
  return hashes


# -- resources: memory over many steps, initialize/shutdown cycles, errors for too-small sizes --

def memory_snapshot(devices) -> dict:
  """Device memory (XLA's allocator), the symmetric region (jax_ep.runtime), GPU memory as
  nvidia-smi sees it (every allocation of the process, the symmetric region included) and the
  host's resident set, after a garbage collection. Missing sources are None."""
  import gc
  import subprocess
  from jax_ep import runtime
  gc.collect()
  snap: dict = {"bytes_in_use": [], "peak_bytes_in_use": []}
  for d in devices:
    stats = d.memory_stats() or {}
    snap["bytes_in_use"].append(stats.get("bytes_in_use"))
    snap["peak_bytes_in_use"].append(stats.get("peak_bytes_in_use"))
  snap["symmetric_bytes"] = snap["epoch"] = None
  if runtime.is_initialized():
    infos = [runtime.device_info(d) for d in devices]
    snap["symmetric_bytes"] = [int(i["bytes"]) for i in infos]
    snap["epoch"] = [int(i["epoch"]) for i in infos]
  snap["gpu_memory_used_mib"] = None
  if devices and devices[0].platform == "gpu":
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=30, check=True).stdout
      snap["gpu_memory_used_mib"] = [int(v) for v in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
      pass
  snap["host_rss_bytes"] = None
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          snap["host_rss_bytes"] = int(line.split()[1]) * 1024
  except OSError:
    pass
  return snap


def _delta(a, b):
  if a is None or b is None or None in a or None in b:
    return None
  return [int(y) - int(x) for x, y in zip(a, b)]


def _grad_step_fn(config, mesh):
  """Jitted ``f(x, idx, w, s) -> (loss [W], dropped [W], dx, d_weights)`` over ``mesh``:
  dispatch of ``x * (1 + s)``, tanh, combine, a cosine-weighted sum, and its gradient."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import jax_ep

  def per_shard(x, idx, w, s):
    def loss(x, w):
      xs = (x.astype(jnp.float32) * (1 + s)).astype(x.dtype)
      recv_x, _, layout = jax_ep.dispatch(xs, idx, w, config=config)
      y = jnp.tanh(recv_x.astype(jnp.float32)).astype(recv_x.dtype)
      out = jax_ep.combine(y, layout, config=config)
      return jnp.sum(out.astype(jnp.float32) * jnp.cos(x.astype(jnp.float32))), layout.num_dropped
    (l, dropped), (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    return l[None], dropped[None], gx, gw

  spec = P(config.axis_name)
  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, P()),
                               out_specs=(spec,) * 4))


GRAD_TOL = {"bfloat16": (3e-2, 3e-2), "float32": (1e-4, 1e-4)}


def weight_grad_tolerance(hidden: int, dtype: str) -> tuple[float, float]:
  """(rtol, atol) for comparing d_topk_weights of two backends.

  Each entry is a dot product of two rows over ``hidden`` (largely cancelling sums in the
  tests: ~N(0, H/5) for N(0, 1) rows), summed in float32 from bfloat16 factors. XLA may keep an
  expert output such as ``tanh(recv_x)`` in float32 inside one backend's fused backward and
  round it to bfloat16 in the other's (custom calls need it materialized), which moves the dot
  by about bf16_eps * sqrt(H): measured on 4x H200 at H = 7168, up to 0.19; numpy reproduces
  0.17 on 1.6 % of tokens past a 3e-2 bound. 2^-7 sqrt(H) covers that rounding (5 sigma) while a
  row of another token moves the dot by ~sqrt(H)."""
  rtol, atol = GRAD_TOL[dtype]
  if dtype != "bfloat16":
    return rtol, atol
  return rtol, max(atol, 2.0 ** -7 * hidden ** 0.5)


def resource_check(soak: DeviceSoak, *, shape=RESOURCE_SHAPE, init_configs=None,
                   steps: int = 1000, cycles: int = 5, seed: int = 0,
                   device_bound: int = 1 << 20, gpu_bound_mib: int = 64, log=None) -> dict:
  """Resource checks of ``soak.backend`` on ``soak.devices`` (JSON-able dict; ``failures`` lists
  what did not hold, empty when all did).

  1. ``steps`` forward+gradient steps of ``shape``: memory_snapshot after step 10 and after
     the last; XLA's bytes_in_use must not change by more than ``device_bound`` bytes per device,
     the symmetric region not at all, nvidia-smi's memory.used by at most ``gpu_bound_mib``; the
     symmetric launches per step (epoch delta / steps) must be a whole number; the last step
     equals the xla backend's (loss and gradients to GRAD_TOL, dropped rows exactly).
  2. ``cycles`` x (shutdown, initialize(init_configs), one forward compared with the xla backend
     as in the soak, one gradient step), with the step compiled before the first shutdown.
  3. Errors for too-small sizes (traced with ``.lower``, never run): T above
     max_tokens_per_rank; (triton) a runtime initialized for a smaller config than the one used.
     And a too-small capacity, which is no error by design: rows past C are dropped and counted.
  The cycles need an initialized runtime, the region error the triton backend too (skipped
  otherwise).
  """
  import time
  import jax
  import jax_ep
  from jax_ep import runtime
  t0 = time.time()
  res: dict = {"backend": soak.backend, "shape": shape_id(shape), "steps": steps,
               "failures": []}
  fail = res["failures"].append
  uses_runtime = runtime.is_initialized()
  init_configs = list(init_configs or soak.configs())
  dtype = shape[7]
  cfg_test = device_soak_config(shape, soak.world, soak.backend, soak.timeout_s)
  cfg_ref = device_soak_config(shape, soak.world, "xla", soak.timeout_s)
  step_test, step_ref = _grad_step_fn(cfg_test, soak.mesh), _grad_step_fn(cfg_ref, soak.mesh)
  rng = np.random.default_rng(seed)
  args = soak.inputs(shape, "zipf", rng, seed)
  repl = jax.sharding.NamedSharding(soak.mesh, jax.sharding.PartitionSpec())

  def scalar(i):
    return jax.device_put(np.float32(i * 1e-4), repl)

  def grads_match(out, ref, what):
    tol = GRAD_TOL[dtype]
    pairs = {"loss": (out[0], ref[0], tol), "num_dropped": (out[1], ref[1], None),
             "dx": (out[2], ref[2], tol),
             "d_topk_weights": (out[3], ref[3], weight_grad_tolerance(shape[2], dtype))}
    diffs, _ = compare_on_device(pairs, 3)
    bad = [d.message() for d in diffs.values() if not d.ok]
    if bad:
      fail(f"{what}: " + "; ".join(bad))
    return not bad

  # 1. many steps
  snaps = {}
  out = s = None
  for i in range(steps):
    s = scalar(i)
    out = step_test(*args, s)
    if i + 1 in (10, steps):
      jax.block_until_ready(out)
      time.sleep(0.2)  # let the runtime release the previous step's buffers
      snaps[i + 1] = memory_snapshot(soak.devices)
  res["seconds_steps"] = round(time.time() - t0, 2)
  first, last = snaps.get(10), snaps.get(steps)
  res["at_step_10"], res[f"at_step_{steps}"] = first, last
  if first is not None and last is not None and steps > 10:
    d_dev = _delta(first["bytes_in_use"], last["bytes_in_use"])
    d_sym = _delta(first["symmetric_bytes"], last["symmetric_bytes"])
    d_gpu = _delta(first["gpu_memory_used_mib"], last["gpu_memory_used_mib"])
    d_epoch = _delta(first["epoch"], last["epoch"])
    res["delta"] = {"bytes_in_use": d_dev, "symmetric_bytes": d_sym, "gpu_memory_used_mib": d_gpu,
                    "host_rss_bytes": (None if first["host_rss_bytes"] is None else
                                       last["host_rss_bytes"] - first["host_rss_bytes"]),
                    "epoch": d_epoch}
    res["bounds"] = {"bytes_in_use": device_bound, "symmetric_bytes": 0,
                     "gpu_memory_used_mib": gpu_bound_mib}
    if d_dev is not None and max(abs(v) for v in d_dev) > device_bound:
      fail(f"device bytes_in_use changed by {d_dev} bytes between step 10 and step {steps} "
           f"(bound {device_bound})")
    if d_sym is not None and any(d_sym):
      fail(f"symmetric region bytes changed by {d_sym}")
    if d_gpu is not None and max(abs(v) for v in d_gpu) > gpu_bound_mib:
      fail(f"nvidia-smi memory.used changed by {d_gpu} MiB (bound {gpu_bound_mib})")
    if d_epoch is not None:
      per_step = [v / (steps - 10) for v in d_epoch]
      res["symmetric_launches_per_step"] = per_step
      if any(v != int(v) for v in per_step):
        fail(f"symmetric launches per step are not a whole number: {per_step}")
  ref_out = step_ref(*args, s)
  grads_match(out, ref_out, f"step {steps} vs the xla backend")
  res["dropped_rows_per_step"] = int(np.sum(to_host(ref_out[1])))
  if soak.backend == "triton":
    _check_triton_timeouts()
  del out, ref_out

  # 2. initialize / shutdown cycles
  fwd_ref = soak.run(shape, args, "ref")
  s0 = scalar(0)
  ref0 = step_ref(*args, s0)
  res["cycles"] = []
  if uses_runtime:
    for c in range(cycles):
      runtime.shutdown()
      runtime.initialize(init_configs, provider="peer", devices=soak.devices)
      diffs, _ = soak.compare(shape, soak.run(shape, args, "test"), fwd_ref)
      bad = [d.message() for d in diffs.values() if not d.ok]
      if bad:
        fail(f"cycle {c}: forward: " + "; ".join(bad))
      ok = grads_match(step_test(*args, s0), ref0, f"cycle {c}: gradient step")
      snap = memory_snapshot(soak.devices)
      res["cycles"].append({"ok": not bad and ok, "symmetric_bytes": snap["symmetric_bytes"],
                            "gpu_memory_used_mib": snap["gpu_memory_used_mib"],
                            "bytes_in_use": snap["bytes_in_use"]})
    if soak.backend == "triton":
      _check_triton_timeouts()
    used = [c["gpu_memory_used_mib"] for c in res["cycles"]]
    if len(used) > 1 and None not in used:
      d = _delta(used[0], used[-1])
      res["cycles_gpu_memory_delta_mib"] = d
      if max(abs(v) for v in d) > gpu_bound_mib:
        fail(f"nvidia-smi memory.used changed by {d} MiB over {cycles} initialize/shutdown "
             f"cycles (bound {gpu_bound_mib})")
  else:
    res["cycles_skipped"] = "needs jax_ep.runtime (initialized)"

  # 3. errors for sizes that are too small
  errors: dict = {}
  small_t = dataclasses.replace(cfg_test, max_tokens_per_rank=max(1, shape[0] // 2),
                                capacity=cfg_test.capacity_rows(soak.world))
  try:
    device_fwd_fn(small_t, soak.mesh).lower(*args)
    errors["max_tokens_per_rank"] = {"error": None}
    fail("T > max_tokens_per_rank: no error")
  except ValueError as e:
    says = "raise max_tokens_per_rank" in str(e)
    errors["max_tokens_per_rank"] = {"error": str(e), "says_what_to_raise": says}
    if not says:
      fail(f"T > max_tokens_per_rank: the error does not say what to raise: {e}")
  if uses_runtime and soak.backend == "triton":
    tiny = jax_ep.EPConfig(num_experts=8, topk=2, hidden=128, max_tokens_per_rank=8,
                           backend="triton")
    try:
      runtime.shutdown()
      runtime.initialize([tiny], provider="peer", devices=soak.devices)
      need, have = runtime.region_bytes_for(cfg_test, soak.world), runtime.symmetric_bytes()
      entry = {"needed_bytes": need, "region_bytes": have}
      if need <= have:
        entry["error"] = None
        fail(f"region check not exercised: {shape_id(shape)} needs {need} <= {have} bytes")
      else:
        try:
          device_fwd_fn(cfg_test, soak.mesh).lower(*args)  # traced only: running it would
          entry["error"] = None                            # write past the region
          fail("a runtime sized for a smaller config: no error")
        except (RuntimeError, ValueError) as e:
          says = "jax_ep.runtime.initialize" in str(e) and "shutdown" in str(e)
          entry.update(error=str(e), says_what_to_call=says)
          if not says:
            fail(f"too-small region: the error does not say what to call: {e}")
      errors["symmetric_region"] = entry
    finally:
      runtime.shutdown()
      runtime.initialize(init_configs, provider="peer", devices=soak.devices)
  else:
    errors["symmetric_region"] = {"skipped": "needs the triton backend and its runtime"}
  tiny_cap = dataclasses.replace(cfg_test, capacity=1)
  outs = {}
  for name, cfg in (("test", tiny_cap), ("ref", dataclasses.replace(tiny_cap, backend="xla"))):
    outs[name] = device_fwd_fn(cfg, soak.mesh)(*args)
  pairs = {n: (a, b, COMBINE_TOL[dtype] if n == "combine" else None)
           for n, a, b in zip(OUTPUT_NAMES, outs["test"], outs["ref"])}
  diffs, _ = compare_on_device(pairs, 3)
  bad = [d.message() for d in diffs.values() if not d.ok]
  if bad:
    fail("capacity=1: " + "; ".join(bad))
  dropped = int(np.sum(to_host(outs["test"][OUTPUT_NAMES.index("num_dropped")])))
  errors["capacity"] = {
      "error": None, "capacity": 1, "dropped_rows": dropped,
      "note": "no error by design (API.md): rows past C are dropped deterministically and "
              "counted in layout.num_dropped; the caller raises EPConfig.capacity"}
  if dropped == 0:
    fail("capacity=1 dropped nothing")
  res["errors"] = errors
  if soak.backend == "triton":
    _check_triton_timeouts()
  res["seconds"] = round(time.time() - t0, 2)
  if log:
    log(f"resources: {len(res['failures'])} failures in {res['seconds']} s")
  return res
