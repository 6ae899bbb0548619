// Index math and pointwise math shared by the CUDA recurrence kernels (math and layout in
// ../rnn_layer.h). The step descriptors are __host__ __device__: the per-step path builds them on the
// host, the persistent kernel on the device, from the same code.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fused_rnn::cuda {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// The rows one step of one direction works on. Row m (0 ≤ m < rows) of the step:
//   C row:      c + m·ldc                 (the output P_t → h_t, or dH_t → dA_t, in place)
//   GEMM input: a1 + m·lda1 for m < cont, a2 + m·lda2 for m ≥ cont (a2 null: no GEMM term)
//   forward:    rows m ≥ end_from have reached their last step: h_n row m = the result
//   backward:   h + m·ldh is h_t (for act'); rows m ≥ cont add extra + m·H (dh_n) to the gradient
template <typename T>
struct StepRows {
  int64_t rows = 0;
  int64_t cont = 0;
  const T* a1 = nullptr;
  int64_t lda1 = 0;
  const T* a2 = nullptr;
  int64_t lda2 = 0;
  T* c = nullptr;
  int64_t ldc = 0;
  const T* h = nullptr;
  int64_t ldh = 0;
  const T* extra = nullptr;
  T* hn = nullptr;
  int64_t end_from = 0;
};

// The rows of each step t (0 ≤ t ≤ T): packed, read from the tables bs (bs[T] = 0) and off (the row
// offset of each step, off[T] = N), T + 1 entries each; padded (bs null), `batch` rows per step at
// offset t · batch, with no table (so that nothing is copied to the device for it).
struct StepTable {
  const int64_t* bs = nullptr;
  const int64_t* off = nullptr;
  int64_t batch = 0;
  int64_t steps = 0;
  C10_HOST_DEVICE int64_t rows(int64_t t) const {
    return bs != nullptr ? bs[t] : (t < steps ? batch : 0);
  }
  C10_HOST_DEVICE int64_t offset(int64_t t) const { return off != nullptr ? off[t] : t * batch; }
};

// Forward step number s (0 ≤ s < T) of one direction. out: the direction's first column of the
// (N, D·H) output, rows ld apart; h0, hn: (B, H) of this direction. A GEMM input that no row reads
// (the reverse direction's first step) is left null rather than pointed past the output.
template <typename T>
C10_HOST_DEVICE inline StepRows<T> forward_step(int64_t s, bool reverse, const StepTable& tab,
                                                T* out, int64_t ld, const T* h0, T* hn,
                                                int64_t H) {
  StepRows<T> r;
  const int64_t t = reverse ? tab.steps - 1 - s : s;
  r.rows = tab.rows(t);
  r.c = out + tab.offset(t) * ld;
  r.ldc = ld;
  r.hn = hn;
  if (!reverse) {
    r.cont = r.rows;
    r.a1 = t == 0 ? h0 : out + tab.offset(t - 1) * ld;
    r.lda1 = t == 0 ? H : ld;
    r.end_from = tab.rows(t + 1);  // rows [bs[t+1], bs[t]) end at t
  } else {
    r.cont = tab.rows(t + 1);  // rows that continue from step t + 1; the rest start from h0
    r.a1 = r.cont > 0 ? out + tab.offset(t + 1) * ld : nullptr;
    r.lda1 = ld;
    r.a2 = h0;
    r.lda2 = H;
    r.end_from = t == 0 ? 0 : r.rows;  // every row ends at t = 0
  }
  return r;
}

// BPTT step number s (0 ≤ s < T) of one direction, in the opposite order to its forward. dA: the
// direction's first column of the (N, D·H) gradient buffer (holding dH on entry), out: of h_t,
// dhn: (B, H).
template <typename T>
C10_HOST_DEVICE inline StepRows<T> backward_step(int64_t s, bool reverse, const StepTable& tab,
                                                 T* dA, int64_t ld, const T* out, const T* dhn) {
  StepRows<T> r;
  const int64_t t = reverse ? s : tab.steps - 1 - s;
  r.rows = tab.rows(t);
  r.c = dA + tab.offset(t) * ld;
  r.ldc = ld;
  r.h = out + tab.offset(t) * ld;
  r.ldh = ld;
  if (!reverse) {
    // Rows with a step t + 1 get dA_{t+1} · W_hh; the others end here: + dh_n.
    r.cont = tab.rows(t + 1);
    r.a1 = r.cont > 0 ? dA + tab.offset(t + 1) * ld : nullptr;
    r.lda1 = ld;
    r.extra = dhn;
  } else if (t == 0) {
    r.cont = 0;  // the reverse direction's last step: every row gets dh_n
    r.extra = dhn;
  } else {
    r.cont = r.rows;
    r.a1 = dA + tab.offset(t - 1) * ld;
    r.lda1 = ld;
  }
  return r;
}

