// jax_ep GPU runtime: symmetric memory outside XLA and the XLA FFI handler that launches
// stock-Triton cubins on XLA's CUDA stream.
//
// What lives here (see docs/RUNTIME.md for the full contract):
//   * A CUDA driver API table loaded at run time (dlopen libcuda.so.1 + cuGetProcAddress), so
//     this library loads, and the Python package imports, on machines without CUDA.
//   * Symmetric memory with one interface and two providers:
//       - "nvshmem": one process per GPU (one or many hosts). libnvshmem_host.so.3 is dlopen'ed
//         from the path Python gives; the unique id travels through JAX's coordination service;
//         nvshmemx_hostlib_init_attr, one nvshmem_malloc, nvshmem_ptr for every peer.
//       - "peer": one process driving several local GPUs. One CUDA VMM allocation per device,
//         mapped read/write for every participating device (cuMemSetAccess), so every device
//         reaches every other device's region by a plain pointer.
//     Either way each participating device gets a DeviceState: its rank, the world size, the
//     base of its own region, and a device-resident int64 table [world] holding every rank's
//     region base as addressable from this device (0 where a peer is not load/store reachable).
//   * The FFI handler "jax_ep_triton_launch": loads a cubin once per (context, kernel key),
//     and launches it on XLA's stream with the parameters
//       inputs..., outputs..., [sym_table, rank, world, epoch]..., scalars...,
//       global_scratch, profile_scratch
//     (the last two are Triton's own launch ABI since 3.3/3.5). Addresses of the symmetric
//     region are looked up here at run time: the HLO holds only a kernel key and a cubin path.
//     No host synchronisation happens on the launch path (module loading happens once).
//
// The C entry points (jep_*) are called from Python through ctypes (jax_ep/_ffi.py). Each
// returns 0 on success or -1 with a message available from jep_last_error().

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if JAX_EP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace ffi = xla::ffi;

#define JEP_EXPORT extern "C" __attribute__((visibility("default")))

namespace jax_ep {
namespace {

constexpr int kAbiVersion = 4;

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

thread_local std::string g_last_error;

int Fail(std::string msg) {
  g_last_error = std::move(msg);
  return -1;
}

// ------------------------------------------------------------------------------------------
// The CUDA driver API, resolved at run time.
// ------------------------------------------------------------------------------------------

// X(name, version): `name` is the un-versioned driver symbol and `version` the CUDA version
// whose ABI we call (cudaTypedefs.h names it PFN_<name>_v<version>). cuGetProcAddress returns
// exactly that variant, so a newer driver's changed prototypes (cuStreamGetCtx_v2 in 12.5,
// cuCtxGetDevice/cuCtxSynchronize in 13.0, ...) never reach a call written for the old one.
#define JEP_CUDA_FUNCTIONS(X)                                                  \
  X(cuInit, 2000)                                                              \
  X(cuGetErrorString, 6000)                                                    \
  X(cuDeviceGet, 2000)                                                         \
  X(cuDeviceGetCount, 2000)                                                    \
  X(cuDeviceGetAttribute, 2000)                                                \
  X(cuDeviceCanAccessPeer, 4000)                                               \
  X(cuDevicePrimaryCtxRetain, 7000)                                            \
  X(cuDevicePrimaryCtxRelease, 11000)                                          \
  X(cuCtxPushCurrent, 4000)                                                    \
  X(cuCtxPopCurrent, 4000)                                                     \
  X(cuCtxGetDevice, 2000)                                                      \
  X(cuCtxSynchronize, 2000)                                                    \
  X(cuStreamGetCtx, 9020)                                                      \
  X(cuModuleLoadData, 2000)                                                    \
  X(cuModuleUnload, 2000)                                                      \
  X(cuModuleGetFunction, 2000)                                                 \
  X(cuFuncSetAttribute, 9000)                                                  \
  X(cuLaunchKernel, 4000)                                                      \
  X(cuMemAlloc, 3020)                                                          \
  X(cuMemFree, 3020)                                                           \
  X(cuMemcpyHtoD, 3020)                                                        \
  X(cuMemcpyDtoH, 3020)                                                        \
  X(cuMemsetD8, 3020)                                                          \
  X(cuMemcpyDtoDAsync, 3020)                                                   \
  X(cuMemCreate, 10020)                                                        \
  X(cuMemRelease, 10020)                                                       \
  X(cuMemAddressReserve, 10020)                                                \
  X(cuMemAddressFree, 10020)                                                   \
  X(cuMemMap, 10020)                                                           \
  X(cuMemUnmap, 10020)                                                         \
  X(cuMemSetAccess, 10020)                                                     \
  X(cuMemGetAllocationGranularity, 10020)

struct CudaApi {
#define JEP_DECLARE(name, version) PFN_##name##_v##version name = nullptr;
  JEP_CUDA_FUNCTIONS(JEP_DECLARE)
#undef JEP_DECLARE
  bool loaded = false;
  std::string load_error;
};

CudaApi& Cuda() {
  static CudaApi* api = [] {
    auto* a = new CudaApi();
    void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);  // XLA has it loaded already
    if (handle == nullptr) {
      a->load_error = std::string("cannot load libcuda.so.1 (no NVIDIA driver?): ") + dlerror();
      return a;
    }
    using GetProc = CUresult (*)(const char*, void**, int, cuuint64_t,
                                 CUdriverProcAddressQueryResult*);
    auto get_proc = reinterpret_cast<GetProc>(dlsym(handle, "cuGetProcAddress_v2"));
    if (get_proc == nullptr) {
      a->load_error = "libcuda.so.1 has no cuGetProcAddress_v2: the NVIDIA driver is too old "
                      "(jax_ep needs a CUDA 12+ driver)";
      return a;
    }
    std::string missing;
#define JEP_RESOLVE(name, version)                                                 \
  {                                                                                \
    void* fn = nullptr;                                                            \
    CUdriverProcAddressQueryResult status;                                         \
    if (get_proc(#name, &fn, version, CU_GET_PROC_ADDRESS_DEFAULT, &status) !=     \
            CUDA_SUCCESS ||                                                        \
        fn == nullptr) {                                                           \
      missing += std::string(" ") + #name;                                         \
    }                                                                              \
    a->name = reinterpret_cast<decltype(a->name)>(fn);                            \
  }
    JEP_CUDA_FUNCTIONS(JEP_RESOLVE)
#undef JEP_RESOLVE
    if (!missing.empty()) {
      a->load_error = "the NVIDIA driver lacks:" + missing;
      return a;
    }
    if (a->cuInit(0) != CUDA_SUCCESS) {
      a->load_error = "cuInit failed (no usable GPU?)";
      return a;
    }
    a->loaded = true;
    return a;
  }();
  return *api;
}

std::string CuErr(CUresult r) {
  const char* s = nullptr;
  if (Cuda().cuGetErrorString != nullptr) Cuda().cuGetErrorString(r, &s);
  return std::string(s ? s : "unknown CUDA error") + " (" + std::to_string(static_cast<int>(r)) + ")";
}

#define JEP_CU(call, what)                                                      \
  do {                                                                          \
    CUresult jep_r_ = (call);                                                   \
    if (jep_r_ != CUDA_SUCCESS) return ::jax_ep::Fail(std::string(what) + ": " + ::jax_ep::CuErr(jep_r_)); \
  } while (0)

// Makes a context current for the lifetime of the guard (push/pop), restoring the previous one.
class ScopedContext {
 public:
  explicit ScopedContext(CUcontext ctx) : ok_(Cuda().cuCtxPushCurrent(ctx) == CUDA_SUCCESS) {}
  ~ScopedContext() {
    if (ok_) {
      CUcontext popped;
      Cuda().cuCtxPopCurrent(&popped);
    }
  }
  bool ok() const { return ok_; }

