// Block-wise quantized optimizer state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization"; the format of bitsandbytes): a state array is stored as one 8-bit code per
// element and one float32 scale (absmax) per block of kQBlock consecutive elements; element i
// of block b is map[code[i]] * absmax[b].  The maps are bitsandbytes' dynamic (tree) maps, signed
// for first moments and unsigned for second moments (create_dynamic_map, built in quantize.cpp;
// fastoptim.reference.create_dynamic_map is their NumPy twin).
//
// Quantizing one block (fastoptim.reference.quantize_blockwise):
//   absmax = max |v| over the block;
//   x = v * fl(1 / absmax)   (v / absmax where 1 / absmax overflows; 0 where absmax == 0);
//   code = the nearest map value to x, deciding between neighbouring codes c and c + 1 by their
//          float32 midpoint fl((map[c] + map[c + 1]) * 0.5); a value exactly on it takes the
//          even code (what the binary search of bitsandbytes' GPU quantizer returns).
//   A block holding a NaN or an infinity stores absmax = NaN and the code of 0 everywhere: every
//   element of it then loads as NaN (divergence stays visible, as with float32 state).
//
// The nearest code is found without a search: with b the float32 bit pattern of x, y = b when
// x >= 0 and ~b when x < 0 (b ^ (b >> 31), arithmetic shift: y grows with x within each sign,
// and the two signs' patterns of |x| < 2 fall on disjoint ranges), the top 15 bits of y
// (sign folded in, exponent, 7 mantissa bits) index a bucket holding at most one decision
// threshold, and the bucket's one word gives the code directly as (word + y) >> 16 (mod 2^32:
// the word's high half holds the code at the bucket's start minus the bucket's own index, so
// y's high half cancels; the carry out of the low half is the comparison with the threshold).
// One table load and four integer operations (vectorizes with gathers; the same bits on every
// ISA); no clamping, no sign fix-up.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastoptim/convert.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
// (GCC 12's intrinsics trip -Wmaybe-uninitialized inside the header, GCC bug 105593.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif

