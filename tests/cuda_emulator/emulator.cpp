// The host CUDA emulator (see emulator.h): fibers for CUDA threads, barriers between them.
#include "emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64 (System V)"
#endif

// Saves the callee-saved registers and the stack pointer of the running fiber in *save_sp, and
// resumes the one whose stack pointer is to_sp (saved by an earlier switch, or a new fiber's frame).
extern "C" void cuda_emu_switch(void** save_sp, void* to_sp);
asm(R"(
  .pushsection .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
  .popsection
)");

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Where a barrier or shuffle was called from: every thread meeting at one must come from the same
// call site (CUDA: a barrier in divergent code, or lanes at different shuffles, is undefined).
struct Site {
  const char* file = "";
  uint_least32_t line = 0, column = 0;
  explicit Site(const std::source_location& w = std::source_location::current())
      : file(w.file_name()), line(w.line()), column(w.column()) {}
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column && std::strcmp(file, o.file) == 0;
  }
  std::string str() const { return std::string(file) + ":" + std::to_string(line); }
};

// Fiber stacks with a page below each that faults: an overflow stops the process rather than
// overwriting the next fiber's frames.
class Stacks {
 public:
  explicit Stacks(int n) : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    bytes_ = static_cast<size_t>(n) * (kStackBytes + page_);
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
    base_ = static_cast<char*>(p);
    for (int i = 0; i < n; ++i) {
      mprotect(base_ + static_cast<size_t>(i) * (kStackBytes + page_), page_, PROT_NONE);
    }
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  // One past the top of fiber i's stack.
  char* top(int i) const { return base_ + static_cast<size_t>(i + 1) * (kStackBytes + page_); }

 private:
  size_t page_, bytes_ = 0;
  char* base_ = nullptr;
};

// What a fiber waits for; kRunnable: nothing.
enum class Wait { kRunnable, kBlock, kWarp, kGrid, kDone, kAborted };

struct Fiber {
  void* sp = nullptr;
  Dim tid;
  int linear = 0;
  Wait wait = Wait::kRunnable;
};

// What the blocks of one launch share: the kernel, and the OS barrier of grid.sync().
struct Launch {
  Dim grid, block;
  bool cooperative = false;
  const std::function<void()>* kernel = nullptr;
  const std::function<void()>* block_start = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  int64_t blocks = 0, arrived = 0, finished = 0, generation = 0;
  bool failed = false;
  std::string error;

  void fail(const std::string& why) {
    const std::lock_guard<std::mutex> lock(mu);
    if (!failed) error = why;
    failed = true;
    cv.notify_all();
  }
  // grid.sync() of one block (all its threads have arrived); false if the launch failed meanwhile.
  bool barrier() {
    std::unique_lock<std::mutex> lock(mu);
    if (finished > 0 && !failed) {
      error = "grid.sync(): a block waits for blocks that have already exited";
      failed = true;
      cv.notify_all();
    }
    if (failed) return false;
    const int64_t gen = generation;
    if (++arrived == blocks) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return true;
    }
    cv.wait(lock, [&] { return generation != gen || failed; });
    return generation != gen;
  }
  void block_finished() {
    const std::lock_guard<std::mutex> lock(mu);
    ++finished;
    if (arrived > 0 && !failed) {
      error = "grid.sync(): a block exited while others wait for it";
      failed = true;
      cv.notify_all();
    }
  }
};

struct Block {
  Launch* launch = nullptr;
  Dim idx;
  std::vector<Fiber> fibers;  // in linear thread order
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  int live = 0;
  int at_block = 0;
  int at_grid = 0;
  Site block_site, grid_site;
  std::vector<Site> warp_site;
  std::vector<int> warp_arrived;
  std::vector<int> warp_exited;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> warp_slots;  // [warp][generation parity][lane]
  std::string error;
};

thread_local Block* tl_block = nullptr;

Block& current_block() {
  if (tl_block == nullptr || tl_block->current == nullptr) {
    throw std::logic_error("cuda_emu: a CUDA builtin was used outside an emulated kernel");
  }
  return *tl_block;
}

// Parks the running fiber (it waits for `w`) and returns to the block's scheduler.
void park(Block& b, Wait w) {
  Fiber* f = b.current;
  f->wait = w;
  cuda_emu_switch(&f->sp, b.scheduler_sp);
}

// Ends the block: the scheduler reports `why` and resumes none of its fibers.
[[noreturn]] void abort_block(Block& b, const std::string& why) {
  if (b.error.empty()) b.error = why;
  park(b, Wait::kAborted);
  std::terminate();  // an aborted fiber is never resumed
}

