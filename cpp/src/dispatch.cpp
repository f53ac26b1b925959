// Run-time choice of instruction set, thread count and the serial threshold; the ISA-neutral
// entry points that forward to the driver compiled for the active ISA.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "fastoptim/fastoptim.hpp"
#include "fastoptim/registry.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(_MSC_VER) && !defined(__GNUC__)
#include <intrin.h>
#endif

namespace fastoptim {

// Declarations of the per-ISA drivers (step.cpp compiled once per ISA).
#define FASTOPTIM_DECLARE_ISA(ns)                                                        \
  namespace ns {                                                                         \
  template <class Opt> void step(const Plan&, const typename Opt::Hyper&, int64_t, int); \
  void stream(float* const*, int, int64_t, int);                                    \
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
  if (isa == Isa::scalar) return true;
  if (!osxsave || !avx || !fma) return false;
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

bool cpu_supports(Isa isa) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();  // may run during static initialisation, before libgcc's constructor
#endif
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__)
    case Isa::scalar: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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

int default_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};
std::atomic<int> g_threads{default_threads()};
// Measured on the 2-core development machine (AVX-512, float32): one thread beats two below
// ~50K elements for SGD (12 B/element) and ~14K for Adam (28 B/element), i.e. ~400-600 KB of
// traffic; 256 KiB per thread puts the switch just past those crossovers.
std::atomic<int64_t> g_grain{256 * 1024};

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

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
  g_threads.store(n);
}
int get_num_threads() { return g_threads.load(); }

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

void stream(float* const* arrays, int narrays, int64_t n) {
  if (narrays < 2 || narrays > kMaxState + 2)
    throw std::invalid_argument("stream: need 2 to " + std::to_string(kMaxState + 2) + " arrays");
  const int threads = threads_for(n * 4 * (2 * narrays - 1));
  FASTOPTIM_FORWARD(stream, arrays, narrays, n, threads)
}

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step<Opt>(const Plan&, Opt::Hyper&, int64_t);
FASTOPTIM_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

}  // namespace fastoptim
