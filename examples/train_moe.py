"""Train a small Mixture-of-Experts transformer language model with jax_ep expert parallelism.

The corpus is the Python standard library's own source code, read byte by byte (a character-
level model over 256 byte values), so it is on every machine that runs this script and needs no
download. Every MoE block splits its experts and the batch over one mesh axis ("ep") spanning
all devices of all processes (``--data-parallel D``: D such EP groups side by side); attention
and embeddings are replicated (data parallel over the same devices). One jit-compiled step:
forward, cross-entropy + MoE auxiliary losses, backward, AdamW.

  CPU, 8 virtual devices, a few minutes:
    python examples/train_moe.py --preset cpu
  GPUs, one process driving every local GPU: train with the xla backend, then with the triton
  backend (same initial parameters, same batches), and compare tokens/s:
    python examples/train_moe.py --preset gpu --compare-backends xla,triton
  One process per device (CPU or GPU), here or on a cluster: see examples/multihost/README.md
    python examples/multihost/launch.py --num-processes 4 --gpus -- \
        examples/train_moe.py --preset gpu --compare-backends xla,triton

Output (``--out-dir``): ``loss.png`` (training loss curves, one per backend), ``metrics.json``
(per-step losses, tokens/s after ``--warmup-steps``, compile and first-step times of every run,
errors with the triton runtime's diagnosis), ``checkpoint.npz`` + ``checkpoint.json`` (resume
with ``--resume``); a table of backend, mode, tokens/s and final loss at the end of the log.

Triton backend knobs: ``--timeout-s`` (how long a kernel waits for a peer GPU, default 120 s),
``--check-timeouts {0,1}`` (``JAX_EP_CHECK_TIMEOUTS``), ``--warmup-kernels`` (launch each
jax_ep op alone once before training), ``--watchdog-s`` / ``--stall-abort-s`` (report / end a
run that makes no progress). docs/TRAINING.md explains them.

Multi-process jobs read ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
(and optionally ``JAX_LOCAL_DEVICE_IDS``) from the environment, as the launcher sets them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import typing as tp
import zlib

import numpy as np

# -- configuration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Model, data and optimisation settings (the checkpoint stores them; resume checks them)."""

  # model
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 128  # SwiGLU hidden width of each expert
  num_experts: int = 8
  topk: int = 2
  shared_ff: int = 0  # 0: no shared expert
  capacity_factor: float = 0.0  # 0: buffers never drop
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  remat: bool = False
  # data
  seq_len: int = 64
  batch_size: int = 32  # global, over all devices; a multiple of the EP size
  corpus_bytes: int = 2_000_000
  # optimisation
  steps: int = 300
  lr: float = 3e-3
  warmup: int = 30
  weight_decay: float = 0.01
  load_balancing_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  seed: int = 0
  backend: str = "auto"
  # How long a triton kernel waits for a peer GPU before it reports a timeout. Generous: the
  # GPUs can reach the first step's ops seconds apart (module loads, compiles in other
  # processes); a real hang then takes this long to report.
  timeout_s: float = 120.0


PRESETS: dict[str, dict[str, tp.Any]] = {
    # Tests and smoke runs: seconds on two CPU cores.
    "tiny": dict(d_model=32, num_layers=2, num_heads=2, d_ff=32, num_experts=8, topk=2,
                 seq_len=32, batch_size=16, steps=40, lr=1e-2, warmup=5,
                 corpus_bytes=300_000),
    # CPU with 8 virtual devices: a few minutes, the loss falls from 5.5 to about 2.
    "cpu": dict(),
    # GPUs (1-8): a larger model in bfloat16.
    "gpu": dict(d_model=512, num_layers=6, num_heads=8, d_ff=1024, num_experts=32, topk=4,
                shared_ff=1024, capacity_factor=2.0, seq_len=512, batch_size=64, steps=1000,
                lr=1e-3, warmup=100, dtype="bfloat16", corpus_bytes=50_000_000),
}


# -- data ---------------------------------------------------------------------------------------


