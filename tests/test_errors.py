"""Bad input gets the documented error, naming the argument and the fix."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import cpu_mesh


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=6, topk=2, hidden=4, max_tokens_per_rank=0), "max_tokens_per_rank=0"),
    (dict(num_experts=0, topk=1, hidden=4, max_tokens_per_rank=2), "num_experts=0"),
    (dict(num_experts=4, topk=5, hidden=4, max_tokens_per_rank=2), "topk=5"),
    (dict(num_experts=4, topk=2, hidden=-1, max_tokens_per_rank=2), "hidden=-1"),
    (dict(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2, backend="cuda"), "backend='cuda'"),
    (dict(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2, capacity=0), "capacity=0"),
    (dict(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2, expert_alignment=0),
     "expert_alignment=0"),
    (dict(num_experts=4, topk=2.0, hidden=4, max_tokens_per_rank=2), "topk=2.0"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jax_ep.EPConfig(**kwargs)


def test_config_is_hashable_and_static():
  a = jax_ep.EPConfig(num_experts=8, topk=2, hidden=4, max_tokens_per_rank=3)
  b = jax_ep.EPConfig(num_experts=8, topk=2, hidden=4, max_tokens_per_rank=3)
  assert hash(a) == hash(b) and a == b
  assert a.capacity_rows(4) == 4 * 3 * 2
  with pytest.raises(ValueError, match="not divisible by the size 3"):
    a.capacity_rows(3)


def _run(config, ep_size, x, idx, w=None):
  mesh = cpu_mesh(ep_size)
  def per_shard(x, idx):
    return jax_ep.dispatch(x, idx, w, config=config)[0]
  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("ep"), P("ep")),
                               out_specs=P("ep")))(x, idx)


def test_unbound_axis_name():
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2)
  with pytest.raises(ValueError, match="axis_name='ep' is not bound"):
    jax_ep.dispatch(jnp.zeros((2, 4)), jnp.zeros((2, 2), jnp.int32), config=config)


def test_experts_not_divisible_by_axis():
  config = jax_ep.EPConfig(num_experts=6, topk=2, hidden=4, max_tokens_per_rank=2)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the size 4"):
    _run(config, 4, jnp.zeros((8, 4)), jnp.zeros((8, 2), jnp.int32))


@pytest.mark.parametrize("x_shape,idx_shape,idx_dtype,match", [
    ((4,), (2, 2), jnp.int32, "x must be \\[num_tokens, hidden\\]"),
    ((2, 5), (2, 2), jnp.int32, "x.shape\\[1\\]=5 must equal EPConfig.hidden=4"),
    ((3, 4), (3, 2), jnp.int32, "3 tokens, more than EPConfig.max_tokens_per_rank=2"),
    ((2, 4), (2, 3), jnp.int32, "topk_idx must be \\[num_tokens, topk\\]"),
    ((2, 4), (2, 2), jnp.float32, "topk_idx must have an integer dtype"),
])
def test_dispatch_shape_errors(x_shape, idx_shape, idx_dtype, match):
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2)
  with pytest.raises(ValueError, match=match):
    jax_ep.dispatch(jnp.zeros(x_shape), jnp.zeros(idx_shape, idx_dtype), config=config)


def test_dispatch_dtype_errors():
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2)
  with pytest.raises(ValueError, match="x must have a floating dtype"):
    jax_ep.dispatch(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 2), jnp.int32), config=config)
  with pytest.raises(ValueError, match="topk_weights must be \\[num_tokens, topk\\]"):
    jax_ep.dispatch(jnp.zeros((2, 4)), jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,)),
                    config=config)
  with pytest.raises(TypeError, match="config must be a jax_ep.EPConfig"):
    jax_ep.dispatch(jnp.zeros((2, 4)), jnp.zeros((2, 2), jnp.int32), config={"topk": 2})


def test_combine_errors(rng):
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2)
  other = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2, capacity=3)
  mesh = cpu_mesh(2)

  def per_shard(x, idx, y_rows, cfg):
    recv_x, _, layout = jax_ep.dispatch(x, idx, config=config)
    return jax_ep.combine(recv_x[:y_rows], layout, config=cfg)

  x, idx = jnp.zeros((4, 4)), jnp.zeros((4, 2), jnp.int32)
  run = lambda rows, cfg: jax.shard_map(lambda a, b: per_shard(a, b, rows, cfg), mesh=mesh,
                                        in_specs=(P("ep"), P("ep")), out_specs=P("ep"))(x, idx)
  with pytest.raises(ValueError, match="y must be \\[capacity, hidden\\]"):
    run(3, config)
  with pytest.raises(ValueError, match="pass the config used for dispatch"):
    run(None, other)
  with pytest.raises(TypeError, match="layout must be the DispatchLayout"):
    jax_ep.combine(jnp.zeros((8, 4)), {"group_sizes": 1}, config=config)


def test_checked_mode_raises_on_invalid_ids():
  from jax.experimental import checkify
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           check_expert_ids=True)
  mesh = cpu_mesh(2)
  step = jax.jit(checkify.checkify(jax.shard_map(
      lambda x, i: jax_ep.dispatch(x, i, config=config)[0], mesh=mesh,
      in_specs=(P("ep"), P("ep")), out_specs=P("ep"))))
  bad = jnp.array([[0, 1], [2, 9], [0, -1], [3, 3]], jnp.int32)
  err, _ = step(jnp.ones((4, 4)), bad)
  with pytest.raises(Exception, match="1 topk_idx value\\(s\\) lie outside \\[-1, 4\\)"):
    err.throw()
  ok = jnp.array([[0, 1], [2, -1], [0, -1], [3, 3]], jnp.int32)
  err, _ = step(jnp.ones((4, 4)), ok)
  err.throw()  # valid ids: no error


def test_triton_backend_without_runtime_says_what_to_call():
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           backend="triton")
  with pytest.raises(RuntimeError, match="call jax_ep.runtime.initialize"):
    _run(config, 2, jnp.ones((4, 4)), jnp.zeros((4, 2), jnp.int32))


@pytest.mark.parametrize("name, value, match", [
    ("JAX_EP_DISPATCH_STAGES", "9", "an integer from 1 to 6"),
    ("JAX_EP_DISPATCH_STAGES", "deep", "an integer from 1 to 6"),
    ("JAX_EP_COMBINE_STAGES", "2.5", "an integer from 1 to 6"),
    ("JAX_EP_COMBINE_ACC_BYTES", "1024", "a byte count from 8192 to 262144"),
    ("JAX_EP_EXPAND_ORDER", "4", "0 \\(own blocks first\\)"),
    ("JAX_EP_EXPAND_LEVELS", "-1", "an integer from 0 to 64"),
    ("JAX_EP_SENDER_FRACTION", "x", "a share of the programs"),
    ("JAX_EP_COMBINE_QUEUE", "4", "0 \\(reduce after every push\\)"),
    ("JAX_EP_COMBINE_WIDE", "2", "1 \\(the common push path in wider chunks\\)"),
    ("JAX_EP_DISPATCH_PULL", "5", "0 \\(senders store rows into the peers\\)"),
    ("JAX_EP_EXPAND_GROUP", "3", "1, 2, 4 or 8"),
    ("JAX_EP_COMBINE_TOKENS", "24", "0 \\(the default block: 32 tokens"),
    ("JAX_EP_ZERO_QUEUE", "3", "0 \\(receivers zero-fill first\\)"),
    ("JAX_EP_COMBINE_SPLIT", "2", "1 \\(a block's few tokens with many rows"),
    ("JAX_EP_COMBINE_NARROW", "-1", "0 \\(one level count for most blocks\\)"),
    ("JAX_EP_COMBINE_PREFETCH", "2", "0 \\(each push item loads its slot positions"),
    ("JAX_EP_COMBINE_HALVES", "2", "0 \\(a block with a token of many rows here"),
    ("JAX_EP_EXPAND_PARTS", "65", "0 \\(column ranges per expansion item"),
    ("JAX_EP_COMBINE_PARTS", "-1", "0 \\(column ranges per combine push item"),
])
def test_triton_tuning_knob_errors_name_the_variable(monkeypatch, name, value, match):
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           backend="triton")
  monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=f"{name}={value!r} must be {match}"):
    tb._plan(config, 2, 2)


def test_triton_tuning_knobs_reach_the_plan(monkeypatch):
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           backend="triton")
  default = tb._plan(config, 2, 2)
  big = dataclasses.replace(config, max_tokens_per_rank=4096)  # enough tokens for groups
  default_big = tb._plan(big, 2, 4096)
  monkeypatch.setenv("JAX_EP_DISPATCH_STAGES", "2")
  monkeypatch.setenv("JAX_EP_COMBINE_STAGES", "1")
  monkeypatch.setenv("JAX_EP_COMBINE_ACC_BYTES", "65536")
  monkeypatch.setenv("JAX_EP_EXPAND_LEVELS", "9")
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "0")
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "0")
  monkeypatch.setenv("JAX_EP_EXPAND_GROUP", "2")
  plan = tb._plan(config, 2, 2)
  # pull 4 outside the peer provider (here no runtime: no provider); groups of 4 blocks, but
  # of one at 2 tokens, where 4 would leave programs without an item (EPPlan.dispatch_group)
  assert (default.dispatch(False)["PULL"], default_big.dispatch(False)["GROUP"]) == (4, 4)
  assert default.expand_group == 4 and default.dispatch(False)["GROUP"] == 1
  assert (plan.dispatch(False)["PULL"], plan.expand_group) == (0, 2)
  assert tb._plan(big, 2, 4096).dispatch(True)["GROUP"] == 2
  # combine's queue: 0 by default at W = 2 (TWO_RANK_COMBINE_QUEUE), 1 elsewhere
  assert default.combine()["QUEUE"] == 0 and plan.combine()["QUEUE"] == 0
  monkeypatch.delenv("JAX_EP_COMBINE_QUEUE")
  assert tb._plan(config, 4, 2).combine()["QUEUE"] == 1
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "1")
  assert tb._plan(config, 2, 2).combine()["QUEUE"] == 1
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "2")
  assert tb._plan(config, 2, 2).combine()["QUEUE"] == 2
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "3")
  assert tb._plan(config, 2, 2).combine()["QUEUE"] == 3
  # where the claims do not fit beside the DONE flags (T = max_tokens = 1, W = 1): the queue
  assert tb._plan(dataclasses.replace(config, max_tokens_per_rank=1), 1, 1).combine()[
      "QUEUE"] == 1
  assert plan.expand_levels == 9 and plan.dispatch(False)["EXPAND_LEVELS"] == 2  # <= topk
  assert (plan.dispatch_stages, plan.combine_stages, plan.combine_acc_bytes) == (2, 1, 65536)
  assert plan.dispatch(False)["STAGES"] == 2 and plan.combine()["STAGES"] == 1
  assert default.dispatch(False)["STAGES"] == default.dispatch_stages
  assert default.combine()["SPLIT"] == 1
  monkeypatch.setenv("JAX_EP_COMBINE_SPLIT", "0")
  assert tb._plan(config, 2, 2).combine()["SPLIT"] == 0
  assert default.combine()["NARROW"] == 0
  monkeypatch.setenv("JAX_EP_COMBINE_NARROW", "1")  # top-2: J_UNROLL = 2, nothing narrower
  assert tb._plan(config, 2, 2).combine()["NARROW"] == 0
  assert default.dispatch(False)["EXPAND_LEVELS"] == 0
  assert default.combine()["PREFETCH"] == 0
  monkeypatch.setenv("JAX_EP_COMBINE_PREFETCH", "1")
  assert tb._plan(config, 2, 2).combine()["PREFETCH"] == 1
  # combine's half tiles: on by default at W = 2 (TWO_RANK_COMBINE_HALVES), off elsewhere;
  # the kernel gets them only where a token can have more than J_UNROLL rows on a rank
  top8 = dataclasses.replace(config, num_experts=16, topk=8)
  assert default.combine_halves == 1 and default.combine()["HALVES"] == 0  # top-2
  assert tb._plan(top8, 2, 2).combine()["HALVES"] == 1
  assert tb._plan(top8, 4, 2).combine()["HALVES"] == 0
  monkeypatch.setenv("JAX_EP_COMBINE_HALVES", "0")
  assert tb._plan(top8, 2, 2).combine()["HALVES"] == 0
  monkeypatch.setenv("JAX_EP_COMBINE_HALVES", "1")
  assert tb._plan(top8, 4, 2).combine()["HALVES"] == 1


@pytest.mark.parametrize("provider", ["nvshmem", "peer"])
def test_pull_from_x_needs_the_peer_provider(monkeypatch, provider):
  """JAX_EP_DISPATCH_PULL=3 (receivers read the peers' x in place) is refused, naming the
  knob and what to set, under the nvshmem provider, where XLA's buffers are not mapped on the
  peers; the peer provider takes it, and has it by default (nvshmem, and the cuda_async
  allocator: 4, the launcher's copy of x)."""
  from jax_ep import runtime
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           backend="triton")
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "world_size", lambda: 2)
  monkeypatch.setattr(runtime, "provider", lambda: provider)
  assert tb._plan(config, 2, 2).dispatch(False)["PULL"] == (3 if provider == "peer" else 4)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")  # pools: not peer-mapped
  assert tb._plan(config, 2, 2).dispatch(False)["PULL"] == 4
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "2")
  assert tb._plan(config, 2, 2).dispatch(False)["PULL"] == 2
  monkeypatch.setenv("JAX_EP_DISPATCH_PULL", "3")
  if provider == "nvshmem":
    with pytest.raises(ValueError, match="JAX_EP_DISPATCH_PULL=3 .* set it to 4 .* or unset"):
      tb._plan(config, 2, 2)
  else:
    assert tb._plan(config, 2, 2).dispatch(False)["PULL"] == 3


