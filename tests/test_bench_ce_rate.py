"""``benchmarks/bench_ce_rate.py``'s copy plan, checked on the CPU (the copies themselves need
GPUs): every GPU's send buffer goes out whole, an equal share to each peer, and every GPU's
receive buffer is filled exactly once, by the right peer's share, from streams of the GPU the
mode names."""
from __future__ import annotations

import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import bench_ce_rate as b  # noqa: E402


def _gpus(world, nbytes):
  # Fake devices: disjoint address ranges, src then dst, per GPU.
  return [types.SimpleNamespace(i=i, src=types.SimpleNamespace(value=(4 * i) * nbytes),
                                dst=types.SimpleNamespace(value=(4 * i + 2) * nbytes))
          for i in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["push", "pull"])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_all_to_all_plan(world, mode, split):
  share = 256 * split
  nbytes = share * (world - 1)
  gpus = _gpus(world, nbytes)
  copies = b._plan(gpus, mode, split, nbytes)
  assert len(copies) == world * (world - 1) * split
  covered = {g.i: [] for g in gpus}
  for issuer, k, dst, src, n in copies:
    d = next(g for g in gpus if g.src.value <= src < g.src.value + nbytes)
    p = next(g for g in gpus if g.dst.value <= dst < g.dst.value + nbytes)
    assert d is not p and n == share // split
    assert src + n <= d.src.value + nbytes and dst + n <= p.dst.value + nbytes
    # p's receive slot m - 1 holds the share of the rank m after it; d's send slot j - 1 the
    # share for the rank j after it.
    assert (dst - p.dst.value) // share == (d.i - p.i) % world - 1
    assert (src - d.src.value) // share == (p.i - d.i) % world - 1
    assert (src - d.src.value) % share == (dst - p.dst.value) % share
    assert issuer is (d if mode == "push" else p)
    covered[p.i].append((dst - p.dst.value, n))
  for spans in covered.values():  # each receive buffer exactly covered, no overlap
    pos = 0
    for off, n in sorted(spans):
      assert off == pos
      pos += n
    assert pos == nbytes
  # A stream of one issuer carries one copy per round, so the copies of a round overlap.
  keys = [(id(c[0]), c[1]) for c in copies]
  assert len(set(keys)) == len(keys)


def test_local_plan():
  gpus = _gpus(2, 1024)
  copies = b._plan(gpus, "local", 4, 1024)
  assert len(copies) == 8
  for g, k, dst, src, n in copies:
    assert dst - g.dst.value == src - g.src.value == k * 256 and n == 256
