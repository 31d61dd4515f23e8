// The emulator's memory access recorder (see cuda_emu.h, "Memory access recording"): the callbacks of
// GCC's outlined kernel-address instrumentation, and the ops emu_profile_begin() / emu_profile_end(), which
// bracket the op calls to record and return the record as JSON (emu_profile_begin(false): the launches only,
// their kernels are not run, so the host logic of full-size shapes is seen in no time; the results are garbage):
//   [{"name", "grid": [x, y, z], "block": [x, y, z], "smem", "dram_read", "dram_written" (bytes of the
//     distinct 32-byte sectors the launch read / wrote), "instrs": [{"site", "op": "load" | "store",
//     "space": "global" | "shared", "size" (bytes a lane accesses), "requests" (warp requests), "lanes",
//     "requested" (bytes the lanes asked for), "useful" (per request min(requested, sector bytes)),
//     "sector_bytes" (32 x sectors touched), "wavefronts" / "ideal_wavefronts" (shared: the most distinct
//     words in one bank / the fewest the request's words need)}]}, ...]
// Built only for the emulator; written as a csrc/cuda file is, so it goes through the same rewriting.
#include <ATen/core/Tensor.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#if defined(__x86_64__)
// cuda_emu_switch(save_sp, load_sp) (cuda_emu.h, Context): pushes the callee-saved registers and the SSE and x87
// control words, stores the stack pointer in *save_sp, and pops the same from load_sp, whose `ret` resumes that
// fiber (or, on a fresh stack, enters its entry function).
__asm__(
    ".text\n"
    ".globl cuda_emu_switch\n"
    ".type cuda_emu_switch, @function\n"
    "cuda_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cuda_emu_switch, .-cuda_emu_switch\n");
#endif

namespace cuda_emu {
namespace {

struct Instr {
  bool store = false, shared = false;
  int size = 0;
  long long requests = 0, lanes = 0, requested = 0, useful = 0, sector_bytes = 0, wavefronts = 0, ideal = 0;
};

struct LaunchRec {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  std::unordered_map<uintptr_t, Instr> instrs;
  std::unordered_set<uint64_t> read, written;  // distinct sectors
  long long dram_read = 0, dram_written = 0;
};

struct Key {
  uintptr_t pc;
  unsigned who, k;  // warp (or thread, for the execution counts), k-th execution
  bool operator==(const Key& o) const { return pc == o.pc && who == o.who && k == o.k; }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    return std::hash<uintptr_t>()(k.pc) ^ (size_t(k.who) << 20) ^ (size_t(k.k) << 40);
  }
};

struct Request {  // the lanes' accesses of one site, the k-th time each lane executes it
  bool store = false, shared = false;
  int size = 0;
  std::vector<std::pair<uintptr_t, int>> lanes;  // address, bytes
};

struct RecState {
  std::vector<LaunchRec> launches;
  std::unordered_map<Key, Request, KeyHash> requests;  // of the running block
  std::unordered_map<Key, unsigned, KeyHash> executions;  // (site, thread) -> times executed, this block
};

// Plain globals (no guarded static initialisation, whose constructor's accesses would call back here).
bool g_on = false, g_busy = false, g_execute = true;
RecState* g_state = nullptr;

CUDA_EMU_UNRECORDED RecState& state() { return *g_state; }

CUDA_EMU_UNRECORDED bool in_shared(const Block& b, uintptr_t a) {
  auto inside = [a](const std::vector<unsigned char>& v) {
    const auto p = reinterpret_cast<uintptr_t>(v.data());
    return a >= p && a < p + v.size();
  };
  if (inside(b.dynamic_shared)) return true;
  for (const auto& kv : b.shared)
    if (inside(kv.second)) return true;
  return false;
}

CUDA_EMU_UNRECORDED void on_access(void* addr, long size, bool store, uintptr_t pc) {
  if (!g_on || g_busy) return;
  RecState& s = state();
  Block* b = block();
  if (b == nullptr || !b->in_fiber) return;
  Fiber* f = b->current;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  const auto stack = reinterpret_cast<uintptr_t>(f->stack);
  if (f->quiet > 0 || (a >= stack && a < stack + kStackBytes)) return;  // the emulator's, or the thread's locals
  g_busy = true;
  const unsigned k = s.executions[Key{pc, f->linear, 0}]++;
  Request& r = s.requests[Key{pc, f->linear / 32, k}];
  r.store = store;
  r.size = static_cast<int>(size);
  r.shared = in_shared(*b, a);
  r.lanes.emplace_back(a, static_cast<int>(size));
  g_busy = false;
}

}  // namespace

CUDA_EMU_UNRECORDED bool recording() { return g_on; }
CUDA_EMU_UNRECORDED bool executing() { return !g_on || g_execute; }

CUDA_EMU_UNRECORDED void launch_begin(const char* name, dim3 grid, dim3 blk, size_t smem) {
  RecState& s = state();
  g_busy = true;
  s.launches.emplace_back();
  LaunchRec& l = s.launches.back();
  l.name = name;
  l.grid = grid;
  l.block = blk;
  l.smem = smem;
  g_busy = false;
}

