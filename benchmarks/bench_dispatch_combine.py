"""Benchmark: jax_ep dispatch and combine, triton backend vs xla backend vs ``ragged_all_to_all``.

Protocol (DESIGN.md "Benchmark protocol", docs/KERNELS.md):
  1. Correctness first, on the benchmark's own inputs: the triton backend's recv_x, recv_weights
     and layout must equal the xla backend's bit for bit and its combine must match within bf16
     tolerance; a mismatch is printed as FAILED and recorded (``"correct": false``).
  2. Timing, all paths in the same run on the same GPUs: each sample is one jitted call running
     the op n times (unrolled in the program, each repetition's inputs chained to the previous
     one's output through an optimization barrier, so there is no per-iteration host sync of a
     while loop and no overlap), median of ``--iters`` (>= 20) samples after warm-up; dispatch
     and combine separately. The time per op is the slope between n = ``--inner`` and
     n = 3 x ``--inner``: a call's fixed cost (the host launching the sharded program on every
     GPU, the final sync: about 1 ms on 4x H200, measured with ``--trace``) cancels, and what
     remains is the op's period on the GPUs. The per-call averages (``*_call_s``, that fixed
     cost / n included) are in the JSON too. The ragged path (tens of ms per op) uses the
     per-call average.
       triton  jax_ep.dispatch / jax_ep.combine with EPConfig(backend="triton")
       xla     the same with backend="xla" (lax.all_to_all of [W, T, H] buckets)
       ragged  MaxText style: one row per (token, expert) sorted by destination, exchanged by
               ``lax.ragged_all_to_all`` (+ sizes/offsets all_to_alls), then sorted by local
               expert; combine = the reverse exchange and a weighted sum over k.
       nccl    (PyTorch, when installed) one ``all_to_all_single`` of the same bytes with equal
               splits, CUDA-event timed: the practical ceiling (``--no-nccl`` skips it).
  3. GB/s per rank in three conventions: "nvl" (DeepEP: bytes of the deduplicated token rows a
     rank receives, itself included), "per_sel" (one row per (token, expert) selection),
     "remote" (deduplicated rows from other ranks). Combine uses the same byte counts.
  4. Results: a table on stdout; JSON and a PNG plot in benchmarks/results/.

Shapes: 4096 tokens/rank (throughput) and 128 (latency), hidden 7168, top-8, 256 experts
(DeepSeek-V3), plus hidden 2048 / 128 experts (Qwen3-MoE-like); uniform and zipf routing;
capacity = 1.25 x mean (production) and the no-drop default (worst case).

Runtime modes: ``--mode peer`` (one process driving every visible GPU), ``--mode nvshmem`` (one
process per GPU; this script starts them), ``--mode both`` (default: each in fresh processes).

Run (4 GPUs):  python benchmarks/bench_dispatch_combine.py [--quick] [--mode both]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = [
    # name, tokens/rank, hidden, experts, topk, routing, capacity kind
    ("dsv3_4096_uniform", 4096, 7168, 256, 8, "uniform", "balanced"),
    ("dsv3_4096_uniform_nodrop", 4096, 7168, 256, 8, "uniform", "nodrop"),
    ("dsv3_4096_zipf", 4096, 7168, 256, 8, "zipf", "balanced"),
    ("dsv3_128_uniform", 128, 7168, 256, 8, "uniform", "balanced"),
    ("qwen3_4096_uniform", 4096, 2048, 128, 8, "uniform", "balanced"),
    ("qwen3_128_uniform", 128, 2048, 128, 8, "uniform", "balanced"),
]
QUICK = [("small_512_uniform", 512, 1024, 64, 4, "uniform", "balanced")]
RAGGED_MAX_TOKENS = 4096


def selected_shapes(args):
  """QUICK with --quick, else SHAPES, filtered by --shapes (comma-separated names)."""
  shapes = QUICK if args.quick else SHAPES
  if args.shapes:
    names = args.shapes.split(",")
    unknown = set(names) - {s[0] for s in shapes}
    if unknown:
      raise SystemExit(f"--shapes: unknown {sorted(unknown)}; choose from {[s[0] for s in shapes]}")
    shapes = [s for s in shapes if s[0] in names]
  return shapes


# -- inputs and byte counts ----------------------------------------------------------------------

def make_inputs(world, t, h, e, k, routing, seed=0):
  import ml_dtypes
  from jax_ep import testing
  rng = np.random.default_rng(seed)
  idx = np.concatenate([testing.make_routing(rng, routing, t, e, k, world) for _ in range(world)])
  x = rng.standard_normal((world * t, h)).astype(ml_dtypes.bfloat16)
  w = rng.random((world * t, k)).astype(np.float32)
  return x, idx.astype(np.int32), w


def byte_counts(idx, world, t, h, e, itemsize=2) -> dict:
  """Mean bytes per rank in the three conventions."""
  el = e // world
  idx = idx.reshape(world, t, -1)
  dest = np.where(idx >= 0, idx // el, -1)
  nvl = remote = 0
  for r in range(world):
    got = np.any(dest == r, axis=2)                     # [W (source), T]
    nvl += got.sum()
    remote += got.sum() - got[r].sum()
  sel = (idx >= 0).sum()
  row = h * itemsize
  return {"nvl": nvl * row / world, "per_sel": sel * row / world, "remote": remote * row / world}


# -- the ragged_all_to_all path ------------------------------------------------------------------

def ragged_fns(world, t, h, e, k, axis="ep"):
  import jax.numpy as jnp
  from jax import lax
  el = e // world
  n = t * k
  out_rows = world * n

  def a2a(v):
    return lax.all_to_all(v, axis, 0, 0, tiled=True)

  def plan(idx):
    flat = idx.reshape(-1)
    valid = flat >= 0
    order = jnp.argsort(jnp.where(valid, flat, e), stable=True)
    dest = jnp.where(valid, flat // el, world)[order]
    send = jnp.zeros((world + 1,), jnp.int32).at[dest].add(1)[:world]
    in_off = jnp.cumsum(send) - send
    recv = a2a(send)
    recv_off = jnp.cumsum(recv) - recv
    out_off = a2a(recv_off)
    return order, send, in_off, recv, recv_off, out_off

  def dispatch(x, idx):
    order, send, in_off, recv, recv_off, out_off = plan(idx)
    rows = x[order // k]
    ids = (idx.reshape(-1)[order] % el).astype(jnp.int32)
    got = lax.ragged_all_to_all(rows, jnp.zeros((out_rows, h), x.dtype), in_off, send, out_off,
                                recv, axis_name=axis)
    got_ids = lax.ragged_all_to_all(ids, jnp.full((out_rows,), el, jnp.int32), in_off, send,
                                    out_off, recv, axis_name=axis)
    perm = jnp.argsort(got_ids, stable=True)            # local expert-major
    return got[perm], perm

  def combine(y, perm, idx, w):
    order, send, in_off, recv, recv_off, out_off = plan(idx)
    back_in = jnp.zeros_like(y).at[perm].set(y)          # undo the expert sort
    src_off = a2a(in_off)                                # where the rows sit at their owner
    back = lax.ragged_all_to_all(back_in, jnp.zeros((n, h), y.dtype), recv_off, recv, src_off,
                                 send, axis_name=axis)
    rows = jnp.zeros((n, h), jnp.float32).at[order].set(back.astype(jnp.float32))
    rows = rows.reshape(t, k, h) * jnp.where(idx >= 0, w, 0.0)[..., None]
    return jnp.sum(rows, axis=1).astype(y.dtype)

  return dispatch, combine


# -- timing ----------------------------------------------------------------------------------------

def repeat(n, op, inputs, acc):
  """``acc + op(*inputs)[:1, :1]``, n times, unrolled: each repetition's inputs pass through an
  optimization barrier with the running ``acc``, so XLA keeps the repetitions in order and
  cannot overlap them, and no while loop makes the host wait on every iteration. The op's
  output passes through a barrier too before it is sliced, so XLA cannot shrink an op of its
  own (the xla backend's gathers, a zero fill) to the one element kept."""
  from jax import lax
  import jax.numpy as jnp
  for _ in range(n):
    inputs, acc = lax.optimization_barrier((inputs, acc))
    out = lax.optimization_barrier(op(*inputs))
    acc = acc + out[:1, :1].astype(jnp.float32)
  return acc


def zero_carry():
  """A [1, 1] float32 zero that varies over the EP axis, like the ops' outputs (the carry of
  ``repeat``)."""
  import jax.numpy as jnp
  from jax import lax
  return lax.pcast(jnp.zeros((1, 1), jnp.float32), "ep", to="varying")


def op_fns(mesh, cfg, inner):
  """Jitted functions of one EPConfig over the mesh's "ep" axis (traced at their first call,
  so environment knobs apply then): ``dispatch(x, idx, w)`` once (outputs with a leading rank
  axis), ``combine(recv_x, layout)`` once on those, and the timed loops ``{n:
  dispatch_loop(x, idx, w)}`` and ``{n: combine_loop(recv_x, layout)}`` of n = inner and
  3 x inner repetitions (``time_per_op``)."""
  import jax
  from jax.sharding import PartitionSpec as P
  import jax_ep
  spec = P("ep")
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  smap = lambda f, n: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec,) * n, out_specs=spec))
  dispatch = smap(lambda x, i, w: jax.tree.map(lambda a: a[None],
                                               jax_ep.dispatch(x, i, w, config=cfg)), 3)
  combine = smap(lambda y, lay: jax_ep.combine(y[0], first(lay), config=cfg), 2)
  dispatch_loops = {n: smap(lambda x, i, w, n=n: repeat(
      n, lambda *a: jax_ep.dispatch(*a, config=cfg)[0], (x, i, w), zero_carry()), 3)
      for n in (inner, 3 * inner)}
  combine_loops = {n: smap(lambda y, lay, n=n: repeat(
      n, lambda y, l: jax_ep.combine(y, l, config=cfg), (y[0], first(lay)), zero_carry()), 2)
      for n in (inner, 3 * inner)}
  return dispatch, combine, dispatch_loops, combine_loops


