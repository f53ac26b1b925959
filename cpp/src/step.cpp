// The generic driver.  This file is compiled once per instruction set (CMake passes
// -DFASTOPTIM_ISA_NS=<scalar|avx2|avx512|neon> and that ISA's flags); dispatch.cpp picks one.
//
// A step walks the concatenation of all tensors of a plan as one index space, cut into fixed
// 64-byte-granular chunks that the calling thread and fastoptim's worker pool run (run_chunks,
// dispatch.cpp), or run serially when the step is small.  Within a tensor, the
// element functor runs in a plain vectorized loop.  Every element is computed by the same
// functor whatever the split, so the result is independent of the number of threads and of
// which thread ran which chunk.
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "fastoptim/kernels.hpp"
#include "fastoptim/plan.hpp"
#include "fastoptim/registry.hpp"

#ifndef FASTOPTIM_ISA_NS
#error "compile with -DFASTOPTIM_ISA_NS=<isa>"
#endif

namespace fastoptim {
namespace FASTOPTIM_ISA_NS {

namespace {

constexpr int64_t kAlign = 16;  // elements per 64-byte line in float32

// Iterations of the loop that follows are independent: vectorize without alias checks.  (Not
// `#pragma omp simd`: OpenMP lowering runs before inlining and turns the kernel's local state
// array into a per-lane "simd array", which then blocks vectorization of most kernels.)
#if defined(__clang__)
#define FASTOPTIM_VECTORIZE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FASTOPTIM_VECTORIZE _Pragma("GCC ivdep")
#else
#define FASTOPTIM_VECTORIZE
#endif

// The inner loop: one SIMD sweep of the kernel over n elements.  The state pointers arrive as a
// parameter pack so each is a plain scalar (loop-invariant, restrict) the vectorizer can use.
// `k` is taken by value: a local copy cannot alias the arrays, so its coefficients stay in
// registers (broadcast once) instead of being reloaded every iteration.
template <class K, class T, class... S>
void sweep(const K k, T* __restrict p, const T* __restrict g, int64_t n, S* __restrict... s) {
FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    std::array<T, sizeof...(S)> v{s[i]...};
    k(p[i], g[i], v);
    std::size_t j = 0;
    ((s[i] = v[j++]), ...);
  }
}

template <class K, class T, std::size_t... J>
void sweep_tensor(const K& k, const Tensor& t, int64_t lo, int64_t hi, std::index_sequence<J...>) {
  sweep(k, static_cast<T*>(t.param) + lo, static_cast<const T*>(t.grad) + lo, hi - lo,
        (static_cast<T*>(t.state[J]) + lo)...);
}

template <class... S>
void stream_sweep(const float* __restrict last, int64_t n, float scale, S* __restrict... w) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    const float mean = (last[i] + ... + w[i]) * scale;
    ((w[i] = mean), ...);
  }
}

// Apply f(tensor, lo, hi) to the part of the global index range [lo, hi) in each tensor.
template <class F> void for_range(const Plan& plan, int64_t lo, int64_t hi, const F& f) {
  const auto& off = plan.offsets;
  std::size_t i = static_cast<std::size_t>(std::upper_bound(off.begin(), off.end(), lo) - off.begin());
  i = i == 0 ? 0 : i - 1;
  for (; i < plan.tensors.size() && off[i] < hi; ++i) {
    const int64_t a = std::max(lo, off[i]) - off[i];
    const int64_t b = std::min(hi, off[i + 1]) - off[i];
    if (b > a) f(plan.tensors[i], a, b);
  }
}

// Elements per chunk of a parallel step: a fixed partition of [0, total) that depends on the
// total only (never on the thread count), 64-byte granular, at least kMinChunk elements (a few
// microseconds of work: the claim of a chunk costs ~0.1 us) and at most kTargetChunks chunks.
constexpr int64_t kMinChunk = 8192;
constexpr int64_t kTargetChunks = 256;
inline int64_t chunk_elements(int64_t total) {
  const int64_t even = (total + kTargetChunks - 1) / kTargetChunks;
  return std::max(kMinChunk, (even + kAlign - 1) / kAlign * kAlign);
}

// Run f(lo, hi) over [0, total): in one call when `threads` <= 1, else chunk by chunk on the pool
// (run_chunks).  The same element functor computes every element either way.
template <class F> void parallel_ranges(int64_t total, int threads, const F& f) {
  const int64_t chunk = chunk_elements(total);
  if (threads <= 1 || total <= chunk) {
    f(int64_t{0}, total);
    return;
  }
  struct Ctx {
    const F* f;
    int64_t total, chunk;
  } ctx{&f, total, chunk};
  run_chunks((total + chunk - 1) / chunk, threads, [](void* p, int64_t i) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const int64_t lo = i * c.chunk;
    (*c.f)(lo, std::min(c.total, lo + c.chunk));
  }, &ctx);
}

template <class Opt, unsigned V>
void run_variant(const Plan& plan, const typename Opt::Coeffs& c, int threads) {
  const Kernel<Opt, float, V> kf{c};
  const Kernel<Opt, double, V> kd{c};
  parallel_ranges(plan.total(), threads, [&](int64_t lo, int64_t hi) {
    for_range(plan, lo, hi, [&](const Tensor& t, int64_t a, int64_t b) {
      constexpr auto states = std::make_index_sequence<Opt::nstate(V)>{};
      if (t.dtype == DType::f32)
        sweep_tensor<Kernel<Opt, float, V>, float>(kf, t, a, b, states);
      else
        sweep_tensor<Kernel<Opt, double, V>, double>(kd, t, a, b, states);
    });
  });
}

template <class Opt, unsigned... V>
void run_dispatch(std::integer_sequence<unsigned, V...>, unsigned v, const Plan& plan,
                  const typename Opt::Coeffs& c, int threads) {
  ((v == V ? run_variant<Opt, V>(plan, c, threads) : void()), ...);
}

}  // namespace

template <class Opt>
void step(const Plan& plan, const typename Opt::Hyper& h, int64_t step, int threads) {
  const typename Opt::Coeffs c = Opt::prepare(h, step);
  run_dispatch<Opt>(std::make_integer_sequence<unsigned, Opt::kVariants>{}, Opt::variant(h), plan,
                    c, threads);
}

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step<Opt>(const Plan&, const Opt::Hyper&, int64_t, int);
FASTOPTIM_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

// The roofline reference: one fused pass that reads every array and writes all but the last
// (as an optimizer reads param, grad and state and writes param and state), nothing else.
template <std::size_t... J>
void stream_impl(float* const* a, int64_t n, int threads, std::index_sequence<J...>) {
  constexpr std::size_t R = sizeof...(J) + 1;
  const float scale = 1.0f / static_cast<float>(R);
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    stream_sweep(a[R - 1] + lo, hi - lo, scale, (a[J] + lo)...);
  });
}

void stream(float* const* arrays, int narrays, int64_t n, int threads) {
  switch (narrays) {
    case 2: stream_impl(arrays, n, threads, std::make_index_sequence<1>{}); break;
    case 3: stream_impl(arrays, n, threads, std::make_index_sequence<2>{}); break;
    case 4: stream_impl(arrays, n, threads, std::make_index_sequence<3>{}); break;
    case 5: stream_impl(arrays, n, threads, std::make_index_sequence<4>{}); break;
    default: break;  // validated by the caller
  }
}

}  // namespace FASTOPTIM_ISA_NS
}  // namespace fastoptim