// One direction's buffers for a layer's recurrence. buf: the direction's first column of the
// (N, D·H) buffer (forward: the output holding P; backward: dA holding dH); forward: h0/hn (B, H);
// backward: out, the direction's first column of h_t, and dhn (B, H).
template <typename T>
struct DirectionPtrs {
  T* buf = nullptr;
  const T* w = nullptr;  // W_hh (H, H), row-major
  const T* h0 = nullptr;
  T* hn = nullptr;
  const T* out = nullptr;
  const T* dhn = nullptr;
};

// Step number s of a direction, forward or BPTT: the step descriptor every path works from.
template <typename T, bool kBackward>
C10_HOST_DEVICE inline StepRows<T> layer_step(int64_t s, bool reverse, const StepTable& tab,
                                              const DirectionPtrs<T>& x, int64_t ld, int64_t H) {
  if constexpr (kBackward) {
    return backward_step<T>(s, reverse, tab, x.buf, ld, x.out, x.dhn);
  } else {
    return forward_step<T>(s, reverse, tab, x.buf, ld, x.h0, x.hn, H);
  }
}

// The GEMM terms of a step that an external GEMM (cuBLAS) computes into ws (rows × H, row-major):
// gemm(a, lda, rows, ws_rows) for rows [0, cont) from a1, then [cont, rows) from a2 if set.
// Returns the number of rows that have a GEMM term (the epilogue adds none after them).
template <typename T, typename Acc, typename Gemm>
inline int64_t step_gemms(const StepRows<T>& st, int64_t H, Acc* ws, Gemm&& gemm) {
  gemm(st.a1, st.lda1, st.cont, ws);
  if (st.a2 == nullptr) return st.cont;
  gemm(st.a2 + st.cont * st.lda2, st.lda2, st.rows - st.cont, ws + st.cont * H);
  return st.rows;
}

template <typename acc>
C10_HOST_DEVICE inline acc activation(acc x, bool relu) {
  if (relu) return x < acc(0) ? acc(0) : x;  // keeps NaN, as torch.relu
  if constexpr (std::is_same_v<acc, float>) {
    return tanhf(x);
  } else {
    return tanh(x);
  }
}

// g ⊙ act'(h), with act' read off h as autograd does (tanh: 1 − h²; relu: threshold at 0).
template <typename acc>
C10_HOST_DEVICE inline acc times_activation_grad(acc g, acc h, bool relu) {
  if (relu) return h <= acc(0) ? acc(0) : g;
  return g * (acc(1) - h * h);
}

// The epilogue of one element (row m, column n) of a step, given the GEMM sum `sum`.
template <typename T, bool kBackward>
C10_HOST_DEVICE inline void step_epilogue(const StepRows<T>& st, int64_t m, int64_t n, int64_t H,
                                          acc_t<T> sum, bool relu) {
  using A = acc_t<T>;
  T* c = st.c + m * st.ldc + n;
  if constexpr (!kBackward) {
    const T v = T(activation<A>(static_cast<A>(*c) + sum, relu));
    *c = v;
    if (m >= st.end_from) st.hn[m * H + n] = v;
  } else {
    A g = static_cast<A>(*c) + sum;
    if (st.extra != nullptr && m >= st.cont) g += static_cast<A>(st.extra[m * H + n]);
    *c = T(times_activation_grad<A>(g, static_cast<A>(st.h[m * st.ldh + n]), relu));
  }
}

// The GEMM input row of step row m, or null where the step has no GEMM term for it.
template <typename T>
C10_HOST_DEVICE inline const T* step_input_row(const StepRows<T>& st, int64_t m) {
  if (m < st.cont) return st.a1 + m * st.lda1;
  return st.a2 != nullptr ? st.a2 + m * st.lda2 : nullptr;
}

// Whether step row m has a GEMM term. A kernel that multiplies zeros for a row without one must
// drop that sum rather than use it: 0 · W is NaN where W is not finite, and such a row's result
// (a sequence's last BPTT step) does not depend on W_hh, as in cuDNN.
template <typename T>
C10_HOST_DEVICE inline bool step_has_gemm_term(const StepRows<T>& st, int64_t m) {
  return m < st.cont || st.a2 != nullptr;
}

}  // namespace fused_rnn::cuda
