// Run-time choice of instruction set, thread count and the serial threshold; fastoptim's worker
// pool (run_chunks); the ISA-neutral entry points that forward to the driver compiled for the
// active ISA.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastoptim/convert.hpp"
#include "fastoptim/fastoptim.hpp"
#include "fastoptim/registry.hpp"

#if defined(_MSC_VER) && !defined(__GNUC__)
#include <intrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#define FASTOPTIM_POSIX 1
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace fastoptim {

// Declarations of the per-ISA drivers (step.cpp compiled once per ISA).
#define FASTOPTIM_DECLARE_ISA(ns)                                                        \
  namespace ns {                                                                         \
  template <class Opt> void step(const Plan&, const typename Opt::Hyper&, int64_t, int); \
  template <class Opt> void step_rows(const Rows&, const typename Opt::Hyper&, int64_t, int); \
  void stream(float* const*, int, int64_t, int);                                         \
  void stream_mixed(const StreamArrays&, int64_t, int);                                  \
  void grad_stats(const Plan&, int, GradStats&);                                         \
  void stream_read(const float*, int64_t, int, double&);                                 \
  void accumulate(const Plan&, double, int);                                             \
  void quantize_blockwise(const float*, int64_t, QMap, uint8_t*, float*, int);           \
  void dequantize_blockwise(const uint8_t*, const float*, int64_t, QMap, float*, int);   \
  }
#ifdef FASTOPTIM_HAVE_SCALAR
FASTOPTIM_DECLARE_ISA(scalar)
#endif
#ifdef FASTOPTIM_HAVE_AVX2
FASTOPTIM_DECLARE_ISA(avx2)
#endif
#ifdef FASTOPTIM_HAVE_AVX512
FASTOPTIM_DECLARE_ISA(avx512)
#endif
#ifdef FASTOPTIM_HAVE_NEON
FASTOPTIM_DECLARE_ISA(neon)
#endif
#undef FASTOPTIM_DECLARE_ISA

namespace {

#if (defined(__x86_64__) || defined(_M_X64)) && defined(_MSC_VER) && !defined(__GNUC__)
// MSVC: CPUID feature bits, and XGETBV for the OS saving the YMM/ZMM registers.
bool msvc_supports(Isa isa) {
  int r[4];
  __cpuid(r, 1);
  const bool osxsave = r[2] & (1 << 27), avx = r[2] & (1 << 28), fma = r[2] & (1 << 12);
  const bool f16c = r[2] & (1 << 29);
  if (isa == Isa::scalar) return true;
  if (!osxsave || !avx || !fma || !f16c) return false;
  const unsigned long long xcr0 = _xgetbv(0);
  __cpuidex(r, 7, 0);
  const bool avx2 = r[1] & (1 << 5);
  const bool avx512 = (r[1] & (1 << 16)) && (r[1] & (1 << 17)) && (r[1] & (1 << 30)) &&
                      (r[1] & (1u << 31));
  if (isa == Isa::avx2) return avx2 && (xcr0 & 0x6) == 0x6;
  if (isa == Isa::avx512) return avx2 && avx512 && (xcr0 & 0xe6) == 0xe6;
  return false;
}
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
// F16C from CPUID leaf 1 (ECX bit 29): __builtin_cpu_supports("f16c") is refused by Clang
// before 18 (Apple Clang 15 among them).
static bool cpu_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}
#endif

bool cpu_supports(Isa isa) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();  // may run during static initialisation, before libgcc's constructor
#endif
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__)
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_f16c();
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_f16c();
#else
    case Isa::scalar:
    case Isa::avx2:
    case Isa::avx512: return msvc_supports(isa);
#endif
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
    case Isa::neon: return true;
#endif
    default: return false;
  }
}

bool compiled(Isa isa) {
  switch (isa) {
#ifdef FASTOPTIM_HAVE_SCALAR
    case Isa::scalar: return true;
#endif
#ifdef FASTOPTIM_HAVE_AVX2
    case Isa::avx2: return true;
#endif
#ifdef FASTOPTIM_HAVE_AVX512
    case Isa::avx512: return true;
#endif
#ifdef FASTOPTIM_HAVE_NEON
    case Isa::neon: return true;
#endif
    default: return false;
  }
}

Isa best_isa() {
  const auto isas = available_isas();
  if (isas.empty()) throw std::runtime_error("fastoptim: no instruction set compiled for this CPU");
  return isas.back();
}

// ------------------------------------------------------------------------------ thread counts
std::string read_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) return {};
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(s);
  while (std::getline(in, item, sep)) out.push_back(item);
  return out;
}

