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


def _ep_mesh(n):
  """The example's mesh: ("data", "ep") = (1, n)."""
  return jax.sharding.Mesh(np.array(_devices(n)).reshape(1, n), ("data", "ep"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


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


def test_command_line_compares_backends_on_the_same_batches(tmp_path, monkeypatch, capsys):
  """main(): the same code path users run, with its outputs (plot, metrics, checkpoint, table).

  ``--compare-backends xla,auto,triton`` trains once per backend in this process from the same
  parameters on the same batches: on CPU "auto" resolves to xla (the same losses, bit for bit)
  and triton is skipped (no GPU); tokens/s leave out the warm-up steps.
  """
  pytest.importorskip("matplotlib")
  if jax.default_backend() != "cpu":
    pytest.skip("on GPUs 'auto' resolves to triton")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # leave the session's device count alone
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "1")  # restored after the test
  result = train_moe.main(["--preset", "tiny", "--steps", "4", "--devices", "2",
                           "--backend", "xla", "--compare-backends", "xla,auto,triton",
                           "--warmup-steps", "2", "--timeout-s", "30", "--check-timeouts", "0",
                           "--eval-batches", "1", "--out-dir", str(tmp_path), "--no-progress",
                           "--log-every", "2"])
  assert os.environ["JAX_EP_CHECK_TIMEOUTS"] == "0"
  assert len(result.losses) == 4 and not result.failed
  assert (tmp_path / "loss.png").stat().st_size > 1000
  assert (tmp_path / "checkpoint.npz").exists()  # the primary run (--backend xla) checkpoints
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["losses"] == result.losses and metrics["ep_size"] == 2
  assert metrics["config"]["timeout_s"] == 30.0 and metrics["env"]["JAX_EP_CHECK_TIMEOUTS"] == "0"
  assert metrics["mode"] == "1 process x 2 CPUs"
  runs = metrics["runs"]
  assert list(runs) == ["xla", "auto", "triton"]
  assert runs["xla"]["losses"] == runs["auto"]["losses"] == result.losses
  assert runs["auto"]["resolved"] == "xla" and runs["triton"]["skipped"]
  for name in ("xla", "auto"):
    assert runs[name]["timed_steps"] == 2 and runs[name]["tokens_per_s"] > 0
    assert runs[name]["compile_s"] > 0 and runs[name]["error"] is None
  assert np.isfinite(runs["xla"]["eval_loss"]) and runs["auto"]["eval_loss"] is None
  assert set(metrics["backend_tokens_per_s"]) == {"xla", "auto"}
  table = capsys.readouterr().out
  assert "tokens/s" in table and "skipped" in table and "1 process x 2 CPUs" in table


def test_kernel_warm_up_runs_each_op_alone():
  """The warm-up's programs (one jax_ep op each) run; here with the xla backend on CPU."""
  from flax import nnx

  from jax_ep import backends
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  mesh = _ep_mesh(4)
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: train_moe.build_model(cfg, mesh, 0))
  train_moe.warm_up_kernels(model, mesh, cfg.batch_size * cfg.seq_len, cfg.dtype,
                            backend=backends.get("xla"), gmm_backend="xla")


