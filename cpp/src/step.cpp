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
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastoptim/convert.hpp"
#include "fastoptim/fastoptim.hpp"
#include "fastoptim/kernels.hpp"
#include "fastoptim/plan.hpp"
#include "fastoptim/quantize.hpp"
#include "fastoptim/registry.hpp"

#ifndef FASTOPTIM_ISA_NS
#error "compile with -DFASTOPTIM_ISA_NS=<isa>"
#endif

// GCC/Clang vector extensions (__attribute__((vector_size)), __builtin_shufflevector,
// __builtin_convertvector) serve the gradient statistics of every build and the avx2/avx512
// builds' staged bfloat16 stores: other compilers stop here rather than deep inside them.
#if !(defined(__GNUC__) || defined(__clang__))
#error "fastoptim: step.cpp needs GCC or Clang (clang-cl on Windows): it uses their vector extensions"
#endif

// F16C conversions in the avx2 and avx512 builds (every CPU with AVX2 has F16C; dispatch.cpp
// checks it with them).
#if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__))
#define FASTOPTIM_F16C 1
#include <immintrin.h>
#else
#define FASTOPTIM_F16C 0
#endif

// AVX-512 BF16 conversions in the avx512 build (GCC/Clang), used where the CPU has them.
#if defined(__AVX512BW__) && defined(__AVX512DQ__) && (defined(__GNUC__) || defined(__clang__))
#define FASTOPTIM_BF16_CVT 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define FASTOPTIM_BF16_CVT 0
#endif

namespace fastoptim {
namespace FASTOPTIM_ISA_NS {

namespace {

constexpr int64_t kAlign = 16;  // elements per 64-byte line in float32

// Iterations of the loop that follows are independent: vectorize without alias checks.  (Not
// `#pragma omp simd`: OpenMP lowering runs before inlining and turns the kernel's local state
// array into a per-lane "simd array", which then blocks vectorization of most kernels.)
#if defined(__GNUC__) || defined(__clang__)
#define FASTOPTIM_NOINLINE __attribute__((noinline))
#else
#define FASTOPTIM_NOINLINE
#endif

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
    if constexpr (writes_state<K>::value) {
      std::size_t j = 0;
      ((s[i] = v[j++]), ...);
    }
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
  for_each_range(total, chunk_elements(total), threads, f);
}

// ------------------------------------------------------------------ stored formats
// The low-precision formats the driver converts (convert.hpp), as types for its loops.
struct BF16 {
  using type = uint16_t;
  static float load(uint16_t h) { return bf16_load(h); }
  static uint16_t nearest(float x) { return bf16_round_nearest(x); }
  static uint16_t stochastic(float x, uint32_t r) { return bf16_round_stochastic(x, r); }
  static uint32_t bits(uint32_t key, uint32_t e) { return random_bits16(key, e); }  // paired
};
struct F16 {
  using type = uint16_t;
  static float load(uint16_t h) { return f16_load(h); }
  static uint16_t nearest(float x) { return f16_round_nearest(x); }
  static uint16_t stochastic(float x, uint32_t r) { return f16_round_stochastic(x, r); }
  static uint32_t bits(uint32_t key, uint32_t e) { return random_bits(key, e); }
};

template <class F> void load_block(const uint16_t* __restrict s, int64_t n, float* __restrict d) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) d[i] = F::load(s[i]);
}

template <class F> void store_nearest(const float* __restrict s, int64_t n, uint16_t* __restrict d) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) d[i] = F::nearest(s[i]);
}

#if FASTOPTIM_BF16_CVT
// float32 -> bfloat16 to nearest with AVX-512 BF16 (vcvtne2ps2bf16), on CPUs that have it (checked
// at run time).  The instruction rounds to nearest-even on the bit pattern and quiets NaNs exactly
// as bf16_round_nearest does, but flushes denormal inputs to zero: lanes holding a float32
// denormal (vfpclassps) take the portable rounding instead, so the bits are the portable path's.
__attribute__((target("avx512bf16"))) inline __m512i bf16_nearest32(__m512 a, __m512 b) {
  const __m512i r = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a: low 16 lanes
  const __mmask16 da = _mm512_fpclass_ps_mask(a, 0x20), db = _mm512_fpclass_ps_mask(b, 0x20);
  if (__builtin_expect(_kortestz_mask16_u8(da, db), 1)) return r;  // one kortestw for both
  const __mmask32 denormal = static_cast<__mmask32>(da) | static_cast<__mmask32>(db) << 16;
  // (GCC vector extensions: GCC 12's shift and conversion intrinsics warn under target()).
  typedef uint32_t V16u __attribute__((vector_size(64)));
  typedef uint16_t V16h __attribute__((vector_size(32)));
  const auto portable = [](__m512 x) {  // no NaN among these lanes
    const V16u v = reinterpret_cast<V16u>(x);
    return __builtin_convertvector((v + 0x7FFFu + ((v >> 16) & 1u)) >> 16, V16h);
  };
  const V16h fa = portable(a), fb = portable(b);
  const auto fixed = reinterpret_cast<__m512i>(__builtin_shufflevector(
      fa, fb, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
      23, 24, 25, 26, 27, 28, 29, 30, 31));
  return _mm512_mask_blend_epi16(denormal, r, fixed);
}

__attribute__((target("avx512bf16"))) FASTOPTIM_NOINLINE void store_bf16_hw(
    const float* __restrict s, int64_t n, uint16_t* __restrict d) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(d + i, bf16_nearest32(_mm512_loadu_ps(s + i), _mm512_loadu_ps(s + i + 16)));
  if (i < n) {  // the last 1..31: masked loads and store
    const int64_t m = n - i;
    const auto lo = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
    const auto hi = static_cast<__mmask16>(m <= 16 ? 0u : (1u << (m - 16)) - 1u);
    const __m512i r = bf16_nearest32(_mm512_maskz_loadu_ps(lo, s + i),
                                     _mm512_maskz_loadu_ps(hi, s + i + 16));
    _mm512_mask_storeu_epi16(d + i, static_cast<__mmask32>(lo) | static_cast<__mmask32>(hi) << 16,
                             r);
  }
}

// CPUID.(EAX=7, ECX=1):EAX bit 5 (the AVX-512 state is enabled: this TU runs only where the
// avx512 ISA level was detected).
inline bool detect_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 1, a, b, c, d);
  return (a >> 5) & 1u;
}
const bool kAvx512Bf16 = detect_avx512_bf16();
#endif

// (the avx512 build with GCC/Clang: target attributes and <cpuid.h>, as for FASTOPTIM_BF16_CVT)
#define FASTOPTIM_Q_VBMI FASTOPTIM_BF16_CVT
#if FASTOPTIM_Q_VBMI
// Dequantizing codes with AVX-512 VBMI (on CPUs that have it, checked at run time): no loads
// but the codes.  The map's values as four byte planes (QTables::value_bytes) looked up at 64
// codes at once by planes64 (quantize.hpp), the codes permuted first into its order.  Exactly
// value[code] * absmax.  (64 codes into out[0..64); s: absmax broadcast.)
__attribute__((target("avx512vbmi"))) inline __attribute__((always_inline)) void dequantize_vbmi64(
    const uint8_t* __restrict codes, const QTables& q, __m512 s, float* __restrict out) {
  __m512i v[4];
  planes64(_mm512_permutexvar_epi8(_mm512_load_si512(kQVbmiOrder), _mm512_loadu_si512(codes)),
           q.value_bytes, v);
  for (int r = 0; r < 4; ++r)
    _mm512_storeu_ps(out + 16 * r, _mm512_mul_ps(_mm512_castsi512_ps(v[r]), s));
}

__attribute__((target("avx512vbmi"))) FASTOPTIM_NOINLINE void dequantize_vbmi(
    const uint8_t* __restrict codes, int64_t n, float absmax, const QTables& q,
    float* __restrict out) {
  const __m512 s = _mm512_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) dequantize_vbmi64(codes + i, q, s, out + i);
  if (i < n) dequantize_block(codes + i, n - i, absmax, q, out + i);
}

// CPUID.(EAX=7, ECX=0):ECX bit 1; FASTOPT_QUANT_VBMI=0 in the environment turns it off (the
// tests run the gather path on such CPUs too).
inline bool detect_avx512_vbmi() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  const char* env = std::getenv("FASTOPT_QUANT_VBMI");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return (c >> 1) & 1u;
}
const bool kAvx512Vbmi = detect_avx512_vbmi();

// Where VBMI is found, the 8-bit codes are found by whichever of the two exact methods is the
// faster on this CPU: the search without gathers (q_codes_vbmi64: bound by byte permutes) or
// the bucket words' gathers (bound by the gather unit, whose speed differs most between CPU
// families: 16-lane gathers took about 9 cycles on a Sapphire Rapids VM and 20 on a Zen 4 one).
// Timed once, when first needed: each method's best of 15 interleaved trials on 4,096 values
// from L1.  The codes are the same either way; FASTOPT_QUANT_SEARCH=1 or 0 in the environment
// forces the search or the gathers (the tests compare the two).
__attribute__((target("avx512vbmi"))) FASTOPTIM_NOINLINE bool search_is_faster() {
  constexpr int64_t n = 4096;
  std::vector<float> v(n);
  std::vector<uint8_t> c(n);
  for (int64_t i = 0; i < n; ++i) {  // magnitudes over the map's decades, both signs
    const uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    v[static_cast<std::size_t>(i)] = std::ldexp(static_cast<float>(h >> 8) * 0x1p-24f,
                                                -static_cast<int>(h % 24u)) *
                                     ((h & 1u) != 0 ? -1.0f : 1.0f);
  }
  const QTables& q = qtables(QMap::signed8);
  using clock = std::chrono::steady_clock;
  clock::duration best[2] = {clock::duration::max(), clock::duration::max()};
  for (int trial = 0; trial < 15; ++trial)
    for (int search = 0; search < 2; ++search) {
      const auto t0 = clock::now();
      for (int rep = 0; rep < 4; ++rep) {
        if (search != 0)
          q_codes_search(v.data(), n, 1.0f, q, c.data());
        else
          q_codes(v.data(), n, 1.0f, q, c.data());
        asm volatile("" : : "r"(c.data()) : "memory");
      }
      best[search] = std::min(best[search], clock::now() - t0);
    }
  return best[1] < best[0];
}
inline bool choose_q_search() {
  if (!kAvx512Vbmi || !qtables(QMap::signed8).searchable) return false;
  const char* env = std::getenv("FASTOPT_QUANT_SEARCH");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return search_is_faster();
}
#endif

// Whether the 8-bit codes are decoded by byte permutes (AVX-512 VBMI found at run time), and
// whether they are searched without gathers.
[[maybe_unused]] inline bool q_vbmi() {  // (unused where no quantized path asks: Clang warns)
#if FASTOPTIM_Q_VBMI
  return kAvx512Vbmi;
#else
  return false;
#endif
}
inline bool q_search_on() {
#if FASTOPTIM_Q_VBMI
  static const bool on = choose_q_search();  // (on first use: thread-safe)
  return on;
#else
  return false;
#endif
}

#if FASTOPTIM_F16C
// float16 <-> float32 with F16C (vcvtph2ps; vcvtps2ph rounding to nearest-even): exact IEEE
// conversions, denormals included.  vcvtph2ps gives f16_load's bits on every value (a NaN
// quieted, its sign and payload kept), so loads convert with it alone; vcvtps2ph keeps a NaN's
// payload where f16_round_nearest stores 0x7E00 with the sign, so a group holding a float32 NaN
// (stores) is rounded by the portable function.
template <> void load_block<F16>(const uint16_t* __restrict s, int64_t n, float* __restrict d) {
  int64_t i = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                reinterpret_cast<const __m256i*>(s + i))));
#endif
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = f16_load(s[i]);
}

template <> void store_nearest<F16>(const float* __restrict s, int64_t n, uint16_t* __restrict d) {
  int64_t i = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  // 32 at a time: one test (kortestw) for a NaN in either half, one 64-byte store (a whole
  // line where d is aligned, as the bfloat16 stores write them).
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (; i + 32 <= n; i += 32) {
    const __m512 x = _mm512_loadu_ps(s + i), y = _mm512_loadu_ps(s + i + 16);
    if (_kortestz_mask16_u8(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                            _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q))) {
      const __m512i h = _mm512_castsi256_si512(_mm512_cvtps_ph(x, kRound));
      _mm512_storeu_si512(d + i, _mm512_inserti64x4(h, _mm512_cvtps_ph(y, kRound), 1));
    } else {
      for (int64_t j = i; j < i + 32; ++j) d[j] = f16_round_nearest(s[j]);
    }
  }
#endif
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(s + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) == 0)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
      for (int64_t j = i; j < i + 8; ++j) d[j] = f16_round_nearest(s[j]);
  }
  for (; i < n; ++i) d[i] = f16_round_nearest(s[i]);
}
#endif

// Every float32 -> bfloat16 store to nearest of the driver goes through this one.
template <> void store_nearest<BF16>(const float* __restrict s, int64_t n, uint16_t* __restrict d) {
#if FASTOPTIM_BF16_CVT
  if (kAvx512Bf16) return store_bf16_hw(s, n, d);
#endif
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_round_nearest(s[i]);
}

// `first`: the low 32 bits of the element index of s[0] within its tensor.
template <class F>
void store_stochastic(const float* __restrict s, int64_t n, uint16_t* __restrict d, uint32_t key,
                      uint32_t first) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i)
    d[i] = F::stochastic(s[i], F::bits(key, first + static_cast<uint32_t>(i)));
}

#if FASTOPTIM_BF16_CVT || defined(__AVX2__)
// A group that needs the portable function (a value from 0x7F7F0000 up, Inf or NaN): out of
// line and called from outside the staged stores' hot loops, which then hold no call (a call in
// them made GCC rebuild their vector constants with a broadcast in every iteration).
FASTOPTIM_NOINLINE void bf16_stochastic_portable(const float* __restrict s, int64_t n,
                                                 uint16_t* __restrict d, uint32_t key,
                                                 uint32_t first) {
  for (int64_t j = 0; j < n; ++j)
    d[j] = bf16_round_stochastic(s[j], random_bits16(key, first + static_cast<uint32_t>(j)));
}
#endif

#if FASTOPTIM_BF16_CVT
// Stochastic rounding to bfloat16 with AVX-512 integer instructions (no BF16 extension needed),
// the same bits as bf16_round_stochastic with random_bits16: below |x| = 0x7F7F0000 (as a
// pattern) that function is (x's pattern + the 16 random bits) >> 16 (the carry cannot reach
// the sign, nor make Inf), so 32 lanes take an add and a permutation of their upper halves;
// a group of 32 holding a larger value, Inf or NaN (rare) is rounded by the portable function.
// A group of 32 from a multiple of 32 of the tensor takes its bits from one 16-lane hash (low
// halves for its first 16, high halves for the others: random_bits16's pairing); a group from
// elsewhere (only the first of a call) hashes each lane's own pair index, two hashes.
constexpr bool kStagedStochastic = true;

