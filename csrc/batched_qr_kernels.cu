// klkern batched Householder QR (float32 / float64), explicit Q with diag(R) >= 0.
//
// Only the CUDA runtime is included, so this file compiles with plain nvcc
// (CI: nvcc -c -arch=sm_80 / sm_90) and, with -DKLKERN_CUDA_EMULATION and the
// fake runtime in tests/cuda_emu/, as plain C++ that runs the kernels on the
// CPU (tests/test_qr.py). The torch binding lives in batched_qr.cpp; the
// executable specification is klkern/linalg/_qr_blocked.py, which follows this file
// function by function (its docstrings name the kernels here).
//
// Algorithm, per matrix A (m x n, row-major, m >= n), all matrices of the
// batch in every launch:
//   n <= kNB : small_qr_kernel, one block per matrix: factor the single
//              panel, form Q = (I - V T V^T) E directly, flip signs.
//   n >  kNB : for each panel of kNB columns starting at j0:
//                panel_kernel   (one block per matrix) factors A[j0:, j0:j0+nb]
//                               and builds T (I - V T V^T = H_j0 ... H_j0+nb-1);
//                form_w_kernel  W = T^T (V^T C), C = A[j0:, j0+nb:]   (grid: column tiles x batch)
//                apply_w_kernel C -= V W                               (grid: row x column tiles x batch)
//              then Q = I (identity_kernel) and, for panels last to first,
//                form_w_kernel  W = T (V^T C), C = Q[j0:, j0:]
//                apply_w_kernel C -= V W; the panel-0 call also applies the
//                               sign convention and the NaN rule.
// Reflectors follow LAPACK dlarfg (R_jj = beta = -sign(alpha) ||x||, v_0 = 1),
// with the identity reflector (tau = 0, R_jj = alpha) when the column is
// already zero below the diagonal. Element updates and dot products run in the
// input dtype (float32 steps whose norms or dots near under/overflow are
// redone in double, see needs_rescue); per-column scalars and T in double.

#include <cuda_runtime.h>

#include <float.h>
#include <math.h>
#include <stdint.h>

#include "batched_qr_kernels.h"

#ifdef KLKERN_CUDA_EMULATION
#define KLKERN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  klkern_emu::launch(#kernel, (grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
#define KLKERN_DYNAMIC_SMEM(name) unsigned char* name = klkern_emu::dynamic_smem()
#else
#define KLKERN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define KLKERN_DYNAMIC_SMEM(name)                                 \
  extern __shared__ __align__(16) unsigned char klkern_smem_raw[]; \
  unsigned char* name = klkern_smem_raw
#endif

namespace {

constexpr int kNB = 32;             // panel width; lane c of a warp owns panel column c
constexpr int kWarp = 32;
constexpr int kPanelMaxWarps = 32;  // panel / small kernels: up to 1024 threads
constexpr int kRowsPerWarp = 16;    // panel kernels: target rows per warp when choosing the block size
constexpr int kPassUnroll = 4;      // rows loaded together per warp in a panel pass (loads in flight)
constexpr int kTile = 64;           // GEMM tiles: 64 rows x 64 columns
constexpr int kRowChunk = 32;       // form_w_kernel: rows of V and C staged per iteration
constexpr int kGemmThreads = 256;   // apply_w_kernel: 4 x 4 outputs per thread
constexpr int kFormThreads = 128;   // form_w_kernel: 4 x 4 outputs per thread
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxGridYZ = 65535;

__device__ __forceinline__ bool is_finite(double x) { return fabs(x) <= DBL_MAX; }

__device__ __forceinline__ double shfl(double v, int src) { return __shfl_sync(kFull, v, src); }

// Element (r, c) of the unit lower-trapezoidal V stored in P (ld = ldp): the
// stored value below the diagonal, 1 on it, 0 above.
template <typename T>
__device__ __forceinline__ T v_at(const T* P, int64_t ldp, int64_t r, int c) {
  return r > c ? P[r * ldp + c] : (r == c ? T(1) : T(0));
}

// float32 panels accumulate their dot products in float, like LAPACK's
// sgeqr2. A step whose sigma (squared norm below the diagonal) or dot
// products leave [kRescueTiny, kRescueHuge] (zero, near underflow, near
// overflow, NaN/Inf) recomputes them in double before use, so tiny or huge
// columns (and exact zero columns) are handled like LAPACK's scaled norms.
constexpr double kRescueTiny = 1e-26;
constexpr double kRescueHuge = 1e30;

template <typename T>
__device__ __forceinline__ bool needs_rescue(double sigma, double s_lane) {
  if (sizeof(T) != sizeof(float)) return false;
  int out_of_range = !(fabs(s_lane) <= kRescueHuge);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) out_of_range |= __shfl_xor_sync(kFull, out_of_range, off);
  return out_of_range || !(sigma >= kRescueTiny && sigma <= kRescueHuge);
}

