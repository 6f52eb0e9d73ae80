"""GPU test of the NVSHMEM provider: one JAX process per visible GPU (scripts/gpu_tests.sh)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from jax_ep import testing

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_nvshmem_all_gather_processes():
  world = testing.ffi_gpu_count()  # no CUDA context is created
  if world < 2:
    pytest.skip("needs 2 or more CUDA GPUs and libjax_ep_ffi.so")
  calls = int(os.environ.get("JAX_EP_TEST_CALLS", "1000"))
  coord = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
  env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
  env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this pytest process may hold GPU memory too
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mp_worker.py"), str(r),
                             str(world), coord, str(calls)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
           for r in range(world)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process NVSHMEM test timed out")
    outputs.append(out)
  results = []
  for r, out in enumerate(outputs):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, f"rank {r} printed no result:\n{out[-4000:]}"
    results.append(json.loads(lines[-1][len("RESULT "):]))
  print(json.dumps(results, indent=1))
  for r, res in enumerate(results):
    assert "error" not in res, f"rank {r}:\n{res['error']}\n{outputs[r][-3000:]}"
    assert res["provider"] == "nvshmem" and res["runtime_rank"] == r
    assert res["runtime_world"] == world
    assert res["uninitialized_error"] == "ok", res
    assert res["wrong_calls"] == 0 and res["timeouts"] == 0, res
    assert res["calls"] == calls and res["epoch"] == calls
    assert res["after_shutdown_error"] == "ok", res
    assert res["reinit_wrong_calls"] == 0, res
    assert res["nvshmem_device_call"] == "ok", res
