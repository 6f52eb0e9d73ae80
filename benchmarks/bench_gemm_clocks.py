"""SM clock and power while a grouped GEMM product runs, beside the dense product of the same
FLOPs (a diagnostic beside bench_grouped_gemm.py).

The grouped dw at the DeepSeek-V3 shapes writes 3.76 GB (up) / 1.88 GB (down) that the dense
dw of the same FLOPs does not (58 / 29 MB), and the forward reads every expert's weights; a
kernel that moves more bytes per FLOP draws more power, and a card at its power limit lowers
its clocks. This measures that directly: each (shape, product, implementation) runs back to
back for ``--seconds`` (jitted loops of ``inner`` ops whose carry keeps one element of each
output, x changing by one element per iteration, as in bench_dw_variants.py) while
``nvidia-smi`` samples the SM clock, the power draw and the clock-event reasons every
``--sample-ms``. Printed and written to JSON per run: ms per op, the median SM clock and power
over the run's samples (the first ``--settle-s`` dropped), the energy per op, and every
clock-event reason seen (NVML's bits: SW power cap, HW slowdown, thermal, ...).

Products: ``fwd`` (x[rows of e] @ w[e] vs x @ w), ``dx`` (dy @ w[e]^T vs dy @ w^T) and ``dw``
(x[rows of e]^T @ dy[rows of e] vs x^T @ dy); implementations ``triton`` (our kernels, the
defaults) and ``dense`` (one cuBLAS ``jnp.dot`` over the same rows). A shape like
``32768x8x7168x4096`` (the DeepSeek-V3 up product in 8 groups: dw writes 470 MB) separates the
output's bytes from the kernel.

Run (one GPU): python benchmarks/bench_gemm_clocks.py [--shapes dsv3_up] [--products dw,fwd]
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench_grouped_gemm as bgg  # noqa: E402  (shapes, inputs, ops, the timing loop)
from _results import write_json  # noqa: E402

# NVML's clock-event reason bits (nvmlClocksEventReason*), as nvidia-smi prints them in hex.
REASONS = {0x1: "idle", 0x2: "app clocks", 0x4: "sw power cap", 0x8: "hw slowdown",
           0x10: "sync boost", 0x20: "sw thermal", 0x40: "hw thermal", 0x80: "hw power brake",
           0x100: "display clock"}
FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")


def reason_names(mask: int) -> list[str]:
  return [name for bit, name in REASONS.items() if mask & bit] or (["none"] if mask == 0 else [])


def _reason_field() -> str:
  """The clock-event reasons' query field: renamed from ``clocks_throttle_reasons`` in newer
  drivers."""
  for field in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
    r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                       capture_output=True, text=True)
    if r.returncode == 0 and "Field" not in r.stdout:
      return field
  return ""


def _gpu_index() -> str:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
  return visible.split(",")[0] if visible else "0"


class Sampler:
  """``nvidia-smi`` sampling the card every ``ms`` milliseconds while the block runs."""

  def __init__(self, ms: int, reason_field: str):
    self.query = list(FIELDS) + ([reason_field] if reason_field else [])
    self.ms = ms

  def __enter__(self):
    self.proc = subprocess.Popen(
        ["nvidia-smi", "-i", _gpu_index(), f"--query-gpu={','.join(self.query)}",
         "--format=csv,noheader,nounits", f"-lms={self.ms}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    return self

  def __exit__(self, *exc):
    os.killpg(self.proc.pid, signal.SIGTERM)  # its whole group: nothing left holding the pipe
    out, _ = self.proc.communicate(timeout=10)
    self.rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return False

  def summary(self, settle_s: float) -> dict:
    """Medians over the samples after the first ``settle_s`` (the clocks ramping up)."""
    rows = self.rows[int(settle_s * 1000 / self.ms):] or self.rows
    out = dict(samples=len(rows))
    for i, field in enumerate(FIELDS):
      vals = [float(r[i]) for r in rows if len(r) > i and _is_number(r[i])]
      out[field] = statistics.median(vals) if vals else None
      if field == "clocks.sm" and vals:
        out["clocks.sm_min"], out["clocks.sm_max"] = min(vals), max(vals)
    if len(self.query) > len(FIELDS):
      masks = [int(r[len(FIELDS)], 16) for r in rows
               if len(r) > len(FIELDS) and r[len(FIELDS)].lower().startswith("0x")]
      seen: dict[str, int] = {}
      for m in masks:
        for name in reason_names(m):
          seen[name] = seen.get(name, 0) + 1
      out["reasons"] = {k: round(v / max(len(masks), 1), 3) for k, v in seen.items()}
    return out


def _fmt(v) -> str:
  return "?" if v is None else f"{v:.3f}"


def _is_number(s: str) -> bool:
  try:
    float(s)
    return True
  except ValueError:
    return False


def sustained(f, args, seconds: float, sampler_ms: int, reason_field: str, settle_s: float):
  """Run ``f`` back to back for ``seconds`` in jitted loops; (ms per op, clock summary)."""
  one = bgg.looped_keep_one(f, 1)
  jax.block_until_ready(one(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(one(*args))
  t_one = time.perf_counter() - t0
  inner = int(min(500, max(1, math.ceil(0.1 / max(t_one, 1e-6)))))  # ~0.1 s per call
  g = bgg.looped_keep_one(f, inner)
  jax.block_until_ready(g(*args))
  calls = 0
  with Sampler(sampler_ms, reason_field) as s:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      jax.block_until_ready(g(*args))
      calls += 1
    elapsed = time.perf_counter() - t0
  return elapsed / (calls * inner) * 1e3, dict(s.summary(settle_s), inner=inner, calls=calls)


def shape_ops(shape: str, products, seed: int = 0):
  """(FLOPs of one product, {product: {"triton": (fn, args), "dense": (fn, args)}}) on
  bench_grouped_gemm's inputs for ``shape`` (a name or ROWSxEXPERTSxKxN; uniform routing,
  bf16), made once; the dense products run over the rows in groups (``product_ops``)."""
  (_, e, k, n), (sizes, layout, x, w, dy, w_dense) = bgg.diagnostic_inputs(shape, seed)
  r = int(sizes.sum())
  return 2.0 * r * k * n, {
      product: bgg.product_ops(product, x, w, dy, layout.group_sizes, layout.group_offsets, e,
                               x[:r], w_dense, dy[:r]) for product in products}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="dsv3_up,32768x8x7168x4096",
                 help="names from bench_grouped_gemm.SHAPES or ROWSxEXPERTSxKxN")
  p.add_argument("--products", default="dw,fwd", help="comma-separated: fwd, dx, dw")
  p.add_argument("--impls", default="dense,triton", help="comma-separated: dense, triton")
  p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every run")
  p.add_argument("--seconds", type=float, default=3.0, help="sustained seconds per run")
  p.add_argument("--settle-s", type=float, default=0.5, help="samples dropped at each start")
  p.add_argument("--sample-ms", type=int, default=50)
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  args = p.parse_args(argv)
  products = [q for q in args.products.split(",") if q]
  impls = [q for q in args.impls.split(",") if q]
  if set(products) - {"fwd", "dx", "dw"} or not products:
    p.error(f"--products={args.products!r}: choose from fwd, dx, dw")
  if set(impls) - {"dense", "triton"} or not impls:
    p.error(f"--impls={args.impls!r}: choose from dense, triton")
  bgg.require_triton_gemm("bench_gemm_clocks")
  field = _reason_field()
  limit = subprocess.run(["nvidia-smi", "-i", _gpu_index(), "--query-gpu=name,power.limit,"
                          "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
  print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | card: {limit} | "
        f"reasons field: {field or 'none'}", flush=True)

  rows_out = []
  for si, name in enumerate(q for q in args.shapes.split(",") if q):
    flops, ops = shape_ops(name, products, si)
    for rnd in range(args.rounds):
      for product in products:
        for impl in impls:
          f, fargs = ops[product][impl]
          ms, clk = sustained(f, fargs, args.seconds, args.sample_ms, field, args.settle_s)
          watts = clk.get("power.draw")
          row = dict(shape=name, product=product, impl=impl, round=rnd, ms=ms,
                     tflops=flops / ms / 1e9, joules_per_op=watts * ms / 1e3 if watts else None,
                     **clk)
          rows_out.append(row)
          print(f"{name:18s} {product:3s} {impl:6s} r{rnd}: {ms:7.3f} ms {row['tflops']:5.0f} "
                f"TFLOP/s | SM {clk.get('clocks.sm')} MHz ({clk.get('clocks.sm_min')}-"
                f"{clk.get('clocks.sm_max')}), mem {clk.get('clocks.mem')} MHz, {watts} W, "
                f"{clk.get('temperature.gpu')} C | {_fmt(row['joules_per_op'])} J/op | reasons "
                f"{clk.get('reasons')} ({clk['samples']} samples)", flush=True)
    del ops
  write_json(args.out, "gemm_clocks", device=jax.devices()[0].device_kind, card=limit,
             args=vars(args), rows=rows_out)


if __name__ == "__main__":
  main()