// random_bits up to (not including) its final x ^= x >> 16, in each lane (xi = hash index *
// 0x9E3779B1): its high half is random_bits' high half; low half ^ high half its low half.
inline __m512i random_hash16(__m512i xi, __m512i key) {
  typedef uint32_t V __attribute__((vector_size(64)));
  return reinterpret_cast<__m512i>(random_mix(reinterpret_cast<V>(_mm512_xor_si512(xi, key))));
}

// The same with random_mix's first x ^= x >> 16 and the key's xor in one ternary logic:
// (xi ^ key) ^ ((xi ^ key) >> 16) = xi ^ (xi >> 16) ^ key16, key16 = key ^ (key >> 16).
inline __m512i random_hash16_k16(__m512i xi, __m512i key16) {
  typedef uint32_t V __attribute__((vector_size(64)));
  V x = reinterpret_cast<V>(_mm512_ternarylogic_epi32(xi, _mm512_srli_epi32(xi, 16), key16, 0x96));
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  return reinterpret_cast<__m512i>(x * 0x846CA68Bu);
}


// random_bits16(key, e) for the element index e in each lane.
inline __m512i random_bits16x16(__m512i e, __m512i key) {
  const __m512i fifteen = _mm512_set1_epi32(15), sixteen = _mm512_set1_epi32(16);
  // pair_index(e) = (e >> 1 & ~15) | (e & 15): ternary logic C ? B : A (0xD8) with C = 15
  const __m512i index = _mm512_ternarylogic_epi32(_mm512_srli_epi32(e, 1), e, fifteen, 0xD8);
  const __m512i c0 = _mm512_set1_epi32(static_cast<int>(0x9E3779B1u));
  __m512i x = random_hash16(_mm512_mullo_epi32(index, c0), key);
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_srlv_epi32(x, _mm512_and_si512(e, sixteen));
  return _mm512_and_si512(x, _mm512_set1_epi32(0xFFFF));
}

// The constants of bf16_group32.
struct Group32 {
  // the upper halves of 32 lanes of two vectors, as 16-bit elements
  alignas(64) static constexpr uint16_t kOdd[32] = {
      1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
      33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  __m512i odd = _mm512_load_si512(kOdd);
  __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), big = _mm512_set1_epi32(0x7F7F0000);
  __m512i ffff = _mm512_set1_epi32(0xFFFF);
};

// One whole group of 32 stochastic bfloat16 stores, s[0..32) into d[0..32) from an element at
// a multiple of 32 of the tensor, x the hash of its 16 hash indices (random_hash16's value:
// elements 0-15 take the low halves of x ^ (x >> 16), elements 16-31 the high halves of x).
// Stores whatever the values; returns the group's largest magnitude pattern: from 0x7F7F0000
// up (a large value, Inf or NaN) the caller stores the group again with the portable function.
// (The whole group of store_stochastic<BF16> and store_stochastic_many.)
inline __attribute__((always_inline)) __m512i bf16_group32(const float* __restrict s,
                                                           uint16_t* __restrict d, __m512i x,
                                                           const Group32& c) {
  const __m512i h = _mm512_srli_epi32(x, 16);  // (x ^ h) & 0xFFFF: ternary logic 0x28
  const __m512i b0 = _mm512_loadu_si512(s), b1 = _mm512_loadu_si512(s + 16);
  const __m512i y0 = _mm512_add_epi32(b0, _mm512_ternarylogic_epi32(x, h, c.ffff, 0x28));
  _mm512_storeu_si512(d, _mm512_permutex2var_epi16(y0, c.odd, _mm512_add_epi32(b1, h)));
  return _mm512_max_epu32(_mm512_and_si512(b0, c.mag), _mm512_and_si512(b1, c.mag));
}

template <>
void store_stochastic<BF16>(const float* __restrict s, int64_t n, uint16_t* __restrict d,
                            uint32_t key, uint32_t first) {
  const Group32 c;
  const __m512i k = _mm512_set1_epi32(static_cast<int>(key));
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // m <= 32 elements from i, the first 16 with bits r0, the others with r1
  const auto group = [&](int64_t i, int64_t m, __m512i r0, __m512i r1) {
    const auto lo = static_cast<__mmask16>(m >= 16 ? 0xFFFFu : (1u << m) - 1u);
    const auto hi =
        static_cast<__mmask16>(m >= 32 ? 0xFFFFu : (m <= 16 ? 0u : (1u << (m - 16)) - 1u));
    const __m512i b0 = _mm512_castps_si512(_mm512_maskz_loadu_ps(lo, s + i));
    const __m512i b1 = _mm512_castps_si512(_mm512_maskz_loadu_ps(hi, s + i + 16));
    const __mmask16 special = _mm512_cmpge_epu32_mask(_mm512_and_si512(b0, c.mag), c.big) |
                              _mm512_cmpge_epu32_mask(_mm512_and_si512(b1, c.mag), c.big);
    if (__builtin_expect(special == 0, 1)) {
      const __m512i r =
          _mm512_permutex2var_epi16(_mm512_add_epi32(b0, r0), c.odd, _mm512_add_epi32(b1, r1));
      if (m >= 32)
        _mm512_storeu_si512(d + i, r);
      else
        _mm512_mask_storeu_epi16(
            d + i, static_cast<__mmask32>(lo) | static_cast<__mmask32>(hi) << 16, r);
    } else {
      bf16_stochastic_portable(s + i, m, d + i, key, first + static_cast<uint32_t>(i));
    }
  };
  // up to the first element at a multiple of 32: each lane's own hash
  const auto head = static_cast<int64_t>((32u - (first & 31u)) & 31u);
  if (head != 0 && n > 0) {
    const __m512i e = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), lane);
    group(0, std::min(n, head), random_bits16x16(e, k),
          random_bits16x16(_mm512_add_epi32(e, _mm512_set1_epi32(16)), k));
  }
  // then one hash per 32: hash indices (first + i) / 2 + lane
  const __m512i c0 = _mm512_set1_epi32(static_cast<int>(0x9E3779B1u));
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16u * 0x9E3779B1u));
  const auto index = static_cast<int>((first + static_cast<uint32_t>(head)) >> 1);
  __m512i xi = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(index), lane), c0);
  const __m512i k16 = _mm512_set1_epi32(static_cast<int>(key ^ (key >> 16)));
  int64_t i = head;
  // whole groups: bf16_group32; a group needing the portable function leaves the inner loop
  // (which then holds no call) and the outer one stores it again
  while (i + 32 <= n) {
    bool special = false;
    for (; i + 32 <= n; i += 32) {
      const __m512i x = random_hash16_k16(xi, k16);
      xi = _mm512_add_epi32(xi, step);
      if (__builtin_expect(_mm512_cmpge_epu32_mask(bf16_group32(s + i, d + i, x, c), c.big) != 0,
                           0)) {
        special = true;
        break;
      }
    }
    if (special) {
      bf16_stochastic_portable(s + i, 32, d + i, key, first + static_cast<uint32_t>(i));
      i += 32;
    }
  }
  if (i < n) {  // the last, partial group
    const __m512i x = random_hash16(xi, k);
    const __m512i h = _mm512_srli_epi32(x, 16);
    group(i, n - i, _mm512_ternarylogic_epi32(x, h, c.ffff, 0x28), h);
  }
}

// The stochastic bfloat16 stores of A staged arrays of one block in one pass (sweep_fused), the
// same bits as A calls of store_stochastic<BF16>: n a multiple of 32 from element `first`, a
// multiple of 32 too, so every group is whole; the A hashes of a group share their index
// vector.  A group in which an array needs the portable function leaves the loop (which then
// holds no call) and is stored again, all arrays, by store_stochastic<BF16>.
constexpr bool kStagedMany = true;
template <std::size_t A>
void store_stochastic_many(const std::array<const float*, A>& s, const std::array<uint16_t*, A>& d,
                           const std::array<uint32_t, A>& key, int64_t n, uint32_t first) {
  const Group32 c;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i c0 = _mm512_set1_epi32(static_cast<int>(0x9E3779B1u));
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16u * 0x9E3779B1u));
  __m512i k16[A];
  for (std::size_t a = 0; a < A; ++a)
    k16[a] = _mm512_set1_epi32(static_cast<int>(key[a] ^ (key[a] >> 16)));
  // hash indices first / 2 + i / 2 + lane
  __m512i xi = _mm512_mullo_epi32(
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first >> 1)), lane), c0);
  int64_t i = 0;
  while (i < n) {
    bool special = false;
    for (; i < n; i += 32) {
      __m512i top = _mm512_setzero_si512();  // the largest magnitude pattern of the group
      for (std::size_t a = 0; a < A; ++a) {
        const __m512i m = bf16_group32(s[a] + i, d[a] + i, random_hash16_k16(xi, k16[a]), c);
        top = a == 0 ? m : _mm512_max_epu32(top, m);
      }
      xi = _mm512_add_epi32(xi, step);
      if (__builtin_expect(_mm512_cmpge_epu32_mask(top, c.big) != 0, 0)) {
        special = true;
        break;
      }
    }
    if (special) {  // group i again, each array by the function for any group
      for (std::size_t a = 0; a < A; ++a)
        store_stochastic<BF16>(s[a] + i, 32, d[a] + i, key[a], first + static_cast<uint32_t>(i));
      i += 32;
    }
  }
}
#elif defined(__AVX2__)
// The avx2 build stages stochastic bfloat16 stores too, with the same integer method: a group
// of 32 from a multiple of 32 takes its bits from two 8-lane hashes (hash indices 16q + j and
// 16q + 8 + j: low halves for elements 0-15, high halves for 16-31), then an add, a shift and
// a pack per 8 lanes.  Partial groups (a call's first, from elsewhere, and its last) go through
// a zero-padded copy with each lane's own hash; groups holding |x| >= 0x7F7F0000, Inf or NaN
// through the portable function.
constexpr bool kStagedStochastic = true;

// random_bits up to (not including) its final x ^= x >> 16 (as random_hash16, 8 lanes).
inline __m256i random_hash8(__m256i xi, __m256i key) {
  typedef uint32_t V __attribute__((vector_size(32)));
  return reinterpret_cast<__m256i>(random_mix(reinterpret_cast<V>(_mm256_xor_si256(xi, key))));
}

// random_bits16(key, e) for the element index e in each lane.
inline __m256i random_bits16x8(__m256i e, __m256i key) {
  const __m256i fifteen = _mm256_set1_epi32(15);
  const __m256i index = _mm256_or_si256(_mm256_andnot_si256(fifteen, _mm256_srli_epi32(e, 1)),
                                        _mm256_and_si256(e, fifteen));
  const __m256i c0 = _mm256_set1_epi32(static_cast<int>(0x9E3779B1u));
  __m256i x = random_hash8(_mm256_mullo_epi32(index, c0), key);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_srlv_epi32(x, _mm256_and_si256(e, _mm256_set1_epi32(16)));
  return _mm256_and_si256(x, _mm256_set1_epi32(0xFFFF));
}

template <>
void store_stochastic<BF16>(const float* __restrict s, int64_t n, uint16_t* __restrict d,
                            uint32_t key, uint32_t first) {
  const __m256i k = _mm256_set1_epi32(static_cast<int>(key));
  const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF), below = _mm256_set1_epi32(0x7F7EFFFF);
  const __m256i ffff = _mm256_set1_epi32(0xFFFF);
  const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  // 32 elements from src with bits r[h] for elements 8h .. 8h + 7 into dst; false (nothing
  // stored) where one needs the portable function
  const auto group = [&](const float* src, const __m256i(&r)[4], uint16_t* dst) {
    __m256i b[4];
    __m256i big = _mm256_setzero_si256();
    for (int h = 0; h < 4; ++h) {
      b[h] = _mm256_castps_si256(_mm256_loadu_ps(src + 8 * h));
      big = _mm256_or_si256(big, _mm256_cmpgt_epi32(_mm256_and_si256(b[h], mag), below));
    }
    if (!_mm256_testz_si256(big, big)) return false;
    __m256i t[4];
    for (int h = 0; h < 4; ++h) t[h] = _mm256_srli_epi32(_mm256_add_epi32(b[h], r[h]), 16);
    // packus interleaves 128-bit lanes: 0xD8 puts the 64-bit quarters back in order
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packus_epi32(t[0], t[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packus_epi32(t[2], t[3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), hi);
    return true;
  };
  const auto portable = [&](int64_t i, int64_t m) {
    bf16_stochastic_portable(s + i, m, d + i, key, first + static_cast<uint32_t>(i));
  };
  const auto partial = [&](int64_t i, int64_t m) {  // m < 32 elements from i
    alignas(32) float buf[32] = {};
    alignas(32) uint16_t out[32];
    std::memcpy(buf, s + i, sizeof(float) * static_cast<std::size_t>(m));
    const __m256i e =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(i))),
                         lane);
    const __m256i r[4] = {
        random_bits16x8(e, k), random_bits16x8(_mm256_add_epi32(e, _mm256_set1_epi32(8)), k),
        random_bits16x8(_mm256_add_epi32(e, _mm256_set1_epi32(16)), k),
        random_bits16x8(_mm256_add_epi32(e, _mm256_set1_epi32(24)), k)};
    if (group(buf, r, out))
      std::memcpy(d + i, out, sizeof(uint16_t) * static_cast<std::size_t>(m));
    else
      portable(i, m);
  };
  const auto head = static_cast<int64_t>((32u - (first & 31u)) & 31u);
  if (head != 0 && n > 0) partial(0, std::min(n, head));
  // then whole groups: hash indices (first + i) / 2 + lane and + 8 + lane
  const __m256i c0 = _mm256_set1_epi32(static_cast<int>(0x9E3779B1u));
  const __m256i eight = _mm256_set1_epi32(static_cast<int>(8u * 0x9E3779B1u));
  const __m256i step = _mm256_set1_epi32(static_cast<int>(16u * 0x9E3779B1u));
  const auto index = static_cast<int>((first + static_cast<uint32_t>(head)) >> 1);
  __m256i xi = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(index), lane), c0);
  int64_t i = head;
  while (i + 32 <= n) {  // a group needing the portable function leaves the call-free loop
    bool special = false;
    for (; i + 32 <= n; i += 32) {
      const __m256i x0 = random_hash8(xi, k), x1 = random_hash8(_mm256_add_epi32(xi, eight), k);
      xi = _mm256_add_epi32(xi, step);
      const __m256i h0 = _mm256_srli_epi32(x0, 16), h1 = _mm256_srli_epi32(x1, 16);
      const __m256i r[4] = {_mm256_and_si256(_mm256_xor_si256(x0, h0), ffff),
                            _mm256_and_si256(_mm256_xor_si256(x1, h1), ffff), h0, h1};
      if (!group(s + i, r, d + i)) {
        special = true;
        break;
      }
    }
    if (special) {
      portable(i, 32);
      i += 32;
    }
  }
  if (i < n) partial(i, n - i);
}
#else
constexpr bool kStagedStochastic = false;
#endif
#if !FASTOPTIM_BF16_CVT
constexpr bool kStagedMany = false;
template <std::size_t A>
void store_stochastic_many(const std::array<const float*, A>&, const std::array<uint16_t*, A>&,
                           const std::array<uint32_t, A>&, int64_t, uint32_t) {}