namespace fastoptim {

// The maps: 8-bit dynamic signed / unsigned (blocks of 256), and the 4-bit ones (blocks of
// kQBlock4: see the 4-bit section at the end).
enum class QMap : int { signed8 = 0, unsigned8 = 1, signed4 = 2, unsigned4 = 3 };
constexpr bool is_map4(QMap m) { return m == QMap::signed4 || m == QMap::unsigned4; }
inline constexpr int kQMaps = 4;
inline constexpr int64_t kQBlock = 256;  // elements per block (8-bit)
// The first block boundary at or after element i: a range [a, b) of a tensor owns the blocks
// starting in it, from block_start(a, block) (the drivers' chunks; a block is never split).
constexpr int64_t block_start(int64_t i, int64_t block) { return (i + block - 1) / block * block; }

// Buckets of x by the top 15 bits of y (see above): every x with |x| < 2 (denormals, zeros of
// both signs included) has its own bucket word, exact.
inline constexpr int32_t kQBuckets = 1 << 15;

struct QTables {
  int ncodes = 0;
  float value[256] = {};  // code -> value, ascending
  uint8_t zero = 0;       // the code of 0 (of a block that is all zeros, NaN or infinite)
  // Per bucket k (k = y >> 16), one word (one gather): ((code of the bucket's first y) - k) << 16,
  // plus, when a decision threshold lies inside the bucket, a low half such that adding y's low
  // 16 bits carries into the high half exactly when x lies beyond the threshold towards the next
  // code up: 0xFFFF - (the threshold's low 16 bits) for x >= 0; for x < 0 (y's low half is
  // 0xFFFF - |x|'s, and the code goes down as |x| grows) the code above the threshold with the
  // threshold's low 16 bits + 1.  Buckets of |x| >= 2 are never read (normalized values have
  // |x| <= 1 + 2^-23).
  uint32_t bucket[kQBuckets] = {};
  // value[] as four byte planes (plane j: byte j of every value's bit pattern, little-endian),
  // for dequantizing by byte permutes (AVX-512 VBMI vpermi2b) instead of loads.
  uint8_t value_bytes[4][256] = {};
  // The search without gathers (q_codes_vbmi64, AVX-512 VBMI; `searchable` where the map has the
  // dynamic maps' shape, checked when the tables are built).  rank(|x|), the number of decision
  // thresholds below |x| (x's code is pos_base + rank for x >= 0, max(pos_base - rank, 0) for
  // x < 0, as the bucket words give it), is at most one above a candidate computed from |x|
  // alone: the map's positive values lie evenly spaced within each decade (10^(d-1), 10^d], so
  // that, with f = (|x| / 10^d - 0.1) * n / 0.9 (n values in the decade), its thresholds lie
  // within 0.5 of integer values of f; the candidate is the region's first rank R plus
  // floor(f - 0.5), that is floor(|x| * region_a + region_c) for the region of |x| (0: below
  // the lowest decade, a = c = 0; then one per decade; last: |x| > 1, a = 0, c = the largest
  // rank).  The region is the first one of |x|'s binade k = max(exponent - kQRegionExp, 0), plus
  // one where |x| > region_bound[k]: a float within 15 ulps of the power of ten inside the
  // binade (a quiet NaN if none), its low 4 bits holding that first region (one lookup for
  // both).  Then rank = candidate + (|x|'s bit pattern > thr[candidate]), thr[r] the threshold
  // between ranks r and r + 1 (Inf beyond the last), as four byte planes like value_bytes.
  bool searchable = false;
  int32_t pos_base = 0;                // the code of +0
  float region_bound[32] = {};
  float region_a[16] = {}, region_c[16] = {};
  uint8_t thr_bytes[4][256] = {};
};

// Binade k = 1 of the gather-free search holds |x| in [2^(kQRegionExp - 126), 2^(kQRegionExp -
// 125)): 2^-24 up (every threshold of the 8-bit maps is above 10^-7).
inline constexpr uint32_t kQRegionExp = 102;

// The tables of map m (built once, on first use; thread-safe).
const QTables& qtables(QMap m);

// The per-element and per-block functions below have internal linkage: every ISA's driver
// compiles its own copy (one shared inline copy could be the AVX-512 one).
namespace {

#if defined(__clang__)
#define FASTOPTIM_Q_VECTORIZE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FASTOPTIM_Q_VECTORIZE _Pragma("GCC ivdep")
#else
#define FASTOPTIM_Q_VECTORIZE
#endif

// The code of one normalized value x (finite, |x| < 2) with the map's bucket words (a
// loop-invariant copy of QTables::bucket: a code store could alias the struct).
inline uint8_t q_code(float x, const uint32_t* __restrict bucket) {
  const uint32_t b = bits_of(x);
  const uint32_t y = b ^ (0u - (b >> 31));
  return static_cast<uint8_t>((bucket[y >> 16] + y) >> 16);
}
inline uint8_t q_code(float x, const QTables& q) { return q_code(x, q.bucket); }

// max |v| of n values as a bit pattern: ordered like the magnitudes, NaN above Inf above the rest.
inline uint32_t absmax_bits(const float* __restrict v, int64_t n) {
  uint32_t m = 0;
  FASTOPTIM_Q_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = bits_of(v[i]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

// What one block's values are multiplied by before the code search, given absmax's bits (finite).
struct QScale {
  float absmax, inv;
  bool divide;  // 1 / absmax overflows (absmax < 2^-128): x = v / absmax
};
inline QScale q_scale(uint32_t mbits) {
  const float absmax = float_of(mbits);
  const float inv = mbits == 0 ? 0.0f : 1.0f / absmax;
  return {absmax, inv, bits_of(inv) == 0x7F800000u};
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// q_code of 16 normalized values (b: their float32 bit patterns), lane by lane: the same
// integers, the bucket words by one hardware gather.  (q_codes and quantize_block_stochastic.)
inline __m512i q_code16(__m512i b, const uint32_t* __restrict bucket) {
  const __m512i y = _mm512_xor_si512(b, _mm512_srai_epi32(b, 31));
  const __m512i w = _mm512_i32gather_epi32(_mm512_srli_epi32(y, 16), bucket, 4);
  return _mm512_srli_epi32(_mm512_add_epi32(w, y), 16);
}
#elif defined(__AVX2__)
// The same for 8 values (q_codes and quantize_block_stochastic in the avx2 build) ...
inline __m256i q_code8(__m256i b, const uint32_t* __restrict bucket) {
  const __m256i y = _mm256_xor_si256(b, _mm256_srai_epi32(b, 31));
  const __m256i w =
      _mm256_i32gather_epi32(reinterpret_cast<const int*>(bucket), _mm256_srli_epi32(y, 16), 4);
  return _mm256_srli_epi32(_mm256_add_epi32(w, y), 16);
}
// ... and 8 codes (0..255 in 32-bit lanes) stored as 8 bytes.
inline void store_codes8(__m256i code, uint8_t* __restrict dst) {
  const __m256i pack = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  const __m256i bytes = _mm256_shuffle_epi8(code, pack);  // 4 codes per 128-bit lane
  const uint64_t two = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 0)) |
                       static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(bytes, 4)))
                           << 32;
  std::memcpy(dst, &two, 8);
}
#endif

// The candidate rank of |x| (ax >= 0, finite, < 2) in the gather-free search (QTables): the
// same float32 operations as q_codes_vbmi64, lane by lane.
inline int32_t q_rank_candidate(float ax, const QTables& q) {
  const uint32_t e = bits_of(ax) >> 23;
  const uint32_t k = e > kQRegionExp ? e - kQRegionExp : 0u;
  const float bound = q.region_bound[k];
  const auto r = static_cast<int32_t>(bits_of(bound) & 15u) + (std::isgreater(ax, bound) ? 1 : 0);
  return static_cast<int32_t>(std::floor(std::fma(ax, q.region_a[r], q.region_c[r])));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__GNUC__)
#define FASTOPTIM_Q_SEARCH64 1
// (GCC 12's _mm512_undefined_* trip -Wuninitialized where these are inlined into a function of
// the same target, GCC bug 105593.)
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// The byte-plane lookups of AVX-512 VBMI (the 8-bit codes' decoding, dequantize_vbmi64, and
// their search, q_codes_vbmi64): a table of 256 32-bit entries held as four byte planes
// (planes[j][i]: byte j of entry i), looked up at 64 indexes at once.  The indexes go in this
// order: element 16 r + 4 L + d's at byte 16 L + 4 r + d, so that the unpacks rebuilding 32-bit
// entries from the planes' bytes (8 then 16 bits, within 128-bit lanes) give vector r the
// elements 16 r .. 16 r + 15 in order.  kQVbmiOrder permutes 64 indexes in element order into
// it.
alignas(64) inline constexpr uint8_t kQVbmiOrder[64] = {
    0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
    4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
    8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
    12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};

// out[r] = the entries at idx's indexes of elements 16 r .. 16 r + 15 (idx in kQVbmiOrder's
// order): per plane two vpermi2b (128 entries each, by the index's low 7 bits) and a blend on
// bit 7, then the unpacks.
__attribute__((target("avx512vbmi"))) inline __attribute__((always_inline)) void planes64(
    __m512i idx, const uint8_t (&planes)[4][256], __m512i (&out)[4]) {
  const __mmask64 top = _mm512_movepi8_mask(idx);
  __m512i b[4];
  for (int j = 0; j < 4; ++j) {
    const uint8_t* t = planes[j];
    b[j] = _mm512_mask_blend_epi8(
        top, _mm512_permutex2var_epi8(_mm512_loadu_si512(t), idx, _mm512_loadu_si512(t + 64)),
        _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), idx, _mm512_loadu_si512(t + 192)));
  }
  const __m512i w0 = _mm512_unpacklo_epi8(b[0], b[1]), w1 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w2 = _mm512_unpacklo_epi8(b[2], b[3]), w3 = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_unpacklo_epi16(w0, w2);
  out[1] = _mm512_unpackhi_epi16(w0, w2);
  out[2] = _mm512_unpacklo_epi16(w1, w3);
  out[3] = _mm512_unpackhi_epi16(w1, w3);
}

