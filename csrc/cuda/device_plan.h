// The CUDA path plan for a layer on a real device, for Python (benchmarks, tests): what the CUDA
// host code plans before launching. Defined in rnn_cuda.cu (CUDA builds only).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../cuda_plan.h"

namespace fused_rnn::cuda {

// The path and persistent geometry for a layer of `dtype` on CUDA device `device`, from its limits
// and the built kernels' registers; `forced` as for cuda_plan::choose_path. The runtime's
// co-residency check at launch still has the last word (cuda_plan::last_path says what ran).
cuda_plan::Path device_plan(int64_t hidden, int64_t batch, int64_t directions,
                            c10::ScalarType dtype, bool backward, int device,
                            const std::string& forced, cuda_plan::PersistentConfig* cfg);

}  // namespace fused_rnn::cuda