 private:
  bool ok_;
};

// ------------------------------------------------------------------------------------------
// NVSHMEM host API, resolved from the libnvshmem_host.so.3 that Python names.
// ------------------------------------------------------------------------------------------

#if JAX_EP_WITH_NVSHMEM
struct NvshmemApi {
  decltype(&::nvshmemx_get_uniqueid) get_uniqueid = nullptr;
  decltype(&::nvshmemx_set_attr_uniqueid_args) set_attr_uniqueid_args = nullptr;
  decltype(&::nvshmemx_hostlib_init_attr) hostlib_init_attr = nullptr;
  decltype(&::nvshmemx_hostlib_finalize) hostlib_finalize = nullptr;
  decltype(&::nvshmemx_init_status) init_status = nullptr;
  decltype(&::nvshmem_malloc) malloc = nullptr;
  decltype(&::nvshmem_free) free = nullptr;
  decltype(&::nvshmem_ptr) ptr = nullptr;
  decltype(&::nvshmem_my_pe) my_pe = nullptr;
  decltype(&::nvshmem_n_pes) n_pes = nullptr;
  decltype(&::nvshmem_barrier_all) barrier_all = nullptr;
  decltype(&::nvshmemx_cumodule_init) cumodule_init = nullptr;
  decltype(&::nvshmemx_cumodule_finalize) cumodule_finalize = nullptr;
  void* handle = nullptr;
};
NvshmemApi g_nvshmem;
bool g_nvshmem_initialized = false;  // nvshmemx_hostlib_init_attr succeeded in this process
int g_nvshmem_rank = -1, g_nvshmem_world = 0;
#endif

// ------------------------------------------------------------------------------------------
// Runtime state
// ------------------------------------------------------------------------------------------

enum class Provider { kNone = 0, kNvshmem = 1, kPeer = 2 };

// One participating device: its slice of the symmetric memory and its pointer table.
struct DeviceState {
  int ordinal = -1;                 // CUDA device ordinal (as this process sees devices)
  CUcontext ctx = nullptr;          // the device's primary context (retained)
  int rank = -1;                    // this device's rank in the symmetric world
  int world = 0;
  CUdeviceptr base = 0;             // start of this rank's symmetric region
  size_t bytes = 0;                 // usable bytes of the region
  CUdeviceptr table = 0;            // int64 [world] device array: every rank's base, as seen here
  std::vector<int64_t> host_table;  // the same, on the host
  std::atomic<int64_t> epoch{0};    // launches of symmetric kernels on this device so far
  // peer provider only: the VMM allocation backing `base`
  CUmemGenericAllocationHandle vmm_handle = 0;
  size_t vmm_size = 0;
};

struct LoadedKernel {
  CUmodule module = nullptr;
  CUfunction function = nullptr;
  bool uses_nvshmem = false;
};

struct Runtime {
  std::mutex mu;
  Provider provider = Provider::kNone;
  std::vector<std::unique_ptr<DeviceState>> devices;
  // Cubins registered by Python in this process, by kernel key.
  std::unordered_map<std::string, std::string> cubins;
  // Loaded modules, by (context, kernel key).
  std::map<std::pair<CUcontext, std::string>, LoadedKernel> kernels;
};

Runtime& State() {
  static Runtime* rt = new Runtime();  // never destroyed: XLA may call the handler at exit
  return *rt;
}

DeviceState* FindDevice(Runtime& rt, CUcontext ctx) {
  for (auto& d : rt.devices)
    if (d->ctx == ctx) return d.get();
  return nullptr;
}

int RetainPrimary(int ordinal, CUdevice* dev, CUcontext* ctx) {
  auto& cu = Cuda();
  if (!cu.loaded) return Fail(cu.load_error);
  int count = 0;
  JEP_CU(cu.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (ordinal < 0 || ordinal >= count)
    return Fail("CUDA device ordinal " + std::to_string(ordinal) + " is out of range: this process sees " +
                std::to_string(count) + " device(s)");
  JEP_CU(cu.cuDeviceGet(dev, ordinal), "cuDeviceGet");
  JEP_CU(cu.cuDevicePrimaryCtxRetain(ctx, *dev), "cuDevicePrimaryCtxRetain");
  return 0;
}

// Uploads the host table of `d` into a fresh device array on d's context.
int UploadTable(DeviceState* d) {
  auto& cu = Cuda();
  ScopedContext scope(d->ctx);
  if (!scope.ok()) return Fail("cannot make the device context current");
  JEP_CU(cu.cuMemAlloc(&d->table, sizeof(int64_t) * d->host_table.size()), "cuMemAlloc(pointer table)");
  JEP_CU(cu.cuMemcpyHtoD(d->table, d->host_table.data(), sizeof(int64_t) * d->host_table.size()),
         "cuMemcpyHtoD(pointer table)");
  JEP_CU(cu.cuMemsetD8(d->base, 0, d->bytes), "cuMemsetD8(symmetric region)");
  JEP_CU(cu.cuCtxSynchronize(), "cuCtxSynchronize");
  return 0;
}

// Unloads a kernel's module (finalizing NVSHMEM's state in it first). Its context is current.
CUresult UnloadKernel(const LoadedKernel& k) {
#if JAX_EP_WITH_NVSHMEM
  if (k.uses_nvshmem && g_nvshmem_initialized) g_nvshmem.cumodule_finalize(k.module);
#endif
  return Cuda().cuModuleUnload(k.module);
}

// Releases every device resource (not NVSHMEM itself). Caller holds rt.mu.
int ReleaseLocked(Runtime& rt) {
  auto& cu = Cuda();
  std::string first_error;
  auto note = [&](CUresult r, const char* what) {
    if (r != CUDA_SUCCESS && first_error.empty()) first_error = std::string(what) + ": " + CuErr(r);
  };
  // Everything that may still use the regions must have finished.
  for (auto& d : rt.devices) {
    ScopedContext scope(d->ctx);
    note(cu.cuCtxSynchronize(), "cuCtxSynchronize");
  }
  // Modules: unloaded so that the next initialize starts clean (NVSHMEM modules are finalized).
  for (auto& [key, k] : rt.kernels) {
    ScopedContext scope(key.first);
    note(UnloadKernel(k), "cuModuleUnload");
  }
  rt.kernels.clear();
#if JAX_EP_WITH_NVSHMEM
  if (rt.provider == Provider::kNvshmem && !rt.devices.empty()) {
    DeviceState* d = rt.devices[0].get();
    ScopedContext scope(d->ctx);
    g_nvshmem.barrier_all();  // nobody still reads a peer's region
    g_nvshmem.free(reinterpret_cast<void*>(d->base));  // collective
  }
#endif
  for (auto& d : rt.devices) {
    ScopedContext scope(d->ctx);
    if (d->table) note(cu.cuMemFree(d->table), "cuMemFree(pointer table)");
    if (rt.provider == Provider::kPeer && d->vmm_handle) {
      note(cu.cuMemUnmap(d->base, d->vmm_size), "cuMemUnmap");
      note(cu.cuMemAddressFree(d->base, d->vmm_size), "cuMemAddressFree");
      note(cu.cuMemRelease(d->vmm_handle), "cuMemRelease");
    }
    CUdevice dev;
    if (cu.cuCtxGetDevice(&dev) == CUDA_SUCCESS) cu.cuDevicePrimaryCtxRelease(dev);
  }
  rt.devices.clear();
  rt.provider = Provider::kNone;
  if (!first_error.empty()) return Fail(first_error);
  return 0;
}

// ------------------------------------------------------------------------------------------
// Kernel loading
// ------------------------------------------------------------------------------------------

bool CubinUsesNvshmem(const std::string& cubin) {
  // Bitcode-linked NVSHMEM device code leaves this constant in the module; it must be filled in
  // by nvshmemx_cumodule_init before the first launch.
  return cubin.find("nvshmemi_device_state_d") != std::string::npos;
}

// Returns the loaded kernel for (ctx, key), loading it on first use. Takes rt.mu only to look
// up and to insert: the module load runs WITHOUT the lock. A load may wait until the device is
// idle, and in one process driving several GPUs, a jax_ep kernel spinning on GPU A for its
// peers must not keep GPU B's thread from launching the kernel it waits for (B's launch needs
// the lock). Kernels are preloaded at trace time (jep_preload_kernel), so a launch rarely loads.
ffi::ErrorOr<LoadedKernel> GetKernel(Runtime& rt, CUcontext ctx, std::string_view key,
                                     std::string_view path, std::string_view name,
                                     int64_t shared_mem) {
  auto& cu = Cuda();
  std::string cubin;
  bool have_cubin = false;
  {
    std::lock_guard<std::mutex> lock(rt.mu);
    auto it = rt.kernels.find({ctx, std::string(key)});
    if (it != rt.kernels.end()) return it->second;
    auto reg = rt.cubins.find(std::string(key));
    if (reg != rt.cubins.end()) {
      cubin = reg->second;
      have_cubin = true;
    }
  }
  if (!have_cubin) {
    std::ifstream f(std::string(path), std::ios::binary);
    if (!f)
      return ffi::Unexpected(ffi::Error(
          ffi::ErrorCode::kNotFound,
          "jax_ep: the cubin of kernel '" + std::string(name) + "' is neither registered in this process nor "
          "readable at " + std::string(path) + "; the jax_ep kernel cache (JAX_EP_CACHE_DIR) must be "
          "shared by every process that runs this executable"));
    cubin.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    std::lock_guard<std::mutex> lock(rt.mu);
    rt.cubins.emplace(std::string(key), cubin);
  }
  LoadedKernel k;
  k.uses_nvshmem = CubinUsesNvshmem(cubin);
  ScopedContext scope(ctx);
  CUresult r = cu.cuModuleLoadData(&k.module, cubin.data());
  if (r != CUDA_SUCCESS)
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInternal,
                                      "jax_ep: cuModuleLoadData(" + std::string(name) + "): " + CuErr(r) +
                                          " (was the cubin compiled for this GPU's architecture?)"));
  if (k.uses_nvshmem) {
#if JAX_EP_WITH_NVSHMEM
    if (!g_nvshmem_initialized || g_nvshmem.cumodule_init(k.module) != 0) {
      cu.cuModuleUnload(k.module);
      return ffi::Unexpected(ffi::Error(
          ffi::ErrorCode::kFailedPrecondition,
          "jax_ep: kernel '" + std::string(name) + "' links NVSHMEM device code, which needs the NVSHMEM "
          "provider: call jax_ep.runtime.initialize(configs) in a one-process-per-GPU run first"));
    }
#else
    cu.cuModuleUnload(k.module);
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                      "jax_ep: kernel links NVSHMEM device code but this build of the "
                                      "jax_ep FFI library has no NVSHMEM support"));
#endif
  }
  std::string fname(name);
  r = cu.cuModuleGetFunction(&k.function, k.module, fname.c_str());
  if (r != CUDA_SUCCESS)
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInternal,
                                      "jax_ep: cuModuleGetFunction(" + fname + "): " + CuErr(r)));
  if (shared_mem > 48 * 1024) {
    r = cu.cuFuncSetAttribute(k.function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                              static_cast<int>(shared_mem));
    if (r != CUDA_SUCCESS)
      return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kResourceExhausted,
                                        "jax_ep: kernel " + fname + " needs " + std::to_string(shared_mem) +
                                            " bytes of shared memory: " + CuErr(r)));
  }
  std::lock_guard<std::mutex> lock(rt.mu);
  auto [it, inserted] = rt.kernels.emplace(std::make_pair(ctx, std::string(key)), k);
  if (!inserted) UnloadKernel(k);  // another thread loaded it first: use theirs
  return it->second;
}

