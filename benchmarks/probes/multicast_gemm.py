"""Probe: Gluon (Triton 3.9) grouped-GEMM forward for Hopper, one CTA or a 2-CTA cluster with
the weight tile multicast by TMA.

    y[rows of e] = x[rows of e] @ w[e]      x [C, K], w [E, K, N], y [C, N], bf16, f32 accumulation
    expert e owns rows [e * R, (e + 1) * R), R a multiple of 256 (balanced, nothing ragged)

One program per (m tile, n tile), non-persistent, m fastest (the programs of one expert that read
the same w tile are neighbours). Per CTA: a 128 x 256 x 64 tile, 8 warps (one wgmma over 128
rows: NVMMADistributedLayout warps_per_cta=[8, 1], i.e. two warpgroups of 64 rows), a ring of
STAGES (x tile, w tile) stages filled by TMA, each with a "ready" mbarrier.

Variant (a), launch num_ctas=1: the program is one CTA, BLOCK_M = 128 rows.

Variant (b), launch num_ctas=2: Gluon 3.9 writes a multi-CTA kernel as ONE program per cluster
whose tensors span the cluster and are split across its CTAs by a ``cga_layout``:
  * the x stage is a [256, 64] tile with cga_layout [[1, 0]]: CTA r of the cluster holds rows
    r*128 .. r*128+127 and loads them itself (a plain TMA load of its own half);
  * the w stage is a [64, 256] tile with cga_layout [[0, 0]] (broadcast): both CTAs hold the
    same tile; ``tma.async_load(..., multicast=True)`` is lowered to ONE
    ``cp.async.bulk.tensor...multicast::cluster`` issued by CTA 0 (ctaMask 0b11), which writes
    the tile into both CTAs' shared memory and signals the ready barrier of each;
  * the accumulator is [256, 256] with cga_layout [[1, 0]] (128 x 256 per CTA).
The two CTAs therefore compute two vertically adjacent 128-row tiles of the same expert and the
same N block (256 | R, so a 256-row cluster tile never spans two experts).

Stage release (variant b): CTA 0 must not multicast into a stage that CTA 1 is still reading.
RELEASE=0 ("mbarrier", the fast path): warp-specialized. A producer warp (worker partition)
issues the TMA loads STAGES deep; the launch's 8 warps (default partition) run the wgmmas.
  * ready[s] (per CTA, count 1): expect(48 KiB = this CTA's 16 KiB of x + the whole 32 KiB w
    tile) by the local producer; completed by the local x load and by CTA 0's multicast, which
    signals the same-offset barrier in every destination CTA.
  * empty[s] (per CTA, count 1): the local consumers release a stage (after
    warpgroup_mma_wait(1) says the previous step's wgmma finished reading it, and a barrier of
    the 8 consumer warps says both warpgroups' did); the local producer waits on it before
    overwriting its x rows / its own w copy.
  * empty_mc[s] = ``mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)``: cga_layout [[0]],
    ONE barrier per stage, in CTA 0; Gluon multiplies the init count 1 by the 2 CTAs. The
    consumers of both CTAs arrive on it (CTA 1 remotely: ``mbarrier.arrive.shared::cluster`` on
    CTA 0's address); CTA 0's producer waits on it (parity (j // STAGES - 1) & 1) before its
    multicast of step j >= STAGES into stage j % STAGES, so both CTAs have finished reading step
    j - STAGES there. A wait on it is a no-op in CTA 1 (Gluon: only the lead CTA waits).
  * Consumers arrive only for a step whose stage is refilled (t + STAGES < K/64): every remote
    arrive is waited for by CTA 0 before the cluster exits.
  Triton 3.9 itself adds, in the producer partition, an mbarrier-emulated cluster barrier of the
  two producer warps before every multicast (its ClusterBarrierInsertion is conservative about
  multicast TMA); it does not replace empty_mc (it orders producers, not consumers), and costs
  the producers a cross-CTA round trip per K step, off the consumers' critical path.
RELEASE=1 ("cluster_barrier", the correct-but-slower fallback, not warp-specialized): the 8 warps
issue the loads STAGES-1 steps ahead and run ``gl.barrier(cluster=True)`` (barrier.cluster
arrive + wait, every thread of both CTAs) every K step, after ``warpgroup_mma_wait(1)``, before
the next loads: after it both CTAs are done with the stage about to be refilled.

The output goes out with plain masked ``gl.store`` straight from the wgmma accumulator layout
(simple, not fast: this probe is about the main loop).
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

BLOCK_M = 128  # rows per CTA
BLOCK_N = 256
BLOCK_K = 64
NUM_WARPS = 8
RELEASE_MBARRIER = 0
RELEASE_CLUSTER_BARRIER = 1
VARIANTS = {"a": 1, "b": 2}  # variant -> num_ctas


@gluon.constexpr_function
def _cga(num_ctas, basis):
  """The cga_layout of a rank-2 tile split (or broadcast, basis [0, 0]) over a 2-CTA cluster;
  None (no CGA layout) for one CTA."""
  num_ctas = gl._unwrap_if_constexpr(num_ctas)
  basis = [int(gl._unwrap_if_constexpr(b)) for b in gl._unwrap_if_constexpr(basis)]
  return [basis] if num_ctas == 2 else None


@gluon.constexpr_function
def _cga_list(num_ctas, basis):
  return _cga(num_ctas, basis) or []


@gluon.jit
def _issue(x_desc, w_desc, a_bufs, b_bufs, ready, j, row0, w_row0, n0, BLOCK_K: gl.constexpr,
           STAGES: gl.constexpr, MULTICAST: gl.constexpr):
  """TMA loads of K step j into stage j % STAGES: this CTA's x rows, and (multicast to the
  whole cluster when MULTICAST) the w tile."""
  s = j % STAGES
  nbytes: gl.constexpr = x_desc.nbytes_per_cta + w_desc.nbytes_per_cta
  mbarrier.expect(ready.index(s), nbytes)
  tma.async_load(x_desc, [row0, j * BLOCK_K], ready.index(s), a_bufs.index(s))
  tma.async_load(w_desc, [w_row0 + j * BLOCK_K, n0],
                 ready.index(s),
                 b_bufs.index(s),
                 multicast=MULTICAST)


@gluon.jit
def _mma_step(a_bufs, b_bufs, ready, acc, i):
  """K step i: wait for its stage, issue its wgmma; returns when step i - 1's wgmma has
  finished reading its stage (in this warpgroup) ..."""
  STAGES: gl.constexpr = a_bufs.shape[0]
  s = i % STAGES
  mbarrier.wait(ready.index(s), (i // STAGES) & 1)
  acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, use_acc=i > 0, is_async=True)
  return warpgroup_mma_wait(num_outstanding=1, deps=(acc,))


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, ready, empty, empty_mc, k_iters, acc_layout: gl.constexpr,
                 MULTICAST: gl.constexpr):
  """Default partition (the launch's 8 warps = two warpgroups, one wgmma over the CTA's 128
  rows): MMAs of each K step as its stage arrives; releases each stage one step later."""
  STAGES: gl.constexpr = a_bufs.shape[0]
  CL_M: gl.constexpr = a_bufs.shape[1]
  BLOCK_N: gl.constexpr = b_bufs.shape[2]
  acc = gl.zeros([CL_M, BLOCK_N], gl.float32, acc_layout)
  for i in range(k_iters):
    acc = _mma_step(a_bufs, b_bufs, ready, acc, i)
    # ... and, after this barrier of the partition's 8 warps, in both warpgroups.
    gl.barrier()
    # Release step i - 1's stage, only where the producer refills it (every arrive is then
    # waited for, so none is in flight to the peer CTA when the cluster exits).
    release = (i > 0) & (i - 1 + STAGES < k_iters)
    ps = (i + STAGES - 1) % STAGES
    mbarrier.arrive(empty.index(ps), pred=release)  # this CTA's own x/w stage
    if MULTICAST:
      mbarrier.arrive(empty_mc.index(ps), pred=release)  # to CTA 0, the multicast issuer
  acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
  return acc


@gluon.jit
def _ws_producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, empty_mc, k_iters, row0, w_row0, n0,
                 MULTICAST: gl.constexpr):
  """Worker partition (1 warp): the TMA loads of every K step, STAGES deep. Step j >= STAGES
  goes into the stage of step j - STAGES once it is released: by this CTA's consumers (empty,
  per CTA: this CTA's x rows and its copy of w are overwritten), and, for the multicast, by
  the consumers of BOTH CTAs (empty_mc: one barrier in CTA 0, which alone issues the multicast
  and alone waits; the wait is a no-op in CTA 1)."""
  STAGES: gl.constexpr = a_bufs.shape[0]
  BLOCK_K: gl.constexpr = a_bufs.shape[2]
  for j in range(k_iters):
    s = j % STAGES
    if j >= STAGES:
      phase = ((j // STAGES) - 1) & 1
      mbarrier.wait(empty.index(s), phase)
      if MULTICAST:
        mbarrier.wait(empty_mc.index(s), phase)
    _issue(x_desc, w_desc, a_bufs, b_bufs, ready, j, row0, w_row0, n0, BLOCK_K, STAGES, MULTICAST)


@gluon.jit
def mc_grouped_gemm_fwd_kernel(
    x_ptr,  # [C, K] bf16, row-major
    w_ptr,  # [E, K, N] bf16, row-major (seen as [E * K, N])
    y_ptr,  # [C, N] bf16, row-major
    C,
    K,
    N,
    R: gl.constexpr,  # rows per expert, multiple of 128 * num_ctas
    BLOCK_M: gl.constexpr,  # rows per CTA (128)
    BLOCK_N: gl.constexpr,  # 256
    BLOCK_K: gl.constexpr,  # 64
    STAGES: gl.constexpr,  # 3 or 4
    RELEASE: gl.constexpr,  # 0: warp-specialized, empty mbarriers; 1: cluster barrier per K step
):
  NUM_CTAS: gl.constexpr = gl.num_ctas()
  gl.static_assert(NUM_CTAS == 1 or NUM_CTAS == 2, "one CTA or a 2-CTA cluster")
  CL_M: gl.constexpr = BLOCK_M * NUM_CTAS  # rows per program (cluster)
  gl.static_assert(R % CL_M == 0, "a program's rows must lie in one expert")
  MULTICAST: gl.constexpr = NUM_CTAS > 1
  dtype: gl.constexpr = x_ptr.dtype.element_ty

  a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
      [CL_M, BLOCK_K], dtype, cga_layout=_cga(NUM_CTAS, [1, 0]))  # rows split over CTAs
  b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
      [BLOCK_K, BLOCK_N], dtype, cga_layout=_cga(NUM_CTAS, [0, 0]))  # broadcast: multicast
  acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                       warps_per_cta=[gl.num_warps(), 1],
                                                       instr_shape=[16, BLOCK_N, 16],
                                                       cga_layout=_cga_list(NUM_CTAS, [1, 0]))

  pid = gl.program_id(0)  # the cluster's index (the launch has num_ctas CTAs per program)
  num_m = C // CL_M
  m_tile = pid % num_m
  n_tile = pid // num_m
  row0 = m_tile * CL_M
  n0 = n_tile * BLOCK_N
  e = row0 // R
  num_e = C // R
  k_iters = K // BLOCK_K
  w_row0 = e * K

  x_desc = tma.make_tensor_descriptor(x_ptr,
                                      shape=[C, K],
                                      strides=[K, 1],
                                      block_shape=[CL_M, BLOCK_K],
                                      layout=a_layout)
  w_desc = tma.make_tensor_descriptor(w_ptr,
                                      shape=[num_e * K, N],
                                      strides=[N, 1],
                                      block_shape=[BLOCK_K, BLOCK_N],
                                      layout=b_layout)

  a_bufs = gl.allocate_shared_memory(dtype, [STAGES, CL_M, BLOCK_K], a_layout)
  b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], b_layout)
  ready = mbarrier.allocate_mbarrier(batch=STAGES)  # one per CTA per stage
  for q in gl.static_range(STAGES):
    mbarrier.init(ready.index(q), count=1)

  if RELEASE == 0:
    # Warp-specialized: a producer warp and the 8 consumer warps, stage release by mbarriers.
    empty = mbarrier.allocate_mbarrier(batch=STAGES)  # one per CTA per stage, local arrives
    for q in gl.static_range(STAGES):
      mbarrier.init(empty.index(q), count=1)
    if MULTICAST:
      # ONE barrier per stage, in CTA 0 (cga_layout [[0]]); both CTAs arrive on it (count
      # 1 per CTA, multiplied by the 2 CTAs by Gluon); only CTA 0 waits.
      empty_mc = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)
      for q in gl.static_range(STAGES):
        mbarrier.init(empty_mc.index(q), count=1)
    else:
      empty_mc = empty  # unused
    acc = gl.warp_specialize([
        (_ws_consumer, (a_bufs, b_bufs, ready, empty, empty_mc, k_iters, acc_layout, MULTICAST)),
        (_ws_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, empty_mc, k_iters, row0,
                        w_row0, n0, MULTICAST)),
    ], [1], [40])
  else:
    # Fallback, not warp-specialized: the 8 warps issue the loads STAGES - 1 steps ahead and
    # synchronize the whole cluster (CTA only, for one CTA) once per K step.
    for p in gl.static_range(STAGES - 1):
      if p < k_iters:
        _issue(x_desc, w_desc, a_bufs, b_bufs, ready, p, row0, w_row0, n0, BLOCK_K, STAGES,
               MULTICAST)
    acc = gl.zeros([CL_M, BLOCK_N], gl.float32, acc_layout)
    for i in range(k_iters):
      acc = _mma_step(a_bufs, b_bufs, ready, acc, i)
      # ... and after this barrier in every warpgroup of the cluster: its stage may be
      # overwritten, in this CTA and (multicast) in the peer.
      gl.barrier(cluster=True)
      j = i + STAGES - 1
      if j < k_iters:
        _issue(x_desc, w_desc, a_bufs, b_bufs, ready, j, row0, w_row0, n0, BLOCK_K, STAGES,
               MULTICAST)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

  rows = row0 + gl.arange(0, CL_M, layout=gl.SliceLayout(1, acc_layout))
  cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
  ptrs = y_ptr + rows.to(gl.int64)[:, None] * N + cols[None, :]
  gl.store(ptrs, acc.to(dtype), mask=(rows < C)[:, None] & (cols < N)[None, :])


def _release_code(release) -> int:
  if release in (0, "mbarrier"):
    return RELEASE_MBARRIER
  if release in (1, "cluster_barrier"):
    return RELEASE_CLUSTER_BARRIER
  raise ValueError(f"release must be 'mbarrier' or 'cluster_barrier', not {release!r}")


def _num_ctas(variant) -> int:
  if variant in VARIANTS:
    return VARIANTS[variant]
  if variant in (1, 2):
    return variant
  raise ValueError(f"variant must be 'a' (num_ctas=1) or 'b' (num_ctas=2), not {variant!r}")


def _check_shape(C, K, N, R, num_ctas):
  cl_m = BLOCK_M * num_ctas
  if R % cl_m or C % R or K % BLOCK_K or N % BLOCK_N or K % 8 or N % 8:
    raise ValueError(f"need R % {cl_m} == 0, C % R == 0, K % {BLOCK_K} == 0, N % {BLOCK_N} == 0 "
                     f"(got C={C}, K={K}, N={N}, R={R})")


def compile_sm90(variant, R, K, N, C, stages, release="mbarrier"):
  """Compile for sm_90a without a GPU (triton.compile with an explicit GPUTarget). Returns the
  CompiledKernel: .asm has 'ttgir', 'llir', 'ptx', 'cubin'; .metadata has num_warps, num_ctas,
  shared, cluster_dims (where this Triton reports it). K, N, C only set the divisibility
  specialization (they stay runtime arguments); R is a compile-time constant."""
  num_ctas = _num_ctas(variant)
  _check_shape(C, K, N, R, num_ctas)
  fn = mc_grouped_gemm_fwd_kernel
  signature = {
      "x_ptr": "*bf16",
      "w_ptr": "*bf16",
      "y_ptr": "*bf16",
      "C": "i32",
      "K": "i32",
      "N": "i32",
      "R": "constexpr",
      "BLOCK_M": "constexpr",
      "BLOCK_N": "constexpr",
      "BLOCK_K": "constexpr",
      "STAGES": "constexpr",
      "RELEASE": "constexpr"
  }
  constexprs = {
      "R": R,
      "BLOCK_M": BLOCK_M,
      "BLOCK_N": BLOCK_N,
      "BLOCK_K": BLOCK_K,
      "STAGES": stages,
      "RELEASE": _release_code(release)
  }
  # What the launcher's specialization would give: 16-byte aligned pointers, ints % 16 == 0.
  attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "w_ptr", "y_ptr")}
  for a, v in (("C", C), ("K", K), ("N", N)):
    if v % 16 == 0:
      attrs[(fn.arg_names.index(a),)] = [["tt.divisibility", 16]]
  src = GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
  return triton.compile(src,
                        target=GPUTarget("cuda", 90, 32),
                        options={
                            "num_warps": NUM_WARPS,
                            "num_ctas": num_ctas,
                            "num_stages": 1
                        })


_ALLOCATOR_SET = False


def _ensure_allocator():
  """Device-side tma.make_tensor_descriptor writes descriptors to Triton's global scratch,
  which the launcher takes from the allocator set by triton.set_allocator."""
  global _ALLOCATOR_SET
  if _ALLOCATOR_SET:
    return
  import torch

  def alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)

  triton.set_allocator(alloc)
  _ALLOCATOR_SET = True


def drop_producer_sync(ptx: str) -> str:
  """The PTX of a variant (b) RELEASE=0 kernel without the producers' cluster sync that Triton
  3.9 inserts before every multicast TMA (an arrive on the peer CTA's barrier, then a wait on
  our own: a round trip between the two CTAs per K step). The stage protocol above does not
  need it: CTA 0 multicasts into a stage only after empty_mc says both CTAs' consumers are done
  with it, so both CTAs' ready barriers are in the phase the multicast completes, and the
  barriers were initialized before the cluster barrier that starts the kernel. The wait
  becomes a predicate set true, the arrive is dropped; exactly one of each must be found."""
  import re
  arrive = re.compile(r"^[^\n]*mbarrier\.arrive\.release\.cluster\.shared::cluster\.b64[^\n]*\n",
                      re.M)
  wait = re.compile(r"mbarrier\.try_wait\.parity\.acquire\.cluster\.shared::cta\.b64 "
                    r"complete, \[%r\d+\], %r\d+;")
  if len(arrive.findall(ptx)) != 1 or len(wait.findall(ptx)) != 1:
    raise RuntimeError("drop_producer_sync: the inserted producer sync was not found once; "
                       "this Triton lowers it differently")
  ptx = arrive.sub("", ptx)
  return wait.sub("setp.eq.u32 complete, 1, 1;", ptx)


def run(x, w, y, R, variant="b", stages=4, release="mbarrier", **launch):
  """y[rows of e] = x[rows of e] @ w[e] on the GPU. x [C, K], w [E, K, N], y [C, N], contiguous
  bf16 CUDA tensors, E * R == C. variant 'a': one CTA per program; 'b': 2-CTA clusters with the
  w tile multicast (launched with num_ctas=2: Triton 3.9's launcher then launches
  grid * 2 CTAs in clusters of 2, and program_id is the cluster's index)."""
  import torch
  num_ctas = _num_ctas(variant)
  C, K = x.shape
  E, K2, N = w.shape
  assert K2 == K and tuple(y.shape) == (C, N) and E * R == C, (x.shape, w.shape, y.shape, R)
  assert x.dtype == w.dtype == y.dtype == torch.bfloat16
  assert x.is_contiguous() and w.is_contiguous() and y.is_contiguous()
  _check_shape(C, K, N, R, num_ctas)
  _ensure_allocator()
  grid = ((C // (BLOCK_M * num_ctas)) * (N // BLOCK_N),)  # programs = clusters
  return mc_grouped_gemm_fwd_kernel[grid](x,
                                          w,
                                          y,
                                          C,
                                          K,
                                          N,
                                          R=R,
                                          BLOCK_M=BLOCK_M,
                                          BLOCK_N=BLOCK_N,
                                          BLOCK_K=BLOCK_K,
                                          STAGES=stages,
                                          RELEASE=_release_code(release),
                                          num_warps=NUM_WARPS,
                                          num_ctas=num_ctas,
                                          **launch)


def reference(x, w, R):
  """torch reference: the per-expert products in float32, [C, N] float32."""
  import torch
  E = w.shape[0]
  return torch.bmm(x.view(E, R, -1).float(), w.float()).view(x.shape[0], -1)
