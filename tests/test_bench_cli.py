"""The benchmarks' command lines check their arguments before any GPU work:
``benchmarks/bench_grouped_gemm.py --shapes`` takes the named shapes or ``ROWSxEXPERTSxKxN``
and names the argument when a shape is neither."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_ROOT, "benchmarks", "bench_grouped_gemm.py")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, _BENCH, *args], capture_output=True, text=True,
                        env=env, timeout=120, cwd=_ROOT)


@pytest.mark.parametrize("shape", ["32x2x0x4", "32x2x4", "dsv4_up", "1e3x2x4x4"])
def test_bad_shape_is_named(shape):
  res = _run("--shapes", shape)
  assert res.returncode == 2, res.stderr
  assert f"unknown shape {shape!r}" in res.stderr and "ROWSxEXPERTSxKxN" in res.stderr


@pytest.mark.parametrize("shapes", ["64x2x32x32", "qwen3_up,4096x16x1024x512"])
def test_custom_and_named_shapes_are_accepted(shapes):
  """Parsing passes; without a CUDA GPU the script then stops, saying why."""
  res = _run("--shapes", shapes)
  assert res.returncode == 1, res.stderr
  assert "unknown shape" not in res.stderr
  assert "cannot run here" in res.stderr


def test_ncu_sass_summary_cuts_a_kernel_into_its_loops(tmp_path):
  """scripts/ncu_sass_summary.py on a made-up Nsight Compute source export: the loop body
  (executed 80 times) and the code around it (8 times) come out as separate runs with their
  shares of the stall samples, and the stall reasons are totalled."""
  import gzip

  header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
            "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
  body = [["0x0", "IMAD R1, R2, R3, RZ", "10", "8", "10", "0", "9"],
          ["0x10", "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24", "60", "80", "0", "60", "0"],
          ["0x20", "@P0 BRA 0x10", "20", "80", "20", "0", "0"],
          ["0x30", "STG.E.128 desc[UR4][R2.64], R4", "10", "8", "0", "10", "0"]]
  path = tmp_path / "k_sass.csv.gz"
  with gzip.open(path, "wt") as f:
    f.write('"Kernel Name","my_kernel",\n')
    f.write(",".join(f'"{h}"' for h in header) + "\n")
    for row in body:
      f.write(",".join(f'"{v}"' for v in row) + "\n")
  res = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "ncu_sass_summary.py"),
                        str(path), "--top", "2"], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stderr
  out = res.stdout
  assert "my_kernel: 4 SASS instructions, 100 stall samples" in out
  assert "stalls: wait 70.0%, long_sb 30.0%" in out
  assert "SASS    1-   2  executed         80   80.0%" in out
  assert "SASS    0-   0  executed          8   10.0%" in out
  assert "HGMMA" in out.split("top 2 instructions")[1]


@pytest.mark.parametrize("script", ["bench_dw_variants", "bench_gemm_clocks",
                                    "probes/zero_rows_power", "probes/dw_resident_rows",
                                    "probes/glu_epilogue"])
def test_gpu_diagnostics_say_why_they_cannot_run_without_a_gpu(script):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  res = subprocess.run([sys.executable, os.path.join(_ROOT, "benchmarks", f"{script}.py"),
                        "--shapes", "64x2x128x256"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=_ROOT)
  assert res.returncode == 1, res.stderr
  name = os.path.basename(script)
  assert f"{name}: the triton grouped matmul cannot run here" in res.stderr


def test_dw_resident_rows_names_an_unknown_config():
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  res = subprocess.run([sys.executable, os.path.join(_ROOT, "benchmarks", "probes",
                                                     "dw_resident_rows.py"),
                        "--configs", "default,c9band9"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=_ROOT)
  assert res.returncode == 2, res.stderr
  assert "--configs: unknown ['c9band9']" in res.stderr and "c8band8" in res.stderr


def test_diagnostic_inputs_parse_shapes_and_make_bf16_uniform_inputs():
  """bench_grouped_gemm.diagnostic_inputs (the inputs of bench_dw_variants, bench_gemm_clocks
  and the probes): a named shape or ROWSxEXPERTSxKxN, bf16 operands, group sizes summing to
  the rows, the same inputs for the same seed."""
  sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
  import bench_grouped_gemm as bgg

  assert bgg.shape_dims("dsv3_up") == (32768, 64, 7168, 4096)
  assert bgg.shape_dims("96x3x128x256") == (96, 3, 128, 256)
  dims, (sizes, layout, x, w, dy, w_dense) = bgg.diagnostic_inputs("96x3x128x256", 1)
  assert dims == (96, 3, 128, 256) and sizes.sum() == 96 and len(sizes) == 3
  assert x.shape == (96, 128) and w.shape == (3, 128, 256) and dy.shape == (96, 256)
  assert w_dense.shape == (128, 256)
  assert {str(a.dtype) for a in (x, w, dy, w_dense)} == {"bfloat16"}
  np.testing.assert_array_equal(np.asarray(layout.group_sizes), sizes)
  _, (sizes2, _, x2, _, _, _) = bgg.diagnostic_inputs("96x3x128x256", 1)
  np.testing.assert_array_equal(sizes2, sizes)
  np.testing.assert_array_equal(np.asarray(x2, np.float32), np.asarray(x, np.float32))


def test_zero_rows_probe_lays_groups_out_aligned():
  """zero_rows_power's inputs: groups at 128-row aligned offsets in expert order, the
  in-group mask exactly their rows, so every row a 128-row tile computes past a group's end
  is a gap row (the multinomial group sizes of three seeds)."""
  sys.path.insert(0, os.path.join(_ROOT, "benchmarks", "probes"))
  sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
  import zero_rows_power as z

  for seed in range(3):
    sizes, offsets, in_group, x, dy, w, w_dense, flops, e = z.aligned_inputs(
        "1000x5x64x128", seed)
    sizes, offsets, in_group = map(np.asarray, (sizes, offsets, in_group))
    assert e == 5 and sizes.sum() == 1000 and flops == 2.0 * 1000 * 64 * 128
    assert (offsets % 128 == 0).all() and (np.diff(offsets) >= sizes[:-1]).all()
    assert x.shape == (in_group.size, 64) and dy.shape == (in_group.size, 128)
    assert w.shape == (5, 64, 128) and w_dense.shape == (64, 128)
    assert in_group.size == int(offsets[-1] + -(-sizes[-1] // 128) * 128)
    want = np.zeros(in_group.size, bool)
    for o, s in zip(offsets, sizes):
      want[o:o + s] = True
    assert (in_group == want).all() and in_group.sum() == 1000


def test_dispatch_combine_bench_checks_outputs_bit_for_bit():
  """bench_dispatch_combine's correctness check (the main run and every sweep point): the
  dispatch outputs must be bit-equal, combine's within bf16 rounding; a single flipped bit in
  a received row, a moved position, or a combine row off by more than the tolerance fail."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "bench_dc", os.path.join(_ROOT, "benchmarks", "bench_dispatch_combine.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rng = np.random.default_rng()
  want = [rng.standard_normal((4, 8, 16)).astype(np.float16),
          rng.random((4, 8)).astype(np.float32),
          rng.integers(-1, 8, (4, 2, 3, 2)).astype(np.int32),
          rng.integers(0, 8, (4, 2)).astype(np.int32),
          rng.standard_normal((4, 3, 16)).astype(np.float32)]
  copy = lambda: [a.copy() for a in want]  # noqa: E731
  assert bench.same_outputs(copy(), want)
  got = copy()
  got[0].view(np.uint16)[1, 2, 3] ^= 1  # one bit of one received row
  assert not bench.same_outputs(got, want)
  got = copy()
  got[2][0, 0, 0, 0] += 1  # one position
  assert not bench.same_outputs(got, want)
  got = copy()
  got[4][2, 1, 5] += 0.5 + 0.1 * abs(got[4][2, 1, 5])  # one combined value past the tolerance
  assert not bench.same_outputs(got, want)
  got = copy()
  got[4] = got[4] * (1 + 1e-3)  # bf16-level rounding differences pass
  assert bench.same_outputs(got, want)


