// The floor of AdamW's arithmetic on one core: its update needs, per element, a square root
// and a division (denom = sqrt(v) * (1 / sqrt(bias_correction2)) + eps, then m / denom: the
// kernel in kernels.hpp), which no implementation matching torch can replace by
// multiplications, and both go through the core's one divider.  This loop does only those (plus
// the loads, two FMAs and the store) on 4,096 elements in L1, with 16-lane and 8-lane vectors,
// and prints ns per element: median and 10th-90th percentiles of 51 samples.  Not part of the
// test run (timings are never pass/fail).  From the repository root:
//   g++ -O3 -fno-math-errno -mavx512f -mfma bench/cpp/divider_floor.cpp -o /tmp/divider_floor
//   /tmp/divider_floor
// A step cannot run faster than this per core; at T threads on T cores, not faster than this / T
// (README, "Speed of 8-bit state").
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

template <class Body> static void report(const char* name, int n, Body body) {
  std::vector<double> t;
  for (int r = 0; r < 51; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < 200; ++k) body();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / 200 / n);
  }
  std::sort(t.begin(), t.end());
  std::printf("%s: %.3f ns/el (p10 %.3f, p90 %.3f)\n", name, t[25], t[5], t[45]);
}

int main() {
  const int n = 4096;
  std::vector<float> m(n), v(n), p(n, 1.0f);
  for (int i = 0; i < n; ++i) m[i] = 0.001f * i, v[i] = 0.5f + 0.0001f * i;
  report("sqrt + division, 16 lanes (zmm)", n, [&] {
    const __m512 c = _mm512_set1_ps(0.9987f), eps = _mm512_set1_ps(1e-8f);
    const __m512 lr = _mm512_set1_ps(1e-3f);
    for (int i = 0; i < n; i += 16) {
      const __m512 d = _mm512_fmadd_ps(_mm512_sqrt_ps(_mm512_loadu_ps(&v[i])), c, eps);
      _mm512_storeu_ps(&p[i], _mm512_fnmadd_ps(lr, _mm512_div_ps(_mm512_loadu_ps(&m[i]), d),
                                               _mm512_loadu_ps(&p[i])));
    }
  });
  report("sqrt + division, 8 lanes (ymm)", n, [&] {
    const __m256 c = _mm256_set1_ps(0.9987f), eps = _mm256_set1_ps(1e-8f);
    const __m256 lr = _mm256_set1_ps(1e-3f);
    for (int i = 0; i < n; i += 8) {
      const __m256 d = _mm256_fmadd_ps(_mm256_sqrt_ps(_mm256_loadu_ps(&v[i])), c, eps);
      _mm256_storeu_ps(&p[i], _mm256_fnmadd_ps(lr, _mm256_div_ps(_mm256_loadu_ps(&m[i]), d),
                                               _mm256_loadu_ps(&p[i])));
    }
  });
  return p[7] > 0 ? 0 : 1;  // (keeps the loops' results alive)
}
