"""Does dw wait on DRAM when its programs move to the next expert? A probe, not a benchmark.

The dw kernels' programs walk the experts in step: each takes one (K tile, N tile) and
reduces expert 0's rows, then expert 1's, ..., so at every expert boundary all resident
programs ask for rows no program has read yet, from DRAM, at once. This probe times dw (the
shape's default kernel, or the ``--configs`` of bench_dw_variants) on the benchmark's group
sizes three ways:

  * ``disjoint``: the real layout, expert e's rows after expert e - 1's;
  * ``shared``: every expert's group starts at row 0, so all experts reduce over the same
    first few hundred rows of x and dy, which stay in L2 after the first expert (the FLOPs,
    tiles, steps, partial steps and output written are the same);
  * ``one_slot``: ``shared`` with every tile stored into expert 0's slot of dw (the step
    table's expert column set to 0): the same stores, but the tiles written while a wave of
    programs runs stay in L2, so little of dw reaches DRAM.

Each run is ``bench_gemm_clocks.sustained`` (back to back for ``--seconds``, SM clock sampled);
rounds interleave the configurations and layouts.

    python benchmarks/probes/dw_resident_rows.py [--shapes dsv3_up,dsv3_down] [--configs ...]
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_gemm_clocks as bgc  # noqa: E402
import bench_grouped_gemm as bgg  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="dsv3_up,dsv3_down")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--seconds", type=float, default=2.0)
  p.add_argument("--configs", default="default",
                 help="comma-separated: default (the shape's dw kernel) or labels of "
                      "bench_dw_variants.variants()")
  args = p.parse_args(argv)
  import bench_dw_variants
  table = dict(bench_dw_variants.variants(), default=None)
  configs = [c for c in args.configs.split(",") if c]
  if set(configs) - set(table):
    p.error(f"--configs: unknown {sorted(set(configs) - set(table))}; choose from "
            f"{sorted(table)}")
  triton_gemm = bgg.require_triton_gemm("dw_resident_rows")

  step_table = triton_gemm._dw_step_table

  def one_slot(*a, **kw):  # every step's tile stored into expert 0's slot
    steps, first = step_table(*a, **kw)
    return steps.at[:, 2].set(0), first

  field = bgc._reason_field()
  print(f"{jax.devices()[0].device_kind} | jax {jax.__version__}", flush=True)
  for si, name in enumerate(s for s in args.shapes.split(",") if s):
    (_, e, k, n), (sizes, layout, x, _, dy, _) = bgg.diagnostic_inputs(name, si)
    flops = 2.0 * float(sizes.sum()) * k * n
    gs = layout.group_sizes
    layouts = {"disjoint": layout.group_offsets, "shared": jnp.zeros_like(gs),
               "one_slot": jnp.zeros_like(gs)}
    # The shared layout's dw of expert e is x[:size_e]^T dy[:size_e]: check one expert.
    big = int(np.argmax(sizes))
    got = triton_gemm._grouped_dw(x, dy, gs, layouts["shared"], e)[big]
    want = jnp.dot(x[:sizes[big]].T, dy[:sizes[big]], preferred_element_type=jnp.float32)
    err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    print(f"{name}: shared layout, expert {big} vs jnp.dot: rel err {err:.1e}", flush=True)
    if err > 2e-2:
      sys.exit("dw_resident_rows: the shared layout's dw is wrong")
    for rnd in range(args.rounds):
      for cname in configs:
        for label, offs in layouts.items():
          f = lambda x, dy, o, c=table[cname]: triton_gemm._grouped_dw(  # noqa: E731
              x, dy, gs, o, e, config=c)
          triton_gemm._dw_step_table = one_slot if label == "one_slot" else step_table
          try:
            ms, clk = bgc.sustained(f, (x, dy, offs), args.seconds, 50, field, 0.5)
          finally:
            triton_gemm._dw_step_table = step_table
          print(f"  r{rnd} {name} dw {cname:8s} {label:8s}: {ms:7.3f} ms "
                f"{flops / ms / 1e9:5.0f} TFLOP/s | SM {clk.get('clocks.sm')} MHz, "
                f"{clk.get('power.draw')} W", flush=True)
    del x, dy


if __name__ == "__main__":
  main()
