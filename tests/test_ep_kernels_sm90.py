"""The dispatch/combine kernels compile for sm_90 on the CPU (Triton's bundled ptxas) at the
shapes the GPUs run, within an H100/H200 SM's shared memory, with pipelined 16-byte row copies:
a launch that asks for more shared memory than the SM has fails only on the GPU, and 2-byte row
copies (what Triton 3.9 made of rows in the symmetric regions before ``ep_sync.row_align``) are
only slow there, so both are checked here, on whatever Triton the test extra installed.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("triton")

from jax_ep.kernels.ep_plan import EPPlan  # noqa: E402
from jax_ep.kernels.sm90 import SHARED_LIMIT, compile_ep_kernels  # noqa: E402


def _plan(world, tokens, hidden, experts, topk, itemsize, **kw):
  return EPPlan(world=world, num_tokens=tokens, max_tokens=tokens, hidden=hidden, topk=topk,
                num_experts=experts, capacity=int(1.25 * tokens * topk), alignment=1,
                itemsize=itemsize, **kw)


@pytest.mark.parametrize("world, tokens, hidden, experts, topk, dtype, kw", [
    (4, 4096, 7168, 256, 8, "bf16", {}),                          # the benchmark's shape
    (8, 1024, 2048, 128, 8, "f32", {}),
    (2, 512, 4096, 64, 16, "bf16", {"combine_stages": 6,          # the clamp must hold
                                     "expand_levels": 4}),
    (16, 256, 1024, 256, 4, "bf16", {"dispatch_stages": 5, "expand_order": 0}),
    (64, 128, 2048, 256, 8, "bf16", {"expand_levels": 2}),        # MAX_WORLD ranks
    (4, 4096, 7168, 256, 8, "bf16", {"dispatch_pull": 0, "expand_group": 1}),  # push
    (4, 4096, 7168, 256, 8, "bf16", {"zero_queue": 0}),
    (4, 4096, 7168, 256, 8, "bf16", {"dispatch_pull": 1, "zero_queue": 1}),
    (4, 4096, 7168, 256, 8, "bf16", {"combine_tokens": 64}),
    (8, 1024, 2048, 128, 8, "f32", {"combine_tokens": 128}),
    (4, 4096, 7168, 256, 8, "bf16", {"combine_split": 0, "combine_tokens": 16}),
    (8, 4096, 7168, 256, 8, "bf16", {"combine_narrow": 1}),
    (8, 1024, 2048, 128, 8, "f32", {"combine_narrow": 1, "combine_tokens": 16}),
    (8, 1024, 2048, 128, 8, "f32", {"dispatch_pull": 0}),
    (4, 4096, 7168, 256, 8, "bf16", {"dispatch_pull": 3}),
    (8, 1024, 2048, 128, 8, "f32", {"dispatch_pull": 3, "expand_order": 0}),
    (2, 4096, 7168, 256, 8, "bf16", {"dispatch_pull": 4}),
    (4, 4096, 7168, 256, 8, "bf16", {"combine_prefetch": 1}),
    (2, 4096, 7168, 256, 8, "bf16", {"combine_halves": 1}),
    (8, 1024, 2048, 128, 8, "f32", {"combine_halves": 1, "combine_tokens": 16}),
], ids=["dsv3-w4", "w8-f32", "k16-w2-deep", "w16-order0", "w64", "dsv3-w4-push",
        "dsv3-w4-zero-first", "dsv3-w4-pull1", "dsv3-w4-combine64", "w8-f32-combine128",
        "dsv3-w4-whole-16", "dsv3-w8-narrow", "w8-f32-narrow-16", "w8-f32-push", "dsv3-w4-pull-x",
        "w8-f32-pull-x-order0", "dsv3-w2-pull-staged", "dsv3-w4-combine-prefetch",
        "dsv3-w2-halves",
        "w8-f32-halves-16"])
def test_kernels_fit_in_shared_memory(world, tokens, hidden, experts, topk, dtype, kw):
  plan = _plan(world, tokens, hidden, experts, topk, 2 if dtype == "bf16" else 4, **kw)
  built = compile_ep_kernels(plan, dtype)
  assert set(built) == {"dispatch_kernel", "dispatch_rows_kernel", "combine_kernel",
                        "gather_kernel"}
  for name, (k, _) in built.items():
    assert 0 <= k.metadata.shared <= SHARED_LIMIT, (name, k.metadata.shared)
    assert ".target sm_90" in k.asm["ptx"], name
  for name in ("dispatch_kernel", "dispatch_rows_kernel", "combine_kernel"):
    ptx = built[name][0].asm["ptx"]
    assert re.search(r"\b(?:ld|st)\.global[.\w]*\.v4\.b32", ptx), f"{name}: no 16-byte vectors"
    assert "cp.async" in ptx, f"{name}: row loops not software-pipelined"
    # Rows of 16-byte multiples: no row moved 2 bytes at a time (triton 3.9 did that to every
    # row read from or written to a symmetric region without row_align). Past W = 16 combine's
    # reduce holds W_P row tiles at once, too many for wide vectors (docs/KERNELS.md "Limits").
    if dtype == "bf16" and (name != "combine_kernel" or world <= 16):
      narrow = re.findall(r"\b(?:ld|st)\.global(?:\.cg)?\.b16\b", ptx)
      assert not narrow, f"{name}: {len(narrow)} 2-byte row loads/stores"
  assert plan.combine()["STAGES"] == plan.combine_pipeline <= plan.combine_stages


def test_combine_pipeline_default_at_the_benchmark_shape():
  """The measured default (64 KB chunks, 4 stages: ep_plan's docstring) is what the benchmark
  shape gets, not lowered by the shared-memory clamp."""
  plan = _plan(4, 4096, 7168, 256, 8, 2)
  assert (plan.combine_acc_bytes, plan.combine_pipeline) == (64 * 1024, 4)
  # 32-token blocks (since session 17): the columns of a chunk halve against 16-token ones
  assert plan.combine_block_t == 32
  assert (plan.combine_block_hc, plan.combine_block_hc_all, plan.combine_block_hr) == (
      256, 128, 128)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_combine_reduce_moves_16_byte_vectors_up_to_8_ranks(world, itemsize):
  """The reduce tile gives every thread of the 16 warps at least 16 bytes of a row (64 KB
  chunks alone would give 8 at W = 8), at the push tile's pipeline depth."""
  from jax_ep.kernels.ep_plan import ROWS_WARPS
  plan = _plan(world, 4096, 7168, 256, 8, itemsize)
  per_thread = plan.combine_block_t * plan.combine_block_hr * itemsize // (32 * ROWS_WARPS)
  assert per_thread >= 16, (plan.combine_block_hr, per_thread)
  assert plan.combine_pipeline == plan.combine_stages


@pytest.mark.parametrize("world", [4, 8])
def test_combine_finds_rows_without_tile_reductions(world):
  """Combine finds each token's rows by one vector load per slot column / rank and elementwise
  selects (``_slot_levels``), with no reductions across the block's threads: the compiled
  kernel (DeepSeek-V3 shape, the default split path, 32-token blocks) has 55 CTA barriers
  and 18 / 26 warp shuffles at W = 4 / 8 (the [BLOCK_T, TOPK_P] tile version it replaced in
  session 17: 138 and 165 at W = 4). A layout conversion Triton put back into the item loop
  would add a pair of barriers per chunk loop and show up here."""
  k, _ = compile_ep_kernels(_plan(world, 4096, 7168, 256, 8, 2), "bf16")["combine_kernel"]
  ptx = k.asm["ptx"]
  bars = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))
  shfl = len(re.findall(r"\bshfl\.", ptx))
  assert re.search(r"\bcp\.async\.cg\b", ptx)
  assert bars <= 64 and shfl <= 32, (bars, shfl)


