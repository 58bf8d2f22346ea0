// A CPU stand-in for the part of the CUDA runtime that csrc/batched_qr_kernels.cu
// uses, so the real kernel source can run on a machine without a GPU:
//
//   g++ -std=c++17 -O1 -shared -fPIC -x c++ -DKLKERN_CUDA_EMULATION
//       -I tests/cuda_emu -I csrc csrc/batched_qr_kernels.cu -o libqr_emu.so
//
// (this file shadows the toolkit's cuda_runtime.h through -I). Host pointers
// stand in for device pointers; launches run synchronously. Every CUDA thread
// of a block is a fiber (ucontext) on one OS thread, switched only at
// __syncthreads() and warp shuffles, so runs are deterministic. Checks that a
// GPU would not report reliably:
//   * a barrier not reached by every thread (divergent __syncthreads, a
//     shuffle not executed by all 32 lanes, a thread exiting while others
//     wait) fails the launch instead of hanging or silently misbehaving;
//   * dynamic shared memory starts filled with 0xff bytes (NaN in float and
//     double), so reading it before writing shows up as NaN;
//   * writes past the requested dynamic shared memory fail the launch;
//   * a launch asking for more dynamic shared memory than the emulated
//     device's opt-in limit (env KLKERN_EMU_MAX_SMEM, default 232448 = H100)
//     fails, as it would on the device;
//   * between two __syncthreads() each warp runs to the barrier before the
//     next warp starts (warps in order 0, 1, ...; KLKERN_EMU_ORDER=reverse:
//     last warp and last lane first): a result that differs between the two
//     orders reveals a missing barrier (a data race between warps).
// A failed launch sets the error that cudaGetLastError() returns and a
// message readable with klkern_emu_last_message(); klkern_emu_launches(name)
// counts the launches of each launch-site kernel variable.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr int warpSize = 32;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace klkern_emu {

enum class FiberState { runnable, block_barrier, warp_barrier, done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned tid = 0;
  FiberState state = FiberState::runnable;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kCanaryBytes = 256;

struct Runtime {
  cudaError_t last_error = cudaSuccess;
  std::string message;
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> shuffle_slots;  // one per thread
  std::map<std::string, long> launches;  // per name at the launch site
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline int max_smem() {
  const char* s = std::getenv("KLKERN_EMU_MAX_SMEM");
  return s ? std::atoi(s) : 232448;
}

inline void fail(cudaError_t err, const std::string& msg) {
  Runtime& r = rt();
  if (r.last_error == cudaSuccess) {
    r.last_error = err;
    r.message = msg;
  }
}

inline unsigned char* dynamic_smem() { return rt().smem.data(); }

inline void yield_to_scheduler() {
  Fiber* f = rt().current;
  swapcontext(&f->ctx, &rt().scheduler);
}

inline void fiber_entry() {
  (*rt().body)();
  rt().current->state = FiberState::done;
  // returning resumes uc_link (the scheduler)
}

// Runs one block; false (with the error set) if the threads could not all finish.
inline bool run_block(unsigned nthreads, const std::function<void()>& body) {
  Runtime& r = rt();
  r.fibers.assign(nthreads, Fiber());
  r.shuffle_slots.assign(nthreads, 0);
  r.body = &body;
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.tid = t;
    f.stack = static_cast<char*>(std::malloc(kStackBytes));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const char* order_env = std::getenv("KLKERN_EMU_ORDER");
  const bool reverse = order_env && std::strcmp(order_env, "reverse") == 0;
  bool ok = true;
  const unsigned nwarps = nthreads / 32;
  for (;;) {
    // Each warp in turn runs until all its threads wait at __syncthreads() (or
    // finish): a warp runs ahead of the others as far as a GPU may let it, so
    // a missing barrier between warps changes the result with the order.
    bool ran = false;
    for (unsigned k = 0; k < nwarps; ++k) {
      const unsigned w = reverse ? nwarps - 1 - k : k;
      for (;;) {
        bool lane_ran = false;
        for (unsigned j = 0; j < 32; ++j) {
          Fiber& f = r.fibers[w * 32 + (reverse ? 31 - j : j)];
          if (f.state != FiberState::runnable) continue;
          threadIdx = dim3(f.tid);
          r.current = &f;
          swapcontext(&r.scheduler, &f.ctx);
          lane_ran = ran = true;
        }
        unsigned at_warp = 0;
        for (unsigned l = 0; l < 32; ++l) at_warp += r.fibers[w * 32 + l].state == FiberState::warp_barrier;
        if (at_warp == 32) {  // a shuffle every lane has reached
          for (unsigned l = 0; l < 32; ++l) r.fibers[w * 32 + l].state = FiberState::runnable;
          continue;
        }
        if (!lane_ran) break;
      }
    }
    if (ran) continue;
    unsigned done = 0, at_block = 0;
    for (const Fiber& f : r.fibers) {
      done += f.state == FiberState::done;
      at_block += f.state == FiberState::block_barrier;
    }
    if (done == nthreads) break;
    if (at_block == nthreads) {
      for (Fiber& f : r.fibers) f.state = FiberState::runnable;
      continue;
    }
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  "emulation: barrier deadlock in block (%u,%u,%u): %u threads done, %u at __syncthreads, "
                  "%u in a warp shuffle",
                  blockIdx.x, blockIdx.y, blockIdx.z, done, at_block, nthreads - done - at_block);
    fail(cudaErrorLaunchFailure, buf);
    ok = false;
    break;
  }
  for (Fiber& f : r.fibers) std::free(f.stack);
  r.fibers.clear();
  r.current = nullptr;
  return ok;
}

inline void launch(const char* name, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  Runtime& r = rt();
  ++r.launches[name];
  const unsigned nthreads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) {
    fail(cudaErrorInvalidConfiguration, "emulation: blocks must be 1-D with a multiple of 32 threads, at most 1024");
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "emulation: invalid grid");
    return;
  }
  if ((long long)smem_bytes > max_smem()) {
    fail(cudaErrorInvalidValue, "emulation: dynamic shared memory above the device limit");
    return;
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        r.smem.assign(smem_bytes + kCanaryBytes, 0xff);
        if (!run_block(nthreads, body)) return;
        for (size_t k = smem_bytes; k < smem_bytes + kCanaryBytes; ++k)
          if (r.smem[k] != 0xff) {
            fail(cudaErrorLaunchFailure, "emulation: write past the end of dynamic shared memory");
            return;
          }
      }
}

}  // namespace klkern_emu

