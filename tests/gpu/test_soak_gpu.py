"""GPU soak (issue #7): triton vs xla over randomized rounds, a fixed-seed round repeated 20
times (one hash), and the resource checks, on every visible GPU of one host (peer provider).

One module-scoped run of ``scripts/soak.py --backend triton --resources`` in a fresh process
(clean memory numbers, a hard time limit, and the script's JSON as the record); the tests read
its JSON. Skipped cleanly without 2 or more CUDA GPUs or without libjax_ep_ffi.so.

  python -m pytest tests/gpu/test_soak_gpu.py -m gpu -q -s     # 200 rounds
  JAX_EP_SOAK_ROUNDS=2000 JAX_EP_SOAK_OUT=$OUT/soak_gpu.json \
      python -m pytest tests/gpu/test_soak_gpu.py -m gpu -q -s

Environment: JAX_EP_SOAK_ROUNDS (default 200), JAX_EP_SOAK_SEED (7), JAX_EP_SOAK_OUT (JSON path;
the script's log goes next to it as .log; default a temporary folder), JAX_EP_SOAK_TIMEOUT
(seconds for the whole script; default 150 + rounds / 10 + 120 for the resource checks).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

ROUNDS = int(os.environ.get("JAX_EP_SOAK_ROUNDS", "200"))
SEED = int(os.environ.get("JAX_EP_SOAK_SEED", "7"))
TIMEOUT_S = float(os.environ.get("JAX_EP_SOAK_TIMEOUT", str(150 + ROUNDS / 10 + 120)))


def _num_gpus() -> int:
  """CUDA devices seen by the FFI library (0 without it); does not start JAX's GPU client."""
  from jax_ep import testing
  return testing.ffi_gpu_count()


def _tail(path: str, n: int = 4000) -> str:
  try:
    with open(path) as f:
      return f.read()[-n:]
  except OSError:
    return "(no log)"


@pytest.fixture(scope="module")
def soak_result(tmp_path_factory):
  if _num_gpus() < 2:
    pytest.skip("needs 2 or more CUDA GPUs and libjax_ep_ffi.so (see docs/RUNTIME.md)")
  out = os.environ.get("JAX_EP_SOAK_OUT") or str(tmp_path_factory.mktemp("soak") / "soak.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  log = os.path.splitext(out)[0] + ".log"
  env = dict(os.environ)
  # This pytest process may already hold its share of GPU memory (other GPU tests).
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("JAX_EP_CHECK_TIMEOUTS", None)  # the script reads the timeout records itself
  env.setdefault("PYTHONUNBUFFERED", "1")
  cmd = [sys.executable, os.path.join(REPO, "scripts", "soak.py"), "--backend", "triton",
         "--rounds", str(ROUNDS), "--seed", str(SEED), "--resources", "--out", out]
  if os.path.exists(out):
    os.remove(out)
  with open(log, "w") as f:
    try:
      proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
      pytest.fail(f"scripts/soak.py did not finish in {TIMEOUT_S:.0f} s (JAX_EP_SOAK_TIMEOUT); "
                  f"log {log}:\n{_tail(log)}")
  if not os.path.exists(out):
    pytest.fail(f"scripts/soak.py wrote no JSON (rc {proc.returncode}); log {log}:\n{_tail(log)}")
  with open(out) as f:
    res = json.load(f)
  res["_rc"], res["_log"] = proc.returncode, log
  summary = [line for line in _tail(log, 20000).splitlines()
             if line.startswith(("OK ", "FAILED ", "resource failure"))]
  print(f"\n{' '.join(cmd[1:])}: rc {proc.returncode}; JSON {out}\n" + "\n".join(summary))
  return res


def test_soak_triton_matches_xla(soak_result):
  """ROUNDS rounds over the pool of shapes and every routing kind: dispatch outputs and every
  layout field bit for bit, combine to tolerance (bit equality counted), triton identical to
  itself on re-runs."""
  from jax_ep import testing
  res = soak_result["soak"]
  assert res["error"] is None, res["error"]
  assert res["mismatches"] == 0, "\n".join(json.dumps(d) for d in res["mismatch_details"])
  assert res["rounds"] == ROUNDS
  assert res["self_repeats"]["identical"] == res["self_repeats"]["checked"] > 0
  if ROUNDS >= 200:  # the pool really exercises drops, invalid ids and every kind
    assert res["dropped_rows"] > 0 and res["invalid_ids"] > 0
    assert set(res["kinds"]) == set(testing.DEVICE_SOAK_KINDS), res["kinds"]


def test_fixed_seed_round_repeats_with_one_hash(soak_result):
  rep = soak_result.get("repeat")
  assert rep is not None, soak_result["soak"]["error"]
  assert rep["repeats"] == 20 and len(rep["distinct_hashes"]) == 1, rep


def test_resources(soak_result):
  """1,000 forward+gradient steps with stable device memory and symmetric region, 5
  initialize/shutdown cycles each followed by a correct op, errors for too-small sizes."""
  res = soak_result.get("resources")
  assert res is not None, soak_result["soak"]["error"]
  assert not res["failures"], "\n".join(res["failures"])
  assert len(res["cycles"]) == 5 and all(c["ok"] for c in res["cycles"])
  assert res["errors"]["symmetric_region"].get("says_what_to_call"), res["errors"]
  assert soak_result["ok"] and soak_result["_rc"] == 0, _tail(soak_result["_log"])
