"""Per-program NVLink copy rates between the GPUs of one host: remote stores (push) against
remote loads (pull), per number of programs, warps and pipeline depth.

A diagnostic, not a target. Dispatch and combine push their rows with plain 16-byte stores
into the peers' symmetric regions. This times the ways a program can move rows over NVLink,
alone, on every GPU at once (as in an all-to-all):

  push   load rows of a local buffer, store them into the next ranks' regions (remote stores)
  pull   load rows from the next ranks' regions (remote loads), store them into a local buffer
  local  the same copy from this rank's own region (HBM to HBM, the baseline)
  fan    dispatch's sender loop: each chunk loaded once and stored to every peer (the store
         loop unrolled over the ranks, so the loads are pipelined), the pipeline drained per
         row block; fan_rt: the ranks in a run-time loop, as dispatch has them (Triton then
         does not pipeline the loads); *_sig1 / *_sig2 also raise a flag per row block in every
         rank: 1 = a release atomic per rank in turn (what dispatch does), 2 = one release
         store per rank from different threads at once

push/pull/local: row block b goes to (from) rank (me + 1 + b % (W - 1)) % W, so every peer gets
an equal share, in one pipelined loop over (row block, chunk) items. Tiles are [BLOCK_R,
BLOCK_H] (32 KB of bf16 by default, as dispatch's), loads pipelined STAGES deep (cp.async,
STAGES - 1 tiles in flight). The content is whatever the regions hold (no synchronization
between ranks: a rate, not a transfer). Time per op: slope between jitted loops of --inner and
3 x --inner ops.

Measured on 4x H200 (2026-11-21, docs/GPU_RUNS.md "Session 8"): 292-343 GB/s per GPU at 16-128
programs for stores and loads alike, 269-294 GB/s at 8: the ceiling of SM-issued NVLink traffic
in this pattern, which bounds what dispatch and combine can reach (docs/KERNELS.md).

  python benchmarks/bench_nvlink_rate.py [--programs 8,16,32] [--warps 8,16] [--stages 3,6]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _results import write_json  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# name: (MODE, FANOUT, SIGNAL)
MODES = {"push": (0, 0, 0), "pull": (1, 0, 0), "local": (2, 0, 0),
         "fan": (0, 1, 0), "fan_rt": (0, 2, 0), "fan_rt_sig1": (0, 2, 1),
         "fan_sig1": (0, 1, 1), "fan_sig2": (0, 1, 2)}


@triton.jit
def _signal(sym_table, rank, world, flag_off, idx, value, SIGNAL: tl.constexpr,
            BLOCK_W: tl.constexpr):
  """After a CTA barrier, flag ``[rank, idx] = value`` in every rank's region at ``flag_off``.
  SIGNAL 1: one release atomic per rank in turn (as ``kernels/ep_sync.signal_block``);
  2: one release store per rank, all ranks' from different threads at once."""
  tl.debug_barrier()
  if SIGNAL == 1:
    for r in range(world):
      flag = (tl.load(sym_table + r) + flag_off).to(tl.pointer_type(tl.int32))
      tl.atomic_xchg(flag + rank * 4096 + idx, value, sem="release", scope="sys")
  else:
    w = tl.arange(0, BLOCK_W)
    base = tl.load(sym_table + tl.where(w < world, w, rank)) + flag_off
    flag = base.to(tl.pointer_type(tl.int32)) + rank * 4096 + idx
    tl.inline_asm_elementwise("st.release.sys.global.b32 [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                              [flag, tl.full([BLOCK_W], 0, tl.int32) + value], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def nvlink_copy_kernel(src_ptr, out_ptr, sym_table, rank, world, epoch, region_off,
                       ROWS: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_H: tl.constexpr, STAGES: tl.constexpr, MODE: tl.constexpr,
                       FANOUT: tl.constexpr, SIGNAL: tl.constexpr, BLOCK_W: tl.constexpr):
  """MODE 0 push: src (local) -> region of rank dst; 1 pull: region of rank dst -> out;
  2 local: own region -> out. Rows of region at byte ``region_off``, [ROWS, HIDDEN] like src.

  FANOUT (push only; 1 unrolled over the ranks, 2 a run-time loop over them) is dispatch's
  sender loop: each [BLOCK_R, BLOCK_H] chunk of a row block is
  loaded once and stored to every other rank, the chunks of a block pipelined STAGES deep (the
  pipeline drains per block), and with SIGNAL > 0 a flag per block is raised in every rank
  (``_signal``). Otherwise one pipelined loop over (row block, chunk) items, never drained."""
  pid = tl.program_id(0)
  h = tl.arange(0, BLOCK_H)
  et = src_ptr.dtype.element_ty
  n_h: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
  n_blocks: tl.constexpr = (ROWS + BLOCK_R - 1) // BLOCK_R
  if FANOUT:
    for rb in range(pid, n_blocks, tl.num_programs(0)):
      r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
      row = r[:, None].to(tl.int64) * HIDDEN
      for h0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):
        m = (r < ROWS)[:, None] & ((h0 + h) < HIDDEN)[None, :]
        v = tl.load(src_ptr + row + (h0 + h)[None, :], mask=m, cache_modifier=".cg")
        if FANOUT == 2:  # a run-time loop over the ranks: Triton does not pipeline the loads
          for i in range(1, world):
            peer = (rank + i) % world
            region = (tl.load(sym_table + peer) + region_off).to(tl.pointer_type(et))
            tl.store(tl.multiple_of(region, 16) + row + (h0 + h)[None, :], v, mask=m)
        else:  # unrolled over BLOCK_W ranks, masked: the loads are pipelined
          for i in tl.static_range(1, BLOCK_W):
            peer = (rank + i) % world
            region = (tl.load(sym_table + peer) + region_off).to(tl.pointer_type(et))
            tl.store(tl.multiple_of(region, 16) + row + (h0 + h)[None, :], v,
                     mask=m & (i < world))
      if SIGNAL > 0:
        _signal(sym_table, rank, world, region_off - 65536, rb % 4096, epoch.to(tl.int32),
                SIGNAL, BLOCK_W)
  else:
    n_items = n_blocks * n_h
    # one pipelined loop over (row block, chunk) items, so the pipeline never drains
    for it in tl.range(pid, n_items, tl.num_programs(0), num_stages=STAGES):
      rb = it // n_h
      if MODE == 2:
        peer = rank
      else:
        peer = (rank + 1 + rb % (world - 1)) % world
      region = (tl.load(sym_table + peer) + region_off).to(tl.pointer_type(et))
      region = tl.multiple_of(region, 16)
      r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
      c = (it % n_h) * BLOCK_H + h
      m = (r < ROWS)[:, None] & (c < HIDDEN)[None, :]
      off = r[:, None].to(tl.int64) * HIDDEN + c[None, :]
      if MODE == 0:
        tl.store(region + off, tl.load(src_ptr + off, mask=m, cache_modifier=".cg"), mask=m)
      else:
        tl.store(out_ptr + off, tl.load(region + off, mask=m, cache_modifier=".cg"), mask=m)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--programs", default="8,16,32")
  p.add_argument("--warps", default="16")
  p.add_argument("--stages", default="3,6")
  p.add_argument("--modes", default="push,fan,fan_rt,fan_rt_sig1,fan_sig1,fan_sig2")
  p.add_argument("--rows", type=int, default=11264,
                 help="rows per rank per op (11264 x 7168 bf16 = 161 MB, about the DeepSeek-V3 "
                      "dispatch's remote bytes per rank at EP=4)")
  p.add_argument("--hidden", type=int, default=7168)
  p.add_argument("--block-r", type=int, default=16)
  p.add_argument("--block-h", type=int, default=1024)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--inner", type=int, default=5)
  p.add_argument("--out", default=None, help="directory for nvlink_rate_<time>.json")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jax_ep
  from bench_dispatch_combine import repeat, time_per_op, zero_carry
  from jax_ep import runtime
  from jax_ep.launch import triton_call

  devices = jax.devices()
  world = len(devices)
  if world < 2:
    raise SystemExit(f"bench_nvlink_rate: needs >= 2 GPUs, found {world}")
  rows, h = args.rows, args.hidden
  nbytes = rows * h * 2
  off = 1 << 20
  # a region large enough for the rows (the runtime sizes it from an EPConfig)
  cfg = jax_ep.EPConfig(num_experts=world, topk=1, hidden=h,
                        max_tokens_per_rank=-(-(nbytes + off) // (h * 2 * world)) + 16)
  runtime.initialize(cfg)
  if runtime.symmetric_bytes() < off + nbytes:
    raise SystemExit("bench_nvlink_rate: region too small for --rows")
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  spec = P("ep")
  x = jax.device_put(jnp.ones((world * rows, h), jnp.bfloat16),
                     jax.sharding.NamedSharding(mesh, spec))
  out_sds = jax.ShapeDtypeStruct((rows, h), jnp.bfloat16)

  def op(mode, g, warps, stages):
    m, fan, sig = MODES[mode]
    n = rows // (world - 1) if fan else rows   # fan-out: every row to every peer
    def f(xs):
      return triton_call(nvlink_copy_kernel, xs, out_shapes=(out_sds,), grid=(g,),
                         num_warps=warps, num_stages=1, symmetric=True,
                         symmetric_bytes=runtime.EXCHANGE_BYTES + off + nbytes,
                         scalars=(np.int64(off),),
                         constexprs=dict(ROWS=n, HIDDEN=h, BLOCK_R=args.block_r,
                                         BLOCK_H=args.block_h, STAGES=stages, MODE=m,
                                         FANOUT=fan, SIGNAL=sig,
                                         BLOCK_W=triton.next_power_of_2(world)))[0]
    return f, (n * (world - 1) if fan else n) * h * 2

  results = []
  unknown = sorted(set(args.modes.split(",")) - set(MODES))
  if unknown:
    p.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
  for mode in args.modes.split(","):
    for warps in [int(v) for v in args.warps.split(",")]:
      for stages in [int(v) for v in args.stages.split(",")]:
        for g in [int(v) for v in args.programs.split(",")]:
          fn, moved = op(mode, g, warps, stages)
          loops = {n: jax.jit(jax.shard_map(
              lambda a, n=n: repeat(n, fn, (a,), zero_carry()), mesh=mesh, in_specs=(spec,),
              out_specs=spec)) for n in (args.inner, 3 * args.inner)}
          s = time_per_op(loops, (x,), args.inner, args.iters)[0]
          r = dict(mode=mode, programs=g, warps=warps, stages=stages, seconds=s, bytes=moved,
                   gbps=moved / s / 1e9, gbps_per_program=moved / s / 1e9 / g)
          results.append(r)
          print(f"{mode:5s} programs {g:3d} warps {warps:2d} stages {stages}: "
                f"{s * 1e6:8.1f} us  {r['gbps']:7.1f} GB/s  {r['gbps_per_program']:6.1f} GB/s "
                f"per program", flush=True)
  if args.out:
    write_json(args.out, "nvlink_rate", device=str(devices[0].device_kind), world=world,
               args=vars(args), results=results)


if __name__ == "__main__":
  main()