@pytest.mark.parametrize("name", ["JAX_EP_COMBINE_VECTORS", "JAX_EP_DISPATCH_VECTORS"])
def test_removed_triton_knob_warns(monkeypatch, name):
  """A knob that no longer exists is named in a warning, not silently ignored; the plan is the
  default one."""
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=4, topk=2, hidden=4, max_tokens_per_rank=2,
                           backend="triton")
  default = tb._plan(config, 2, 2)
  monkeypatch.setenv(name, "1")
  with pytest.warns(UserWarning, match=f"{name} is no longer read"):
    plan = tb._plan(config, 2, 2)
  assert plan == default


def test_expand_parts_knob_reaches_the_kernel(monkeypatch):
  """JAX_EP_EXPAND_PARTS: by default a decode batch's expansion items are split into column
  ranges (one rank, 128 tokens: 8 items for 32 programs, 4 ranges each); 1 keeps whole rows,
  n asks for n."""
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=256, topk=8, hidden=7168, max_tokens_per_rank=4096,
                           backend="triton")
  assert tb._plan(config, 1, 128).dispatch(False)["PARTS"] == 4
  assert tb._plan(config, 4, 4096).dispatch(False)["PARTS"] == 1  # enough items
  for value, want in (("1", 1), ("2", 2), ("7", 7), ("64", 7)):  # at most one per row chunk
    monkeypatch.setenv("JAX_EP_EXPAND_PARTS", value)
    assert tb._plan(config, 1, 128).dispatch(True)["PARTS"] == want, value


