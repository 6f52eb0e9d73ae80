"""2 processes x 2 CPU devices (examples/multihost/launch.py) train like 1 process x 4 devices."""
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12


def test_two_processes_match_one_process(tmp_path):
  if len(jax.devices("cpu")) < 4:
    pytest.skip("needs 4 CPU devices for the single-process reference")
  out = tmp_path / "mp"
  cmd = [sys.executable, str(ROOT / "examples" / "multihost" / "launch.py"),
         "--num-processes", "2", "--cpu-devices", "2", "--timeout", "400", "--",
         str(ROOT / "examples" / "train_moe.py"), "--preset", "tiny", "--steps", str(STEPS),
         "--backend", "xla", "--out-dir", str(out), "--no-progress", "--log-every", "4"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=450, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "[p0]" in proc.stdout and "[p1]" in proc.stdout
  assert "2 process(es), EP over 4 device(s)" in proc.stdout
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["num_processes"] == 2 and metrics["ep_size"] == 4
  assert (out / "checkpoint.npz").exists()  # gathered from both processes, written by p0

  spec = importlib.util.spec_from_file_location("train_moe", ROOT / "examples" / "train_moe.py")
  train_moe = sys.modules.get("train_moe") or importlib.util.module_from_spec(spec)
  if "train_moe" not in sys.modules:
    sys.modules["train_moe"] = train_moe
    spec.loader.exec_module(train_moe)
  cfg = dataclasses.replace(train_moe.TrainConfig(**train_moe.PRESETS["tiny"]), steps=STEPS,
                            backend="xla")
  single = train_moe.train(cfg, devices=jax.devices("cpu")[:4], progress=False,
                           log_every=STEPS)
  np.testing.assert_allclose(metrics["losses"], single.losses, rtol=0, atol=1e-4)
  assert abs(metrics["eval_loss"] - single.eval_loss) < 1e-4


def test_launcher_stops_the_others_when_one_fails():
  """A failing process ends the job at once with its status; its siblings are stopped."""
  spec = importlib.util.spec_from_file_location(
      "launch", ROOT / "examples" / "multihost" / "launch.py")
  launch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launch)
  code = ("import os, sys, time; pid = int(os.environ['JAX_PROCESS_ID']); "
          "print('rank', pid, os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_PLATFORMS']); "
          "sys.exit(3) if pid == 1 else time.sleep(120)")
  t0 = time.monotonic()
  status = launch.launch(["-c", code], num_processes=2, cpu_devices=2)
  assert status == 3
  assert time.monotonic() - t0 < 60
