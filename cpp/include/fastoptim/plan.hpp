// A Plan is what one step of a parameter group works on: for every tensor, its element count,
// dtype and raw pointers to the parameter, the gradient and each state buffer.  Built once per
// group (pointers into the caller's arrays, which the caller keeps alive); a step only swaps
// gradient pointers, or nothing when gradients are bound.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastoptim/quantize.hpp"

namespace fastoptim {

// Storage dtypes.  A tensor computes in float64 when its parameter is float64 (everything else
// of it is float64 then), else in float32, whatever its arrays store: the driver converts on
// load and rounds on store (convert.hpp); the element kernels see float or double only.
// q8s / q8u: a state stored block-wise quantized (quantize.hpp): 8-bit codes of the signed /
// unsigned dynamic map, and a float32 absmax per block of kQBlock elements (Tensor::absmax).
// q4s / q4u: the same with 4-bit codes, two per byte, and an absmax per block of kQBlock4
// (the 4-bit section of quantize.hpp).  The driver still runs such a tensor in blocks of kQBlock
// (two 4-bit blocks each), so a tensor may mix 8-bit and 4-bit states.
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3, q8s = 4, q8u = 5, q4s = 6, q4u = 7 };
inline constexpr bool is_q4(DType d) { return d == DType::q4s || d == DType::q4u; }
inline constexpr bool is_quantized(DType d) {
  return d == DType::q8s || d == DType::q8u || is_q4(d);
}
// Bytes per element (a 4-bit state's half byte counts as 1 here: see Tensor::traffic).
inline constexpr int64_t dtype_size(DType d) {
  return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : (is_quantized(d) ? 1 : 2));
}
inline constexpr QMap qmap_of(DType d) {
  return d == DType::q8s ? QMap::signed8
                         : (d == DType::q8u ? QMap::unsigned8
                                            : (d == DType::q4s ? QMap::signed4 : QMap::unsigned4));
}

// How a float32 result is stored into a bfloat16/float16 array.
enum class Rounding : int { nearest = 0, stochastic = 1 };

inline constexpr int kMaxState = 3;

struct Tensor {
  int64_t size = 0;
  // The parameter the kernel updates: the user's array, or the optimizer's float32 master copy
  // of it (then `out` is the user's array).
  DType dtype = DType::f32;
  void* param = nullptr;
  DType grad_dtype = DType::f32;
  const void* grad = nullptr;
  DType state_dtype[kMaxState] = {DType::f32, DType::f32, DType::f32};
  void* state[kMaxState] = {nullptr, nullptr, nullptr};
  // The per-block scales of a quantized state (state_dtype q8s/q8u), else nullptr.
  float* absmax[kMaxState] = {nullptr, nullptr, nullptr};
  // After the update, the parameter rounded into `out` (bfloat16/float16): the user's
  // low-precision parameter of a master copy, or an offload "copy-out" array.  nullptr: none.
  DType out_dtype = DType::bf16;
  void* out = nullptr;
  // Kahan compensation of a low-precision parameter (same dtype as it), or nullptr.
  void* comp = nullptr;
  uint64_t id = 0;  // the tensor's number in its optimizer: part of the stochastic rounding key
  int ndim = 1;     // the parameter's number of dimensions (LARS excludes ndim <= 1)
  // An exponential moving average of the parameter, or nullptr: after the update,
  // ema = lerp(ema, p, 1 - Plan::ema_decay) in the compute dtype, stored in ema_dtype (the
  // parameter's, or float32/bfloat16/float16 for a parameter that computes in float32).
  DType ema_dtype = DType::f32;
  void* ema = nullptr;

