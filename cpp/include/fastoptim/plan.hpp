// A Plan is what one step of a parameter group works on: for every tensor, its element count,
// dtype and raw pointers to the parameter, the gradient and each state buffer.  Built once per
// group (pointers into the caller's arrays, which the caller keeps alive); a step only swaps
// gradient pointers, or nothing when gradients are bound.
#pragma once

#include <cstdint>
#include <vector>

namespace fastoptim {

enum class DType : int { f32 = 0, f64 = 1 };

inline constexpr int kMaxState = 3;

struct Tensor {
  DType dtype = DType::f32;
  int64_t size = 0;
  void* param = nullptr;
  const void* grad = nullptr;
  void* state[kMaxState] = {nullptr, nullptr, nullptr};
};

struct Plan {
  std::vector<Tensor> tensors;
  std::vector<int64_t> offsets;  // offsets[i] = elements before tensor i; offsets.back() = total
  int nstate = 0;
  int64_t param_bytes = 0;  // sum of the parameters' sizes in bytes

  void add(const Tensor& t) {
    if (offsets.empty()) offsets.push_back(0);
    tensors.push_back(t);
    offsets.push_back(offsets.back() + t.size);
    param_bytes += t.size * (t.dtype == DType::f64 ? 8 : 4);
  }
  int64_t total() const { return offsets.empty() ? 0 : offsets.back(); }
  // Bytes a step reads and writes: param, grad and states read; param and states written.
  int64_t traffic() const { return param_bytes * (3 + 2 * nstate); }
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