#endif

// Kahan-compensated store of an updated low-precision parameter: the update (new - old) plus the
// compensation c is added to the stored parameter, rounded to nearest; what the rounding lost
// becomes the new compensation (rounded to nearest itself).
// A compensation this store wrote is at most half the spacing next to p on the side it points
// to (what rounding p lost; half the spacing above |p| is 2^floor(log2 |p|) * 2^-(mantissa bits
// + 1), halved below a power of two; below the smallest normal only 0 fits).  One that is
// larger belongs to a value the parameter no longer holds: the user changed it since (zeroed a
// pruned weight, clamped it, loaded another) and it is dropped, or a step with a zero gradient
// moved the edited weight by itself (a zeroed weight came back as the old value's residual).
// A checkpoint's pair always passes (bit-exact resume).  By bits, no conversion: 2^floor(log2
// |p|) is p's float32 exponent field alone.
template <class F>
inline float kept_compensation(float p, float c) {
  constexpr float kHalfRelative = std::is_same_v<F, BF16> ? 0x1p-8f : 0x1p-11f;
  const uint32_t b = bits_of(p);
  const float above = float_of(b & 0x7F800000u) * kHalfRelative;  // (Inf for Inf/NaN p)
  const bool below = (b & 0x007FFFFFu) == 0 && ((b ^ bits_of(c)) & 0x80000000u) != 0;
  return std::fabs(c) <= (below ? 0.5f * above : above) ? c : 0.0f;
}

template <class F>
void store_kahan(const float* __restrict fresh, const float* __restrict old, int64_t n,
                 uint16_t* __restrict param, uint16_t* __restrict comp) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    const float u = kept_compensation<F>(old[i], F::load(comp[i])) + (fresh[i] - old[i]);
    const uint16_t stored = F::nearest(old[i] + u);
    comp[i] = F::nearest(u - (F::load(stored) - old[i]));
    param[i] = stored;
  }
}

// The float32 view of n elements of a stored array from element `lo`: the array itself when it
// is float32, else its values converted into `buf`.
inline float* staged(const void* a, DType d, int64_t lo, int64_t n, float* buf) {
  if (d == DType::f32) return const_cast<float*>(static_cast<const float*>(a)) + lo;
  const uint16_t* s = static_cast<const uint16_t*>(a) + lo;
  if (d == DType::bf16)
    load_block<BF16>(s, n, buf);
  else
    load_block<F16>(s, n, buf);
  return buf;
}

// Where rounding draws its bits: one stream per (step, tensor, array) of the plan's seed.
struct RoundingKey {
  const Plan& plan;
  int64_t step;
  uint32_t operator()(const Tensor& t, uint32_t array, int64_t lo) const {
    return random_key(plan.seed, step, t.id, array, static_cast<uint64_t>(lo) >> 32);
  }
};

// Store n float32 values from element `lo` into a bfloat16/float16 array (no-op for float32:
// the kernel updated it in place); `array` numbers the stream of random bits.
inline void unstage(const float* s, void* a, DType d, int64_t lo, int64_t n, const Tensor& t,
                    uint32_t array, const RoundingKey& key) {
  if (d == DType::f32) return;
  uint16_t* dst = static_cast<uint16_t*>(a) + lo;
  const bool bf = d == DType::bf16;
  if (key.plan.rounding == Rounding::nearest) {
    bf ? store_nearest<BF16>(s, n, dst) : store_nearest<F16>(s, n, dst);
  } else {
    const uint32_t k = key(t, array, lo);
    const auto first = static_cast<uint32_t>(lo);
    bf ? store_stochastic<BF16>(s, n, dst, k, first) : store_stochastic<F16>(s, n, dst, k, first);
  }
}

struct F32 {  // float32 storage
  using type = float;
  static float load(float x) { return x; }
  static uint32_t bits(uint32_t, uint32_t) { return 0; }  // (stored as is)
};

// Storing a float32 result into format F (F32: as is; BF16 to nearest or stochastically with
// the element's random bits).
template <class F, bool Stochastic> struct Store {
  static void put(typename F::type& dst, float v, uint32_t) { dst = v; }
};
template <> struct Store<BF16, false> {
  static void put(uint16_t& dst, float v, uint32_t) { dst = bf16_round_nearest(v); }
};
template <> struct Store<BF16, true> {
  static void put(uint16_t& dst, float v, uint32_t r) { dst = bf16_round_stochastic(v, r); }
};

// Elements per block of the converting path: its float32 copies stay in L1.
constexpr int64_t kBlock = 256;

// The converting path of one tensor's elements [a, b), block by block: load and convert what is
// not float32, run the same element functor on float32, store back rounded.  Random-bit streams:
// 0 for the parameter (and its copy), 1 + j for state j.  A block never crosses a multiple of
// 2^32 elements (the random bits take the low 32 bits of the index; the key the rest).
template <class K, std::size_t... J>
void sweep_converting(const K& k, const Tensor& t, int64_t a, int64_t b, const RoundingKey& key,
                      std::index_sequence<J...>) {
  constexpr std::size_t N = sizeof...(J);
  alignas(64) float buf_p[kBlock], buf_old[kBlock], buf_g[kBlock];
  alignas(64) float buf_s[N == 0 ? 1 : N][kBlock];
  (void)buf_s;  // unused without state
  for (int64_t lo = a; lo < b;) {
    const int64_t wrap = (lo | int64_t{0xFFFFFFFF}) + 1;  // the next multiple of 2^32
    const int64_t n = std::min({kBlock, b - lo, wrap - lo});
    float* p = staged(t.param, t.dtype, lo, n, buf_p);
    const float* g = staged(t.grad, t.grad_dtype, lo, n, buf_g);
    float* s[N == 0 ? 1 : N] = {staged(t.state[J], t.state_dtype[J], lo, n, buf_s[J])...};
    if (t.comp) std::copy(p, p + n, buf_old);
    sweep(k, p, g, n, s[J]...);
    if (t.comp) {
      uint16_t* param = static_cast<uint16_t*>(t.param) + lo;
      uint16_t* comp = static_cast<uint16_t*>(t.comp) + lo;
      t.dtype == DType::bf16 ? store_kahan<BF16>(p, buf_old, n, param, comp)
                             : store_kahan<F16>(p, buf_old, n, param, comp);
    } else {
      unstage(p, t.param, t.dtype, lo, n, t, 0, key);
    }
    if constexpr (writes_state<K>::value)
      (unstage(s[J], t.state[J], t.state_dtype[J], lo, n, t, 1 + J, key), ...);
    if (t.out) unstage(p, t.out, t.out_dtype, lo, n, t, 0, key);
    lo += n;
  }
}

// ------------------------------------------------------------------ quantized state
// A tensor with a block-quantized state (quantize.hpp) runs block by block, each block of
// kQBlock elements of the tensor whole: dequantize its quantized states into float32 (the others
// loaded and converted as the converting path does), one loop running the same element functor
// and taking each state's new absmax, then the block's codes.  The parameter and gradient are
// converted in registers in that loop for float32 and bfloat16 parameters with gradients of
// their dtype (and no master copy, Kahan or copy-out); other layouts are staged through float32
// buffers as the converting path stages them.  The driver's chunks do not respect blocks: a
// block belongs to the chunk (range [a, b) of the tensor) that holds its first element, and is
// updated whole by it, even past b; the next chunk skips the elements of that block.  So every
// block is updated exactly once, by one thread, with the same arithmetic whatever the thread
// count.
// Where the avx512 build finds AVX-512 VBMI and a state is 4-bit, those layouts take two loops
// per block instead of three: dequantize + kernel + absmax 64 elements at a time (sweep_qvbmi),
// then the codes.
// A 4-bit state's block of kQBlock elements is two blocks of kQBlock4 (dequantized, then
// quantized, each with its own absmax; stochastic rounding draws element lo + i's bits from
// the same stream as an 8-bit state's).
inline void staged_state4(const Tensor& t, std::size_t j, int64_t lo, int64_t n, float* buf) {
  const Q4Tables& q = q4tables(qmap_of(t.state_dtype[j]));
  for (int64_t h = 0; h < n; h += kQBlock4)
    dequantize_block4(static_cast<const uint8_t*>(t.state[j]) + (lo + h) / 2,
                      std::min(kQBlock4, n - h), t.absmax[j][(lo + h) / kQBlock4], q, buf + h);
}

inline void unstage_state4(const float* s, const Tensor& t, std::size_t j, int64_t lo, int64_t n,
                           const RoundingKey& key) {
  const Q4Tables& q = q4tables(qmap_of(t.state_dtype[j]));
  const bool sr = key.plan.rounding == Rounding::stochastic;
  const uint32_t k = sr ? key(t, static_cast<uint32_t>(1 + j), lo) : 0u;
  for (int64_t h = 0; h < n; h += kQBlock4) {
    const int64_t m = std::min(kQBlock4, n - h);
    uint8_t* codes = static_cast<uint8_t*>(t.state[j]) + (lo + h) / 2;
    const uint32_t mb = absmax_bits(s + h, m);
    t.absmax[j][(lo + h) / kQBlock4] =
        sr ? quantize_block4_stochastic(s + h, m, mb, q, codes, k, static_cast<uint32_t>(lo + h))
           : quantize_block4(s + h, m, mb, q, codes);
  }
}

// One 8-bit block's values: by byte permutes where the CPU has AVX-512 VBMI, else gathers.
inline void dequantize8(const uint8_t* codes, int64_t n, float absmax, const QTables& q,
                        float* out) {
#if FASTOPTIM_Q_VBMI
  if (kAvx512Vbmi) return dequantize_vbmi(codes, n, absmax, q, out);
#endif
  dequantize_block(codes, n, absmax, q, out);
}

inline float* staged_state(const Tensor& t, std::size_t j, const QTables* q, int64_t lo,
                           int64_t n, float* buf) {
  if (is_q4(t.state_dtype[j])) {
    staged_state4(t, j, lo, n, buf);
    return buf;
  }
  if (q == nullptr) return staged(t.state[j], t.state_dtype[j], lo, n, buf);
  dequantize8(static_cast<const uint8_t*>(t.state[j]) + lo, n, t.absmax[j][lo / kQBlock], *q, buf);
  return buf;
}

inline void unstage_state(const float* s, uint32_t mbits, const Tensor& t, std::size_t j,
                          const QTables* q, int64_t lo, int64_t n, const RoundingKey& key) {
  if (is_q4(t.state_dtype[j])) return unstage_state4(s, t, j, lo, n, key);  // (its own absmax)
  if (q == nullptr) {
    unstage(s, t.state[j], t.state_dtype[j], lo, n, t, static_cast<uint32_t>(1 + j), key);
    return;
  }
  uint8_t* codes = static_cast<uint8_t*>(t.state[j]) + lo;
  t.absmax[j][lo / kQBlock] =
      key.plan.rounding == Rounding::stochastic
          ? quantize_block_stochastic(s, n, mbits, *q, codes,
                                      key(t, static_cast<uint32_t>(1 + j), lo),
                                      static_cast<uint32_t>(lo))
          : quantize_block(s, n, mbits, *q, codes, q_search_on());
}

// The element functor over n elements: parameter of format P (updated in place, rounded as
// Stochastic says with the bits of stream `key0` from element `first`), gradient of format G,
// float32 states s (updated in place); mx[j] = absmax_bits of state j's new values.
template <class P, class G, bool Stochastic, class K, std::size_t... J, class... S>
FASTOPTIM_NOINLINE void sweep_absmax(const K k, typename P::type* __restrict p,
                                     const typename G::type* __restrict g, int64_t n,
                                     uint32_t first, uint32_t key0, uint32_t* __restrict mx,
                                     std::index_sequence<J...>, S* __restrict... s) {
  [[maybe_unused]] std::array<uint32_t, sizeof...(J)> m{};
FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    float pv = P::load(p[i]);
    std::array<float, sizeof...(J)> v{s[i]...};
    k(pv, G::load(g[i]), v);
    Store<P, Stochastic>::put(
        p[i], pv, Stochastic ? P::bits(key0, first + static_cast<uint32_t>(i)) : 0u);
    ((s[i] = v[J]), ...);
    ((m[J] = std::max(m[J], bits_of(v[J]) & 0x7FFFFFFFu)), ...);
  }
  ((mx[J] = m[J]), ...);
}

#if defined(__AVX512F__) || defined(__AVX2__)
#define FASTOPTIM_Q_FUSED 1
// (Where the avx512 build finds AVX-512 VBMI, sweep_quantized skips this: 8-bit states are
// dequantized a block at a time by dequantize_vbmi, no gathers, and sweep_absmax runs from L1;
// with a 4-bit state sweep_qvbmi runs, decoding 64 at a time in the kernel's loop.)
// With hardware gathers (AVX-512, AVX2) the states are dequantized 16 elements at a time into a
// scratch that stays in registers and the store buffer, and the element functor runs on those
// 16 in the compiler's vector loop inlined right after: the gathers overlap with the kernel's
// arithmetic (one instruction stream) instead of running as passes of their own.
#if defined(_MSC_VER) && !defined(__clang__)
#define FASTOPTIM_ALWAYS_INLINE __forceinline
#else
#define FASTOPTIM_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

constexpr int64_t kQSub = 16;

// Where one state's float32 values come from: its codes (value != nullptr: the map's values,
// the block's absmax) or an array of float32 values.
struct QSrc {
  const float* value;
  const uint8_t* codes;
  float scale;
  const float* src;
};

// 16 (Full) or m < 16 values of state `in` from element i into out.
template <bool Full>
FASTOPTIM_ALWAYS_INLINE void q_load(const QSrc& in, int64_t i, int64_t m, float* __restrict out) {
  if (in.value == nullptr) {
    std::memcpy(out, in.src + i, sizeof(float) * static_cast<std::size_t>(Full ? kQSub : m));
    return;
  }
  if constexpr (Full) {
#if defined(__AVX512F__)
    const __m512i c =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in.codes + i)));
    _mm512_store_ps(out, _mm512_mul_ps(_mm512_i32gather_ps(c, in.value, 4),
                                       _mm512_set1_ps(in.scale)));
#else
    for (int h = 0; h < 2; ++h) {
      const __m256i c = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in.codes + i + 8 * h)));
      _mm256_store_ps(out + 8 * h, _mm256_mul_ps(_mm256_i32gather_ps(in.value, c, 4),
                                                 _mm256_set1_ps(in.scale)));
    }
#endif
  } else {
    for (int64_t j = 0; j < m; ++j) out[j] = in.value[in.codes[i + j]] * in.scale;
  }
}

// The element functor over W (Full) or m elements: states read from src, written to d.
template <class P, class G, bool Stochastic, bool Full, int64_t W = kQSub, class K,
          std::size_t... J, class... S>