// The search's byte permutes: from_x / from_y put the low byte of dword 4 L + d of candidate
// vector r (element 16 r + 4 L + d) at byte 16 L + 4 r + d (kQVbmiOrder's order), from (c0, c1)
// and (c2, c3); pack_lo / pack_hi put element i's at byte i (the codes), from (r0, r1) and
// (r2, r3).
struct QSearchIdx {
  alignas(64) uint8_t from_x[64], from_y[64], pack_lo[64], pack_hi[64];
  constexpr QSearchIdx() : from_x(), from_y(), pack_lo(), pack_hi() {
    for (int L = 0; L < 4; ++L)
      for (int r = 0; r < 4; ++r)
        for (int d = 0; d < 4; ++d) {
          const int pos = 16 * L + 4 * r + d;
          const int src = 64 * (r % 2) + 4 * (4 * L + d);  // low byte of dword 4L + d
          (r < 2 ? from_x : from_y)[pos] = static_cast<uint8_t>(src);
          (r < 2 ? from_y : from_x)[pos] = 0;
        }
    for (int i = 0; i < 64; ++i) {  // element i: vector i / 16, dword i % 16
      const int src = 64 * ((i / 16) % 2) + 4 * (i % 16);
      pack_lo[i] = static_cast<uint8_t>(i < 32 ? src : 0);
      pack_hi[i] = static_cast<uint8_t>(i < 32 ? 0 : src);
    }
  }
};
inline constexpr QSearchIdx kQSearchIdx{};