// ------------------------------------------------------------------------------------------
// The FFI handler
// ------------------------------------------------------------------------------------------

ffi::Error TritonLaunch(CUstream stream, ffi::ScratchAllocator scratch, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, std::string_view kernel_key,
                        std::string_view kernel_path, std::string_view kernel_name, int64_t grid_x,
                        int64_t grid_y, int64_t grid_z, int64_t num_warps, int64_t num_ctas,
                        int64_t shared_mem, int64_t global_scratch_size,
                        int64_t global_scratch_align, int64_t profile_scratch_size,
                        bool symmetric, int64_t symmetric_bytes, int64_t stage_arg,
                        int64_t stage_offset, int64_t stage_rank_stride,
                        ffi::Span<const int64_t> scalars,
                        ffi::Span<const int64_t> scalar_bits) {
  auto& cu = Cuda();
  if (!cu.loaded) return ffi::Error(ffi::ErrorCode::kUnavailable, "jax_ep: " + cu.load_error);
  if (num_ctas != 1)
    return ffi::Error::InvalidArgument("jax_ep: num_ctas=" + std::to_string(num_ctas) +
                                       " (thread-block clusters) is not supported by the launcher");
  if (scalars.size() != scalar_bits.size())
    return ffi::Error::InvalidArgument("jax_ep: scalars and scalar_bits differ in length");
  CUcontext ctx = nullptr;
  CUresult r = cu.cuStreamGetCtx(stream, &ctx);
  if (r != CUDA_SUCCESS) return ffi::Error::Internal("jax_ep: cuStreamGetCtx: " + CuErr(r));

  Runtime& rt = State();
  LoadedKernel kernel;
  {
    auto k = GetKernel(rt, ctx, kernel_key, kernel_path, kernel_name, shared_mem);
    if (k.has_error()) return k.error();
    kernel = k.value();
  }
  CUdeviceptr sym_table = 0;  // symmetric launches: this device's table, rank, world, epoch
  CUdeviceptr sym_region = 0, sym_end = 0;  // ... this rank's region as the kernels see it
                                            // (its table entry) and the allocation's end
  int32_t rank32 = 0, world32 = 0;
  int64_t epoch = 0;
  {
    std::lock_guard<std::mutex> lock(rt.mu);
    if (symmetric) {
      DeviceState* dev = FindDevice(rt, ctx);
      if (dev == nullptr) {
        if (rt.provider == Provider::kNone)
          return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                            "jax_ep: kernel '" + std::string(kernel_name) +
                                "' needs symmetric memory but the jax_ep runtime is not initialized "
                                "(or was shut down): call jax_ep.runtime.initialize(configs) first");
        return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                          "jax_ep: kernel '" + std::string(kernel_name) +
                              "' runs on a device that jax_ep.runtime.initialize did not set up; "
                              "initialize with every device of the EP mesh axis");
      }
      // The region may have been re-sized (shutdown + initialize) after this executable was
      // compiled for a larger one: writing past it would corrupt other memory, so refuse.
      if (symmetric_bytes > 0 && static_cast<size_t>(symmetric_bytes) > dev->bytes)
        return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                          "jax_ep: kernel '" + std::string(kernel_name) + "' was compiled for " +
                              std::to_string(symmetric_bytes) +
                              " bytes of symmetric memory per rank but the jax_ep runtime now has " +
                              std::to_string(dev->bytes) +
                              " (it was re-initialized with smaller configs after this step was "
                              "compiled): call jax_ep.runtime.initialize with every config you use, "
                              "or re-trace the step");
      // Copied under the lock: a concurrent shutdown frees `dev`.
      sym_table = dev->table;
      sym_region = static_cast<CUdeviceptr>(dev->host_table[dev->rank]);
      sym_end = dev->base + dev->bytes;
      rank32 = dev->rank;
      world32 = dev->world;
      epoch = dev->epoch.fetch_add(1) + 1;  // 1, 2, 3, ...: flags start at 0
    }
  }

  // Parameter storage: every slot must stay put until cuLaunchKernel returns.
  const size_t n_buffers = args.size() + rets.size();
  std::vector<CUdeviceptr> buffers(n_buffers);
  std::vector<int64_t> ints(scalars.size());
  std::vector<void*> params;
  params.reserve(n_buffers + scalars.size() + 6);
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    buffers[i] = reinterpret_cast<CUdeviceptr>(b.value().untyped_data());
    params.push_back(&buffers[i]);
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto b = rets.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    buffers[args.size() + i] = reinterpret_cast<CUdeviceptr>(b.value()->untyped_data());
    params.push_back(&buffers[args.size() + i]);
  }
  if (symmetric) {
    params.push_back(&sym_table);
    params.push_back(&rank32);
    params.push_back(&world32);
    params.push_back(&epoch);
  }
  // Scalars: i32 slots are read by the kernel as 4 bytes; store them in an int32 view.
  std::vector<int32_t> ints32(scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) {
    if (scalar_bits[i] == 32) {
      ints32[i] = static_cast<int32_t>(scalars[i]);
      params.push_back(&ints32[i]);
    } else {
      ints[i] = scalars[i];
      params.push_back(&ints[i]);
    }
  }
  const int64_t programs = grid_x * grid_y * grid_z * num_ctas;
  CUdeviceptr global_scratch = 0, profile_scratch = 0;
  if (global_scratch_size > 0) {
    // XLA's FFI allocator refuses alignments above 16 bytes ("Unsupported alignment"), and
    // Triton asks for 128 (TMA descriptors made on the device): over-allocate by the alignment
    // and round the base up ourselves. Each program's slice starts at a multiple of
    // global_scratch_size, which Triton keeps a multiple of the alignment.
    const size_t align = static_cast<size_t>(std::max<int64_t>(global_scratch_align, 1));
    const size_t bytes = static_cast<size_t>(programs * global_scratch_size) + (align > 16 ? align : 0);
    auto p = scratch.Allocate(bytes, std::min<size_t>(align, 16));
    if (!p.has_value())
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "jax_ep: global scratch allocation of " + std::to_string(bytes) + " bytes failed");
    global_scratch = (reinterpret_cast<CUdeviceptr>(*p) + align - 1) & ~static_cast<CUdeviceptr>(align - 1);
  }
  if (profile_scratch_size > 0) {  // same 16-byte limit: align the base to 128 by hand
    auto p = scratch.Allocate(static_cast<size_t>(programs * profile_scratch_size) + 128, 16);
    if (!p.has_value()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jax_ep: profile scratch allocation failed");
    profile_scratch = (reinterpret_cast<CUdeviceptr>(*p) + 127) & ~static_cast<CUdeviceptr>(127);
  }
  params.push_back(&global_scratch);
  params.push_back(&profile_scratch);

  if (grid_x * grid_y * grid_z == 0) return ffi::Error::Success();
  if (stage_arg >= 0) {
    // The staging copy (EPPlan.dispatch_pull 4): input `stage_arg`, whole, into this rank's
    // region (from where its table entry points) at stage_offset + rank * stage_rank_stride,
    // by the copy engines and in stream order before the kernel, so the peers may read it as
    // soon as the kernel announces the op.
    if (!symmetric || stage_arg >= static_cast<int64_t>(args.size()))
      return ffi::Error::InvalidArgument("jax_ep: kernel '" + std::string(kernel_name) +
                                         "': stage_arg " + std::to_string(stage_arg) +
                                         " names no input of a symmetric launch");
    const size_t n = args.get<ffi::AnyBuffer>(stage_arg).value().size_bytes();
    const int64_t off = stage_offset + static_cast<int64_t>(rank32) * stage_rank_stride;
    if (stage_offset < 0 || stage_rank_stride < 0 ||
        sym_region + static_cast<CUdeviceptr>(off) + n > sym_end)
      return ffi::Error::InvalidArgument(
          "jax_ep: kernel '" + std::string(kernel_name) + "': its staging copy of " +
          std::to_string(n) + " bytes at offset " + std::to_string(off) +
          " does not fit this rank's symmetric region of " +
          std::to_string(sym_end - sym_region) + " bytes");
    if (n > 0) {
      r = cu.cuMemcpyDtoDAsync(sym_region + static_cast<CUdeviceptr>(off), buffers[stage_arg], n,
                               stream);
      if (r != CUDA_SUCCESS)
        return ffi::Error::Internal("jax_ep: staging copy for " + std::string(kernel_name) +
                                    ": " + CuErr(r));
    }
  }
  r = cu.cuLaunchKernel(kernel.function, static_cast<unsigned>(grid_x * num_ctas),
                        static_cast<unsigned>(grid_y), static_cast<unsigned>(grid_z),
                        static_cast<unsigned>(32 * num_warps), 1, 1, static_cast<unsigned>(shared_mem),
                        stream, params.data(), nullptr);
  if (r != CUDA_SUCCESS)
    return ffi::Error::Internal("jax_ep: cuLaunchKernel(" + std::string(kernel_name) + "): " + CuErr(r));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

// The handler symbol must be visible to dlsym (the library is built with hidden visibility).
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_ep_triton_launch, jax_ep::TritonLaunch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("kernel_key")
                                  .Attr<std::string_view>("kernel_path")
                                  .Attr<std::string_view>("kernel_name")
                                  .Attr<int64_t>("grid_x")
                                  .Attr<int64_t>("grid_y")
                                  .Attr<int64_t>("grid_z")
                                  .Attr<int64_t>("num_warps")
                                  .Attr<int64_t>("num_ctas")
                                  .Attr<int64_t>("shared_mem")
                                  .Attr<int64_t>("global_scratch_size")
                                  .Attr<int64_t>("global_scratch_align")
                                  .Attr<int64_t>("profile_scratch_size")
                                  .Attr<bool>("symmetric")
                                  .Attr<int64_t>("symmetric_bytes")
                                  .Attr<int64_t>("stage_arg")
                                  .Attr<int64_t>("stage_offset")
                                  .Attr<int64_t>("stage_rank_stride")
                                  .Attr<ffi::Span<const int64_t>>("scalars")
                                  .Attr<ffi::Span<const int64_t>>("scalar_bits"));