// A mount point as /proc/self/mountinfo writes it: space, tab, newline and backslash as octal
// escapes (\040...).
std::string unescape_mount(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    auto octal = [&s](std::size_t k) { return s[k] >= '0' && s[k] <= '7'; };
    if (s[i] == '\\' && i + 3 < s.size() && octal(i + 1) && octal(i + 2) && octal(i + 3)) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// A decimal integer, blanks around it allowed: its value; `longer` where it has more than
// `digits` digits; -1 where it is not one ("", "-3", "+2", "2.5", "max", "abc").
int64_t decimal(const std::string& text, std::size_t digits, int64_t longer) {
  const char* blank = " \t\n\r\f\v";
  const auto b = text.find_first_not_of(blank);
  if (b == std::string::npos) return -1;
  const std::string d = text.substr(b, text.find_last_not_of(blank) - b + 1);
  auto digit = [](unsigned char c) { return std::isdigit(c) != 0; };
  if (!std::all_of(d.begin(), d.end(), digit)) return -1;
  return d.size() > digits ? longer : std::stoll(d);
}

// ceil(quota / period) for a quota and a period in microseconds (text); 0 where either is not
// a positive integer ("max", -1, garbage: no limit).
int64_t quota_cpus(const std::string& quota, const std::string& period) {
  const int64_t q = decimal(quota, 18, 0), p = decimal(period, 18, 0);
  return q > 0 && p > 0 ? std::max<int64_t>(1, (q + p - 1) / p) : 0;
}

int cgroup_limit(const std::string& root) {
  // /proc/self/cgroup: "0::<path>" (v2), "<id>:<controllers, comma-separated>:<path>" (v1)
  std::string v2_path, v1_path;
  bool has_v2 = false, has_v1 = false;
  for (const std::string& line : split(read_file(root + "/proc/self/cgroup"), '\n')) {
    const auto a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && controllers.empty()) {
      has_v2 = true;
      v2_path = path;
    } else {
      for (const std::string& c : split(controllers, ','))
        if (c == "cpu") {
          has_v1 = true;
          v1_path = path;
        }
    }
  }
  int64_t best = 0;
  auto take = [&best](int64_t cpus) {
    if (cpus > 0 && (best == 0 || cpus < best)) best = cpus;
  };
  // /proc/self/mountinfo: "<id> <parent> <dev> <root> <mount point> <options> [optional...] -
  // <fs type> <source> <super options>"
  for (const std::string& line : split(read_file(root + "/proc/self/mountinfo"), '\n')) {
    std::vector<std::string> f;
    {
      std::istringstream in(line);
      std::string w;
      while (in >> w) f.push_back(w);
    }
    // (after the separator: the type, the source (which may be empty, then not a field of
    // the split) and the super options, last)
    const auto dash = std::find(f.begin() + std::min<std::size_t>(f.size(), 5), f.end(), "-");
    if (f.size() < 5 || dash == f.end() || f.end() - dash < 3) continue;
    const std::string& type = *(dash + 1);
    bool v2 = false;
    if (type == "cgroup2" && has_v2) {
      v2 = true;
    } else if (type == "cgroup" && has_v1) {
      const auto opts = split(f.back(), ',');
      if (std::find(opts.begin(), opts.end(), "cpu") == opts.end()) continue;
    } else {
      continue;
    }
    // The process's cgroup as a directory of this mount (whose root is the cgroup `mroot`):
    // skipped where the mount does not show it.
    const std::string& path = v2 ? v2_path : v1_path;
    std::string mroot = unescape_mount(f[3]);
    if (mroot.size() > 1 && mroot.back() == '/') mroot.pop_back();
    std::string rel;
    if (mroot == "/") {
      rel = path;
    } else if (path.compare(0, mroot.size(), mroot) == 0 &&
               (path.size() == mroot.size() || path[mroot.size()] == '/')) {
      rel = path.substr(mroot.size());
    } else {
      continue;
    }
    // (a path outside the mount's view, e.g. /../sibling in another cgroup namespace; and a
    // path that is not absolute: the kernel writes neither for a cgroup the mount shows)
    const auto parts = split(rel, '/');
    const bool dotdot = std::find(parts.begin(), parts.end(), "..") != parts.end();
    if ((!rel.empty() && rel[0] != '/') || dotdot) continue;
    while (rel.size() > 1 && rel.back() == '/') rel.pop_back();
    const std::string mount = root + unescape_mount(f[4]);
    // The cgroup and each ancestor visible in the mount: the smallest limit
    for (std::string r = rel == "/" ? std::string() : rel;;) {
      const std::string dir = mount + r;
      if (v2) {
        const auto words = split(read_file(dir + "/cpu.max"), ' ');
        if (words.size() >= 2) take(quota_cpus(words[0], words[1]));
      } else {
        take(quota_cpus(read_file(dir + "/cpu.cfs_quota_us"),
                        read_file(dir + "/cpu.cfs_period_us")));
      }
      const auto up = r.rfind('/');
      if (r.empty() || up == std::string::npos) break;
      r = r.substr(0, up);
    }
  }
  return static_cast<int>(std::min<int64_t>(best, 1 << 20));
}

// CPUs this process may run on, at least 1: its affinity mask on Linux, capped by its
// cgroups' CPU quota (a container limited to 2 CPUs on a 64-CPU host: 2; ceil of a fraction).
// Threads beyond a quota are not only useless for a memory-bound step: once the quota is spent
// the kernel stops every thread of the group until the next period (100 ms by default).
int available_cpus_now() {
  int cpus = 0;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
#endif
  if (cpus < 1) cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpus = std::max(1, cpus);
#if defined(__linux__)
  const int limit = cgroup_limit("");
  if (limit > 0) cpus = std::min(cpus, limit);
#endif
  return cpus;
}

const int g_available_cpus = available_cpus_now();

// The most threads a step may use: 4x the CPUs available at import.  A step is bound by memory
// bandwidth, so threads beyond the cores only add wake-ups; 4x leaves room to oversubscribe on
// purpose while keeping the pool (one stack each) small whatever is asked for.
const int g_max_threads = 4 * g_available_cpus;

// OMP_NUM_THREADS as a thread count: its first entry ("4" of the nested list "4,2"), a decimal
// integer >= 1 (surrounding blanks allowed), capped at g_max_threads; anything else ("", "0",
// "-3", "+2", "abc", "2.5") counts as unset (0).
int env_threads() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (env == nullptr) return 0;
  const std::string s(env);
  const int64_t v = decimal(s.substr(0, s.find(',')), 9, g_max_threads);  // 10+ digits: the cap
  return v < 1 ? 0 : static_cast<int>(std::min<int64_t>(v, g_max_threads));
}

int default_threads() {
  const int env = env_threads();
  return env > 0 ? env : std::min(g_available_cpus, g_max_threads);
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};
std::atomic<int> g_threads{default_threads()};
// Measured on the 2-core development machine (AVX-512, float32): one thread beats two below
// ~50K elements for SGD (12 B/element) and ~14K for Adam (28 B/element), i.e. ~400-600 KB of
// traffic; 256 KiB per thread puts the switch just past those crossovers.
std::atomic<int64_t> g_grain{256 * 1024};

