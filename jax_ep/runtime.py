"""Runtime of the triton backend: symmetric memory outside XLA, shared by every GPU of the EP group.

Call ``initialize(configs)`` once (after ``jax.distributed.initialize()`` in a one-process-per-GPU
run), before jitting anything that uses the triton backend; ``shutdown()`` releases it (it is also
registered with ``atexit``). Details and the symmetric-region layout: docs/RUNTIME.md.

Providers (one pointer-table interface, picked by ``provider="auto"``):
  * ``"nvshmem"`` -- one process per GPU, one or many hosts (``jax.process_count() > 1``).
    NVSHMEM's unique id travels through JAX's coordination service; each process allocates its
    region with one ``nvshmem_malloc``; ``sym_table[r] = nvshmem_ptr(region, r)`` (0 for a rank
    that is not load/store reachable, i.e. on another node). Rank = ``jax.process_index()``.
  * ``"peer"`` -- one process driving all its local GPUs. One CUDA VMM allocation per device,
    mapped read/write for every other device. Rank of a device = its position in ``devices``
    (default ``jax.local_devices()``); the EP mesh axis must list devices in that order.

Region layout (per rank; every rank's is the same size):
  [ runtime exchange area: EXCHANGE_BYTES ][ backend region: symmetric_bytes() ]
                                           ^ sym_table[r] points here
The backend region starts at ``sym_table[r]`` and belongs to the triton backend's kernels (its
layout is theirs: kernels/ep_sync.py); the exchange area, at byte offset ``EXCHANGE_OFFSET``
(negative) from ``sym_table[r]``, belongs to ``jax_ep.launch.all_gather_int32``. Everything is
zero after ``initialize``.

JAX memory settings: XLA preallocates 75% of each GPU by default. The symmetric memory is
allocated outside that pool, so the rest must hold it: lower ``XLA_PYTHON_CLIENT_MEM_FRACTION``
(e.g. 0.6) or set ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` if ``initialize`` reports that memory
ran out. NVSHMEM's heap per GPU is ``NVSHMEM_SYMMETRIC_SIZE`` (default 1 GiB), read when NVSHMEM
initializes (the first ``initialize`` of the process). This module sets only
``NVSHMEM_DISABLE_NVLS=1`` (when unset): jax_ep never uses NVLink multicast. Keep XLA's own
``--xla_gpu_experimental_enable_nvshmem`` off.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
from collections.abc import Iterable, Sequence

from jax_ep.config import align_up

EXCHANGE_BYTES = 1 << 20
"""Bytes of the runtime's own exchange area in each rank's region."""
EXCHANGE_OFFSET = -EXCHANGE_BYTES
"""Byte offset of the exchange area from ``sym_table[r]`` (it sits just below the backend region)."""
NVSHMEM_HEAP_RESERVE = 64 << 20
"""Bytes of NVSHMEM's heap kept free for NVSHMEM's own use (barriers, signals)."""
_REGION_ALIGN = 1 << 21


class RuntimeNotInitializedError(RuntimeError):
  """The triton backend was used before ``jax_ep.runtime.initialize``."""


@dataclasses.dataclass(frozen=True)
class _State:
  provider: str
  world: int
  rank: int | None                  # this process's rank (nvshmem); None for peer
  devices: tuple                    # jax devices, in rank order (peer) / this process's one
  ordinals: tuple[int, ...]         # their CUDA ordinals
  region_bytes: int                 # backend region bytes per rank


_state: _State | None = None
_atexit_registered = False
_nvshmem_generation = 0


def is_initialized() -> bool:
  """Whether ``initialize`` has set up the triton backend's buffers in this process."""
  return _state is not None


def _require() -> _State:
  if _state is None:
    raise RuntimeNotInitializedError(
        "jax_ep.runtime: the triton backend's runtime is not initialized: call "
        "jax_ep.runtime.initialize(configs) first (after jax.distributed.initialize() when "
        "running one process per GPU), or use EPConfig(backend='xla')")
  return _state


# -- sizes ---------------------------------------------------------------------------------------