#pragma GCC visibility pop

// ------------------------------------------------------------------------------------------
// C entry points for Python (ctypes)
// ------------------------------------------------------------------------------------------

using jax_ep::Fail;
using jax_ep::Provider;
using jax_ep::State;

JEP_EXPORT int jep_abi_version() { return jax_ep::kAbiVersion; }

JEP_EXPORT const char* jep_last_error() { return jax_ep::g_last_error.c_str(); }

JEP_EXPORT int jep_has_nvshmem_support() { return JAX_EP_WITH_NVSHMEM; }

// Number of CUDA devices, or -1 (with the reason in jep_last_error) when CUDA is unusable.
JEP_EXPORT int jep_cuda_device_count() {
  auto& cu = jax_ep::Cuda();
  if (!cu.loaded) return Fail(cu.load_error);
  int count = 0;
  JEP_CU(cu.cuDeviceGetCount(&count), "cuDeviceGetCount");
  return count;
}

// Makes a cubin available to the handler under `key` (so it needs no file read).
JEP_EXPORT int jep_register_cubin(const char* key, const char* data, size_t size) {
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  rt.cubins[key] = std::string(data, size);
  return 0;
}

// Which provider is active: 0 none, 1 nvshmem, 2 peer.
JEP_EXPORT int jep_provider() {
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  return static_cast<int>(rt.provider);
}

