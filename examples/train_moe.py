"""Train a small Mixture-of-Experts transformer language model with jax_ep expert parallelism.

The corpus is the Python standard library's own source code, read byte by byte (a character-
level model over 256 byte values), so it is on every machine that runs this script and needs no
download. Every MoE block splits its experts and the batch over one mesh axis ("ep") spanning
all devices of all processes (``--data-parallel D``: D such EP groups side by side); attention
and embeddings are replicated (data parallel over the same devices). One jit-compiled step:
forward, cross-entropy + MoE auxiliary losses, backward, AdamW.

  CPU, 8 virtual devices, a few minutes:
    python examples/train_moe.py --preset cpu
  GPUs, one process driving every local GPU (xla backend, or triton when its runtime starts),
  then tokens/s of both backends in the same run:
    python examples/train_moe.py --preset gpu --backend auto --compare-backends xla,triton
  One process per device (CPU or GPU), here or on a cluster: see examples/multihost/README.md
    python examples/multihost/launch.py --num-processes 4 --gpus -- \
        examples/train_moe.py --preset gpu --backend auto

Output (``--out-dir``): ``loss.png`` (training loss curve), ``metrics.json`` (per-step loss,
tokens/s, final held-out loss), ``checkpoint.npz`` + ``checkpoint.json`` (resume with
``--resume``).

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
class TrainResult:
  """What ``train`` returns (and ``metrics.json`` holds)."""

  losses: list[float]  # cross-entropy (nats/byte) of each step's training batch
  aux_losses: list[float]  # sum over layers of the MoE auxiliary loss
  eval_loss: float  # cross-entropy on held-out batches after training
  tokens_per_s: float  # after the first (compiling) step
  ep_size: int
  data_parallel: int
  num_processes: int
  backend: str  # the backend the MoE blocks were configured with
  start_step: int  # > 0 when resumed from a checkpoint
  backend_tokens_per_s: dict[str, float] = dataclasses.field(default_factory=dict)


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


def _load_checkpoint(out_dir: str, abstract_state, shardings, cfg: TrainConfig):
  """(state, step, losses, aux_losses) from ``out_dir``, or None when there is no checkpoint."""
  import jax

  meta_path = os.path.join(out_dir, "checkpoint.json")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  saved = {k: v for k, v in meta["config"].items() if k not in ("steps", "backend")}
  now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "backend")}
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


def train(cfg: TrainConfig, *, devices=None, out_dir: str | None = None, resume: bool = False,
          log_every: int = 50, ckpt_every: int = 0, progress: bool = True,
          compare_backends: tp.Sequence[str] = (), bench_steps: int = 20,
          stop_after: int | None = None, data_parallel: int = 1) -> TrainResult:
  """Train on ``devices`` (default: every device of every process) and return the loss curve.

  Args:
    cfg: model / data / optimisation settings.
    devices: the devices to train on (a subset of ``jax.devices()``); the batch is split
      over all of them, the experts over each EP group.
    out_dir: where checkpoints go (None: no checkpoints).
    resume: continue from ``out_dir``'s checkpoint when there is one.
    log_every: print loss and tokens/s every this many steps.
    ckpt_every: write a checkpoint every this many steps (0: only at the end).
    progress: show a progress bar (main process only).
    compare_backends: after training, time ``bench_steps`` steps with each of these jax_ep
      backends (e.g. ``("xla", "triton")``) in this process and report tokens/s.
    bench_steps: steps timed per backend in ``compare_backends``.
    stop_after: stop (with a checkpoint) after this step although the schedule runs to
      ``cfg.steps``; a later ``resume`` continues exactly as if never stopped.
    data_parallel: D, EP groups: the devices form a (D, len(devices) / D) mesh ("data", "ep");
      every group holds all experts once (expert parallel inside, data parallel across).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  devices = list(jax.devices() if devices is None else devices)
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
  if data_parallel > 1 and cfg.backend == "triton":
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
    graphdef, abstract_state = nnx.split(abstract_model_opt)
    specs = nnx.get_partition_spec(abstract_state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
    state = None
    start_step, losses, aux_losses = 0, [], []
    if resume and out_dir:
      restored = _load_checkpoint(out_dir, abstract_state, shardings, cfg)
      if restored is not None:
        state, start_step, losses, aux_losses = restored
        log(f"resumed from {out_dir} at step {start_step}")
    if state is None:
      # Parameters are created directly in their shards (the same values on any mesh).
      state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings)()

  batch_sharding = NamedSharding(mesh, P(("data", "ep")))
  replicated = NamedSharding(mesh, P())

  def to_global(batch: np.ndarray):
    return jax.make_array_from_callback(batch.shape, batch_sharding, lambda i: batch[i])

  def loss_fn(model, batch):
    logits, aux = model(batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    aux_loss = jnp.sum(aux.loss)
    # Expert load balance: busiest expert / mean expert, averaged over layers (1 = perfect).
    load = aux.tokens_per_expert.astype(jnp.float32)  # [layers, experts]
    imbalance = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1.0))
    return ce + aux_loss, (ce, aux_loss, jnp.sum(aux.num_dropped), imbalance)

  def make_step(graphdef):
    def step(state, batch):
      model, optimizer = nnx.merge(graphdef, state)
      grads, metrics = nnx.grad(loss_fn, has_aux=True)(model, batch)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, replicated))

  @jax.jit
  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return loss_fn(model, batch)[1][0]

  runtime_started = _maybe_start_runtime(cfg, abstract_model_opt, mesh, log)
  backend = _resolved_backend(cfg, abstract_model_opt, mesh, runtime_started)
  log(f"jax_ep backend: {backend} (asked for {cfg.backend!r})")
  train_step = make_step(graphdef)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  bar = _progress(cfg.steps, start_step, progress and is_main)
  if not is_main:
    bar.write = lambda s: None
  pending = []  # device scalars not yet fetched (fetching every step would sync every step)
  t_mark, steps_timed, time_timed = None, 0, 0.0

  def flush():
    nonlocal pending
    if pending:
      fetched = jax.device_get(pending)
      losses.extend(float(m[0]) for m in fetched)
      aux_losses.extend(float(m[1]) for m in fetched)
      pending = []

  with jax.set_mesh(mesh):
    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start_step, end_step):
      batch = to_global(sample_batch(train_data, step, cfg))
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      bar.update(1)
      if step == start_step:
        jax.block_until_ready(metrics)  # the first step compiles: time from here on
        t_mark = time.perf_counter()
        flush()
      last = step + 1 == end_step
      if (step + 1) % log_every == 0 or last:
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        n = step - start_step  # steps since the timer started
        flush()
        tok_s = (n - steps_timed) * tokens_per_step / max(now - t_mark - time_timed, 1e-9)
        steps_timed, time_timed = n, now - t_mark
        dropped, imbalance = jax.device_get((metrics[2], metrics[3]))
        msg = (f"step {step + 1:5d}/{cfg.steps} | loss {losses[-1]:.4f} | aux "
               f"{aux_losses[-1]:.4f} | {tok_s:,.0f} tok/s | expert load max/mean "
               f"{float(imbalance):.2f} | dropped {int(dropped)}")
        bar.set_postfix_str(f"loss {losses[-1]:.3f}, {tok_s:,.0f} tok/s")
        bar.write(msg)
      if out_dir and ckpt_every and (step + 1) % ckpt_every == 0 and not last:
        flush()
        _save_checkpoint(out_dir, state, step + 1, cfg, losses, aux_losses)
    flush()
    bar.close()
    if out_dir and end_step > start_step:
      _save_checkpoint(out_dir, state, end_step, cfg, losses, aux_losses)

    eval_losses = []
    for i in range(4):
      batch = sample_batch(eval_data, 10_000_000 + i, cfg)
      eval_losses.append(float(jax.device_get(eval_step(state, to_global(batch)))))
    eval_loss = float(np.mean(eval_losses))
    log(f"held-out loss {eval_loss:.4f} nats/byte ({eval_loss / math.log(2):.3f} bits/byte)")

    tokens_per_s = (steps_timed * tokens_per_step / time_timed) if time_timed > 0 else 0.0
    result = TrainResult(losses=losses, aux_losses=aux_losses, eval_loss=eval_loss,
                         tokens_per_s=tokens_per_s, ep_size=ep_size,
                         data_parallel=data_parallel,
                         num_processes=jax.process_count(), backend=backend,
                         start_step=start_step)

    for name in compare_backends:
      if name == "triton" and not runtime_started:
        log("backend triton: not timed (its runtime is not initialized; run with "
            "--backend triton or auto on GPUs)")
        continue
      model_opt = nnx.merge(graphdef, jax.eval_shape(lambda s: s, state))
      set_backend(model_opt, name)
      bench_graphdef, _ = nnx.split(model_opt)
      bench_step = make_step(bench_graphdef)
      try:
        state, metrics = bench_step(state, to_global(sample_batch(train_data, 0, cfg)))
        jax.block_until_ready(metrics)  # compile + one step
        t0 = time.perf_counter()
        for i in range(bench_steps):
          state, metrics = bench_step(state, to_global(sample_batch(train_data, i + 1, cfg)))
        jax.block_until_ready(metrics)
      except Exception as e:  # noqa: BLE001 - report and time the other backends
        log(f"backend {name}: failed ({type(e).__name__}: {e})")
        continue
      rate = bench_steps * tokens_per_step / (time.perf_counter() - t0)
      result.backend_tokens_per_s[name] = rate
      log(f"backend {name}: {rate:,.0f} tokens/s ({bench_steps} steps after training, "
          f"loss {float(jax.device_get(metrics[0])):.4f})")

  if runtime_started:
    import jax_ep
    jax_ep.runtime.shutdown()
  return result