FASTOPTIM_ALWAYS_INLINE void q_run(const K& k, typename P::type* __restrict p,
                                   const typename G::type* __restrict g, int64_t m,
                                   uint32_t first, uint32_t key0, const float (*__restrict src)[W],
                                   std::index_sequence<J...>, S* __restrict... d) {
  const int64_t n = Full ? W : m;
FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    float pv = P::load(p[i]);
    std::array<float, sizeof...(J)> v{src[J][i]...};
    k(pv, G::load(g[i]), v);
    Store<P, Stochastic>::put(
        p[i], pv, Stochastic ? P::bits(key0, first + static_cast<uint32_t>(i)) : 0u);
    ((d[i] = v[J]), ...);
  }
}

// n elements: parameter of format P, gradient of format G (as sweep_absmax), states from `in`,
// their new values into d (the states' float32 arrays or scratch blocks).
template <class P, class G, bool Stochastic, class K, std::size_t... J, class... S>
FASTOPTIM_NOINLINE void sweep_qfused(const K k, typename P::type* __restrict p,
                                     const typename G::type* __restrict g, int64_t n,
                                     uint32_t first, uint32_t key0,
                                     [[maybe_unused]] const std::array<QSrc, sizeof...(J)> in,
                                     std::index_sequence<J...> seq, S* __restrict... d) {
  alignas(64) float tmp[sizeof...(J) == 0 ? 1 : sizeof...(J)][kQSub];
  int64_t i = 0;
  for (; i + kQSub <= n; i += kQSub) {
    (q_load<true>(in[J], i, kQSub, tmp[J]), ...);
    q_run<P, G, Stochastic, true>(k, p + i, g + i, kQSub, first + static_cast<uint32_t>(i), key0,
                                  tmp, seq, (d + i)...);
  }
  if (i < n) {
    (q_load<false>(in[J], i, n - i, tmp[J]), ...);
    q_run<P, G, Stochastic, false>(k, p + i, g + i, n - i, first + static_cast<uint32_t>(i),
                                   key0, tmp, seq, (d + i)...);
  }
}
#endif

#if FASTOPTIM_Q_VBMI
// Where the avx512 build finds AVX-512 VBMI: one loop over the block, 64 elements at a time:
// each quantized state's 64 values decoded into a scratch of 64 float32 values (8-bit codes by
// byte permutes, dequantize_vbmi64; 4-bit codes unpacked from their nibbles and looked up by
// vpermps in the 16-value map), the element functor over those 64 (the compiler's vector loop,
// as sweep_qfused's), and the running max of the new values' magnitudes (absmax_bits' order)
// taken from the 64 just stored; the codes follow in a second loop over the block
// (unstage_state).  sweep_quantized runs it where a state is 4-bit (see there).
constexpr int64_t kQVbmi = 64;

// Where one state's values come from: 8-bit codes (q8), 4-bit packed codes (q4; codes and
// absmax at the block's first element: absmax[i / kQBlock4] for element i of the block), or
// float32 values (src).
struct QVSrc {
  const QTables* q8;
  const Q4Tables* q4;
  const uint8_t* codes;
  const float* absmax;
  const float* src;
};

// 64 4-bit codes (32 bytes at `packed`, element 2k in byte k's high nibble) into out: value *
// absmax.
__attribute__((target("avx512vbmi"))) FASTOPTIM_ALWAYS_INLINE void dequantize4_64(
    const uint8_t* __restrict packed, const float* __restrict value, float absmax,
    float* __restrict out) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low), lo = _mm256_and_si256(b, low);
  // 128-bit lane L of unpacklo: elements 32 L .. 32 L + 15; of unpackhi: the next 16
  const __m256i u0 = _mm256_unpacklo_epi8(hi, lo), u1 = _mm256_unpackhi_epi8(hi, lo);
  const __m512 table = _mm512_loadu_ps(value), s = _mm512_set1_ps(absmax);
  const __m128i c[4] = {_mm256_castsi256_si128(u0), _mm256_castsi256_si128(u1),
                        _mm256_extracti128_si256(u0, 1), _mm256_extracti128_si256(u1, 1)};
  for (int h = 0; h < 4; ++h)
    _mm512_storeu_ps(out + 16 * h,
                     _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c[h]), table), s));
}

// 64 values of a state from element i of its block into tmp.  (Functions of their own, not
// lambdas: a lambda would not inherit the target attribute.)
__attribute__((target("avx512vbmi"))) FASTOPTIM_ALWAYS_INLINE void qvbmi_load(
    const QVSrc& in, int64_t i, float* __restrict tmp) {
  if (in.q8 != nullptr)
    dequantize_vbmi64(in.codes + i, *in.q8, _mm512_set1_ps(in.absmax[0]), tmp);
  else if (in.q4 != nullptr)
    dequantize4_64(in.codes + i / 2, in.q4->value, in.absmax[i / kQBlock4], tmp);
  else
    std::memcpy(tmp, in.src + i, sizeof(float) * kQVbmi);
}

// The last r < 64 values of a block, from element i (the gathers' or plain decoding).
inline void qvbmi_load_tail(const QVSrc& in, int64_t i, int64_t r, float* __restrict tmp) {
  if (in.q8 != nullptr)
    dequantize_block(in.codes + i, r, in.absmax[0], *in.q8, tmp);
  else if (in.q4 != nullptr)
    dequantize_block4(in.codes + i / 2, r, in.absmax[i / kQBlock4], *in.q4, tmp);
  else
    std::memcpy(tmp, in.src + i, sizeof(float) * static_cast<std::size_t>(r));
}

// The running max of |v| (as bits, absmax_bits' order) with 64 values at v, and the largest of
// its 16 lanes.  (GCC vector extensions: GCC 12 warns inside _mm512_max_epu32 and the shuffles
// under a target attribute, bug 105593.)
typedef uint32_t QV16u __attribute__((vector_size(64)));
__attribute__((target("avx512vbmi"))) FASTOPTIM_ALWAYS_INLINE QV16u qvbmi_max(
    QV16u m, const float* __restrict v) {
  for (int h = 0; h < 4; ++h) {
    QV16u a;
    std::memcpy(&a, v + 16 * h, sizeof a);
    a &= 0x7FFFFFFFu;
    m = m > a ? m : a;
  }
  return m;
}
inline uint32_t qvbmi_reduce_max(QV16u m) {
  alignas(64) uint32_t lane[16];
  std::memcpy(lane, &m, sizeof lane);
  uint32_t r = 0;
  for (const uint32_t x : lane) r = std::max(r, x);
  return r;
}

// n <= kQBlock elements of one block: parameter of format P, gradient of format G (as
// sweep_absmax), states from `in`, their new values into d; mx[j]: absmax_bits of state j's
// new values (used for 8-bit states; a 4-bit state's two blocks take their own).
template <class P, class G, bool Stochastic, class K, std::size_t... J, class... S>
__attribute__((target("avx512vbmi"))) FASTOPTIM_NOINLINE void sweep_qvbmi(
    const K k, typename P::type* __restrict p, const typename G::type* __restrict g, int64_t n,
    uint32_t first, uint32_t key0, [[maybe_unused]] const std::array<QVSrc, sizeof...(J)> in,
    [[maybe_unused]] uint32_t* __restrict mx, std::index_sequence<J...> seq,
    S* __restrict... d) {
  constexpr std::size_t N = sizeof...(J);
  alignas(64) float tmp[N == 0 ? 1 : N][kQVbmi];
  [[maybe_unused]] QV16u m[N == 0 ? 1 : N];
  for (auto& x : m) x = QV16u{};
  int64_t i = 0;
  for (; i + kQVbmi <= n; i += kQVbmi) {
    (qvbmi_load(in[J], i, tmp[J]), ...);
    q_run<P, G, Stochastic, true, kQVbmi>(k, p + i, g + i, kQVbmi,
                                          first + static_cast<uint32_t>(i), key0, tmp, seq,
                                          (d + i)...);
    ((m[J] = qvbmi_max(m[J], d + i)), ...);
  }
  ((mx[J] = qvbmi_reduce_max(m[J])), ...);
  if (i < n) {  // the last 1..63 elements of a tensor
    const int64_t r = n - i;
    (qvbmi_load_tail(in[J], i, r, tmp[J]), ...);
    q_run<P, G, Stochastic, false, kQVbmi>(k, p + i, g + i, r, first + static_cast<uint32_t>(i),
                                           key0, tmp, seq, (d + i)...);
    ((mx[J] = std::max(mx[J], absmax_bits(d + i, r))), ...);
  }
}
#endif

#if FASTOPTIM_Q_VBMI
// One state's codes for a block, to be written 64 elements at a time inside the next block's
// kernel loop (sweep_absmax_codes): the block's new values src (kQBlock of them), times inv,
// into codes.  src == nullptr: nothing left to do (a non-finite block or one whose 1 / absmax
// overflows: quantized at once by quantize_block).
struct QJob {
  const float* src;
  float inv;
  const QTables* q;
  uint8_t* codes;
  bool search;  // q_codes_vbmi64
};
inline QJob codes_job(const float* s, int64_t n, uint32_t mb, const QTables& q, uint8_t* codes,
                      float* absmax) {
  const QScale sc = q_scale(mb < 0x7F800000u ? mb : 0u);
  if (mb >= 0x7F800000u || sc.divide || n != kQBlock) {
    *absmax = quantize_block(s, n, mb, q, codes, q_search_on());
    return {nullptr, 0.0f, nullptr, nullptr, false};
  }
  *absmax = sc.absmax;
  return {s, sc.inv, &q, codes, q.searchable && q_search_on()};
}
// The codes of job jb's 64 values from i: without gathers where the map is searchable
// (q_codes_vbmi64; unless FASTOPT_QUANT_SEARCH=0), else 16 at a time by q_code16.
__attribute__((target("avx512vbmi"))) FASTOPTIM_ALWAYS_INLINE void codes64(const QJob& jb,
                                                                             int64_t i) {
  if (jb.src == nullptr) return;
  const __m512 vinv = _mm512_set1_ps(jb.inv);
  if (jb.search) {
    q_codes_vbmi64(jb.src + i, vinv, *jb.q, jb.codes + i);
    return;
  }
  for (int64_t h = i; h < i + kQVbmi; h += 16) {
    const __m512i code = q_code16(
        _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(jb.src + h), vinv)), jb.q->bucket);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(jb.codes + h), _mm512_cvtepi32_epi8(code));
  }
}

// sweep_absmax over one full block (nearest rounding), 64 elements at a time, each 64 followed
// by the previous block's codes for the same 64 positions (job): the codes' gathers (bound by
// loads) overlap the kernel's square roots and divisions (bound by the divider).  mx[j]:
// absmax_bits of state j's new values (sweep_qvbmi's running max).
template <class P, class G, class K, std::size_t... J, class... S>
__attribute__((target("avx512vbmi"))) FASTOPTIM_NOINLINE void sweep_absmax_codes(
    const K k, typename P::type* __restrict p, const typename G::type* __restrict g,
    uint32_t* __restrict mx, [[maybe_unused]] const std::array<QJob, sizeof...(J)> job,
    std::index_sequence<J...>, S* __restrict... s) {
  constexpr std::size_t N = sizeof...(J);
  [[maybe_unused]] QV16u m[N == 0 ? 1 : N];
  for (auto& x : m) x = QV16u{};
  for (int64_t i = 0; i < kQBlock; i += kQVbmi) {
FASTOPTIM_VECTORIZE
    for (int64_t j = i; j < i + kQVbmi; ++j) {
      float pv = P::load(p[j]);
      std::array<float, N> v{s[j]...};
      k(pv, G::load(g[j]), v);
      Store<P, false>::put(p[j], pv, 0u);
      ((s[j] = v[J]), ...);
    }
    ((m[J] = qvbmi_max(m[J], s + i)), ...);
    (codes64(job[J], i), ...);
  }
  ((mx[J] = qvbmi_reduce_max(m[J])), ...);
}
#endif

#if FASTOPTIM_Q_VBMI
// Whether sweep_quantized pipelines the blocks of t (QPipeline): AVX-512 VBMI, at least one
// state and every state 8-bit (4-bit ones take sweep_qvbmi), nearest codes, and a layout
// converted in registers (`direct`: float32 or bfloat16 parameter and gradient of one dtype,
// no Kahan compensation, no copy).
template <std::size_t... J>
bool q_pipelined(const Tensor& t, bool stochastic, int direct, std::index_sequence<J...>) {
  return q_vbmi() && sizeof...(J) > 0 && direct != 0 && !stochastic &&
         ((is_quantized(t.state_dtype[J]) && !is_q4(t.state_dtype[J])) && ...);
}

// The three state buffers of sweep_quantized's pipeline and what is pending between blocks: a
// block's states decoded into cur (`ready`: already done, after the previous block's kernel),
// its kernel loop also writing the previous block's codes from prv (`pending`: block plo of pn
// elements, absmax bits pmx; sweep_absmax_codes), then the next block decoded into nxt.
template <std::size_t N> struct QPipeline {
  static constexpr std::size_t M = N == 0 ? 1 : N;
  alignas(64) float spare[2][M][kQBlock];
  float (*cur)[kQBlock];
  float (*nxt)[kQBlock] = spare[0];
  float (*prv)[kQBlock] = spare[1];
  bool ready = false, pending = false;
  int64_t plo = 0, pn = 0;
  uint32_t pmx[M] = {};

  explicit QPipeline(float (*first)[kQBlock]) : cur(first) {}
  QPipeline(const QPipeline&) = delete;
  QPipeline& operator=(const QPipeline&) = delete;

  // Block lo (n elements, absmax bits mx) is done but its codes are not written, and nxt holds
  // the next block's states: they become pending, and the buffers rotate.
  void advance(int64_t lo, int64_t n, const uint32_t* mx) {
    pending = true;
    plo = lo;
    pn = n;
    std::copy(mx, mx + N, pmx);
    float(*const done)[kQBlock] = prv;
    prv = cur;
    cur = nxt;
    nxt = done;
  }
};
#endif

