// The CUDA execution model on one CPU thread: blocks run one after another; the threads of a
// block are fibers (user-level contexts) that switch only at barriers and warp collectives. At every switch
// the schedule (forward, reverse or seeded random) picks which runnable thread goes next, so a
// kernel whose result depends on the order of its threads between two synchronization points
// gives different results under different schedules. What a GPU would leave undefined or hang
// on is a fault here: a barrier reached by part of a block or at different sites, a warp
// collective whose mask names exited or missing lanes, and deadlock.
#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;
constexpr size_t kMaxSharedBytes = size_t{48} << 10;  // per block, without an opt-in attribute
constexpr unsigned kMaxThreads = 1024;

// --- contexts --------------------------------------------------------------------------------
// A switch saves the callee-saved registers on the old stack and restores the new stack's. On
// x86-64 that is a few instructions (ucontext's swapcontext makes a sigprocmask system call per
// switch, ten times slower); other architectures use ucontext.
#if defined(__x86_64__)

extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};

// The first switch to c "returns" into entry, on a 16-byte aligned stack, as after a call.
void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  *--sp = 0;  // entry's own return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = mxcsr | uint64_t{fpucw} << 32;
  c.sp = sp;
}

void switch_context(Context& from, const Context& to) { emu_switch_stack(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

void start_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  TORCH_CHECK(getcontext(&c.uc) == 0, "CUDA emulation: getcontext failed");
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

// --- scheduling ------------------------------------------------------------------------------

enum class Policy { kForward, kReverse, kRandom };

struct Schedule {
  Policy policy = Policy::kForward;
  uint64_t seed = 0;
  uint64_t launches = 0;  // since the schedule was set: a test's launches replay alone
};

const char* policy_name(Policy p) {
  switch (p) {
    case Policy::kForward: return "forward";
    case Policy::kReverse: return "reverse";
    case Policy::kRandom: return "random";
  }
  return "?";
}

struct Rng {  // splitmix64
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }
  void fill(void* p, size_t bytes) {
    auto* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(next());
  }
};

// Fiber stacks, with a guard page below each, kept for reuse across launches.
class StackPool {
 public:
  void* get() {
    void* s;
    if (free_.empty()) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      TORCH_CHECK(m != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      TORCH_CHECK(mprotect(m, page, PROT_NONE) == 0, "CUDA emulation: cannot protect a fiber stack's guard page");
      s = static_cast<char*>(m) + page;
    } else {
      s = free_.back();
      free_.pop_back();
    }
#if EMU_ASAN
    // A fiber abandoned after a fault left its frames' poisoning behind.
    __asan_unpoison_memory_region(s, kStackBytes);
#endif
    return s;
  }
  void put(void* s) { free_.push_back(s); }

 private:
  std::vector<void*> free_;
};

enum class State { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
  bool started = false;
  void* stack = nullptr;
  Context ctx;
#if EMU_ASAN
  void* fake_stack = nullptr;
#endif
  // Where and how it waits.
  const char* op = nullptr;
  Loc site;
  BarrierKind kind = BarrierKind::kSync;
  int predicate = 0, result = 0;
  unsigned mask = 0;
  const void* in = nullptr;
  void* out = nullptr;
  Combine combine = nullptr;
};

struct Grid {
  LaunchSite site;
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  size_t dynamic_bytes = 0;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  // The runnable fibers, twice: unordered with each one's position (random picks) and as a
  // bitset (lowest / highest picks).
  std::vector<int> runnable;
  std::vector<int> slot;  // position in `runnable`, -1 when not there
  std::vector<uint64_t> runnable_bits;
  int exited = 0;
  Fiber* current = nullptr;
  Context scheduler;
  std::unique_ptr<unsigned char[]> dynamic;  // exactly dynamic_bytes: overruns show under ASan
  std::vector<std::pair<const void*, size_t>> shared_vars;
  size_t static_shared = 0;
  std::optional<std::string> fault;
  Rng rng{0};
  Policy policy = Policy::kForward;
#if EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_collectives = 0, switches = 0;
};

std::mutex g_launch_mutex;  // one emulated device: launches from several host threads take turns
Grid* g_grid = nullptr;
Schedule g_schedule;
Stats g_stats;
StackPool g_stacks;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local bool t_in_kernel = false;

// A fault raised inside a CUDA thread, unwound to the fiber's entry.
struct KernelFault : std::exception {
  std::string what_;
  explicit KernelFault(std::string w) : what_(std::move(w)) {}
  const char* what() const noexcept override { return what_.c_str(); }
};

template <class V>  // uint3 or dim3
std::string str(const V& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}
std::string str(const Loc& l) { return std::string(l.file_name()) + ":" + std::to_string(l.line()); }
std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08x", m);
  return b;
}