// Fills out[0..6) = {rank, world, base, bytes, table, epoch} for CUDA device `ordinal`.
JEP_EXPORT int jep_device_info(int ordinal, int64_t* out) {
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  for (auto& d : rt.devices) {
    if (d->ordinal != ordinal) continue;
    out[0] = d->rank;
    out[1] = d->world;
    out[2] = static_cast<int64_t>(d->base);
    out[3] = static_cast<int64_t>(d->bytes);
    out[4] = static_cast<int64_t>(d->table);
    out[5] = d->epoch.load();
    return 0;
  }
  return Fail("device " + std::to_string(ordinal) + " is not part of the jax_ep runtime");
}

// Copies `size` bytes at `offset` of device `ordinal`'s symmetric region to `dst` (tests, debug).
JEP_EXPORT int jep_read_symmetric(int ordinal, size_t offset, void* dst, size_t size) {
  auto& rt = State();
  CUcontext ctx = nullptr;
  CUdeviceptr base = 0;
  {
    std::lock_guard<std::mutex> lock(rt.mu);
    for (auto& d : rt.devices) {
      if (d->ordinal != ordinal) continue;
      if (offset + size > d->bytes) return Fail("read past the end of the symmetric region");
      ctx = d->ctx;
      base = d->base;
    }
  }
  if (ctx == nullptr)
    return Fail("device " + std::to_string(ordinal) + " is not part of the jax_ep runtime");
  // Synchronize without the lock: other GPUs' launches (which take it) may be what this
  // device's kernels are waiting for.
  jax_ep::ScopedContext scope(ctx);
  JEP_CU(jax_ep::Cuda().cuCtxSynchronize(), "cuCtxSynchronize");
  JEP_CU(jax_ep::Cuda().cuMemcpyDtoH(dst, base + offset, size), "cuMemcpyDtoH");
  return 0;
}