  // The driver's path for this tensor (set by classify() whenever its arrays change):
  // kDirect: every array in the compute dtype, nothing to convert; kFused*: a mixed layout
  // converted in registers, with one 16-bit format H (bfloat16 or float16) throughout: H params
  // and grads with fp32 state (kFused16Params); all-H (kFusedAll16); fp32 params with H grads
  // and an H copy, the offload and master layouts (kFusedOffload); kConverting: the rest;
  // kQuantized: some state is block-quantized (whole blocks, converting the other arrays).
  enum Path : int {
    kDirect = 0, kFused16Params, kFusedAll16, kFusedOffload, kConverting, kQuantized
  };
  int path = kDirect;
  void classify(int nstate) {
    for (int j = 0; j < nstate; ++j)
      if (is_quantized(state_dtype[j])) {
        path = kQuantized;
        return;
      }
    bool same = (dtype == DType::f32 || dtype == DType::f64) && out == nullptr &&
                comp == nullptr && grad_dtype == dtype;
    const bool g16 = grad_dtype == DType::bf16 || grad_dtype == DType::f16;
    bool s32 = true, s16 = true;
    for (int j = 0; j < nstate; ++j) {
      same = same && state_dtype[j] == dtype;
      s32 = s32 && state_dtype[j] == DType::f32;
      s16 = s16 && state_dtype[j] == grad_dtype;
    }
    path = kConverting;
    if (same)
      path = kDirect;
    else if (comp == nullptr && g16 && dtype == grad_dtype && !out)
      path = s32 ? kFused16Params : (s16 ? kFusedAll16 : kConverting);
    else if (comp == nullptr && g16 && dtype == DType::f32 && out && out_dtype == grad_dtype &&
             s32)
      path = kFusedOffload;
  }
  DType compute() const { return dtype == DType::f64 ? DType::f64 : DType::f32; }
  // Bytes one step reads and writes.
  int64_t traffic(int nstate) const {
    int64_t b = 2 * dtype_size(dtype) + dtype_size(grad_dtype);
    int64_t scales = 0;  // absmax arrays: 4 bytes per block, read and written
    for (int j = 0; j < nstate; ++j) {
      if (is_q4(state_dtype[j])) {  // half a byte per element, read and written
        scales += 2 * ((size + 1) / 2) + 2 * 4 * ((size + kQBlock4 - 1) / kQBlock4);
        continue;
      }
      b += 2 * dtype_size(state_dtype[j]);
      if (is_quantized(state_dtype[j])) scales += 2 * 4 * ((size + kQBlock - 1) / kQBlock);
    }
    if (out) b += dtype_size(out_dtype);
    if (comp) b += 2 * dtype_size(dtype);
    if (ema) b += 2 * dtype_size(ema_dtype);
    return b * size + scales;
  }
};

struct Plan {
  std::vector<Tensor> tensors;
  std::vector<int64_t> offsets;  // offsets[i] = elements before tensor i; offsets.back() = total
  int nstate = 0;
  Rounding rounding = Rounding::nearest;
  uint64_t seed = 0;
  // The gradient transform of the steps that follow (identity by default): the kernel sees
  // clamp(g * grad_mul, -grad_clip, grad_clip) for every gradient element g (loss scaling and
  // norm clipping folded into grad_mul, value clipping into grad_clip; NaN stays NaN).
  double grad_mul = 1.0;
  double grad_clip = std::numeric_limits<double>::infinity();
  double ema_decay = 0.0;  // of the tensors that have an `ema`

  int64_t bytes = 0;  // a step's traffic: kept up to date by add() and set_grad_dtype()

  void add(const Tensor& t) {  // (nstate set first)
    if (offsets.empty()) offsets.push_back(0);
    tensors.push_back(t);
    offsets.push_back(offsets.back() + t.size);
    bytes += t.traffic(nstate);
  }
  // Tensor i's gradient has dtype d from now on: its path and the plan's traffic follow.
  void set_grad_dtype(std::size_t i, DType d) {
    Tensor& t = tensors[i];
    if (t.grad_dtype == d) return;
    bytes += (dtype_size(d) - dtype_size(t.grad_dtype)) * t.size;
    t.grad_dtype = d;
    t.classify(nstate);
  }
  int64_t total() const { return offsets.empty() ? 0 : offsets.back(); }
  // Bytes a step reads and writes.
  int64_t traffic() const { return bytes; }
  // Bytes the gradients take (what grad_stats reads).
  int64_t grad_bytes() const {
    int64_t b = 0;
    for (const Tensor& t : tensors) b += dtype_size(t.grad_dtype) * t.size;
    return b;
  }
};

