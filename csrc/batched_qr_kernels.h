// klkern batched Householder QR: C launcher API of csrc/batched_qr_kernels.cu.
//
// The kernels include only the CUDA runtime, so this header is all the torch
// binding (csrc/batched_qr.cpp) needs. Every function enqueues work on
// `stream` and returns without synchronising; the return value is a
// cudaError_t code (0 = cudaSuccess, cudaErrorInvalidValue for bad sizes).
//
// Layout: A and Q are contiguous row-major batches (batch, m, n), m >= n >= 1,
// element (b, i, j) at b*m*n + i*n + j. A is overwritten with the compact
// factorization (LAPACK geqrf's layout, row-major: R on and above the
// diagonal, Householder vectors below it). Q receives the explicit
// m x n factor with diag(R) >= 0 (column j negated where R_jj < 0). A matrix
// whose R has a non-finite diagonal entry (NaN/Inf input or overflow) gets an
// all-NaN Q; the other matrices are unaffected. float32 columns of any
// magnitude are handled (near under/overflow their norms are redone in
// double); float64 norms are not rescaled, so float64 entries beyond about
// 1e+-150 lose accuracy.
#pragma once

#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of device workspace klkern_batched_qr_f32/_f64 need (elem_size 4 or 8);
// -1 for invalid sizes. The workspace needs no initialisation.
int64_t klkern_batched_qr_workspace_bytes(int64_t batch, int64_t m, int64_t n, int64_t elem_size);

int klkern_batched_qr_f32(float* A, float* Q, void* workspace, int64_t workspace_bytes, int64_t batch,
                          int64_t m, int64_t n, cudaStream_t stream);

int klkern_batched_qr_f64(double* A, double* Q, void* workspace, int64_t workspace_bytes, int64_t batch,
                          int64_t m, int64_t n, cudaStream_t stream);

// cudaGetErrorString of a code returned above.
const char* klkern_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