Grid& grid() {
  TORCH_CHECK(g_grid != nullptr && g_grid->current != nullptr,
              "CUDA emulation: a device builtin (threadIdx, __syncthreads, ...) used outside a kernel");
  return *g_grid;
}
Fiber& self() { return *grid().current; }

bool same_site(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

void make_runnable(Grid& g, Fiber& f) {
  f.state = State::kRunnable;
  if (g.slot[f.linear] < 0) {
    g.slot[f.linear] = static_cast<int>(g.runnable.size());
    g.runnable.push_back(f.linear);
    g.runnable_bits[f.linear / 64] |= uint64_t{1} << (f.linear % 64);
  }
}

void make_waiting(Grid& g, Fiber& f, State s) {
  f.state = s;
  const int at = g.slot[f.linear];
  if (at >= 0) {
    const int last = g.runnable.back();
    g.runnable[at] = last;
    g.slot[last] = at;
    g.runnable.pop_back();
    g.slot[f.linear] = -1;
    g.runnable_bits[f.linear / 64] &= ~(uint64_t{1} << (f.linear % 64));
  }
}

int pick(Grid& g) {
  if (g.runnable.empty()) return -1;
  const int words = static_cast<int>(g.runnable_bits.size());
  switch (g.policy) {
    case Policy::kForward:
      for (int w = 0; w < words; ++w) {
        if (g.runnable_bits[w]) return 64 * w + std::countr_zero(g.runnable_bits[w]);
      }
      break;
    case Policy::kReverse:
      for (int w = words - 1; w >= 0; --w) {
        if (g.runnable_bits[w]) return 64 * w + 63 - std::countl_zero(g.runnable_bits[w]);
      }
      break;
    case Policy::kRandom: return g.runnable[g.rng.below(g.runnable.size())];
  }
  return -1;
}

// --- switching -----------------------------------------------------------------------------

[[noreturn]] void fiber_main();

// Scheduler -> fiber f, until f waits or exits.
void resume(Grid& g, Fiber& f) {
  if (!f.started) {
    f.stack = g_stacks.get();
    start_context(f.ctx, f.stack, kStackBytes, fiber_main);
    f.started = true;
  }
  g.current = &f;
  ++g_stats.switches;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  switch_context(g.scheduler, f.ctx);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g.scheduler_fake_stack, nullptr, nullptr);
#endif
  g.current = nullptr;
  if (f.state == State::kExited) {
    g_stacks.put(f.stack);
    f.stack = nullptr;
  }
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
void yield(Grid& g, Fiber& f) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, g.scheduler_bottom, g.scheduler_size);
#endif
  switch_context(f.ctx, g.scheduler);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

std::string who(const Grid& g, const Fiber& f) {
  return "thread " + str(f.tid) + " of block " + str(g.block_idx);
}

void record_fault(Grid& g, const Fiber& f, const std::string& what) {
  if (!g.fault) g.fault = who(g, f) + ": " + what;
}

// A lane that exits while others wait for it at a warp collective would hang them on a GPU.
void check_exit(Grid& g, const Fiber& f) {
  const int lane = f.linear % 32, base = f.linear - lane;
  for (int l = 0; l < 32 && base + l < static_cast<int>(g.fibers.size()); ++l) {
    const Fiber& w = g.fibers[base + l];
    if (w.state == State::kWarp && (w.mask >> lane & 1u)) {
      record_fault(g, f, "exits while lane " + std::to_string(l) + " waits for it at " + w.op + " (" + str(w.site) +
                             ", mask " + hex(w.mask) + ")");
      return;
    }
  }
}