// Loads a registered kernel into every runtime device's context now (at trace time), so no
// launch has to load a module while jax_ep kernels run (see GetKernel).
JEP_EXPORT int jep_preload_kernel(const char* key, const char* name, int64_t shared_mem) {
  auto& rt = State();
  std::vector<CUcontext> ctxs;
  {
    std::lock_guard<std::mutex> lock(rt.mu);
    for (auto& d : rt.devices) ctxs.push_back(d->ctx);
  }
  for (CUcontext ctx : ctxs) {
    auto k = jax_ep::GetKernel(rt, ctx, key, "", name, shared_mem);
    if (k.has_error()) return Fail(std::string(k.error().message()));
  }
  return 0;
}

// Peer provider: one region of `bytes` on each of the `n` CUDA devices `ordinals` (rank i is
// ordinals[i]), each mapped for every other one. Table entries point `table_offset` bytes into
// each region (the runtime keeps its own exchange area below that point).
JEP_EXPORT int jep_peer_init(const int* ordinals, int n, size_t bytes, size_t table_offset) {
  auto& cu = jax_ep::Cuda();
  if (!cu.loaded) return Fail(cu.load_error);
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (rt.provider != Provider::kNone) return Fail("the runtime is already initialized");
  if (n <= 0 || bytes == 0) return Fail("need at least one device and a non-empty region");
  std::vector<CUdevice> devs(n);
  for (int i = 0; i < n; ++i) {
    auto d = std::make_unique<jax_ep::DeviceState>();
    d->ordinal = ordinals[i];
    d->rank = i;
    d->world = n;
    if (jax_ep::RetainPrimary(ordinals[i], &devs[i], &d->ctx) != 0) {
      jax_ep::ReleaseLocked(rt);
      return -1;
    }
    rt.devices.push_back(std::move(d));
  }
  rt.provider = Provider::kPeer;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      int can = 0;
      cu.cuDeviceCanAccessPeer(&can, devs[i], devs[j]);
      if (!can) {
        jax_ep::ReleaseLocked(rt);
        return Fail("CUDA device " + std::to_string(ordinals[i]) + " cannot access device " +
                    std::to_string(ordinals[j]) + " (no P2P): the peer provider needs NVLink/P2P "
                    "between every pair of devices");
      }
    }
  std::vector<CUmemAccessDesc> access(n);
  for (int j = 0; j < n; ++j) {
    access[j].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access[j].location.id = ordinals[j];
    access[j].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  }
  auto fail = [&](CUresult r, const char* what) {
    std::string msg = std::string(what) + ": " + jax_ep::CuErr(r);
    jax_ep::ReleaseLocked(rt);
    return Fail(msg);
  };
  for (int i = 0; i < n; ++i) {
    auto* d = rt.devices[i].get();
    jax_ep::ScopedContext scope(d->ctx);
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinals[i];
    size_t gran = 0;
    CUresult r = cu.cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    if (r != CUDA_SUCCESS) return fail(r, "cuMemGetAllocationGranularity");
    size_t size = (bytes + gran - 1) / gran * gran;
    if ((r = cu.cuMemCreate(&d->vmm_handle, size, &prop, 0)) != CUDA_SUCCESS)
      return fail(r, "cuMemCreate (out of GPU memory? lower XLA_PYTHON_CLIENT_MEM_FRACTION)");
    d->vmm_size = size;
    if ((r = cu.cuMemAddressReserve(&d->base, size, gran, 0, 0)) != CUDA_SUCCESS)
      return fail(r, "cuMemAddressReserve");
    if ((r = cu.cuMemMap(d->base, size, 0, d->vmm_handle, 0)) != CUDA_SUCCESS) return fail(r, "cuMemMap");
    if ((r = cu.cuMemSetAccess(d->base, size, access.data(), n)) != CUDA_SUCCESS)
      return fail(r, "cuMemSetAccess");
    d->bytes = bytes;
  }
  for (auto& d : rt.devices) {
    d->host_table.resize(n);
    for (int j = 0; j < n; ++j)
      d->host_table[j] = static_cast<int64_t>(rt.devices[j]->base + table_offset);
    if (jax_ep::UploadTable(d.get()) != 0) {
      std::string msg = jax_ep::g_last_error;
      jax_ep::ReleaseLocked(rt);
      return Fail(msg);
    }
  }
  return 0;
}