// codes[0..64) = q_code(src[i] * inv) (vinv: inv broadcast) without gathers, for a map with
// q.searchable (see QTables): the candidate ranks of 16 values by one 32-entry and two
// 16-entry permutes and one fma, the 64 thresholds at the candidates by planes64, one compare,
// then the codes 64 at a time in bytes.  The same codes as q_code.
__attribute__((target("avx512vbmi"))) inline __attribute__((always_inline)) void q_codes_vbmi64(
    const float* __restrict src, __m512 vinv, const QTables& q, uint8_t* __restrict codes) {
  const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(kQRegionExp));
  __m512i a[4], c[4];
  __mmask16 neg[4];
  for (int r = 0; r < 4; ++r) {
    const __m512i b = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(src + 16 * r), vinv));
    neg[r] = _mm512_movepi32_mask(b);
    a[r] = _mm512_and_si512(b, mag);
    const __m512 ax = _mm512_castsi512_ps(a[r]);
    const __m512i k = _mm512_subs_epu16(_mm512_srli_epi32(a[r], 23), base);
    const __m512 bound = _mm512_permutex2var_ps(_mm512_loadu_ps(q.region_bound), k,
                                                _mm512_loadu_ps(q.region_bound + 16));
    __m512i reg = _mm512_and_si512(_mm512_castps_si512(bound), _mm512_set1_epi32(15));
    reg = _mm512_mask_add_epi32(reg, _mm512_cmp_ps_mask(ax, bound, _CMP_GT_OQ), reg, one);
    const __m512 f = _mm512_fmadd_ps(ax, _mm512_permutexvar_ps(reg, _mm512_loadu_ps(q.region_a)),
                                     _mm512_permutexvar_ps(reg, _mm512_loadu_ps(q.region_c)));
    c[r] = _mm512_cvt_roundps_epi32(f, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  const __m512i cb = _mm512_mask_blend_epi8(
      0xFF00FF00FF00FF00ull,
      _mm512_permutex2var_epi8(c[0], _mm512_load_si512(kQSearchIdx.from_x), c[1]),
      _mm512_permutex2var_epi8(c[2], _mm512_load_si512(kQSearchIdx.from_y), c[3]));
  __m512i thr[4];
  planes64(cb, q.thr_bytes, thr);
  for (int r = 0; r < 4; ++r)
    c[r] = _mm512_mask_add_epi32(c[r], _mm512_cmpgt_epu32_mask(a[r], thr[r]), c[r], one);
  const __m512i rank = _mm512_mask_blend_epi8(
      0xFFFFFFFF00000000ull,
      _mm512_permutex2var_epi8(c[0], _mm512_load_si512(kQSearchIdx.pack_lo), c[1]),
      _mm512_permutex2var_epi8(c[2], _mm512_load_si512(kQSearchIdx.pack_hi), c[3]));
  const __mmask64 negative = _mm512_kunpackd(
      _mm512_kunpackw(neg[3], neg[2]), _mm512_kunpackw(neg[1], neg[0]));
  const __m512i pb = _mm512_set1_epi8(static_cast<char>(q.pos_base));
  _mm512_storeu_si512(codes, _mm512_mask_blend_epi8(negative, _mm512_add_epi8(pb, rank),
                                                    _mm512_subs_epu8(pb, rank)));
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// codes[i] = q_code(v[i] * inv) for n values: with AVX-512 or AVX2, 16 or 8 at a time through a
// hardware gather (compilers emulate gathers with scalar loads under their generic tuning),
// computing exactly q_code's integers; a plain loop elsewhere and for the tail.
inline void q_codes(const float* __restrict v, int64_t n, float inv, const QTables& q,
                    uint8_t* __restrict codes) {
  const uint32_t* __restrict bucket = q.bucket;
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= n; i += 16) {
    const __m512i code =
        q_code16(_mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(v + i), vinv)), bucket);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code));
  }
#elif defined(__AVX2__)
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; i + 8 <= n; i += 8)
    store_codes8(
        q_code8(_mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(v + i), vinv)), bucket),
        codes + i);
#endif
  for (; i < n; ++i) codes[i] = q_code(v[i] * inv, bucket);
}

#ifdef FASTOPTIM_Q_SEARCH64
// q_codes by q_codes_vbmi64 (q.searchable, on a CPU with AVX-512 VBMI), 64 at a time; the
// tail by q_codes.
__attribute__((target("avx512vbmi"))) inline void q_codes_search(const float* __restrict v,
                                                                 int64_t n, float inv,
                                                                 const QTables& q,
                                                                 uint8_t* __restrict codes) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) q_codes_vbmi64(v + i, vinv, q, codes + i);
  if (i < n) q_codes(v + i, n - i, inv, q, codes + i);
}
#endif

// Quantize n <= kQBlock values whose absmax_bits are `mb` into codes; returns the block's absmax
// (NaN for a non-finite block).  `search`: the caller found AVX-512 VBMI (q_codes_search where
// the map is searchable and this build has it; the same codes).
inline float quantize_block(const float* __restrict v, int64_t n, uint32_t mb, const QTables& q,
                            uint8_t* __restrict codes, [[maybe_unused]] bool search = false) {
  if (mb >= 0x7F800000u) {
    for (int64_t i = 0; i < n; ++i) codes[i] = q.zero;
    return float_of(0x7FC00000u);
  }
  const QScale s = q_scale(mb);
  const uint32_t* __restrict bucket = q.bucket;
  if (s.divide) {
    const float absmax = s.absmax;
    FASTOPTIM_Q_VECTORIZE
    for (int64_t i = 0; i < n; ++i) codes[i] = q_code(v[i] / absmax, bucket);
  } else {
#ifdef FASTOPTIM_Q_SEARCH64
    if (search && q.searchable) {
      q_codes_search(v, n, s.inv, q, codes);
      return s.absmax;
    }
#endif
    q_codes(v, n, s.inv, q, codes);
  }
  return s.absmax;
}
inline float quantize_block(const float* __restrict v, int64_t n, const QTables& q,
                            uint8_t* __restrict codes) {
  return quantize_block(v, n, absmax_bits(v, n), q, codes);
}

