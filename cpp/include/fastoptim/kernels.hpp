// Per-element maths: one small functor per optimizer, generic over float/double.
//
// Each Kernel<Opt, T, V> (V = the variant's flag bits) holds the step's Coeffs by value and
// updates one element: the parameter p, its gradient g and the variant's state values s[0..N).
// The driver (step.cpp) runs it inside a vectorized loop; the very same functor handles
// every element, tails included, so results do not depend on chunking, alignment or threads.
//
// Operation order follows torch.optim's single-tensor ("for-loop") implementation, except that
// a division by a per-step constant (Adam's sqrt(1 - beta2^t), NAdam's 1 - beta2^t, RAdam's
// 1 - beta1^t) is a multiplication by its reciprocal, computed once per step in double: the
// divider is the slowest unit in these kernels and limits them when the data is in cache.  Products
// that torch fuses or that are naturally a*b+c are written with fmadd, which is one fused
// instruction on ISAs with FMA and a*b+c (two roundings) on the baseline x86-64 build; the
// project compiles with -ffp-contract=off so the compiler never fuses anything on its own.
#pragma once

#include <array>
#include <cmath>
#include <type_traits>

#include "fastoptim/optimizers.hpp"

namespace fastoptim {
// Internal linkage (as quantize.hpp's per-element functions): each ISA's driver compiles its own
// copy.  With external linkage, a kernel the compiler does not inline is one weak symbol that
// every ISA's object defines, and the linker keeps one of them for all: AVX-512 code could then
// run in the AVX2 or the baseline build.
namespace {

template <class T> inline T fmadd(T a, T b, T c) {
#if defined(__FMA__) || defined(__AVX2__) || defined(__ARM_FEATURE_FMA) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// torch.lerp: a + w * (b - a), evaluated from the nearer end as torch does.
template <class T> inline T lerp(T a, T b, T w) {
  const T d = b - a;
  return w < T(0.5) ? fmadd(w, d, a) : fmadd(-d, T(1) - w, b);
}

// sign with sign(0) = 0 and NaN propagated.
template <class T> inline T sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x); }

// torch.maximum: NaN propagates.
template <class T> inline T maximum(T a, T b) { return (a > b || a != a) ? a : b; }

// The gradient as torch's optimizers see it: negated when maximizing, plus L2 weight decay
// only when there is some (as torch: 0 * p would turn an infinite parameter into NaN).
template <class T, class C> inline T effective_grad(const C& c, T p, T g) {
  const T g1 = T(c.gsign) * g;
  return c.wd != 0 ? fmadd(T(c.wd), p, g1) : g1;
}

// avg * keep + (1 - keep) * x^2, in torch's order (mul_(keep).addcmul_(x, x, value=1-keep)).
template <class T> inline T ema_square(T avg, T x, double keep, double one_minus_keep) {
  return fmadd(T(one_minus_keep) * x, x, avg * T(keep));
}

// Adam's first and second moments (Adam, NAdam, RAdam): exp_avg.lerp_(g, 1 - beta1);
// exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2).
template <class T, class C> inline void adam_moments(const C& c, T g, T& exp_avg, T& exp_avg_sq) {
  exp_avg = lerp(exp_avg, g, T(c.one_minus_beta1));
  exp_avg_sq = ema_square(exp_avg_sq, g, c.beta2, c.one_minus_beta2);
}

// Cautious optimizers (Liang et al. 2024), element-wise: the update u where it agrees in sign
// with the gradient, 0 elsewhere, as u * mask with mask = (agree > 0) in {0, 1} (NaN and inf
// propagate through the product as in the reference code).  The paper then divides by the
// tensor's mean of the mask: that per-tensor rescaling is NOT applied here.
template <class T> inline T cautious_mask(T u, T agree) { return u * (agree > T(0) ? T(1) : T(0)); }

template <class Opt, class T, unsigned V> struct Kernel;

template <class T, unsigned V> struct Kernel<SGD, T, V> {
  static constexpr int nstate = SGD::nstate(V);
  SGD::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    g = effective_grad(c, p, g);
    if constexpr ((V & SGD::kKeras) != 0) p = p * T(c.decay);
    if constexpr ((V & SGD::kMomentum) != 0) {
      T& buf = s[0];
      buf = fmadd(T(c.mom_keep), buf, T(c.mom_grad) * g);
      // torch: g + mu * buf (nesterov_grad = 1, exact); Keras: mu * buf - lr * g
      const T d =
          (V & SGD::kNesterov) ? fmadd(T(c.nesterov_mom), buf, T(c.nesterov_grad) * g) : buf;
      g = (V & SGD::kCautious) ? cautious_mask(d, d * g) : d;
    }
    p = fmadd(T(c.neg_lr), g, p);
  }
};

