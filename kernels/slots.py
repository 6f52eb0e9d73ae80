"""Helpers over a token block's slot tiles ``[BLOCK_T, TOPK_P]`` (one row per token, one column
per top-k slot), shared by dispatch and combine. ``k`` is ``tl.arange(0, TOPK_P)``."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column(tile, k, kk: tl.constexpr):
  """Column ``kk`` of an int slot tile, in registers."""
  return tl.sum(tl.where(k[None, :] == kk, tile, 0), axis=1)


@triton.jit
def present_rank(present, k, TOPK_P: tl.constexpr):
  """For ``present [BLOCK_T, TOPK_P]``: index of each slot among its token's present slots (an
  exclusive prefix count along k, unrolled; tl.cumsum's lowering fails for narrow tiles at
  16 warps in Triton 3.6)."""
  p = present.to(tl.int32)
  rnk = tl.zeros_like(p)
  running = tl.sum(p * 0, axis=1)
  for kk in tl.static_range(TOPK_P):
    rnk = tl.where(k[None, :] == kk, running[:, None], rnk)
    running += tl.sum(tl.where(k[None, :] == kk, p, 0), axis=1)
  return rnk
