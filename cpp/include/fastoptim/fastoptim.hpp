// Public C++ API of the fastoptim core: no Python in here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fastoptim/optimizers.hpp"
#include "fastoptim/plan.hpp"

namespace fastoptim {

// Instruction sets the kernels are compiled for; the best one the CPU supports is chosen at load.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, neon = 3 };

const char* isa_name(Isa isa);
std::vector<Isa> available_isas();  // supported by this build AND this CPU, best last
Isa active_isa();
void set_isa(Isa isa);  // throws std::invalid_argument when not available

// Threads a large step uses (the caller's and up to n - 1 of fastoptim's own workers).  n >= 1
// (std::invalid_argument otherwise); values above max_threads() use max_threads().  Default:
// OMP_NUM_THREADS's first entry if it is an integer >= 1, else available_cpus(), capped the same
// way.  In a forked child: 1 (serial) until the child calls set_num_threads.
void set_num_threads(int n);
int get_num_threads();
int max_threads();  // 4 x the CPUs available to the process at load
// The CPUs available to the process at load: its affinity mask (Linux; else the hardware's
// count), capped by its cgroups' CPU quota, at least 1.
int available_cpus();
// The smallest CPU quota of this process's cgroups (v2 cpu.max, v1 cpu.cfs_quota_us over
// cpu.cfs_period_us, its own and its ancestors', found through /proc/self/cgroup and
// /proc/self/mountinfo) as ceil(quota / period); 0 where none is set or nothing is readable.
// `root` prefixes every path ("" for the real ones; tests give a tree of their own).
int cgroup_cpu_limit(const std::string& root);
int fork_count();   // forks this process's line has gone through since the library was loaded
// A step uses at most one thread per `grain` bytes of memory traffic (serially below 2 grains):
// starting a parallel region costs ~1.5 us, so small steps are faster on one thread.
void set_grain(int64_t bytes);
int64_t get_grain();

// One optimizer step over every tensor of the plan (one parallel region).  `step` is the
// 1-based step number after this update.  Throws std::invalid_argument when the plan does not
// have the state buffers the hyper-parameters' variant needs.  Updates `h` for optimizers with
// running scalars (NAdam's mu_product).
template <class Opt> void step(const Plan& plan, typename Opt::Hyper& h, int64_t step);

// Sparse row updates: the optimizer's element functor over the rows `index[0..k)` of a parameter
// viewed as nrows x width (C order), with gradient row i of `rows` (k x width) for row index[i];
// the other rows, and their state, are not touched.  param, rows and the nstate state arrays
// (param's shape) all hold `dtype` (f32 or f64).  `index` must be strictly increasing (unique:
// duplicates are summed by the caller first, as torch coalesces) and in [0, nrows).  Rows run in
// parallel (whole rows per chunk).
struct Rows {
  DType dtype = DType::f32;
  void* param = nullptr;
  int64_t nrows = 0, width = 0;
  const int64_t* index = nullptr;
  int64_t k = 0;
  const void* rows = nullptr;
  void* state[kMaxState] = {nullptr, nullptr, nullptr};
  int nstate = 0;
};
// step_rows runs `n` such jobs, job i with hyper-parameters hypers[i] and step number steps[i]
// (one optimizer step of several parameters): every job is checked first (state count, step,
// dtype, indices: std::invalid_argument / std::out_of_range naming the job), then all run, so a
// refused job leaves every job untouched.  The caller checks that no two arrays overlap.  Row
// optimizers keep no running scalars (no after_step), so the hyper-parameters are read only.
template <class Opt>
void step_rows(const Rows* jobs, const typename Opt::Hyper* hypers, const int64_t* steps,
               std::size_t n);

// The sum of squares of a plan's transformed gradients and whether they are all finite (see
// GradStats, plan.hpp): deterministic for any thread count and ISA.  Reads the bound gradients
// only.
GradStats grad_stats(const Plan& plan);

// Each tensor's `param` += scale * its bound gradient (the plan's params being an optimizer's
// gradient buffers: micro-batch accumulation), one pass; 16-bit buffers rounded to nearest.
void accumulate(const Plan& plan, double scale);

// The element-wise part of a Newton-Schulz iteration (Muon, host.py) between its BLAS products,
// on all threads: out[i] = alpha * x[i] + beta * y[i], each product rounded to T before the sum
// (no fused multiply-add: NumPy's `out = x * alpha; out += y * beta`), then, when `bf16`, rounded
// to the nearest bfloat16 (ties to even; a finite value at the top carries into Inf, NaN stays
// NaN: torch's conversion) and kept in T.  `out` may be `x` or `y`.
void combine(float* out, const float* x, const float* y, float alpha, float beta, int64_t n,
             bool bf16);
void combine(double* out, const double* x, const double* y, double alpha, double beta,
             int64_t n);
// out[i] = lerp(a[i], b[i], w) from the nearer end, as torch.lerp evaluates it: a + (b - a) * w
// when w < 0.5, else b - (b - a) * (1 - w), each operation rounded to T (no fused multiply-add:
// host.py's NumPy route, bit for bit), on all threads: Muon's momentum and Nesterov blend.
// `out` may be `a` or `b`.
void lerp(float* out, const float* a, const float* b, float w, int64_t n);
void lerp(double* out, const double* a, const double* b, double w, int64_t n);
// The m x m row-major matrix `a` made symmetric from its upper triangle (diagonal included; the
// lower triangle's old values are never read), on all threads; with `bf16` every element is
// first rounded to the nearest bfloat16 as `combine` rounds.  BLAS syrk's result (upper
// triangle only) made whole: Newton-Schulz's A = X X^T.
void symmetrize(float* a, int64_t m, bool bf16);
void symmetrize(double* a, int64_t m);
// out (cols x rows) = x (rows x cols) transposed, both row-major and disjoint, on all threads
// (Newton-Schulz's tall inputs).
void transpose(float* out, const float* x, int64_t rows, int64_t cols);
void transpose(double* out, const double* x, int64_t rows, int64_t cols);
// x[i] = x[i] / d in place (IEEE division, NumPy's np.divide), then rounded to the nearest
// bfloat16 as `combine` rounds when `bf16`, on all threads (Newton-Schulz's X / ||X||).
void divide(float* x, float d, int64_t n, bool bf16);
void divide(double* x, double d, int64_t n);
// x[i] rounded to the nearest bfloat16 in place, as `combine` rounds.
void round_bfloat16(float* x, int64_t n);
// out[i] = x[i] rounded to the nearest bfloat16 (bf16) or float16, ties to even: the bits a
// step's round-to-nearest store writes (convert.hpp: NaN quieted, overflow to Inf), on all
// threads; out and x disjoint (fo.load's copy-outs).
void round_to(uint16_t* out, const float* x, int64_t n, bool bf16);
// OpenBLAS's threaded operations run their jobs on fastoptim's pool from the first call with
// `on` until as many calls without: `setter` is that OpenBLAS's
// openblas_set_threads_callback_function (>= 0.3.28), given the pool's callback, then nullptr
// (OpenBLAS's own threads).  Newton-Schulz's products and passes then share one pool, and the
// passes' workers spin for the next product (see dispatch.cpp).  (An `on` while the callback
// is set counts, whatever its setter.)  A forked child starts with it unset.
void blas_threads_on_pool(void* setter, bool on);
// Threaded BLAS calls the callback has run so far: on the pool, and on threads of their own
// (more jobs than the pool may have threads).
struct BlasCalls {
  int64_t pool, threads;
};
BlasCalls blas_calls();

// Streaming reference kernel for roofline measurements, with a step's thread layout: one pass
// over `narrays` float arrays of n elements (2 to kMaxState + 2) that reads all of them and
// writes all but the last, the memory traffic of an optimizer step with narrays - 2 states.
void stream(float* const* arrays, int narrays, int64_t n);

// The roofline of a pass that only reads n float32 values (their sum), with grad_stats' chunks.
double stream_read(const float* a, int64_t n);

// The same for the layouts with 16-bit arrays (StreamArrays, plan.hpp).
void stream_mixed(const StreamArrays& arrays, int64_t n);

// Block-wise quantization of n float32 values with map m (quantize.hpp): codes and one float32
// absmax per block (8-bit maps: blocks of kQBlock, a code per value; 4-bit: blocks of kQBlock4,
// two codes per byte, element 2i in the high nibble), and back: the driver's per-block code on
// the active ISA and threads, the same codes and values whatever those.
void quantize_blockwise(const float* values, int64_t n, QMap m, uint8_t* codes, float* absmax);
void dequantize_blockwise(const uint8_t* codes, const float* absmax, int64_t n, QMap m,
                          float* out);

}  // namespace fastoptim