void release(Block& b, int begin, int end, Wait w) {
  for (int i = begin; i < end; ++i) {
    if (b.fibers[i].wait == w) b.fibers[i].wait = Wait::kRunnable;
  }
}

extern "C" void fiber_entry() {
  Block& b = *tl_block;
  std::string failure;  // the handler ends before the fiber parks for good
  try {
    (*b.launch->kernel)();
  } catch (const std::exception& e) {
    failure = std::string("exception in a kernel thread: ") + e.what();
  } catch (...) {
    failure = "exception in a kernel thread";
  }
  if (!failure.empty()) abort_block(b, failure);
  --b.live;
  if (b.at_block > 0 || b.at_grid > 0) {
    abort_block(b, "a thread exited while others of its block wait at a barrier");
  }
  const int warp = b.current->linear / kWarp;
  ++b.warp_exited[warp];
  if (b.warp_arrived[warp] > 0) abort_block(b, "a thread exited while its warp waits in a shuffle");
  park(b, Wait::kDone);
  std::terminate();  // a finished fiber is never resumed
}

std::string describe_deadlock(const Block& b) {
  int block_waits = 0, warp_waits = 0, grid_waits = 0;
  for (const Fiber& f : b.fibers) {
    block_waits += f.wait == Wait::kBlock;
    warp_waits += f.wait == Wait::kWarp;
    grid_waits += f.wait == Wait::kGrid;
  }
  return "deadlock in block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + ", " +
         std::to_string(b.idx.z) + "): " + std::to_string(block_waits) + " threads at __syncthreads, " +
         std::to_string(warp_waits) + " in a shuffle, " + std::to_string(grid_waits) +
         " at grid.sync, " + std::to_string(b.live) + " not finished";
}

// Runs block idx on the calling OS thread, its fibers on `stacks` (one per thread of the block).
void run_block(Launch& launch, Dim idx, const Stacks& stacks) {
  Block b;
  b.launch = &launch;
  b.idx = idx;
  const Dim& bd = launch.block;
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  const int warps = (n + kWarp - 1) / kWarp;
  b.warp_arrived.assign(warps, 0);
  b.warp_exited.assign(warps, 0);
  b.warp_site.assign(warps, Site());
  b.warp_gen.assign(warps, 0);
  b.warp_slots.assign(static_cast<size_t>(warps) * 2 * kWarp, 0);
  b.fibers.resize(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = Dim{static_cast<unsigned>(i) % bd.x, static_cast<unsigned>(i) / bd.x % bd.y,
                static_cast<unsigned>(i) / (bd.x * bd.y)};
    // A frame cuda_emu_switch resumes into fiber_entry: six callee-saved registers, then
    // fiber_entry as the return address, then a null return address for fiber_entry itself (so
    // that it starts with the stack aligned as after a call).
    const auto top = reinterpret_cast<uintptr_t>(stacks.top(i)) & ~uintptr_t{15};
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;
    f.sp = sp;
  }
  b.live = n;
  // First: block_start may overwrite this module's thread-local storage, tl_block included.
  if (launch.block_start != nullptr && *launch.block_start) (*launch.block_start)();
  tl_block = &b;
  while (b.live > 0 && b.error.empty()) {
    bool ran = false;
    for (Fiber& f : b.fibers) {
      if (f.wait != Wait::kRunnable) continue;
      b.current = &f;
      cuda_emu_switch(&b.scheduler_sp, f.sp);
      b.current = nullptr;
      ran = true;
      if (!b.error.empty()) break;
    }
    if (b.error.empty() && !ran && b.live > 0) b.error = describe_deadlock(b);
  }
  tl_block = nullptr;
  // A failed block's fibers are abandoned mid-kernel: their stacks hold only the kernel's plain
  // values, nothing that needs destroying.
  if (!b.error.empty()) {
    launch.fail(b.error);
  } else {
    launch.block_finished();
  }
}

}  // namespace

const Dim& thread_idx() { return current_block().current->tid; }
const Dim& block_idx() { return current_block().idx; }
const Dim& block_dim() { return current_block().launch->block; }
const Dim& grid_dim() { return current_block().launch->grid; }

// CUDA leaves a barrier that not every thread of the block reaches undefined (a barrier in
// divergent code); the emulator reports it.
void check_none_exited(Block& b, const char* barrier) {
  if (b.live != static_cast<int>(b.fibers.size())) {
    abort_block(b, std::string(barrier) + " after some threads of the block exited");
  }
}