template <class T, unsigned V> struct Kernel<Adagrad, T, V> {
  static constexpr int nstate = 1;
  Adagrad::Coeffs c;
  void operator()(T& p, T g, std::array<T, 1>& s) const {
    T& sum = s[0];
    g = effective_grad(c, p, g);
    sum = fmadd(g, g, sum);
    if constexpr ((V & Adagrad::kKeras) != 0) {
      p = fmadd(T(c.neg_clr), g / std::sqrt(sum + T(c.eps)), p * T(c.decay));
    } else {
      p = fmadd(T(c.neg_clr), g / (std::sqrt(sum) + T(c.eps)), p);
    }
  }
};

template <class T, unsigned V> struct Kernel<RMSprop, T, V> {
  static constexpr bool centered = (V & RMSprop::kCentered) != 0;
  static constexpr bool momentum = (V & RMSprop::kMomentum) != 0;
  static constexpr bool keras = (V & RMSprop::kKeras) != 0;
  static constexpr int nstate = RMSprop::nstate(V);
  RMSprop::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    T& square_avg = s[0];
    g = effective_grad(c, p, g);
    if constexpr (keras) p = p * T(c.decay);
    square_avg = ema_square(square_avg, g, c.alpha, c.one_minus_alpha);
    T var = square_avg;
    if constexpr (centered) {
      T& grad_avg = s[1];
      grad_avg = lerp(grad_avg, g, T(c.one_minus_alpha));
      // torch's addcmul is fused; Keras subtracts the rounded square (exactly 0 where the
      // gradient has not varied, e.g. rho = 0, where the fused residual could be negative)
      var = keras ? square_avg - grad_avg * grad_avg : fmadd(-grad_avg, grad_avg, square_avg);
      // Exactly, v >= m^2 (Jensen); rounded, and far more with the two averages stored
      // independently in float16/bfloat16/int8/int4, v - m^2 can come out negative where the
      // gradient barely varies, and sqrt would write NaN into the parameter.  Clamped at 0: it
      // departs from torch's maths only where torch's result is NaN.  NaN still propagates.
      var = var < T(0) ? T(0) : var;
    }
    // torch: sqrt(var) + eps; Keras: sqrt(var + eps), and its step is (lr * g) / denom
    const T avg = keras ? std::sqrt(var + T(c.eps)) : std::sqrt(var) + T(c.eps);
    const T step = (keras ? T(c.grad_scale) * g : g) / avg;
    if constexpr (momentum) {
      T& buf = s[nstate - 1];
      buf = fmadd(T(c.momentum), buf, step);
      p = fmadd(T(c.neg_lr), buf, p);
    } else {
      p = fmadd(T(c.neg_lr), step, p);
    }
  }
};

template <class T, unsigned V> struct Kernel<Adadelta, T, V> {
  static constexpr int nstate = 2;
  Adadelta::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& square_avg = s[0];
    T& acc_delta = s[1];
    g = effective_grad(c, p, g);
    square_avg = ema_square(square_avg, g, c.rho, c.one_minus_rho);
    const T std_ = std::sqrt(square_avg + T(c.eps));
    const T delta = std::sqrt(acc_delta + T(c.eps)) / std_ * g;
    acc_delta = ema_square(acc_delta, delta, c.rho, c.one_minus_rho);
    if constexpr ((V & Adadelta::kKeras) != 0) p = p * T(c.decay);
    p = fmadd(T(c.neg_lr), delta, p);
  }
};

template <class T, unsigned V> struct Kernel<Adam, T, V> {
  static constexpr int nstate = Adam::nstate(V);
  Adam::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    T& exp_avg = s[0];
    T& exp_avg_sq = s[1];
    g = effective_grad(c, p, g);
    adam_moments(c, g, exp_avg, exp_avg_sq);
    T v = exp_avg_sq;
    if constexpr ((V & Adam::kAmsgrad) != 0) {
      T& max_exp_avg_sq = s[2];
      max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
      v = max_exp_avg_sq;
    }
    const T denom = fmadd(std::sqrt(v), T(c.inv_bc2_sqrt), T(c.eps));
    T u = exp_avg / denom;
    if constexpr ((V & Adam::kCautious) != 0) u = cautious_mask(u, exp_avg * g);
    p = fmadd(T(c.neg_step), u, p * T(c.decay));
  }
};