// ---------------------------------------------------------------------------
// Panel factorization (mirrors _qr_blocked._factor_panel).
//
// Householder QR of the rows x nb panel P (row stride ldp; shared or global
// memory), nb <= kNB, rows >= nb. On return: R on and above the diagonal, v
// below it, T (kNB x kNB, double, zero outside the nb x nb upper triangle) in
// Tm, *bad = 1 if some R_jj is not finite. Called by every thread of the
// block (blockDim.x a multiple of 32); ends with __syncthreads(). red holds
// 3 * nwarps * 32 doubles.
//
// Lane c of every warp owns column c; warp w handles rows b+1+w, b+1+w+nwarps,
// ... in the pass of step b. One block-wide reduction per step: the pass of
// step b applies H_b to rows > b (in T arithmetic) and accumulates, for the
// next step, acc_c = sum_{i > b+1} a[i][c] a[i][b+1] for every panel column c,
// which gives sigma (c = b+1), w_c (c > b+1) and the T column (c < b+1). The
// per-step scalars (beta, tau, scale, w, T) are computed in double. red is
// double-buffered by step parity (third slot: the float rescue) and row b of
// R is stored during step b + 1, so one __syncthreads() per step suffices.
// ---------------------------------------------------------------------------
template <typename T>
__device__ void factor_panel(T* P, int64_t ldp, int rows, int nb, double* red, double* Tm, int* bad) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const bool col_ok = lane < nb;
  double* rescue = red + 2 * nwarps * kWarp;

  T pending_r = T(0);  // warp 0: row b of R, stored one step late (other warps still read row b)

  for (int e = threadIdx.x; e < kNB * kNB; e += blockDim.x) Tm[e] = 0.0;

  {  // initial pass: acc for column 0 over rows > 0
    T acc = T(0);
    for (int i = 1 + warp; i < rows; i += nwarps) {
      const T x = col_ok ? P[i * ldp + lane] : T(0);
      acc += x * __shfl_sync(kFull, x, 0);
    }
    red[warp * kWarp + lane] = (double)acc;
  }
  __syncthreads();

  for (int b = 0; b < nb; ++b) {
    // Serial part, computed redundantly (and identically) by every warp: no second barrier.
    const double* rb = red + (b & 1) * nwarps * kWarp;
    double s = 0.0;
    for (int w = 0; w < nwarps; ++w) s += rb[w * kWarp + lane];
    const double rowb = col_ok ? (double)P[b * ldp + lane] : 0.0;
    const double alpha = shfl(rowb, b);
    double sigma = shfl(s, b);
    if (needs_rescue<T>(sigma, s)) {  // block-uniform: same data in every warp
      double acc = 0.0;
      for (int i = b + 1 + warp; i < rows; i += nwarps) {
        const double x = col_ok ? (double)P[i * ldp + lane] : 0.0;
        acc += x * shfl(x, b);
      }
      rescue[warp * kWarp + lane] = acc;
      __syncthreads();
      s = 0.0;
      for (int w = 0; w < nwarps; ++w) s += rescue[w * kWarp + lane];
      sigma = shfl(s, b);
    }
    double beta, tau, scale;
    if (sigma == 0.0) {  // already zero below the diagonal: identity reflector, no division
      beta = alpha;
      tau = 0.0;
      scale = 0.0;
    } else {
      const double nrm = sqrt(alpha * alpha + sigma);
      beta = alpha >= 0.0 ? -nrm : nrm;
      tau = (beta - alpha) / beta;
      scale = 1.0 / (alpha - beta);
    }
    const double base = rowb + scale * s;  // lane c > b: v_b^T a_c ; lane c < b: v_c^T v_b
    const double wc = tau * base;

    if (warp == 0) {
      // Row b of R, computed last step, is stored now: every warp has read row
      // b - 1 before the barrier that ended that step.
      if (b > 0 && col_ok && lane >= b - 1) P[(b - 1) * ldp + lane] = pending_r;
      // T column b (dlarft): T[0:b, b] = -tau T[0:b, 0:b] z, z_l = v_l^T v_b.
      double tcol = 0.0;
      for (int l = 0; l < nb; ++l) {
        const double zl = shfl(base, l);
        if (lane < b && l >= lane && l < b) tcol += Tm[lane * kNB + l] * zl;
      }
      if (lane < b) Tm[lane * kNB + b] = -tau * tcol;
      if (lane == b) {
        Tm[b * kNB + b] = tau;
        if (!is_finite(beta)) *bad = 1;
      }
      // Row b of R: R_bb = beta; a[b][c] -= w_c v_b[b] (v_b[b] = 1) for c > b.
      pending_r = lane == b ? (T)beta : (T)(rowb - wc);
    }

    // Pass over rows > b: v_b = x * scale, a_c -= v_b w_c for c > b; next step's acc.
    const T scale_t = (T)scale, wc_t = (T)wc;
    const bool has_next = b + 1 < nb;
    const int next = has_next ? b + 1 : b;
    T acc = T(0);
    for (int i0 = b + 1 + warp; i0 < rows; i0 += kPassUnroll * nwarps) {
      T x[kPassUnroll];
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int i = i0 + u * nwarps;
        x[u] = (col_ok && i < rows) ? P[i * ldp + lane] : T(0);
      }
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int i = i0 + u * nwarps;  // warp-uniform
        if (i < rows) {
          T xt = x[u];
          const T vb = __shfl_sync(kFull, xt, b) * scale_t;
          if (lane == b) xt = vb;
          else if (lane > b) xt -= vb * wc_t;
          if (col_ok && lane >= b) P[i * ldp + lane] = xt;
          const T y = __shfl_sync(kFull, xt, next);
          if (has_next && i > b + 1) acc += xt * y;
        }
      }
    }
    red[((b + 1) & 1) * nwarps * kWarp + warp * kWarp + lane] = (double)acc;
    __syncthreads();
  }
  if (warp == 0 && col_ok && lane >= nb - 1) P[(nb - 1) * ldp + lane] = pending_r;
  __syncthreads();
}

