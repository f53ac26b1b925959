// A Plan is what one step of a parameter group works on: for every tensor, its element count,
// dtype and raw pointers to the parameter, the gradient and each state buffer.  Built once per
// group (pointers into the caller's arrays, which the caller keeps alive); a step only swaps
// gradient pointers, or nothing when gradients are bound.
#pragma once

#include <cstdint>
#include <vector>

namespace fastoptim {

// Storage dtypes.  A tensor computes in float64 when its parameter is float64 (everything else
// of it is float64 then), else in float32, whatever its arrays store: the driver converts on
// load and rounds on store (convert.hpp); the element kernels see float or double only.
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };
inline constexpr int64_t dtype_size(DType d) {
  return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : 2);
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
  // After the update, the parameter rounded into `out` (bfloat16/float16): the user's
  // low-precision parameter of a master copy, or an offload "copy-out" array.  nullptr: none.
  DType out_dtype = DType::bf16;
  void* out = nullptr;
  // Kahan compensation of a low-precision parameter (same dtype as it), or nullptr.
  void* comp = nullptr;
  uint64_t id = 0;  // the tensor's number in its optimizer: part of the stochastic rounding key

  // Every array in the compute dtype, nothing to convert: the driver's direct path.
  bool direct(int nstate) const {
    bool plain = (dtype == DType::f32 || dtype == DType::f64) && out == nullptr &&
                 comp == nullptr && grad_dtype == dtype;
    for (int j = 0; j < nstate; ++j) plain = plain && state_dtype[j] == dtype;
    return plain;
  }
  DType compute() const { return dtype == DType::f64 ? DType::f64 : DType::f32; }
  // Bytes one step reads and writes.
  int64_t traffic(int nstate) const {
    int64_t b = 2 * dtype_size(dtype) + dtype_size(grad_dtype);
    for (int j = 0; j < nstate; ++j) b += 2 * dtype_size(state_dtype[j]);
    if (out) b += dtype_size(out_dtype);
    if (comp) b += 2 * dtype_size(dtype);
    return b * size;
  }
};

struct Plan {
  std::vector<Tensor> tensors;
  std::vector<int64_t> offsets;  // offsets[i] = elements before tensor i; offsets.back() = total
  int nstate = 0;
  Rounding rounding = Rounding::nearest;
  uint64_t seed = 0;

  void add(const Tensor& t) {
    if (offsets.empty()) offsets.push_back(0);
    tensors.push_back(t);
    offsets.push_back(offsets.back() + t.size);
  }
  int64_t total() const { return offsets.empty() ? 0 : offsets.back(); }
  // Bytes a step reads and writes.
  int64_t traffic() const {
    int64_t b = 0;
    for (const Tensor& t : tensors) b += t.traffic(nstate);
    return b;
  }
};

// The arrays of a streaming reference pass (fastoptim::stream_mixed): nrw32 float32 and nrw16
// 16-bit arrays read and written (each 0 to 4), a gradient read (float32 or 16-bit: exactly one of
// grad32/grad16 non-null) and an optional 16-bit array written only.
struct StreamArrays {
  int nrw32 = 0, nrw16 = 0;
  float* rw32[4] = {};
  uint16_t* rw16[4] = {};
  const float* grad32 = nullptr;
  const uint16_t* grad16 = nullptr;
  uint16_t* out16 = nullptr;
};
// The driver's work runner (dispatch.cpp): calls fn(ctx, i) exactly once for every chunk i in
// [0, nchunks), on the calling thread and up to `threads` - 1 workers of fastoptim's own pool,
// and returns as soon as every chunk is done.  Each thread claims chunks one at a time from its
// own range (the static split), then from the back of the others' ranges, so a worker the OS
// has descheduled delays nothing (the running threads, the caller included, take its share); the
// caller never waits for a thread that has no chunk.  When the pool is busy with another caller's step, or in a forked child, the
// chunks run on the calling thread.  nchunks < kMaxChunks.
inline constexpr int64_t kMaxChunks = 1 << 16;
using ChunkFn = void (*)(void* ctx, int64_t chunk);
void run_chunks(int64_t nchunks, int threads, ChunkFn fn, void* ctx);

}  // namespace fastoptim