// ------------------------------------------------------------------------------ the pool
// Workers wait for a job by spinning briefly (a step that follows another within ~100 us, as the
// groups of one optimizer do, finds them awake), then sleep on a condition variable.  (GNU
// OpenMP's workers spin for milliseconds, which starves other thread pools on a small machine.)
// A worker that finds itself on the CPU of the thread that publishes jobs does not spin: it would
// only keep that thread off its CPU (on a busy machine the scheduler puts a woken worker there).
constexpr auto kWorkerSpin = std::chrono::microseconds(100);
// The caller, once no chunk is left to claim, waits for the chunks in flight on workers: it
// spins (they take a few microseconds each), yielding after kCallerPure in case such a worker
// waits for the caller's CPU, then sleeps until the last one is done.
constexpr auto kCallerPure = std::chrono::microseconds(20);
constexpr auto kCallerSpin = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__) && defined(__GNUC__)
  __asm__ __volatile__("yield");
#endif
}

// The CPU the calling thread runs on, or -1 where unknown.
inline int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// Spin until pred() holds (true), `budget` has passed or stop() holds (false); after `pure` has
// passed, yield the CPU between checks.
template <class P, class S>
bool spin_until(const P& pred, std::chrono::microseconds budget, std::chrono::microseconds pure,
                const S& stop) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    const auto spent = std::chrono::steady_clock::now() - start;
    if (spent >= budget || stop()) return pred();
    if (spent >= pure) std::this_thread::yield();
  }
}

// One job at a time (a second caller meanwhile runs its chunks itself).  A job of n chunks run
// by P threads gives thread t (the caller is 0) the home range [t*n/P, (t+1)*n/P): on a quiet
// machine every thread runs its own range at every step, so a tensor that fits in the caches
// stays in the same core's cache from step to step, as with a static split.  A thread done with
// its range takes chunks from the back of the others' ranges, so a worker that is descheduled,
// or late to wake, delays nothing: the running threads take its share.
//
// Each range is one 64-bit word on its own cache line: generation (32 bits) | front (16) |
// back (16).  The owner claims chunk `front` by a compare-and-swap that increments it, a thief
// chunk `back - 1` by one that decrements `back`; the swap fails when the generation has moved
// on, so a late worker can never claim a chunk of a finished job, nor of a later job it has not
// seen published.  The job's fn/ctx (the caller's stack) are read only after a successful
// claim, and the job is not complete (the caller does not return) until that chunk is counted
// done, so they are alive whenever they are read.
// The caller's floating-point mode: a worker runs a job's chunks under the MXCSR control bits
// (flush-to-zero, denormals-are-zero, rounding, exception masks) of the thread that published it,
// as the caller's own chunks run: the same bits for any thread count whatever mode the caller set
// (torch.set_flush_denormal, fesetround).  A thread's MXCSR is otherwise inherited at its creation,
// and the pool's workers are created once.  (The exception flags, bits 0-5, stay the worker's.)
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
constexpr unsigned kCsrControl = 0xFFC0u;
unsigned fp_mode() { return _mm_getcsr() & kCsrControl; }
void set_fp_mode(unsigned mode) {
  const unsigned csr = _mm_getcsr();
  if ((csr & kCsrControl) != mode) _mm_setcsr((csr & ~kCsrControl) | mode);
}
#elif defined(__aarch64__) && defined(__GNUC__)
// FPCR's control bits: rounding mode (RMode, 23:22), flush-to-zero (FZ, 24; FZ16, 19),
// default NaN (DN, 25), FEAT_AFP's AH/FIZ/NEP (2:0) and the trap enables (IOE..IXE 12:8, IDE
// 15), as x86's MXCSR control bits are carried (bits a CPU lacks read as 0).
constexpr uint64_t kFpcrControl = (3ull << 22) | (1ull << 24) | (1ull << 25) | (1ull << 19) |
                                  0x7ull | (0x1Full << 8) | (1ull << 15);
static uint64_t read_fpcr() {
  uint64_t v;
  asm volatile("mrs %0, fpcr" : "=r"(v));
  return v;
}
unsigned fp_mode() { return static_cast<unsigned>(read_fpcr() & kFpcrControl); }
void set_fp_mode(unsigned mode) {
  const uint64_t v = read_fpcr();
  if ((v & kFpcrControl) != mode) {
    const uint64_t w = (v & ~kFpcrControl) | mode;
    asm volatile("msr fpcr, %0" : : "r"(w));
  }
}
#else
unsigned fp_mode() { return 0; }
void set_fp_mode(unsigned) {}
#endif

// Whether the calling thread is running a pool job's chunk (a worker, or a caller in its job).
thread_local bool t_in_pool = false;
struct InPool {
  bool was = t_in_pool;
  InPool() { t_in_pool = true; }
  ~InPool() { t_in_pool = was; }
};

class Pool {
 public:
  explicit Pool(int max_threads) : ranges_(static_cast<std::size_t>(max_threads)) {}

