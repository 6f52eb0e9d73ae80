"""Copy-engine NVLink rates between the GPUs of one host: the all-to-all pattern of
`bench_nvlink_rate.py`, moved by DMA copies (`cuMemcpyAsync` between peer-mapped buffers)
instead of SM loads and stores.

A diagnostic, not a target. Dispatch and combine move their rows with SM-issued stores or
loads, whose all-to-all ceiling measured 292-343 GB/s per GPU on 4x H200 (docs/KERNELS.md,
session 8); combine's 158 MB of remote partial rows per rank then take >= 0.46 ms, about what
2x the xla backend allows. This measures whether the GPUs' copy engines move the same bytes
faster, which is what a combine that hands its transfers to them would gain.

Every GPU sends `--mbytes` in all, an equal share to each peer, all GPUs at once:

  push    the copies of GPU d's data run on streams of GPU d (its copy engines write remote)
  pull    the copies into GPU d run on streams of GPU d (its copy engines read remote)
  local   one copy of the same size inside each GPU (HBM to HBM, the baseline)

`--split` cuts each (GPU, peer) share into that many copies on as many streams, so several
copy engines can work on one peer. Time per round: the host's wall time over `--inner`
back-to-back rounds (one synchronization), the median of `--iters` such loops.
Needs only the CUDA driver (ctypes on libcuda), no JAX.

  python benchmarks/bench_ce_rate.py [--mbytes 161] [--split 1,2,4] [--out DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

from _results import write_json

_cu = None


def _check(name: str, rc: int) -> None:
  if rc != 0:
    msg = ctypes.c_char_p()
    _cu.cuGetErrorString(rc, ctypes.byref(msg))
    raise RuntimeError(f"{name} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


def _call(name: str, *args) -> None:
  _check(name, getattr(_cu, name)(*args))


class Gpu:
  """One device's primary context, its buffers and streams."""

  def __init__(self, ordinal: int, nbytes: int):
    dev = ctypes.c_int()
    _call("cuDeviceGet", ctypes.byref(dev), ordinal)
    self.ctx = ctypes.c_void_p()
    _call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), dev)
    self.activate()
    self.src, self.dst = ctypes.c_uint64(), ctypes.c_uint64()
    _call("cuMemAlloc_v2", ctypes.byref(self.src), ctypes.c_size_t(nbytes))
    _call("cuMemAlloc_v2", ctypes.byref(self.dst), ctypes.c_size_t(nbytes))
    _call("cuMemsetD8_v2", self.src, ctypes.c_ubyte(ordinal + 1), ctypes.c_size_t(nbytes))
    self.streams: list[ctypes.c_void_p] = []

  def activate(self) -> None:
    _call("cuCtxSetCurrent", self.ctx)

  def stream(self, i: int) -> ctypes.c_void_p:
    while len(self.streams) <= i:
      self.activate()
      s = ctypes.c_void_p()
      _call("cuStreamCreate", ctypes.byref(s), 1)  # CU_STREAM_NON_BLOCKING
      self.streams.append(s)
    return self.streams[i]

  def sync(self) -> None:
    for s in self.streams:
      _call("cuStreamSynchronize", s)


def _plan(gpus: list[Gpu], mode: str, split: int, nbytes: int):
  """The copies of one round: (issuing GPU, stream index, dst, src, bytes)."""
  world = len(gpus)
  copies = []
  if mode == "local":
    for g in gpus:
      part = nbytes // split
      for k in range(split):
        copies.append((g, k, g.dst.value + k * part, g.src.value + k * part, part))
    return copies
  share = nbytes // (world - 1)
  part = share // split
  for d in range(world):
    for j in range(1, world):
      p = (d + j) % world
      for k in range(split):
        # d's bytes for p sit at share slot j-1 of d's src; p receives them in slot of d.
        src = gpus[d].src.value + (j - 1) * share + k * part
        dst = gpus[p].dst.value + ((d - p) % world - 1) * share + k * part
        issuer = gpus[d] if mode == "push" else gpus[p]
        copies.append((issuer, (j - 1) * split + k, dst, src, part))
  return copies


def _round(copies) -> None:
  for g, k, dst, src, n in copies:
    g.activate()
    _call("cuMemcpyAsync", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(n),
          g.stream(k))


def main() -> None:
  global _cu
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mbytes", type=float, default=161.0, help="MB each GPU sends per round")
  p.add_argument("--modes", default="push,pull,local")
  p.add_argument("--split", default="1,2,4")
  p.add_argument("--iters", type=int, default=15)
  p.add_argument("--inner", type=int, default=10)
  p.add_argument("--out", default=None, help="directory for ce_rate_<time>.json")
  args = p.parse_args()

  _cu = ctypes.CDLL("libcuda.so.1")
  _cu.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
  _call("cuInit", 0)
  count = ctypes.c_int()
  _call("cuDeviceGetCount", ctypes.byref(count))
  world = count.value
  if world < 2:
    raise SystemExit(f"bench_ce_rate: needs >= 2 GPUs, found {world}")
  nbytes = int(args.mbytes * 1e6) // (256 * (world - 1) * 4) * 256 * (world - 1) * 4
  gpus = [Gpu(i, nbytes) for i in range(world)]
  for a in gpus:
    a.activate()
    for b in gpus:
      if b is not a:
        rc = _cu.cuCtxEnablePeerAccess(b.ctx, 0)
        if rc not in (0, 704):  # 704: already enabled
          _check("cuCtxEnablePeerAccess", rc)
  name = ctypes.create_string_buffer(128)
  _call("cuDeviceGetName", name, 128, 0)
  print(f"{world} x {name.value.decode()}, {nbytes / 1e6:.1f} MB sent per GPU per round")

  results = []
  for mode in args.modes.split(","):
    for split in [int(s) for s in args.split.split(",")]:
      copies = _plan(gpus, mode, split, nbytes)
      _round(copies)  # warm up: creates the streams
      for g in gpus:
        g.sync()
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        for _ in range(args.inner):
          _round(copies)
        for g in gpus:
          g.sync()
        times.append((time.perf_counter() - t0) / args.inner)
      t = statistics.median(times)
      r = dict(mode=mode, split=split, us=t * 1e6, min_us=min(times) * 1e6,
               gbps=nbytes / t / 1e9, copies=len(copies))
      results.append(r)
      print(f"{mode:6s} split {split}: {r['us']:8.1f} us (min {r['min_us']:8.1f})  "
            f"{r['gbps']:6.1f} GB/s per GPU  ({len(copies)} copies per round)", flush=True)
  if args.out:
    write_json(args.out, "ce_rate", device=name.value.decode(), world=world, bytes=nbytes,
               args=vars(args), results=results)

if __name__ == "__main__":
  main()
