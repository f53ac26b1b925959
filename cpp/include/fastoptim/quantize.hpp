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
// The nearest code is found without a search: the float32 bit pattern of |x| (exponent and 7
// mantissa bits) indexes a bucket of at most one decision threshold, so a code is one table
// rank, one comparison and a select (vectorizes with gathers; same bits on every ISA).
#pragma once

#include <cstdint>

#include "fastoptim/convert.hpp"

namespace fastoptim {

// The maps: 8-bit dynamic signed / unsigned (blocks of 256), and the 4-bit ones.
enum class QMap : int { signed8 = 0, unsigned8 = 1 };
inline constexpr int kQMaps = 2;
inline constexpr int64_t kQBlock = 256;  // elements per block (8-bit)

// Buckets of |x| by its bit pattern's top 16 bits (8 exponent, 7 mantissa): [2^-23, 2).
inline constexpr uint32_t kQBucketBase = (127u - 23u) << 7;
inline constexpr int32_t kQBuckets = 24 << 7;

struct QTables {
  int ncodes = 0;
  float value[256] = {};  // code -> value, ascending
  // Codes of non-negative x: pos_base + rank; of negative x: pos_base - min(rank, neg_max), rank
  // being the number of decision thresholds below |x| among the non-negative map values.
  int32_t pos_base = 0, neg_max = 0;
  uint8_t zero = 0;  // the code of 0 (of a block that is all zeros, NaN or infinite)
  // Per bucket, one word (one gather): bits 16-23 the thresholds below the bucket; bit 24 set
  // when a threshold lies inside it, bits 0-15 then its low 16 bits (the high 16 are the
  // bucket's own: |x| > threshold <=> the low halves compare so).  The first and last buckets
  // hold no threshold, so |x| clamped into them compares as it should.
  uint32_t bucket[kQBuckets] = {};
};

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

// The code of one normalized value x (finite, |x| <= ~1) with the map's bucket words and
// bases (loop-invariant copies of QTables' fields: a code store could alias the struct).
inline uint8_t q_code(float x, const uint32_t* __restrict bucket, int32_t pos_base,
                      int32_t neg_max) {
  const uint32_t b = bits_of(x);
  const uint32_t a = b & 0x7FFFFFFFu;
  int32_t k = static_cast<int32_t>(a >> 16) - static_cast<int32_t>(kQBucketBase);
  k = k < 0 ? 0 : (k > kQBuckets - 1 ? kQBuckets - 1 : k);
  const uint32_t w = bucket[k];
  const uint32_t has = (w >> 24) & 1u;
  const uint32_t above = has & ((a & 0xFFFFu) > (w & 0xFFFFu) ? 1u : 0u);
  const int32_t r = static_cast<int32_t>(((w >> 16) & 0xFFu) + above);
  const int32_t neg = pos_base - (r < neg_max ? r : neg_max);
  return static_cast<uint8_t>((b >> 31) != 0 ? neg : pos_base + r);
}
inline uint8_t q_code(float x, const QTables& q) {
  return q_code(x, q.bucket, q.pos_base, q.neg_max);
}

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

// Quantize n <= kQBlock values into codes; returns the block's absmax (NaN for a non-finite block).
inline float quantize_block(const float* __restrict v, int64_t n, const QTables& q,
                            uint8_t* __restrict codes) {
  const uint32_t mb = absmax_bits(v, n);
  if (mb >= 0x7F800000u) {
    for (int64_t i = 0; i < n; ++i) codes[i] = q.zero;
    return float_of(0x7FC00000u);
  }
  const QScale s = q_scale(mb);
  const uint32_t* __restrict bucket = q.bucket;
  const int32_t pos_base = q.pos_base, neg_max = q.neg_max;
  if (s.divide) {
    const float absmax = s.absmax;
    FASTOPTIM_Q_VECTORIZE
    for (int64_t i = 0; i < n; ++i) codes[i] = q_code(v[i] / absmax, bucket, pos_base, neg_max);
  } else {
    const float inv = s.inv;
    FASTOPTIM_Q_VECTORIZE
    for (int64_t i = 0; i < n; ++i) codes[i] = q_code(v[i] * inv, bucket, pos_base, neg_max);
  }
  return s.absmax;
}

inline void dequantize_block(const uint8_t* __restrict codes, int64_t n, float absmax,
                             const QTables& q, float* __restrict out) {
  const float* __restrict value = q.value;
  FASTOPTIM_Q_VECTORIZE
  for (int64_t i = 0; i < n; ++i) out[i] = value[codes[i]] * absmax;
}

}  // namespace

}  // namespace fastoptim
