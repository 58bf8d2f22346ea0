// Torch binding of the batched QR kernels (csrc/batched_qr_kernels.cu).
//
// Registers klkern::batched_qr(Tensor A) -> Tensor with a CUDA kernel: A is
// (batch, m, n), m >= n, float32 or float64, on a CUDA device; returns the
// contiguous Q (batch, m, n) with diag(R) >= 0 (see batched_qr_kernels.h for
// the contract, including NaN). The input is never modified: the kernels
// work on a contiguous copy. klkern/linalg/__init__.py reshapes any (..., m, n) input.
//
// Kept free of torch/extension.h (pybind11) and ATen/cuda/CUDAContext.h (it
// needs cuSPARSE headers): the stream comes from c10/cuda/CUDAStream.h and
// the module object for `import klkern._C` is a bare CPython module.

#include <Python.h>

#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "batched_qr_kernels.h"

namespace {

// The shape as text, formatted here with std::to_string. On the first GPU machine (H200 image,
// torch 2.11) a TORCH_CHECK message that streamed A.sizes() crashed the process (SIGSEGV)
// instead of raising, while messages of strings only (the dtype check) raised normally; no number
// goes through an ostream in these messages (tests/test_qr.py checks each error in a fresh process).
std::string shape_of(const at::Tensor& A) {
  std::string out = "[";
  for (int64_t d = 0; d < A.dim(); ++d) {
    if (d) out += ", ";
    out += std::to_string(A.size(d));
  }
  return out + "]";
}

at::Tensor batched_qr_cuda(const at::Tensor& A) {
  TORCH_CHECK(A.is_cuda(), "klkern::batched_qr: A must be a CUDA tensor, got device ", A.device().str());
  TORCH_CHECK(A.dim() == 3, "klkern::batched_qr: A must be 3-D (batch, m, n), got shape ", shape_of(A));
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "klkern::batched_qr: A must be float32 or float64, got ", A.scalar_type());
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2);
  TORCH_CHECK(m >= n, "klkern::batched_qr: A must have m >= n, got shape ", shape_of(A));

  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor Q = at::empty({batch, m, n}, A.options());
  if (A.numel() == 0) return Q;
  const int64_t ws_bytes = klkern_batched_qr_workspace_bytes(batch, m, n, (int64_t)A.element_size());
  TORCH_CHECK(ws_bytes >= 0, "klkern::batched_qr: unsupported shape of A ", shape_of(A));
  at::Tensor work = A.clone(at::MemoryFormat::Contiguous);  // overwritten with R and the reflectors
  at::Tensor workspace = at::empty({ws_bytes}, A.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  int err;
  if (A.scalar_type() == at::kFloat)
    err = klkern_batched_qr_f32(work.data_ptr<float>(), Q.data_ptr<float>(), workspace.data_ptr(), ws_bytes, batch,
                                m, n, stream);
  else
    err = klkern_batched_qr_f64(work.data_ptr<double>(), Q.data_ptr<double>(), workspace.data_ptr(), ws_bytes,
                                batch, m, n, stream);
  TORCH_CHECK(err == 0, "klkern::batched_qr: CUDA error for A of shape ", shape_of(A), ": ",
              klkern_cuda_error_string(err));
  return Q;
}

}  // namespace

// A fragment, so other parts of klkern may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(klkern, m) { m.def("batched_qr(Tensor A) -> Tensor"); }

TORCH_LIBRARY_IMPL(klkern, CUDA, m) { m.impl("batched_qr", &batched_qr_cuda); }

// `import klkern._C` (setup.py build) needs a module init function; loading
// the library runs the registrations above. The JIT build (klkern/linalg/_ext.py) is
// loaded with torch.ops.load_library and does not use it.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                   // m_name
      "klkern CUDA kernels (registers torch.ops.klkern.*)",  // m_doc
      -1,                                                     // m_size: no per-interpreter state
      nullptr,                                                // m_methods
      nullptr,                                                // m_slots
      nullptr,                                                // m_traverse
      nullptr,                                                // m_clear
      nullptr,                                                // m_free
  };
  return PyModule_Create(&module_def);
}