@pytest.mark.parametrize("world, tokens, topk, group, block_t", [
    (4, 4096, 8, 4, 32),   # the benchmark's shape: the measured defaults
    (1, 4096, 8, 4, 32),
    (1, 128, 8, 1, 16),    # a decode batch on one rank: 8 token blocks for 32 programs
    (4, 128, 8, 1, 16),    # 8 blocks x 4 sources = 32 items
    (2, 128, 8, 1, 16),    # 8 x 2 = 16 items even in groups of 1
    (8, 128, 8, 2, 32),    # 4 groups of 2 x 8 sources = 32 items; 4 x 8 push items
    (4, 0, 8, 1, 16),      # T = 0 runs no kernel; the plan still holds
    (2, 512, 2, 1, 32),    # top-2: 8 blocks of 64 tokens; combine's 64-token blocks halved
    (1, 256, 4, 1, 16),    # the main example: 16 combine blocks, so 16 combine programs
])
def test_small_batches_get_items_for_every_program(world, tokens, topk, group, block_t):
  """With few tokens, dispatch's expansion groups and combine's token blocks shrink until
  every program of the launch has an item (EPPlan.dispatch_group, combine_block_t), and
  combine's items are split into column ranges while they are still fewer than the programs
  (combine_push_parts; at most 14 of 512 columns at hidden 7168); where there are enough the
  measured defaults stay. Explicit combine_tokens are kept."""
  plan = _plan(world, tokens, 7168, 256, topk, 2, num_sms=32)
  assert (plan.dispatch_group, plan.combine_block_t) == (group, block_t)
  assert plan.dispatch(False)["GROUP"] == group and plan.combine()["BLOCK_T"] == block_t
  if tokens and (group > 1 or block_t > 16):
    programs = plan.grid("dispatch_kernel")
    assert -(-plan.kernel_blocks // group) * world >= programs or group == 1
    assert -(-tokens // block_t) * world >= 32 or block_t == 16
  # combine's column ranges (EPPlan.combine_push_parts) give the push items' programs the rest
  pp = plan.combine_push_parts
  items = -(-tokens // block_t) * world
  assert pp == 1 if (items >= 32 or not tokens) else (items * pp >= 32 or pp == 14), (pp, items)
  assert plan.combine()["PUSH_PARTS"] == pp
  assert plan.num_programs == min(32, max(plan.num_blocks, -(-tokens // block_t)) * world * pp)
  assert _plan(world, tokens, 7168, 256, topk, 2, combine_tokens=64).combine_block_t == 64
