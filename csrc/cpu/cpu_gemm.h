// The per-step GEMM of the CPU recurrence, on raw row-major pointers.
//
// A step's GEMM is small (bs × H · H × H) and runs T times, so the cost of reaching BLAS matters as
// much as BLAS itself. When the process has a Fortran BLAS (sgemm_/dgemm_, which torch's own CPU
// library exports on x86 builds), we call it directly: no tensor, no dispatcher. Otherwise, or when a
// dimension does not fit BLAS's 32-bit integers, we fall back to ATen's addmm on views of the same
// memory. FUSED_RNN_CPU_GEMM=aten forces the fallback (tests use it to cover that path).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

namespace fused_rnn::cpu {

// C[m × n] (row stride ldc) = beta · C + A[m × k] (row stride lda) · op(B), where op(B) = Bᵀ for B
// stored as [n × k] (transpose_b) or B for B stored as [k × n]. beta is 0 or 1.
template <typename scalar_t>
void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
                   const scalar_t* b, int64_t ldb, bool transpose_b, scalar_t beta, scalar_t* c,
                   int64_t ldc);

// Which path gemm_rowmajor takes in this process: "blas" or "aten".
const char* gemm_path();

// The right-hand side of a step GEMM that every step reuses (W_hhᵀ forward, W_hh in BPTT), packed
// once, so that the T steps do not each re-pack it: float32 into panel_gemm's panels where that
// kernel runs (panel_gemm.h), else into BLAS's internal format when the BLAS offers that (MKL's
// sgemm_pack/compute, float only). multiply() is gemm_rowmajor with this B; with MKL's packing, row
// counts other than the one packed for (the ends of packed sequences) take the plain path.
//
// Below kMinPackedRows rows the packed kernel loses to the plain one (a GEMV-like product: measured
// with torch 2.14.1's MKL on 2 EPYC cores, T = 64, H = 1024 forward: batch 1 8.1 ms packed vs 6.0 ms
// plain, batch 2 12.4 vs 11.3, batch 4 16.0 vs 22.5), so it is not packed.
constexpr int64_t kMinPackedRows = 4;
// Nor below kMinPackedElements elements of the (block of) W_hh: there the plain kernel was faster
// too (T = 64 forward, 2 threads, each step in two column blocks: B 8 H 256 1.6 ms packed vs
// 1.2 ms plain, B 4 H 512 3.5 vs 2.6, B 64 H 64 1.0 vs 0.8; B 8 H 1024, 2^19 per block, equal).
constexpr int64_t kMinPackedElements = int64_t{1} << 18;

// Packing op(B) (into panels or MKL's format) reads and writes all of it once, so it pays only when
// the packed copy is used enough. A layer's step GEMMs use theirs once a step: they pack when the
// sequence has kMinPackingSteps steps or more (T; for packed input, its longest sequence). Counted
// in steps, not rows: a step GEMM of 64 rows packed for one step lost to the plain one, one of 4
// rows packed for 8 steps won, and a packed batch of one long sequence and many short ones ran
// 1.21–1.42x faster packed (64, 32, 40 and 100 steps of 85–162 rows in all, H 256–1024).
// Measured with torch 2.14.1 on 2 EPYC (Zen 3) cores, one layer, H 256–1024, interleaved in one
// process, plain over packed time of the steps (forward no_grad; forward+backward): T 1–2,
// B 16–64, 0.86–1.03; 0.83–1.00; T 4–6, B 16–64, 0.90–1.18; 0.81–1.06 (medians 1.00); T 8,
// B 4–64, 0.96–1.56 (median 1.06); 0.92–1.17 (1.01); T 8–32, B 1–4, medians 1.15–1.46; 1.04–1.31.
// FUSED_RNN_CPU_MIN_PACK_STEPS=n sets the threshold (read at every call; the tests pack from 1
// step so that short sequences reach the kernels). A decoder calling the RNN one step at a time
// is what the threshold serves. MKL's packed format (where the panel kernel does not run) follows
// the same rule: with the panel kernel off, T 1 and 4 at H 1024 ran in 0.49–0.70 of the packed
// time plain.
constexpr int64_t kMinPackingSteps = 8;
int64_t min_packing_steps();
// Whether the step GEMMs of a sequence of `steps` steps pack their op(B).
bool step_packing_pays(int64_t steps);

// A layer's input projection uses its packed W_ih once, for all T · B rows: packed from
// kMinPackingRows rows, below that one direct BLAS call (sequence_gemm). Packed or not measured
// alike from 64 rows on (T 1–12, B 4–64, H 256–1024: 0.88–1.06); below it the direct call saves
// ATen's fixed costs (H = 1024, B = 1, T = 1, 0.34 ms a forward where packing took 2.1 ms).
// FUSED_RNN_CPU_MIN_PACK_ROWS=n sets the threshold (read at every call).
constexpr int64_t kMinPackingRows = 64;
int64_t min_packing_rows();