template <class T, unsigned V> struct Kernel<Adamax, T, V> {
  static constexpr int nstate = 2;
  Adamax::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& exp_avg = s[0];
    T& exp_inf = s[1];
    g = effective_grad(c, p, g);
    exp_avg = lerp(exp_avg, g, T(c.one_minus_beta1));
    if constexpr ((V & Adamax::kKeras) != 0) {  // eps in the denominator, not in the state
      exp_inf = maximum(exp_inf * T(c.beta2), std::abs(g));
      p = fmadd(T(c.neg_clr), exp_avg / (exp_inf + T(c.eps)), p * T(c.decay));
    } else {
      exp_inf = maximum(exp_inf * T(c.beta2), std::abs(g) + T(c.eps));
      p = fmadd(T(c.neg_clr), exp_avg / exp_inf, p);
    }
  }
};

template <class T, unsigned V> struct Kernel<NAdam, T, V> {
  static constexpr int nstate = 2;
  NAdam::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& exp_avg = s[0];
    T& exp_avg_sq = s[1];
    g = effective_grad(c, p, g);
    adam_moments(c, g, exp_avg, exp_avg_sq);
    const T denom = std::sqrt(exp_avg_sq * T(c.inv_bc2)) + T(c.eps);
    if constexpr ((V & NAdam::kCautious) != 0) {
      // The whole Nesterov update u (added to p): kept where the step -u agrees with g.
      const T u = fmadd(T(c.avg_coef), exp_avg / denom, T(c.grad_coef) * (g / denom));
      p = p * T(c.decay) + cautious_mask(u, -(u * g));
    } else {
      p = fmadd(T(c.grad_coef), g / denom, p * T(c.decay));
      p = fmadd(T(c.avg_coef), exp_avg / denom, p);
    }
  }
};

template <class T, unsigned V> struct Kernel<RAdam, T, V> {
  static constexpr int nstate = 2;
  RAdam::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& exp_avg = s[0];
    T& exp_avg_sq = s[1];
    g = effective_grad(c, p, g);
    adam_moments(c, g, exp_avg, exp_avg_sq);
    const T step = exp_avg * T(c.inv_bc1) * T(c.lr);
    const T adaptive_lr = T(c.bc2_sqrt) / (std::sqrt(exp_avg_sq) + T(c.eps));
    // Rectified (rho_t > 5): step * adaptive_lr * rect; before that: step (rect = 1).
    const T factor = c.rectify != 0 ? adaptive_lr : T(1);
    T u = step * factor * T(c.rect);
    if constexpr ((V & RAdam::kCautious) != 0) u = cautious_mask(u, exp_avg * g);
    p = p * T(c.decay) - u;
  }
};

template <class T, unsigned V> struct Kernel<Lion, T, V> {
  static constexpr int nstate = 1;
  Lion::Coeffs c;
  void operator()(T& p, T g, std::array<T, 1>& s) const {
    T& exp_avg = s[0];
    g = T(c.gsign) * g;
    T update = sign(fmadd(T(c.beta1), exp_avg, T(c.one_minus_beta1) * g));
    if constexpr ((V & Lion::kCautious) != 0) update = cautious_mask(update, update * g);
    p = fmadd(T(c.neg_lr), update, p * T(c.decay));
    exp_avg = fmadd(T(c.beta2), exp_avg, T(c.one_minus_beta2) * g);
  }
};