// Shared-memory layout of the panel and small kernels (bytes): red (two
// parity slots and the rescue slot), Tm, [Y (small kernel)], [panel copy
// (SMEM variants)].
__host__ __device__ inline int64_t red_bytes(int nwarps) { return 3 * (int64_t)nwarps * kWarp * sizeof(double); }
constexpr int64_t kTmBytes = (int64_t)kNB * kNB * sizeof(double);

template <typename T>
__device__ void copy_panel(T* dst, int64_t ldd, const T* src, int64_t lds, int rows, int nb) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  if (lane < nb)
    for (int i = warp; i < rows; i += nwarps) dst[i * ldd + lane] = src[i * lds + lane];
}

// One block per matrix: factor panel [j0, j0 + nb) of A, write T to Tpanel.
// SMEM: the panel is staged in shared memory (fits when rows * kNB * sizeof(T)
// plus the reductions fit the device's opt-in limit); otherwise it is
// factored in place in global memory (L2-resident for one matrix).
template <typename T, bool SMEM>
__global__ void __launch_bounds__(kPanelMaxWarps * kWarp)
    panel_kernel(T* A, T* Tpanel, int* flags, int64_t m, int64_t n, int j0, int nb, int64_t t_bstride,
                 int64_t batch_offset) {
  KLKERN_DYNAMIC_SMEM(smem);
  const int64_t bz = blockIdx.x + batch_offset;
  const int rows = (int)(m - j0);
  const int nwarps = blockDim.x / kWarp;
  double* red = reinterpret_cast<double*>(smem);
  double* Tm = reinterpret_cast<double*>(smem + red_bytes(nwarps));
  T* G = A + bz * m * n + (int64_t)j0 * n + j0;
  T* P = G;
  int64_t ldp = n;
  if (SMEM) {
    P = reinterpret_cast<T*>(smem + red_bytes(nwarps) + kTmBytes);
    ldp = kNB;
    copy_panel(P, ldp, G, n, rows, nb);
    __syncthreads();
  }
  factor_panel(P, ldp, rows, nb, red, Tm, flags + bz);
  T* Tout = Tpanel + bz * t_bstride;
  for (int e = threadIdx.x; e < kNB * kNB; e += blockDim.x) Tout[e] = (T)Tm[e];
  if (SMEM) copy_panel(G, n, P, ldp, rows, nb);
}

