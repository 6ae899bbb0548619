// The part of <cooperative_groups.h> our kernels use, on the host emulator (../emulator.h).
#pragma once

#include "../emulator.h"

namespace cooperative_groups {

struct grid_group {
  void sync() const { cuda_emu::grid_sync(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
