// Exhaustive check of convert.hpp's float16 conversions, not part of the pytest run (a minute or
// so per build): every one of the 2^32 float32 patterns rounded to nearest (f16_round_nearest,
// one element at a time and in a loop the compiler vectorizes for the ISA's flags) against the
// IEEE conversion (F16C's vcvtps2ph where the CPU has it, the compiler's conversion to
// _Float16 otherwise), a NaN being 0x7E00 with its sign; every pattern rounded stochastically
// (f16_round_stochastic) with pseudo-random bits and with the extreme ones against a definition written here in
// double arithmetic from the documented contract; and the 65,536 float16 patterns loaded
// (f16_load) against the compiler's _Float16 -> float (a NaN quieted, sign and payload kept).
// Exit status 1 on any difference.  From the repository root, per ISA's flags:
//   g++ -O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -std=c++17 -Icpp/include
//       [-mavx2 -mfma -mf16c | -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mf16c
//       -mprefer-vector-width=512] tests/cpp/exhaustive_f16.cpp -o /tmp/exhaustive_f16
//       && /tmp/exhaustive_f16
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <cpuid.h>
#include <immintrin.h>

#include "fastoptim/convert.hpp"
using namespace fastoptim;

static uint16_t f16_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// IEEE float -> float16 to nearest even: F16C's instruction where the CPU has it (whatever the
// flags of the build: the scalar build's own conversion is libgcc's soft-float, ~10x slower),
// the compiler's conversion otherwise.
__attribute__((target("f16c"))) static uint16_t hw_f16(float x) {
  return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static bool cpu_f16c() {  // (CPUID: Clang < 18 refuses __builtin_cpu_supports("f16c"))
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & (1u << 29)) != 0;
}
static const bool have_f16c = cpu_f16c();
static uint16_t ieee_f16(float x) {
  return have_f16c ? hw_f16(x) : f16_bits(static_cast<_Float16>(x));
}

// Round to nearest, ties to even: the IEEE conversion; NaN as fastoptim stores it.
static uint16_t want_nearest(float x) {
  const uint32_t b = bits_of(x);
  if (std::isnan(x)) return static_cast<uint16_t>(((b >> 16) & 0x8000u) | 0x7E00u);
  return ieee_f16(x);
}

// Stochastic rounding as documented: NaN, Inf and |x| >= 65520 (where nearest overflows) as to
// nearest; otherwise, with g the float16 spacing at |x| (2^-24 below 2^-14) and lo the float16
// value at or below |x|, the result is lo + g (at most 65504) when the random fraction drawn
// from `r` reaches 1 - (|x| - lo) / g: for |x| >= 2^-24 the low k bits of r, k = log2(g / u)
// where u is float32's spacing at |x| (the dropped bits: every float32 value is a multiple of
// u, so (|x| - lo) / u is an integer below 2^k); below 2^-24, up when r's top 24 bits, read as
// an integer, are below |x| * 2^48 (the probability |x| / 2^-24 rounded up to a multiple of
// 2^-24).  The sign is kept.
static uint16_t want_stochastic(float x, uint32_t r) {
  const double a = std::fabs(static_cast<double>(x));
  if (std::isnan(x) || a >= 65520.0) return want_nearest(x);
  const bool neg = std::signbit(x);
  double y;
  if (a < 0x1p-24) {
    y = static_cast<double>(r >> 8) < a * 0x1p48 ? 0x1p-24 : 0.0;
  } else {
    int ex;
    std::frexp(a, &ex);  // a in [2^(ex-1), 2^ex)
    const bool normal = ex - 1 >= -14;
    const double g = normal ? std::ldexp(1.0, ex - 11) : 0x1p-24;  // float16 spacing
    const double u = std::ldexp(1.0, ex - 24);  // float32 spacing (a >= 2^-24: normal)
    const int k = normal ? 13 : -ex;            // log2(g / u): the dropped bits, 13..23
    const double lo = std::floor(a / g) * g;
    const double dropped = (a - lo) / u;  // an integer in [0, 2^k)
    const double draw = static_cast<double>(r & ((1u << k) - 1u));
    y = dropped + draw >= std::ldexp(1.0, k) ? lo + g : lo;
    if (y > 65504.0) y = 65504.0;
  }
  const uint16_t h = ieee_f16(static_cast<float>(y));  // exact
  return static_cast<uint16_t>(h | (neg ? 0x8000u : 0u));
}

__attribute__((noinline)) void loop_nearest(const float* __restrict x, uint16_t* __restrict h,
                                            int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = f16_round_nearest(x[i]);
}
__attribute__((noinline)) void loop_stochastic(const float* __restrict x, const uint32_t* __restrict r,
                                               uint16_t* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = f16_round_stochastic(x[i], r[i]);
}

int main() {
  long long bad = 0;
  const auto report = [&bad](const char* what, uint32_t xb, uint32_t r, unsigned got,
                             unsigned want) {
    if (bad++ < 12)
      std::printf("%s: x=0x%08x r=0x%08x got 0x%04x want 0x%04x\n", what, xb, r, got, want);
  };
  // loads: every float16 pattern
  for (uint32_t b = 0; b < 65536; ++b) {
    _Float16 h;
    const uint16_t hb = static_cast<uint16_t>(b);
    std::memcpy(&h, &hb, 2);
    const float want = static_cast<float>(h);
    const bool nan = (b & 0x7FFFu) > 0x7C00u;
    // a NaN: the quiet NaN with the float16's sign and payload
    const uint32_t want_b =
        nan ? ((b & 0x8000u) << 16) | 0x7FC00000u | ((b & 0x3FFu) << 13) : bits_of(want);
    if (bits_of(f16_load(hb)) != want_b) report("load", b, 0, bits_of(f16_load(hb)) >> 16, want_b >> 16);
  }
  const int64_t CH = 1 << 16;
  std::vector<float> x(CH);
  std::vector<uint32_t> r(CH);
  std::vector<uint16_t> h(CH);
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  for (uint64_t base = 0; base < (1ull << 32); base += CH) {
    for (int64_t i = 0; i < CH; ++i) x[i] = float_of(static_cast<uint32_t>(base + i));
    loop_nearest(x.data(), h.data(), CH);
    for (int64_t i = 0; i < CH; ++i) {
      const uint16_t want = want_nearest(x[i]);
      if (h[i] != want || f16_round_nearest(x[i]) != want) report("nearest", bits_of(x[i]), 0, h[i], want);
    }
    // stochastic: a pseudo-random draw per element, then the extreme draws (0 and all ones)
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t i = 0; i < CH; ++i) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        r[i] = pass == 0 ? static_cast<uint32_t>(seed >> 32) : (i & 1 ? 0xFFFFFFFFu : 0u);
      }
      loop_stochastic(x.data(), r.data(), h.data(), CH);
      for (int64_t i = 0; i < CH; ++i) {
        const uint16_t want = want_stochastic(x[i], r[i]);
        if (h[i] != want) report("stochastic", bits_of(x[i]), r[i], h[i], want);
      }
    }
  }
  std::printf("float16: 65536 loads, 2^32 float32 patterns to nearest and 2 x 2^32 stochastic: "
              "%lld differ\n", bad);
  return bad ? 1 : 0;
}
