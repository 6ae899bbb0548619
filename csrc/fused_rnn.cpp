// fused_rnn._C: the op schemas (TORCH_LIBRARY) and the Python module that loading registers them.
// Kernels live in cpu/ and cuda/, the forward ops' autograd in autograd.cpp; fake kernels and the
// backward ops' autograd in fused_rnn/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "cpu/cpu_gemm.h"
#include "cpu/panel_gemm.h"
#include "cuda_plan.h"
#ifdef FUSED_RNN_WITH_CUDA
#include "cuda/device_plan.h"
#endif

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
  m.def(
      "rnn_forward(Tensor input, Tensor hx, Tensor[] weights, Tensor? batch_sizes, bool relu, "
      "bool has_biases, int num_layers) -> (Tensor output, Tensor h_n, Tensor[] hidden_outputs)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor[] weights, Tensor[] hidden_outputs, Tensor output, Tensor? batch_sizes, bool relu, "
      "bool has_biases, int num_layers, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor[] grad_weights)");
}

namespace {

// A C++ exception as a Python one of `type`, with c10's message but not its C++ backtrace.
PyObject* raise(PyObject* type, const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  PyErr_SetString(type, c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
  return nullptr;
}

PyObject* cpu_gemm_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_rnn::cpu::gemm_path());
}

// cpu_step_parts(rows, n, k, threads): the column blocks a CPU step GEMM is cut into.
PyObject* cpu_step_parts(PyObject*, PyObject* args) {
  long long rows, n, k, threads;
  if (!PyArg_ParseTuple(args, "LLLL", &rows, &n, &k, &threads)) return nullptr;
  return PyLong_FromLongLong(fused_rnn::cpu::step_parts(rows, n, k, threads));
}

// cpu_step_kernel(rows, n, k[, steps]): the kernel of a float32 CPU step GEMM ("panel", "packed",
// "blas", "aten") in a sequence of that many steps (default: enough to pack).
PyObject* cpu_step_kernel(PyObject*, PyObject* args) {
  long long rows, n, k, steps = std::numeric_limits<long long>::max();
  if (!PyArg_ParseTuple(args, "LLL|L", &rows, &n, &k, &steps)) return nullptr;
  return PyUnicode_FromString(fused_rnn::cpu::float_step_kernel(rows, n, k, steps));
}

// cpu_min_packing_rows(): the rows below which the CPU input projection does not pack W_ih.
PyObject* cpu_min_packing_rows(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fused_rnn::cpu::min_packing_rows());
}

// cpu_panel_isa(): the panel kernel's instruction set in this process ("avx512", "avx2", "").
PyObject* cpu_panel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_rnn::cpu::panel_isa_name());
}

PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef FUSED_RNN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// (path, rows_per_block, blocks_per_direction, threads, smem_bytes)
PyObject* config_tuple(fused_rnn::cuda_plan::Path path,
                       const fused_rnn::cuda_plan::PersistentConfig& cfg) {
  return Py_BuildValue("(sLLLL)", fused_rnn::cuda_plan::path_name(path),
                       static_cast<long long>(cfg.rows_per_block),
                       static_cast<long long>(cfg.blocks_per_direction),
                       static_cast<long long>(cfg.threads), static_cast<long long>(cfg.smem_bytes));
}

// plan_cuda_path(hidden, batch, directions, elem_bytes, sm_count, smem_per_sm,
//                smem_per_block_optin, max_threads_per_sm, regs_per_sm,
//                regs_rows8, regs_rows16, regs_rows32, forced, only_rows)
//   -> (path, rows_per_block, blocks_per_direction, threads, smem_bytes)
PyObject* plan_cuda_path(PyObject*, PyObject* args) {
  long long hidden, batch, directions, elem_bytes;
  fused_rnn::cuda_plan::DeviceLimits dev{};
  fused_rnn::cuda_plan::KernelRegs regs{};
  long long sm, smem_sm, smem_block, threads_sm, regs_sm, r8, r16, r32;
  const char* forced = "auto";
  long long only_rows = 0;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLL|sL", &hidden, &batch, &directions, &elem_bytes, &sm,
                        &smem_sm, &smem_block, &threads_sm, &regs_sm, &r8, &r16, &r32,
                        &forced, &only_rows)) {
    return nullptr;
  }
  dev = {sm, smem_sm, smem_block, threads_sm, regs_sm};
  regs = {r8, r16, r32};
  try {
    fused_rnn::cuda_plan::PersistentConfig cfg;
    const auto path = fused_rnn::cuda_plan::choose_path(hidden, batch, directions, elem_bytes, dev,
                                                        regs, forced, &cfg, only_rows);
    return config_tuple(path, cfg);
  } catch (const std::exception& e) {
    return raise(PyExc_RuntimeError, e);
  }
}

// Runs a setter: None, or its rejection of the value as a ValueError.
template <typename Set>
PyObject* call_setter(Set&& set) {
  try {
    set();
  } catch (const std::exception& e) {
    return raise(PyExc_ValueError, e);
  }
  Py_RETURN_NONE;
}