def test_kernel_warm_up_launches_every_kernel_of_the_training_step(monkeypatch, tmp_path):
  """Lowered for CUDA with the triton backend (no GPU needed), the warm-up compiles exactly the
  Triton kernels of the real training step: so on GPUs no module is loaded mid-step."""
  pytest.importorskip("triton")
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jax_ep.api
  from jax_ep import backends, runtime

  monkeypatch.setenv("JAX_EP_CACHE_DIR", str(tmp_path / "kernel_cache"))
  monkeypatch.setenv("JAX_EP_CHECK_TIMEOUTS", "0")  # a host callback cannot lower for CUDA here
  triton = backends.get("triton")
  # Pretend the runtime is up and the grouped matmul usable: lowering bakes in no address.
  monkeypatch.setattr(triton, "check_usable", lambda config: None)
  monkeypatch.setattr(triton, "usable", lambda config: True)
  monkeypatch.setattr(runtime, "is_initialized", lambda: True)
  monkeypatch.setattr(runtime, "world_size", lambda: 4)
  monkeypatch.setattr(jax_ep.api, "_gmm_backend",
                      lambda name: backends.get("xla") if name == "xla" else triton)
  cfg = dataclasses.replace(CFG, dtype="bfloat16", backend="triton", shared_ff=32,
                            capacity_factor=2.0)
  mesh = _ep_mesh(4)

  def init():
    model = train_moe.build_model(cfg, mesh, 0)
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(init)
    graphdef, state = nnx.split(abstract)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.get_partition_spec(state),
                             is_leaf=lambda x: isinstance(x, P))
    step = train_moe.make_train_step(graphdef, shardings, NamedSharding(mesh, P()))
    batch = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32,
                                 sharding=NamedSharding(mesh, P(("data", "ep"))))
    with train_moe._KernelRecorder() as in_step:
      text = step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    with train_moe._KernelRecorder() as in_warm_up:
      train_moe.warm_up_kernels(abstract, mesh, cfg.batch_size * cfg.seq_len, cfg.dtype,
                                lower_only=True)
  names = sorted(in_step.keys.values())
  assert {"dispatch_kernel", "combine_kernel", "dispatch_rows_kernel", "gather_kernel",
          "grouped_gemm_kernel", "grouped_gemm_dw_kernel"} <= set(names), names
  assert "jax_ep_triton_launch" in text
  assert set(in_step.keys) == set(in_warm_up.keys), (names, sorted(in_warm_up.keys.values()))


def test_timeout_flag_reaches_the_moe_blocks_and_resume_ignores_it(ep_run, tmp_path):
  import shutil
  _, out = ep_run
  for name in ("checkpoint.npz", "checkpoint.json"):
    shutil.copy(out / name, tmp_path / name)
  cfg = dataclasses.replace(CFG, timeout_s=33.0)
  mesh = _ep_mesh(4)
  from flax import nnx
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: train_moe.build_model(cfg, mesh, 0))
  configs = train_moe._moe_configs(cfg, model, mesh)
  assert [c.timeout_s for c in configs] == [33.0]
  # A run-only setting: the checkpoint of ep_run (default timeout) still resumes.
  resumed = train_moe.train(dataclasses.replace(cfg, steps=STEPS + 1), devices=_devices(4),
                            out_dir=str(tmp_path), progress=False, log_every=STEPS,
                            resume=True, eval_batches=0)
  assert resumed.start_step == STEPS and len(resumed.losses) == STEPS + 1


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
  """The gpu preset trains with the xla and then the triton backend (same parameters, same
  batches, same processes); both losses fall and both tokens/s are recorded.

  Results land in $OUT/train_moe_<mode>/metrics.json when OUT is set (device runs), else in a
  temporary folder; the test prints the table. scripts/gpu_train.sh runs the same with
  diagnostics.
  """
  gpus = _num_gpus()
  if gpus < 2:
    pytest.skip(f"needs 2 or more GPUs, found {gpus}")
  out = pathlib.Path(os.environ["OUT"]) / f"train_moe_{mode}" if os.environ.get("OUT") \
      else tmp_path
  args = [str(ROOT / "examples" / "train_moe.py"), "--preset", "gpu", "--steps", "40",
          "--warmup", "10", "--log-every", "10", "--no-progress", "--backend", "triton",
          "--compare-backends", "xla,triton", "--timeout-s", "60", "--check-timeouts", "0",
          "--watchdog-s", "20", "--stall-abort-s", "150", "--eval-batches", "1",
          "--out-dir", str(out)]
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
  for name in ("xla", "triton"):
    run = metrics["runs"][name]
    assert run["error"] is None and run["resolved"] == name, run
    losses = np.asarray(run["losses"])
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[0] - 1.0, losses
    assert run["tokens_per_s"] > 0
  rates = metrics["backend_tokens_per_s"]
  print(f"{mode}: {gpus} GPUs, tokens/s triton {rates['triton']:,.0f}, xla {rates['xla']:,.0f}, "
        f"ratio {metrics['tokens_per_s_ratio']:.3f}")