// n <= kNB: one block per matrix does everything (mirrors the n <= nb branch
// of blocked_householder_qr and _qr_blocked._small_q): factor, then
// Q = E - V Y with Y = T V1^T (V1 = the top n x n of V), sign flip, NaN rule.
template <typename T, bool SMEM>
__global__ void __launch_bounds__(kPanelMaxWarps * kWarp)
    small_qr_kernel(T* A, T* Q, int64_t m, int64_t n, int64_t batch_offset) {
  KLKERN_DYNAMIC_SMEM(smem);
  const int64_t bz = blockIdx.x + batch_offset;
  const int rows = (int)m, nb = (int)n;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  double* red = reinterpret_cast<double*>(smem);
  double* Tm = reinterpret_cast<double*>(smem + red_bytes(nwarps));
  double* Y = reinterpret_cast<double*>(smem + red_bytes(nwarps) + kTmBytes);
  int* bad = reinterpret_cast<int*>(smem + red_bytes(nwarps) + 2 * kTmBytes);
  T* G = A + bz * m * n;
  T* P = G;
  int64_t ldp = n;
  if (threadIdx.x == 0) *bad = 0;
  if (SMEM) {
    P = reinterpret_cast<T*>(smem + red_bytes(nwarps) + 2 * kTmBytes + 16);
    ldp = kNB;
    copy_panel(P, ldp, G, n, rows, nb);
  }
  __syncthreads();
  factor_panel(P, ldp, rows, nb, red, Tm, bad);

  // Y[k][c] = sum_{l=k}^{c} T[k][l] V1[c][l]  (zero for k > c)
  for (int e = threadIdx.x; e < kNB * kNB; e += blockDim.x) {
    const int k = e / kNB, c = e % kNB;
    double y = 0.0;
    if (k < nb && c < nb)
      for (int l = k; l <= c; ++l) y += Tm[k * kNB + l] * (double)v_at(P, ldp, c, l);
    Y[e] = y;
  }
  __syncthreads();

  const bool col_ok = lane < nb;
  const double diag = col_ok ? (double)P[lane * ldp + lane] : 0.0;
  const double sign = diag < 0.0 ? -1.0 : 1.0;
  const bool poisoned = *bad != 0;
  T* Qb = Q + bz * m * n;
  for (int i = warp; i < rows; i += nwarps) {
    const double x = col_ok ? (double)P[i * ldp + lane] : 0.0;
    const double vk = (lane < i) ? x : (lane == i ? 1.0 : 0.0);  // V[i][lane]
    double q = (i == lane) ? 1.0 : 0.0;
    const int kmax = i + 1 < nb ? i + 1 : nb;  // V[i][k] = 0 for k > i; warp-uniform
    for (int k = 0; k < kmax; ++k) q -= shfl(vk, k) * Y[k * kNB + lane];
    if (col_ok) Qb[i * n + lane] = poisoned ? (T)NAN : (T)(q * sign);
  }
}