// Whether a float32 StepRhs for these sizes (rows packed for, op(B) n × k, used for `steps` steps)
// is packed by MKL (where the panel kernel does not run).
bool float_step_packed(int64_t rows, int64_t n, int64_t k, int64_t steps);

// The kernel a float32 StepRhs for these sizes runs: "panel" (panel_gemm.h, wherever it is
// available), "packed" (MKL's packed GEMM), "blas" or "aten" (gemm_rowmajor's paths).
const char* float_step_kernel(int64_t rows, int64_t n, int64_t k, int64_t steps);

template <typename scalar_t>
class StepRhs {
 public:
  // rows: the rows of A of most steps (what MKL packs for); steps: how many steps multiply by it
  // (whether packing pays).
  StepRhs(const scalar_t* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b, int64_t rows,
          int64_t steps);
  ~StepRhs();
  StepRhs(const StepRhs&) = delete;
  StepRhs& operator=(const StepRhs&) = delete;

  void multiply(int64_t m, const scalar_t* a, int64_t lda, scalar_t beta, scalar_t* c,
                int64_t ldc) const;

 private:
  const scalar_t* b_;
  int64_t n_, k_, ldb_, rows_;
  bool transpose_b_;
  scalar_t* packed_ = nullptr;  // MKL's packed format
  at::Tensor panels_;           // panel_gemm's (float only)
};

// The CPU's SequenceGemm (rnn_layer.h): float32 on panel_gemm where it runs, the layouts allow and
// a has min_packing_rows() rows or more (b packed, in parallel over its panels, then the rows of
// out cut into blocks across torch's intra-op threads); aten_gemm otherwise.
void sequence_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& bias);

// How many column blocks a step GEMM of rows × n (inner size k) is cut into, to run on `threads` of
// torch's intra-op threads: one per thread when the step is big enough to pay for synchronising
// the threads at every step, else 1. Each block then is a single-threaded GEMM on its own slice of
// W_hh, which stays in that core's cache for all T steps; MKL threading one small GEMM itself was
// slower than one
// thread (2 EPYC cores, torch 2.14.1: 64 steps of 8 × 512 · 512 × 512, 7.2 ms on 2 threads,
// 4.5 ms on 1, 2.2 ms for half the columns on 1). FUSED_RNN_CPU_PARTS=n forces n (tests).
int64_t step_parts(int64_t rows, int64_t n, int64_t k, int64_t threads);

// Threads available to a recurrence called here: torch's intra-op count, 1 inside a parallel region.
int64_t recurrence_threads();

// f(i, p) for every step i in [0, steps) and part p in [0, parts): all parts of step i before any of
// step i + 1, the parts of a step in parallel on torch's intra-op threads. One parallel region for
// all the steps, a barrier between them (no fork/join per step); inside it ATen calls stay
// single-threaded. An exception in f stops the work and is rethrown after the region.
void run_step_parts(int64_t parts, int64_t steps, const std::function<void(int64_t, int64_t)>& f);

// op(B) of a step GEMM cut into column blocks [col0(p), col0(p + 1)), each with its own StepRhs
// (block edges on multiples of 16 columns). for_each_part(f) calls f(p) for every block, the blocks
// in parallel on torch's intra-op threads (inside which BLAS runs single-threaded).
template <typename scalar_t>
class SplitRhs {
 public:
  SplitRhs(const scalar_t* b, int64_t n, int64_t k, int64_t ldb, bool transpose_b, int64_t rows,
           int64_t steps, int64_t parts);
  SplitRhs(const SplitRhs&) = delete;
  SplitRhs& operator=(const SplitRhs&) = delete;

  int64_t parts() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t col0(int64_t p) const { return edges_[p]; }
  int64_t cols(int64_t p) const { return edges_[p + 1] - edges_[p]; }
  // Columns [col0(p), col0(p) + cols(p)) of C = beta · C + A · op(B); c points at C's column 0.
  void multiply(int64_t p, int64_t m, const scalar_t* a, int64_t lda, scalar_t beta, scalar_t* c,
                int64_t ldc) const {
    blocks_[p]->multiply(m, a, lda, beta, c + edges_[p], ldc);
  }

  template <typename F>
  void for_each_part(const F& f) const {
    for_each_step_part(1, [&f](int64_t, int64_t p) { f(p); });
  }

  // f(i, p) for every step i in [0, steps) and block p: run_step_parts over this split's blocks.
  template <typename F>
  void for_each_step_part(int64_t steps, const F& f) const {
    if (parts() == 1) {
      for (int64_t i = 0; i < steps; ++i) f(i, int64_t{0});
      return;
    }
    run_step_parts(parts(), steps, [&f](int64_t i, int64_t p) { f(i, p); });
  }

 private:
  std::vector<std::unique_ptr<StepRhs<scalar_t>>> blocks_;
  std::vector<int64_t> edges_;
};

}  // namespace fused_rnn::cpu
