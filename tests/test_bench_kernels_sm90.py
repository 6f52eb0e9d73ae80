"""The diagnostic benchmarks' own kernels compile for sm_90 on the CPU, so a GPU session does not
spend device time on a kernel that cannot build: ``benchmarks/bench_nvlink_rate.py`` (every
mode, with the pipelining its docstring describes: the loops that move rows are ``cp.async``
pipelined, except ``fan_rt``, whose run-time loop over the ranks Triton does not pipeline, as
in dispatch's push)."""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("triton")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from jax_ep import _compile  # noqa: E402
from jax_ep.kernels.sm90 import SHARED_LIMIT  # noqa: E402

_SIG = dict(src_ptr="*bf16", out_ptr="*bf16", sym_table="*i64", rank="i32", world="i32",
            epoch="i64", region_off="i64")


@pytest.mark.parametrize("mode", ["push", "pull", "local", "fan", "fan_rt", "fan_rt_sig1",
                                  "fan_sig1", "fan_sig2"])
def test_nvlink_rate_kernels_compile(mode):
  import bench_nvlink_rate as b
  m, fan, sig = b.MODES[mode]
  rows = 11264 // 3 if fan else 11264
  k = _compile.build(b.nvlink_copy_kernel, _SIG,
                     dict(ROWS=rows, HIDDEN=7168, BLOCK_R=16, BLOCK_H=1024, STAGES=3, MODE=m,
                          FANOUT=fan, SIGNAL=sig, BLOCK_W=4), num_warps=16, num_stages=1)
  ptx = k.asm["ptx"]
  assert 0 < k.metadata.shared <= SHARED_LIMIT or mode.startswith("fan_rt")
  assert ("cp.async.cg" in ptx) == (not mode.startswith("fan_rt")), mode
  assert "st.global.v4" in ptx  # 16-byte row stores
  if sig == 1:
    assert "release.exch" in ptx
  if sig == 2:
    assert "st.release.sys" in ptx