// W = op(T) (V^T C) for one 64-column tile of C (rows x ncols, ld n) and one
// matrix: op(T) = T^T (trailing update of R) or T (forming Q). Rows are
// streamed in chunks of kRowChunk; thread (kq = tid / 16, cq = tid % 16) owns
// the 4 x 4 register tile W[4 kq + i][cq + 16 j]. W goes to Wbuf (kNB x n per
// matrix, ld n).
template <typename T, bool TRANS_T>
__global__ void __launch_bounds__(kFormThreads)
    form_w_kernel(const T* A, const T* C, T* Wbuf, const T* Tpanel, int64_t m, int64_t n, int j0, int nb,
                  int rows, int ncols, int64_t t_bstride, int64_t batch_offset) {
  KLKERN_DYNAMIC_SMEM(smem);
  constexpr int kLdV = kNB + 1;  // padding: no bank conflicts on column reads
  T* Vs = reinterpret_cast<T*>(smem);             // kRowChunk x kLdV
  T* Cs = Vs + kRowChunk * kLdV;                  // kRowChunk x kTile, reused as W (kNB x kTile)
  T* Ts = Cs + kRowChunk * kTile;                 // kNB x kLdV
  const int64_t bz = blockIdx.y + batch_offset;
  const int tid = threadIdx.x, kq = tid / 16, cq = tid % 16;
  const int n0 = blockIdx.x * kTile;
  const T* Vp = A + bz * m * n + (int64_t)j0 * n + j0;
  const T* Cp = C + bz * m * n;
  const T* Tp = Tpanel + bz * t_bstride;
  for (int e = tid; e < kNB * kNB; e += kFormThreads) Ts[(e / kNB) * kLdV + e % kNB] = Tp[e];

  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int r0 = 0; r0 < rows; r0 += kRowChunk) {
    for (int e = tid; e < kRowChunk * kNB; e += kFormThreads) {
      const int rr = e / kNB, kc = e % kNB, r = r0 + rr;
      Vs[rr * kLdV + kc] = (r < rows && kc < nb) ? v_at(Vp, n, r, kc) : T(0);
    }
    for (int e = tid; e < kRowChunk * kTile; e += kFormThreads) {
      const int rr = e / kTile, cc = e % kTile, r = r0 + rr, c = n0 + cc;
      Cs[rr * kTile + cc] = (r < rows && c < ncols) ? Cp[(int64_t)r * n + c] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int rr = 0; rr < kRowChunk; ++rr) {
      T v[4], x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = Vs[rr * kLdV + 4 * kq + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = Cs[rr * kTile + cq + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += v[i] * x[j];
    }
    __syncthreads();
  }
  T* Ws = Cs;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Ws[(4 * kq + i) * kTile + cq + 16 * j] = acc[i][j];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
#pragma unroll 4
  for (int l = 0; l < kNB; ++l) {
    T t[4], w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] = TRANS_T ? Ts[l * kLdV + 4 * kq + i] : Ts[(4 * kq + i) * kLdV + l];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = Ws[l * kTile + cq + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += t[i] * w[j];
  }
  T* Wp = Wbuf + bz * kNB * n;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = 4 * kq + i, c = n0 + cq + 16 * j;
      if (k < nb && c < ncols) Wp[(int64_t)k * n + c] = acc[i][j];
    }
}