def region_bytes_for(config, world: int) -> int:
  """Bytes of backend region one config needs per rank with ``world`` ranks (the triton
  backend's ``symmetric_bytes``: the layout of kernels/ep_sync.py's ``RegionSpec``)."""
  from jax_ep.backends import triton as triton_backend  # noqa: PLC0415
  return int(triton_backend.symmetric_bytes(config, world))


def required_bytes(configs: Iterable, world: int) -> int:
  """Backend-region bytes per rank that serve every config (the largest of them, aligned)."""
  sizes = [region_bytes_for(c, world) for c in configs]
  return align_up(max(sizes, default=0) or _REGION_ALIGN, _REGION_ALIGN)


def _parse_size(text: str) -> int:
  t = text.strip().upper().rstrip("B")
  mult = 1
  for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
    if t.endswith(suffix):
      t, mult = t[:-1], m
      break
  return int(float(t) * mult)


def nvshmem_heap_bytes() -> int:
  """NVSHMEM's symmetric heap per GPU: ``$NVSHMEM_SYMMETRIC_SIZE`` or its 1 GiB default."""
  v = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
  return _parse_size(v) if v else 1 << 30


# -- accessors -----------------------------------------------------------------------------------

def provider() -> str:
  """``"nvshmem"`` or ``"peer"``."""
  return _require().provider


def world_size() -> int:
  """Number of ranks sharing symmetric memory (GPUs of the EP group)."""
  return _require().world


def rank() -> int:
  """This process's rank (nvshmem provider). With the peer provider use ``rank_of(device)``."""
  s = _require()
  if s.rank is None:
    raise RuntimeError("jax_ep.runtime.rank: the peer provider drives several GPUs from one "
                       "process; use jax_ep.runtime.rank_of(device)")
  return s.rank


def devices() -> tuple:
  """The JAX devices this process drives in the symmetric world, in rank order."""
  return _require().devices


def rank_of(device) -> int:
  """Rank of a local JAX device in the symmetric world."""
  s = _require()
  for i, d in enumerate(s.devices):
    if d == device:
      return s.rank if s.rank is not None else i
  raise ValueError(f"jax_ep.runtime.rank_of: {device} is not one of the devices given to "
                   f"jax_ep.runtime.initialize ({list(s.devices)})")


def symmetric_bytes() -> int:
  """Bytes of the backend region per rank (at ``sym_table[r]``)."""
  return _require().region_bytes


def exchange_offset() -> int:
  """Byte offset of the runtime's exchange area from ``sym_table[r]`` (negative, fixed)."""
  return EXCHANGE_OFFSET


def check_config(config) -> None:
  """Raises unless the runtime is up and its region is large enough for ``config``."""
  s = _require()
  need = region_bytes_for(config, s.world)
  if need > s.region_bytes:
    raise ValueError(
        f"jax_ep.runtime: config {config} needs {need} bytes of symmetric memory per rank but "
        f"the runtime was initialized with {s.region_bytes}: call jax_ep.runtime.shutdown() and "
        f"then jax_ep.runtime.initialize([...]) with every config you use")


def device_info(device) -> dict:
  """Runtime facts about a local device: rank, world, region base, bytes, table, epoch."""
  from jax_ep import _ffi

  s = _require()
  out = (ctypes.c_int64 * 6)()
  idx = s.devices.index(device) if device in s.devices else -1
  if idx < 0:
    raise ValueError(f"jax_ep.runtime.device_info: {device} is not in the runtime")
  _ffi.check(_ffi.library().jep_device_info(s.ordinals[idx], out), "jax_ep.runtime.device_info")
  return dict(zip(("rank", "world", "base", "bytes", "table", "epoch"), list(out)))


def read_symmetric(device, offset: int, nbytes: int) -> bytes:
  """Copies ``nbytes`` at ``offset`` (from ``sym_table[r]``, may be negative) of a local device's
  region to the host, after synchronizing the device. For tests and debugging."""
  from jax_ep import _ffi

  s = _require()
  idx = s.devices.index(device)
  buf = (ctypes.c_char * nbytes)()
  _ffi.check(_ffi.library().jep_read_symmetric(s.ordinals[idx], offset + EXCHANGE_BYTES, buf,
                                               nbytes), "jax_ep.runtime.read_symmetric")
  return bytes(buf)


# -- initialize / shutdown -----------------------------------------------------------------------

