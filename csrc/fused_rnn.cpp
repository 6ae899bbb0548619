// fused_rnn._C: the op schemas (TORCH_LIBRARY) and the Python module that loading registers them.
// Kernels live in cpu/ and cuda/; fake kernels and autograd in fused_rnn/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_gemm.h"

// The schemas are also written in fused_rnn/_ops.py (the pure-PyTorch fallback defines the same ops
// when this extension is missing); a test checks the two agree.
TORCH_LIBRARY(fused_rnn, m) {
  m.def(
      "rnn_layer_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, "
      "bool relu, bool has_biases) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor[] weights, Tensor output, Tensor? batch_sizes, bool relu, bool has_biases, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)");
}

namespace {

PyObject* cpu_gemm_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_rnn::cpu::gemm_path());
}

PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef FUSED_RNN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_gemm_path", cpu_gemm_path, METH_NOARGS,
     "Which GEMM the CPU recurrence calls per step: 'blas' (direct) or 'aten'."},
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS,
     "Whether this build compiled the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_rnn native ops", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