[[noreturn]] void fiber_main() {
  Grid& g = *g_grid;
  Fiber& f = *g.current;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g.scheduler_bottom, &g.scheduler_size);
#endif
  try {
    (*g.body)();
  } catch (const std::exception& e) {
    record_fault(g, f, e.what());
  } catch (...) {
    record_fault(g, f, "an unknown exception");
  }
  make_waiting(g, f, State::kExited);
  ++g.exited;
  check_exit(g, f);
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g.scheduler_bottom, g.scheduler_size);
#endif
  switch_context(f.ctx, g.scheduler);  // never resumed
  std::abort();
}

// --- when nothing can run ------------------------------------------------------------------

std::string waiting_summary(const Grid& g) {
  // Threads grouped by where they wait, in thread order.
  std::map<std::string, std::pair<int, int>> groups;  // "op at site" -> (count, first thread)
  std::vector<std::string> order;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::kExited || f.state == State::kRunnable) continue;
    const std::string key = std::string(f.op) + " at " + str(f.site) +
                            (f.state == State::kWarp ? " (mask " + hex(f.mask) + ")" : std::string());
    auto it = groups.find(key);
    if (it == groups.end()) {
      groups[key] = {1, f.linear};
      order.push_back(key);
    } else {
      ++it->second.first;
    }
  }
  std::string s;
  for (const std::string& key : order) {
    const auto& [count, first] = groups.at(key);
    s += "; " + std::to_string(count) + " wait at " + key + " (first: thread " + str(g.fibers[first].tid) + ")";
  }
  if (g.exited) s += "; " + std::to_string(g.exited) + " have exited";
  return s;
}

[[noreturn]] void block_fault(const Grid& g, const std::string& what) {
  throw KernelFault("block " + str(g.block_idx) + ": " + what + waiting_summary(g));
}

// Every live thread waits. Releases the barrier they all wait at, or reports why the block is stuck.
void release_barrier(Grid& g) {
  const Fiber* first = nullptr;
  bool warp_waiters = false, divergent = false;
  for (const Fiber& f : g.fibers) {
    if (f.state == State::kWarp) warp_waiters = true;
    if (f.state != State::kBarrier) continue;
    if (first == nullptr) {
      first = &f;
    } else if (!same_site(first->site, f.site) || first->kind != f.kind) {
      divergent = true;
    }
  }
  if (warp_waiters) block_fault(g, "deadlock: threads wait at a warp collective that cannot complete");
  if (divergent) block_fault(g, "threads of the block wait at different barriers");
  if (g.exited) {
    block_fault(g, std::string(first->op) + " reached by only part of the block (a GPU would hang or misbehave)");
  }
  int result = first->kind == BarrierKind::kAnd ? 1 : 0;
  for (const Fiber& f : g.fibers) {
    switch (f.kind) {
      case BarrierKind::kSync: break;
      case BarrierKind::kOr: result |= f.predicate != 0; break;
      case BarrierKind::kAnd: result &= f.predicate != 0; break;
      case BarrierKind::kCount: result += f.predicate != 0; break;
    }
  }
  for (Fiber& f : g.fibers) {
    f.result = result;
    make_runnable(g, f);
  }
  ++g_stats.barriers;
}

void run_block(Grid& g) {
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  g.fibers.assign(n, Fiber{});
  g.runnable.clear();
  g.slot.assign(n, -1);
  g.runnable_bits.assign((n + 63) / 64, 0);
  g.exited = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    f.linear = i;
    f.tid = uint3{i % g.block.x, i / g.block.x % g.block.y, i / (g.block.x * g.block.y)};
    make_runnable(g, f);
  }
  g.dynamic.reset(g.dynamic_bytes ? new unsigned char[g.dynamic_bytes] : nullptr);
  g.rng.fill(g.dynamic.get(), g.dynamic_bytes);
  g.shared_vars.clear();
  g.static_shared = 0;
  struct Release {  // stacks of threads abandoned by a fault go back to the pool too
    Grid& g;
    ~Release() {
      for (Fiber& f : g.fibers) {
        if (f.stack != nullptr) g_stacks.put(f.stack);
        f.stack = nullptr;
      }
    }
  } release{g};
  while (true) {
    if (g.fault) throw KernelFault(*g.fault);
    const int i = pick(g);
    if (i >= 0) {
      resume(g, g.fibers[i]);
    } else if (g.exited == n) {
      break;
    } else {
      release_barrier(g);
    }
  }
  ++g_stats.blocks;
  g_stats.threads += n;
}

