"""2 processes x 2 CPU devices (gloo) on one global 4-device mesh == the single-process run."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cpu_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
from mp_dispatch_problem import make_problem, step_fn  # noqa: E402


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, rng):
  seed = int(rng.integers(1 << 30))
  out_path = str(tmp_path / "mp.npz")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(HERE, "helpers"), os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  port = free_port()
  worker = os.path.join(HERE, "helpers", "mp_dispatch_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), "2", str(pid), out_path,
                             str(seed)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid} failed:\n{log[-3000:]}"
  multi = np.load(out_path)
  config, x, idx, weights, w1 = make_problem(seed, ep_size=4)
  single = jax.jit(step_fn(config, cpu_mesh(4)))(x, idx, weights, w1)
  assert len(multi.files) == len(single)
  names = ("out", "recv_x", "group_sizes", "num_dropped", "dx", "d_topk_weights", "d_w1")
  for i, (name, a) in enumerate(zip(names, single)):
    if name in ("recv_x", "group_sizes", "num_dropped"):  # pure data movement: exact
      np.testing.assert_array_equal(multi[f"arr_{i}"], np.asarray(a), err_msg=name)
    else:  # through matmuls, whose CPU kernels may block differently per process layout
      np.testing.assert_allclose(multi[f"arr_{i}"], np.asarray(a), rtol=1e-5, atol=1e-6,
                                 err_msg=name)