def test_combine_parts_knob_reaches_the_kernel(monkeypatch):
  """JAX_EP_COMBINE_PARTS: by default a decode batch's combine push items are split into column
  ranges (one rank, 128 tokens: 8 items of 16 tokens for 32 programs, 4 ranges of 2048
  columns; two ranks: 2 ranges), with as many programs; 1 keeps whole rows, n asks for n (at
  most one per 512 columns), and the ranges are part of the ranks' op fingerprint."""
  from jax_ep.backends import triton as tb
  config = jax_ep.EPConfig(num_experts=256, topk=8, hidden=7168, max_tokens_per_rank=4096,
                           backend="triton")
  one = tb._plan(config, 1, 128)
  assert (one.combine()["PUSH_PARTS"], one.combine()["PUSH_COLS"], one.num_programs) == (
      4, 2048, 32)
  assert tb._plan(config, 2, 128).combine()["PUSH_PARTS"] == 2
  assert tb._plan(config, 4, 4096).combine()["PUSH_PARTS"] == 1  # enough items
  fp = tb._scalars(config, 1, one, jnp.bfloat16)[2]
  for value, want in (("1", 1), ("3", 3), ("64", 14)):
    monkeypatch.setenv("JAX_EP_COMBINE_PARTS", value)
    plan = tb._plan(config, 1, 128)
    assert plan.combine()["PUSH_PARTS"] == want, value
    assert plan.num_programs == min(32, 8 * want)
    assert tb._scalars(config, 1, plan, jnp.bfloat16)[2] != fp
  monkeypatch.setenv("JAX_EP_COMBINE_QUEUE", "3")  # that queue keeps whole rows
  assert tb._plan(config, 1, 128).combine()["PUSH_PARTS"] == 1


def test_combine_wide_knob_reaches_the_kernel(monkeypatch):
  """JAX_EP_COMBINE_WIDE: by default the common push path takes 256-column chunks at top-8
  in 32-token blocks (the all-TOPK path 128); 0 gives both paths one width."""
  from jax_ep.backends import triton as tb
  # (4096 tokens: few tokens would shrink the blocks, EPPlan.combine_block_t)
  config = jax_ep.EPConfig(num_experts=16, topk=8, hidden=7168, max_tokens_per_rank=4096,
                           backend="triton")
  wide = tb._plan(config, 2, 4096).combine()
  monkeypatch.setenv("JAX_EP_COMBINE_WIDE", "0")
  narrow = tb._plan(config, 2, 4096).combine()
  assert (wide["BLOCK_HC"], wide["BLOCK_HC_ALL"]) == (256, 128)
  assert (narrow["BLOCK_HC"], narrow["BLOCK_HC_ALL"]) == (128, 128)
  assert wide["STAGES"] == narrow["STAGES"]  # the same shared memory per stage