cudaError_t check_config(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (threads == 0 || threads > kMaxThreads || block.z > 64) return cudaErrorInvalidConfiguration;
  if (shared_bytes > kMaxSharedBytes) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

[[noreturn]] void fault(const std::string& what, Loc loc) { throw KernelFault(what + " at " + str(loc)); }

const uint3& thread_idx() { return self().tid; }
const uint3& block_idx() { return grid().block_idx; }
const dim3& block_dim() { return grid().block; }
const dim3& grid_dim() { return grid().grid; }
int linear_thread() { return self().linear; }

int barrier(BarrierKind kind, int predicate, Loc loc) {
  static constexpr const char* kNames[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and",
                                           "__syncthreads_count"};
  Grid& g = grid();
  Fiber& f = self();
  f.op = kNames[static_cast<int>(kind)];
  f.site = loc;
  f.kind = kind;
  f.predicate = predicate;
  make_waiting(g, f, State::kBarrier);
  yield(g, f);
  return f.result;
}

void warp_collective(const char* op, unsigned mask, const void* in, void* out, Combine combine, Loc loc) {
  Grid& g = grid();
  Fiber& f = self();
  const int lane = f.linear % 32, base = f.linear - lane, n = static_cast<int>(g.fibers.size());
  auto at = [&] { return std::string(op) + " (mask " + hex(mask) + ")"; };  // for faults only
  if (!(mask >> lane & 1u)) fault(at() + ": the calling lane " + std::to_string(lane) + " is not in the mask", loc);
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (base + l >= n) {
      fault(at() + ": the mask names lane " + std::to_string(l) + ", which a block of " + std::to_string(n) +
                " threads does not have",
            loc);
    }
    if (g.fibers[base + l].state == State::kExited) {
      fault(at() + ": the mask names lane " + std::to_string(l) + ", which has exited", loc);
    }
  }
  f.op = op;
  f.site = loc;
  f.mask = mask;
  f.in = in;
  f.out = out;
  f.combine = combine;
  make_waiting(g, f, State::kWarp);
  bool complete = true;
  for (int l = 0; l < 32 && complete; ++l) complete = !(mask >> l & 1u) || g.fibers[base + l].state == State::kWarp;
  if (complete) {
    const void* ins[32] = {};
    void* outs[32] = {};
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const Fiber& w = g.fibers[base + l];
      if (w.mask != mask || std::strcmp(w.op, op) != 0) {
        fault(at() + ": lane " + std::to_string(l) + " is at " + w.op + " (mask " + hex(w.mask) + ", " + str(w.site) +
                  ") instead",
              loc);
      }
      ins[l] = w.in;
      outs[l] = w.out;
    }
    combine(ins, outs, mask, loc);
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) make_runnable(g, g.fibers[base + l]);
    }
    ++g_stats.warp_collectives;
  }
  yield(g, f);
}

namespace detail {

void vote(const char* op, unsigned mask, int predicate, Loc loc, unsigned* ballot) {
  warp_collective(
      op, mask, &predicate, ballot,
      [](const void* const* ins, void* const* outs, unsigned m, Loc) {
        unsigned bits = 0;
        for (int l = 0; l < 32; ++l) {
          if ((m >> l & 1u) && *static_cast<const int*>(ins[l]) != 0) bits |= 1u << l;
        }
        for (int l = 0; l < 32; ++l) {
          if ((m >> l & 1u) && outs[l] != nullptr) *static_cast<unsigned*>(outs[l]) = bits;
        }
      },
      loc);
}

}  // namespace detail

void* dynamic_shared() {
  Grid& g = grid();
  return g.dynamic.get();
}