// out[i] = value[codes[i]] * absmax (hardware gathers with AVX-512 / AVX2, as q_codes).
// Stochastic rounding of the codes (rounding="stochastic"): x, between the neighbouring map
// values a = value[c] <= x < b = value[c + 1], takes code c + 1 with probability (x - a) / (b - a)
// (so the dequantized value is x in expectation), decided by 24 of the element's 32 random
// bits r: up when float(r >> 8) * 2^-24 * (b - a) < x - a (float32 arithmetic, as
// fastoptim.reference.quantize_to_code_stochastic).  A value on a map value keeps its code;
// beyond the first or last value (no neighbour on that side) x takes that value's code.
inline uint8_t q_code_stochastic(float x, const QTables& q, uint32_t r) {
  const int32_t c = q_code(x, q.bucket);  // the nearest: c or c + 1 below
  const int32_t lo = q.value[c] <= x ? c : c - 1;                  // value[lo] <= x
  if (lo < 0) return 0;
  if (lo >= q.ncodes - 1) return static_cast<uint8_t>(q.ncodes - 1);
  const float a = q.value[lo], w = q.value[lo + 1] - a;
  const bool up = static_cast<float>(r >> 8) * 0x1p-24f * w < x - a;
  return static_cast<uint8_t>(lo + (up ? 1 : 0));
}

// quantize_block with stochastic rounding of the codes: element i draws random_bits(key,
// first + i).
inline float quantize_block_stochastic(const float* __restrict v, int64_t n, uint32_t mb,
                                       const QTables& q, uint8_t* __restrict codes, uint32_t key,
                                       uint32_t first) {
  if (mb >= 0x7F800000u) {
    for (int64_t i = 0; i < n; ++i) codes[i] = q.zero;
    return float_of(0x7FC00000u);
  }
  const QScale s = q_scale(mb);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  // 16 at a time: q_code's integers and random_bits' hash in vector registers, the map values
  // by gathers; the same float32 operations as q_code_stochastic, lane by lane.
  if (!s.divide) {
    const uint32_t* __restrict bucket = q.bucket;
    const float* __restrict value = q.value;
    const __m512 vinv = _mm512_set1_ps(s.inv), ulp24 = _mm512_set1_ps(0x1p-24f);
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512(),
                  top = _mm512_set1_epi32(q.ncodes - 1),
                  vkey = _mm512_set1_epi32(static_cast<int>(key)),
                  lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(v + i), vinv);
      const __m512i c = q_code16(_mm512_castps_si512(x), bucket);
      // lo: value[lo] <= x (c or c - 1); outside [0, ncodes - 1) the end codes, no draw.  The
      // neighbour on x's side of value[c] (index clamped into the map) is the other end.
      const __m512 vc = _mm512_i32gather_ps(c, value, 4);
      const __mmask16 on = _mm512_cmp_ps_mask(vc, x, _CMP_LE_OQ);
      const __m512i lo = _mm512_mask_sub_epi32(c, static_cast<__mmask16>(~on), c, one);
      const __m512i side = _mm512_mask_add_epi32(_mm512_sub_epi32(c, one), on, c, one);
      const __m512 other = _mm512_i32gather_ps(
          _mm512_min_epi32(_mm512_max_epi32(side, zero), top), value, 4);
      const __m512 a = _mm512_mask_blend_ps(on, other, vc);  // value[lo]
      const __m512 gap = _mm512_sub_ps(_mm512_mask_blend_ps(on, vc, other), a);
      const __m512i l = _mm512_min_epi32(_mm512_max_epi32(lo, zero), _mm512_sub_epi32(top, one));
      // r = random_bits(key, first + i + lane)
      const auto at = static_cast<int>(first + static_cast<uint32_t>(i));
      __m512i r = _mm512_add_epi32(_mm512_set1_epi32(at), lanes);
      r = _mm512_mullo_epi32(r, _mm512_set1_epi32(static_cast<int>(0x9E3779B1u)));
      typedef uint32_t V16 __attribute__((vector_size(64)));
      r = reinterpret_cast<__m512i>(random_mix(reinterpret_cast<V16>(_mm512_xor_si512(r, vkey))));
      r = _mm512_xor_si512(r, _mm512_srli_epi32(r, 16));
      const __m512 u =
          _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 8)), ulp24), gap);
      const __mmask16 up = _mm512_cmp_ps_mask(u, _mm512_sub_ps(x, a), _CMP_LT_OQ);
      __m512i code = _mm512_mask_add_epi32(l, up, l, one);
      code = _mm512_mask_mov_epi32(code, _mm512_cmplt_epi32_mask(lo, zero), zero);
      code = _mm512_mask_mov_epi32(code, _mm512_cmpge_epi32_mask(lo, top), top);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(code));
    }
  }