PyObject* set_cuda_path(PyObject*, PyObject* args) {
  const char* path;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  return call_setter([&] { fused_rnn::cuda_plan::set_forced_path(path); });
}

PyObject* set_persistent_rows(PyObject*, PyObject* args) {
  long long rows;
  if (!PyArg_ParseTuple(args, "L", &rows)) return nullptr;
  return call_setter([&] { fused_rnn::cuda_plan::set_forced_rows(rows); });
}

PyObject* get_persistent_rows(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fused_rnn::cuda_plan::forced_rows());
}

PyObject* get_cuda_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_rnn::cuda_plan::forced_path().c_str());
}

PyObject* last_cuda_paths(PyObject*, PyObject*) {
  using fused_rnn::cuda_plan::last_path;
  using fused_rnn::cuda_plan::last_rows_per_block;
  return Py_BuildValue("(ssLL)", last_path(false).c_str(), last_path(true).c_str(),
                       static_cast<long long>(last_rows_per_block(false)),
                       static_cast<long long>(last_rows_per_block(true)));
}

// device_cuda_plan(hidden, batch, directions, dtype, backward, device, forced)
//   -> (path, rows_per_block, blocks_per_direction, threads, smem_bytes); dtype: "float32", ...
PyObject* device_cuda_plan(PyObject*, PyObject* args) {
  long long hidden, batch, directions;
  const char* dtype;
  int backward, device;
  const char* forced = "auto";
  if (!PyArg_ParseTuple(args, "LLLspi|s", &hidden, &batch, &directions, &dtype, &backward,
                        &device, &forced)) {
    return nullptr;
  }
#ifdef FUSED_RNN_WITH_CUDA
  const std::string name = dtype;
  const c10::ScalarType type = name == "float64"   ? c10::kDouble
                               : name == "float16"  ? c10::kHalf
                               : name == "bfloat16" ? c10::kBFloat16
                                                    : c10::kFloat;
  if (name != "float32" && type == c10::kFloat) {
    PyErr_SetString(PyExc_ValueError, "dtype must be float32, float64, float16 or bfloat16");
    return nullptr;
  }
  try {
    fused_rnn::cuda_plan::PersistentConfig cfg;
    const auto path = fused_rnn::cuda::device_plan(hidden, batch, directions, type, backward != 0,
                                                   device, forced, &cfg);
    return config_tuple(path, cfg);
  } catch (const std::exception& e) {
    return raise(PyExc_RuntimeError, e);
  }
#else
  PyErr_SetString(PyExc_RuntimeError, "fused_rnn: this build has no CUDA kernels");
  return nullptr;
#endif
}

PyMethodDef methods[] = {
    {"plan_cuda_path", plan_cuda_path, METH_VARARGS,
     "The CUDA path heuristic for given sizes and device limits (no GPU needed)."},
    {"set_cuda_path", set_cuda_path, METH_VARARGS,
     "Force the CUDA recurrence path: 'auto', 'persistent', 'per_step' or 'per_step_cublas'."},
    {"get_cuda_path", get_cuda_path, METH_NOARGS, "The forced CUDA path ('auto' unless set)."},
    {"set_persistent_rows", set_persistent_rows, METH_VARARGS,
     "Restrict the persistent kernel's rows per block: 0 (the planner's choice), 8, 16 or 32."},
    {"get_persistent_rows", get_persistent_rows, METH_NOARGS,
     "The persistent kernel's forced rows per block (0 unless set)."},
    {"last_cuda_paths", last_cuda_paths, METH_NOARGS,
     "(forward, backward, forward rows per block, backward rows per block): the paths the latest "
     "CUDA recurrences ran on ('' before any) and the persistent kernel's rows per block (0 "
     "off that path)."},
    {"device_cuda_plan", device_cuda_plan, METH_VARARGS,
     "The CUDA path plan for a layer on a real device (CUDA builds only)."},
    {"cpu_gemm_path", cpu_gemm_path, METH_NOARGS,
     "Which general GEMM the CPU kernels call on raw pointers: 'blas' (direct) or 'aten'."},
    {"cpu_step_parts", cpu_step_parts, METH_VARARGS,
     "How many column blocks (threads) a CPU step GEMM of rows x n (inner k) is cut into."},
    {"cpu_step_kernel", cpu_step_kernel, METH_VARARGS,
     "The kernel of a float32 CPU step GEMM (rows x n, inner k; in a sequence of `steps` steps, "
     "default enough to pack): 'panel', 'packed', 'blas' or 'aten'."},
    {"cpu_min_packing_rows", cpu_min_packing_rows, METH_NOARGS,
     "Rows of a sequence below which the CPU input projection does not pack W_ih."},
    {"cpu_panel_isa", cpu_panel_isa, METH_NOARGS,
     "The CPU panel kernel's instruction set in this process: 'avx512', 'avx2' or '' (none)."},
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS,
     "Whether this build compiled the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_rnn native ops", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
