"""The xla backend: dispatch and combine in pure JAX (``lax.all_to_all`` inside ``shard_map``).

It runs on every platform (CPU, GPU, TPU) and is the correctness oracle for the triton backend.

How rows move (W ranks, T tokens per rank, K slots per token, C capacity rows):

  dispatch
    sender   for every destination rank d, a bucket of T rows: bucket[d, t] = x[t] when token t
             selects any expert on d (else 0), so a token row travels at most once per rank;
             beside it the K local expert ids (or -1) and weights of the slots that go to d.
    exchange ``lax.all_to_all`` of the buckets: receiver gets bucket[s, t] from every source s.
    receiver the entries (s, t, k) with a local expert e, in (s, t, k) order, are numbered
             within their expert; entry j of expert e lands in row offset[e] + j of recv_x,
             where offset is the aligned exclusive prefix sum of the expert counts; rows at or
             past C are dropped. ``recv_pos[s, t, k]`` remembers each entry's row (or -1).

  combine
    expert   partial[s, t] = sum_k row_weights[p] * y[p] over p = recv_pos[s, t, k] >= 0, in k
             order, in float32, cast to y's dtype: one row per (token, rank).
    exchange ``lax.all_to_all`` back to the owners.
    owner    out[t] = sum over ranks r = 0..W-1, in order, of partial_r[t], in float32.

The buckets make this backend move W x T rows whatever the routing: simple and exact, not fast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep.backends import varying
from jax_ep.config import EPConfig
from jax_ep.layout import DispatchLayout


def _all_to_all(a: jax.Array, axis_name: str) -> jax.Array:
  """Exchange the leading (destination rank) axis of ``a``; the result's leading axis is the source."""
  if lax.axis_size(axis_name) == 1:
    return varying(a, axis_name)  # nothing to move; typed as the exchange's output
  return lax.all_to_all(a, axis_name, split_axis=0, concat_axis=0, tiled=True)


def _slot_experts(topk_idx, ep_size, e_local):
  """``[W, T, K] int32``: for each destination rank, the local expert of each slot, or -1."""
  dest = jnp.where(topk_idx >= 0, topk_idx // e_local, -1)  # [T, K]
  ranks = jnp.arange(ep_size, dtype=jnp.int32)[:, None, None]  # [W, 1, 1]
  return jnp.where(dest[None] == ranks, (topk_idx % e_local)[None], -1).astype(jnp.int32)


def _buckets(x, slot_expert):
  """``[W, T, H]``: bucket[d, t] = x[t] when token t sends anything to rank d, else 0."""
  goes = jnp.any(slot_expert >= 0, axis=-1)  # [W, T]
  return jnp.where(goes[..., None], x[None], jnp.zeros((), x.dtype))


def _place(recv_expert, e_local, capacity, alignment):
  """Rows for the received entries, in (source rank, token, k) order.

  Args:
    recv_expert: ``[W, T, K] int32`` local expert of each received entry, or -1.
  Returns:
    recv_pos ``[W, T, K] int32`` (row, or -1 if absent or dropped), group_sizes, group_offsets,
    num_recv_rows, num_dropped.
  """
  flat = recv_expert.reshape(-1)
  n = flat.shape[0]
  valid = flat >= 0
  key = jnp.where(valid, flat, e_local)  # absent entries sort last
  counts_all = jnp.zeros((e_local + 1,), jnp.int32).at[key].add(1)
  counts = counts_all[:e_local]
  # offset[e+1] = align_up(offset[e] + count[e]); offsets are multiples of the alignment, so
  # this is the exclusive prefix sum of the aligned counts.
  aligned = (counts + alignment - 1) // alignment * alignment
  offsets = jnp.cumsum(aligned) - aligned
  # Number each entry within its expert: a stable sort keeps (s, t, k) order inside a group.
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  group_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts_all)[:-1]])
  rank_in_group = jnp.arange(n, dtype=jnp.int32) - group_start[sorted_key]
  j = jnp.zeros((n,), jnp.int32).at[order].set(rank_in_group)
  pos = jnp.where(valid, offsets[jnp.minimum(key, e_local - 1)] + j, -1)
  kept = valid & (pos < capacity)
  recv_pos = jnp.where(kept, pos, -1).reshape(recv_expert.shape)
  group_sizes = jnp.clip(capacity - offsets, 0, counts).astype(jnp.int32)
  group_offsets = jnp.minimum(offsets, capacity).astype(jnp.int32)
  num_recv_rows = jnp.sum(group_sizes, dtype=jnp.int32)
  num_dropped = jnp.sum(counts, dtype=jnp.int32) - num_recv_rows
  return recv_pos, group_sizes, group_offsets, num_recv_rows, num_dropped


def _row_source(recv_pos, capacity):
  """For each of the C rows, the flat index of the (s, t, k) entry it holds (or -1)."""
  flat = recv_pos.reshape(-1)
  idx = jnp.arange(flat.shape[0], dtype=jnp.int32)
  target = jnp.where(flat >= 0, flat, capacity)  # out of range: dropped by the scatter
  return jnp.full((capacity,), -1, jnp.int32).at[target].set(idx, mode="drop")