template <class K, std::size_t... J>
void sweep_quantized(const K& k, const Tensor& t, int64_t a, int64_t b, const RoundingKey& key,
                     std::index_sequence<J...> seq) {
  constexpr std::size_t N = sizeof...(J);
  alignas(64) float buf_p[kQBlock], buf_old[kQBlock], buf_g[kQBlock];
  [[maybe_unused]] alignas(64) float buf_s[N == 0 ? 1 : N][kQBlock];
  [[maybe_unused]] const QTables* q[N == 0 ? 1 : N] = {
      (is_quantized(t.state_dtype[J]) ? &qtables(qmap_of(t.state_dtype[J])) : nullptr)...};
  // The layouts converted in registers (0: none of them).
  const bool plain = t.comp == nullptr && t.out == nullptr && t.grad_dtype == t.dtype;
  const int direct = !plain ? 0 : (t.dtype == DType::f32 ? 1 : (t.dtype == DType::bf16 ? 2 : 0));
  const bool sr = key.plan.rounding == Rounding::stochastic;
  [[maybe_unused]] const bool q4 = (is_q4(t.state_dtype[J]) || ... || false);
#if FASTOPTIM_Q_VBMI
  // With AVX-512 VBMI, every state 8-bit, nearest codes and a layout converted in registers:
  // the blocks are pipelined over three buffers (QPipeline), the first being buf_s.
  const bool pipe = q_pipelined(t, sr, direct, seq);
  QPipeline<N> pl(buf_s);
#endif
  for (int64_t lo = block_start(a, kQBlock); lo < b; lo += kQBlock) {
    const int64_t n = std::min(kQBlock, t.size - lo);
    const auto first = static_cast<uint32_t>(lo);
    uint32_t mx[N == 0 ? 1 : N];
#if FASTOPTIM_Q_VBMI
    // (Only with a 4-bit state: with 8-bit states only, the fused loop measured 3-5% slower
    // than the three loops below, AdamW, 1 thread, 65,536 elements; with 4-bit states faster
    // than staging them: 3% (float32 p/g) and 0% (bfloat16) there, about 13% at 2 threads,
    // 16M elements.)
    if (direct != 0 && q4 && kAvx512Vbmi) {
      float* s[N == 0 ? 1 : N] = {(is_quantized(t.state_dtype[J])
                                       ? buf_s[J]
                                       : staged(t.state[J], t.state_dtype[J], lo, n, buf_s[J]))...};
      const std::array<QVSrc, N> in = {QVSrc{
          is_q4(t.state_dtype[J]) ? nullptr : q[J],
          is_q4(t.state_dtype[J]) ? &q4tables(qmap_of(t.state_dtype[J])) : nullptr,
          static_cast<const uint8_t*>(t.state[J]) + (is_q4(t.state_dtype[J]) ? lo / 2 : lo),
          is_quantized(t.state_dtype[J])
              ? t.absmax[J] + lo / (is_q4(t.state_dtype[J]) ? kQBlock4 : kQBlock)
              : nullptr,
          s[J]}...};
      if (direct == 1) {
        sweep_qvbmi<F32, F32, false>(k, static_cast<float*>(t.param) + lo,
                                     static_cast<const float*>(t.grad) + lo, n, first, 0u, in,
                                     mx, seq, s[J]...);
      } else {
        uint16_t* p = static_cast<uint16_t*>(t.param) + lo;
        const uint16_t* g = static_cast<const uint16_t*>(t.grad) + lo;
        if (sr)
          sweep_qvbmi<BF16, BF16, true>(k, p, g, n, first, key(t, 0, lo), in, mx, seq, s[J]...);
        else
          sweep_qvbmi<BF16, BF16, false>(k, p, g, n, first, 0u, in, mx, seq, s[J]...);
      }
      (unstage_state(s[J], mx[J], t, J, q[J], lo, n, key), ...);
      continue;
    }
#endif
#ifdef FASTOPTIM_Q_FUSED
    if (direct != 0 && !q4 && !q_vbmi()) {  // (the fused loads read 8-bit codes: 4-bit states
                                           // are staged; VBMI decodes by permutes)
      float* s[N == 0 ? 1 : N] = {
          (q[J] ? buf_s[J] : staged(t.state[J], t.state_dtype[J], lo, n, buf_s[J]))...};
      const std::array<QSrc, N> in = {QSrc{
          q[J] ? q[J]->value : nullptr, static_cast<const uint8_t*>(t.state[J]) + lo,
          q[J] ? t.absmax[J][lo / kQBlock] : 0.0f, s[J]}...};
      if (direct == 1) {
        sweep_qfused<F32, F32, false>(k, static_cast<float*>(t.param) + lo,
                                      static_cast<const float*>(t.grad) + lo, n, first, 0u, in,
                                      seq, s[J]...);
      } else {
        uint16_t* p = static_cast<uint16_t*>(t.param) + lo;
        const uint16_t* g = static_cast<const uint16_t*>(t.grad) + lo;
        if (sr)
          sweep_qfused<BF16, BF16, true>(k, p, g, n, first, key(t, 0, lo), in, seq, s[J]...);
        else
          sweep_qfused<BF16, BF16, false>(k, p, g, n, first, 0u, in, seq, s[J]...);
      }
      ((mx[J] = q[J] ? absmax_bits(s[J], n) : 0u), ...);
      (unstage_state(s[J], mx[J], t, J, q[J], lo, n, key), ...);
      continue;
    }
#endif
#if FASTOPTIM_Q_VBMI
    if (pipe) {
      if (!pl.ready)
        (dequantize_vbmi(static_cast<const uint8_t*>(t.state[J]) + lo, n,
                         t.absmax[J][lo / kQBlock], *q[J], pl.cur[J]),
         ...);
      if (pl.pending && n == kQBlock) {  // the previous block's codes in this block's kernel loop
        const std::array<QJob, N> jobs = {
            codes_job(pl.prv[J], pl.pn, pl.pmx[J], *q[J],
                      static_cast<uint8_t*>(t.state[J]) + pl.plo,
                      &t.absmax[J][pl.plo / kQBlock])...};
        if (direct == 1)
          sweep_absmax_codes<F32, F32>(k, static_cast<float*>(t.param) + lo,
                                       static_cast<const float*>(t.grad) + lo, mx, jobs, seq,
                                       pl.cur[J]...);
        else
          sweep_absmax_codes<BF16, BF16>(k, static_cast<uint16_t*>(t.param) + lo,
                                         static_cast<const uint16_t*>(t.grad) + lo, mx, jobs,
                                         seq, pl.cur[J]...);
      } else {
        if (pl.pending)
          (unstage_state(pl.prv[J], pl.pmx[J], t, J, q[J], pl.plo, pl.pn, key), ...);
        if (direct == 1)
          sweep_absmax<F32, F32, false>(k, static_cast<float*>(t.param) + lo,
                                        static_cast<const float*>(t.grad) + lo, n, first, 0u, mx,
                                        seq, pl.cur[J]...);
        else
          sweep_absmax<BF16, BF16, false>(k, static_cast<uint16_t*>(t.param) + lo,
                                          static_cast<const uint16_t*>(t.grad) + lo, n, first, 0u,
                                          mx, seq, pl.cur[J]...);
      }
      pl.pending = false;
      const int64_t next = lo + kQBlock;
      pl.ready = next < b && t.size - next >= kQBlock;  // (then this block is full too)
      if (pl.ready) {
        (dequantize_vbmi(static_cast<const uint8_t*>(t.state[J]) + next, n,  // (n == kQBlock)
                         t.absmax[J][next / kQBlock], *q[J], pl.nxt[J]),
         ...);
        pl.advance(lo, n, mx);  // this block's codes: in the next block's kernel loop
      } else {
        (unstage_state(pl.cur[J], mx[J], t, J, q[J], lo, n, key), ...);
      }
      continue;
    }
#endif
    float* s[N == 0 ? 1 : N] = {staged_state(t, J, q[J], lo, n, buf_s[J])...};
    if (direct == 1) {
      sweep_absmax<F32, F32, false>(k, static_cast<float*>(t.param) + lo,
                                    static_cast<const float*>(t.grad) + lo, n, first, 0u, mx, seq,
                                    s[J]...);
    } else if (direct == 2) {
      uint16_t* p = static_cast<uint16_t*>(t.param) + lo;
      const uint16_t* g = static_cast<const uint16_t*>(t.grad) + lo;
      if (sr)
        sweep_absmax<BF16, BF16, true>(k, p, g, n, first, key(t, 0, lo), mx, seq, s[J]...);
      else
        sweep_absmax<BF16, BF16, false>(k, p, g, n, first, 0u, mx, seq, s[J]...);
    } else {
      float* p = staged(t.param, t.dtype, lo, n, buf_p);
      const float* g = staged(t.grad, t.grad_dtype, lo, n, buf_g);
      if (t.comp) std::copy(p, p + n, buf_old);
      sweep_absmax<F32, F32, false>(k, p, g, n, first, 0u, mx, seq, s[J]...);
      if (t.comp) {
        uint16_t* param = static_cast<uint16_t*>(t.param) + lo;
        uint16_t* comp = static_cast<uint16_t*>(t.comp) + lo;
        t.dtype == DType::bf16 ? store_kahan<BF16>(p, buf_old, n, param, comp)
                               : store_kahan<F16>(p, buf_old, n, param, comp);
      } else {
        unstage(p, t.param, t.dtype, lo, n, t, 0, key);
      }
      if (t.out) unstage(p, t.out, t.out_dtype, lo, n, t, 0, key);
    }
    (unstage_state(s[J], mx[J], t, J, q[J], lo, n, key), ...);
  }
}

// ------------------------------------------------------------------ fused layouts
// The common mixed-precision layouts run fused: the conversions happen in registers inside the
// element loop (no float32 copies through L1, whose store bandwidth limits the converting path),
// with the very same element functor and rounding functions, so results are identical.  A
// small closed set over one 16-bit format H, bfloat16 or float16 (chosen per tensor at run
// time, see Tensor::classify): everything else converts block by block (sweep_converting).

template <class F> constexpr bool kIs16 = !std::is_same_v<F, F32>;

// One fused sweep of n elements from element `first` of their tensor: parameter of format P
// (updated in place), gradient of format G (H), states of format S, and an H copy of the
// parameter when Out.  Stochastic: random bits per array (0: parameter and copy; 1 + j: state
// j) from `keys`.  The loop leaves the float32 results bound for H in L1 (kSub elements at a
// time) and store_nearest<H> rounds them (fewer instructions than rounding in the loop, and
// AVX-512 BF16 or F16C where the CPU has them); so does store_stochastic<BF16> in the avx512
// and avx2 builds (kStagedStochastic: a group of 32 takes one 16-lane or two 8-lane hashes,
// adds and a permutation or packs there; in the avx512 build store_stochastic_many rounds a
// block's whole groups for all the layout's bfloat16 arrays in one pass, kStagedMany), while
// the scalar build rounds bfloat16 stochastically in the element loop.  (Stochastic float16 runs the converting path:
// sweep_fused_layout.)
//
// Loads: bfloat16 and float32 are converted by the element loop itself (a shift the compiler
// vectorizes with the kernel).  float16 in the avx2/avx512 builds (F16C) is converted kGroup
// elements at a time by vcvtph2ps straight from memory (it gives f16_load's bits on every
// value, NaN included: no check), and the element functor runs on those registers in the
// compiler's vector loop inlined right after (fused_group; its local arrays are not kept in
// memory); the last m % kGroup elements of a block, and every float16 element of the scalar
// build, are loaded by f16_load in the element loop.
//
// Not inlined: compiled on its own, the loop vectorizes whatever the caller (GCC 12 failed to
// if-convert some of these loops once inlined into the parallel driver's lambdas).
constexpr int64_t kSub = 128;

#if defined(_MSC_VER) && !defined(__clang__)
#define FASTOPTIM_GROUP_INLINE __forceinline
#else
#define FASTOPTIM_GROUP_INLINE inline __attribute__((always_inline))
#endif

// The element functor over elements [at, at + n) of a block: P, G and S loaded in the loop.
template <class P, class G, class S, class K, std::size_t... J, class... SP>
FASTOPTIM_GROUP_INLINE void fused_elements(const K& k, typename P::type* __restrict p,
                                           const typename G::type* __restrict g, int64_t at,
                                           int64_t n, float* __restrict bp,
                                           float (*__restrict bs)[kSub], std::index_sequence<J...>,
                                           SP* __restrict... s) {
FASTOPTIM_VECTORIZE
  for (int64_t i = at; i < at + n; ++i) {
    float pv = P::load(p[i]);
    std::array<float, sizeof...(J)> v{S::load(s[i])...};
    k(pv, G::load(g[i]), v);
    if constexpr (kIs16<P>)
      bp[i] = pv;
    else
      p[i] = pv;
    if constexpr (kIs16<S>)
      ((bs[J][i] = v[J]), ...);
    else
      ((s[i] = v[J]), ...);
  }
  (void)bp;
  (void)bs;
}

#if FASTOPTIM_F16C
constexpr int64_t kGroup = 16;
template <class P, class G, class S>
constexpr bool kGrouped =
    std::is_same_v<P, F16> || std::is_same_v<G, F16> || std::is_same_v<S, F16>;

// kGroup float16 values converted with F16C into `out` (one vcvtph2ps for 16 in the avx512
// build, two for 8 in avx2): f16_load's bits, NaN and Inf included.
FASTOPTIM_GROUP_INLINE void f16_group(const uint16_t* s, float* out) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  _mm512_store_ps(out, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))));
#else
  _mm256_store_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))));
  _mm256_store_ps(out + 8,
                  _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8))));
#endif
}

// The element functor over the kGroup elements [at, at + kGroup) of a block, its float16
// inputs converted first (float32 ones read in the loop; the local arrays of converted values
// stay in registers: the compiler's vector loop reads them back whole).
template <class P, class G, class S, class K, std::size_t... J, class... SP>
FASTOPTIM_GROUP_INLINE void fused_group(const K& k, typename P::type* __restrict p,
                                        const typename G::type* __restrict g, int64_t at,
                                        float* __restrict bp, float (*__restrict bs)[kSub],
                                        std::index_sequence<J...>, SP* __restrict... s) {
  constexpr std::size_t N = sizeof...(J);
  alignas(64) float tp[kIs16<P> ? kGroup : 1], tg[kIs16<G> ? kGroup : 1];
  alignas(64) float ts[kIs16<S> && N != 0 ? N : 1][kIs16<S> ? kGroup : 1];
  static_assert(!std::is_same_v<P, BF16> && !std::is_same_v<S, BF16>, "one 16-bit format");
  if constexpr (kIs16<P>) f16_group(p + at, tp);
  if constexpr (kIs16<G>) f16_group(g + at, tg);
  if constexpr (kIs16<S>) (f16_group(s + at, ts[J]), ...);
FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < kGroup; ++i) {
    float pv;
    if constexpr (kIs16<P>)
      pv = tp[i];
    else
      pv = p[at + i];
    float gv;
    if constexpr (kIs16<G>)
      gv = tg[i];
    else
      gv = g[at + i];
    std::array<float, N> v;
    if constexpr (kIs16<S>)
      ((v[J] = ts[J][i]), ...);
    else
      ((v[J] = s[at + i]), ...);
    k(pv, gv, v);
    if constexpr (kIs16<P>)
      bp[at + i] = pv;
    else
      p[at + i] = pv;
    if constexpr (kIs16<S>)
      ((bs[J][at + i] = v[J]), ...);
    else
      ((s[at + i] = v[J]), ...);
  }
  (void)tp;
  (void)tg;
  (void)ts;
  (void)bp;
  (void)bs;
}
#endif