#elif defined(__AVX2__)
  // 8 at a time: the AVX-512 loop's operations with AVX2's compares (all-ones lanes) and blends.
  if (!s.divide) {
    const uint32_t* __restrict bucket = q.bucket;
    const float* __restrict value = q.value;
    const __m256 vinv = _mm256_set1_ps(s.inv), ulp24 = _mm256_set1_ps(0x1p-24f);
    const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256(),
                  top = _mm256_set1_epi32(q.ncodes - 1), below_top = _mm256_set1_epi32(q.ncodes - 2),
                  vkey = _mm256_set1_epi32(static_cast<int>(key)),
                  lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(v + i), vinv);
      const __m256i c = q_code8(_mm256_castps_si256(x), bucket);
      // on: value[c] <= x (-1 in the lane); lo = c - 1 - on; the other neighbour c - 1 - 2 on
      const __m256 vc = _mm256_i32gather_ps(value, c, 4);
      const __m256 onf = _mm256_cmp_ps(vc, x, _CMP_LE_OQ);
      const __m256i on = _mm256_castps_si256(onf);
      const __m256i lo = _mm256_sub_epi32(_mm256_sub_epi32(c, one), on);
      const __m256i side = _mm256_sub_epi32(lo, on);
      const __m256 other = _mm256_i32gather_ps(
          value, _mm256_min_epi32(_mm256_max_epi32(side, zero), top), 4);
      const __m256 a = _mm256_blendv_ps(other, vc, onf);  // value[lo]
      const __m256 gap = _mm256_sub_ps(_mm256_blendv_ps(vc, other, onf), a);
      const __m256i l = _mm256_min_epi32(_mm256_max_epi32(lo, zero), below_top);
      // r = random_bits(key, first + i + lane)
      const auto at = static_cast<int>(first + static_cast<uint32_t>(i));
      __m256i r = _mm256_add_epi32(_mm256_set1_epi32(at), lanes);
      r = _mm256_mullo_epi32(r, _mm256_set1_epi32(static_cast<int>(0x9E3779B1u)));
      typedef uint32_t V8 __attribute__((vector_size(32)));
      r = reinterpret_cast<__m256i>(random_mix(reinterpret_cast<V8>(_mm256_xor_si256(r, vkey))));
      r = _mm256_xor_si256(r, _mm256_srli_epi32(r, 16));
      const __m256 u =
          _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 8)), ulp24), gap);
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(u, _mm256_sub_ps(x, a), _CMP_LT_OQ));
      __m256i code = _mm256_sub_epi32(l, up);  // (up: -1)
      code = _mm256_blendv_epi8(code, zero, _mm256_cmpgt_epi32(zero, lo));       // lo < 0
      code = _mm256_blendv_epi8(code, top, _mm256_cmpgt_epi32(lo, below_top));  // lo >= top
      store_codes8(code, codes + i);
    }
  }
#endif
  for (; i < n; ++i) {
    const float x = s.divide ? v[i] / s.absmax : v[i] * s.inv;
    codes[i] = q_code_stochastic(x, q, random_bits(key, first + static_cast<uint32_t>(i)));
  }
  return s.absmax;
}

inline void dequantize_block(const uint8_t* __restrict codes, int64_t n, float absmax,
                             const QTables& q, float* __restrict out) {
  const float* __restrict value = q.value;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(absmax);
  for (; i + 16 <= n; i += 16) {
    const __m512i c =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(c, value, 4), s));
  }
#elif defined(__AVX2__)
  const __m256 s = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) {
    const __m256i c =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(value, c, 4), s));
  }
#endif
  for (; i < n; ++i) out[i] = value[codes[i]] * absmax;
}

}  // namespace

// ------------------------------------------------------------------ 4-bit state
// 4-bit block-wise state (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"; the
// format of torchao's 4-bit AdamW): blocks of kQBlock4 = 128 elements, a float32 absmax per
// block, two codes per byte in torchao's order: element 2i in the HIGH nibble, element 2i + 1
// in the low one (a tensor of odd size leaves the low nibble of its last byte 0).  Maps
// (fastoptim.reference.create_map4): signed4, create_dynamic_map(signed=True,
// max_exponent_bits=3, total_bits=4) (16 values, 0 included), for first moments; unsigned4,
// linspace(0, 1, 17)[1:] = k/16 for k = 1..16 (0 excluded), for second moments.  The nearest
// code follows the 8-bit rule (float32 midpoints, ties to the even code; non-finite block:
// NaN absmax, the code of 0): with 16 values it is the number of the 15 decision thresholds
// below x, counted with plain compares (vectorizes without gathers; the same on every ISA); with
// AVX-512, where build4 proved the tables (Q4Tables::searchable), a candidate rank from |x|'s
// binade and one fma, then one compare (the same codes: tests/cpp/exhaustive_codes.cpp).
inline constexpr int64_t kQBlock4 = 128;