  void run(int64_t n, int threads, ChunkFn fn, void* ctx, bool linger) {
    std::unique_lock<std::mutex> job(job_mu_, std::try_to_lock);
    if (!job.owns_lock()) {  // another step is using the pool: run this one here
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    grow(threads - 1);
    execute(n, std::min(threads, static_cast<int>(threads_.size()) + 1), fn, ctx, linger);
  }

  // Every chunk of [0, n) at once, each on a thread of its own (the caller's is chunk 0): for
  // chunks that wait for each other (a BLAS library's jobs).  Waits while another caller uses
  // the pool; false, with nothing run, when the pool cannot have n threads.  (Any thread may
  // still run a late worker's chunk after its own, which it can only start once its own is
  // done: with n threads for n chunks every chunk starts while the others run.)
  bool run_together(int64_t n, ChunkFn fn, void* ctx) {
    if (n > static_cast<int64_t>(ranges_.size())) return false;  // (max_threads)
    std::unique_lock<std::mutex> job(job_mu_);
    grow(static_cast<int>(n) - 1);
    if (static_cast<int64_t>(threads_.size()) + 1 < n) return false;
    execute(n, static_cast<int>(n), fn, ctx, true);
    return true;
  }

 private:
  // Publish the job (n chunks over p threads, the caller one of them) and run it (job_mu_ held).
  void execute(int64_t n, int p, ChunkFn fn, void* ctx, bool linger) {
    fn_ = fn;
    ctx_ = ctx;
    fp_mode_.store(fp_mode(), std::memory_order_relaxed);
    linger_.store(linger, std::memory_order_relaxed);
    caller_cpu_.store(current_cpu(), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = static_cast<uint32_t>(gen_of(job_.load(std::memory_order_relaxed)) + 1);
    for (int t = 0; t < p; ++t) {
      const uint64_t lo = static_cast<uint64_t>(n * t / p), hi = static_cast<uint64_t>(n * (t + 1) / p);
      ranges_[static_cast<std::size_t>(t)].word.store((gen << 32) | (lo << 16) | hi,
                                                      std::memory_order_relaxed);
    }
    // The job word: generation | thread count | chunk count; publishes the ranges (release).
    job_.store((gen << 32) | (static_cast<uint64_t>(p) << 16) | static_cast<uint64_t>(n),
               std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      wake_cv_.notify_all();
    }
    work(0, job_.load(std::memory_order_relaxed));
    // Every chunk is claimed; wait for those in flight on workers.
    auto finished = [&] { return done_.load(std::memory_order_acquire) == n; };
    if (!spin_until(finished, kCallerSpin, kCallerPure, [] { return false; })) {
      std::unique_lock<std::mutex> lk(mu_);
      caller_waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lk, finished);
      caller_waiting_.store(false, std::memory_order_relaxed);
    }
  }

  struct alignas(64) Range {
    std::atomic<uint64_t> word{0};
  };
  static uint32_t gen_of(uint64_t w) { return static_cast<uint32_t>(w >> 32); }
  static int64_t front_of(uint64_t w) { return static_cast<int64_t>((w >> 16) & 0xffff); }
  static int64_t back_of(uint64_t w) { return static_cast<int64_t>(w & 0xffff); }

  // Claim a chunk of range r for job `gen`: its front (own range) or its back (another's);
  // -1 when the range is empty or the job is no longer `gen`.
  int64_t claim(std::size_t r, uint32_t gen, bool own) {
    std::atomic<uint64_t>& word = ranges_[r].word;
    uint64_t w = word.load(std::memory_order_acquire);
    while (gen_of(w) == gen && front_of(w) < back_of(w)) {
      const uint64_t next = own ? w + (uint64_t{1} << 16) : w - 1;
      if (word.compare_exchange_weak(w, next, std::memory_order_acq_rel, std::memory_order_acquire))
        return own ? front_of(w) : back_of(w) - 1;
    }
    return -1;
  }

  // Thread `self` runs its own range, then the others' (from their backs), for job word `job`.
  void work(int self, uint64_t job) {
    const InPool mark;
    const uint32_t gen = gen_of(job);
    const int p = static_cast<int>((job >> 16) & 0xffff);
    const int64_t n = static_cast<int64_t>(job & 0xffff);
    for (int k = 0; k < p; ++k) {
      const auto r = static_cast<std::size_t>((self + k) % p);
      for (int64_t i; (i = claim(r, gen, k == 0)) >= 0;) {
        fn_(ctx_, i);
        if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == n &&
            caller_waiting_.load(std::memory_order_seq_cst)) {
          { std::lock_guard<std::mutex> lk(mu_); }
          done_cv_.notify_all();
        }
      }
    }
  }

  // `seen`: the last job published before this worker was started (it takes any later one).
  void worker_main(int id, uint32_t seen) {
#ifdef FASTOPTIM_POSIX
    sigset_t all;  // signals go to the application's threads, never to ours
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);
#endif
    bool linger = true;
    for (;;) {
      auto published = [&] { return gen_of(job_.load(std::memory_order_acquire)) != seen; };
      auto on_caller_cpu = [&] {
        const int cpu = current_cpu();
        return cpu >= 0 && cpu == caller_cpu_.load(std::memory_order_relaxed);
      };
      if (!linger || on_caller_cpu() ||
          !spin_until(published, kWorkerSpin, kWorkerSpin, on_caller_cpu)) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_cv_.wait(lk, published);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      const uint64_t job = job_.load(std::memory_order_acquire);
      seen = gen_of(job);
      linger = linger_.load(std::memory_order_relaxed);
      // A worker beyond this job's thread count leaves it to the others.
      if (id < static_cast<int>((job >> 16) & 0xffff)) {
        // (stored before the job word: a worker that sees a job sees its mode, or a later
        // job's when that job is over, whose chunks it then cannot claim)
        set_fp_mode(fp_mode_.load(std::memory_order_relaxed));
        work(id, job);
      }
    }
  }

  // Start workers until there are `workers` (or the system refuses a thread: run with fewer).
  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size()) + 1;
      try {
        // (the job about to be published is new to it, however late the thread starts)
        const uint32_t seen = gen_of(job_.load(std::memory_order_relaxed));
        threads_.emplace_back([this, id, seen] { worker_main(id, seen); });
      } catch (const std::system_error&) {
        return;
      }
    }
  }

  // What every claim and completion writes gets a cache line of its own, away from what workers
  // only read during a job (job_, fn_, ctx_).
  std::vector<Range> ranges_;  // one per thread, up to max_threads
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint64_t> job_{0};
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<unsigned> fp_mode_{0};  // the caller's MXCSR control bits (fp_mode)
  alignas(64) std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waiting_{false};
  std::atomic<int> caller_cpu_{-1};  // where the last job was published from
  std::atomic<bool> linger_{true};   // whether workers spin for the next job after this one
  std::mutex job_mu_;  // held by the step using the pool
  std::mutex mu_;      // for the condition variables
  std::condition_variable wake_cv_, done_cv_;
  std::vector<std::thread> threads_;  // never joined: the pool lives as long as the process
};