def time_per_op(loops, args, inner, iters) -> tuple[float, float]:
  """(seconds per op, per-call average) of ``loops[n]`` = a jitted loop of n ops: the slope
  between n = inner and n = 3 x inner (the call's fixed cost cancels), and T(inner) / inner."""
  t1 = time_fn(loops[inner], args, iters)
  t3 = time_fn(loops[3 * inner], args, iters)
  return (t3 - t1) / (2 * inner), t1 / inner


def time_fn(f, args, iters, warmup=3):
  import jax
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    samples.append(time.perf_counter() - t0)
  return statistics.median(samples)


def trace_ops(trace_dir, fn, top: int = 8) -> dict:
  """Run ``fn`` under ``jax.profiler`` and summarize the GPU activity of the trace: per device,
  each kernel's count, median duration and median idle gap before it on its stream (what the
  loop's period holds besides the kernels). Printed, and returned for the JSON."""
  import glob
  import gzip
  import jax
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    fn()
  files = glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True)
  if not files:
    print(f"  trace: no perfetto trace under {trace_dir}", flush=True)
    return {}
  with gzip.open(sorted(files)[-1], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  by_stream = {}
  for e in events:
    if e.get("ph") == "X" and "GPU" in pname.get(e.get("pid"), "") and e.get("dur") is not None:
      by_stream.setdefault((e["pid"], e.get("tid")), []).append(e)
  if not by_stream:
    print(f"  trace: no GPU events; processes {sorted(set(pname.values()))}", flush=True)
  out = {}
  for (pid, tid), evs in sorted(by_stream.items()):
    evs.sort(key=lambda e: float(e["ts"]))
    stats = {}
    prev_end = None
    for e in evs:
      ts, dur = float(e["ts"]), float(e["dur"])
      s = stats.setdefault(e["name"][:60], {"n": 0, "dur": [], "gap": []})
      s["n"] += 1
      s["dur"].append(dur)
      if prev_end is not None:
        s["gap"].append(ts - prev_end)
      prev_end = max(prev_end or 0.0, ts + dur)
    dev = pname[pid].split()[0] + f"/{tid}"
    span = float(evs[-1]["ts"]) + float(evs[-1]["dur"]) - float(evs[0]["ts"])
    busy = sum(float(e["dur"]) for e in evs)
    out[dev] = {"span_us": span, "busy_us": busy, "kernels": {
        k: {"n": v["n"], "median_us": statistics.median(v["dur"]),
            "median_gap_before_us": statistics.median(v["gap"]) if v["gap"] else None}
        for k, v in sorted(stats.items(), key=lambda kv: -sum(kv[1]["dur"]))[:top]}}
    print(f"  trace {dev}: span {span:.0f} us, busy {busy:.0f} us", flush=True)
    for k, v in out[dev]["kernels"].items():
      gap = v["median_gap_before_us"]
      print(f"    {v['n']:4d} x {v['median_us']:9.1f} us  gap {gap if gap is None else round(gap, 1)}"
            f"  {k}", flush=True)
  return out


def run_mode(args, rank=0, world_override=None) -> dict:
  """Runs every shape in this process (peer: all GPUs; nvshmem: this process's GPU)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jax_ep
  from jax_ep import runtime
  from jax_ep.backends import triton as tb

  os.environ["JAX_EP_CHECK_TIMEOUTS"] = "0"  # no host callback per op; checked at the end
  shapes = selected_shapes(args)
  if args.mode_run == "nvshmem":
    devices = sorted(jax.devices(), key=lambda d: d.process_index)
  else:
    devices = jax.devices("gpu")
  world = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("ep",))
  sharding = NamedSharding(mesh, P("ep"))
  sizing = [jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t)
            for _, t, h, e, k, _, _ in shapes]
  runtime.initialize(sizing)

  def put(a):
    if args.mode_run == "nvshmem":
      n = a.shape[0] // world
      return jax.make_array_from_process_local_data(sharding, a[rank * n:(rank + 1) * n], a.shape)
    return jax.device_put(a, sharding)

  def fetch(a):
    return np.asarray(a.addressable_shards[0].data) if args.mode_run == "nvshmem" else \
        np.asarray(jax.device_get(a))

  results = []
  for name, t, h, e, k, routing, cap_kind in shapes:
    x, idx, w = make_inputs(world, t, h, e, k, routing)
    base = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                           num_sms=args.num_sms)
    capacity = base.balanced_capacity(world) if cap_kind == "balanced" else None
    xs, idxs, ws = put(x), put(idx), put(w)
    row = {"shape": name, "tokens": t, "hidden": h, "experts": e, "topk": k,
           "routing": routing, "capacity": cap_kind, "world": world, "mode": args.mode_run,
           "num_sms": args.num_sms, "bytes": byte_counts(idx, world, t, h, e)}
    inner = args.inner
    outs = {}
    for backend in ("triton", "xla"):
      cfg = jax_ep.EPConfig(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t,
                            capacity=capacity, backend=backend, num_sms=args.num_sms,
                            timeout_s=args.op_timeout)  # ranks may start seconds apart

      f_once, comb, d_loops, c_loops = op_fns(mesh, cfg, inner)
      recv_x, recv_w, layout = f_once(xs, idxs, ws)
      outs[backend] = op_outputs(recv_x, recv_w, layout, comb(recv_x, layout), fetch)
      print(f"  {name}: {backend} ran once; timing", flush=True)
      for op, loops, a in (("dispatch", d_loops, (xs, idxs, ws)),
                           ("combine", c_loops, (recv_x, layout))):
        row[f"{backend}_{op}_s"], row[f"{backend}_{op}_call_s"] = time_per_op(
            loops, a, inner, args.iters)
      print(f"  {name}: {backend} dispatch {row[f'{backend}_dispatch_s'] * 1e6:.1f} us, combine "
            f"{row[f'{backend}_combine_s'] * 1e6:.1f} us", flush=True)
      if args.trace:  # every rank runs the loops (they are collective); rank 0 records them
        loops = lambda: jax.block_until_ready((d_loops[inner](xs, idxs, ws),  # noqa: E731
                                               c_loops[inner](recv_x, layout)))
        if rank == 0:
          row[f"{backend}_trace"] = trace_ops(os.path.join(args.trace, f"{name}_{backend}"),
                                              loops)
        else:
          loops()
    ok = row["correct"] = same_outputs(outs["triton"], outs["xla"])
    if not ok:
      print(f"FAILED correctness: {name} (triton differs from xla)", flush=True)
    if t <= RAGGED_MAX_TOKENS and not args.no_ragged:
      rd, rc = ragged_fns(world, t, h, e, k)

      def r_d(x, idx):
        return repeat(inner, lambda x, idx: rd(x, idx)[0], (x, idx), zero_carry())

      def r_c(x, idx, w):
        got, perm = rd(x, idx)
        return repeat(inner, rc, (got, perm, idx, w), zero_carry())

      spec = P("ep")
      f_rd = jax.jit(jax.shard_map(r_d, mesh=mesh, in_specs=(spec,) * 2, out_specs=spec))
      f_rc = jax.jit(jax.shard_map(r_c, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
      try:
        row["ragged_dispatch_s"] = time_fn(f_rd, (xs, idxs), max(3, args.iters // 4)) / inner
        row["ragged_combine_s"] = (time_fn(f_rc, (xs, idxs, ws), max(3, args.iters // 4))
                                   / inner - row["ragged_dispatch_s"] / inner)
      except Exception as ex:  # noqa: BLE001 -- a baseline that cannot run is reported, not fatal
        row["ragged_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
    if not args.no_profile:
      row["profile"] = profile_triton(mesh, xs, idxs, ws, dict(
          num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, capacity=capacity,
          num_sms=args.num_sms, timeout_s=args.op_timeout))
      print_profile(name, row["profile"])
    for key, knobs, sms in sweep_runs(args):
      cfg_kw = dict(num_experts=e, topk=k, hidden=h, max_tokens_per_rank=t, capacity=capacity,
                    num_sms=sms, timeout_s=args.op_timeout)
      row[key] = time_triton(mesh, xs, idxs, ws, inner, args.iters, knobs, cfg_kw,
                             check=lambda got: same_outputs(got, outs["xla"]), fetch=fetch)
      print(f"  {key}: ok={row[key]['correct']} dispatch {row[key]['dispatch_s'] * 1e6:.1f} us, "
            f"combine {row[key]['combine_s'] * 1e6:.1f} us", flush=True)
      row["correct"] = row["correct"] and row[key]["correct"]
      if args.sweep_profile:
        row[key]["profile"] = _with_envs(knobs, lambda: profile_triton(mesh, xs, idxs, ws,
                                                                       cfg_kw))
        print_profile(key, row[key]["profile"], devices=1)
    for path in ("triton", "xla", "ragged"):
      for op in ("dispatch", "combine"):
        s = row.get(f"{path}_{op}_s")
        if s:
          row[f"{path}_{op}_gbps"] = {c: b / s / 1e9 for c, b in row["bytes"].items()}
    results.append(row)
    print_row(row)
  tb.check_timeouts()
  runtime.shutdown()
  return {"device": str(devices[0].device_kind), "world": world, "mode": args.mode_run,
          "results": results}


def sweep_runs(args) -> list[tuple[str, dict, int]]:
  """(JSON key, JAX_EP_* settings, num_sms) of every ``--sweep`` and ``--sweep-env`` point."""
  runs = [(f"sweep_sms{sms}_senders{frac}_order{order}_share{share}",
           {"JAX_EP_SENDER_FRACTION": frac, "JAX_EP_EXPAND_ORDER": order,
            "JAX_EP_RECEIVER_SHARE": share}, sms)
          for frac, sms, order, share in sweep_points(args)]
  for point in sweep_env_points(args):
    key = "sweep_env_" + "_".join(f"{n[len('JAX_EP_'):].lower()}{v}" for n, v in point.items())
    runs.append((key, point, args.num_sms))
  return runs


def sweep_points(args):
  """``--sweep`` points (tuning, the triton backend only): ``frac@sms[@order[@share]]`` = the
  dispatch knobs JAX_EP_SENDER_FRACTION, EPConfig.num_sms, JAX_EP_EXPAND_ORDER (0-3) and
  JAX_EP_RECEIVER_SHARE (docs/KERNELS.md "Knobs"); order and share default to the library's.
  Other knobs: ``--sweep-env``."""
  if not args.sweep:
    return []
  from jax_ep.kernels.ep_plan import EPPlan
  pts = []
  for item in args.sweep.split(","):
    parts = item.split("@")
    if not 2 <= len(parts) <= 4:
      raise SystemExit(f"--sweep: {item!r} is not frac@sms[@order[@share]]")
    frac, sms = float(parts[0]), int(parts[1])
    order = int(parts[2]) if len(parts) > 2 else EPPlan.expand_order
    share = float(parts[3]) if len(parts) > 3 else EPPlan.receiver_share
    pts.append((frac, sms, order, share))
  return pts


def sweep_env_points(args) -> list[dict]:
  """``--sweep-env`` points: comma-separated, each ``+``-separated JAX_EP_* knob settings
  (docs/KERNELS.md "Knobs"), e.g. ``JAX_EP_COMBINE_ACC_BYTES=65536+JAX_EP_COMBINE_STAGES=3``
  (no ``;``: scripts/gpu_run_all.sh passes the options through a shell)."""
  pts = []
  for item in filter(None, args.sweep_env.split(",")):
    point = {}
    for setting in item.split("+"):
      name, eq, value = setting.partition("=")
      if not eq or not name.startswith("JAX_EP_") or not value:
        raise SystemExit(f"--sweep-env: {setting!r} is not JAX_EP_<KNOB>=<value>")
      point[name] = value
    pts.append(point)
  return pts


def _with_envs(values: dict, fn):
  old = {n: os.environ.get(n) for n in values}
  os.environ.update({n: str(v) for n, v in values.items()})
  try:
    return fn()
  finally:
    for n, v in old.items():
      if v is None:
        del os.environ[n]
      else:
        os.environ[n] = v


def op_outputs(recv_x, recv_w, layout, out, fetch) -> list:
  """The host copies compared between backends: dispatch's rows, weights, positions and group
  sizes, and combine's output."""
  return [fetch(a) for a in (recv_x, recv_w, layout.recv_pos, layout.group_sizes, out)]


def same_outputs(got, want) -> bool:
  """Dispatch's outputs bit-equal, combine's within bf16 rounding of the summation order."""
  ok = all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
           for a, b in zip(got[:4], want[:4]))
  return bool(ok and np.allclose(np.asarray(got[4], np.float32), np.asarray(want[4], np.float32),
                                 rtol=2e-2, atol=2e-2))


