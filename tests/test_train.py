"""examples/train_moe.py: a short run learns; EP and single-device runs agree; resume is exact."""
import dataclasses
import importlib.util
import json
import math
import pathlib
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
  result = train_moe.main(["--preset", "tiny", "--steps", "3", "--ep-size", "2",
                           "--backend", "xla", "--out-dir", str(tmp_path), "--no-progress",
                           "--log-every", "1"])
  assert len(result.losses) == 3
  assert (tmp_path / "loss.png").stat().st_size > 1000
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["losses"] == result.losses and metrics["ep_size"] == 2
  assert (tmp_path / "checkpoint.npz").exists()