def _nvshmem_library_path() -> str:
  env = os.environ.get("JAX_EP_NVSHMEM_LIB")
  if env:
    return env
  try:
    import importlib.util
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is not None and spec.submodule_search_locations:
      path = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libnvshmem_host.so.3")
      if os.path.exists(path):
        return path
  except (ImportError, ValueError):
    pass
  return "libnvshmem_host.so.3"


def _gpu_devices(devices):
  import jax

  if devices is None:
    devices = [d for d in jax.local_devices() if d.platform == "gpu"]
  devices = list(devices)
  if not devices or any(d.platform != "gpu" for d in devices):
    raise RuntimeError(
        f"jax_ep.runtime.initialize: the triton backend needs CUDA GPUs, got {devices}; on other "
        f"platforms use EPConfig(backend='xla')")
  return devices


def _ordinal(device) -> int:
  """CUDA ordinal of a JAX GPU device, as this process numbers its visible devices."""
  hw = getattr(device, "local_hardware_id", None)
  return int(hw if hw is not None else device.id)


def initialize(configs, *, provider: str = "auto", devices: Sequence | None = None) -> None:
  """Allocates the symmetric memory the triton backend needs for ``configs``, once.

  Args:
    configs: an EPConfig or a sequence of them; the region is sized for the largest.
    provider: "auto" (nvshmem when ``jax.process_count() > 1``, else peer), "nvshmem" or "peer".
    devices: peer provider only: the local GPUs of the EP group in rank order
      (default ``jax.local_devices()``).

  Calling it again with configs that fit (and the same provider/devices) is a no-op; otherwise
  it raises, asking for ``shutdown()`` first.
  """
  global _state, _atexit_registered
  import jax

  from jax_ep import _ffi
  from jax_ep.config import EPConfig

  if isinstance(configs, EPConfig):
    configs = [configs]
  configs = tuple(configs)
  if not configs or not all(isinstance(c, EPConfig) for c in configs):
    raise TypeError(f"jax_ep.runtime.initialize: configs={configs!r} must be an EPConfig or a "
                    f"non-empty sequence of them")
  if provider not in ("auto", "nvshmem", "peer"):
    raise ValueError(f"jax_ep.runtime.initialize: provider={provider!r} must be 'auto', "
                     f"'nvshmem' or 'peer'")
  nproc = jax.process_count()
  if provider == "auto":
    provider = "nvshmem" if nproc > 1 else "peer"
  if provider == "peer" and nproc > 1:
    raise ValueError("jax_ep.runtime.initialize: provider='peer' needs a single process; with "
                     f"{nproc} processes use provider='nvshmem' (one GPU per process)")
  gpus = _gpu_devices(devices if provider == "peer" else None)
  if provider == "nvshmem" and len(gpus) != 1:
    raise ValueError(
        f"jax_ep.runtime.initialize: the nvshmem provider needs exactly one GPU per process, this "
        f"process has {len(gpus)}; start one process per GPU (jax.distributed.initialize(..., "
        f"local_device_ids=[local_rank])) or use provider='peer' in a single process")
  world = nproc if provider == "nvshmem" else len(gpus)
  region = required_bytes(configs, world)

  if _state is not None:
    same = (_state.provider == provider and _state.world == world
            and tuple(_state.devices) == tuple(gpus))
    if same and region <= _state.region_bytes:
      return
    raise RuntimeError(
        f"jax_ep.runtime.initialize: already initialized ({_state.provider}, world "
        f"{_state.world}, {_state.region_bytes} bytes per rank); these configs need {region} "
        f"bytes with provider {provider} over {len(gpus)} device(s): call "
        f"jax_ep.runtime.shutdown() first")

  lib = _ffi.library()
  os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
  total = EXCHANGE_BYTES + region
  ordinals = tuple(_ordinal(d) for d in gpus)
  if provider == "peer":
    arr = (ctypes.c_int * len(ordinals))(*ordinals)
    _ffi.check(lib.jep_peer_init(arr, len(ordinals), total, EXCHANGE_BYTES),
               "jax_ep.runtime.initialize (peer provider)")
    this_rank = None
  else:
    heap = nvshmem_heap_bytes()
    if total + NVSHMEM_HEAP_RESERVE > heap:
      raise ValueError(
          f"jax_ep.runtime.initialize: the configs need {total} bytes of NVSHMEM symmetric memory "
          f"per GPU (+{NVSHMEM_HEAP_RESERVE} for NVSHMEM itself) but NVSHMEM_SYMMETRIC_SIZE is "
          f"{heap}: set NVSHMEM_SYMMETRIC_SIZE={align_up(total + NVSHMEM_HEAP_RESERVE, 1 << 20)} "
          f"(bytes) in the environment of every process before the first initialize")
    if not lib.jep_has_nvshmem_support():
      raise RuntimeError("jax_ep.runtime.initialize: this build of libjax_ep_ffi.so has no NVSHMEM "
                         "support (NVSHMEM headers were missing at build time): rebuild it with "
                         "nvidia-nvshmem-cu13 installed")
    _ffi.check(lib.jep_nvshmem_open(_nvshmem_library_path().encode()),
               "jax_ep.runtime.initialize (loading NVSHMEM)")
    this_rank = jax.process_index()
    uid = _exchange_uid(lib, this_rank, world)
    _check_same_size(total, this_rank, world)
    _ffi.check(lib.jep_nvshmem_init(ordinals[0], this_rank, world, uid, total, EXCHANGE_BYTES),
               "jax_ep.runtime.initialize (nvshmem provider)")
  _state = _State(provider=provider, world=world, rank=this_rank, devices=tuple(gpus),
                  ordinals=ordinals, region_bytes=region)
  if not _atexit_registered:
    atexit.register(_at_exit)
    _atexit_registered = True