// Records the call site of the first arrival at a barrier, and checks the others' against it.
void check_site(Block& b, bool first, Site& expected, const Site& here, const char* what) {
  if (first) {
    expected = here;
  } else if (!(expected == here)) {
    abort_block(b, std::string(what) + " reached from " + here.str() + " while others wait at " +
                       expected.str());
  }
}

void syncthreads(const std::source_location& where) {
  Block& b = current_block();
  check_none_exited(b, "__syncthreads");
  check_site(b, b.at_block == 0, b.block_site, Site(where), "__syncthreads");
  if (++b.at_block == b.live) {
    b.at_block = 0;
    release(b, 0, static_cast<int>(b.fibers.size()), Wait::kBlock);
    return;
  }
  park(b, Wait::kBlock);
}

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int offset,
                       const std::source_location& where) {
  Block& b = current_block();
  if (mask != kFullMask) abort_block(b, "only full-warp shuffles are emulated");
  if (b.fibers.size() % kWarp != 0) abort_block(b, "shuffle in a block of partial warps");
  if (offset <= 0 || offset >= kWarp) abort_block(b, "shuffle offset outside 1..31");
  const int warp = b.current->linear / kWarp, lane = b.current->linear % kWarp;
  if (b.warp_exited[warp] > 0) abort_block(b, "shuffle after some lanes of the warp exited");
  check_site(b, b.warp_arrived[warp] == 0, b.warp_site[warp], Site(where), "shuffle");
  // Two slot sets, alternating per shuffle: a lane can only reach the shuffle after next (and
  // overwrite this one's slot) once every lane has passed the next one, i.e. read this one.
  uint64_t* slots = &b.warp_slots[(static_cast<size_t>(warp) * 2 + (b.warp_gen[warp] & 1)) * kWarp];
  slots[lane] = bits;
  if (++b.warp_arrived[warp] == kWarp) {
    b.warp_arrived[warp] = 0;
    ++b.warp_gen[warp];
    release(b, warp * kWarp, (warp + 1) * kWarp, Wait::kWarp);
  } else {
    park(b, Wait::kWarp);
  }
  return slots[lane ^ offset];
}

void grid_sync(const std::source_location& where) {
  Block& b = current_block();
  if (!b.launch->cooperative) abort_block(b, "grid.sync() in a launch that is not cooperative");
  check_none_exited(b, "grid.sync()");
  check_site(b, b.at_grid == 0, b.grid_site, Site(where), "grid.sync()");
  if (++b.at_grid == b.live) {
    b.at_grid = 0;
    if (!b.launch->barrier()) abort_block(b, "another block failed");
    release(b, 0, static_cast<int>(b.fibers.size()), Wait::kGrid);
    return;
  }
  park(b, Wait::kGrid);
}

void launch(Dim grid, Dim block, size_t dynamic_smem, bool cooperative,
            const std::function<void()>& kernel, const std::function<void()>& block_start) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("cuda_emu: invalid block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("cuda_emu: invalid grid size");
  }
  if (dynamic_smem > kMaxDynamicSmem) {
    throw std::runtime_error("cuda_emu: more dynamic shared memory than a block can have");
  }
  Launch l;
  l.grid = grid;
  l.block = block;
  l.cooperative = cooperative;
  l.kernel = &kernel;
  l.block_start = &block_start;
  l.blocks = int64_t{grid.x} * grid.y * grid.z;
  auto index = [&](int64_t i) {
    return Dim{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
               static_cast<unsigned>(i / (int64_t{grid.x} * grid.y))};
  };
  const int n = static_cast<int>(threads);
  if (!cooperative) {
    const Stacks stacks(n);  // the blocks take turns on them
    for (int64_t i = 0; i < l.blocks && !l.failed; ++i) run_block(l, index(i), stacks);
  } else {
    std::vector<std::thread> threads_of_blocks;
    threads_of_blocks.reserve(static_cast<size_t>(l.blocks));
    for (int64_t i = 0; i < l.blocks; ++i) {
      threads_of_blocks.emplace_back([&l, n, idx = index(i)] {
        try {
          const Stacks stacks(n);
          run_block(l, idx, stacks);
        } catch (const std::exception& e) {
          l.fail(e.what());
        }
      });
    }
    for (std::thread& t : threads_of_blocks) t.join();
  }
  if (l.failed) throw std::runtime_error("cuda_emu: " + l.error);
}

}  // namespace cuda_emu
