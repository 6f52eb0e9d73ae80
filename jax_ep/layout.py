"""DispatchLayout: where every (token, expert) pair went, as a pytree that crosses jit and shard_map."""
from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchLayout:
  """The routing of one dispatch, per rank; ``combine`` and the backward passes read it.

  Shapes use W = EP axis size, T = tokens of this rank, K = top-k, C = capacity rows,
  E_local = experts per rank. Every field is an array (a pytree child), so the layout passes
  through ``jit``, ``scan``, ``remat``, ``custom_vjp`` and ``shard_map`` outputs.

  Public fields:
    group_sizes: ``[E_local] int32``; rows kept for each local expert.
    group_offsets: ``[E_local] int32``; first row of each local expert's group in ``recv_x``,
      a multiple of ``expert_alignment`` (clamped to C when the group starts past the end).
    num_recv_rows: ``[] int32``; rows of ``recv_x`` holding data (sum of ``group_sizes``).
    num_dropped: ``[] int32``; (token, expert) pairs addressed to this rank that did not fit in C.
    num_invalid: ``[] int32``; slots of this rank's ``topk_idx`` outside [-1, E), which were
      treated as unselected.

  Backend-private fields (the state combine and the backward passes need):
    topk_idx: ``[T, K] int32``; this rank's expert ids with invalid slots replaced by -1.
    recv_pos: ``[W, T, K] int32``; on the receiving rank, the row of ``recv_x`` that the pair
      (source rank, source token, k) landed in, or -1 if it was not addressed here or dropped.
    row_weights: ``[C] float32``; the routing weight of each received row (0 outside groups);
      combine applies these on the expert side before rows travel back.
  """

  group_sizes: jax.Array
  group_offsets: jax.Array
  num_recv_rows: jax.Array
  num_dropped: jax.Array
  num_invalid: jax.Array
  topk_idx: jax.Array
  recv_pos: jax.Array
  row_weights: jax.Array

  @property
  def capacity(self) -> int:
    """C, the rows of ``recv_x``."""
    return self.row_weights.shape[-1]

  @property
  def num_tokens(self) -> int:
    """T, the tokens of the rank that dispatched."""
    return self.topk_idx.shape[-2]

  @property
  def num_local_experts(self) -> int:
    """E_local, experts held by this rank."""
    return self.group_sizes.shape[-1]
