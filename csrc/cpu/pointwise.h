// The per-step elementwise work of the CPU recurrence: the activation after each step's GEMM, and
// dA ⊙= act'(h) in BPTT. Rows of `cols` elements, `ld` apart.
#pragma once

#include <cstdint>

namespace fused_rnn::cpu {

template <typename scalar_t>
void activate_rows(scalar_t* c, int64_t rows, int64_t cols, int64_t ld, bool relu);

// act' read off h as autograd does: tanh 1 − h²; relu threshold_backward(g, h, 0) (0 where h ≤ 0).
template <typename scalar_t>
void times_activation_grad(scalar_t* da, const scalar_t* h, int64_t rows, int64_t cols,
                           int64_t ld, bool relu);

}  // namespace fused_rnn::cpu