// Software prefetch of one 16-bit array kAhead elements (four blocks) ahead: a hint, no effect
// on results, issued where every array is 16-bit (all-bf16, all-fp16).  Measured on the
// development VM (1 thread, 16M elements, AdamW): all-fp16 0.74-0.82 -> 0.57 ns/el and all-bf16
// 0.64-0.66 -> 0.55 out of cache (in cache 0.53 and 0.52: the hardware prefetchers alone did
// not keep the four 16-bit streams ahead); with float32 state it made bf16/fp16 p/g 4-5%
// slower, so those layouts go without.
constexpr int64_t kAhead = 4 * kSub;
FASTOPTIM_GROUP_INLINE void prefetch_ahead(const uint16_t* x, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  // (integer arithmetic: the address may lie past the array's end, where a prefetch is harmless)
  const auto at = reinterpret_cast<std::uintptr_t>(x) + static_cast<std::uintptr_t>(kAhead * 2);
  for (int64_t i = 0; i < n * 2; i += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(at + static_cast<std::uintptr_t>(i)), 0, 3);
#endif
  (void)x;
  (void)n;
}

// The element functor over the n <= kSub elements of one block.
template <class P, class G, class S, class K, std::size_t... J, class... SP>
inline void fused_block(const K& k, typename P::type* __restrict p,
                        const typename G::type* __restrict g, int64_t n, float* __restrict bp,
                        float (*__restrict bs)[kSub], std::index_sequence<J...> seq,
                        SP* __restrict... s) {
  if constexpr (kIs16<P> && kIs16<S>) {
    prefetch_ahead(p, n);
    prefetch_ahead(g, n);
    (prefetch_ahead(s, n), ...);
  }
#if FASTOPTIM_F16C
  if constexpr (kGrouped<P, G, S>) {
    int64_t i = 0;
    for (; i + kGroup <= n; i += kGroup) fused_group<P, G, S>(k, p, g, i, bp, bs, seq, s...);
    if (i < n) fused_elements<P, G, S>(k, p, g, i, n - i, bp, bs, seq, s...);
    return;
  }
#endif
  fused_elements<P, G, S>(k, p, g, 0, n, bp, bs, seq, s...);
}

template <class P, class G, class S, bool Out, bool Stochastic, class K, std::size_t... J,
          class... SP>
FASTOPTIM_NOINLINE void sweep_fused(const K k, typename P::type* __restrict p,
                                    const typename G::type* __restrict g,
                                    uint16_t* __restrict out, int64_t n, uint32_t first,
                                    const std::array<uint32_t, sizeof...(J) + 1> keys,
                                    std::index_sequence<J...>, SP* __restrict... s) {
  using H = G;  // the layout's 16-bit format
  if constexpr (!Stochastic || kStagedStochastic) {
    constexpr std::size_t N = sizeof...(J);
    alignas(64) float bp[kIs16<P> ? kSub : 1];
    alignas(64) float bs[kIs16<S> ? N : 1][kSub];
    // float32 -> H of m values from element lo, with the bits of stream `key`
    const auto put = [&](const float* src, int64_t m, uint16_t* dst, uint32_t key, int64_t lo) {
      if constexpr (Stochastic)
        store_stochastic<H>(src, m, dst, key, first + static_cast<uint32_t>(lo));
      else
        store_nearest<H>(src, m, dst);
      (void)key;
      (void)lo;
    };
    // (stochastic: blocks from multiples of 32 of the tensor, store_stochastic's hash groups)
    const auto skew = static_cast<int64_t>(Stochastic ? first & 31u : 0u);
    for (int64_t lo = 0, m = 0; lo < n; lo += m) {
      m = std::min(lo == 0 ? kSub - skew : kSub, n - lo);
      fused_block<P, G, S>(k, p + lo, g + lo, m, bp, bs, std::index_sequence<J...>{}, (s + lo)...);
      constexpr std::size_t A = (kIs16<P> ? 1 : 0) + (kIs16<S> ? N : 0) + (Out ? 1 : 0);
      if constexpr (Stochastic && kStagedMany && std::is_same_v<H, BF16> && A != 0) {
        // whole groups of 32 (every block but a sweep's first and last, mostly): all arrays
        // in one pass
        if (m % 32 == 0 && ((first + static_cast<uint32_t>(lo)) & 31u) == 0) {
          std::array<const float*, A> src{};
          std::array<uint16_t*, A> dst{};
          std::array<uint32_t, A> key{};
          std::size_t a = 0;
          const auto add = [&](const float* from, uint16_t* to, uint32_t kk) {
            src[a] = from, dst[a] = to, key[a] = kk, ++a;
          };
          if constexpr (kIs16<P>) add(bp, p + lo, keys[0]);
          if constexpr (kIs16<S>) (add(bs[J], s + lo, keys[1 + J]), ...);
          if constexpr (Out) add(p + lo, out + lo, keys[0]);  // P is F32
          store_stochastic_many<A>(src, dst, key, m, first + static_cast<uint32_t>(lo));
          continue;
        }
      }
      if constexpr (kIs16<P>) put(bp, m, p + lo, keys[0], lo);
      if constexpr (kIs16<S>) (put(bs[J], m, s + lo, keys[1 + J], lo), ...);
      if constexpr (Out) put(p + lo, m, out + lo, keys[0], lo);  // P is F32
    }
    (void)first;
    (void)keys;
    (void)put;
  } else {
    static_assert(std::is_same_v<H, BF16>, "stochastic float16 runs the converting path");
FASTOPTIM_VECTORIZE
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t index = first + static_cast<uint32_t>(i);
      float pv = P::load(p[i]);
      std::array<float, sizeof...(J)> v{S::load(s[i])...};
      k(pv, G::load(g[i]), v);
      const uint32_t r0 = BF16::bits(keys[0], index);  // the parameter and/or its copy
      Store<P, true>::put(p[i], pv, r0);
      ((Store<S, true>::put(s[i], v[J], S::bits(keys[1 + J], index))), ...);
      if constexpr (Out) Store<BF16, true>::put(out[i], pv, r0);
    }
  }
}

template <class P, class G, class S, bool Out, bool Stochastic, class K, std::size_t... J>
void run_fused(const K& k, const Tensor& t, int64_t a, int64_t b, const RoundingKey& key,
               std::index_sequence<J...> seq) {
  for (int64_t lo = a; lo < b;) {
    const int64_t wrap = (lo | int64_t{0xFFFFFFFF}) + 1;  // the random bits' 2^32 blocks
    const int64_t n = std::min(b - lo, wrap - lo);
    std::array<uint32_t, sizeof...(J) + 1> keys{};
    if (Stochastic)
      for (uint32_t j = 0; j < keys.size(); ++j) keys[j] = key(t, j, lo);
    sweep_fused<P, G, S, Out, Stochastic>(
        k, static_cast<typename P::type*>(t.param) + lo, static_cast<const uint16_t*>(t.grad) + lo,
        Out ? static_cast<uint16_t*>(t.out) + lo : nullptr, n, static_cast<uint32_t>(lo), keys,
        seq, (static_cast<typename S::type*>(t.state[J]) + lo)...);
    lo += n;
  }
}

// The fused layouts of 16-bit format H.
template <class H, bool Stochastic, class K, class Seq>
void run_fused_layout(const K& k, const Tensor& t, int64_t a, int64_t b, const RoundingKey& key,
                      Seq seq) {
  switch (t.path) {
    case Tensor::kFused16Params:
      run_fused<H, H, F32, false, Stochastic>(k, t, a, b, key, seq);
      break;
    case Tensor::kFusedAll16:
      run_fused<H, H, H, false, Stochastic>(k, t, a, b, key, seq);
      break;
    default:
      run_fused<F32, H, F32, true, Stochastic>(k, t, a, b, key, seq);
      break;
  }
}

// The fused path of tensor t's elements [a, b) (t.path is one of the kFused paths; the
// gradient's dtype is H).  Stochastic rounding to float16 stays on the converting path.
template <class K, class Seq>
void sweep_fused_layout(const K& k, const Tensor& t, int64_t a, int64_t b, const RoundingKey& key,
                        Seq seq) {
  const bool sr = key.plan.rounding == Rounding::stochastic;
  if (t.grad_dtype == DType::bf16)
    sr ? run_fused_layout<BF16, true>(k, t, a, b, key, seq)
       : run_fused_layout<BF16, false>(k, t, a, b, key, seq);
  else if (sr)
    sweep_converting(k, t, a, b, key, seq);
  else
    run_fused_layout<F16, false>(k, t, a, b, key, seq);
}

// The element functor the driver runs: the optimizer's kernel, fed the transformed gradient
// clamp(g * mul, -clip, clip) (the plan's loss scaling and clipping; with the identity,
// mul = 1 and clip = inf, exactly g: NaN and infinities included).
template <class K, class T> struct Transformed {
  static constexpr bool kWritesState = writes_state<K>::value;
  K k;
  T mul, clip;
  template <class S> void operator()(T& p, T g, S& s) const {
    T x = g * mul;
    x = x < -clip ? -clip : x;
    x = x > clip ? clip : x;
    k(p, x, s);
  }
};

// The random-bit stream of an EMA's stochastic rounding (0: parameter, 1 + j: state j).
constexpr uint32_t kEmaStream = 1 + kMaxState;
// Elements updated before their EMA: the parameter values are still in L1/L2 when read again.
constexpr int64_t kEmaBlock = 4096;

// ema = lerp(ema, p, 1 - decay) for elements [lo, hi) of tensor t, after their update.
inline void ema_update(const Tensor& t, int64_t lo, int64_t hi, double decay,
                       const RoundingKey& key) {
  if (t.dtype == DType::f64) {
    const double* __restrict p = static_cast<const double*>(t.param);
    double* __restrict e = static_cast<double*>(t.ema);
    const double w = 1.0 - decay;
    FASTOPTIM_VECTORIZE
    for (int64_t i = lo; i < hi; ++i) e[i] = lerp(e[i], p[i], w);
    return;
  }
  const auto w = static_cast<float>(1.0 - decay);
  alignas(64) float bp[kBlock], be[kBlock];
  for (int64_t a = lo; a < hi;) {
    const int64_t wrap = (a | int64_t{0xFFFFFFFF}) + 1;
    const int64_t n = std::min({kBlock, hi - a, wrap - a});
    const float* __restrict p = staged(t.param, t.dtype, a, n, bp);
    float* __restrict e = staged(t.ema, t.ema_dtype, a, n, be);
    FASTOPTIM_VECTORIZE
    for (int64_t i = 0; i < n; ++i) e[i] = lerp(e[i], p[i], w);
    unstage(e, t.ema, t.ema_dtype, a, n, t, kEmaStream, key);
    a += n;
  }
}

// The element-wise pass of a step: every element of the plan through the optimizer's kernel, with
// the coefficients *coeffs_of(tensor) (the step's, or a two-pass optimizer's per-tensor ones);
// a tensor whose coeffs_of is null is left alone.
template <class Opt, unsigned V, class CoeffsOf>
void run_update(const Plan& plan, const CoeffsOf& coeffs_of, int64_t step, int threads) {
  using KF = Transformed<Kernel<Opt, float, V>, float>;
  using KD = Transformed<Kernel<Opt, double, V>, double>;
  const RoundingKey key{plan, step};
  constexpr auto states = std::make_index_sequence<Opt::nstate(V)>{};
  const auto update = [&](const Tensor& t, int64_t a, int64_t b) {
    const typename Opt::Coeffs& c = *coeffs_of(t);
    const KF kf{{c}, static_cast<float>(plan.grad_mul), static_cast<float>(plan.grad_clip)};
    const KD kd{{c}, plan.grad_mul, plan.grad_clip};
    if (t.path == Tensor::kConverting)
      sweep_converting(kf, t, a, b, key, states);
    else if (t.path == Tensor::kQuantized)  // (the blocks that start in [a, b), whole)
      sweep_quantized(kf, t, a, b, key, states);
    else if (t.path != Tensor::kDirect)
      sweep_fused_layout(kf, t, a, b, key, states);
    else if (t.dtype == DType::f32)
      sweep_tensor<KF, float>(kf, t, a, b, states);
    else
      sweep_tensor<KD, double>(kd, t, a, b, states);
  };
  parallel_ranges(plan.total(), threads, [&](int64_t lo, int64_t hi) {
    for_range(plan, lo, hi, [&](const Tensor& t, int64_t a, int64_t b) {
      if (coeffs_of(t) == nullptr) return;
      if (t.ema == nullptr) return update(t, a, b);
      for (int64_t x = a; x < b; x += kEmaBlock) {
        const int64_t y = std::min(b, x + kEmaBlock);
        update(t, x, y);
        if (t.path == Tensor::kQuantized) {  // it updated the blocks that start in [x, y)
          const auto up = [&](int64_t i) { return std::min(t.size, block_start(i, kQBlock)); };
          ema_update(t, up(x), up(y), plan.ema_decay, key);
        } else {
          ema_update(t, x, y, plan.ema_decay, key);
        }
      }
    });
  });
}

}  // namespace


// ------------------------------------------------------------------ sparse row updates
#if defined(__GNUC__) || defined(__clang__)
#define FASTOPTIM_PREFETCH(p) __builtin_prefetch((p), 1, 3)
#else
#define FASTOPTIM_PREFETCH(p) ((void)(p))
#endif
namespace {
template <class Opt, unsigned V, class T, std::size_t... J>
void rows_typed(const Rows& r, const typename Opt::Coeffs& c, int threads,
                std::index_sequence<J...>) {
  const Kernel<Opt, T, V> k{c};
  T* const param = static_cast<T*>(r.param);
  const T* const rows = static_cast<const T*>(r.rows);
  const int64_t w = r.width;
  // Rows are scattered: the hardware prefetchers do not know the next one.  Ask for the first
  // lines of the parameter's and the state's row kRowsAhead rows ahead (a hint: no value
  // changes); long rows stream on their own once started.
  constexpr int64_t kRowsAhead = 8;
  const int64_t ahead_bytes = std::min<int64_t>(w * static_cast<int64_t>(sizeof(T)), 512);
  const auto prefetch = [&](int64_t i) {
    const int64_t at = r.index[i] * w;
    for (int64_t b = 0; b < ahead_bytes; b += 64) {
      FASTOPTIM_PREFETCH(reinterpret_cast<const char*>(param + at) + b);
      (FASTOPTIM_PREFETCH(reinterpret_cast<const char*>(static_cast<T*>(r.state[J]) + at) + b),
       ...);
    }
  };
  const auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < std::min(hi, lo + kRowsAhead); ++i) prefetch(i);
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kRowsAhead < hi) prefetch(i + kRowsAhead);
      const int64_t at = r.index[i] * w;
      sweep(k, param + at, rows + i * w, w, (static_cast<T*>(r.state[J]) + at)...);
    }
  };
  // whole rows per chunk, about chunk_elements() elements each (independent of the threads)
  const int64_t per = std::max<int64_t>(1, chunk_elements(r.k * w) / std::max<int64_t>(1, w));
  for_each_range(r.k, per, threads, body);
}