// The pool and the mutex that guards its creation are never destroyed: workers may still be
// asleep in them at exit, and a forked child, where they do not exist, abandons them.
std::mutex* g_pool_mu = new std::mutex;
std::atomic<Pool*> g_pool{nullptr};
std::atomic<int> g_forks{0};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  std::lock_guard<std::mutex> lk(*g_pool_mu);
  p = g_pool.load(std::memory_order_relaxed);
  if (p == nullptr) {
    p = new Pool(g_max_threads);
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

#ifdef FASTOPTIM_POSIX
// In a forked child only the forking thread exists: the pool's workers are gone and its mutexes
// may be held by threads that no longer exist.  Abandon them (a new pool starts if the child asks
// for threads) and run serially until the child calls set_num_threads.
void blas_after_fork();  // (below)
void after_fork_in_child() {
  blas_after_fork();
  g_pool_mu = new std::mutex;
  g_pool.store(nullptr, std::memory_order_relaxed);
  g_threads.store(1, std::memory_order_relaxed);
  g_forks.fetch_add(1, std::memory_order_relaxed);
}
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, after_fork_in_child);
#endif

// Threads worth using for a step moving `bytes`: at least one grain of traffic per thread.
int threads_for(int64_t bytes) {
  const int64_t by_size = bytes / std::max<int64_t>(1, g_grain.load());
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g_threads.load(), by_size)));
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
  }
  return "?";
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::scalar, Isa::neon, Isa::avx2, Isa::avx512})
    if (compiled(isa) && cpu_supports(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() { return static_cast<Isa>(g_isa.load()); }

void set_isa(Isa isa) {
  if (!compiled(isa) || !cpu_supports(isa))
    throw std::invalid_argument(std::string("instruction set '") + isa_name(isa) +
                                "' is not available on this machine");
  g_isa.store(static_cast<int>(isa));
}

void run_chunks(int64_t nchunks, int threads, ChunkFn fn, void* ctx, bool linger) {
  if (nchunks <= 0) return;
  if (threads <= 1 || nchunks == 1) {
    for (int64_t i = 0; i < nchunks; ++i) fn(ctx, i);
    return;
  }
  threads = std::min(threads, g_max_threads);
  if (nchunks < kMaxChunks) {
    pool().run(nchunks, threads, fn, ctx, linger);
    return;
  }
  // More chunks than the pool's 16-bit chunk indices hold (the Newton-Schulz helpers' fixed
  // chunks of an array of 2^31 elements and more): the pool runs runs of consecutive chunks,
  // each chunk still called once with its own index (the same results).
  struct Runs {
    ChunkFn fn;
    void* ctx;
    int64_t n, per;
  } runs{fn, ctx, nchunks, (nchunks + kMaxChunks - 2) / (kMaxChunks - 1)};
  const ChunkFn run = [](void* c, int64_t k) {
    const Runs& r = *static_cast<const Runs*>(c);
    for (int64_t i = k * r.per, hi = std::min(r.n, i + r.per); i < hi; ++i) r.fn(r.ctx, i);
  };
  pool().run((nchunks + runs.per - 1) / runs.per, threads, run, &runs, linger);
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  g_threads.store(std::min(n, g_max_threads));
}
int get_num_threads() { return g_threads.load(); }
int max_threads() { return g_max_threads; }
int available_cpus() { return g_available_cpus; }
int cgroup_cpu_limit(const std::string& root) { return cgroup_limit(root); }
int fork_count() { return g_forks.load(); }

// ------------------------------------------------------------------ BLAS on fastoptim's pool
// OpenBLAS (>= 0.3.28) runs its threaded operations' jobs through a callback when one is set
// (openblas_set_threads_callback_function): `dojob(i, jobs + i * size, arg)` for every job i,
// all at once (the jobs of a gemm wait for each other's packed panels) and synchronously.
// Newton-Schulz sets this one while it iterates (host.py), so that its products and the passes
// between them take turns on one pool: OpenBLAS's own workers busy-wait for ~0.1 s after each
// call on x86-64, on the CPUs a pass wants next.  The jobs' order, sizes and arithmetic are
// OpenBLAS's: the same bits, whichever threads run them.
namespace {
using BlasJob = void (*)(int thread, void* job, int arg);
using BlasThreads = void (*)(int sync, BlasJob dojob, int njobs, std::size_t size, void* jobs,
                             int arg);
using BlasSetter = void (*)(BlasThreads);

std::mutex* g_blas_mu = new std::mutex;  // (never destroyed: replaced in a forked child)
int g_blas_users = 0;  // blas_threads_on_pool(setter, true) calls not yet undone
BlasSetter g_blas_setter = nullptr;  // the setter that set the callback, while g_blas_users > 0
std::atomic<bool> g_blas_on_pool{false};
std::atomic<int64_t> g_blas_pool_calls{0}, g_blas_thread_calls{0};  // (blas_calls)

struct BlasCall {
  BlasJob dojob;
  char* jobs;
  std::size_t size;
  int arg;
};

void blas_job(void* ctx, int64_t i) {
  const BlasCall& c = *static_cast<const BlasCall*>(ctx);
  c.dojob(static_cast<int>(i), c.jobs + static_cast<std::size_t>(i) * c.size, c.arg);
}

// (noexcept: nothing may be thrown through OpenBLAS's C frames; std::bad_alloc would end the
// process here)
void fastoptim_blas_threads(int /*sync*/, BlasJob dojob, int njobs, std::size_t size, void* jobs,
                            int arg) noexcept {
  BlasCall call{dojob, static_cast<char*>(jobs), size, arg};
  if (njobs <= 0) return;
  if (njobs == 1) return blas_job(&call, 0);
  // On the pool, unless this thread is running a pool chunk itself (none calls BLAS today) or
  // the pool cannot have njobs threads: then threads of their own, under the caller's FP mode.
  if (!t_in_pool && njobs < kMaxChunks && pool().run_together(njobs, blas_job, &call)) {
    g_blas_pool_calls.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  g_blas_thread_calls.fetch_add(1, std::memory_order_relaxed);
  const unsigned mode = fp_mode();
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(njobs - 1));
  try {
    for (int i = 1; i < njobs; ++i)
      threads.emplace_back([&call, mode, i] {
        set_fp_mode(mode);
        blas_job(&call, i);
      });
  } catch (const std::system_error&) {
    // The jobs wait for each other: fewer threads than jobs would hang.  Nothing can be thrown
    // through OpenBLAS's C frames.
    std::fprintf(stderr, "fastoptim: cannot start threads for a BLAS call\n");
    std::abort();
  }
  blas_job(&call, 0);
  for (auto& t : threads) t.join();
}
// In a forked child the threads that had set the callback do not exist: unset it (OpenBLAS's
// threads again, as the child's pool starts serial), with a new mutex (the parent's may have
// been held by one of those threads).
void blas_after_fork() {
  g_blas_mu = new std::mutex;
  if (g_blas_users > 0 && g_blas_setter != nullptr) g_blas_setter(nullptr);
  g_blas_users = 0;
  g_blas_setter = nullptr;
  g_blas_on_pool.store(false, std::memory_order_relaxed);
}
}  // namespace

void blas_threads_on_pool(void* setter, bool on) {
  std::lock_guard<std::mutex> lk(*g_blas_mu);
  if (on && g_blas_users++ == 0) {
    g_blas_setter = reinterpret_cast<BlasSetter>(setter);
    g_blas_setter(&fastoptim_blas_threads);
    g_blas_on_pool.store(true);
  } else if (!on && g_blas_users > 0 && --g_blas_users == 0) {
    g_blas_setter(nullptr);
    g_blas_setter = nullptr;
    g_blas_on_pool.store(false);
  }
}

BlasCalls blas_calls() { return {g_blas_pool_calls.load(), g_blas_thread_calls.load()}; }

void set_grain(int64_t bytes) {
  if (bytes < 1) throw std::invalid_argument("grain must be >= 1");
  g_grain.store(bytes);
}
int64_t get_grain() { return g_grain.load(); }

#define FASTOPTIM_FORWARD(fn, ...)                                    \
  switch (active_isa()) {                                             \
    FASTOPTIM_CASE_SCALAR(fn, __VA_ARGS__)                            \
    FASTOPTIM_CASE_AVX2(fn, __VA_ARGS__)                              \
    FASTOPTIM_CASE_AVX512(fn, __VA_ARGS__)                            \
    FASTOPTIM_CASE_NEON(fn, __VA_ARGS__)                              \
    default: throw std::logic_error("fastoptim: no active instruction set"); \
  }
#ifdef FASTOPTIM_HAVE_SCALAR
#define FASTOPTIM_CASE_SCALAR(fn, ...) case Isa::scalar: scalar::fn(__VA_ARGS__); break;
#else
#define FASTOPTIM_CASE_SCALAR(fn, ...)
#endif
#ifdef FASTOPTIM_HAVE_AVX2
#define FASTOPTIM_CASE_AVX2(fn, ...) case Isa::avx2: avx2::fn(__VA_ARGS__); break;
#else
#define FASTOPTIM_CASE_AVX2(fn, ...)
#endif
#ifdef FASTOPTIM_HAVE_AVX512
#define FASTOPTIM_CASE_AVX512(fn, ...) case Isa::avx512: avx512::fn(__VA_ARGS__); break;
#else
#define FASTOPTIM_CASE_AVX512(fn, ...)
#endif
#ifdef FASTOPTIM_HAVE_NEON
#define FASTOPTIM_CASE_NEON(fn, ...) case Isa::neon: neon::fn(__VA_ARGS__); break;
#else
#define FASTOPTIM_CASE_NEON(fn, ...)
#endif

template <class Opt> void step(const Plan& plan, typename Opt::Hyper& h, int64_t step_number) {
  const int need = Opt::nstate(Opt::variant(h));
  if (plan.nstate != need)
    throw std::invalid_argument("plan has " + std::to_string(plan.nstate) +
                                " state buffers per tensor, these hyper-parameters need " +
                                std::to_string(need));
  if (step_number < 1) throw std::invalid_argument("step must be >= 1");
  const int threads = threads_for(plan.traffic());
  FASTOPTIM_FORWARD(step<Opt>, plan, h, step_number, threads)
  after_step<Opt>(h, step_number, 0);
}

// Whether Opt advances running scalars after a step (NAdam's mu_product): a row update of
// several jobs would advance them once per job, so row optimizers must have none.
template <class Opt, class = void> struct has_running_scalars : std::false_type {};
template <class Opt>
struct has_running_scalars<
    Opt, std::void_t<decltype(Opt::after_step(std::declval<typename Opt::Hyper&>(), int64_t{}))>>
    : std::true_type {};

// One job of step_rows: throws (naming job `j`) unless it can run.
template <class Opt> void check_rows(const Rows& r, const typename Opt::Hyper& h, int64_t step_number, std::size_t j) {
  const std::string job = "step_rows: job " + std::to_string(j) + ": ";
  const int need = Opt::nstate(Opt::variant(h));
  if (r.nstate != need)
    throw std::invalid_argument(job + std::to_string(r.nstate) +
                                " state arrays, these hyper-parameters need " + std::to_string(need));
  if (step_number < 1) throw std::invalid_argument(job + "step must be >= 1");
  if (r.dtype != DType::f32 && r.dtype != DType::f64)
    throw std::invalid_argument(job + "float32 or float64 arrays only");
  if (r.k < 0 || r.width < 0 || r.nrows < 0) throw std::invalid_argument(job + "negative size");
  for (int64_t i = 0; i < r.k; ++i) {
    const int64_t at = r.index[i];
    if (at < 0 || at >= r.nrows)
      throw std::out_of_range(job + "index " + std::to_string(at) + " is out of range for " +
                              std::to_string(r.nrows) + " rows");
    if (i > 0 && at <= r.index[i - 1])
      throw std::invalid_argument(job + "indices must be strictly increasing (coalesced)");
  }
}

template <class Opt>
void step_rows(const Rows* jobs, const typename Opt::Hyper* hypers, const int64_t* steps,
               std::size_t n) {
  static_assert(!has_running_scalars<Opt>::value,
                "row optimizers read their hyper-parameters only (no after_step)");
  for (std::size_t j = 0; j < n; ++j) check_rows<Opt>(jobs[j], hypers[j], steps[j], j);
  for (std::size_t j = 0; j < n; ++j) {  // every check before any element is written
    const Rows& r = jobs[j];
    const int64_t item = r.dtype == DType::f64 ? 8 : 4;
    const int threads = threads_for(r.k * r.width * item * (2 * r.nstate + 3));
    FASTOPTIM_FORWARD(step_rows<Opt>, r, hypers[j], steps[j], threads)
  }
}

void stream(float* const* arrays, int narrays, int64_t n) {
  if (narrays < 2 || narrays > kMaxState + 2)
    throw std::invalid_argument("stream: need 2 to " + std::to_string(kMaxState + 2) + " arrays");
  const int threads = threads_for(n * 4 * (2 * narrays - 1));
  FASTOPTIM_FORWARD(stream, arrays, narrays, n, threads)
}

void stream_mixed(const StreamArrays& s, int64_t n) {
  if (s.nrw32 < 0 || s.nrw32 > 4 || s.nrw16 < 0 || s.nrw16 > 4 || (s.grad32 == nullptr) == (s.grad16 == nullptr))
    throw std::invalid_argument("stream_mixed: 0 to 4 arrays of each width and one gradient");
  const int64_t bytes =
      n * (8 * s.nrw32 + 4 * s.nrw16 + (s.grad16 ? 2 : 4) + (s.out16 ? 2 : 0) + (s.rw8 ? 2 : 0));
  const int threads = threads_for(bytes);
  FASTOPTIM_FORWARD(stream_mixed, s, n, threads)
}

GradStats grad_stats(const Plan& plan) {
  const int threads = threads_for(plan.grad_bytes());
  GradStats r;
  FASTOPTIM_FORWARD(grad_stats, plan, threads, r)
  return r;
}

void accumulate(const Plan& plan, double scale) {
  const int threads = threads_for(plan.traffic());  // (buffers read and written, grads read)
  FASTOPTIM_FORWARD(accumulate, plan, scale, threads)
}

void quantize_blockwise(const float* values, int64_t n, QMap m, uint8_t* codes, float* absmax) {
  const int threads = threads_for(n * 5);  // (values read, codes written)
  FASTOPTIM_FORWARD(quantize_blockwise, values, n, m, codes, absmax, threads)
}

void dequantize_blockwise(const uint8_t* codes, const float* absmax, int64_t n, QMap m,
                          float* out) {
  const int threads = threads_for(n * 5);
  FASTOPTIM_FORWARD(dequantize_blockwise, codes, absmax, n, m, out, threads)
}

double stream_read(const float* a, int64_t n) {
  const int threads = threads_for(4 * n);
  double r = 0;
  FASTOPTIM_FORWARD(stream_read, a, n, threads, r)
  return r;
}

// ------------------------------------------------------------------ Newton-Schulz helpers
// Plain loops (memory-bound; the compiler vectorizes them for the baseline ISA), on the pool in
// fixed chunks.  They run between two BLAS calls: when BLAS runs on the pool too
// (blas_threads_on_pool) its workers spin for the next product's jobs; else BLAS's own threads
// want every CPU next, and the pool's workers sleep as soon as a pass is done (linger = false).
// Rounding to bfloat16 there is convert.hpp's bf16_round_nearest_f32 (branch-free 32-bit integer
// code: the loops vectorize).  The project builds with -ffp-contract=off: every product below is
// rounded before the sum it feeds (NumPy's bits), never fused into an FMA.
namespace {

bool linger_between_products() { return g_blas_on_pool.load(std::memory_order_relaxed); }

// f(lo, hi) over [0, n) in fixed chunks of 2^15 elements, on the threads `bytes` of traffic
// are worth.
template <class F> void on_chunks(int64_t n, int64_t bytes, const F& f) {
  for_each_range(n, int64_t{1} << 15, threads_for(bytes), f, linger_between_products());
}

// out = (alpha x + beta y) (each product rounded to T, then the sum), then rounded to bfloat16
// when Bf16: one loop.
template <bool Bf16, class T>
void combine_impl(T* out, const T* x, const T* y, T alpha, T beta, int64_t n) {
  on_chunks(n, 3 * static_cast<int64_t>(sizeof(T)) * n, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T ax = alpha * x[i], by = beta * y[i];
      if constexpr (Bf16)
        out[i] = bf16_round_nearest_f32(ax + by);
      else
        out[i] = ax + by;
    }
  });
}

template <bool Bf16, class T> void divide_impl(T* x, T d, int64_t n) {
  on_chunks(n, 2 * static_cast<int64_t>(sizeof(T)) * n, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if constexpr (Bf16)
        x[i] = bf16_round_nearest_f32(x[i] / d);
      else
        x[i] = x[i] / d;
    }
  });
}

