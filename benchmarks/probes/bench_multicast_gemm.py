"""Probe: does a 2-CTA cluster with the weight tile multicast by TMA speed up the grouped GEMM?

Needs a Hopper GPU, torch, and Triton >= 3.9 (Gluon multicast; see multicast_gemm.py). The GPU
image runs Triton 3.6, so the call that ran this carried a slimmed Triton 3.9 (docs/GPU_RUNS.md).

Protocol: correctness first (every variant against torch's f32 per-expert product on small
shapes and on each benchmark shape: max abs error, and no unwritten row), then, in the same
process and interleaved round by round, the medians of ``triton.testing.do_bench`` for
  a/<stages>/<release>   one CTA per 128 x 256 tile (no cluster)
  b/<stages>/<release>   2-CTA clusters, the w tile multicast to both CTAs
  release: mbarrier (warp-specialized, stage release by mbarriers), nosync (the same without
           the producers' per-step cluster sync that Triton 3.9 inserts), cluster_barrier (a
           cluster barrier every K step)
  dense                  torch.matmul [R_total, K] @ [K, N] (cuBLAS), the same FLOPs
  bmm                    torch.bmm over the balanced groups (cuBLAS batched)
Groups are balanced (every expert R rows), as the probe kernel requires; the jax_ep kernels'
numbers for the same balanced shapes come from benchmarks/bench_grouped_gemm.py --routing
balanced in the same call. Writes <out>/multicast_probe_<device>_<date>.json.

    python benchmarks/probes/bench_multicast_gemm.py --out /tmp/mc_out
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import multicast_gemm as mc  # noqa: E402

# name: (C, E, K, N), as bench_grouped_gemm.py's shapes (balanced groups).
SHAPES = {
  "dsv3_up": (32768, 64, 7168, 4096),
  "dsv3_down": (32768, 64, 2048, 7168),
  "qwen3_up": (32768, 128, 2048, 1536),
  "qwen3_down": (32768, 128, 768, 2048),
}
SMALL = [(512, 2, 128, 256), (1024, 2, 640, 512), (2048, 4, 7168, 512)]


_PATCHED = {}


def launch(x, w, y, R, variant, stages, release):
  """release 'nosync': the 'mbarrier' kernel with Triton's producer sync taken out of its PTX
  (multicast_gemm.drop_producer_sync), launched through Triton's ir_override option."""
  if release != "nosync":
    return mc.run(x, w, y, R, variant=variant, stages=stages, release=release)
  key = (variant, stages, R, x.shape, w.shape)
  if key not in _PATCHED:
    k = mc.run(x, w, y, R, variant=variant, stages=stages, release="mbarrier")
    path = os.path.join(os.environ.get("TRITON_CACHE_DIR", "/tmp"),
                        f"nosync_{variant}_{stages}_{R}_{len(_PATCHED)}.ptx")
    with open(path, "w") as f:
      f.write(mc.drop_producer_sync(k.asm["ptx"]))
    _PATCHED[key] = path
  return mc.run(x, w, y, R, variant=variant, stages=stages, release="mbarrier",
                ir_override=_PATCHED[key])


def check(x, w, R, ref, variant, stages, release):
  y = torch.full((x.shape[0], w.shape[2]), float("nan"), device="cuda", dtype=torch.bfloat16)
  launch(x, w, y, R, variant, stages, release)
  torch.cuda.synchronize()
  unwritten = int(torch.isnan(y).any(dim=1).sum().item())
  err = (y.float() - ref).abs().max().item()
  tol = 2e-2 * max(1.0, ref.abs().max().item())
  return unwritten == 0 and err <= tol, err, unwritten, y