def time_triton(mesh, xs, idxs, ws, inner, iters, knobs: dict, cfg_kw, check, fetch) -> dict:
  """Dispatch and combine times of the triton backend with the knobs ``knobs`` (env variables
  read at trace time) and EPConfig fields ``cfg_kw``, and whether its outputs pass ``check``
  (a sweep point is timed only after it ran correctly once: a wrong kernel's time is no
  result)."""
  import jax
  import jax_ep
  cfg = jax_ep.EPConfig(backend="triton", **cfg_kw)

  def first_calls():  # trace (and compile) under the knobs
    f_once, comb, d_loops, c_loops = op_fns(mesh, cfg, inner)
    recv_x, recv_w, layout = f_once(xs, idxs, ws)
    ok = check(op_outputs(recv_x, recv_w, layout, comb(recv_x, layout), fetch))
    jax.block_until_ready([f(xs, idxs, ws) for f in d_loops.values()]
                          + [f(recv_x, layout) for f in c_loops.values()])
    return d_loops, c_loops, recv_x, layout, ok

  d_loops, c_loops, recv_x, layout, ok = _with_envs(knobs, first_calls)
  if not ok:
    print(f"FAILED correctness: sweep point {knobs} (triton differs from xla)", flush=True)
  return {"correct": ok,
          "dispatch_s": time_per_op(d_loops, (xs, idxs, ws), inner, iters)[0],
          "combine_s": time_per_op(c_loops, (recv_x, layout), inner, iters)[0]}


