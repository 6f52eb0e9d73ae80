"""The benchmarks' command lines check their arguments before any GPU work:
``benchmarks/bench_grouped_gemm.py --shapes`` takes the named shapes or ``ROWSxEXPERTSxKxN``
and names the argument when a shape is neither."""
from __future__ import annotations

import os
import subprocess
import sys

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