// out = lerp(a, b, w) from the nearer end, as torch.lerp (and NumPy's `d = b - a; d *= w;
// a + d`): a + (b - a) * w when w < 0.5, else b - (b - a) * (1 - w), (1 - w) and every
// operation rounded to T.  One loop per end (w is the same for every element).
template <class T> void lerp_impl(T* out, const T* a, const T* b, T w, int64_t n) {
  const bool near_a = w < T(0.5);  // (a NaN weight: the b end, as NumPy's `w < 0.5` test)
  const T c = near_a ? w : T(1) - w;
  on_chunks(n, 3 * static_cast<int64_t>(sizeof(T)) * n, [=](int64_t lo, int64_t hi) {
    if (near_a)
      for (int64_t i = lo; i < hi; ++i) out[i] = a[i] + (b[i] - a[i]) * c;
    else
      for (int64_t i = lo; i < hi; ++i) out[i] = b[i] - (b[i] - a[i]) * c;
  });
}

}  // namespace

void lerp(float* out, const float* a, const float* b, float w, int64_t n) {
  lerp_impl(out, a, b, w, n);
}
void lerp(double* out, const double* a, const double* b, double w, int64_t n) {
  lerp_impl(out, a, b, w, n);
}

void combine(float* out, const float* x, const float* y, float alpha, float beta, int64_t n,
             bool bf16) {
  if (bf16)
    combine_impl<true>(out, x, y, alpha, beta, n);
  else
    combine_impl<false>(out, x, y, alpha, beta, n);
}