def profile_triton(mesh, xs, idxs, ws, cfg_kw) -> dict:
  """Where the time of one triton dispatch and one combine goes: the kernels compiled with
  PROFILE=1 stamp %globaltimer at their phase boundaries (kernels/ep_sync.py PROF_*); per
  device, the median / max over the launch's programs, in microseconds from the launch's first
  program start."""
  import jax
  import jax_ep
  from jax_ep.backends import triton as tb
  cfg = jax_ep.EPConfig(backend="triton", **cfg_kw)
  world = mesh.devices.size
  plan = tb._plan(cfg, world, xs.shape[0] // world, xs.dtype)  # the launches' plan, knobs included
  f_d, f_c, _, _ = op_fns(mesh, cfg, 1)
  res = {}
  ns, nr = plan.num_senders, plan.num_receivers

  def stats(v):
    v = v[v > 0] / 1e3
    return [round(float(np.median(v)), 1), round(float(v.max()), 1)] if v.size else None

  recv_x, recv_w, layout = _with_envs({"JAX_EP_PROFILE": "1"}, lambda: f_d(xs, idxs, ws))
  for _ in range(3):  # warm, then the last launch is the one read back
    recv_x, recv_w, layout = f_d(xs, idxs, ws)
  jax.block_until_ready(recv_x)
  prof = tb.read_profile(ns + nr)
  res["dispatch"] = [{
      "leader": {"peers_arrived": stats(p["peers_arrived"][:1]), "go": stats(p["go"][:1])},
      "histograms_done": stats(p["arrived"][:ns + nr]),  # slot 5 = PROF_HIST in dispatch
      # Expand orders 2 and 3 (the queue): slot 3 is the us a program waited for block flags
      # (kernels/dispatch.py, prof_span), not a time stamp; else the end of its own rows.
      "senders": {**{n: stats(p[n][:ns]) for n in ("go", "push_done", "end")},
                  "waited": stats(p["self_rows"][:ns]) if plan.expand_order >= 2 else None},
      "receivers": {**{n: stats(p[n][ns:ns + nr]) for n in ("go", "zero_fill", "end")},
                    ("waited" if plan.expand_order >= 2 else "self_rows"):
                        stats(p["self_rows"][ns:ns + nr])},
  } for p in prof]
  out = _with_envs({"JAX_EP_PROFILE": "1"}, lambda: f_c(recv_x, layout))
  for _ in range(3):
    out = f_c(recv_x, layout)
  jax.block_until_ready(out)
  npg = plan.num_programs
  prof = tb.read_profile(npg)
  # With the reduce queue (the default, but not at W = 2) slot 5 is the us a program waited
  # for DONE flags.
  arrived = "waited" if plan._combine_queue else "arrived"
  # Queue 3: slot 3 is the us a program spent reducing blocks between its push items.
  res["combine"] = [{**{n: stats(p[n][:npg]) for n in ("go", "push_done", "end")},
                     arrived: stats(p["arrived"][:npg]),
                     **({"reduced_between": stats(p["self_rows"][:npg])}
                        if plan._combine_queue == 3 else {})} for p in prof]
  res["plan"] = {"senders": ns, "receivers": nr, "programs": npg, "block_t": plan.block_t,
                 "block_h": plan.block_h, "group": plan.dispatch_group,
                 "parts": plan.dispatch_parts, "combine_block": [plan.combine_block_t,
                                                            plan.combine_block_hc,
                                                            plan.combine_block_hr],
                 "combine_parts": plan.combine_push_parts}
  return res


def print_profile(name, prof, devices=None):
  """The profile's lines for the first ``devices`` devices (all by default)."""
  n = len(prof["dispatch"]) if devices is None else min(devices, len(prof["dispatch"]))
  print(f"  profile {name} (us from launch start, [median, max] over programs; device 0 .. "
        f"{n - 1}): plan {prof['plan']}", flush=True)
  for d, (pd, pc) in enumerate(zip(prof["dispatch"][:n], prof["combine"][:n])):
    print(f"    dev{d} dispatch histograms {pd['histograms_done']} leader {pd['leader']} "
          f"senders {pd['senders']} receivers {pd['receivers']}", flush=True)
    print(f"    dev{d} combine {pc}", flush=True)


def print_row(r):
  def fmt(path, op):
    s = r.get(f"{path}_{op}_s")
    if not s:
      return f"{'-':>20}"
    return f"{s * 1e6:9.1f}us {r[f'{path}_{op}_gbps']['nvl']:7.1f}GB/s"
  paths = ("nccl",) if r["mode"] == "nccl" else ("triton", "xla", "ragged")
  print(f"{r['mode']:8} {r['shape']:26} ok={str(r['correct']):5} | "
        + " | ".join(f"{p} {op[0]}: {fmt(p, op)}" for p in paths
                     for op in ("dispatch", "combine") if p != "nccl" or op == "dispatch"),
        flush=True)


# -- orchestration ---------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env():
  env = dict(os.environ)
  env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
  env.setdefault("NCCL_NVLS_ENABLE", "0")
  env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
  env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
  env.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(4 << 30))
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _collect(procs, timeout):
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out = (p.communicate()[0] or "") + "\nTIMEOUT"  # what the run printed before the kill
    outs.append(out)
  return outs