def _while_body_hlo(compiled_text: str) -> str:
  """The optimized HLO of the (single) while loop's body and every computation it calls."""
  import re

  comps = {}
  for block in re.split(r"\n\s*\n", compiled_text):
    head = block.lstrip().split("\n", 1)[0]
    m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s", head)
    if m:
      comps[m.group(1)] = block
  body = re.search(r"while\(.*?body=%?([\w.\-]+)", compiled_text)
  assert body, "no while loop in the compiled timing loop"
  seen, todo = set(), [body.group(1)]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", comps[name])
  return "\n".join(comps[n] for n in seen)


def test_timing_loop_recomputes_what_depends_on_the_group_sizes():
  """bench_grouped_gemm's timing loop (``_looped``) must time each op whole: what the triton
  path computes from the group sizes alone (the tile table, a few gathers) stays inside the
  loop's body. A plain loop over the same op lets XLA hoist it (the control), which the
  benchmark did until 2026-11-23."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
  import bench_grouped_gemm as bgg
  from jax_ep.kernels import grouped_gemm as gg

  c, e, k, n = 1024, 8, 32, 32

  def op(x, w, sizes, offsets):  # the launch's inputs: x and the table from sizes, offsets
    table = gg.tile_table(sizes, offsets, c, e, 128, jnp)
    return x @ w[0] + table[1:, :2].sum().astype(x.dtype)

  def plain(x, *rest):  # the loop as it was: rest passed straight to the op
    def body(i, carry):
      x = lax.dynamic_update_slice(carry[0], jnp.full((1, 1), i, carry[0].dtype), (0, 0))
      return x, op(x, *rest)
    return lax.fori_loop(0, 3, body, (x, jnp.zeros((c, n), x.dtype)))[1]

  sizes = np.random.default_rng(0).multinomial(c, np.full(e, 1 / e)).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  args = (jnp.ones((c, k)), jnp.ones((e, k, n)), jnp.asarray(sizes), jnp.asarray(offsets))
  looped = _while_body_hlo(bgg._looped(op, 3).lower(*args).compile().as_text())
  control = _while_body_hlo(jax.jit(plain).lower(*args).compile().as_text())
  assert "gather" not in control, "XLA no longer hoists the table: the control proves nothing"
  assert "gather" in looped, "the timing loop lets XLA hoist the tile table out of the loop"
  got = bgg._looped(op, 3)(*args)
  want = jax.jit(plain)(*args)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_clocks_sampler_reads_nvidia_smi(tmp_path, monkeypatch):
  """bench_gemm_clocks' sampler against a stand-in ``nvidia-smi`` that prints a ramp (the
  samples ``settle_s`` drops) and then a steady state with a power cap: medians of the steady
  samples, the clock range, and each clock-event reason's share of the samples."""
  fake = tmp_path / "nvidia-smi"
  fake.write_text(
      "#!/bin/sh\n"
      "case \"$*\" in\n"
      "  *-lms*) for i in 1 2 3 4; do echo '345, 3201, 80.0, 40, 0x0000000000000001'; done\n"
      "          for i in 1 2 3; do echo '1410, 3201, 690.5, 60, 0x0000000000000004'; done\n"
      "          echo '1470, 3201, 692.5, 61, 0x0000000000000084'; sleep 30;;\n"
      "  *clocks_event_reasons*) echo '0x0000000000000000';;\n"
      "esac\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
  try:
    import bench_gemm_clocks as bc
  finally:
    sys.path.pop(0)
  field = bc._reason_field()
  assert field == "clocks_event_reasons.active"
  import time
  with bc.Sampler(50, field) as s:
    time.sleep(0.5)
  out = s.summary(settle_s=0.2)  # 0.2 s at 50 ms: the 4 ramp samples dropped
  assert out["samples"] == 4
  assert out["clocks.sm"] == 1410.0 and (out["clocks.sm_min"], out["clocks.sm_max"]) == (1410, 1470)
  assert out["power.draw"] == 690.5 and out["temperature.gpu"] == 60.0
  assert out["reasons"] == {"sw power cap": 1.0, "hw power brake": 0.25}
  assert bc.reason_names(0) == ["none"]