// Loads libnvshmem_host.so.3 from `path` (or by soname when path is empty).
JEP_EXPORT int jep_nvshmem_open(const char* path) {
#if JAX_EP_WITH_NVSHMEM
  auto& api = jax_ep::g_nvshmem;
  if (api.handle != nullptr) return 0;
  const char* name = (path && *path) ? path : "libnvshmem_host.so.3";
  // RTLD_LOCAL: libnvshmem_host carries a static CUDA runtime whose symbols must not interpose.
  void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) return Fail(std::string("cannot load ") + name + ": " + dlerror());
  std::string missing;
#define JEP_NVSHMEM_SYM(field, sym)                                              \
  api.field = reinterpret_cast<decltype(api.field)>(dlsym(h, #sym));             \
  if (api.field == nullptr) missing += " " #sym;
  JEP_NVSHMEM_SYM(get_uniqueid, nvshmemx_get_uniqueid)
  JEP_NVSHMEM_SYM(set_attr_uniqueid_args, nvshmemx_set_attr_uniqueid_args)
  JEP_NVSHMEM_SYM(hostlib_init_attr, nvshmemx_hostlib_init_attr)
  JEP_NVSHMEM_SYM(hostlib_finalize, nvshmemx_hostlib_finalize)
  JEP_NVSHMEM_SYM(init_status, nvshmemx_init_status)
  JEP_NVSHMEM_SYM(malloc, nvshmem_malloc)
  JEP_NVSHMEM_SYM(free, nvshmem_free)
  JEP_NVSHMEM_SYM(ptr, nvshmem_ptr)
  JEP_NVSHMEM_SYM(my_pe, nvshmem_my_pe)
  JEP_NVSHMEM_SYM(n_pes, nvshmem_n_pes)
  JEP_NVSHMEM_SYM(barrier_all, nvshmem_barrier_all)
  JEP_NVSHMEM_SYM(cumodule_init, nvshmemx_cumodule_init)
  JEP_NVSHMEM_SYM(cumodule_finalize, nvshmemx_cumodule_finalize)
#undef JEP_NVSHMEM_SYM
  if (!missing.empty()) return Fail(std::string(name) + " lacks:" + missing);
  api.handle = h;
  return 0;
#else
  (void)path;
  return Fail("this build of the jax_ep FFI library has no NVSHMEM support (built without its headers)");
#endif
}

JEP_EXPORT size_t jep_nvshmem_uniqueid_size() {
#if JAX_EP_WITH_NVSHMEM
  return sizeof(nvshmemx_uniqueid_t);
#else
  return 0;
#endif
}

// Rank 0 only: writes a fresh NVSHMEM unique id (jep_nvshmem_uniqueid_size() bytes) to `out`.
JEP_EXPORT int jep_nvshmem_get_uniqueid(void* out) {
#if JAX_EP_WITH_NVSHMEM
  if (jax_ep::g_nvshmem.handle == nullptr) return Fail("call jep_nvshmem_open first");
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (jax_ep::g_nvshmem.get_uniqueid(&id) != 0) return Fail("nvshmemx_get_uniqueid failed");
  std::memcpy(out, &id, sizeof(id));
  return 0;
#else
  (void)out;
  return Fail("no NVSHMEM support in this build");
#endif
}

// NVSHMEM provider: joins the NVSHMEM job (once per process) as PE `rank` of `world` on CUDA
// device `ordinal`, then allocates `bytes` of symmetric memory (collective: every PE must call
// this with the same `bytes`). Table entries point `table_offset` bytes into each region.
JEP_EXPORT int jep_nvshmem_init(int ordinal, int rank, int world, const void* uid, size_t bytes,
                                size_t table_offset) {
#if JAX_EP_WITH_NVSHMEM
  auto& api = jax_ep::g_nvshmem;
  auto& cu = jax_ep::Cuda();
  if (!cu.loaded) return Fail(cu.load_error);
  if (api.handle == nullptr) return Fail("call jep_nvshmem_open first");
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (rt.provider != Provider::kNone) return Fail("the runtime is already initialized");
  auto d = std::make_unique<jax_ep::DeviceState>();
  CUdevice dev;
  if (jax_ep::RetainPrimary(ordinal, &dev, &d->ctx) != 0) return -1;
  // Until `d` joins rt.devices (ReleaseLocked's list), an early return releases the context here.
  struct ReleaseUnlessKept {
    CUdevice dev;
    bool kept = false;
    ~ReleaseUnlessKept() {
      if (!kept) jax_ep::Cuda().cuDevicePrimaryCtxRelease(dev);
    }
  } retained{dev};
  d->ordinal = ordinal;
  jax_ep::ScopedContext scope(d->ctx);
  if (!jax_ep::g_nvshmem_initialized) {
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    nvshmemx_uniqueid_t id;
    std::memcpy(&id, uid, sizeof(id));
    if (api.set_attr_uniqueid_args(rank, world, &id, &attr) != 0)
      return Fail("nvshmemx_set_attr_uniqueid_args failed");
    if (api.hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0)
      return Fail("nvshmemx_hostlib_init_attr failed (set NVSHMEM_DEBUG=INFO for details; on one host "
                  "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo often helps)");
    jax_ep::g_nvshmem_initialized = true;
    jax_ep::g_nvshmem_rank = api.my_pe();
    jax_ep::g_nvshmem_world = api.n_pes();
  }
  if (jax_ep::g_nvshmem_rank != rank || jax_ep::g_nvshmem_world != world)
    return Fail("NVSHMEM is initialized as PE " + std::to_string(jax_ep::g_nvshmem_rank) + " of " +
                std::to_string(jax_ep::g_nvshmem_world) + ", not " + std::to_string(rank) + " of " +
                std::to_string(world));
  void* base = api.malloc(bytes);  // collective
  if (base == nullptr)
    return Fail("nvshmem_malloc(" + std::to_string(bytes) + ") failed: raise NVSHMEM_SYMMETRIC_SIZE (bytes "
                "per GPU, read when NVSHMEM initializes, i.e. before the first "
                "jax_ep.runtime.initialize of the process)");
  d->rank = rank;
  d->world = world;
  d->base = reinterpret_cast<CUdeviceptr>(base);
  d->bytes = bytes;
  d->host_table.resize(world);
  for (int pe = 0; pe < world; ++pe) {
    void* peer = api.ptr(base, pe);  // NULL: not load/store reachable (another node)
    d->host_table[pe] = peer ? reinterpret_cast<int64_t>(peer) + static_cast<int64_t>(table_offset) : 0;
  }
  rt.devices.push_back(std::move(d));
  retained.kept = true;
  rt.provider = Provider::kNvshmem;
  if (jax_ep::UploadTable(rt.devices[0].get()) != 0) {
    std::string msg = jax_ep::g_last_error;
    jax_ep::ReleaseLocked(rt);
    return Fail(msg);
  }
  api.barrier_all();  // every PE has zeroed its region before anyone writes into it
  return 0;
#else
  (void)ordinal, (void)rank, (void)world, (void)uid, (void)bytes, (void)table_offset;
  return Fail("no NVSHMEM support in this build");
#endif
}

// Frees the symmetric memory and the loaded modules (collective for the NVSHMEM provider).
// NVSHMEM itself stays initialized until jep_nvshmem_finalize (process exit).
JEP_EXPORT int jep_shutdown() {
  auto& rt = State();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (rt.provider == Provider::kNone && rt.kernels.empty()) return 0;
  if (!jax_ep::Cuda().loaded) return 0;
  return jax_ep::ReleaseLocked(rt);
}

JEP_EXPORT int jep_nvshmem_finalize() {
#if JAX_EP_WITH_NVSHMEM
  if (jax_ep::g_nvshmem_initialized) {
    jax_ep::g_nvshmem.hostlib_finalize();
    jax_ep::g_nvshmem_initialized = false;
  }
#endif
  return 0;
}