struct Q4Tables {
  float value[16] = {};  // code -> value, ascending
  // thr[j] decides between codes j and j + 1: x > thr[j] counts (the float32 midpoint, or the
  // float just below it where code j + 1 is even, so that a tie takes the even code).
  float thr[15] = {};
  uint8_t zero = 0;  // the code of 0
  // The search with one compare (q4_codes16, AVX-512; `searchable` where build4 proved it for
  // the map, as fill_search does for QTables).  As with the 8-bit maps, rank(|x|), the number
  // of decision thresholds below |x| (thr_rank[r]: the bit pattern of the one between ranks r
  // and r + 1, as QTables' thresholds: the same for both signs; +Inf beyond the last), gives
  // x's code: code_of[rank] for x >= 0, code_of[16 + rank] for x < 0 (pos_base + rank and
  // max(pos_base - rank, 0), pos_base the code of +0).  The candidate rank of |x| is
  // floor(fma(|x|, bin_a[k], bin_c[k])) for |x|'s binade k = max(exponent - kQ4BinExp, 0), and
  // rank = candidate + (|x|'s bits > thr_rank[candidate]): every table has 16 entries, one
  // zmm register each, so each lookup is one permute.  build4 checks that the candidate lies
  // in [0, 15] and within one below the rank on both sides of every threshold and every binade
  // boundary, and does not decrease across the boundaries (within a binade it cannot: bin_a
  // >= 0), hence for every |x| < 2.
  bool searchable = false;
  float bin_a[16] = {}, bin_c[16] = {};
  uint32_t thr_rank[16] = {};
  int32_t code_of[32] = {};
};

// Binade k of the 4-bit search: |x| in [2^(kQ4BinExp + k - 127), 2^(kQ4BinExp + k - 126)) for
// k = 1..15 (k = 15: [1, 2)); k = 0 below 2^-14 (every threshold of the 4-bit maps is above).
inline constexpr uint32_t kQ4BinExp = 112;

// The tables of 4-bit map m (QMap::signed4 or QMap::unsigned4; built once, thread-safe).
const Q4Tables& q4tables(QMap m);

namespace {

// The nearest code of a finite normalized value x.
inline uint32_t q4_code(float x, const float* __restrict thr) {
  uint32_t c = 0;
  for (int j = 0; j < 15; ++j) c += x > thr[j] ? 1u : 0u;
  return c;
}

// The candidate rank of |x| (ax >= 0, finite, < 2) in the 4-bit search (Q4Tables::searchable):
// the same float32 operations as q4_codes' AVX-512 path, lane by lane.
inline int32_t q4_rank_candidate(float ax, const Q4Tables& q) {
  const uint32_t e = bits_of(ax) >> 23;
  const uint32_t k = e > kQ4BinExp ? e - kQ4BinExp : 0u;
  return static_cast<int32_t>(std::floor(std::fma(ax, q.bin_a[k], q.bin_c[k])));
}

// Stochastic rounding of x (as q_code_stochastic): lo = the last code whose value is <= x;
// up to lo + 1 with probability (x - value[lo]) / (value[lo + 1] - value[lo]).
inline uint32_t q4_code_stochastic(float x, const Q4Tables& q, uint32_t r) {
  int32_t lo = -1;
  for (int k = 0; k < 16; ++k) lo += q.value[k] <= x ? 1 : 0;
  if (lo < 0) return 0;
  if (lo >= 15) return 15;
  const float a = q.value[lo], w = q.value[lo + 1] - a;
  const bool up = static_cast<float>(r >> 8) * 0x1p-24f * w < x - a;
  return static_cast<uint32_t>(lo + (up ? 1 : 0));
}

// n <= kQBlock4 codes (one per byte) into (n + 1) / 2 bytes, torchao's nibble order.
inline void q4_pack(const uint8_t* __restrict c, int64_t n, uint8_t* __restrict out) {
  FASTOPTIM_Q_VECTORIZE
  for (int64_t i = 0; i < n / 2; ++i)
    out[i] = static_cast<uint8_t>(c[2 * i] << 4 | c[2 * i + 1]);
  if (n % 2 != 0) out[n / 2] = static_cast<uint8_t>(c[n - 1] << 4);
}

// codes[i] = q4_code(v[i] * inv) (Divide: v[i] / absmax) for n values, one code per byte.
template <bool Divide>
inline void q4_codes(const float* __restrict v, int64_t n, float s, const Q4Tables& q,
                     uint8_t* __restrict codes) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
#if defined(__AVX512BW__)
  if (q.searchable) {  // the candidate rank, one compare (Q4Tables)
    const __m512 ta = _mm512_loadu_ps(q.bin_a), tc = _mm512_loadu_ps(q.bin_c);
    const __m512i tt = _mm512_loadu_si512(q.thr_rank);
    const __m512i pcode = _mm512_loadu_si512(q.code_of), ncode = _mm512_loadu_si512(q.code_of + 16);
    const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    const __m512i base = _mm512_set1_epi32(static_cast<int>(kQ4BinExp));
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
      const __m512 x = Divide ? _mm512_div_ps(_mm512_loadu_ps(v + i), vs)
                              : _mm512_mul_ps(_mm512_loadu_ps(v + i), vs);
      const __m512i b = _mm512_castps_si512(x);
      const __m512i a = _mm512_and_si512(b, mag);
      const __m512i k = _mm512_subs_epu16(_mm512_srli_epi32(a, 23), base);  // 0..15
      const __m512 f = _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_permutexvar_ps(k, ta),
                                       _mm512_permutexvar_ps(k, tc));
      __m512i r = _mm512_cvt_roundps_epi32(f, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      r = _mm512_mask_add_epi32(r, _mm512_cmpgt_epu32_mask(a, _mm512_permutexvar_epi32(r, tt)),
                                r, one);
      // rank | 16 where x < 0 (the sign bit shifted to bit 4): the code by one 32-entry permute
      const __m512i idx = _mm512_ternarylogic_epi32(r, _mm512_srli_epi32(b, 27), sixteen, 0xF8);
      const __m512i c = _mm512_permutex2var_epi32(pcode, idx, ncode);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
    }
  }