def inputs(C, E, K, N, seed):
  g = torch.Generator(device="cuda").manual_seed(seed)
  x = torch.randn(C, K, device="cuda", dtype=torch.bfloat16, generator=g)
  w = (torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5)
  return x, w


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--configs", default="a/4/mbarrier,b/4/mbarrier,b/4/nosync,a/3/mbarrier,"
                 "b/3/mbarrier,b/3/nosync,a/4/cluster_barrier,b/4/cluster_barrier")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="/tmp/mc_out")
  args = p.parse_args()
  configs = []
  for c in args.configs.split(","):
    v, s, r = c.split("/")
    configs.append((c, v, int(s), r))
  dev = torch.cuda.get_device_name()
  print(f"{dev}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
  result = {"device": dev, "triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "small_checks": [], "shapes": {}}
  ok_all = True
  failed = set()
  for C, E, K, N in SMALL:
    x, w = inputs(C, E, K, N, 1)
    ref = mc.reference(x, w, C // E)
    for name, v, s, r in configs:
      try:
        ok, err, unw, _ = check(x, w, C // E, ref, v, s, r)
      except Exception as e:  # a launch failure marks the config, the rest go on
        traceback.print_exc()
        ok, err, unw = False, float("nan"), -1
        print(f"  {name}: launch failed: {e}", flush=True)
      ok_all &= ok
      if not ok:
        failed.add(name)
      result["small_checks"].append({"shape": [C, E, K, N], "config": name, "ok": ok,
                                     "max_abs_err": err, "unwritten_rows": unw})
      print(f"small C={C} E={E} K={K} N={N} {name}: err {err:.3g} unwritten {unw} "
            f"{'OK' if ok else 'FAIL'}", flush=True)
  for shape in args.shapes.split(","):
    C, E, K, N = SHAPES[shape]
    R = C // E
    x, w = inputs(C, E, K, N, 2)
    ref = mc.reference(x, w, R)
    flops = 2 * C * K * N
    rec = {"C": C, "E": E, "K": K, "N": N, "checks": {}, "ms": {}}
    runnable = []
    for name, v, s, r in configs:
      if name in failed:
        continue
      try:
        ok, err, unw, y = check(x, w, R, ref, v, s, r)
      except Exception as e:
        print(f"{shape} {name}: launch failed: {e}", flush=True)
        ok, err, unw, y = False, float("nan"), -1, None
      ok_all &= ok
      rec["checks"][name] = {"ok": ok, "max_abs_err": err, "unwritten_rows": unw}
      print(f"{shape} {name}: err {err:.3g} unwritten {unw} {'OK' if ok else 'FAIL'}", flush=True)
      if ok:
        runnable.append((name, (lambda v=v, s=s, r=r, y=y: launch(x, w, y, R, v, s, r))))
    w2 = w[0].contiguous()
    xb = x.view(E, R, K)
    yd = torch.empty(C, N, device="cuda", dtype=torch.bfloat16)
    yb = torch.empty(E, R, N, device="cuda", dtype=torch.bfloat16)
    runnable.append(("dense", lambda: torch.matmul(x, w2, out=yd)))
    runnable.append(("bmm", lambda: torch.bmm(xb, w, out=yb)))
    for rnd in range(args.rounds):
      for name, fn in runnable:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        rec["ms"].setdefault(name, []).append(ms)
    dense = sorted(rec["ms"]["dense"])[len(rec["ms"]["dense"]) // 2]
    print(f"== {shape}: C={C} E={E} K={K} N={N}  (median over {args.rounds} rounds; "
          f"ratio = dense ms / ms)", flush=True)
    for name, samples in rec["ms"].items():
      med = sorted(samples)[len(samples) // 2]
      print(f"  {name:24s} {med:8.3f} ms  {flops / med * 1e-9:6.0f} TFLOP/s  "
            f"{dense / med:5.2f}x dense   rounds {' / '.join(f'{t:.3f}' for t in samples)}",
            flush=True)
    result["shapes"][shape] = rec
    del x, w, ref, xb, yd, yb, runnable
    torch.cuda.empty_cache()
  os.makedirs(args.out, exist_ok=True)
  tag = dev.replace(" ", "_")
  path = os.path.join(args.out, f"multicast_probe_{tag}_"
                      f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", path, "; all checks", "passed" if ok_all else "FAILED", flush=True)
  return 0 if ok_all else 1


if __name__ == "__main__":
  sys.exit(main())
