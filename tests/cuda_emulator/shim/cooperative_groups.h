// The part of <cooperative_groups.h> our kernels use, on the host emulator (../emulator.h).
#pragma once

#include "../emulator.h"

namespace cooperative_groups {

struct grid_group {
  void sync(std::source_location where = std::source_location::current()) const {
    cuda_emu::grid_sync(where);
  }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