#endif
  for (; i + 16 <= n; i += 16) {
    const __m512 x = Divide ? _mm512_div_ps(_mm512_loadu_ps(v + i), vs)
                            : _mm512_mul_ps(_mm512_loadu_ps(v + i), vs);
    __m512i c = _mm512_setzero_si512();
    for (int j = 0; j < 15; ++j)
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(x, _mm512_set1_ps(q.thr[j]), _CMP_GT_OQ),
                                c, _mm512_set1_epi32(1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = Divide ? _mm256_div_ps(_mm256_loadu_ps(v + i), vs)
                            : _mm256_mul_ps(_mm256_loadu_ps(v + i), vs);
    __m256i c = _mm256_setzero_si256();  // minus the number of thresholds below x
    for (int j = 0; j < 15; ++j)
      c = _mm256_add_epi32(
          c, _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(q.thr[j]), _CMP_GT_OQ)));
    const __m256i code = _mm256_sub_epi32(_mm256_setzero_si256(), c);  // 0..15
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code),
                                       _mm256_extracti128_si256(code, 1));  // 8 x 16 bits
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w, w));
  }
#endif
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(q4_code(Divide ? v[i] / s : v[i] * s, q.thr));
}

// Quantize n <= kQBlock4 values whose absmax_bits are `mb` into (n + 1) / 2 bytes of packed
// codes; returns the block's absmax (NaN for a non-finite block).
inline float quantize_block4(const float* __restrict v, int64_t n, uint32_t mb, const Q4Tables& q,
                             uint8_t* __restrict packed) {
  alignas(64) uint8_t c[kQBlock4];
  if (mb >= 0x7F800000u) {
    for (int64_t i = 0; i < n; ++i) c[i] = q.zero;
    q4_pack(c, n, packed);
    return float_of(0x7FC00000u);
  }
  const QScale s = q_scale(mb);
  if (s.divide)
    q4_codes<true>(v, n, s.absmax, q, c);
  else
    q4_codes<false>(v, n, s.inv, q, c);
  q4_pack(c, n, packed);
  return s.absmax;
}
inline float quantize_block4(const float* __restrict v, int64_t n, const Q4Tables& q,
                             uint8_t* __restrict packed) {
  return quantize_block4(v, n, absmax_bits(v, n), q, packed);
}

// quantize_block4 with stochastic rounding of the codes: element i draws random_bits(key,
// first + i).
inline float quantize_block4_stochastic(const float* __restrict v, int64_t n, uint32_t mb,
                                        const Q4Tables& q, uint8_t* __restrict packed,
                                        uint32_t key, uint32_t first) {
  if (mb >= 0x7F800000u) return quantize_block4(v, n, mb, q, packed);
  alignas(64) uint8_t c[kQBlock4];
  const QScale s = q_scale(mb);
  for (int64_t i = 0; i < n; ++i) {
    const float x = s.divide ? v[i] / s.absmax : v[i] * s.inv;
    c[i] = static_cast<uint8_t>(
        q4_code_stochastic(x, q, random_bits(key, first + static_cast<uint32_t>(i))));
  }
  q4_pack(c, n, packed);
  return s.absmax;
}

// out[i] = value[code of element i] * absmax for n <= kQBlock4 elements packed from `packed`
// (AVX-512 / AVX2: the 16 values looked up in registers with permutes).
inline void dequantize_block4(const uint8_t* __restrict packed, int64_t n, float absmax,
                              const Q4Tables& q, float* __restrict out) {
  alignas(64) uint8_t c[kQBlock4] = {};  // (zeroed: GCC 12 cannot tell that c[0..n) is written)
  FASTOPTIM_Q_VECTORIZE
  for (int64_t i = 0; i < n / 2; ++i) {
    c[2 * i] = static_cast<uint8_t>(packed[i] >> 4);
    c[2 * i + 1] = static_cast<uint8_t>(packed[i] & 15);
  }
  if (n % 2 != 0) c[n - 1] = static_cast<uint8_t>(packed[n / 2] >> 4);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 table = _mm512_loadu_ps(q.value), s = _mm512_set1_ps(absmax);
  for (; i + 16 <= n; i += 16) {
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(k, table), s));
  }
#elif defined(__AVX2__)
  const __m256 lo = _mm256_loadu_ps(q.value), hi = _mm256_loadu_ps(q.value + 8),
               s = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(k, 28));  // sign: code >= 8
    const __m256 x = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, k),
                                      _mm256_permutevar8x32_ps(hi, k), upper);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(x, s));
  }
#endif
  for (; i < n; ++i) out[i] = q.value[c[i]] * absmax;
}

}  // namespace

}  // namespace fastoptim