// C -= V W for one 64 x 64 tile of C (rows x ncols, ld n); thread
// (ty = tid / 16, tx = tid % 16) owns rows ty + 16 i and columns tx + 16 j.
// finalize (the last Q update, j0 = 0): column c is negated where R_cc < 0 and
// a matrix flagged non-finite gets NaN.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    apply_w_kernel(const T* A, T* C, const T* Wbuf, const int* flags, int64_t m, int64_t n, int j0, int nb,
                   int rows, int ncols, int finalize, int64_t batch_offset) {
  KLKERN_DYNAMIC_SMEM(smem);
  constexpr int kLdV = kNB + 1;
  T* Vs = reinterpret_cast<T*>(smem);  // kTile x kLdV
  T* Ws = Vs + kTile * kLdV;           // kNB x kTile
  const int64_t bz = blockIdx.z + batch_offset;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int r0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
  const T* Vp = A + bz * m * n + (int64_t)j0 * n + j0;
  const T* Wp = Wbuf + bz * kNB * n;
  T* Cp = C + bz * m * n;
  for (int e = tid; e < kTile * kNB; e += kGemmThreads) {
    const int rr = e / kNB, kc = e % kNB, r = r0 + rr;
    Vs[rr * kLdV + kc] = (r < rows && kc < nb) ? v_at(Vp, n, r, kc) : T(0);
  }
  for (int e = tid; e < kNB * kTile; e += kGemmThreads) {
    const int kc = e / kTile, cc = e % kTile, c = n0 + cc;
    Ws[kc * kTile + cc] = (kc < nb && c < ncols) ? Wp[(int64_t)kc * n + c] : T(0);
  }
  __syncthreads();
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
#pragma unroll 4
  for (int kc = 0; kc < kNB; ++kc) {
    T a[4], w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = Vs[(ty + 16 * i) * kLdV + kc];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = Ws[kc * kTile + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * w[j];
  }
  const bool poisoned = finalize && flags[bz] != 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = n0 + tx + 16 * j;
    if (c >= ncols) continue;
    T sign = T(1);
    if (finalize) sign = A[bz * m * n + (int64_t)(j0 + c) * n + (j0 + c)] < T(0) ? T(-1) : T(1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + ty + 16 * i;
      if (r >= rows) continue;
      T* dst = Cp + (int64_t)r * n + c;
      const T val = (*dst - acc[i][j]) * sign;
      *dst = poisoned ? (T)NAN : val;
    }
  }
}