template <class T, unsigned V> struct Kernel<Rprop, T, V> {
  static constexpr int nstate = 2;
  Rprop::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& prev = s[0];
    T& step_size = s[1];
    g = T(c.gsign) * g;
    // torch: sign = (g * prev).sign() (torch.sign(NaN) = 0); sign[sign > 0] = etaplus;
    // sign[sign < 0] = etaminus; sign[sign == 0] = 1, in that order and in T (an etaminus that
    // is 0 in T becomes 1); all selects, no branches.
    const T prod = g * prev;
    const T etaminus = T(c.etaminus);
    T factor = prod > T(0) ? T(c.etaplus) : (prod < T(0) ? etaminus : T(0));
    factor = factor == T(0) ? T(1) : factor;
    // step_size.mul_(factor).clamp_(min, max): NaN propagates.
    T ss = step_size * factor;
    ss = ss < T(c.step_size_min) ? T(c.step_size_min) : ss;
    ss = ss > T(c.step_size_max) ? T(c.step_size_max) : ss;
    step_size = ss;
    g = factor == etaminus ? T(0) : g;  // the sign changed: no step, forget the gradient
    // addcmul_(g.sign(), step_size, value=-1) = p + -(sign * ss); torch.sign(NaN) = 0.  The
    // product is exact; for a zero sign it is -0, which keeps a -0 parameter -0 as torch.
    p = fmadd(g > T(0) ? T(-1) : (g < T(0) ? T(1) : T(-0.0)), ss, p);
    prev = g;
  }
};

template <class T, unsigned V> struct Kernel<ASGD, T, V> {
  static constexpr int nstate = 1;
  ASGD::Coeffs c;
  void operator()(T& p, T g, std::array<T, 1>& s) const {
    T& ax = s[0];
    g = effective_grad(c, p, g);
    p = fmadd(T(c.neg_eta), g, p * T(c.decay));
    // torch: ax.add_(param.sub(ax).mul_(mu)) while mu != 1, else ax.copy_(param)
    ax = c.average != 0 ? ax + (p - ax) * T(c.mu) : p;
  }
};

template <class T, unsigned V> struct Kernel<ADOPT, T, V> {
  static constexpr int nstate = 2;
  ADOPT::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    T& exp_avg = s[0];
    T& exp_avg_sq = s[1];
    g = effective_grad(c, p, g);
    // torch.clamp(sqrt(v), min=eps), then normed_grad.clamp_(-clip, clip): NaN propagates
    const T root = std::sqrt(exp_avg_sq);
    T normed = g / (root < T(c.eps) ? T(c.eps) : root);
    const T clip = T(c.clip);
    normed = normed < -clip ? -clip : (normed > clip ? clip : normed);
    const T m = lerp(exp_avg, normed, T(c.one_minus_beta1));
    const T u = (V & ADOPT::kCautious) != 0 ? cautious_mask(m, m * g) : m;
    const T v = ema_square(exp_avg_sq, g, c.beta2, c.one_minus_beta2);
    // The first step only initialises v (exp_avg_sq.addcmul_(g, g)): selects, not branches.
    const bool first = c.first != 0;
    p = first ? p : fmadd(T(c.neg_lr), u, p * T(c.decay));
    exp_avg = first ? exp_avg : m;
    exp_avg_sq = first ? fmadd(g, g, exp_avg_sq) : v;
  }
};

// Schedule-Free: p <- torch.lerp(p, z, w) from the nearer end (|w| < 0.5: p + w (z - p), else
// z - (z - p)(1 - w)), z read through the gradient slot.
template <class T, class C> inline T schedule_free_swap(const C& c, T p, T z) {
  const T d = z - p;
  return c.small != 0 ? fmadd(T(c.w), d, p) : fmadd(-d, T(1) - T(c.w), z);
}

template <class T, unsigned V> struct Kernel<AdamWScheduleFree, T, V> {
  static constexpr int nstate = AdamWScheduleFree::nstate(V);
  AdamWScheduleFree::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    if constexpr ((V & AdamWScheduleFree::kSwap) != 0) {
      p = schedule_free_swap(c, p, g);
    } else {
      T& z = s[0];
      T& exp_avg_sq = s[1];
      g = T(c.gsign) * g;
      exp_avg_sq = ema_square(exp_avg_sq, g, c.beta2, c.one_minus_beta2);
      T u = g / (std::sqrt(exp_avg_sq * T(c.inv_bc2)) + T(c.eps));
      u = c.wd != 0 ? fmadd(T(c.wd), p, u) : u;  // weight decay at y
      p = fmadd(T(c.y_coef), u, lerp(p, z, T(c.ckp1)));
      z = fmadd(T(c.neg_lr), u, z);
    }
  }
};

