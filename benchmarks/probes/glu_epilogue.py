"""What does the SwiGLU epilogue save? A probe, not a benchmark.

``jax_ep.experts.swiglu_fused``'s forward on the triton path runs its gate | up product with
the activation in the kernel's epilogue (``triton_gemm._grouped_glu``: ``[C, F]`` out) instead
of the plain product (``[C, 2F]`` out) followed by the activation in XLA. This probe times, on
the same inputs and in interleaved rounds, the plain product alone (``plain``), the plain
product then the activation (``apart``) and the fused kernel (``fused``, also with other
``--configs``), each in ``bench_grouped_gemm``'s timing loop, and checks the fused output
against ``apart``'s.

    python benchmarks/probes/glu_epilogue.py [--shapes dsv3_up,qwen3_up] [--configs s3,s4]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_grouped_gemm as bgg  # noqa: E402


def glu_config(k: int, n: int, name: str):
  """The fused kernel's tiles: the forward's (``default``), or its stages changed (``sN``)."""
  from jax_ep.kernels import grouped_gemm as gg
  cfg = gg.forward_config(k, n, "bfloat16", phase="fwd", tma=True, gluon=True)
  if not cfg.gluon:
    cfg = dataclasses.replace(cfg, gluon=True, flatten=False, half_tiles=False)
  if name == "default":
    return cfg
  return dataclasses.replace(cfg, num_stages=int(name[1:]))  # sN (checked by main)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="dsv3_up,qwen3_up",
                 help="gate | up products: names of bench_grouped_gemm.SHAPES or RxExKxN")
  p.add_argument("--configs", default="default", help="fused kernel tiles: default, sN")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--iters", type=int, default=20)
  args = p.parse_args(argv)
  bad = [c for c in args.configs.split(",") if c != "default" and not (
      c.startswith("s") and c[1:].isdigit())]
  if bad:
    p.error(f"--configs: unknown {bad}; choose default or sN (N stages)")
  triton_gemm = bgg.require_triton_gemm("glu_epilogue")

  for i, name in enumerate(args.shapes.split(",")):
    (rows, e, k, n), (_, layout, x, w, _, _) = bgg.diagnostic_inputs(name, 300 + i)
    s, o = layout.group_sizes, layout.group_offsets
    variants = {
        "plain": lambda x, w, s, o: triton_gemm._grouped(x, w, s, o, transpose_w=False),
        "apart": lambda x, w, s, o: triton_gemm._glu_of(
            triton_gemm._grouped(x, w, s, o, transpose_w=False)),
    }
    for c in args.configs.split(","):
      cfg = glu_config(k, n, c)
      variants[f"fused {c}"] = (
          lambda x, w, s, o, cfg=cfg: triton_gemm._grouped_glu(x, w, s, o, config=cfg))
    want = np.asarray(jax.jit(variants["apart"])(x, w, s, o), np.float32)
    scale = float(np.abs(want).max())
    for label, fn in variants.items():
      if label.startswith("fused"):
        got = jax.jit(fn)(x, w, s, o)
        if got is None:
          raise SystemExit(f"glu_epilogue: {label} cannot run at {name}")
        err = float(np.abs(np.asarray(got, np.float32) - want).max()) / scale
        print(f"{name} {label}: max |fused - apart| / max = {err:.2e}", flush=True)
        if not err < 2e-2:
          raise SystemExit(f"glu_epilogue: {label} differs at {name}")
    flops = 2.0 * rows * k * n
    for r in range(args.rounds):
      for label, fn in variants.items():
        t = bgg.time_op(fn, (x, w, s, o), args.iters, 50)
        print(f"{name} round {r} {label:>12}: {t['median_s'] * 1e3:7.3f} ms "
              f"(min {t['min_s'] * 1e3:.3f}) {flops / t['median_s'] / 1e12:6.1f} TFLOP/s",
              flush=True)


if __name__ == "__main__":
  main()
