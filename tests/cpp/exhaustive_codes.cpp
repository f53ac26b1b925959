// Exhaustive check of the nearest codes (quantize.hpp), not part of the pytest run (about 40 s
// per build): every float32 x with |x| <= 1 + 2^-23 (both signs, zeros, denormals), every map
// (signed8, unsigned8, and the 4-bit ones' QTables): q_codes (the vector path of the ISA it is
// compiled for, plus its scalar tail) and q_code against the nearest-value rule computed
// independently (the number of float32 midpoints below x, a tie taking the even code); with
// the AVX-512 flags, on a CPU with AVX-512 VBMI, the gather-free search too (q_codes_search,
// for the maps whose tables are searchable: both 8-bit maps); and the 4-bit q4_codes (both
// Divide variants; with the AVX-512 flags the one-compare search, both maps must be searchable)
// and q4_code over the Q4Tables.  Exit status 1 on any difference.  From the repository root, for each ISA's flags (CMakeLists.txt):
//   FLAGS="-O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -std=c++17 -Icpp/include"
//   g++ $FLAGS -c cpp/src/quantize.cpp -o /tmp/quantize.o
//   g++ $FLAGS [-mavx2 -mfma -mf16c | -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma
//       -mf16c -mprefer-vector-width=512] tests/cpp/exhaustive_codes.cpp /tmp/quantize.o
//       -o /tmp/exhaustive_codes && /tmp/exhaustive_codes
#include "fastoptim/quantize.hpp"
#include <cstdio>
#include <vector>
using namespace fastoptim;
int main() {
  const int64_t CH = 1 << 16;
  std::vector<float> x(CH); std::vector<uint8_t> got(CH), got64(CH);
#ifdef FASTOPTIM_Q_SEARCH64
  const bool vbmi = __builtin_cpu_supports("avx512vbmi");
#else
  const bool vbmi = false;
#endif
  long long total_bad = 0;
  for (QMap m : {QMap::signed8, QMap::unsigned8, QMap::signed4, QMap::unsigned4}) {
    const QTables& q = qtables(m);
#ifdef MUTATE  // (check the check: one bucket word's threshold moved by one float)
    if (m == QMap::signed8) const_cast<QTables&>(q).bucket[0x3F00] += 1;
#endif
#ifdef MUTATE_SEARCH  // (and the search's: one threshold of the unsigned map moved by one float)
    if (m == QMap::unsigned8) const_cast<QTables&>(q).thr_bytes[0][200] += 1;
#endif
    const bool search = vbmi && q.searchable;
    if (m == QMap::signed8 || m == QMap::unsigned8)
      if (vbmi && !search) { printf("map %d: not searchable\n", (int)m); ++total_bad; }
    const int nc = q.ncodes;
    std::vector<float> mid(nc - 1);
    for (int c = 0; c + 1 < nc; ++c) mid[c] = (q.value[c] + q.value[c + 1]) * 0.5f;
    long long bad = 0, n_checked = 0;
    for (int sign = 0; sign < 2; ++sign) {
      int k = 0;  // number of midpoints < x (x ascending for sign 0, descending for sign 1)
      if (sign) { k = nc - 1; }
      for (uint64_t s = 0; s <= 0x3F800001ull; s += CH) {
        const int64_t n = std::min<int64_t>(CH, 0x3F800002ll - (int64_t)s);
        for (int64_t i = 0; i < n; ++i) x[i] = float_of((uint32_t)(s + i) | (uint32_t)sign << 31);
        q_codes(x.data(), n, 1.0f, q, got.data());
#ifdef FASTOPTIM_Q_SEARCH64
        if (search) q_codes_search(x.data(), n, 1.0f, q, got64.data());
#endif
        for (int64_t i = 0; i < n; ++i) {
          const float xi = x[i];
          if (!sign) { while (k < nc - 1 && mid[k] < xi) ++k; }
          else { while (k > 0 && !(mid[k - 1] < xi)) --k; }
          const int ref = k + ((k < nc - 1 && mid[k] == xi && k % 2 == 1) ? 1 : 0);
          const int g1 = got[i], g2 = q_code(xi, q);
          const int g3 = search ? got64[i] : ref;
          if (g1 != ref || g2 != ref || g3 != ref) { if (bad < 5) printf("map %d x=%a ref %d vec %d scalar %d search %d\n", (int)m, xi, ref, g1, g2, g3); ++bad; }
          ++n_checked;
        }
      }
    }
    printf("map %d (%d codes%s): %lld values, %lld wrong\n", (int)m, nc,
           search ? ", search too" : "", n_checked, bad);
    total_bad += bad;
  }
  // The 4-bit q4_codes (both Divide variants, s = 1: the AVX-512 one-compare search where the
  // tables are searchable, else the compares; plus the scalar tail) and q4_code against the
  // same independent rule over the Q4Tables' values.
  for (QMap m : {QMap::signed4, QMap::unsigned4}) {
    const Q4Tables& q = q4tables(m);
#ifdef MUTATE4  // (check the check: one threshold of the search moved by one float)
    if (m == QMap::signed4) const_cast<Q4Tables&>(q).thr_rank[5] += 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (!q.searchable) { printf("4-bit map %d: not searchable\n", (int)m); ++total_bad; }
#endif
    const int nc = 16;
    float mid[15];
    for (int c = 0; c + 1 < nc; ++c) mid[c] = (q.value[c] + q.value[c + 1]) * 0.5f;
    long long bad = 0, n_checked = 0;
    for (int sign = 0; sign < 2; ++sign) {
      int k = sign ? nc - 1 : 0;
      for (uint64_t s = 0; s <= 0x3F800001ull; s += CH) {
        const int64_t n = std::min<int64_t>(CH, 0x3F800002ll - (int64_t)s);
        for (int64_t i = 0; i < n; ++i) x[i] = float_of((uint32_t)(s + i) | (uint32_t)sign << 31);
        q4_codes<false>(x.data(), n, 1.0f, q, got.data());
        q4_codes<true>(x.data(), n, 1.0f, q, got64.data());
        for (int64_t i = 0; i < n; ++i) {
          const float xi = x[i];
          if (!sign) { while (k < nc - 1 && mid[k] < xi) ++k; }
          else { while (k > 0 && !(mid[k - 1] < xi)) --k; }
          const int ref = k + ((k < nc - 1 && mid[k] == xi && k % 2 == 1) ? 1 : 0);
          const int g1 = got[i], g2 = (int)q4_code(xi, q.thr), g3 = got64[i];
          if (g1 != ref || g2 != ref || g3 != ref) { if (bad < 5) printf("4-bit map %d x=%a ref %d mul %d scalar %d div %d\n", (int)m, xi, ref, g1, g2, g3); ++bad; }
          ++n_checked;
        }
      }
    }
    printf("4-bit map %d (q4_codes%s): %lld values, %lld wrong\n", (int)m,
           q.searchable ? ", searchable" : "", n_checked, bad);
    total_bad += bad;
  }
  return total_bad != 0;
}