void combine(double* out, const double* x, const double* y, double alpha, double beta,
             int64_t n) {
  combine_impl<false>(out, x, y, alpha, beta, n);
}

void divide(float* x, float d, int64_t n, bool bf16) {
  if (bf16)
    divide_impl<true>(x, d, n);
  else
    divide_impl<false>(x, d, n);
}

void divide(double* x, double d, int64_t n) { divide_impl<false>(x, d, n); }

void round_bfloat16(float* x, int64_t n) {
  on_chunks(n, 8 * n, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) x[i] = bf16_round_nearest_f32(x[i]);
  });
}

void round_to(uint16_t* out, const float* x, int64_t n, bool bf16) {
  on_chunks(n, 6 * n, [=](int64_t lo, int64_t hi) {
    if (bf16)
      for (int64_t i = lo; i < hi; ++i) out[i] = bf16_round_nearest(x[i]);
    else
      for (int64_t i = lo; i < hi; ++i) out[i] = f16_round_nearest(x[i]);
  });
}

namespace {

// The lower triangle of the m x m matrix a (row-major) set from the upper one, tile by tile
// (kTile x kTile, read along the upper tile's rows, written transposed); with `bf16` the upper
// triangle and the diagonal are rounded first (so both halves hold the same rounded values).
// Block row rb of the lower triangle has rb + 1 tiles: each task takes block rows t and
// nb - 1 - t, so that the tasks are equal (nb + 1 tiles).
template <class T> void symmetrize_impl(T* a, int64_t m, bool bf16) {
  constexpr int64_t kTile = 32;
  const int64_t bytes = static_cast<int64_t>(sizeof(T)) * m * m;
  const int64_t nb = (m + kTile - 1) / kTile;
  auto block_row = [=](int64_t rb) {
    const int64_t r0 = rb * kTile, r1 = std::min(m, r0 + kTile);
    for (int64_t cb = 0; cb <= rb; ++cb) {
      const int64_t c0 = cb * kTile, c1 = std::min(m, c0 + kTile);
      // upper tile: rows c0..c1, columns r0..r1 (column > row on the diagonal tile)
      if constexpr (std::is_same_v<T, float>) {
        if (bf16)
          for (int64_t i = c0; i < c1; ++i)
            for (int64_t j = std::max(r0, i); j < r1; ++j)
              a[i * m + j] = bf16_round_nearest_f32(a[i * m + j]);
      }
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = c0; j < std::min(c1, i); ++j) a[i * m + j] = a[j * m + i];
    }
  };
  for_each_chunk(
      (nb + 1) / 2, threads_for(bytes),
      [=](int64_t t) {
        block_row(t);
        if (nb - 1 - t != t) block_row(nb - 1 - t);
      },
      linger_between_products());
}

