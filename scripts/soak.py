"""Soak dispatch/combine: many randomized rounds, then a fixed-seed round repeated 20 times.

  python scripts/soak.py --rounds 10000 --seed 0                  # CPU: xla vs loop references
  python scripts/soak.py --backend triton --rounds 2000 --resources --out soak.json   # GPUs

Default (``--backend loops``): the xla backend on 8 virtual CPU devices against the loop
references; each round draws a shape (1-8 ranks, 0-16 tokens, drops, alignment) and a routing
(uniform, Zipf, one expert, empty, empty rank, duplicates, unselected slots, out-of-range ids),
checks recv_x, recv_weights and the layout bit for bit and combine to 1e-6.

``--backend triton``: one process drives every visible GPU (``jax_ep.runtime.initialize(...,
provider="peer")``, W = number of GPUs). Each round draws a shape of
``jax_ep.testing.DEVICE_SOAK_SHAPES`` (T 0..1024, H 128..2048, several E/K/capacities, overflow
and one-row capacities) and a routing of ``DEVICE_SOAK_KINDS`` (the above plus overflowing and
all-but-dropped), runs the triton and the xla backend on the same inputs and compares on the
devices: dispatch outputs and every layout field bit for bit, combine to tolerance (its bit
equality is counted and reported; ``--exact-combine`` requires it). Every 10th round runs triton
twice and requires identical digests. Then the fixed-seed round repeated 20 times must give one
hash, and ``--resources`` runs ``jax_ep.testing.resource_check`` (1,000 forward+gradient steps
with memory at step 10 and 1,000, initialize/shutdown cycles, errors for too-small sizes).
``--backend xla`` runs the same path with xla against xla (a CPU dry run of the GPU soak).

Prints one summary line; ``--out`` also writes everything as JSON. Exit code 1 on any failure.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--backend", choices=("loops", "xla", "triton"), default="loops",
               help="loops: xla vs loop references on CPU; xla/triton: that backend vs xla on "
                    "every local device")
p.add_argument("--rounds", type=int, default=None,
               help="randomized rounds (default 10000 for loops, 2000 otherwise)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--repeats", type=int, default=20, help="repeats of the fixed-seed round")
p.add_argument("--cpu-devices", type=int, default=8)
p.add_argument("--small", action="store_true",
               help="device modes: the small shape pool (DEVICE_SOAK_SMALL_SHAPES), for CPU runs")
p.add_argument("--exact-combine", action="store_true",
               help="device modes: require combine bit for bit too")
p.add_argument("--resources", action="store_true", help="device modes: run the resource checks")
p.add_argument("--steps", type=int, default=1000, help="resource checks: steps")
p.add_argument("--cycles", type=int, default=5, help="resource checks: initialize/shutdown cycles")
p.add_argument("--out", default=None, help="write the results as JSON here")
args = p.parse_args()
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}"
if args.backend == "triton":
  # The soak reads the kernels' timeout records itself (check_timeouts) every 100 rounds and
  # after a mismatch, so a timeout stops it with a report instead of inside a host callback.
  os.environ.setdefault("JAX_EP_CHECK_TIMEOUTS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_ep import testing  # noqa: E402


def _loops_mode(rounds: int) -> dict:
  t0 = time.time()
  stats = testing.soak(rounds, args.seed, log=print)
  hashes = {testing.output_hash(testing.soak_round(np.random.default_rng(args.seed),
                                                   testing.SOAK_SHAPES[6], "zipf", jax.devices()))
            for _ in range(args.repeats)}
  ok = len(hashes) == 1
  print(f"{stats['rounds']} rounds ok in {time.time() - t0:.0f} s on {len(jax.devices())} "
        f"{jax.devices()[0].platform} devices; rows dropped {stats['dropped']}, invalid ids "
        f"{stats['invalid']}; per kind {stats['kinds']}; {args.repeats} repeats -> "
        f"{len(hashes)} hash(es)")
  return {"mode": "xla vs loop references", "soak": stats, "repeat_hashes": sorted(hashes),
          "ok": ok, "seconds": round(time.time() - t0, 2)}


def _device_mode(rounds: int) -> dict:
  from jax_ep import runtime
  t0 = time.time()
  devices = jax.devices("gpu") if args.backend == "triton" else jax.devices()
  shapes = testing.DEVICE_SOAK_SMALL_SHAPES if args.small else testing.DEVICE_SOAK_SHAPES
  soak = testing.DeviceSoak(devices, args.backend, shapes, exact_combine=args.exact_combine)
  out = {"mode": f"{args.backend} vs xla", "devices": [str(d.device_kind) for d in devices],
         "world": len(devices), "jax": jax.__version__, "argv": sys.argv[1:]}
  if args.backend == "triton":
    runtime.shutdown()
    runtime.initialize(soak.configs(), provider="peer", devices=devices)
    out["symmetric_bytes_per_rank"] = runtime.symmetric_bytes()
  res = testing.device_soak(rounds, args.seed, devices=devices, backend=args.backend,
                            exact_combine=args.exact_combine, log=print, soak=soak)
  out["soak"] = res
  ok = res["error"] is None and res["mismatches"] == 0 and res["rounds"] == rounds
  repeat_shape = shapes[-1]
  if res["error"] is None:
    hashes = testing.device_repeat_hashes(soak, args.seed, args.repeats, shape=repeat_shape)
    out["repeat"] = {"shape": testing.shape_id(repeat_shape), "kind": "zipf",
                     "repeats": len(hashes), "distinct_hashes": sorted(set(hashes))}
    ok = ok and len(set(hashes)) == 1
  if args.resources and res["error"] is None:
    resource_shape = testing.DEVICE_SOAK_SMALL_SHAPES[1] if args.small else testing.RESOURCE_SHAPE
    out["resources"] = testing.resource_check(soak, shape=resource_shape, steps=args.steps,
                                              cycles=args.cycles, seed=args.seed, log=print)
    ok = ok and not out["resources"]["failures"]
  out["ok"] = ok
  out["seconds"] = round(time.time() - t0, 2)
  comb = res["combine"]
  line = (f"{out['mode']}: {res['rounds']}/{rounds} rounds, {res['mismatches']} mismatched, in "
          f"{res['seconds']:.0f} s on {len(devices)} x {devices[0].device_kind}; rows received "
          f"{res['recv_rows']}, dropped {res['dropped_rows']}, invalid ids {res['invalid_ids']}; "
          f"per kind {res['kinds']}; combine bit-equal to xla in {comb['bit_equal_rounds']}/"
          f"{res['rounds']} rounds (max |diff| {comb['max_abs_err']:.3g}; compared "
          f"{comb['compared']}); {args.backend} self-repeats identical "
          f"{res['self_repeats']['identical']}/{res['self_repeats']['checked']}")
  if "repeat" in out:
    line += f"; {args.repeats} repeats -> {len(out['repeat']['distinct_hashes'])} hash(es)"
  if "resources" in out:
    r = out["resources"]
    line += (f"; resources: {len(r['failures'])} failures (device bytes delta "
             f"{r.get('delta', {}).get('bytes_in_use')}, nvidia-smi MiB delta "
             f"{r.get('delta', {}).get('gpu_memory_used_mib')}, {len(r.get('cycles', []))} "
             f"init/shutdown cycles)")
  if res["error"]:
    line += f"; ERROR: {res['error'].splitlines()[0]}"
  print(("OK " if ok else "FAILED ") + line, flush=True)
  for d in res["mismatch_details"][:3]:
    print(json.dumps(d, indent=1))
  for f in out.get("resources", {}).get("failures", []):
    print("resource failure:", f)
  if args.backend == "triton":
    runtime.shutdown()
  return out


rounds = args.rounds if args.rounds is not None else (10000 if args.backend == "loops" else 2000)
result = _loops_mode(rounds) if args.backend == "loops" else _device_mode(rounds)
if args.out:
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
if not result["ok"]:
  raise SystemExit(1)