void shared_variable(void* address, size_t bytes, Loc loc) {
  Grid& g = grid();
  for (const auto& v : g.shared_vars) {
    if (v.first == address) return;
  }
  g.shared_vars.emplace_back(address, bytes);
  g.static_shared += bytes;
  if (g.static_shared + g.dynamic_bytes > kMaxSharedBytes) {
    fault("the block uses " + std::to_string(g.static_shared) + " bytes of static and " +
              std::to_string(g.dynamic_bytes) + " bytes of dynamic shared memory, more than 48 KiB",
          loc);
  }
  g.rng.fill(address, bytes);
}

void run_grid(const LaunchSite& site, dim3 grid_dims, dim3 block, size_t shared_bytes, cudaStream_t,
              const std::function<void()>& thread_body) {
  TORCH_CHECK(!t_in_kernel, "CUDA emulation: ", site.kernel, " launched from inside a kernel (", str(site.loc),
              "): dynamic parallelism is not emulated");
  const cudaError_t config = check_config(grid_dims, block, shared_bytes);
  if (config != cudaSuccess) {  // as on a GPU: nothing runs, and the error waits for cudaGetLastError()
    t_last_error = config;
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Grid g;
  g.site = site;
  g.grid = grid_dims;
  g.block = block;
  g.dynamic_bytes = shared_bytes;
  g.body = &thread_body;
  g.policy = g_schedule.policy;
  g.rng.state = g_schedule.seed * 0x2545F4914F6CDD1Dull + g_schedule.launches++;
  const uint64_t blocks = uint64_t{grid_dims.x} * grid_dims.y * grid_dims.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  if (g.policy == Policy::kReverse) std::reverse(order.begin(), order.end());
  if (g.policy == Policy::kRandom) {
    for (uint64_t b = blocks; b > 1; --b) std::swap(order[b - 1], order[g.rng.below(b)]);
  }
  struct Enter {
    Grid* g;
    explicit Enter(Grid* grid_) : g(grid_) {
      g_grid = g;
      t_in_kernel = true;
    }
    ~Enter() {
      g_grid = nullptr;
      t_in_kernel = false;
    }
  } enter(&g);
  ++g_stats.launches;
  try {
    for (const uint64_t b : order) {
      g.block_idx = uint3{static_cast<unsigned>(b % grid_dims.x), static_cast<unsigned>(b / grid_dims.x % grid_dims.y),
                          static_cast<unsigned>(b / (uint64_t{grid_dims.x} * grid_dims.y))};
      run_block(g);
    }
  } catch (const KernelFault& e) {
    TORCH_CHECK(false, "CUDA emulation: ", e.what(), "\n  in ", site.kernel, " launched at ", str(site.loc),
                " with grid ", str(grid_dims), " and block ", str(block), ", schedule ", policy_name(g.policy),
                " (seed ", g_schedule.seed, ")");
  }
}

}  // namespace emu

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::t_last_error;
  emu::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return emu::t_last_error; }

// Control from the tests (ctypes), one set per loaded library.
extern "C" {

// policy: "forward", "reverse" or "random"; returns 0, or -1 for an unknown policy.
int emu_set_schedule(const char* policy, uint64_t seed) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  const std::string p(policy);
  if (p == "forward") {
    emu::g_schedule.policy = emu::Policy::kForward;
  } else if (p == "reverse") {
    emu::g_schedule.policy = emu::Policy::kReverse;
  } else if (p == "random") {
    emu::g_schedule.policy = emu::Policy::kRandom;
  } else {
    return -1;
  }
  emu::g_schedule.seed = seed;
  emu::g_schedule.launches = 0;
  return 0;
}

// launches, blocks, threads, barriers released, warp collectives completed, fiber switches.
void emu_stats(int64_t* out) {
  std::lock_guard<std::mutex> lock(emu::g_launch_mutex);
  const emu::Stats& s = emu::g_stats;
  const int64_t values[] = {s.launches, s.blocks, s.threads, s.barriers, s.warp_collectives, s.switches};
  std::copy(std::begin(values), std::end(values), out);
}

// The launch error of this host thread that no cudaGetLastError() took, then cleared.
int emu_take_last_error() { return static_cast<int>(cudaGetLastError()); }
}