def _result_of(out, echo=True):
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  if echo:
    sys.stdout.write("".join(l + "\n" for l in out.splitlines()
                             if not l.startswith("RESULT ")))
  return json.loads(lines[-1][len("RESULT "):]) if lines else {"error": out[-3000:]}



def orchestrate(args) -> list[dict]:
  script = os.path.abspath(__file__)
  common = ["--iters", str(args.iters), "--inner", str(args.inner), "--num-sms",
            str(args.num_sms), "--op-timeout", str(args.op_timeout)] + (
                ["--quick"] if args.quick else []) + (
                ["--no-ragged"] if args.no_ragged else []) + (
                ["--shapes", args.shapes] if args.shapes else []) + (
                ["--no-profile"] if args.no_profile else []) + (
                ["--trace", args.trace] if args.trace else []) + (
                ["--sweep", args.sweep] if args.sweep else []) + (
                ["--sweep-env", args.sweep_env] if args.sweep_env else []) + (
                ["--sweep-profile"] if args.sweep_profile else [])
  runs = []
  if args.mode in ("peer", "both"):
    p = subprocess.Popen([sys.executable, script, "--child", "peer"] + common,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(),
                         text=True)
    runs.append(_result_of(_collect([p], args.timeout)[0]))
  if args.mode in ("nvshmem", "both"):
    n = _gpu_count()
    coord = f"127.0.0.1:{_free_port()}"
    env = _child_env()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    procs = [subprocess.Popen([sys.executable, script, "--child", "nvshmem", "--rank", str(r),
                               "--world", str(n), "--coord", coord] + common,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True) for r in range(n)]
    outs = _collect(procs, args.timeout)
    runs.append(_result_of(outs[0]))
    for r, o in enumerate(outs[1:], 1):
      res = _result_of(o, echo=False)
      if "error" in res:
        print(f"nvshmem rank {r} error:\n{res['error']}")
  if args.mode in ("peer", "nvshmem", "both") and not args.no_nccl:
    n = _gpu_count()
    env = _child_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(n))
    procs = [subprocess.Popen([sys.executable, script, "--child", "nccl", "--rank", str(r),
                               "--world", str(n)] + common, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=dict(env, RANK=str(r)), text=True)
             for r in range(n)]
    outs = _collect(procs, args.timeout)
    res = _result_of(outs[0])
    if "error" in res:
      print(f"NCCL reference skipped: {res['error'][-500:]}")
    else:
      runs.append(res)
  return runs


