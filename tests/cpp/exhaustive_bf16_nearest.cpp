// Exhaustive check of rounding float32 to the nearest bfloat16 (convert.hpp's
// bf16_nearest_bits, bf16_round_nearest, bf16_round_nearest_f32), not part of the pytest run
// (a few seconds per build): every one of the 2^32 float32 patterns (zeros, denormals, Inf,
// every NaN payload), each function called one element at a time and in a loop over arrays (the
// vector code the compiler makes of it for the ISA's flags), against the two definitions it
// replaced (convert.hpp's uint16_t one, and dispatch.cpp's float one that Muon's Newton-Schulz
// passes used).  Exit status 1 on any difference.  From the repository root, per ISA's flags:
//   g++ -O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -std=c++17 -Icpp/include
//       [-mavx2 -mfma -mf16c | -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -mf16c
//       -mprefer-vector-width=512] tests/cpp/exhaustive_bf16_nearest.cpp
//       -o /tmp/exhaustive_bf16 && /tmp/exhaustive_bf16
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "fastoptim/convert.hpp"
using namespace fastoptim;

static uint16_t old_round_nearest(float x) {  // convert.hpp's, before
  const uint32_t b = bits_of(x);
  const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(nan ? (b >> 16) | 0x40u : r);
}
static float old_nearest_f32(float v) {  // dispatch.cpp's bf16_nearest, before
  uint32_t b;
  std::memcpy(&b, &v, 4);
  const uint32_t nan = (b & 0xFFFF0000u) | 0x00400000u;
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  b = (b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

__attribute__((noinline)) void loop16(const float* __restrict x, uint16_t* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = bf16_round_nearest(x[i]);
}
__attribute__((noinline)) void loop32(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_round_nearest_f32(x[i]);
}

int main() {
  const int64_t CH = 1 << 16;
  std::vector<float> x(CH), y(CH);
  std::vector<uint16_t> h(CH);
  long long bad = 0;
  for (uint64_t base = 0; base < (1ull << 32); base += CH) {
    for (int64_t i = 0; i < CH; ++i) x[i] = float_of(static_cast<uint32_t>(base + i));
    loop16(x.data(), h.data(), CH);
    loop32(x.data(), y.data(), CH);
    for (int64_t i = 0; i < CH; ++i) {
      const uint16_t want = old_round_nearest(x[i]);
      const uint32_t want32 = bits_of(old_nearest_f32(x[i]));
      const bool ok = bf16_round_nearest(x[i]) == want && h[i] == want &&
                      bits_of(bf16_round_nearest_f32(x[i])) == want32 &&
                      bits_of(y[i]) == want32 && want32 == static_cast<uint32_t>(want) << 16 &&
                      bf16_nearest_bits(x[i]) == want32;
      if (!ok && bad++ < 10)
        std::printf("0x%08x: got %04x/%04x/%08x, want %04x/%08x\n", bits_of(x[i]), h[i],
                    bf16_round_nearest(x[i]), bits_of(y[i]), want, want32);
    }
  }
  std::printf("2^32 float32 patterns: %lld differ\n", bad);
  return bad ? 1 : 0;
}