template <class Opt, unsigned... V>
void rows_dispatch(std::integer_sequence<unsigned, V...>, unsigned v, const Rows& r,
                   const typename Opt::Coeffs& c, int threads) {
  const auto one = [&](auto tag) {
    constexpr unsigned W = decltype(tag)::value;
    constexpr auto s = std::make_index_sequence<Opt::nstate(W)>{};
    if (r.dtype == DType::f64)
      rows_typed<Opt, W, double>(r, c, threads, s);
    else
      rows_typed<Opt, W, float>(r, c, threads, s);
  };
  ((v == V ? one(std::integral_constant<unsigned, V>{}) : void()), ...);
}
}  // namespace

template <class Opt>
void step_rows(const Rows& r, const typename Opt::Hyper& h, int64_t step, int threads) {
  const typename Opt::Coeffs c = Opt::prepare(h, step);
  rows_dispatch<Opt>(std::make_integer_sequence<unsigned, Opt::kVariants>{}, Opt::variant(h), r, c,
                     threads);
}

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step_rows<Opt>(const Rows&, const Opt::Hyper&, int64_t, int);
FASTOPTIM_ROW_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

// ------------------------------------------------------------------ gradient statistics
// grad_stats (plan.hpp's GradStats): 32 float64 lanes per chunk, lane j taking the elements
// j, j + 32, ... of each tensor's piece of the chunk; every square exact (a float32 squared fits
// a float64), each lane's sum in element order, lanes and then chunks added in order.
constexpr int kLanes = 32;
struct Lanes {
  std::array<double, kLanes> sq{};
  std::array<float, kLanes> bad{};  // sums of g * 0: NaN once any g is infinite or NaN
};

// GCC/Clang vector types: 16 float32 or 8 float64 lanes, lowered to whatever the ISA has
// (the per-lane arithmetic, hence the result, is the same on every ISA).  No helper functions
// take or return them: GCC warns that their ABI depends on the ISA, which does not matter inside
// one translation unit but fails the -Werror build.
typedef float V16f __attribute__((vector_size(64)));
typedef double V8d __attribute__((vector_size(64)));
typedef int32_t V16i __attribute__((vector_size(64)));
#define FASTOPTIM_LOW8(x) \
  __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), V8d)
#define FASTOPTIM_HIGH8(x) \
  __builtin_convertvector(__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15), V8d)

// n elements (a whole number of lanes' blocks) of float32 values into the lanes: lane j takes
// the elements j, j + 32, ...  Each lane squares in float32 and sums kRun squares in float32
// (two blocks of 16 per iteration, each its own accumulators) before adding that partial sum to
// its float64 total: the norm pass then reads as fast as memory allows, with a relative error
// of a few float32 ulps (torch's float32 norms have as much).  A run whose float32 sum is not
// finite (a square overflowed, or a y is infinite or NaN), or is below 2^-80 in a lane where
// some y is not zero (its squares partly or wholly underflowed: the lane's bits OR-ed), has the
// whole call's elements summed again with float64 squares (rare; the per-run test is a few
// vector operations): the norm keeps that accuracy at every scale, float32's denormals
// included, as the tail's float64 squares do.
// The flag lanes take y - y, NaN where y is infinite or NaN: per element when clipping (a clamp
// hides an infinity), else in that second sum, where any non-finite y goes (finite values
// cannot make a float64 sum of float32 squares overflow), so whether the gradients are finite
// is theirs, never the sum's.
constexpr int64_t kRun = 8;  // iterations (of kLanes elements) summed in float32
template <bool Clip>
FASTOPTIM_NOINLINE void stats_f32(const float* __restrict g, int64_t n, float mul, float clip,
                                  Lanes& acc) {
  V8d sq[4];
  V16f bad[2];
  std::memcpy(sq, acc.sq.data(), sizeof sq);
  std::memcpy(bad, acc.bad.data(), sizeof bad);
  const V16f vmul = V16f{} + mul, hi = V16f{} + clip, lo = -hi;
  const V16f fmax = V16f{} + std::numeric_limits<float>::max(), tiny = V16f{} + 0x1p-80f;
  const V16i magnitude = V16i{} + 0x7FFFFFFF;
  // lanes -1 while every run's float32 sums are finite and not tiny (or the lane's y all zero)
  V16i ok = V16i{} - 1;
  for (int64_t i = 0; i + kLanes <= n;) {
    V16f run[2] = {V16f{}, V16f{}};
    V16i any[2] = {V16i{}, V16i{}};  // the run's y bits OR-ed, per lane
    const int64_t end = std::min(n - kLanes + 1, i + kRun * kLanes);
    for (; i < end; i += kLanes) {
      for (int h = 0; h < 2; ++h) {
        V16f y;
        std::memcpy(&y, g + i + 16 * h, sizeof y);
        y *= vmul;
        if constexpr (Clip) {
          bad[h] += y - y;  // NaN where y (so g, mul being finite) is infinite or NaN
          y = y < lo ? lo : y;
          y = y > hi ? hi : y;
        }
        run[h] += y * y;
        V16i bits;
        std::memcpy(&bits, &y, sizeof bits);
        any[h] |= bits;
      }
    }
    for (int h = 0; h < 2; ++h) {
      ok &= (run[h] <= fmax) & ((run[h] >= tiny) | ((any[h] & magnitude) == 0));
      sq[2 * h] += FASTOPTIM_LOW8(run[h]);
      sq[2 * h + 1] += FASTOPTIM_HIGH8(run[h]);
    }
  }
  int32_t all = -1;
  for (int j = 0; j < 16; ++j) all &= ok[j];
  if (!all) {  // (rare) the whole piece again, with float64 squares
    std::memcpy(sq, acc.sq.data(), sizeof sq);
    for (int64_t i = 0; i + kLanes <= n; i += kLanes) {
      for (int h = 0; h < 2; ++h) {
        V16f y;
        std::memcpy(&y, g + i + 16 * h, sizeof y);
        y *= vmul;
        if constexpr (Clip) {
          y = y < lo ? lo : y;
          y = y > hi ? hi : y;
        } else {
          bad[h] += y - y;
        }
        const V8d l8 = FASTOPTIM_LOW8(y), h8 = FASTOPTIM_HIGH8(y);
        sq[2 * h] += l8 * l8;
        sq[2 * h + 1] += h8 * h8;
      }
    }
  }
  std::memcpy(acc.sq.data(), sq, sizeof sq);
  std::memcpy(acc.bad.data(), bad, sizeof bad);
}

inline void stats_f32(const float* g, int64_t n, float mul, float clip, Lanes& acc) {
  if (clip == std::numeric_limits<float>::infinity())
    stats_f32<false>(g, n, mul, clip, acc);
  else
    stats_f32<true>(g, n, mul, clip, acc);
}

FASTOPTIM_NOINLINE void stats_f64(const double* __restrict g, int64_t n, double mul, double clip,
                                  Lanes& acc) {
  V8d sq[4];
  std::memcpy(sq, acc.sq.data(), sizeof sq);
  const V8d vmul = V8d{} + mul, hi = V8d{} + clip, lo = -hi;
  V8d bad = V8d{};
  for (int64_t i = 0; i + kLanes <= n; i += kLanes) {
    for (int h = 0; h < 4; ++h) {
      V8d x;
      std::memcpy(&x, g + i + 8 * h, sizeof x);
      x = x * vmul;
      bad += x - x;
      x = x < lo ? lo : x;
      x = x > hi ? hi : x;
      sq[h] += x * x;
    }
  }
  std::memcpy(acc.sq.data(), sq, sizeof sq);
  for (int j = 0; j < 8; ++j) acc.bad[j] += static_cast<float>(bad[j]);
}

// The last n < kLanes elements of a piece: lane j, the same arithmetic.
template <class T, class Load, class S>
void stats_tail(const S* g, int64_t n, T mul, T clip, Lanes& acc) {
  for (int j = 0; j < n; ++j) {
    const T v = Load::load(g[j]);
    T x = v * mul;
    x = x < -clip ? -clip : x;
    x = x > clip ? clip : x;
    acc.sq[j] += static_cast<double>(x) * static_cast<double>(x);
    acc.bad[j] += static_cast<float>(v * mul - v * mul);
  }
}

struct F64 {
  static double load(double x) { return x; }
};

// Elements [a, b) of an array of dtype d, transformed (clamp(x * mul, -clip, clip)), into the
// lanes (16-bit values converted block by block into float32 first; blocks are whole numbers of
// lanes, so every element keeps its lane).
inline void stats_array(const void* x, DType d, int64_t a, int64_t b, double mul64,
                        double clip64, Lanes& acc) {
  const int64_t n = b - a, full = n / kLanes * kLanes;
  const auto mul = static_cast<float>(mul64), clip = static_cast<float>(clip64);
  if (d == DType::f64) {
    const double* g = static_cast<const double*>(x) + a;
    stats_f64(g, full, mul64, clip64, acc);
    stats_tail<double, F64>(g + full, n - full, mul64, clip64, acc);
    return;
  }
  if (d == DType::f32) {
    const float* g = static_cast<const float*>(x) + a;
    stats_f32(g, full, mul, clip, acc);
    stats_tail<float, F32>(g + full, n - full, mul, clip, acc);
    return;
  }
  alignas(64) float buf[kBlock];
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t m = std::min(kBlock, n - lo);
    const float* y = staged(x, d, a + lo, m, buf);
    const int64_t whole = m / kLanes * kLanes;
    stats_f32(y, whole, mul, clip, acc);
    stats_tail<float, F32>(y + whole, m - whole, mul, clip, acc);
  }
}

// Tensor t's gradient elements [a, b), transformed by the plan, into the lanes.
inline void stats_tensor(const Plan& plan, const Tensor& t, int64_t a, int64_t b, Lanes& acc) {
  stats_array(t.grad, t.grad_dtype, a, b, plan.grad_mul, plan.grad_clip, acc);
}

void grad_stats(const Plan& plan, int threads, GradStats& r) {
  const int64_t total = plan.total();
  const int64_t chunk = chunk_elements(total);
  const int64_t nchunks = (total + chunk - 1) / chunk;
  std::vector<std::array<double, 2>> part(static_cast<std::size_t>(nchunks));
  const auto one = [&](int64_t c) {
    Lanes acc;
    const int64_t lo = c * chunk;
    for_range(plan, lo, std::min(total, lo + chunk),
              [&](const Tensor& t, int64_t a, int64_t b) { stats_tensor(plan, t, a, b, acc); });
    double sq = 0, bad = 0;
    for (int j = 0; j < kLanes; ++j) {
      sq += acc.sq[j];
      bad += acc.bad[j];
    }
    part[static_cast<std::size_t>(c)] = {sq, bad};
  };
  for_each_chunk(nchunks, threads, one);
  r = GradStats{};
  double bad = 0;
  for (const auto& p : part) {
    r.sumsq += p[0];
    bad += p[1];
  }
  r.finite = bad == 0;  // (a float64 sum of squares overflows only past |g| ~ 1e154)
}

// ------------------------------------------------------------------ two-pass optimizers
// LAMB and LARS (optimizers.hpp's kReduce).  Pass 1 reduces each tensor's sums of squares with
// grad_stats' machinery (32 lanes, float32 runs added into float64 lanes, the lanes added in
// order), over a partition that depends on the tensor alone: its blocks of kSumBlock elements
// from its first, each summed on its own, then added in order.  Pass 1 runs the step's chunks,
// each taking the blocks that START in it (whole, even past its end), so every block is summed
// once, by one thread, and a tensor's sums, hence every bit of its step, are the same for any
// thread count and whatever other tensors share its group (a group or one optimizer per tensor
// alike).  Pass 2 is the element-wise update (run_update, every layout) with each tensor's
// coefficients (Opt::for_tensor).

constexpr double kInf = std::numeric_limits<double>::infinity();
// Elements per partial sum of pass 1: a multiple of kQBlock (whole quantization blocks) that
// divides 2^32 (the random bits' blocks).
constexpr int64_t kSumBlock = 4096;
static_assert(kSumBlock % kQBlock == 0, "pass 1's blocks hold whole quantization blocks");

// n values into the lanes, untransformed.
inline void lanes_add(const float* x, int64_t n, Lanes& acc) {
  const int64_t whole = n / kLanes * kLanes;
  stats_f32(x, whole, 1.0f, std::numeric_limits<float>::infinity(), acc);
  stats_tail<float, F32>(x + whole, n - whole, 1.0f, std::numeric_limits<float>::infinity(), acc);
}
inline void lanes_add(const double* x, int64_t n, Lanes& acc) {
  const int64_t whole = n / kLanes * kLanes;
  stats_f64(x, whole, 1.0, kInf, acc);
  stats_tail<double, F64>(x + whole, n - whole, 1.0, kInf, acc);
}

// kReduce == 2, the state update: s <- moments(clamp(g * mul, -clip, clip), s).
template <class R, class T, class... S>
FASTOPTIM_NOINLINE void reduce_moments(const R r, T mul, T clip, const T* __restrict g, int64_t n,
                                       S* __restrict... s) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) {
    std::array<T, sizeof...(S)> v{s[i]...};
    T x = g[i] * mul;
    x = x < -clip ? -clip : x;
    x = x > clip ? clip : x;
    r.moments(x, v);
    std::size_t j = 0;
    ((s[i] = v[j++]), ...);
  }
}

// kReduce == 2, the update whose norm is taken: u = update(p, s) from the stored state.
template <class R, class T, class... S>
FASTOPTIM_NOINLINE void reduce_update(const R r, const T* __restrict p, T* __restrict u, int64_t n,
                                      const S* __restrict... s) {
  FASTOPTIM_VECTORIZE
  for (int64_t i = 0; i < n; ++i) u[i] = r.update(p[i], std::array<T, sizeof...(S)>{s[i]...});
}

static_assert(kBlock == kQBlock, "pass 1 runs quantized tensors in the converting blocks");