// out (cols x rows, row-major) = x (rows x cols) transposed, tile by tile, each task one block
// of 32 rows of out.
template <class T> void transpose_impl(T* out, const T* x, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  const int64_t bytes = 2 * static_cast<int64_t>(sizeof(T)) * rows * cols;
  auto block = [=](int64_t ob) {
    const int64_t j0 = ob * kTile, j1 = std::min(cols, j0 + kTile);  // out's rows, x's columns
    for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * rows + i] = x[i * cols + j];
    }
  };
  for_each_chunk((cols + kTile - 1) / kTile, threads_for(bytes), block, linger_between_products());
}

}  // namespace

void symmetrize(float* a, int64_t m, bool bf16) { symmetrize_impl(a, m, bf16); }
void symmetrize(double* a, int64_t m) { symmetrize_impl(a, m, false); }
void transpose(float* out, const float* x, int64_t rows, int64_t cols) {
  transpose_impl(out, x, rows, cols);
}
void transpose(double* out, const double* x, int64_t rows, int64_t cols) {
  transpose_impl(out, x, rows, cols);
}

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step<Opt>(const Plan&, Opt::Hyper&, int64_t);
FASTOPTIM_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step_rows<Opt>(const Rows*, const Opt::Hyper*, const int64_t*, std::size_t);
FASTOPTIM_ROW_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

}  // namespace fastoptim
