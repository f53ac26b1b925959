// The generic driver.  This file is compiled once per instruction set (CMake passes
// -DFASTOPTIM_ISA_NS=<scalar|avx2|avx512|neon> and that ISA's flags); dispatch.cpp picks one.
//
// A step walks the concatenation of all tensors of a plan as one index space, split into one
// contiguous, 64-byte-granular range per thread inside a single OpenMP parallel region (or run
// serially when the step is small).  Within a tensor, the element functor runs in a plain
// `#pragma omp simd` loop.  Every element is computed by the same functor whatever the split,
// so the result is independent of the number of threads.
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "fastoptim/kernels.hpp"
#include "fastoptim/plan.hpp"
#include "fastoptim/registry.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTOPTIM_ISA_NS
#error "compile with -DFASTOPTIM_ISA_NS=<isa>"
#endif

namespace fastoptim {
namespace FASTOPTIM_ISA_NS {

namespace {

constexpr int64_t kAlign = 16;  // elements per 64-byte line in float32

// The inner loop: one SIMD sweep of the kernel over n elements.
template <class K, class T, std::size_t N>
void sweep(const K& k, T* __restrict p, const T* __restrict g, const std::array<T*, N>& st,
           int64_t n) {
  std::array<T*, N> s = st;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    std::array<T, N> v;
    for (std::size_t j = 0; j < N; ++j) v[j] = s[j][i];
    k(p[i], g[i], v);
    for (std::size_t j = 0; j < N; ++j) s[j][i] = v[j];
  }
}

template <class K, class T>
void sweep_tensor(const K& k, const Tensor& t, int64_t lo, int64_t hi) {
  constexpr std::size_t N = static_cast<std::size_t>(K::nstate);
  std::array<T*, N> st{};
  for (std::size_t j = 0; j < N; ++j) st[j] = static_cast<T*>(t.state[j]) + lo;
  sweep(k, static_cast<T*>(t.param) + lo, static_cast<const T*>(t.grad) + lo, st, hi - lo);
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

// Split [0, total) into `threads` contiguous ranges (boundaries on kAlign) and run them.
template <class F> void parallel_ranges(int64_t total, int threads, const F& f) {
  if (threads <= 1) {
    f(int64_t{0}, total);
    return;
  }
  auto bound = [total](int t, int nt) {
    if (t >= nt) return total;
    const int64_t b = total / nt * t / kAlign * kAlign;
    return std::min(b, total);
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    f(bound(t, nt), bound(t + 1, nt));
  }
#else
  f(bound(0, 1), total);
#endif
}

template <class Opt, unsigned V>
void run_variant(const Plan& plan, const typename Opt::Coeffs& c, int threads) {
  const Kernel<Opt, float, V> kf{c};
  const Kernel<Opt, double, V> kd{c};
  parallel_ranges(plan.total(), threads, [&](int64_t lo, int64_t hi) {
    for_range(plan, lo, hi, [&](const Tensor& t, int64_t a, int64_t b) {
      if (t.dtype == DType::f32)
        sweep_tensor<Kernel<Opt, float, V>, float>(kf, t, a, b);
      else
        sweep_tensor<Kernel<Opt, double, V>, double>(kd, t, a, b);
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

void stream(float* const* arrays, int nread, int nwrite, int64_t n, int threads) {
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t base = lo; base < hi; base += 4096) {
      const int64_t end = std::min(hi, base + 4096);
      // Sum the read arrays, then write the mean to each written array (bounded values).
      const float scale = 1.0f / static_cast<float>(nread);
      float* __restrict a0 = arrays[0];
      float buf[4096];
#pragma omp simd
      for (int64_t i = base; i < end; ++i) buf[i - base] = a0[i];
      for (int j = 1; j < nread; ++j) {
        const float* __restrict aj = arrays[j];
#pragma omp simd
        for (int64_t i = base; i < end; ++i) buf[i - base] += aj[i];
      }
      for (int j = 0; j < nwrite; ++j) {
        float* __restrict aj = arrays[j];
#pragma omp simd
        for (int64_t i = base; i < end; ++i) aj[i] = buf[i - base] * scale;
      }
    }
  });
}

}  // namespace FASTOPTIM_ISA_NS
}  // namespace fastoptim