// What grad_stats finds in a plan's gradients g (after the plan's transform, x = clamp(g *
// grad_mul, -grad_clip, grad_clip)): the sum of x^2 in float64, and whether every g * grad_mul
// is finite (the gradients', never the sum's: float64 gradients beyond ~1e154 give an infinite
// sum, finite gradients).
// Computed over a fixed partition of the elements (chunks that depend on the total only, 32
// lanes per chunk) combined in a fixed order: the same bits for any thread count and ISA.
struct GradStats {
  double sumsq = 0;
  bool finite = true;
};

// The arrays of a streaming reference pass (fastoptim::stream_mixed): nrw32 float32 and nrw16
// 16-bit arrays read and written (each 0 to 4), a gradient read (float32 or 16-bit: exactly one of
// grad32/grad16 non-null), an optional 16-bit array written only and an optional 1-byte array
// read and written (the two packed code arrays of a 4-bit state: 1 B per element each way).
struct StreamArrays {
  int nrw32 = 0, nrw16 = 0;
  float* rw32[4] = {};
  uint16_t* rw16[4] = {};
  const float* grad32 = nullptr;
  const uint16_t* grad16 = nullptr;
  uint16_t* out16 = nullptr;
  uint8_t* rw8 = nullptr;
};
// The driver's work runner (dispatch.cpp): calls fn(ctx, i) exactly once for every chunk i in
// [0, nchunks), on the calling thread and up to `threads` - 1 workers of fastoptim's own pool,
// and returns as soon as every chunk is done.  Each thread claims chunks one at a time from its
// own range (the static split), then from the back of the others' ranges, so a worker the OS
// has descheduled delays nothing (the running threads, the caller included, take its share); the
// caller never waits for a thread that has no chunk.  When the pool is busy with another caller's step, or in a forked child, the
// chunks run on the calling thread.  The pool indexes at most kMaxChunks - 1 chunks (16 bits):
// more are handed out in runs of consecutive chunks.  With `linger` the workers then spin
// briefly for the next job (steps follow each other); without, they sleep at once (a pass
// between two BLAS calls, whose threads want every CPU next).
inline constexpr int64_t kMaxChunks = 1 << 16;
using ChunkFn = void (*)(void* ctx, int64_t chunk);
void run_chunks(int64_t nchunks, int threads, ChunkFn fn, void* ctx, bool linger = true);

// The one way the driver's parallel loops run: f(i) for every chunk i in [0, nchunks), in
// order on the calling thread when `threads` <= 1 or there is one chunk, else on the pool
// (run_chunks).  Results that depend only on i (per-chunk partial sums) are the same for any
// thread count.
template <class F>
void for_each_chunk(int64_t nchunks, int threads, const F& f, bool linger = true) {
  if (threads <= 1 || nchunks <= 1) {
    for (int64_t i = 0; i < nchunks; ++i) f(i);
    return;
  }
  run_chunks(nchunks, threads, [](void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); },
             const_cast<void*>(static_cast<const void*>(&f)), linger);
}

// f(lo, hi) over [0, n) in pieces of `chunk` (> 0) on the pool (for_each_chunk), or as one
// call f(0, n) when `threads` <= 1 or n fits in one piece.  For element-wise loops, whose
// result does not depend on the split.
template <class F>
void for_each_range(int64_t n, int64_t chunk, int threads, const F& f, bool linger = true) {
  if (threads <= 1 || n <= chunk) {
    f(int64_t{0}, n);
    return;
  }
  for_each_chunk(
      (n + chunk - 1) / chunk, threads,
      [&](int64_t i) {
        const int64_t lo = i * chunk;
        f(lo, std::min(n, lo + chunk));
      },
      linger);
}

}  // namespace fastoptim
