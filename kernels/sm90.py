"""Compile the intra-node EP kernels of one ``EPPlan`` for sm_90 on any machine (Triton and its
bundled ptxas run on the CPU): what ``scripts/kernel_stats.py`` prints and what the CPU tests
check (shared memory within the SM's, 16-byte vectors, registers and stack)."""
from __future__ import annotations

from .ep_plan import ROWS_WARPS, EPPlan

# The runtime tail every EP kernel takes after its arrays: sym_table, rank, world, epoch,
# timeout_ns, op, fingerprint.
_SYM = ["*i64", "i32", "i32", "i64", "i64", "i32", "i32"]
SHARED_LIMIT = 227 * 1024   # dynamic shared memory one H100/H200 block may have


def compile_ep_kernels(plan: EPPlan, dtype: str = "bf16", warps: int | None = None) -> dict:
  """{kernel name: (triton CompiledKernel, num_warps)} for dispatch, dispatch_rows, combine
  and gather at ``plan`` (rows of ``dtype``: "bf16" or "f32")."""
  from jax_ep import _compile

  from . import combine, dispatch
  rows_warps = warps or ROWS_WARPS
  row = "*bf16" if dtype == "bf16" else "*fp32"
  kernels = {
      "dispatch_kernel": (dispatch.dispatch_kernel, [row, "*i32", "*fp32", row, "*fp32", "*i32",
                                                     "*i32", "*i32", "*i32", "*i32", "*i32",
                                                     "*i32", "*i32"], plan.dispatch(False),
                          rows_warps),
      "dispatch_rows_kernel": (dispatch.dispatch_rows_kernel, [row, "*i32", "*i32", "*i32",
                                                               "*i32", row, "*i32"],
                               plan.dispatch(True), rows_warps),
      "combine_kernel": (combine.combine_kernel, [row, "*fp32", "*i32", row, "*i32"],
                         plan.combine(), rows_warps),
      "gather_kernel": (combine.gather_kernel, ["*fp32", "*i32", "*i32", "*fp32", "*i32"],
                        plan.gather(), 4),
  }
  out = {}
  for name, (fn, types, cx, nw) in kernels.items():
    free = [a for a in fn.arg_names if a not in cx]
    out[name] = (_compile.build(fn, dict(zip(free, types + _SYM)), cx, num_warps=nw,
                                num_stages=1), nw)
  return out