// Pass 1 of kReduce == 2 on tensor t's elements [a, b), block by block: the moments, stored
// (float32 state) or, when `keep` (a state stored in another dtype), computed in copies and
// left for pass 2 to recompute and store rounded; u into a block buffer; p^2 and u^2 into the
// lanes.  (a is a multiple of kSumBlock, so a quantized state's blocks are whole.)
template <class Opt, unsigned V, std::size_t... J>
void reduce_tensor(const typename Opt::Coeffs& c, const Plan& plan, const Tensor& t, int64_t a,
                   int64_t b, const RoundingKey& key, bool keep, Lanes& lp, Lanes& lu,
                   std::index_sequence<J...>) {
  constexpr std::size_t N = sizeof...(J);
  static_assert(N > 0, "kReduce == 2 needs state");
  if (t.dtype == DType::f64) {  // everything float64: no conversion
    const Reduce<Opt, double, V> r{c};
    alignas(64) double u[kBlock];
    const double* p = static_cast<const double*>(t.param);
    const double* g = static_cast<const double*>(t.grad);
    for (int64_t lo = a; lo < b; lo += kBlock) {
      const int64_t n = std::min(kBlock, b - lo);
      reduce_moments(r, plan.grad_mul, plan.grad_clip, g + lo, n,
                     (static_cast<double*>(t.state[J]) + lo)...);
      reduce_update(r, p + lo, u, n, (static_cast<const double*>(t.state[J]) + lo)...);
      lanes_add(p + lo, n, lp);
      lanes_add(u, n, lu);
    }
    return;
  }
  const Reduce<Opt, float, V> r{c};
  const auto mul = static_cast<float>(plan.grad_mul), clip = static_cast<float>(plan.grad_clip);
  const QTables* q[N] = {
      (is_quantized(t.state_dtype[J]) ? &qtables(qmap_of(t.state_dtype[J])) : nullptr)...};
  alignas(64) float buf_p[kBlock], buf_g[kBlock], buf_u[kBlock];
  alignas(64) float buf_s[N][kBlock];
  for (int64_t lo = a; lo < b;) {
    const int64_t n = std::min(kBlock, b - lo);  // (kBlock divides a, 2^32 and kSumBlock)
    const float* g = staged(t.grad, t.grad_dtype, lo, n, buf_g);
    float* s[N] = {staged_state(t, J, q[J], lo, n, buf_s[J])...};
    if (keep) {  // the moments in copies: a float32 state is the array itself
      for (std::size_t j = 0; j < N; ++j)
        if (s[j] != buf_s[j]) s[j] = std::copy(s[j], s[j] + n, buf_s[j]) - n;
      reduce_moments(r, mul, clip, g, n, s[J]...);
    } else {
      reduce_moments(r, mul, clip, g, n, s[J]...);
      (unstage_state(s[J], q[J] ? absmax_bits(s[J], n) : 0u, t, J, q[J], lo, n, key),
       ...);  // (float32: no-op; a quantized state is always kept: see redo)
    }
    const float* p = staged(t.param, t.dtype, lo, n, buf_p);
    reduce_update(r, p, buf_u, n, s[J]...);
    lanes_add(p, n, lp);
    lanes_add(buf_u, n, lu);
    lo += n;
  }
}

template <class Opt, unsigned V>
void run_two_pass(const Plan& plan, const typename Opt::Coeffs& c, int64_t step, int threads) {
  using Coeffs = typename Opt::Coeffs;
  const int64_t total = plan.total();
  const std::size_t nt = plan.tensors.size();
  const Tensor* first = plan.tensors.data();
  const int64_t chunk = chunk_elements(total);
  const int64_t nchunks = (total + chunk - 1) / chunk;
  // part[base[i] + k]: the sums of tensor i's block k
  std::vector<std::size_t> base(nt + 1, 0);
  for (std::size_t i = 0; i < nt; ++i)
    base[i + 1] = base[i] + static_cast<std::size_t>((plan.tensors[i].size + kSumBlock - 1) / kSumBlock);
  std::vector<std::array<double, 2>> part(base[nt], std::array<double, 2>{0.0, 0.0});
  const RoundingKey key{plan, step};
  // redo[i]: tensor i has a state stored in another dtype than it computes in (kRecompute)
  std::vector<char> redo(nt, 0);
  bool any_redo = false;
  if constexpr (reduce_kind<Opt>::value == 2) {
    for (std::size_t i = 0; i < nt; ++i) {
      const Tensor& t = plan.tensors[i];
      for (int j = 0; j < Opt::nstate(V); ++j) redo[i] |= t.state_dtype[j] != t.compute();
      any_redo = any_redo || redo[i];
    }
  }
  const auto one = [&](int64_t ci) {
    const int64_t lo = ci * chunk;
    for_range(plan, lo, std::min(total, lo + chunk), [&](const Tensor& t, int64_t a, int64_t b) {
      const auto i = static_cast<std::size_t>(&t - first);
      for (int64_t x = (a + kSumBlock - 1) / kSumBlock * kSumBlock; x < b; x += kSumBlock) {
        const int64_t y = std::min(t.size, x + kSumBlock);
        Lanes lp, lx;
        if constexpr (reduce_kind<Opt>::value == 2) {
          reduce_tensor<Opt, V>(c, plan, t, x, y, key, redo[i] != 0, lp, lx,
                                std::make_index_sequence<Opt::nstate(V)>{});
        } else {  // the parameter and the transformed gradient, read only
          stats_array(t.param, t.dtype, x, y, 1.0, kInf, lp);
          stats_tensor(plan, t, x, y, lx);
        }
        double sp = 0, sx = 0;
        for (int j = 0; j < kLanes; ++j) {
          sp += lp.sq[j];
          sx += lx.sq[j];
        }
        part[base[i] + static_cast<std::size_t>(x / kSumBlock)] = {sp, sx};
      }
    });
  };
  for_each_chunk(nchunks, threads, one);
  std::vector<Coeffs> per(nt, c);
  for (std::size_t i = 0; i < nt; ++i) {
    double sp = 0, sx = 0;
    for (std::size_t k = base[i]; k < base[i + 1]; ++k) {
      sp += part[k][0];
      sx += part[k][1];
    }
    per[i] = Opt::for_tensor(c, sp, sx, plan.tensors[i].ndim);
  }
  const auto index = [first](const Tensor& t) { return static_cast<std::size_t>(&t - first); };
  run_update<Opt, V>(
      plan,
      [&](const Tensor& t) -> const Coeffs* { return redo[index(t)] ? nullptr : &per[index(t)]; },
      step, threads);
  if constexpr (reduce_kind<Opt>::value == 2) {
    if (any_redo)
      run_update<Opt, V | Opt::kRecompute>(
          plan,
          [&](const Tensor& t) -> const Coeffs* { return redo[index(t)] ? &per[index(t)] : nullptr; },
          step, threads);
  }
}

template <class Opt, unsigned V>
void run_variant(const Plan& plan, const typename Opt::Coeffs& c, int64_t step, int threads) {
  if constexpr (reduce_kind<Opt>::value != 0) {
    run_two_pass<Opt, V>(plan, c, step, threads);
  } else {
    run_update<Opt, V>(
        plan, [&c](const Tensor&) -> const typename Opt::Coeffs* { return &c; }, step, threads);
  }
}

template <class Opt, unsigned... V>
void run_dispatch(std::integer_sequence<unsigned, V...>, unsigned v, const Plan& plan,
                  const typename Opt::Coeffs& c, int64_t step, int threads) {
  ((v == V ? run_variant<Opt, V>(plan, c, step, threads) : void()), ...);
}
template <class Opt>
void step(const Plan& plan, const typename Opt::Hyper& h, int64_t step, int threads) {
  const typename Opt::Coeffs c = Opt::prepare(h, step);
  run_dispatch<Opt>(std::make_integer_sequence<unsigned, Opt::kVariants>{}, Opt::variant(h), plan,
                    c, step, threads);
}

#define FASTOPTIM_INSTANTIATE(Opt, name) \
  template void step<Opt>(const Plan&, const Opt::Hyper&, int64_t, int);
FASTOPTIM_OPTIMIZERS(FASTOPTIM_INSTANTIATE)
#undef FASTOPTIM_INSTANTIATE

// ------------------------------------------------------------------ gradient accumulation
// Each tensor's `param` (an optimizer's gradient buffer) += scale * its gradient, one pass,
// one rounding (a fused multiply-add where the ISA has it; exact for scale 1), 16-bit buffers
// rounded to nearest.
inline void accumulate_tensor(const Tensor& t, int64_t a, int64_t b, double scale) {
  if (t.dtype == DType::f64) {
    double* __restrict d = static_cast<double*>(t.param);
    const double* __restrict g = static_cast<const double*>(t.grad);
    FASTOPTIM_VECTORIZE
    for (int64_t i = a; i < b; ++i) d[i] = fmadd(scale, g[i], d[i]);
    return;
  }
  const auto s = static_cast<float>(scale);
  if (t.dtype == DType::f32 && t.grad_dtype == DType::f32) {
    float* __restrict d = static_cast<float*>(t.param);
    const float* __restrict g = static_cast<const float*>(t.grad);
    FASTOPTIM_VECTORIZE
    for (int64_t i = a; i < b; ++i) d[i] = fmadd(s, g[i], d[i]);
    return;
  }
  alignas(64) float bd[kBlock], bg[kBlock];
  for (int64_t lo = a; lo < b;) {
    const int64_t n = std::min(kBlock, b - lo);
    float* __restrict d = staged(t.param, t.dtype, lo, n, bd);
    const float* __restrict g = staged(t.grad, t.grad_dtype, lo, n, bg);
    FASTOPTIM_VECTORIZE
    for (int64_t i = 0; i < n; ++i) d[i] = fmadd(s, g[i], d[i]);
    if (t.dtype == DType::bf16)
      store_nearest<BF16>(d, n, static_cast<uint16_t*>(t.param) + lo);
    else if (t.dtype == DType::f16)
      store_nearest<F16>(d, n, static_cast<uint16_t*>(t.param) + lo);
    lo += n;
  }
}

void accumulate(const Plan& plan, double scale, int threads) {
  parallel_ranges(plan.total(), threads, [&](int64_t lo, int64_t hi) {
    for_range(plan, lo, hi,
              [&](const Tensor& t, int64_t a, int64_t b) { accumulate_tensor(t, a, b, scale); });
  });
}

// The roofline of a pass that only reads (grad_stats): the sum of n float32 values over the same
// chunks, 16 float32 lanes each.
void stream_read(const float* a, int64_t n, int threads, double& out) {
  const int64_t chunk = chunk_elements(n);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<std::size_t>(nchunks));
  const auto one = [&](int64_t c) {
    const int64_t lo = c * chunk, m = std::min(n, lo + chunk) - lo;
    const float* __restrict x = a + lo;
    std::array<float, kLanes> acc{};
    int64_t i = 0;
    for (; i + kLanes <= m; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
    for (int j = 0; i + j < m; ++j) acc[j] += x[i + j];
    double s = 0;
    for (float v : acc) s += v;
    part[static_cast<std::size_t>(c)] = s;
  };
  for_each_chunk(nchunks, threads, one);
  out = 0;
  for (double s : part) out += s;
}

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

// The roofline of a mixed-precision layout: one plain fused loop over `rw32` float32 and `rw16`
// 16-bit arrays read and written, one gradient read (float32 or 16-bit), optionally one 16-bit
// array written only (a copy-out) and one 1-byte array read and written (4-bit codes); 16-bit
// values are converted as bfloat16 (a shift each way), the byte gets the low bits of that.
template <int RW32, int RW16, bool G16, bool OUT, bool RW8>
void stream_mixed_impl(const StreamArrays& s, int64_t n, int threads) {
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    std::array<float*, RW32 == 0 ? 1 : RW32> f;
    std::array<uint16_t*, RW16 == 0 ? 1 : RW16> h;
    for (int j = 0; j < RW32; ++j) f[j] = s.rw32[j] + lo;
    for (int j = 0; j < RW16; ++j) h[j] = s.rw16[j] + lo;
    const float* g32 = s.grad32 + (G16 ? 0 : lo);
    const uint16_t* g16 = s.grad16 + (G16 ? lo : 0);
    uint16_t* out = s.out16 + (OUT ? lo : 0);
    uint8_t* c8 = s.rw8 + (RW8 ? lo : 0);
    const float scale = 1.0f / static_cast<float>(RW32 + RW16 + (RW8 ? 1 : 0) + 1);
    FASTOPTIM_VECTORIZE
    for (int64_t i = 0; i < hi - lo; ++i) {
      float x = G16 ? bf16_load(g16[i]) : g32[i];
      for (int j = 0; j < RW32; ++j) x += f[j][i];
      for (int j = 0; j < RW16; ++j) x += bf16_load(h[j][i]);
      if (RW8) x += static_cast<float>(c8[i]);
      x *= scale;
      const auto t = static_cast<uint16_t>(bits_of(x) >> 16);
      for (int j = 0; j < RW32; ++j) f[j][i] = x;
      for (int j = 0; j < RW16; ++j) h[j][i] = t;
      if (OUT) out[i] = t;
      if (RW8) c8[i] = static_cast<uint8_t>(t);
    }
  });
}

template <bool RW8, int C, int... Cs>
void stream_mixed_dispatch(std::integer_sequence<int, C, Cs...>, int code, const StreamArrays& s,
                           int64_t n, int threads) {
  if (code == C)
    stream_mixed_impl<C / 20, C / 4 % 5, (C & 2) != 0, (C & 1) != 0, RW8>(s, n, threads);
  else if constexpr (sizeof...(Cs) > 0)
    stream_mixed_dispatch<RW8>(std::integer_sequence<int, Cs...>{}, code, s, n, threads);
}

void stream_mixed(const StreamArrays& s, int64_t n, int threads) {
  const int code = s.nrw32 * 20 + s.nrw16 * 4 + (s.grad16 ? 2 : 0) + (s.out16 ? 1 : 0);
  if (s.rw8 != nullptr)
    stream_mixed_dispatch<true>(std::make_integer_sequence<int, 100>{}, code, s, n, threads);
  else
    stream_mixed_dispatch<false>(std::make_integer_sequence<int, 100>{}, code, s, n, threads);
}

// ------------------------------------------------------------------ block-wise (de)quantization
// fastoptim::quantize_blockwise / dequantize_blockwise (fastoptim.hpp): f(b, lo, len) for each
// block b = [lo, lo + len) of n elements, a block belonging to the chunk that holds its first
// element (as the driver's quantized states), on `threads` threads.
template <class F> void on_blocks(int64_t n, int64_t block, int threads, const F& f) {
  parallel_ranges(n, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t s = block_start(lo, block); s < hi; s += block)
      f(s / block, s, std::min(block, n - s));
  });
}

void quantize_blockwise(const float* v, int64_t n, QMap m, uint8_t* codes, float* absmax,
                        int threads) {
  if (is_map4(m)) {
    const Q4Tables& q = q4tables(m);
    on_blocks(n, kQBlock4, threads, [&](int64_t b, int64_t lo, int64_t len) {
      absmax[b] = quantize_block4(v + lo, len, q, codes + lo / 2);
    });
    return;
  }
  const QTables& q = qtables(m);
  const bool search = q_search_on();
  on_blocks(n, kQBlock, threads, [&](int64_t b, int64_t lo, int64_t len) {
    absmax[b] = quantize_block(v + lo, len, absmax_bits(v + lo, len), q, codes + lo, search);
  });
}

void dequantize_blockwise(const uint8_t* codes, const float* absmax, int64_t n, QMap m,
                          float* out, int threads) {
  if (is_map4(m)) {
    const Q4Tables& q = q4tables(m);
    on_blocks(n, kQBlock4, threads, [&](int64_t b, int64_t lo, int64_t len) {
      dequantize_block4(codes + lo / 2, len, absmax[b], q, out + lo);
    });
    return;
  }
  const QTables& q = qtables(m);
  on_blocks(n, kQBlock, threads, [&](int64_t b, int64_t lo, int64_t len) {
    dequantize8(codes + lo, len, absmax[b], q, out + lo);
  });
}

}  // namespace FASTOPTIM_ISA_NS
}  // namespace fastoptim