def _kv_client():
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax_ep.runtime.initialize: several processes but no JAX distributed "
                       "client: call jax.distributed.initialize() first")
  return client


_uid_bytes: bytes | None = None


def _exchange_uid(lib, this_rank: int, world: int):
  """Rank 0 makes NVSHMEM's unique id; every rank reads it from JAX's key-value store (once)."""
  from jax_ep import _ffi
  global _uid_bytes
  size = lib.jep_nvshmem_uniqueid_size()
  if _uid_bytes is None:
    if this_rank == 0:
      buf = (ctypes.c_char * size)()
      _ffi.check(lib.jep_nvshmem_get_uniqueid(buf), "jax_ep.runtime.initialize (NVSHMEM uid)")
      _uid_bytes = bytes(buf)
      if world > 1:
        _kv_client().key_value_set_bytes("jax_ep/nvshmem_uid", _uid_bytes)
    else:
      _uid_bytes = bytes(_kv_client().blocking_key_value_get_bytes("jax_ep/nvshmem_uid",
                                                                   300_000))
  return ctypes.create_string_buffer(_uid_bytes, size)


def _check_same_size(total: int, this_rank: int, world: int) -> None:
  """nvshmem_malloc is collective with equal sizes: compare first, so a mismatch is an error
  naming the ranks instead of a hang."""
  global _nvshmem_generation
  if world == 1:
    return
  _nvshmem_generation += 1
  client = _kv_client()
  prefix = f"jax_ep/region_bytes/{_nvshmem_generation}"
  client.key_value_set(f"{prefix}/{this_rank}", str(total))
  sizes = [int(client.blocking_key_value_get(f"{prefix}/{r}", 300_000)) for r in range(world)]
  if len(set(sizes)) != 1:
    raise RuntimeError(f"jax_ep.runtime.initialize: ranks asked for different symmetric sizes "
                       f"{sizes}; every process must call initialize with the same configs")


def shutdown() -> None:
  """Releases the symmetric memory and loaded kernels (a no-op when nothing was initialized).

  With the nvshmem provider this is collective: every process must call it. NVSHMEM itself
  stays initialized until the process exits, so ``initialize`` may be called again.
  """
  global _state
  if _state is None:
    return
  from jax_ep import _ffi

  _state = None
  _ffi.check(_ffi.library().jep_shutdown(), "jax_ep.runtime.shutdown")


def _at_exit() -> None:
  from jax_ep import _ffi

  try:
    shutdown()
    if _ffi.available():
      _ffi.library().jep_nvshmem_finalize()
  except Exception as e:  # noqa: BLE001 -- at exit, report and carry on
    print(f"jax_ep.runtime: shutdown at exit failed: {e}")
