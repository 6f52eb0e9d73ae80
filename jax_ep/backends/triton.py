"""The triton backend: dispatch and combine as Triton kernels over NVLink (intra-node).

Each function launches stock-Triton kernels (``kernels/``) as XLA FFI custom calls through
``jax_ep.launch.triton_call``; rows cross GPUs by plain stores into the peers' symmetric regions
(``jax_ep.runtime``), synchronised by flags (kernels/ep_sync.py). Design, region layout and where
the time goes: docs/KERNELS.md. It reproduces the xla backend (jax_ep/backends/xla.py) bit for
bit for dispatch and up to float rounding for combine.

Each op is ONE kernel launch (at most ``config.num_sms`` programs, all resident together):
program 0 runs the op's start barrier across the ranks (dispatch: the expert-count exchange),
then the launch's programs move rows (docs/KERNELS.md):

  dispatch       dispatch_kernel       histograms -> leader: counts exchange + layout -> senders
                                       push rows, receivers expand them (overlapped)
  dispatch_rows  dispatch_rows_kernel  leader: barrier -> senders push, receivers expand
  combine_rows   combine_kernel        leader: barrier -> every program pushes partial rows,
                                       then reduces tokens
  gather_slots   gather_kernel         leader: barrier -> push slot values, then pick

Ordering. One launch per op means XLA cannot interleave the work of two ops on a GPU; ops run
in the order of the compiled program, the same on every rank (every rank runs the same
program), and each op's start barrier makes sure every peer finished the previous one before
its staging areas are reused.

Timeouts. A wait that exceeds ``config.timeout_s`` gives up and returns a nonzero status (the
op's code); with ``JAX_EP_CHECK_TIMEOUTS=1`` (the default) a ``jax.debug.callback`` turns that
into an error naming the op and rank. That callback synchronises the stream once per op; set
``JAX_EP_CHECK_TIMEOUTS=0`` to skip it (benchmarks) and call ``check_timeouts()`` at a sync
point instead, which reads each device's error record.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep.backends import varying
from jax_ep.config import EPConfig
from jax_ep.layout import DispatchLayout

from jax_ep.backends.triton_gemm import (  # noqa: F401
    check_gmm_usable, gmm_usable, grouped_glu, grouped_matmul)

_API = "jax_ep (triton backend)"
ROW_ITEMSIZE = 4  # staged rows are sized for float32 so combine can take float32 expert outputs


def _kernels():
  from jax_ep.kernels import combine, dispatch, ep_plan, ep_sync, layout
  return layout, dispatch, combine, ep_sync, ep_plan


# -- sizes and availability ----------------------------------------------------------------------

def symmetric_bytes(config: EPConfig, world: int) -> int:
  """Bytes of symmetric region per rank that ``config`` needs with ``world`` ranks."""
  from jax_ep.kernels.ep_sync import RegionSpec
  config.check_ep_size(world)
  return RegionSpec(world=world, max_tokens=config.max_tokens_per_rank, topk=config.topk,
                    num_experts=config.num_experts, hidden=config.hidden,
                    row_itemsize=ROW_ITEMSIZE).total_bytes


def _why_not_usable(config: EPConfig) -> str | None:
  from jax_ep import launch, runtime
  why = launch.unavailable_reason()
  if why is not None:
    return why
  if not runtime.is_initialized():
    return ("its runtime is not initialized: call jax_ep.runtime.initialize([config]) first "
            "(after jax.distributed.initialize() when running one process per GPU)")
  try:
    runtime.check_config(config)
  except ValueError as e:
    return str(e)
  return None


def usable(config: EPConfig) -> bool:
  """Whether the triton backend can run ``config`` here (GPU, FFI library, runtime sized)."""
  return _why_not_usable(config) is None


def check_usable(config: EPConfig) -> None:
  """Raise RuntimeError saying what to do when ``usable(config)`` is False."""
  why = _why_not_usable(config)
  if why is not None:
    raise RuntimeError(f"{_API}: EPConfig(backend='triton') cannot run here: {why}. Or use "
                       f"EPConfig(backend='xla').")


def _plan(config: EPConfig, world: int, num_tokens: int, dtype=jnp.bfloat16):
  from jax_ep.kernels.ep_plan import EPPlan
  from jax_ep.kernels.ep_sync import MAX_WORLD
  if world > MAX_WORLD:
    raise ValueError(f"{_API}: the EP axis {config.axis_name!r} has {world} ranks; the triton "
                     f"backend supports at most {MAX_WORLD} (one node). Use backend='xla'.")
  from jax_ep import runtime
  if runtime.is_initialized() and runtime.world_size() != world:
    raise ValueError(
        f"{_API}: the EP axis {config.axis_name!r} has {world} ranks but jax_ep.runtime was "
        f"initialized over {runtime.world_size()} GPUs; the EP axis must span exactly the "
        f"devices given to jax_ep.runtime.initialize, in rank order.")
  knobs = _knobs(EPPlan, world, _provider())
  return EPPlan(world=world, num_tokens=num_tokens, max_tokens=config.max_tokens_per_rank,
                hidden=config.hidden, topk=config.topk, num_experts=config.num_experts,
                capacity=config.capacity_rows(world), alignment=config.expert_alignment,
                num_sms=config.num_sms, row_itemsize=ROW_ITEMSIZE, use_timer=True,
                itemsize=jnp.dtype(dtype).itemsize, profile=_profile_enabled(), **knobs)


def _knobs(plan_cls, world: int, provider) -> dict:
  """EPPlan's tuning knobs as a step takes them: each from its JAX_EP_* variable where set,
  else the backend's choice for this provider (PEER_DISPATCH_PULL, STAGED_DISPATCH_PULL) and
  world (_WORLD_KNOBS), else EPPlan's default. Refuses pull 3 outside the peer provider."""
  chosen = dict(_WORLD_KNOBS.get(world, {}))
  if (provider == "peer"
      and os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default") != "cuda_async"):
    chosen["dispatch_pull"] = PEER_DISPATCH_PULL
  else:
    chosen["dispatch_pull"] = STAGED_DISPATCH_PULL
  knobs = _env_knobs(plan_cls, chosen)
  if knobs["dispatch_pull"] == 3 and provider not in (None, "peer"):
    raise ValueError(
        f"{_API}: JAX_EP_DISPATCH_PULL=3 has the receivers read each peer's x in place, which "
        f"needs every GPU's XLA buffers mapped on every other (the 'peer' provider: one "
        f"process driving all GPUs); under the {provider!r} provider set it to 4 (the "
        f"receivers read a copy of x made in the region first) or unset it.")
  return knobs


# Dispatch's pull mode under the peer provider, where XLA's buffers on every GPU are mapped on
# every other (XLA enables peer access between a process's GPUs; its "cuda_async" pools are
# not known to be): the receivers load the peers' rows from their x itself
# (EPPlan.dispatch_pull).
PEER_DISPATCH_PULL = 3
# Elsewhere (one process per GPU, or the "cuda_async" allocator) from the copy of x that the
# launcher makes in the region first: 2x H200, DeepSeek-V3 shape, one process per GPU,
# 2026-11-23 00:12, same run: 509.9 / 512.4 us against 581.9 / 588.7 with 2 (the default
# until then). Not timed at W = 4.
STAGED_DISPATCH_PULL = 4

# Combine's queue mode at W = 2 (EPPlan.combine_queue): every program reduces its fixed blocks
# after every rank's pushes (0) instead of taking blocks from the queue as they are done (1).
# There the pushes are bound by the programs' HBM traffic, not NVLink, and mode 1's per-item
# DONE flag (a system-scope release, which waits for the item's stores to land) stalls each
# program once per item: 2x H200, DeepSeek-V3 shape, 32 SMs, peer mode, 2026-11-22: 490.9 vs
# 523.3 us and 487.3 vs 514.6 us in two runs, 494.5 / 489.0 vs 521.9 / 517.4 us in a third;
# one process per GPU 497.5 / 506.6 vs 515.3 / 508.9 us (docs/GPU_RUNS.md, session 20). Other
# W keep 1 (at W = 4 the pushes are NVLink-bound and the queue lets reducers start early).
TWO_RANK_COMBINE_QUEUE = 0

# Combine's two half-tile push path at W = 2 (EPPlan.combine_halves): there every push item
# holds a token of more than 4 of its 8 rows on the rank, and the half tiles carry a quarter
# fewer (masked) row bytes a chunk in 256-column chunks: 2x H200, DeepSeek-V3 shape, 32 SMs,
# peer mode, 2026-11-22 22:44: 442.7 / 456.0 vs 486.5 / 492.5 us without, the pushes done at
# 313 instead of 394 us after launch (docs/GPU_RUNS.md, session 21). Other W keep 0 (at
# W = 4 most blocks' tokens have <= 4 rows here; not timed there).
TWO_RANK_COMBINE_HALVES = 1

# The backend's knob choices by world size (where no JAX_EP_* variable sets them).
_WORLD_KNOBS = {2: {"combine_queue": TWO_RANK_COMBINE_QUEUE,
                    "combine_halves": TWO_RANK_COMBINE_HALVES}}


def _provider():
  """The runtime's provider ("peer" / "nvshmem"), or None when it is not initialized."""
  from jax_ep import runtime
  try:
    return runtime.provider() if runtime.is_initialized() else None
  except runtime.RuntimeNotInitializedError:
    return None


def _int_in(lo: int, hi: int):
  return lambda v: v.is_integer() and lo <= v <= hi


# Tuning knobs of the EP kernels, read from the environment at trace time (docs/KERNELS.md
# "Knobs"): EPPlan field, variable, valid(value as a float), what a valid value is.
_KNOBS = (
    ("sender_fraction", "JAX_EP_SENDER_FRACTION", lambda v: 0 < v < 1,
     "a share of the programs in (0, 1)"),
    ("expand_order", "JAX_EP_EXPAND_ORDER", lambda v: v in (0, 1, 2, 3),
     "0 (own blocks first), 1 (block-major over every source), 2 (a work queue shared by "
     "all programs, own blocks first) or 3 (the queue, block-major over every source)"),
    ("receiver_share", "JAX_EP_RECEIVER_SHARE", lambda v: 0 < v <= 1,
     "a share of the token blocks in (0, 1]"),
    # deeper pipelines need more shared memory than an H100/H200 SM has at these tiles
    ("dispatch_stages", "JAX_EP_DISPATCH_STAGES", _int_in(1, 6), "an integer from 1 to 6"),
    ("expand_levels", "JAX_EP_EXPAND_LEVELS", _int_in(0, 64),
     "an integer from 0 to 64 (0: store by slot)"),
    ("combine_stages", "JAX_EP_COMBINE_STAGES", _int_in(1, 6), "an integer from 1 to 6"),
    ("combine_acc_bytes", "JAX_EP_COMBINE_ACC_BYTES", _int_in(8192, 262144),
     "a byte count from 8192 to 262144"),
    ("combine_queue", "JAX_EP_COMBINE_QUEUE", _int_in(0, 3),
     "0 (reduce after every push), 1 (reduce blocks from a queue as they are done), 2 (the "
     "queue, flags raised two items at a time) or 3 (the queue, and blocks reduced between "
     "push items as soon as they are done)"),
    ("combine_wide", "JAX_EP_COMBINE_WIDE", _int_in(0, 1),
     "1 (the common push path in wider chunks) or 0 (one chunk width)"),
    ("combine_tokens", "JAX_EP_COMBINE_TOKENS", lambda v: v in (0, 16, 32, 64, 128),
     "0 (the default block: 32 tokens at top-8), 16, 32, 64 or 128 (tokens per combine block)"),
    ("combine_split", "JAX_EP_COMBINE_SPLIT", _int_in(0, 1),
     "1 (a block's few tokens with many rows here in a tile of their own) or 0 (such a "
     "block wholly on the all-TOPK path)"),
    ("combine_narrow", "JAX_EP_COMBINE_NARROW", _int_in(0, 1),
     "0 (one level count for most blocks) or 1 (2 levels in wider chunks where no token has "
     "more than 2 rows here)"),
    ("combine_prefetch", "JAX_EP_COMBINE_PREFETCH", _int_in(0, 1),
     "0 (each push item loads its slot positions and weights first) or 1 (loaded an item "
     "ahead)"),
    ("combine_halves", "JAX_EP_COMBINE_HALVES", _int_in(0, 1),
     "0 (a block with a token of many rows here on the split or all-TOPK path) or 1 (as "
     "two half tiles, the tokens with the most rows over all levels)"),
    ("dispatch_pull", "JAX_EP_DISPATCH_PULL", _int_in(0, 4),
     "0 (senders store rows into the peers), 1 (receivers load them from the source), 2 "
     "(as 1, senders copying the expansion's groups of blocks), 3 (receivers load them "
     "from the source's x itself; peer provider only) or 4 (from a copy of the source's x "
     "that its launcher makes first)"),
    ("expand_group", "JAX_EP_EXPAND_GROUP", lambda v: v in (1, 2, 4, 8),
     "1, 2, 4 or 8 (token blocks per item of the expansion queue)"),
    ("zero_queue", "JAX_EP_ZERO_QUEUE", _int_in(0, 2),
     "0 (receivers zero-fill first), 1 (zero-fill items spread through the queue) or 2 (a "
     "quarter of them first, the rest spread)"),
    ("expand_parts", "JAX_EP_EXPAND_PARTS", _int_in(0, 64),
     "0 (column ranges per expansion item where items are fewer than programs) or 1 .. 64 "
     "(that many ranges per item; 1: whole rows)"),
    ("combine_parts", "JAX_EP_COMBINE_PARTS", _int_in(0, 64),
     "0 (column ranges per combine push item where items are fewer than programs) or 1 .. 64 "
     "(that many ranges per item; 1: whole rows)"),
)


# Knobs that existed once, with what became of them: setting one warns instead of being ignored.
_REMOVED_KNOBS = {
    "JAX_EP_COMBINE_VECTORS": "combine always finds each token's rows from per-slot vectors "
                              "now (the tile version was slower; removed in session 17)",
    "JAX_EP_DISPATCH_VECTORS": "dispatch's expansion always reads a block's slots as a tile "
                               "(the per-column vectors measured slower in three runs; "
                               "removed in session 21)",
}


def _env_knobs(plan_cls, defaults: dict | None = None) -> dict:
  """EPPlan keyword arguments from the knobs set in the environment; where unset, the value in
  ``defaults`` (the backend's choices), else the plan's default."""
  for name, why in _REMOVED_KNOBS.items():
    if name in os.environ:
      warnings.warn(f"{_API}: {name} is no longer read: {why}. Unset it.", stacklevel=3)
  out = {}
  for field, name, valid, expected in _KNOBS:
    default = getattr(plan_cls, field)
    out[field] = type(default)(_env_knob(name, (defaults or {}).get(field, default), valid,
                                         expected))
  return out


def _profile_enabled() -> bool:
  """``JAX_EP_PROFILE=1`` at trace time: kernels stamp phase times (``read_profile``)."""
  return os.environ.get("JAX_EP_PROFILE", "0") == "1"


def _env_knob(name: str, default, valid, expected: str):
  """A tuning knob of the EP kernels (``_KNOBS``), read from the environment at trace time;
  ``valid(value)`` says whether a float value is allowed."""
  raw = os.environ.get(name)
  if raw is None:
    return default
  try:
    v = float(raw)
  except ValueError:
    v = float("nan")
  if not valid(v):
    raise ValueError(f"{_API}: {name}={raw!r} must be {expected}.")
  return v


def _scalars(config: EPConfig, op: int, plan, x_dtype) -> tuple:
  """(timeout_ns, op, fingerprint): the fingerprint hashes everything the ranks of one op must
  agree on, so the start barrier refuses an op whose ranks disagree (EPConfig, token count,
  dtype, world, op, and the knobs that change which flags the ranks signal)."""
  from jax_ep.kernels.ep_sync import fingerprint
  fp = fingerprint(op, plan.world, plan.num_tokens, plan.max_tokens, plan.hidden, plan.topk,
                   plan.num_experts, plan.capacity, plan.alignment, plan.num_sms,
                   plan.num_senders, plan.expand_order, plan.receiver_blocks,
                   plan.dispatch_pull, plan.dispatch_group, plan.dispatch_parts, plan.zero_queue,
                   plan.combine_queue, plan.combine_block_t, plan.combine_push_parts,
                   jnp.dtype(x_dtype).name)
  return _timeout_ns(config), (op, "i32"), (fp, "i32")


def _timeout_ns(config: EPConfig):
  return (int(config.timeout_s * 1e9), "i64")


def _call(op: str, config: EPConfig, plan, kernel, *inputs, out_shapes, constexprs,
          scalars=(), num_warps=None, stage=None):
  """One EP kernel launch over the symmetric region ``plan`` is sized for, on the plan's grid;
  returns ``out_shapes``' arrays varying over the EP axis. The kernel's last output, the
  launch's status, is added here and reported as ``op``'s error (``_report``). The launch
  carries the bytes it may touch (exchange area + region), so a step compiled before the
  runtime was re-initialized smaller is refused instead of writing past the region.

  T = 0 on every rank (shapes are static and equal across ranks): nothing moves, so nothing is
  launched (XLA's sharding passes also reject custom calls on zero-size operands) and every
  output is zeros: empty groups, zero rows, no error. ``stage``: the launcher's copy of an
  input into the region before the kernel (``EPPlan.dispatch_stage``)."""
  if plan.num_tokens == 0:
    return tuple(varying(jnp.zeros(s.shape, s.dtype), config.axis_name) for s in out_shapes)
  from jax_ep import runtime
  from jax_ep.kernels.ep_plan import ROWS_WARPS
  from jax_ep.launch import triton_call
  name = kernel.__name__
  outs = triton_call(kernel, *inputs,
                     out_shapes=(*out_shapes, _sds((plan.status_size(name),), jnp.int32)),
                     grid=(plan.grid(name),),
                     num_warps=ROWS_WARPS if num_warps is None else num_warps, num_stages=1,
                     constexprs=constexprs, scalars=scalars, symmetric=True,
                     symmetric_bytes=runtime.EXCHANGE_BYTES + plan.region.total_bytes,
                     stage=stage)
  outs = tuple(varying(o, config.axis_name) for o in outs)
  _report(op, config, outs[-1])
  return outs[:-1]


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# -- timeouts ------------------------------------------------------------------------------------

def _check_enabled() -> bool:
  return os.environ.get("JAX_EP_CHECK_TIMEOUTS", "1") != "0"


def _raise_timeout(status, rank, *, op: str, timeout_s: float):
  code = int(np.max(status)) if np.size(status) else 0
  if code:
    from jax_ep.kernels.ep_sync import PHASE_MISMATCH, PHASE_NAMES
    if code // 8 == PHASE_MISMATCH:
      raise ValueError(
          f"{op}: rank {int(rank)} found that its peers run a different op, EPConfig, token "
          f"count or dtype at this point (fingerprint mismatch); the op was skipped on every "
          f"rank. Every rank must run the same sequence of jax_ep ops with the same EPConfig "
          f"and shapes. jax_ep.backends.triton.check_timeouts() names the rank.")
    raise TimeoutError(
        f"{op}: rank {int(rank)} timed out after {timeout_s} s ({PHASE_NAMES.get(code // 8)}) "
        f"waiting for a peer rank. Every rank must run the same sequence of jax_ep ops; raise "
        f"EPConfig.timeout_s if a peer is only slow. jax_ep.backends.triton.check_timeouts() "
        f"names the peer.")


def _report(op: str, config: EPConfig, status):
  if not _check_enabled():
    return
  jax.debug.callback(functools.partial(_raise_timeout, op=op, timeout_s=config.timeout_s),
                     status, lax.axis_index(config.axis_name))


def check_timeouts() -> None:
  """Raise if any local device recorded a failed op: TimeoutError for a timed-out wait,
  ValueError for ranks that disagreed about an op (reads the error records; syncs)."""
  from jax_ep import runtime
  if not runtime.is_initialized():  # before importing the kernels: triton may be absent
    return
  from jax_ep.kernels.ep_sync import ERR_OFF, PHASE_MISMATCH, describe_error
  for dev in runtime.devices():
    err = np.frombuffer(runtime.read_symmetric(dev, ERR_OFF, 32), np.int32)
    msg = describe_error(err)
    if msg:
      raise (ValueError if int(err[1]) // 8 == PHASE_MISMATCH else TimeoutError)(msg)


def read_profile(num_programs: int) -> list[dict]:
  """Phase stamps of the last launch on every local device that ran with ``JAX_EP_PROFILE=1``.

  Returns, per device, ``{name: int64 [num_programs] ns}`` for ``ep_sync.PROF_NAMES``, relative
  to the earliest ``start`` of the launch (0 where a program wrote no stamp: read only the
  slots the kernel writes, see ``ep_sync.PROF_*``). Sync the devices first.
  """
  from jax_ep import runtime
  from jax_ep.kernels.ep_sync import PROF_NAMES, PROF_OFF, PROF_SLOTS
  out = []
  for dev in runtime.devices():
    raw = np.frombuffer(runtime.read_symmetric(dev, PROF_OFF, 8 * PROF_SLOTS * num_programs),
                        np.int64).reshape(num_programs, PROF_SLOTS)
    t0 = raw[:, 0][raw[:, 0] > 0].min() if (raw[:, 0] > 0).any() else 0
    out.append({name: np.where(raw[:, i] > 0, raw[:, i] - t0, 0)
                for i, name in enumerate(PROF_NAMES)})
  return out


# -- the backend functions -----------------------------------------------------------------------

def _world(config: EPConfig) -> int:
  return lax.axis_size(config.axis_name)


def dispatch(x, topk_idx, topk_weights, num_invalid, config: EPConfig):
  _, kd, _, ks, _ = _kernels()
  world = _world(config)
  t = x.shape[0]
  p = _plan(config, world, t, x.dtype)
  nb, e, el, c = p.num_blocks, p.num_experts, p.e_local, p.capacity
  # The launcher appends sym_table, rank, world, epoch, then the scalars.
  recv_x, recv_w, recv_pos, gs, go, nrecv, ndrop, _, _ = _call(
      "jax_ep.dispatch", config, p, kd.dispatch_kernel, x, topk_idx.astype(jnp.int32),
      topk_weights.astype(jnp.float32),
      out_shapes=(_sds((c, p.hidden), x.dtype), _sds((c,), jnp.float32),
                  _sds((world, t, p.topk), jnp.int32), _sds((el,), jnp.int32),
                  _sds((el,), jnp.int32), _sds((1,), jnp.int32), _sds((1,), jnp.int32),
                  _sds((nb, e), jnp.int32), _sds((p.base_rows, e), jnp.int32)),  # scratch
      constexprs=p.dispatch(False), scalars=_scalars(config, ks.OP_DISPATCH, p, x.dtype),
      stage=p.dispatch_stage(x.dtype.itemsize))
  layout = DispatchLayout(
      group_sizes=gs, group_offsets=go, num_recv_rows=nrecv[0], num_dropped=ndrop[0],
      num_invalid=num_invalid, topk_idx=topk_idx.astype(jnp.int32), recv_pos=recv_pos,
      row_weights=recv_w)
  return recv_x, recv_w, layout


def dispatch_rows(x, layout: DispatchLayout, config: EPConfig):
  _, kd, _, ks, _ = _kernels()
  world = _world(config)
  p = _plan(config, world, x.shape[0], x.dtype)
  recv_x, = _call(
      "jax_ep.dispatch_rows", config, p, kd.dispatch_rows_kernel, x, layout.topk_idx,
      layout.recv_pos, layout.group_offsets, layout.group_sizes,
      out_shapes=(_sds((p.capacity, p.hidden), x.dtype),), constexprs=p.dispatch(True),
      scalars=_scalars(config, ks.OP_DROWS, p, x.dtype),
      stage=p.dispatch_stage(x.dtype.itemsize))
  return recv_x


def combine_rows(y, row_weights, layout: DispatchLayout, config: EPConfig):
  _, _, kc, ks, _ = _kernels()
  world = _world(config)
  t = layout.num_tokens
  p = _plan(config, world, t, y.dtype)
  out, = _call(
      "jax_ep.combine", config, p, kc.combine_kernel, y, row_weights.astype(jnp.float32),
      layout.recv_pos, out_shapes=(_sds((t, p.hidden), y.dtype),), constexprs=p.combine(),
      scalars=_scalars(config, ks.OP_COMBINE, p, y.dtype))
  return out


def gather_slots(values, layout: DispatchLayout, config: EPConfig):
  _, _, kc, ks, _ = _kernels()
  world = _world(config)
  t = layout.num_tokens
  p = _plan(config, world, t, jnp.float32)
  out, = _call(
      "jax_ep.gather_slots", config, p, kc.gather_kernel, values.astype(jnp.float32),
      layout.recv_pos, layout.topk_idx, out_shapes=(_sds((t, p.topk), jnp.float32),),
      constexprs=p.gather(), scalars=_scalars(config, ks.OP_GATHER, p, jnp.float32),
      num_warps=4)
  return out