def _expand(buckets, recv_pos, capacity):
  """recv rows ``[C, H]``: row p holds bucket[s, t] of the entry (s, t, k) placed at p, else 0."""
  w, t, k = recv_pos.shape
  src = _row_source(recv_pos, capacity)
  if w * t == 0:  # no tokens anywhere (shapes are equal on every rank): nothing arrives
    return jnp.zeros((capacity, buckets.shape[-1]), buckets.dtype), src
  token_row = jnp.where(src >= 0, src // k, 0)
  rows = buckets.reshape(w * t, buckets.shape[-1])[token_row]
  return jnp.where((src >= 0)[:, None], rows, jnp.zeros((), rows.dtype)), src


def dispatch(x, topk_idx, topk_weights, num_invalid, config: EPConfig):
  ep_size = lax.axis_size(config.axis_name)
  e_local = config.num_local_experts(ep_size)
  capacity = config.capacity_rows(ep_size)
  slot_expert = _slot_experts(topk_idx, ep_size, e_local)
  slot_weight = jnp.where(slot_expert >= 0, topk_weights[None], 0.0).astype(jnp.float32)

  recv_buckets = _all_to_all(_buckets(x, slot_expert), config.axis_name)
  recv_expert = _all_to_all(slot_expert, config.axis_name)
  recv_weight = _all_to_all(slot_weight, config.axis_name)

  recv_pos, group_sizes, group_offsets, num_recv_rows, num_dropped = _place(
      recv_expert, e_local, capacity, config.expert_alignment)
  recv_x, src = _expand(recv_buckets, recv_pos, capacity)
  if recv_weight.size:
    recv_weights = jnp.where(src >= 0, recv_weight.reshape(-1)[jnp.maximum(src, 0)], 0.0)
  else:
    recv_weights = jnp.zeros((capacity,), jnp.float32)
  # (T = 0: the zeros above are every rank's own, typed as what arrives otherwise)
  recv_x, recv_weights = (varying(a, config.axis_name) for a in (recv_x, recv_weights))
  layout = DispatchLayout(
      group_sizes=group_sizes,
      group_offsets=group_offsets,
      num_recv_rows=num_recv_rows,
      num_dropped=num_dropped,
      num_invalid=num_invalid,
      topk_idx=topk_idx,
      recv_pos=recv_pos,
      row_weights=recv_weights,
  )
  return recv_x, recv_weights, layout


def dispatch_rows(x, layout: DispatchLayout, config: EPConfig):
  ep_size = lax.axis_size(config.axis_name)
  e_local = config.num_local_experts(ep_size)
  slot_expert = _slot_experts(layout.topk_idx, ep_size, e_local)
  recv_buckets = _all_to_all(_buckets(x, slot_expert), config.axis_name)
  rows, _ = _expand(recv_buckets, layout.recv_pos, layout.capacity)
  return varying(rows, config.axis_name)


def combine_rows(y, row_weights, layout: DispatchLayout, config: EPConfig):
  recv_pos = layout.recv_pos  # [W, T, K]
  present = recv_pos >= 0
  p = jnp.maximum(recv_pos, 0)
  # Expert side: one row per (source rank, token), summing its slots in k order.
  partial = jnp.zeros(recv_pos.shape[:2] + y.shape[1:], jnp.float32)
  for k in range(recv_pos.shape[2]):
    pk = p[:, :, k]
    term = row_weights[pk][..., None] * y[pk].astype(jnp.float32)
    # where, not a zero weight: an absent slot must not pick up a NaN/Inf of the row it indexes
    partial = partial + jnp.where(present[:, :, k, None], term, 0.0)
  back = _all_to_all(partial.astype(y.dtype), config.axis_name)  # [W (expert rank), T, H]
  out = jnp.zeros(back.shape[1:], jnp.float32)
  for r in range(back.shape[0]):
    out = out + back[r].astype(jnp.float32)
  return out.astype(y.dtype)


def gather_slots(values, layout: DispatchLayout, config: EPConfig):
  if layout.topk_idx.shape[0] == 0:  # T = 0: no slot (the zero-size gather below crashed
    # XLA's CPU compiler under jax 0.11.2, in the gradient of the topk weights)
    return varying(jnp.zeros(layout.topk_idx.shape, jnp.float32), config.axis_name)
  recv_pos = layout.recv_pos
  per_entry = jnp.where(recv_pos >= 0, values[jnp.maximum(recv_pos, 0)], 0.0)  # [W, T, K]
  back = _all_to_all(per_entry.astype(jnp.float32), config.axis_name)  # [W (expert rank), T, K]
  ep_size = back.shape[0]
  e_local = config.num_local_experts(ep_size)
  dest = jnp.where(layout.topk_idx >= 0, layout.topk_idx // e_local, 0)  # [T, K]
  picked = jnp.take_along_axis(back, dest[None], axis=0)[0]
  return jnp.where(layout.topk_idx >= 0, picked, 0.0)


def row_group_mask(layout: DispatchLayout) -> jax.Array:
  """``[C] bool``: whether each row of recv_x lies inside some expert's group."""
  c = layout.capacity
  starts = layout.group_offsets
  ends = starts + layout.group_sizes
  edges = (jnp.zeros((c + 1,), jnp.int32).at[starts].add(1).at[ends].add(-1))
  return jnp.cumsum(edges)[:c] > 0


def grouped_matmul(recv_x, w, layout: DispatchLayout):
  c = recv_x.shape[0]
  offsets = layout.group_offsets
  # ragged_dot wants contiguous groups from row 0: let each group span up to the next offset
  # (alignment gaps included), then zero the rows outside groups.
  # (group 0 starts at row 0: dispatch's first offset is always 0)
  spans = jnp.diff(offsets, append=jnp.array([c], offsets.dtype)).astype(jnp.int32)
  y = lax.ragged_dot(recv_x, w, spans, preferred_element_type=jnp.float32)
  mask = row_group_mask(layout)
  return jnp.where(mask[:, None], y, 0.0).astype(jnp.result_type(recv_x.dtype, w.dtype))