template <typename T>
__global__ void identity_kernel(T* Q, int64_t batch, int64_t m, int64_t n) {
  const int64_t total = batch * m * n;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = e % n, r = (e / n) % m;
    Q[e] = r == c ? T(1) : T(0);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Workspace {
  int* flags;
  void* tbuf;
  void* wbuf;
};

// Layout: flags (batch ints) | T per panel (batch x npanels x kNB x kNB) | W (batch x kNB x n).
int64_t workspace_layout(int64_t batch, int64_t m, int64_t n, int64_t elem, void* base, Workspace* ws) {
  (void)m;
  const int64_t npanels = ceil_div(n, kNB);
  const int64_t flags_bytes = align_up(batch * (int64_t)sizeof(int), 256);
  const int64_t t_bytes = align_up(batch * npanels * kNB * kNB * elem, 256);
  const int64_t w_bytes = n > kNB ? align_up(batch * kNB * n * elem, 256) : 0;
  if (ws != nullptr) {
    unsigned char* p = static_cast<unsigned char*>(base);
    ws->flags = reinterpret_cast<int*>(p);
    ws->tbuf = p + flags_bytes;
    ws->wbuf = p + flags_bytes + t_bytes;
  }
  return flags_bytes + t_bytes + w_bytes;
}

bool sizes_ok(int64_t batch, int64_t m, int64_t n) {
  // rows and columns are held in int; apply_w_kernel puts row tiles in gridDim.y.
  return batch >= 0 && n >= 1 && m >= n && m <= (int64_t)kTile * kMaxGridYZ && n <= 0x7fffffff;
}

int panel_threads(int rows) {
  int64_t warps = ceil_div(rows, kRowsPerWarp);
  if (warps < 1) warps = 1;
  if (warps > kPanelMaxWarps) warps = kPanelMaxWarps;
  return (int)warps * kWarp;
}

template <typename T>
cudaError_t run_batched_qr(T* A, T* Q, void* workspace, int64_t workspace_bytes, int64_t batch, int64_t m,
                           int64_t n, cudaStream_t stream) {
  if (!sizes_ok(batch, m, n) || A == nullptr || Q == nullptr) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  Workspace ws;
  if (workspace == nullptr || workspace_bytes < workspace_layout(batch, m, n, sizeof(T), workspace, &ws))
    return cudaErrorInvalidValue;
  cudaGetLastError();  // clear a stale error so the final check reports ours

  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;

  const int64_t npanels = ceil_div(n, kNB);
  const int64_t t_bstride = npanels * kNB * kNB;
  T* tbuf = static_cast<T*>(ws.tbuf);
  T* wbuf = static_cast<T*>(ws.wbuf);

  if (n <= kNB) {
    const int threads = panel_threads((int)m);
    const int64_t base = red_bytes(threads / kWarp) + 2 * kTmBytes + 16;
    const int64_t with_panel = base + m * kNB * (int64_t)sizeof(T);
    if (with_panel <= max_smem) {
      void (*small_smem)(T*, T*, int64_t, int64_t, int64_t) = small_qr_kernel<T, true>;
      err = cudaFuncSetAttribute(reinterpret_cast<const void*>(small_smem),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)with_panel);
      if (err != cudaSuccess) return err;
      KLKERN_LAUNCH(small_smem, dim3((unsigned)batch), dim3(threads), (size_t)with_panel, stream, A, Q, m, n,
                    (int64_t)0);
    } else {
      void (*small_global)(T*, T*, int64_t, int64_t, int64_t) = small_qr_kernel<T, false>;
      KLKERN_LAUNCH(small_global, dim3((unsigned)batch), dim3(threads), (size_t)base, stream, A, Q, m, n,
                    (int64_t)0);
    }
    return cudaGetLastError();
  }

  err = cudaMemsetAsync(ws.flags, 0, batch * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  void (*panel_smem)(T*, T*, int*, int64_t, int64_t, int, int, int64_t, int64_t) = panel_kernel<T, true>;
  void (*panel_global)(T*, T*, int*, int64_t, int64_t, int, int, int64_t, int64_t) = panel_kernel<T, false>;
  void (*form_wt)(const T*, const T*, T*, const T*, int64_t, int64_t, int, int, int, int, int64_t, int64_t) =
      form_w_kernel<T, true>;
  void (*form_w)(const T*, const T*, T*, const T*, int64_t, int64_t, int, int, int, int, int64_t, int64_t) =
      form_w_kernel<T, false>;
  void (*apply_w)(const T*, T*, const T*, const int*, int64_t, int64_t, int, int, int, int, int, int64_t) =
      apply_w_kernel<T>;
  err = cudaFuncSetAttribute(reinterpret_cast<const void*>(panel_smem), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             max_smem);
  if (err != cudaSuccess) return err;
  const size_t form_smem = (size_t)(kRowChunk * (kNB + 1) + kRowChunk * kTile + kNB * (kNB + 1)) * sizeof(T);
  const size_t apply_smem = (size_t)(kTile * (kNB + 1) + kNB * kTile) * sizeof(T);

  // Trailing update C <- (I - V op(T) V^T) C over the whole batch, in batch chunks of the grid limit.
  auto block_reflector = [&](int64_t k, T* C, int rows, int ncols, bool trans_t, bool finalize) {
    const int j0 = (int)(k * kNB), nb = (int)(n - j0 < kNB ? n - j0 : kNB);
    const T* tpanel = tbuf + k * kNB * kNB;
    for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
      const int64_t chunk = batch - b0 < kMaxGridYZ ? batch - b0 : kMaxGridYZ;
      const dim3 fgrid((unsigned)ceil_div(ncols, kTile), (unsigned)chunk);
      if (trans_t)
        KLKERN_LAUNCH(form_wt, fgrid, dim3(kFormThreads), form_smem, stream, A, C, wbuf, tpanel, m, n, j0, nb, rows,
                      ncols, t_bstride, b0);
      else
        KLKERN_LAUNCH(form_w, fgrid, dim3(kFormThreads), form_smem, stream, A, C, wbuf, tpanel, m, n, j0, nb, rows,
                      ncols, t_bstride, b0);
      const dim3 agrid((unsigned)ceil_div(ncols, kTile), (unsigned)ceil_div(rows, kTile), (unsigned)chunk);
      KLKERN_LAUNCH(apply_w, agrid, dim3(kGemmThreads), apply_smem, stream, A, C, wbuf, ws.flags, m, n, j0, nb,
                    rows, ncols, finalize ? 1 : 0, b0);
    }
  };

  for (int64_t k = 0; k < npanels; ++k) {
    const int j0 = (int)(k * kNB), nb = (int)(n - j0 < kNB ? n - j0 : kNB);
    const int rows = (int)(m - j0);
    const int threads = panel_threads(rows);
    const int64_t base = red_bytes(threads / kWarp) + kTmBytes;
    const int64_t with_panel = base + (int64_t)rows * kNB * (int64_t)sizeof(T);
    if (with_panel <= max_smem)
      KLKERN_LAUNCH(panel_smem, dim3((unsigned)batch), dim3(threads), (size_t)with_panel, stream, A,
                    tbuf + k * kNB * kNB, ws.flags, m, n, j0, nb, t_bstride, (int64_t)0);
    else
      KLKERN_LAUNCH(panel_global, dim3((unsigned)batch), dim3(threads), (size_t)base, stream, A, tbuf + k * kNB * kNB,
                    ws.flags, m, n, j0, nb, t_bstride, (int64_t)0);
    if (j0 + nb < n) block_reflector(k, A + (int64_t)j0 * n + j0 + nb, rows, (int)(n - j0 - nb), true, false);
  }

  const int64_t total = batch * m * n;
  const int64_t id_blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
  void (*ident)(T*, int64_t, int64_t, int64_t) = identity_kernel<T>;
  KLKERN_LAUNCH(ident, dim3((unsigned)id_blocks), dim3(256), (size_t)0, stream, Q, batch, m, n);
  for (int64_t k = npanels - 1; k >= 0; --k) {
    const int j0 = (int)(k * kNB);
    block_reflector(k, Q + (int64_t)j0 * n + j0, (int)(m - j0), (int)(n - j0), false, k == 0);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int64_t klkern_batched_qr_workspace_bytes(int64_t batch, int64_t m, int64_t n, int64_t elem_size) {
  if (!sizes_ok(batch, m, n) || (elem_size != 4 && elem_size != 8)) return -1;
  return workspace_layout(batch, m, n, elem_size, nullptr, nullptr);
}

extern "C" int klkern_batched_qr_f32(float* A, float* Q, void* workspace, int64_t workspace_bytes, int64_t batch,
                                     int64_t m, int64_t n, cudaStream_t stream) {
  return (int)run_batched_qr<float>(A, Q, workspace, workspace_bytes, batch, m, n, stream);
}

extern "C" int klkern_batched_qr_f64(double* A, double* Q, void* workspace, int64_t workspace_bytes, int64_t batch,
                                     int64_t m, int64_t n, cudaStream_t stream) {
  return (int)run_batched_qr<double>(A, Q, workspace, workspace_bytes, batch, m, n, stream);
}

extern "C" const char* klkern_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