def load_corpus(max_bytes: int) -> np.ndarray:
  """Up to ``max_bytes`` of the standard library's ``*.py`` source as ``[n] uint8`` bytes.

  Top-level modules first (sorted by name), then the packages below (sorted walk, without
  site-packages). Every machine with the same Python version reads the same bytes.
  """
  root = os.path.dirname(os.__file__)

  def files():
    for name in sorted(os.listdir(root)):
      if name.endswith(".py"):
        yield os.path.join(root, name)
    for name in sorted(os.listdir(root)):
      top = os.path.join(root, name)
      if name in ("site-packages", "dist-packages", "__pycache__") or not os.path.isdir(top):
        continue
      for folder, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
          if n.endswith(".py"):
            yield os.path.join(folder, n)

  chunks, total = [], 0
  for path in files():
    with open(path, "rb") as f:
      chunks.append(f.read())
    total += len(chunks[-1])
    if total >= max_bytes:
      break
  return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def sample_batch(data: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
  """``[batch_size, seq_len + 1] int32`` windows; a pure function of (seed, step)."""
  rng = np.random.default_rng((cfg.seed, step))
  starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
  return data[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int32)


# -- model --------------------------------------------------------------------------------------


def _rope(x, positions):
  """Rotary position embedding on ``[batch, seq, heads, head_dim]``."""
  import jax.numpy as jnp
  half = x.shape[-1] // 2
  freq = 1.0 / (10_000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[:, None].astype(jnp.float32) * freq  # [seq, half]
  cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def build_model(cfg: TrainConfig, mesh, seed: int):
  """The model: embedding, ``num_layers`` (attention + MoE) blocks stacked for scan, LM head."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jax_ep.nn

  dtype = jnp.dtype(cfg.dtype)

  class Block(nnx.Module):
    """Pre-norm causal self-attention, then a jax_ep MoE feed-forward block."""

    def __init__(self, rngs: nnx.Rngs):
      d = cfg.d_model
      self.attn_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
      self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=dtype, rngs=rngs)
      self.out = nnx.Linear(d, d, use_bias=False, dtype=dtype, rngs=rngs)
      self.mlp_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
      self.moe = jax_ep.nn.MoE(
          d, cfg.d_ff, num_experts=cfg.num_experts, topk=cfg.topk, mesh=mesh,
          data_axes=("data",), shared_intermediate=cfg.shared_ff or None,
          capacity_factor=cfg.capacity_factor or None, backend=cfg.backend,
          timeout_s=cfg.timeout_s,
          load_balancing_coef=cfg.load_balancing_coef, z_loss_coef=cfg.z_loss_coef,
          dtype=dtype, rngs=rngs)

    def __call__(self, h):  # h: [batch, seq, d_model]
      b, s, d = h.shape
      nh = cfg.num_heads
      qkv = self.qkv(self.attn_norm(h)).reshape(b, s, 3, nh, d // nh)
      pos = jnp.arange(s)
      q, k, v = _rope(qkv[:, :, 0], pos), _rope(qkv[:, :, 1], pos), qkv[:, :, 2]
      attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      h = h + self.out(attn.reshape(b, s, d))
      y, aux = self.moe(self.mlp_norm(h))
      return h + y.astype(h.dtype), aux

  class MoETransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.embed = nnx.Embed(256, cfg.d_model, dtype=dtype, rngs=rngs)

      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def make_blocks(key):
        return Block(nnx.Rngs(params=key))

      self.blocks = make_blocks(jax.random.split(rngs.params(), cfg.num_layers))
      self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
      # Small output init: the untrained model predicts nearly uniform bytes (loss ln 256).
      self.head = nnx.Linear(cfg.d_model, 256, use_bias=False, dtype=dtype,
                             kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, tokens):  # [batch, seq] int32 -> logits [batch, seq, 256] f32, aux
      h = self.embed(tokens)

      def block(layer, h):
        return layer(h)

      if cfg.remat:
        block = nnx.remat(block)

      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: None})
      def run(layer, h):
        h, aux = block(layer, h)
        return h, aux

      h, aux = run(self.blocks, h)
      logits = self.head(self.final_norm(h)).astype(jnp.float32)
      return logits, aux

  return MoETransformer(nnx.Rngs(params=seed))


def set_backend(model, backend: str) -> None:
  """Point every MoE block of ``model`` at another jax_ep backend (a static attribute)."""
  from flax import nnx

  import jax_ep.nn
  for _, module in nnx.iter_modules(model):
    if isinstance(module, jax_ep.nn.MoE):
      module.backend = backend


# -- training -----------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  """One training run with one jax_ep backend (``TrainResult.runs`` holds one per backend)."""

  backend: str  # as asked for: "xla", "triton" or "auto"
  resolved: str  # the backend the MoE blocks really used ("xla" or "triton")
  gmm_backend: str  # the grouped matmul's backend inside the experts
  losses: list[float] = dataclasses.field(default_factory=list)
  aux_losses: list[float] = dataclasses.field(default_factory=list)
  tokens_per_s: float = 0.0  # over the steps after the warm-up steps (this process's clock)
  timed_steps: int = 0  # steps in tokens_per_s
  compile_s: float = 0.0  # lowering + compiling the training step
  first_step_s: float = 0.0  # the first step's run time, compilation excluded
  eval_loss: float | None = None  # held-out loss (the primary run only)
  per_process_tokens_per_s: list[float] = dataclasses.field(default_factory=list)
  error: str | None = None  # why the run failed
  skipped: str | None = None  # why the run did not run (e.g. no GPUs for triton)
  diagnosis: str | None = None  # triton runtime's error records and launch counts on failure

  @property
  def final_loss(self) -> float | None:
    return self.losses[-1] if self.losses else None


@dataclasses.dataclass
class TrainResult:
  """What ``train`` returns (and ``metrics.json`` holds).

  The top-level fields describe the primary run (``backend``); ``runs`` has every backend's
  run of a ``compare_backends`` job (same initial parameters, same batches, same process).
  """

  losses: list[float]  # cross-entropy (nats/byte) of each step's training batch
  aux_losses: list[float]  # sum over layers of the MoE auxiliary loss
  eval_loss: float  # cross-entropy on held-out batches after training
  tokens_per_s: float  # over the steps after the warm-up steps
  ep_size: int
  data_parallel: int
  num_processes: int
  backend: str  # the backend the primary run's MoE blocks really used
  start_step: int  # > 0 when resumed from a checkpoint
  backend_tokens_per_s: dict[str, float] = dataclasses.field(default_factory=dict)
  mode: str = ""  # e.g. "1 process x 4 GPUs (peer)", "4 processes x 1 GPU (nvshmem)"
  warmup_steps: int = 0  # steps left out of tokens_per_s at the start of every run
  runs: dict[str, dict] = dataclasses.field(default_factory=dict)  # RunResult fields per backend
  tokens_per_s_ratio: float | None = None  # triton / xla when both ran
  failed: bool = False  # some run failed (see runs[...]["error"])
  gpu_state_unknown: bool = False  # a triton run failed: its kernels may still run


def _is_main() -> bool:
  import jax
  return jax.process_index() == 0


def _progress(total: int, initial: int, enabled: bool):
  """A tqdm progress bar (when ``enabled``), or a stand-in that only prints ``write``s."""
  if enabled:
    try:
      from tqdm import tqdm
      return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                  file=sys.stdout)
    except ImportError:
      pass

  class _Quiet:
    def update(self, n=1):
      pass

    def set_postfix_str(self, s):
      pass

    def write(self, s):
      print(s, flush=True)

    def close(self):
      pass

  return _Quiet()


def _save_checkpoint(out_dir: str, state, step: int, cfg: TrainConfig, losses, aux_losses):
  """Gather the (sharded) state to every process; the main process writes it atomically."""
  import jax
  from jax.experimental import multihost_utils

  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  keys = [jax.tree_util.keystr(path) for path, _ in leaves]
  values = [leaf for _, leaf in leaves]
  if jax.process_count() > 1:
    values = multihost_utils.process_allgather(values, tiled=True)
  values = [np.asarray(v) for v in values]
  if not _is_main():
    return
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "checkpoint.tmp.npz")
  np.savez(tmp, **{f"a{i}": v for i, v in enumerate(values)})
  os.replace(tmp, os.path.join(out_dir, "checkpoint.npz"))
  meta = dict(step=step, keys=keys, config=dataclasses.asdict(cfg), losses=losses,
              aux_losses=aux_losses)
  with open(os.path.join(out_dir, "checkpoint.json.tmp"), "w") as f:
    json.dump(meta, f)
  os.replace(os.path.join(out_dir, "checkpoint.json.tmp"),
             os.path.join(out_dir, "checkpoint.json"))


# Settings that do not change the computation: a checkpoint written with others still resumes.
_RUN_ONLY_FIELDS = ("steps", "backend", "timeout_s")


def _load_checkpoint(out_dir: str, abstract_state, shardings, cfg: TrainConfig):
  """(state, step, losses, aux_losses) from ``out_dir``, or None when there is no checkpoint."""
  import jax

  meta_path = os.path.join(out_dir, "checkpoint.json")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  saved = {k: v for k, v in meta["config"].items() if k not in _RUN_ONLY_FIELDS}
  now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_ONLY_FIELDS}
  if saved != now:
    diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
    raise ValueError(
        f"train_moe: the checkpoint in {out_dir} was written with other settings "
        f"(saved, now): {diff}; pass the same settings or another --out-dir.")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  keys = [jax.tree_util.keystr(path) for path, _ in leaves]
  if keys != meta["keys"]:
    raise ValueError(f"train_moe: the checkpoint in {out_dir} holds another model structure; "
                     f"use another --out-dir.")
  arrays = np.load(os.path.join(out_dir, "checkpoint.npz"))
  flat_shardings = jax.tree.leaves(shardings)
  values = []
  for i, ((_, ref), sharding) in enumerate(zip(leaves, flat_shardings)):
    host = arrays[f"a{i}"]
    if host.shape != ref.shape:
      raise ValueError(f"train_moe: checkpoint array {keys[i]} has shape {host.shape}, the "
                       f"model expects {ref.shape}; use another --out-dir.")
    values.append(jax.make_array_from_callback(
        ref.shape, sharding, lambda index, host=host, ref=ref: host[index].astype(ref.dtype)))
  state = jax.tree_util.tree_unflatten(treedef, values)
  return state, meta["step"], meta["losses"], meta["aux_losses"]


# -- diagnosing the triton backend ---------------------------------------------------------------


def _call_with_timeout(fn, seconds: float):
  """(True, fn()) or (False, exception / None when ``fn`` did not return within ``seconds``).

  Runs ``fn`` in a daemon thread: probes of the jax_ep runtime take the FFI library's lock,
  which a launch blocked inside the handler may hold.
  """
  import threading
  box = {}

  def target():
    try:
      box["value"] = fn()
    except Exception as e:  # noqa: BLE001 - reported to the caller
      box["error"] = e

  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(seconds)
  if t.is_alive():
    return False, None
  return ("error" not in box), box.get("value", box.get("error"))


def _launch_counts(wait_s: float = 5.0) -> str:
  """Symmetric launches per local GPU so far (the FFI handler's epochs), in rank order."""
  from jax_ep import runtime
  if not runtime.is_initialized():
    return "jax_ep runtime not initialized"
  ok, value = _call_with_timeout(
      lambda: [runtime.device_info(d)["epoch"] for d in runtime.devices()], wait_s)
  if ok:
    return f"jax_ep launches per GPU (rank order): {value}"
  if value is None:
    return (f"jax_ep FFI lock held for > {wait_s:.0f} s: a launch is blocked inside the "
            f"jax_ep FFI handler (first use of a kernel: its module load waiting for a "
            f"running kernel?)")
  return f"jax_ep launch counts unavailable ({type(value).__name__}: {value})"


def _triton_errors(wait_s: float) -> str | None:
  """The triton backend's recorded error (timeout / op mismatch) on any local GPU, or None.

  Reading the records synchronizes the GPUs, i.e. waits for running kernels to finish or
  time out; gives up after ``wait_s``.
  """
  from jax_ep import backends, runtime
  if not runtime.is_initialized():
    return None
  ok, value = _call_with_timeout(backends.get("triton").check_timeouts, wait_s)
  if ok:
    return None
  if value is None:
    return f"(error records not readable within {wait_s:.0f} s: the GPUs are still busy)"
  return f"{type(value).__name__}: {value}"


def _diagnose(wait_s: float) -> str:
  """What the triton runtime knows after a failure: error records and launch counts.

  The error records can only be read once the GPUs are idle (running kernels end by their
  own timeout); waits up to ``wait_s`` for that.
  """
  counts = _launch_counts()
  errors = _triton_errors(wait_s)
  return f"{errors or 'no error recorded by the kernels'}; {counts}"


class _Watchdog:
  """Prints what the jax_ep runtime is doing when the training loop makes no progress.

  ``beat(label)`` marks progress (``label`` names what the loop waits for next); ``pause()``
  stops the clock (compiling). Every ``period_s`` without a beat it prints the launch counts
  per GPU (or that the FFI lock is held); after ``abort_s`` it prints the kernels' error
  records and ends the process with status 3 (a hung GPU job never ends by itself).
  """

  def __init__(self, period_s: float, abort_s: float, timeout_s: float):
    import threading
    self.period_s, self.abort_s, self.timeout_s = period_s, abort_s, timeout_s
    self.label, self.since, self.reported = None, time.monotonic(), 0
    self.on_abort = None  # called with a message before the process ends
    self._stop = threading.Event()
    if period_s > 0 or abort_s > 0:
      threading.Thread(target=self._loop, daemon=True).start()

  def beat(self, label: str) -> None:
    self.label, self.since, self.reported = label, time.monotonic(), 0

  def pause(self) -> None:
    self.label = None

  def close(self) -> None:
    self._stop.set()

  def _say(self, msg: str) -> None:
    import jax
    print(f"[watchdog p{jax.process_index()}] {msg}", flush=True)

  def _loop(self) -> None:
    while not self._stop.wait(1.0):
      label = self.label
      if label is None:
        continue
      idle = time.monotonic() - self.since
      if self.period_s > 0 and idle >= (self.reported + 1) * self.period_s:
        self.reported += 1
        self._say(f"no progress for {idle:.0f} s (waiting for {label}); {_launch_counts()}")
      if self.abort_s > 0 and idle >= self.abort_s:
        msg = (f"no progress for {idle:.0f} s (waiting for {label}): aborting; "
               f"{_diagnose(min(self.timeout_s, 20.0))}")
        self._say(msg)
        try:
          if self.on_abort is not None:
            self.on_abort(f"watchdog: {msg}")
        finally:
          sys.stdout.flush()
          os._exit(3)


# -- warming up the triton kernels ---------------------------------------------------------------


def warm_up_kernels(model_opt, mesh, num_tokens: int, dtype, *, backend=None,
                    gmm_backend: str = "auto", lower_only: bool = False,
                    on_phase=None) -> None:
  """Run every jax_ep op of a training step once, each alone in its own program.

  The FFI handler loads a kernel's module into a GPU's context at its first launch. In one
  process driving several GPUs, that first launch can come while the same GPU still runs an
  earlier jax_ep kernel that waits for its peers, and the module load may wait for that kernel
  (a CUDA lazy-loading context synchronization) while holding the handler's lock, which the
  peers' threads need to launch: the op then only ends by its timeout. Launching each op alone
  first loads every module with no jax_ep kernel running.

  Args:
    model_opt: the (abstract) model; every ``jax_ep.nn.MoE`` in it is warmed up.
    mesh: the training mesh (axes "data", "ep").
    num_tokens: global tokens of one call of the blocks (batch x sequence).
    dtype: the compute dtype of the experts.
    backend: the jax_ep backend module (default: the triton backend).
    gmm_backend: the grouped matmul backend of the experts ("auto", "xla", "triton").
    lower_only: only trace and lower each program for CUDA (tests: which kernels it launches).
    on_phase: called as ``on_phase("compile" | "run", op)`` before each program is compiled
      and run (a watchdog's clock).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jax_ep.experts
  import jax_ep.nn
  from jax_ep import backends

  be = backend if backend is not None else backends.get("triton")
  spec = P(("data", "ep"))
  sharding = NamedSharding(mesh, spec)
  w_spec = P("ep")
  ep = mesh.shape["ep"]
  shards = mesh.shape["data"] * ep
  dtype = jnp.dtype(dtype)

  def stack(tree):
    return jax.tree.map(lambda a: a[None], tree)

  def unstack(tree):
    return jax.tree.map(lambda a: a[0], tree)

  def run(op, fn, in_specs, out_specs, *args):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                              check_vma=False))
    if lower_only:
      f.trace(*args).lower(lowering_platforms=("cuda",))
      return jax.eval_shape(f, *args)
    if on_phase:
      on_phase("compile", op)
    compiled = f.lower(*args).compile()
    if on_phase:
      on_phase("run", op)
    return jax.block_until_ready(compiled(*args))

  def put(a, sharding):  # a: the same numpy array on every process
    if lower_only:
      return jax.ShapeDtypeStruct(a.shape, a.dtype)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  seen = set()
  for _, moe in nnx.iter_modules(model_opt):
    if not isinstance(moe, jax_ep.nn.MoE):
      continue
    config = moe.ep_config(num_tokens, mesh)
    key = (config, moe.intermediate)
    if key in seen:
      continue
    seen.add(key)
    t, h, k, e = config.max_tokens_per_rank, config.hidden, config.topk, config.num_experts
    n = t * shards
    # Every token picks k different experts, spread over all ranks; weights 1/k.
    idx = (np.arange(n)[:, None] * k + np.arange(k)[None, :]) % e
    x = put(np.full((n, h), 0.01, np.float32).astype(dtype), sharding)
    ids = put(idx.astype(np.int32), sharding)
    weights = put(np.full((n, k), 1.0 / k, np.float32), sharding)

    def dispatch(x, ids, w, config=config):
      return stack(be.dispatch(x, ids, w, jnp.zeros((), jnp.int32), config))

    recv_x, _, layout = run("dispatch", dispatch, (spec,) * 3, spec, x, ids, weights)
    # combine (forward; also dispatch's backward with unit weights)
    run("combine", lambda y, lay, config=config: be.combine_rows(
        y[0], lay.row_weights[0], unstack(lay), config), (spec, spec), spec, recv_x, layout)
    run("combine (unit weights)", lambda y, lay, config=config: be.combine_rows(
        y[0], jnp.ones_like(lay.row_weights[0]), unstack(lay), config), (spec, spec), spec,
        recv_x, layout)
    # combine's backward: rows of d_out along the layout
    run("dispatch_rows",
        lambda d, lay, config=config: stack(be.dispatch_rows(d, unstack(lay), config)),
        (spec, spec), spec, x, layout)
    # dispatch's backward for the routing weights: per-slot gather
    run("gather_slots", lambda v, lay, config=config: be.gather_slots(v[0], unstack(lay), config),
        (spec, spec), spec, layout.row_weights, layout)
    # experts, forward and backward (no jax_ep communication in this program)
    f = moe.intermediate
    e_w = np.full((e, h, 2 * f), 0.01, np.float32).astype(dtype)  # gate | up, as MoE stores
    e_d = np.full((e, f, h), 0.01, np.float32).astype(dtype)
    w_sharding = NamedSharding(mesh, w_spec)
    wgu, wd = (put(a, w_sharding) for a in (e_w, e_d))

    def experts(y, lay, wgu, wd):
      lay = unstack(lay)

      def loss(y, wgu, wd):
        out = jax_ep.experts.swiglu_fused(y, wgu, wd, lay, backend=gmm_backend)
        return jnp.sum(out.astype(recv_x.dtype).astype(jnp.float32))

      grads = jax.grad(loss, argnums=(0, 1, 2))(y[0], wgu, wd)
      return jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32))[None], grads)

    run("experts", experts, (spec, spec, w_spec, w_spec), spec, recv_x, layout, wgu, wd)


class _KernelRecorder:
  """Records the Triton kernels that jax_ep compiles while tracing (``with recorder:``)."""

  def __init__(self):
    self.keys: dict[str, str] = {}

  def __enter__(self):
    from jax_ep import _compile
    self._module, self._original = _compile, _compile.compile_kernel

    def compile_kernel(*args, **kwargs):
      compiled = self._original(*args, **kwargs)
      self.keys[compiled.key] = compiled.name
      return compiled

    _compile.compile_kernel = compile_kernel
    return self

  def __exit__(self, *exc):
    self._module.compile_kernel = self._original
    return False


# -- training -----------------------------------------------------------------------------------


def loss_fn(model, batch):
  """Cross-entropy of next-byte prediction + the MoE auxiliary losses, and metrics:
  (loss, (cross-entropy, auxiliary loss, dropped rows, expert load busiest / mean))."""
  import jax.numpy as jnp
  import optax
  logits, aux = model(batch[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  aux_loss = jnp.sum(aux.loss)
  # Expert load balance: busiest expert / mean expert, averaged over layers (1 = perfect).
  load = aux.tokens_per_expert.astype(jnp.float32)  # [layers, experts]
  imbalance = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1.0))
  return ce + aux_loss, (ce, aux_loss, jnp.sum(aux.num_dropped), imbalance)


def make_train_step(graphdef, shardings, metrics_sharding):
  """The jitted training step ``(state, batch) -> (state, metrics)``: forward, backward, AdamW;
  ``state`` = (model, optimizer) state, donated and returned in ``shardings``."""
  import jax
  from flax import nnx

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grads, metrics = nnx.grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(step, donate_argnums=0, out_shardings=(shardings, metrics_sharding))


def _mode(mesh, provider: str | None) -> str:
  """How the job drives its devices, e.g. "1 process x 4 GPUs (peer)"."""
  import jax
  devices = list(mesh.devices.flat)
  local = sum(d.process_index == jax.process_index() for d in devices)
  kind = "GPU" if devices[0].platform == "gpu" else devices[0].platform.upper()
  procs = jax.process_count()
  text = (f"{procs} process{'es' if procs > 1 else ''} x {local} {kind}"
          f"{'s' if local > 1 else ''}")
  return f"{text} ({provider})" if provider else text


def train(cfg: TrainConfig, *, devices=None, out_dir: str | None = None, resume: bool = False,
          log_every: int = 50, ckpt_every: int = 0, progress: bool = True,
          compare_backends: tp.Sequence[str] = (), stop_after: int | None = None,
          data_parallel: int = 1, warmup_steps: int = 5, warmup_kernels: bool = False,
          watchdog_s: float = 0.0, stall_abort_s: float = 0.0,
          eval_batches: int = 4) -> TrainResult:
  """Train on ``devices`` (default: every device of every process) and return the loss curve.

  Args:
    cfg: model / data / optimisation settings.
    devices: the devices to train on (a subset of ``jax.devices()``); the batch is split
      over all of them, the experts over each EP group.
    out_dir: where checkpoints and ``metrics.json`` go (None: nowhere).
    resume: continue from ``out_dir``'s checkpoint when there is one.
    log_every: print loss and tokens/s every this many steps.
    ckpt_every: write a checkpoint every this many steps (0: only at the end).
    progress: show a progress bar (main process only).
    compare_backends: jax_ep backends to train with one after the other in this process, e.g.
      ``("xla", "triton")``: each run starts from the same parameters and sees the same
      batches; ``TrainResult.runs`` has each one's losses and tokens/s. The run with
      ``cfg.backend`` (else the last one) is the primary run: it alone resumes, checkpoints
      and evaluates. A failing run is recorded (``error``, ``diagnosis``) and the next one
      runs. Empty: one run with ``cfg.backend``.
    stop_after: stop (with a checkpoint) after this step although the schedule runs to
      ``cfg.steps``; a later ``resume`` continues exactly as if never stopped.
    data_parallel: D, EP groups: the devices form a (D, len(devices) / D) mesh ("data", "ep");
      every group holds all experts once (expert parallel inside, data parallel across).
    warmup_steps: steps at the start of each run left out of its tokens/s (at least the
      first, which includes module loads and first collectives).
    warmup_kernels: before a triton run, launch each jax_ep op once on its own
      (``warm_up_kernels``), so no kernel module is loaded while another kernel runs.
    watchdog_s: print the jax_ep runtime's state every this many seconds without progress
      (0: off).
    stall_abort_s: end the process (status 3) after this many seconds without progress
      (0: never); compilation does not count.
    eval_batches: held-out batches the primary run is evaluated on at the end (0: none).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  devices = list(jax.devices() if devices is None else devices)
  names = list(dict.fromkeys(compare_backends)) or [cfg.backend]
  for name in names:
    if name not in ("auto", "xla", "triton"):
      raise ValueError(f"train_moe: backend {name!r} must be one of auto, xla, triton.")
  primary = cfg.backend if cfg.backend in names else names[-1]
  if data_parallel < 1 or len(devices) % data_parallel:
    raise ValueError(f"train_moe: data_parallel={data_parallel} must divide the "
                     f"{len(devices)} devices; change --data-parallel or --devices.")
  ep_size = len(devices) // data_parallel
  if cfg.batch_size % len(devices):
    raise ValueError(f"train_moe: batch_size={cfg.batch_size} must be a multiple of the "
                     f"{len(devices)} devices; change --batch-size.")
  if cfg.num_experts % ep_size:
    raise ValueError(f"train_moe: num_experts={cfg.num_experts} must be a multiple of the EP "
                     f"size {ep_size}; change --num-experts.")
  if data_parallel > 1 and "triton" in names:
    raise ValueError("train_moe: the triton backend's runtime spans one EP group; use "
                     "--data-parallel 1 with it, or --backend xla.")
  # Rows of the mesh are EP groups of consecutive devices; mesh order = device order (the
  # triton runtime numbers its ranks the same way).
  mesh = jax.sharding.Mesh(np.array(devices).reshape(data_parallel, ep_size), ("data", "ep"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  is_main = _is_main()
  log = (lambda s: print(s, flush=True)) if is_main else (lambda s: None)

  corpus = load_corpus(cfg.corpus_bytes)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    # All processes must train on the same bytes (same Python version on every host).
    fingerprint = np.array([len(corpus), zlib.crc32(corpus.tobytes()) & 0x7FFFFFFF], np.int32)
    every = np.asarray(multihost_utils.process_allgather(fingerprint))  # [processes, 2]
    if not np.all(every == fingerprint):
      raise ValueError(
          f"train_moe: the processes read different corpora (length, crc32 per process: "
          f"{every.tolist()}); run the same Python version on every host.")
  split = int(len(corpus) * 0.95)
  train_data, eval_data = corpus[:split], corpus[split:]

  # Linear warm-up, then cosine decay to lr / 10 at the last step.
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup,
                                                max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))

  def init():
    model = build_model(cfg, mesh, cfg.seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with jax.set_mesh(mesh):
    abstract_model_opt = nnx.eval_shape(init)
    _, abstract_state = nnx.split(abstract_model_opt)
    specs = nnx.get_partition_spec(abstract_state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))

  batch_sharding = NamedSharding(mesh, P(("data", "ep")))
  replicated = NamedSharding(mesh, P())
  tokens_per_step = cfg.batch_size * cfg.seq_len

  def to_global(batch: np.ndarray):
    return jax.make_array_from_callback(batch.shape, batch_sharding, lambda i: batch[i])

  def make_step(graphdef):
    return make_train_step(graphdef, shardings, replicated)

  def make_eval(graphdef):
    @jax.jit
    def eval_step(state, batch):
      model, _ = nnx.merge(graphdef, state)
      return loss_fn(model, batch)[1][0]

    return eval_step

  runtime_started = _maybe_start_runtime(cfg, names, abstract_model_opt, mesh, log)
  provider = None
  if runtime_started:
    import jax_ep
    provider = jax_ep.runtime.provider()
  mode = _mode(mesh, provider)
  result = TrainResult(losses=[], aux_losses=[], eval_loss=float("nan"), tokens_per_s=0.0,
                       ep_size=ep_size, data_parallel=data_parallel,
                       num_processes=jax.process_count(), backend=primary, start_step=0,
                       mode=mode, warmup_steps=warmup_steps)
  watchdog = _Watchdog(watchdog_s, stall_abort_s, cfg.timeout_s)
  # Set when a triton run failed: its kernels may still wait for each other until they time
  # out, so the process runs nothing more on the GPUs (and does not shut the runtime down,
  # which would wait for them too); main() ends it with os._exit.
  poisoned = None

  def run_one(name: str) -> RunResult:
    nonlocal poisoned
    is_primary = name == primary
    resolved = _resolved_backend(name, cfg, abstract_model_opt, mesh, runtime_started)
    run = RunResult(backend=name, resolved=resolved, gmm_backend=_gmm_backend(resolved))
    if name == "triton" and not runtime_started:
      run.skipped = ("the triton runtime is not initialized here (needs GPUs and the jax_ep "
                     "FFI library)")
      log(f"backend triton: not run: {run.skipped}")
      return run
    if poisoned:
      run.skipped = f"a triton run failed before ({poisoned})"
      log(f"backend {name}: not run: {run.skipped}")
      return run
    log(f"== run: backend {name} -> dispatch/combine {resolved}, grouped matmul "
        f"{run.gmm_backend}; {mode}")
    set_backend(abstract_model_opt, name)
    graphdef, _ = nnx.split(abstract_model_opt)
    train_step, eval_step = make_step(graphdef), make_eval(graphdef)
    state, start_step, losses, aux_losses = None, 0, [], []
    try:
      with jax.set_mesh(mesh):
        if is_primary and resume and out_dir:
          restored = _load_checkpoint(out_dir, abstract_state, shardings, cfg)
          if restored is not None:
            state, start_step, losses, aux_losses = restored
            log(f"resumed from {out_dir} at step {start_step}")
        if state is None:
          # Parameters are created directly in their shards (the same values on any mesh).
          state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings)()
        run.losses, run.aux_losses = losses, aux_losses
        if is_primary:
          result.start_step = start_step
        if resolved == "triton" and warmup_kernels:
          t0 = time.perf_counter()
          warm = _KernelRecorder()

          def on_phase(phase, op):
            if phase == "compile":
              watchdog.pause()
            else:
              watchdog.beat(f"kernel warm-up: {op} ({name})")

          with warm:
            warm_up_kernels(abstract_model_opt, mesh, tokens_per_step, cfg.dtype,
                            gmm_backend="xla" if run.gmm_backend == "xla" else "auto",
                            on_phase=on_phase)
          watchdog.pause()
          log(f"kernels warmed up one op at a time ({len(warm.keys)} kernels, "
              f"{time.perf_counter() - t0:.1f} s)")
        end_step = cfg.steps if (stop_after is None or not is_primary) else min(cfg.steps,
                                                                                 stop_after)
        num_steps = end_step - start_step
        skip = max(1, min(warmup_steps, num_steps - 1))  # steps left out of tokens/s
        batch = to_global(sample_batch(train_data, start_step, cfg))
        t0 = time.perf_counter()
        lowered = _KernelRecorder()
        with lowered:
          step_fn = train_step.lower(state, batch).compile()
        run.compile_s = time.perf_counter() - t0
        if resolved == "triton" and warmup_kernels:
          missing = sorted(set(lowered.keys) - set(warm.keys))
          if missing:
            log(f"warning: the warm-up did not launch {len(missing)} kernel(s) of the "
                f"training step: {[lowered.keys[k] for k in missing]}")
        log(f"training step compiled in {run.compile_s:.1f} s")
        bar = _progress(cfg.steps, start_step, progress and is_main)
        if not is_main:
          bar.write = lambda s: None
        pending = []  # device scalars not yet fetched (fetching every step syncs every step)
        t_log = t_timed = None
        steps_logged = 0

        def flush():
          nonlocal pending
          if pending:
            fetched = jax.device_get(pending)
            losses.extend(float(m[0]) for m in fetched)
            aux_losses.extend(float(m[1]) for m in fetched)
            pending = []

        def on_abort(msg, run=run, name=name):
          run.error = msg
          result.runs[name] = dataclasses.asdict(run)
          if out_dir and is_main:
            write_metrics(out_dir, cfg, result)

        watchdog.on_abort = on_abort
        for step in range(start_step, end_step):
          if step > start_step:
            batch = to_global(sample_batch(train_data, step, cfg))
          watchdog.beat(f"step {step + 1} ({name})")
          state, metrics = step_fn(state, batch)
          pending.append(metrics)
          bar.update(1)
          done = step + 1 - start_step  # steps run so far in this run
          if done == 1:
            jax.block_until_ready(metrics)
            run.first_step_s = time.perf_counter() - t0 - run.compile_s
            if resolved == "triton":
              err = _triton_errors(3 * cfg.timeout_s + 10)
              if err:
                raise TimeoutError(f"after the first step: {err}")
            log(f"first step ran in {run.first_step_s:.2f} s")
            flush()
            t_log, steps_logged = time.perf_counter(), done
          if done == skip and num_steps > 1:
            jax.block_until_ready(metrics)
            t_timed = time.perf_counter()
          last = step + 1 == end_step
          if (step + 1) % log_every == 0 or last:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            flush()
            tok_s = (done - steps_logged) * tokens_per_step / max(now - t_log, 1e-9)
            t_log, steps_logged = now, done
            dropped, imbalance = jax.device_get((metrics[2], metrics[3]))
            msg = (f"step {step + 1:5d}/{cfg.steps} | loss {losses[-1]:.4f} | aux "
                   f"{aux_losses[-1]:.4f} | {tok_s:,.0f} tok/s | expert load max/mean "
                   f"{float(imbalance):.2f} | dropped {int(dropped)}")
            bar.set_postfix_str(f"loss {losses[-1]:.3f}, {tok_s:,.0f} tok/s")
            bar.write(msg)
          if is_primary and out_dir and ckpt_every and (step + 1) % ckpt_every == 0 and not last:
            flush()
            _save_checkpoint(out_dir, state, step + 1, cfg, losses, aux_losses)
        jax.block_until_ready(state)
        t_end = time.perf_counter()
        flush()
        bar.close()
        watchdog.pause()
        if resolved == "triton":
          err = _triton_errors(3 * cfg.timeout_s + 10)
          if err:
            raise TimeoutError(f"after training: {err}")
        if t_timed is not None and num_steps > skip:
          run.timed_steps = num_steps - skip
          run.tokens_per_s = run.timed_steps * tokens_per_step / max(t_end - t_timed, 1e-9)
        if jax.process_count() > 1:
          from jax.experimental import multihost_utils
          every = multihost_utils.process_allgather(np.array([run.tokens_per_s], np.float64))
          run.per_process_tokens_per_s = [float(v) for v in np.asarray(every).reshape(-1)]
        print(f"process {jax.process_index()}: backend {name}: {run.tokens_per_s:,.0f} tokens/s "
              f"over {run.timed_steps} steps after {skip} warm-up step(s)", flush=True)
        if is_primary and out_dir and end_step > start_step:
          _save_checkpoint(out_dir, state, end_step, cfg, losses, aux_losses)
        if is_primary and eval_batches > 0:
          batches = [to_global(sample_batch(eval_data, 10_000_000 + i, cfg))
                     for i in range(eval_batches)]
          eval_fn = eval_step.lower(state, batches[0]).compile()
          watchdog.beat(f"held-out evaluation ({name})")
          eval_losses = [float(jax.device_get(eval_fn(state, b))) for b in batches]
          run.eval_loss = float(np.mean(eval_losses))
          watchdog.pause()
          log(f"held-out loss {run.eval_loss:.4f} nats/byte "
              f"({run.eval_loss / math.log(2):.3f} bits/byte)")
    except Exception as e:  # noqa: BLE001 - recorded; re-raised below when nothing else runs
      watchdog.pause()
      run.error = f"{type(e).__name__}: {e}"[:4000]
      if resolved == "triton":
        poisoned = run.error[:200]
        run.diagnosis = _diagnose(min(cfg.timeout_s, 20.0))
      print(f"process {jax.process_index()}: backend {name} failed: {run.error}", flush=True)
      if run.diagnosis:
        print(f"process {jax.process_index()}: diagnosis: {run.diagnosis}", flush=True)
      if jax.process_count() > 1:
        # The other processes may wait in a collective that this one will never reach: end
        # now (the launcher stops the rest). No atexit hooks: NVSHMEM's would wait for peers.
        if out_dir and is_main:
          result.runs[name] = dataclasses.asdict(run)
          result.failed = True
          write_metrics(out_dir, cfg, result)
        sys.stdout.flush()
        os._exit(1)
      if len(names) == 1 and not poisoned:
        raise  # a failed triton run is returned instead (result.gpu_state_unknown)
    return run

  try:
    for name in names:
      run = run_one(name)
      result.runs[name] = dataclasses.asdict(run)
      if run.error is None and run.timed_steps:
        result.backend_tokens_per_s[name] = run.tokens_per_s
      # The top-level fields: the primary run, else (skipped) the first run that trained.
      if run.losses and (name == primary or not result.losses):
        result.losses, result.aux_losses = run.losses, run.aux_losses
        result.tokens_per_s = run.tokens_per_s
        result.backend = run.resolved
        if run.eval_loss is not None:
          result.eval_loss = run.eval_loss
      rates = result.backend_tokens_per_s
      if "triton" in rates and "xla" in rates and rates["xla"] > 0:
        result.tokens_per_s_ratio = rates["triton"] / rates["xla"]
      if out_dir and is_main:  # after every run, so a job stopped later keeps what ran
        write_metrics(out_dir, cfg, result)
  finally:
    watchdog.close()
    set_backend(abstract_model_opt, cfg.backend)
    if runtime_started and not poisoned:
      import jax_ep
      jax_ep.runtime.shutdown()
  result.failed = poisoned is not None or any(r["error"] for r in result.runs.values())
  result.gpu_state_unknown = poisoned is not None
  return result


def write_metrics(out_dir: str, cfg: TrainConfig, result: TrainResult) -> str:
  """``metrics.json`` in ``out_dir``: the config, the result and the environment of the run."""
  os.makedirs(out_dir, exist_ok=True)
  env = {k: os.environ.get(k) for k in _REPORTED_ENV}
  path = os.path.join(out_dir, "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(dict(config=dataclasses.asdict(cfg), env=env, **dataclasses.asdict(result)), f)
  os.replace(path + ".tmp", path)
  return path


_REPORTED_ENV = ("JAX_EP_CHECK_TIMEOUTS", "CUDA_MODULE_LOADING", "CUDA_LAUNCH_BLOCKING",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION", "NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE",
                 "XLA_FLAGS")


def _moe_configs(cfg: TrainConfig, model_opt, mesh):
  """The EPConfigs of the model's MoE blocks at this batch (what the triton runtime sizes for)."""
  from flax import nnx

  import jax_ep.nn
  return sorted({module.ep_config(cfg.batch_size * cfg.seq_len, mesh)
                 for _, module in nnx.iter_modules(model_opt)
                 if isinstance(module, jax_ep.nn.MoE)}, key=repr)


def _resolved_backend(name: str, cfg: TrainConfig, model_opt, mesh,
                      runtime_started: bool) -> str:
  """The backend the MoE blocks will really use ("auto" resolved as jax_ep resolves it)."""
  if name != "auto":
    return name
  if not runtime_started:
    return "xla"
  from jax_ep import backends
  triton = backends.get("triton")
  return "triton" if all(triton.usable(c) for c in _moe_configs(cfg, model_opt, mesh)) else "xla"


def _gmm_backend(resolved: str) -> str:
  """The grouped matmul's backend inside the experts (the MoE layer picks "auto" unless xla)."""
  import jax
  if resolved == "xla" or jax.default_backend() != "gpu":
    return "xla"
  try:
    from jax_ep import backends
    return "triton" if backends.get("triton").gmm_usable() else "xla"
  except Exception:  # noqa: BLE001 - no triton here
    return "xla"


def _maybe_start_runtime(cfg: TrainConfig, names, model_opt, mesh, log) -> bool:
  """Initialize jax_ep's triton runtime when a run asks for it ("triton") or may use it ("auto"
  on GPU). Raises when it cannot start and ``cfg.backend`` is "triton" and the only run."""
  import jax

  import jax_ep

  on_gpu = jax.default_backend() == "gpu"
  if not any(n == "triton" or (n == "auto" and on_gpu) for n in names):
    return False
  if mesh.shape["data"] > 1:  # the runtime spans one EP group ("triton" was refused earlier)
    log("jax_ep triton runtime not started: --data-parallel > 1; using the xla backend")
    return False
  # One process: the peer provider over exactly the mesh's GPUs, in mesh (= rank) order.
  # Several processes: the NVSHMEM provider, one GPU per process.
  devices = list(mesh.devices.flat) if jax.process_count() == 1 else None
  try:
    jax_ep.runtime.initialize(_moe_configs(cfg, model_opt, mesh), devices=devices)
  except Exception as e:  # noqa: BLE001 - "auto" falls back, "triton" re-raises
    if names == ["triton"]:
      raise
    log(f"jax_ep triton runtime not started ({type(e).__name__}: {e}); using the xla backend")
    return False
  log(f"jax_ep triton runtime initialized ({jax_ep.runtime.provider()} provider, "
      f"{jax_ep.runtime.world_size()} ranks, kernel timeout {cfg.timeout_s} s, "
      f"JAX_EP_CHECK_TIMEOUTS={os.environ.get('JAX_EP_CHECK_TIMEOUTS', '1')})")
  return True


def results_table(result: TrainResult) -> str:
  """A text table: backend, mode, tokens/s, final loss, first step and compile times, status."""
  rows = [("backend", "dispatch/gmm", "mode", "tokens/s", "final loss", "first step s",
           "compile s", "status")]
  for name, r in result.runs.items():
    final = r["losses"][-1] if r["losses"] else float("nan")
    rows.append((name, f"{r['resolved']}/{r['gmm_backend']}", result.mode,
                 f"{r['tokens_per_s']:,.0f}", f"{final:.4f}", f"{r['first_step_s']:.2f}",
                 f"{r['compile_s']:.1f}",
                 "FAILED" if r["error"] else ("skipped" if r["skipped"] else "ok")))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  if result.tokens_per_s_ratio is not None:
    lines.append(f"tokens/s triton / xla: {result.tokens_per_s_ratio:.3f}")
  return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def _initialize_processes(cpu_devices: int | None) -> None:
  """Join a multi-process job when the environment describes one.

  ``JAX_NUM_PROCESSES`` > 1 (set by examples/multihost/launch.py, or by hand on each host):
  use JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID / JAX_LOCAL_DEVICE_IDS. Under SLURM or Open MPI
  with several tasks, let ``jax.distributed.initialize()`` read the cluster's own variables.
  """
  import jax

  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  cluster_tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=num_processes,
        process_id=int(os.environ["JAX_PROCESS_ID"]),
        local_device_ids=[int(i) for i in local.split(",")] if local else None)
  elif "JAX_NUM_PROCESSES" not in os.environ and cluster_tasks > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


def _plot(result: TrainResult, path: str, title: str) -> bool:
  """Training loss per step of every run (one curve per backend), smoothed, and held-out."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  for i, (name, run) in enumerate(result.runs.items()):
    losses = np.asarray(run["losses"])
    if not len(losses):
      continue
    color = f"C{i}"
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    rate = f", {run['tokens_per_s']:,.0f} tok/s" if run["tokens_per_s"] else ""
    failed = " (FAILED)" if run["error"] else ""
    ax.plot(np.arange(1, len(losses) + 1), losses, color=color, alpha=0.25)
    ax.plot(np.arange(window, len(losses) + 1), smooth, color=color,
            label=f"{name}: {run['resolved']} dispatch, {run['gmm_backend']} gmm{rate}{failed}")
  if np.isfinite(result.eval_loss):
    ax.axhline(result.eval_loss, color="k", ls="--", lw=1,
               label=f"held-out {result.eval_loss:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / byte)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  for field in dataclasses.fields(TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    if field.type in ("bool", bool):
      p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
    else:
      kind = {"int": int, "float": float, "str": str}[str(field.type)]
      p.add_argument(flag, type=kind, default=None)
  p.add_argument("--devices", type=int, default=None,
                 help="train on the first N devices (default: all devices of all processes)")
  p.add_argument("--data-parallel", type=int, default=1,
                 help="D EP groups of devices / D consecutive devices each (default 1: "
                      "one EP group over all devices)")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="virtual CPU devices per process (default: $JAX_NUM_CPU_DEVICES or 8)")
  p.add_argument("--out-dir", default="runs/train_moe")
  p.add_argument("--resume", action="store_true", help="continue from --out-dir's checkpoint")
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--ckpt-every", type=int, default=0)
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop after this step (checkpointed); --resume later continues")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--compare-backends", default="",
                 help="comma list of backends to train with one after the other in this "
                      "process (same initial parameters, same batches), e.g. xla,triton")
  p.add_argument("--eval-batches", type=int, default=4,
                 help="held-out batches evaluated at the end (0: no evaluation)")
  p.add_argument("--warmup-steps", type=int, default=5,
                 help="steps at the start of each run left out of its tokens/s (default 5)")
  p.add_argument("--check-timeouts", type=int, choices=(0, 1), default=None,
                 help="JAX_EP_CHECK_TIMEOUTS: 1 raises a timed-out triton op at once (a host "
                      "callback and stream sync per op), 0 checks the kernels' error records "
                      "after the first step and at the end (default: the environment's, else 1)")
  p.add_argument("--warmup-kernels", action="store_true",
                 help="before a triton run, launch each jax_ep op once on its own, so that no "
                      "kernel module is loaded while another jax_ep kernel runs")
  p.add_argument("--watchdog-s", type=float, default=60.0,
                 help="print the jax_ep runtime's launch counts every this many seconds "
                      "without progress (0: off)")
  p.add_argument("--stall-abort-s", type=float, default=0.0,
                 help="end the process (status 3) after this many seconds without progress, "
                      "with the kernels' error records (0: never)")
  return p.parse_args(argv)


def main(argv=None) -> TrainResult:
  args = parse_args(argv)
  if importlib.util.find_spec("jax_ep") is None:
    # Run from a source checkout without installing: use the checkout's jax_ep (found
    # without importing it: jax must not start before the settings below).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name) is not None}
  cfg = TrainConfig(**{**PRESETS[args.preset], **overrides})
  compare = [b for b in args.compare_backends.split(",") if b]
  if args.check_timeouts is not None:
    os.environ["JAX_EP_CHECK_TIMEOUTS"] = str(args.check_timeouts)
  if any(b != "xla" for b in [cfg.backend, *compare]):
    # The triton runtime's symmetric memory lives outside XLA's pool (docs/RUNTIME.md); these
    # must be set before jax starts. No effect on CPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
    # Virtual CPU devices are threads: on a busy machine with few cores one of them can miss
    # XLA:CPU's 40 s collective rendezvous deadline, which aborts the process. Wait longer.
    os.environ["XLA_FLAGS"] = (
        flags + " --xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
  cpu_devices = args.cpu_devices
  if cpu_devices is None and "JAX_NUM_CPU_DEVICES" not in os.environ:
    cpu_devices = 8  # a CPU-only machine gets 8 virtual devices; GPUs are unaffected
  _initialize_processes(cpu_devices)

  import jax
  devices = jax.devices()
  if args.devices is not None:
    devices = devices[:args.devices]
  if _is_main():
    groups = (f"{args.data_parallel} EP groups of {len(devices) // args.data_parallel}"
              if args.data_parallel > 1 else f"EP over {len(devices)} device(s)")
    print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.process_count()} process(es), "
          f"{groups}; config {dataclasses.asdict(cfg)}", flush=True)
  result = train(cfg, devices=devices, out_dir=args.out_dir, resume=args.resume,
                 log_every=args.log_every, ckpt_every=args.ckpt_every,
                 progress=not args.no_progress, compare_backends=compare,
                 stop_after=args.stop_after, data_parallel=args.data_parallel,
                 warmup_steps=args.warmup_steps, warmup_kernels=args.warmup_kernels,
                 watchdog_s=args.watchdog_s, stall_abort_s=args.stall_abort_s,
                 eval_batches=args.eval_batches)
  if _is_main():
    write_metrics(args.out_dir, cfg, result)
    title = (f"MoE LM, {cfg.num_layers}x{cfg.d_model}, {cfg.num_experts} experts top-"
             f"{cfg.topk}, EP={result.ep_size}"
             f"{f' x DP={result.data_parallel}' if result.data_parallel > 1 else ''}, "
             f"{result.mode}")
    png = os.path.join(args.out_dir, "loss.png")
    if _plot(result, png, title):
      print(f"loss plot: {png}")
    else:
      print("matplotlib is not installed: no plot (metrics.json has the losses)")
    print(results_table(result), flush=True)
    if result.losses:
      held_out = f", held-out {result.eval_loss:.4f}" if np.isfinite(result.eval_loss) else ""
      print(f"final loss {result.losses[-1]:.4f}{held_out}, {result.tokens_per_s:,.0f} "
            f"tokens/s", flush=True)
  if result.gpu_state_unknown:
    # A failed triton run may leave kernels waiting on the GPUs: skip the exit hooks (the
    # runtime's shutdown would wait for them); the driver ends them with the process.
    sys.stdout.flush()
    os._exit(1)
  if result.failed and __name__ == "__main__":
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