def _moe_configs(cfg: TrainConfig, model_opt, mesh):
  """The EPConfigs of the model's MoE blocks at this batch (what the triton runtime sizes for)."""
  from flax import nnx

  import jax_ep.nn
  return sorted({module.ep_config(cfg.batch_size * cfg.seq_len, mesh)
                 for _, module in nnx.iter_modules(model_opt)
                 if isinstance(module, jax_ep.nn.MoE)}, key=repr)


def _resolved_backend(cfg: TrainConfig, model_opt, mesh, runtime_started: bool) -> str:
  """The backend the MoE blocks will really use ("auto" resolved as jax_ep resolves it)."""
  if cfg.backend != "auto":
    return cfg.backend
  if not runtime_started:
    return "xla"
  from jax_ep import backends
  triton = backends.get("triton")
  return "triton" if all(triton.usable(c) for c in _moe_configs(cfg, model_opt, mesh)) else "xla"


def _maybe_start_runtime(cfg: TrainConfig, model_opt, mesh, log) -> bool:
  """Initialize jax_ep's triton runtime when asked for ("triton") or possible ("auto" on GPU)."""
  import jax

  import jax_ep

  if cfg.backend == "xla" or (cfg.backend == "auto" and jax.default_backend() != "gpu"):
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
    if cfg.backend == "triton":
      raise
    log(f"jax_ep triton runtime not started ({type(e).__name__}: {e}); using the xla backend")
    return False
  log("jax_ep triton runtime initialized")
  return True


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
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  losses = np.asarray(result.losses)
  window = max(1, len(losses) // 50)
  smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  ax.plot(np.arange(1, len(losses) + 1), losses, alpha=0.3, label="loss per step")
  ax.plot(np.arange(window, len(losses) + 1), smooth, label=f"mean of {window} steps")
  ax.axhline(result.eval_loss, color="k", ls="--", lw=1,
             label=f"held-out {result.eval_loss:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / byte)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
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
                 help="comma list of backends to time after training, e.g. xla,triton")
  p.add_argument("--bench-steps", type=int, default=20)
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
  if cfg.backend != "xla":
    # The triton runtime's symmetric memory lives outside XLA's pool (docs/RUNTIME.md); these
    # must be set before jax starts. No effect on CPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
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
                 progress=not args.no_progress,
                 compare_backends=[b for b in args.compare_backends.split(",") if b],
                 bench_steps=args.bench_steps, stop_after=args.stop_after,
                 data_parallel=args.data_parallel)
  if _is_main():
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
      json.dump(dict(config=dataclasses.asdict(cfg), **dataclasses.asdict(result)), f)
    title = (f"MoE LM, {cfg.num_layers}x{cfg.d_model}, {cfg.num_experts} experts top-"
             f"{cfg.topk}, EP={result.ep_size}"
             f"{f' x DP={result.data_parallel}' if result.data_parallel > 1 else ''}, "
             f"{result.backend}")
    png = os.path.join(args.out_dir, "loss.png")
    if _plot(result, png, title):
      print(f"loss plot: {png}")
    else:
      print("matplotlib is not installed: no plot (metrics.json has the losses)")
    print(f"final loss {result.losses[-1]:.4f}, held-out {result.eval_loss:.4f}, "
          f"{result.tokens_per_s:,.0f} tokens/s", flush=True)
  return result


if __name__ == "__main__":
  main()
