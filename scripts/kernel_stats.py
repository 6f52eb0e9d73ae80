"""Compile the dispatch/combine kernels for sm_90 at one shape and print registers, spills and
shared memory per kernel (no GPU needed: Triton and its bundled ptxas run on the CPU).

  python scripts/kernel_stats.py                               # the benchmark's DeepSeek-V3 shape
  python scripts/kernel_stats.py --tokens 512 --hidden 1024 --experts 64 --topk 4 --dtype f32
  JAX_EP_COMBINE_SPLIT=0 python scripts/kernel_stats.py         # tuning knobs: the backend's
                                                                # variables (docs/KERNELS.md)
  python scripts/kernel_stats.py --world 2 --provider nvshmem   # the defaults a step takes there

Spills (local memory) in these kernels mean a row tile too big for the registers: shrink the
tile budgets in kernels/ep_plan.py (TILE_BYTES, ACC_BYTES) or the warps (ROWS_WARPS).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ptxas_stats(ptx: str, arch: str = "sm_90a") -> str:
  """ptxas -v's resource line for the PTX's kernel ("N registers, M bytes spill ...")."""
  from triton.backends.nvidia.compiler import get_ptxas
  ptxas = get_ptxas(90).path
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    res = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(d, "k.cubin")],
                         capture_output=True, text=True, check=True)
  lines = [l.split("info    :")[-1].strip() for l in res.stderr.splitlines()
           if "registers" in l or "spill" in l]
  return "; ".join(lines)


def cubin_usage(cubin: bytes) -> str:
  """cuobjdump's resource line of the cubin Triton built ("REG:n STACK:m ..."): STACK > 0
  means spills or local arrays."""
  from triton.backends.nvidia.compiler import get_ptxas
  tool = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(cubin)
    f.flush()
    res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                         text=True, check=True)
  line = [l for l in res.stdout.splitlines() if "REG:" in l][-1]
  return " ".join(line.split()[:3])


def item_shares(plan, seed=0) -> tuple[float, float, float]:
  """The shares of (combine block, rank) push items, uniform top-k routing without
  duplicates, in which some token has more than J_UNROLL of its rows (the all-TOPK path, or
  with ``combine_split`` its heavy tile), in which no token has more than 2 (the 2-level
  path with ``combine_narrow``), and of the former those whose second half of tokens by rows
  has at most J_UNROLL each (the two half tiles with ``combine_halves``)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  t, bt = plan.num_tokens, plan.combine_block_t
  idx = np.argsort(rng.random((t, plan.num_experts)), axis=1)[:, :plan.topk]
  rank = idx // plan.e_local
  nb = -(-t // bt)
  heavy = narrow = halves = 0
  for s in range(plan.world):
    cnt = np.zeros(nb * bt, np.int64)
    cnt[:t] = (rank == s).sum(1)
    desc = -np.sort(-cnt.reshape(nb, bt), axis=1)  # each block's counts, most first
    jmax = desc[:, 0]
    heavy += int((jmax > plan.j_unroll).sum())
    narrow += int(((jmax > 0) & (jmax <= 2)).sum())
    halves += int(((jmax > plan.j_unroll) & (desc[:, bt // 2] <= plan.j_unroll)).sum())
  n = nb * plan.world
  return heavy / n, narrow / n, halves / n


def main() -> None:
  from jax_ep.kernels.ep_plan import EPPlan
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--world", type=int, default=4)
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=7168)
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
  p.add_argument("--num-sms", type=int, default=32)
  p.add_argument("--warps", type=int, help="override ep_plan.ROWS_WARPS")
  p.add_argument("--tile-bytes", type=int, help="override ep_plan.TILE_BYTES")
  p.add_argument("--profile", action="store_true", help="the PROFILE=1 build (phase stamps)")
  p.add_argument("--provider", choices=("peer", "nvshmem"), default="peer",
                 help="the runtime provider whose defaults the plan takes (peer: dispatch "
                      "pull 3)")
  args = p.parse_args()
  from jax_ep.backends.triton import _knobs
  from jax_ep.kernels import ep_plan
  from jax_ep.kernels.sm90 import compile_ep_kernels
  if args.tile_bytes:
    ep_plan.TILE_BYTES = args.tile_bytes

  itemsize = 2 if args.dtype == "bf16" else 4
  cap = int(1.25 * args.tokens * args.topk)
  plan = EPPlan(world=args.world, num_tokens=args.tokens, max_tokens=args.tokens,
                hidden=args.hidden, topk=args.topk, num_experts=args.experts, capacity=cap,
                alignment=1, num_sms=args.num_sms, itemsize=itemsize, profile=args.profile,
                **_knobs(EPPlan, args.world, args.provider))  # the knobs as a step takes them
  print(f"plan: senders {plan.num_senders} receivers {plan.num_receivers} programs "
        f"{plan.num_programs}; dispatch tile [{plan.block_t}, {plan.block_h}]; combine block "
        f"{plan.combine_block_t} x push {plan.combine_block_hc} (J {plan.j_unroll}; "
        f"{plan.combine_block_hc_all} all levels) / reduce "
        f"{plan.combine_block_hr} (all {plan.world} ranks)"
        + (f"; split tile [{plan.combine_heavy_t}, {plan.combine_block_hc_heavy}]"
           if plan.combine_split else ""))
  heavy, narrow, halves = item_shares(plan)
  print(f"uniform routing: {heavy:.0%} of the combine push items hold a token with more than "
        f"{plan.j_unroll} rows on their rank ({halves:.0%} could run as half tiles, "
        f"combine_halves={plan.combine_halves}), in {narrow:.0%} no token has more than 2")
  for name, (k, warps) in compile_ep_kernels(plan, args.dtype, args.warps).items():
    ptx = k.asm["ptx"]
    vec = len(re.findall(r"\b(?:ld|st)\.global[.\w]*\.v4\.b32", ptx))
    # CTA barriers and warp shuffles in the whole kernel's code (not per run-time iteration):
    # the tiles' reductions and layout conversions show up here
    bars = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))
    shfl = len(re.findall(r"\bshfl\.", ptx))
    print(f"{name:22s} warps {warps:2d} shared {k.metadata.shared:6d} B  16-byte ld/st {vec:4d}  "
          f"barriers {bars:3d} shuffles {shfl:3d}  {cubin_usage(k.asm['cubin'])}")


if __name__ == "__main__":
  main()
