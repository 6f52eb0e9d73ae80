"""EPConfig: the static description of one expert-parallel dispatch/combine."""
from __future__ import annotations

import dataclasses
import math

BACKENDS = ("auto", "xla", "triton")


def align_up(n: int, alignment: int) -> int:
  """Smallest multiple of ``alignment`` that is >= n."""
  return -(-n // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class EPConfig:
  """Static configuration of an expert-parallel layer (frozen and hashable: a valid static jit arg).

  Attributes:
    num_experts: E, the global number of experts; divisible by the EP axis size W.
    topk: K, experts selected per token.
    hidden: H, the width of a token row.
    max_tokens_per_rank: static bound on T, the tokens a rank holds.
    axis_name: the mesh axis the experts are sharded over.
    capacity: C, rows of each rank's receive buffer. None means the worst case
      (every (token, expert) pair of every rank could land here), which never drops.
    expert_alignment: each local expert's group of rows starts at a multiple of this.
    backend: "auto" (triton when its runtime is initialized on GPU, else xla), "xla" or "triton".
    check_expert_ids: opt-in run-time check that every ``topk_idx`` value lies in [-1, E):
      dispatch then adds a ``jax.experimental.checkify`` check, so the step must be wrapped in
      ``checkify.checkify`` (and ``err.throw()`` raises it). Off by default: out-of-range ids
      are treated as unselected and counted in ``layout.num_invalid``.
    num_sms: upper bound on the streaming multiprocessors the triton communication
      kernels take, so expert compute can overlap with them.
    timeout_s: how long a triton kernel waits for a peer rank before it reports a timeout.
  """

  num_experts: int
  topk: int
  hidden: int
  max_tokens_per_rank: int
  axis_name: str = "ep"
  capacity: int | None = None
  expert_alignment: int = 1
  backend: str = "auto"
  check_expert_ids: bool = False
  num_sms: int = 32
  timeout_s: float = 10.0

  def __post_init__(self):
    def positive_int(name):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"EPConfig: {name}={value!r} must be a positive int."
        )

    for name in ("num_experts", "topk", "hidden", "max_tokens_per_rank",
                 "expert_alignment", "num_sms"):
      positive_int(name)
    if self.topk > self.num_experts:
      raise ValueError(
          f"EPConfig: topk={self.topk} must be <= num_experts={self.num_experts}."
      )
    if self.capacity is not None:
      positive_int("capacity")
    if self.backend not in BACKENDS:
      raise ValueError(
          f"EPConfig: backend={self.backend!r} is unknown; choose one of {BACKENDS}."
      )
    if not isinstance(self.axis_name, str) or not self.axis_name:
      raise ValueError(f"EPConfig: axis_name={self.axis_name!r} must be a non-empty str.")
    if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
      raise ValueError(f"EPConfig: timeout_s={self.timeout_s!r} must be a positive number.")

  # -- derived sizes ---------------------------------------------------------------------------

  def check_ep_size(self, ep_size: int) -> None:
    """Raise ValueError unless the experts split evenly over ``ep_size`` ranks."""
    if ep_size <= 0 or self.num_experts % ep_size:
      raise ValueError(
          f"EPConfig: num_experts={self.num_experts} is not divisible by the size "
          f"{ep_size} of axis {self.axis_name!r}; choose num_experts as a multiple of it."
      )

  def num_local_experts(self, ep_size: int) -> int:
    """E_local = E // W, experts held by each rank."""
    self.check_ep_size(ep_size)
    return self.num_experts // ep_size

  def max_recv_rows(self, ep_size: int) -> int:
    """Rows a rank can receive in the worst case, alignment padding included."""
    e_local = self.num_local_experts(ep_size)
    # Duplicate experts in a row are allowed, so a token can send all K slots to one rank.
    pairs = ep_size * self.max_tokens_per_rank * self.topk
    # Each non-empty group can waste up to (alignment - 1) rows before it starts.
    return align_up(pairs + (self.expert_alignment - 1) * e_local, self.expert_alignment)

  def capacity_rows(self, ep_size: int) -> int:
    """C, the static number of rows of each rank's receive buffer."""
    if self.capacity is not None:
      self.check_ep_size(ep_size)
      return self.capacity
    return self.max_recv_rows(ep_size)

  def balanced_capacity(self, ep_size: int, factor: float = 1.25) -> int:
    """``factor`` x the mean rows a rank receives (T x K), rounded up to the alignment.

    The capacity production configs use; pass it as ``capacity=`` in a new config.
    """
    self.check_ep_size(ep_size)
    mean = self.max_tokens_per_rank * self.topk
    return align_up(max(1, math.ceil(factor * mean)), self.expert_alignment)