template <class T, unsigned V> struct Kernel<SGDScheduleFree, T, V> {
  static constexpr int nstate = SGDScheduleFree::nstate(V);
  SGDScheduleFree::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    if constexpr ((V & SGDScheduleFree::kSwap) != 0) {
      p = schedule_free_swap(c, p, g);
    } else {
      T& z = s[0];
      g = effective_grad(c, p, g);  // (-g when maximizing) + weight_decay * y
      p = fmadd(T(c.y_coef), g, lerp(p, z, T(c.ckp1)));
      z = fmadd(T(c.neg_lr), g, z);
    }
  }
};

// torch's _functional.sparse_adam, operation for operation (no fused multiply-add anywhere:
// torch rounds every product): m += (1 - beta1) (g - m); v += (1 - beta2) (g^2 - v);
// p += -step_size * (m / (sqrt(v) + eps)).
template <class T, unsigned V> struct Kernel<SparseAdam, T, V> {
  static constexpr int nstate = 2;
  SparseAdam::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    g = T(c.gsign) * g;
    const T m = s[0] + (g - s[0]) * T(c.one_minus_beta1);
    const T v = s[1] + (g * g - s[1]) * T(c.one_minus_beta2);
    s[0] = m;
    s[1] = v;
    p = p + T(c.neg_step) * (m / (std::sqrt(v) + T(c.eps)));
  }
};

// ---------------------------------------------------------------------------------------------
// The two-pass optimizers (optimizers.hpp's kReduce).  Reduce<Opt, T, V> is pass 1's functor for
// kReduce == 2: moments() updates the state from the (transformed) gradient, update() is the
// update u whose norm pass 1 takes, computed from the STORED state (the driver stores the state,
// in float32/float64 as the kernel computes, and reads it back before update()), so that pass 2,
// which recomputes u with the same function from the same stored values, applies exactly the u
// whose norm gave the trust ratio.  Kernel<Opt, T, V> is pass 2 (kWritesState false: the driver
// does not store the state it only reads).  A tensor whose state is stored in another dtype
// (rounded) keeps its state untouched in pass 1 and runs Kernel<Opt, T, V | kRecompute> in pass
// 2: moments() again from the stored state, then update(), then the state stored rounded; so
// u is always that of the unrounded moments, as a float32 step's.
template <class Opt, class T, unsigned V> struct Reduce;

template <class T, unsigned V> struct Reduce<LAMB, T, V> {
  static constexpr int nstate = 2;
  LAMB::Coeffs c;
  void moments(T g, std::array<T, 2>& s) const {
    adam_moments(c, T(c.gsign) * g, s[0], s[1]);
  }
  T update(T p, const std::array<T, 2>& s) const {
    const T denom = fmadd(std::sqrt(s[1]), T(c.inv_bc2_sqrt), T(c.eps));
    const T u = (s[0] * T(c.inv_bc1)) / denom;
    return c.wd != 0 ? fmadd(T(c.wd), p, u) : u;
  }
};

template <class T, unsigned V> struct Kernel<LAMB, T, V> {
  static constexpr int nstate = 2;
  static constexpr bool kWritesState = (V & LAMB::kRecompute) != 0;
  LAMB::Coeffs c;
  void operator()(T& p, T g, std::array<T, 2>& s) const {
    const Reduce<LAMB, T, V> r{c};
    if constexpr (kWritesState) r.moments(g, s);
    p = fmadd(T(c.neg_step), r.update(p, s), p * T(c.decay));
  }
};

template <class T, unsigned V> struct Kernel<LARS, T, V> {
  static constexpr int nstate = LARS::nstate(V);
  LARS::Coeffs c;
  void operator()(T& p, T g, std::array<T, nstate>& s) const {
    g = T(c.gsign) * g;
    g = (c.wd_t != 0 ? fmadd(T(c.wd_t), p, g) : g) * T(c.scale);
    if constexpr ((V & LARS::kMomentum) != 0) {
      T& buf = s[0];
      buf = fmadd(T(c.momentum), buf, T(c.one_minus_dampening) * g);
      g = (V & LARS::kNesterov) != 0 ? fmadd(T(c.momentum), buf, g) : buf;
    }
    p = fmadd(T(c.neg_lr), g, p);
  }
};

// Whether a kernel writes its state back (all but pass 2 of a two-pass optimizer).
template <class K, class = void> struct writes_state : std::true_type {};
template <class K>
struct writes_state<K, std::void_t<decltype(K::kWritesState)>>
    : std::integral_constant<bool, K::kWritesState> {};

}  // namespace
}  // namespace fastoptim