inline void __syncthreads() {
  klkern_emu::rt().current->state = klkern_emu::FiberState::block_barrier;
  klkern_emu::yield_to_scheduler();
}

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  klkern_emu::Runtime& r = klkern_emu::rt();
  if (mask != 0xffffffffu || width != 32) klkern_emu::fail(cudaErrorLaunchFailure, "emulation: partial shuffle");
  const unsigned tid = r.current->tid, warp_base = tid / 32 * 32;
  std::memcpy(&r.shuffle_slots[tid], &value, sizeof(T));
  r.current->state = klkern_emu::FiberState::warp_barrier;  // every lane has written its value
  klkern_emu::yield_to_scheduler();
  T out;
  std::memcpy(&out, &r.shuffle_slots[warp_base + (unsigned)src_lane % 32], sizeof(T));
  r.current->state = klkern_emu::FiberState::warp_barrier;  // every lane has read before slots are reused
  klkern_emu::yield_to_scheduler();
  return out;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  const int lane = (int)(klkern_emu::rt().current->tid % 32);
  return __shfl_sync(mask, value, lane ^ lane_mask, width);
}

inline cudaError_t cudaGetLastError() {
  cudaError_t e = klkern_emu::rt().last_error;
  klkern_emu::rt().last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = klkern_emu::max_smem();
  return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  (void)func;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > klkern_emu::max_smem())
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  (void)stream;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

extern "C" const char* klkern_emu_last_message() { return klkern_emu::rt().message.c_str(); }

// Launches since the last reset of the kernel named `name` at the launch site
// (the launcher's kernel variable, e.g. "panel_global").
extern "C" long klkern_emu_launches(const char* name) {
  auto it = klkern_emu::rt().launches.find(name);
  return it == klkern_emu::rt().launches.end() ? 0 : it->second;
}

extern "C" void klkern_emu_reset_launches() { klkern_emu::rt().launches.clear(); }
