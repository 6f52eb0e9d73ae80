"""examples/train_moe.py: a short run learns; EP and single-device runs agree; resume is exact."""
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30


def load_example():
  spec = importlib.util.spec_from_file_location("train_moe", ROOT / "examples" / "train_moe.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_moe"] = module  # dataclasses look their module up while the file runs
  spec.loader.exec_module(module)
  return module


train_moe = load_example()
CFG = dataclasses.replace(train_moe.TrainConfig(**train_moe.PRESETS["tiny"]), steps=STEPS,
                          backend="xla")


def _devices(n):
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices")
  return jax.devices()[:n]


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("ep4")
  result = train_moe.train(CFG, devices=_devices(4), out_dir=str(out), progress=False,
                           log_every=STEPS)
  return result, out


def test_loss_falls_clearly(ep_run):
  result, _ = ep_run
  losses = np.asarray(result.losses)
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  # Untrained, a byte-level model sits near ln(256) = 5.55 nats.
  assert abs(losses[0] - math.log(256)) < 0.5
  assert losses[-5:].mean() < losses[0] - 1.5, losses
  assert result.eval_loss < losses[0] - 1.5
  assert result.ep_size == 4 and result.backend == "xla"


def test_single_device_follows_the_same_curve(ep_run):
  ep_result, _ = ep_run
  single = train_moe.train(CFG, devices=_devices(1), progress=False, log_every=STEPS)
  np.testing.assert_allclose(single.losses, ep_result.losses, rtol=0, atol=1e-4)


def test_data_parallel_ep_groups_follow_the_same_curve(ep_run):
  """Mesh (data=2, ep=4): two EP groups, each holding every expert, train like one EP group."""
  ep_result, _ = ep_run
  dp = train_moe.train(CFG, devices=_devices(8), data_parallel=2, progress=False,
                       log_every=STEPS)
  assert (dp.ep_size, dp.data_parallel) == (4, 2)
  np.testing.assert_allclose(dp.losses, ep_result.losses, rtol=0, atol=1e-4)


def test_resume_continues_exactly(ep_run, tmp_path):
  ep_result, _ = ep_run
  first = train_moe.train(CFG, devices=_devices(4), out_dir=str(tmp_path), progress=False,
                          log_every=STEPS, stop_after=STEPS // 2)
  assert len(first.losses) == STEPS // 2
  meta = json.loads((tmp_path / "checkpoint.json").read_text())
  assert meta["step"] == STEPS // 2
  resumed = train_moe.train(CFG, devices=_devices(4), out_dir=str(tmp_path), progress=False,
                            log_every=STEPS, resume=True)
  assert resumed.start_step == STEPS // 2
  assert len(resumed.losses) == STEPS
  np.testing.assert_allclose(resumed.losses, ep_result.losses, rtol=0, atol=1e-5)


def test_resume_refuses_other_settings(ep_run):
  _, out = ep_run
  other = dataclasses.replace(CFG, d_model=48)
  with pytest.raises(ValueError, match="written with other settings.*d_model"):
    train_moe.train(other, devices=_devices(4), out_dir=str(out), progress=False,
                    resume=True)


def test_command_line_writes_plot_and_metrics(tmp_path, monkeypatch):
  """main(): the same code path users run, with its outputs (plot, metrics, checkpoint)."""
  pytest.importorskip("matplotlib")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # leave the session's device count alone
  result = train_moe.main(["--preset", "tiny", "--steps", "3", "--devices", "2",
                           "--backend", "xla", "--out-dir", str(tmp_path), "--no-progress",
                           "--log-every", "1"])
  assert len(result.losses) == 3
  assert (tmp_path / "loss.png").stat().st_size > 1000
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["losses"] == result.losses and metrics["ep_size"] == 2
  assert (tmp_path / "checkpoint.npz").exists()


# -- GPUs: the example with the triton backend in both runtime modes -----------------------------

def _num_gpus() -> int:
  """GPUs on this host, without starting a GPU client in the test process (it would take
  the memory the training processes need)."""
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return 0
  if out.returncode != 0:
    return 0
  return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("mode", ["one_process", "process_per_gpu"])
def test_gpu_example_trains_with_triton(mode, tmp_path):
  """The gpu preset trains with the triton backend; tokens/s of xla and triton are recorded.

  Results land in $OUT/train_moe_<mode>/metrics.json when OUT is set (device runs), else in a
  temporary folder; the test prints both backends' tokens/s.
  """
  gpus = _num_gpus()
  if gpus < 2:
    pytest.skip(f"needs 2 or more GPUs, found {gpus}")
  out = pathlib.Path(os.environ["OUT"]) / f"train_moe_{mode}" if os.environ.get("OUT") \
      else tmp_path
  args = [str(ROOT / "examples" / "train_moe.py"), "--preset", "gpu", "--steps", "60",
          "--log-every", "20", "--no-progress", "--backend", "triton",
          "--compare-backends", "xla,triton", "--bench-steps", "10", "--out-dir", str(out)]
  if mode == "one_process":
    cmd = [sys.executable, *args]
  else:
    cmd = [sys.executable, str(ROOT / "examples" / "multihost" / "launch.py"), "--gpus",
           "--num-processes", str(gpus), "--timeout", "900", "--", *args]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1000, env=env, cwd=ROOT)
  print(proc.stdout[-3000:])
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["backend"] == "triton" and metrics["ep_size"] == gpus
  losses = np.asarray(metrics["losses"])
  assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[0] - 1.0
  rates = metrics["backend_tokens_per_s"]
  assert set(rates) == {"xla", "triton"} and min(rates.values()) > 0
  print(f"{mode}: {gpus} GPUs, tokens/s triton {rates['triton']:,.0f}, xla {rates['xla']:,.0f}, "
        f"training {metrics['tokens_per_s']:,.0f}")