def _gpu_count() -> int:
  out = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
                       capture_output=True, text=True, env=_child_env()).stdout.strip()
  return int(out or 0)


def run_nccl(args) -> dict:
  """NCCL all_to_all_single (PyTorch) on the same bytes: each rank sends, to every rank, the
  mean number of deduplicated rows a rank receives / W (equal splits; the practical ceiling)."""
  import torch
  import torch.distributed as dist
  torch.cuda.set_device(args.rank)
  dist.init_process_group("nccl", rank=args.rank, world_size=args.world,
                          device_id=torch.device("cuda", args.rank))
  world = args.world
  results = []
  for name, t, h, e, k, routing, _ in selected_shapes(args):
    _, idx, _ = make_inputs(world, t, h, e, k, routing)
    nbytes = byte_counts(idx, world, t, h, e)
    rows = max(1, int(round(nbytes["nvl"] / (h * 2) / world)))
    src = torch.randn(world * rows, h, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(5):
      dist.all_to_all_single(dst, src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(args.iters):
      a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      a.record()
      dist.all_to_all_single(dst, src)
      b.record()
      torch.cuda.synchronize()
      samples.append(a.elapsed_time(b) / 1e3)
    sec = statistics.median(samples)
    results.append({"shape": name, "tokens": t, "hidden": h, "experts": e, "topk": k,
                    "routing": routing, "world": world, "mode": "nccl", "correct": True,
                    "bytes": nbytes, "nccl_dispatch_s": sec,
                    "nccl_dispatch_gbps": {c: b / sec / 1e9 for c, b in nbytes.items()}})
    if args.rank == 0:
      print_row(results[-1])
  dist.destroy_process_group()
  return {"device": torch.cuda.get_device_name(), "world": world, "mode": "nccl",
          "results": results}


def write_outputs(runs, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  device = next((r.get("device") for r in runs if "device" in r), "unknown").replace(" ", "_")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  base = os.path.join(out_dir, f"dispatch_combine_{device}_{stamp}")
  with open(base + ".json", "w") as f:
    json.dump({"date": stamp, "runs": runs}, f, indent=1)
  print(f"wrote {base}.json")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no PNG")
    return
  rows = [r for run in runs for r in run.get("results", [])]
  if not rows:
    return
  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  for ax, op in zip(axes, ("dispatch", "combine")):
    labels = [f"{r['mode']}\n{r['shape']}" for r in rows]
    xs = np.arange(len(rows))
    for j, path in enumerate(("triton", "xla", "ragged", "nccl")):
      key = f"{path}_{'dispatch' if path == 'nccl' else op}_gbps"   # nccl: one all_to_all
      vals = [r.get(key, {}).get("nvl", 0.0) for r in rows]
      ax.bar(xs + (j - 1.5) * 0.2, vals, 0.2, label=path)
    ax.axhline(320, color="k", ls="--", lw=0.8, label="target 320 GB/s")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GB/s per rank (DeepEP NVL convention)")
    ax.set_title(f"{op} ({device})")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)
  print(f"wrote {base}.png")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mode", choices=("peer", "nvshmem", "both"), default="both")
  # 40 samples of 10 and 30 ops (session 15 on; 20 of 5 and 15 before): the same settings
  # timed 0.651-0.710 ms within one 4x H200 run with the old ones (docs/GPU_RUNS.md, session 14)
  ap.add_argument("--iters", type=int, default=40)
  ap.add_argument("--inner", type=int, default=10)
  ap.add_argument("--num-sms", type=int, default=32)
  ap.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
  ap.add_argument("--no-ragged", action="store_true")
  ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
  ap.add_argument("--no-nccl", action="store_true", help="skip the PyTorch NCCL reference")
  ap.add_argument("--no-profile", action="store_true",
                  help="skip the per-phase profile of the triton kernels (JAX_EP_PROFILE=1)")
  ap.add_argument("--trace", default="",
                  help="directory: profile one timed loop per backend with jax.profiler and "
                       "print each GPU stream's kernels (duration, idle gap before)")
  ap.add_argument("--sweep", default="",
                  help="tuning: extra triton timings at frac@sms[@order[@share]] points (dispatch "
                       "sender fraction, num_sms, expansion order, receivers' block share), "
                       "e.g. 0.5@32@1,0.5@32@1@0.6,0.375@32@1@0.7")
  ap.add_argument("--sweep-env", default="",
                  help="tuning: extra triton timings with other JAX_EP_* knob values, points "
                       "separated by ',', settings by '+', e.g. "
                       "JAX_EP_COMBINE_STAGES=1,JAX_EP_COMBINE_ACC_BYTES=65536+"
                       "JAX_EP_COMBINE_STAGES=3")
  ap.add_argument("--sweep-profile", action="store_true",
                  help="also profile every sweep point (JAX_EP_PROFILE=1; device 0 printed)")
  ap.add_argument("--timeout", type=int, default=540)
  ap.add_argument("--op-timeout", type=float, default=120.0,
                  help="EPConfig.timeout_s of the measured ops (seconds a rank waits for a peer)")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  ap.add_argument("--child", choices=("peer", "nvshmem", "nccl"), help=argparse.SUPPRESS)
  ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--coord", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.iters = max(20, args.iters)
  if args.child:
    args.mode_run = args.child
    try:
      if args.child == "nccl":
        print("RESULT " + json.dumps(run_nccl(args)), flush=True)
        return
      if args.child == "nvshmem":
        import jax
        jax.distributed.initialize(args.coord, num_processes=args.world, process_id=args.rank,
                                   local_device_ids=[args.rank])
      res = run_mode(args, rank=args.rank)
    except Exception:  # noqa: BLE001 -- reported to the parent
      import traceback
      res = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(res), flush=True)
    return
  runs = orchestrate(args)
  for run in runs:
    if "error" in run:
      print(f"ERROR in a run:\n{run['error']}")
  print("\n== summary (median per op; GB/s per rank, DeepEP NVL convention)")
  for run in runs:
    for r in run.get("results", []):
      print_row(r)
  write_outputs(runs, args.out)


if __name__ == "__main__":
  main()
