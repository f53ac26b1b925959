// Storage formats: loading bfloat16/float16 into float32 and storing float32 into them, rounded
// to nearest-even or stochastically, and the counter-based random bits stochastic rounding uses.
//
// Every function is branch-free integer and float code on one element (selects, no lookups), so
// the driver's loops over them vectorize on every instruction set, and every build computes the
// same bits: the portable conversion is the definition.  The driver (step.cpp) uses hardware
// conversions only where they give these bits: F16C for float16 (vcvtph2ps for every load: its
// NaN convention is f16_load's; vcvtps2ph for stores, groups holding a NaN rounded here, whose
// NaN is 0x7E00 with the sign where vcvtps2ph keeps the payload) and AVX-512 BF16 for bfloat16 to
// nearest (its denormal inputs, which it flushes, rounded here); its avx512 build also rounds
// stochastically to bfloat16 in AVX-512 integer code computing these functions' bits (values
// from 0x7F7F0000 up, Inf and NaN rounded here).  fastoptim.reference holds their NumPy twins.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastoptim {
// (Internal linkage: every ISA's code compiles its own copy; see kernels.hpp.)
namespace {

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// ------------------------------------------------------------------------------- bfloat16
// bfloat16 is the upper half of a float32: loading is exact.
inline float bf16_load(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even, on the bit pattern (denormals kept, as torch and ml_dtypes);
// NaN stays NaN (quiet: its sign and high payload kept); values from the midpoint above the
// largest bfloat16 become Inf.  The one definition of rounding to nearest bfloat16: the
// result as a float32 pattern (low half zero), all 32-bit lanes (selects, no narrowing), so
// the loops that keep it in float32 (dispatch.cpp's Newton-Schulz passes) vectorize as plain
// 32-bit integer code.  (The intermediate sum cannot wrap: only NaN patterns are that high.)
inline uint32_t bf16_nearest_bits(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t nan = (b & 0xFFFF0000u) | 0x00400000u;
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  return (b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
}
// ... as the bfloat16 code (what a bfloat16 array stores) ...
inline uint16_t bf16_round_nearest(float x) {
  return static_cast<uint16_t>(bf16_nearest_bits(x) >> 16);
}
// ... and as a float32 holding that bfloat16 value (bf16_load(bf16_round_nearest(x))).
inline float bf16_round_nearest_f32(float x) { return float_of(bf16_nearest_bits(x)); }

// Stochastic rounding with 16 random bits `r` (low half used): the result is one of the two
// bfloat16 neighbours of x, the upper one (in magnitude) with probability equal to x's distance
// from the lower one over their spacing, so its expectation is x.  NaN/Inf, and values that
// round-to-nearest makes Inf, are rounded as round_nearest does; below that, a finite x never
// becomes Inf (the largest bfloat16 is kept).
inline uint16_t bf16_round_stochastic(float x, uint32_t r) {
  const uint32_t b = bits_of(x);
  const uint32_t a = b & 0x7FFFFFFFu;
  const uint32_t sign = (b >> 16) & 0x8000u;
  uint32_t m = (a + (r & 0xFFFFu)) >> 16;  // magnitude: up with probability (a & 0xFFFF) / 2^16
  m = m > 0x7F7Fu ? 0x7F7Fu : m;
  const uint32_t top = a > 0x7F800000u ? (b >> 16) | 0x40u : sign | 0x7F80u;  // NaN; Inf
  return static_cast<uint16_t>(a >= 0x7F7F8000u ? top : sign | m);
}

// ------------------------------------------------------------------------------- float16
// IEEE binary16: 5 exponent bits (bias 15), 10 mantissa bits, denormals down to 2^-24.
// Exact on every value but NaN; a NaN loads as the quiet NaN with its sign and payload (the
// quiet bit set, as F16C's vcvtph2ps and ARM's FCVT convert it), so the driver converts float16
// with those instructions alone.
inline float f16_load(uint16_t h) {
  const uint32_t shifted = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;  // exponent+mantissa
  const uint32_t exp = shifted & 0x0F800000u;
  const uint32_t quiet = (shifted & 0x007FE000u) != 0 ? 0x00400000u : 0u;  // NaN (not Inf)
  uint32_t o = shifted + ((127u - 15u) << 23);                             // rebias
  o = exp == 0x0F800000u ? (o + ((128u - 16u) << 23)) | quiet : o;  // Inf/NaN: max exponent
  // Denormal (or zero): renormalize exactly through one float subtraction.
  const float denormal = float_of(o + (1u << 23)) - float_of(113u << 23);
  o = exp == 0 ? bits_of(denormal) : o;
  return float_of(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

// Round to nearest, ties to even (denormals kept); NaN -> quiet NaN with its sign; overflow
// (|x| >= 65520) -> Inf.
inline uint16_t f16_round_nearest(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  // Denormal results (|x| < 2^-14): |x| / 2^-24 rounded to nearest-even, in integers (a float
  // addition rounding at the 2^-24 grid would follow the caller's rounding mode): the 24-bit
  // significand shifted right by s = 126 - exponent (25 below 2^-25: 0; float32 denormals too;
  // 14 for the normal results, whose lanes do not use it: every shift stays below 32).
  const uint32_t e = a >> 23;
  const uint32_t s = e >= 113u ? 14u : (e >= 101u ? 126u - e : 25u);
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t denormal = (mant + (1u << (s - 1u)) - 1u + ((mant >> s) & 1u)) >> s;
  // Normal results: round the 13 dropped bits to nearest-even and rebias.
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN, or Inf/overflow
  const uint32_t m = a >= ((127u + 16u) << 23) ? big : (a < (113u << 23) ? denormal : normal);
  return static_cast<uint16_t>(sign | m);
}

// Stochastic rounding onto the float16 grid with 32 random bits `r` (same contract as
// bf16_round_stochastic; the largest finite float16 is 65504).  The dropped bits of the float32
// pattern are 13 for normal float16 results and more for denormal ones (the grid is 2^-24 there);
// below 2^-24 the result is 0 or 2^-24, up when r's top 24 bits are below |x| * 2^48: with
// probability |x| / 2^-24 rounded up to a multiple of 2^-24 (a bias under 2^-48 in value).
inline uint16_t f16_round_stochastic(float x, uint32_t r) {
  const uint32_t b = bits_of(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  const uint32_t e = a >> 23;
  const uint32_t d = e >= 113u ? 13u : (e >= 103u ? 126u - e : 23u);  // dropped bits
  const uint32_t mask = (1u << d) - 1u;
  uint32_t y = (a + (r & mask)) & ~mask;  // on the float16 grid, as a float32 pattern
  y = y > 0x477FE000u ? 0x477FE000u : y;  // 65504
  const bool up = static_cast<float>(r >> 8) < float_of(a) * 0x1p48f;
  y = e < 103u ? (up ? 0x33800000u : 0u) : y;  // |x| < 2^-24: 0 or 2^-24
  const uint16_t h = static_cast<uint16_t>(sign | f16_round_nearest(float_of(y)));  // exact
  return a >= 0x477FF000u ? f16_round_nearest(x) : h;  // NaN, Inf, overflow: as nearest
}

// ------------------------------------------------------------------------------- random bits
// Counter-based: the bits for element i of one stored array at one step are a hash of
// (seed, step, tensor id, array, i), so they do not depend on threads, chunking or the order of
// work, and a resumed run draws the same ones.  key() mixes everything but the low 32 bits of
// i once per block (splitmix64); random_bits() hashes those with the key (a 32-bit integer
// hash, "lowbias32" by C. Wellons) in a few vector instructions per element, or per two
// elements for bfloat16 (random_bits16).
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of one block of 2^32 elements (defined in quantize.cpp, compiled for the baseline
// instruction set: called once per block, it is not worth a copy per ISA, and an inline copy
// emitted out of line by an AVX-512 translation unit could be the one the linker keeps for all).
}  // namespace
uint32_t random_key(uint64_t seed, int64_t step, uint64_t tensor, uint32_t array,
                    uint64_t index_high);
namespace {

// random_bits' mixing of x = (index * 0x9E3779B1) ^ key up to, not including, its final
// x ^= x >> 16: written once, for a uint32_t and for the GCC vectors of them the SIMD stores
// hash 8 or 16 lanes with.
template <class V> inline V random_mix(V x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  return x * 0x846CA68Bu;
}

inline uint32_t random_bits(uint32_t key, uint32_t index) {
  const uint32_t x = random_mix((index * 0x9E3779B1u) ^ key);
  return x ^ (x >> 16);
}

// The 16 random bits of element e of a bfloat16 array (what bf16_round_stochastic uses): one
// hash serves two elements, 16 apart.  Element e takes hash index pair_index(e) =
// (e >> 5 << 4) | (e & 15), its low half when e & 16 is 0, else its high half: the 32 elements
// from a multiple of 32 take both halves of 16 consecutive hashes (one 16-lane hash per 32
// stored elements in the avx512 build).  Still a function of (key, e) alone.  (float16 takes
// the 32 bits of random_bits(key, e): its denormal grid needs up to 24.)
inline uint32_t pair_index(uint32_t e) { return ((e >> 1) & ~15u) | (e & 15u); }
inline uint32_t random_bits16(uint32_t key, uint32_t e) {
  const uint32_t x = random_bits(key, pair_index(e));
  return (e & 16u) != 0 ? x >> 16 : x & 0xFFFFu;
}

}  // namespace
}  // namespace fastoptim