CUDA_EMU_UNRECORDED void block_end() {
  RecState& s = state();
  g_busy = true;
  LaunchRec& l = s.launches.back();
  for (auto& [key, r] : s.requests) {
    Instr& in = l.instrs[key.pc];
    in.store = r.store;
    in.shared = r.shared;
    in.size = r.size;
    in.requests += 1;
    in.lanes += static_cast<long long>(r.lanes.size());
    long long requested = 0;
    if (r.shared) {  // 32 banks of 4 bytes: a request takes as many wavefronts as its busiest bank has words
      std::set<uintptr_t> words;
      for (auto [a, n] : r.lanes) {
        requested += n;
        for (uintptr_t w = a / 4; w <= (a + n - 1) / 4; ++w) words.insert(w);
      }
      std::unordered_map<unsigned, long long> per_bank;
      long long most = 0;
      for (uintptr_t w : words) most = std::max(most, ++per_bank[static_cast<unsigned>(w % 32)]);
      in.wavefronts += most;
      in.ideal += (static_cast<long long>(words.size()) + 31) / 32;
      in.requested += requested;
      continue;
    }
    std::set<uint64_t> sectors;
    for (auto [a, n] : r.lanes) {
      requested += n;
      for (uint64_t sct = a / 32; sct <= (a + n - 1) / 32; ++sct) sectors.insert(sct);
    }
    const long long bytes = 32 * static_cast<long long>(sectors.size());
    in.requested += requested;
    in.useful += std::min(requested, bytes);
    in.sector_bytes += bytes;
    (r.store ? l.written : l.read).insert(sectors.begin(), sectors.end());
  }
  s.requests.clear();
  s.executions.clear();
  g_busy = false;
}

CUDA_EMU_UNRECORDED void launch_end() {
  RecState& s = state();
  g_busy = true;
  LaunchRec& l = s.launches.back();
  l.dram_read = 32 * static_cast<long long>(l.read.size());
  l.dram_written = 32 * static_cast<long long>(l.written.size());
  l.read = {};
  l.written = {};
  g_busy = false;
}

namespace {

void emu_profile_begin(bool execute) {
  g_execute = execute;
  g_busy = true;
  if (g_state == nullptr) g_state = new RecState();
  g_state->launches.clear();
  g_busy = false;
  g_on = true;
}

std::string emu_profile_end() {
  TORCH_CHECK(g_on, "emu_profile_end: no emu_profile_begin() before it");
  g_on = false;
  RecState& s = state();
  g_busy = true;
  std::string out = "[";
  char buf[512];
  for (size_t i = 0; i < s.launches.size(); ++i) {
    const LaunchRec& l = s.launches[i];
    std::snprintf(buf, sizeof buf,
                  "%s{\"name\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], \"smem\": %zu, "
                  "\"dram_read\": %lld, \"dram_written\": %lld, \"instrs\": [",
                  i ? ", " : "", l.name.c_str(), l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z,
                  l.smem, l.dram_read, l.dram_written);
    out += buf;
    std::vector<std::pair<uintptr_t, const Instr*>> sorted;
    for (const auto& kv : l.instrs) sorted.emplace_back(kv.first, &kv.second);
    std::sort(sorted.begin(), sorted.end());
    for (size_t j = 0; j < sorted.size(); ++j) {
      const Instr& in = *sorted[j].second;
      Dl_info info{};
      uintptr_t site = sorted[j].first;
      if (dladdr(reinterpret_cast<void*>(site), &info) != 0) site -= reinterpret_cast<uintptr_t>(info.dli_fbase);
      std::snprintf(buf, sizeof buf,
                    "%s{\"site\": %zu, \"op\": \"%s\", \"space\": \"%s\", \"size\": %d, \"requests\": %lld, "
                    "\"lanes\": %lld, \"requested\": %lld, \"useful\": %lld, \"sector_bytes\": %lld, "
                    "\"wavefronts\": %lld, \"ideal_wavefronts\": %lld}",
                    j ? ", " : "", static_cast<size_t>(site), in.store ? "store" : "load",
                    in.shared ? "shared" : "global", in.size, in.requests, in.lanes, in.requested, in.useful,
                    in.sector_bytes, in.wavefronts, in.ideal);
      out += buf;
    }
    out += "]}";
  }
  out += "]";
  s.launches.clear();
  g_busy = false;
  return out;
}

}  // namespace
}  // namespace cuda_emu

// The callbacks of the instrumentation (every load and store of the library's code).
extern "C" {
#define CUDA_EMU_ACCESS(n)                                                                                  \
  CUDA_EMU_UNRECORDED void __asan_load##n##_noabort(void* a) {                                              \
    ::cuda_emu::on_access(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));            \
  }                                                                                                         \
  CUDA_EMU_UNRECORDED void __asan_store##n##_noabort(void* a) {                                             \
    ::cuda_emu::on_access(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));             \
  }
CUDA_EMU_ACCESS(1)
CUDA_EMU_ACCESS(2)
CUDA_EMU_ACCESS(4)
CUDA_EMU_ACCESS(8)
CUDA_EMU_ACCESS(16)
#undef CUDA_EMU_ACCESS
CUDA_EMU_UNRECORDED void __asan_loadN_noabort(void* a, long n) {
  ::cuda_emu::on_access(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
CUDA_EMU_UNRECORDED void __asan_storeN_noabort(void* a, long n) {
  ::cuda_emu::on_access(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
CUDA_EMU_UNRECORDED void __asan_handle_no_return() {}
CUDA_EMU_UNRECORDED void __asan_before_dynamic_init(const char*) {}
CUDA_EMU_UNRECORDED void __asan_after_dynamic_init() {}
}

TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {
  m.impl("emu_profile_begin", &cuda_emu::emu_profile_begin);
  m.impl("emu_profile_end", &cuda_emu::emu_profile_end);
}
