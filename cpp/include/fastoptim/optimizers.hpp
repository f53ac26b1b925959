// One struct per optimizer: hyper-parameters (Hyper), the per-step scalars the element kernel
// needs (Coeffs, computed once per step in double, as torch.optim does), the variants (template
// flags that change which state buffers exist) and the names of those buffers (torch's names).
//
// Pure C++: no Python here.  The element-wise maths lives in kernels.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastoptim {

namespace detail {
// -1 when maximizing (the gradient is negated first, as in torch), else +1.
inline double grad_sign(bool maximize) { return maximize ? -1.0 : 1.0; }
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// SGD with momentum, dampening and Nesterov (torch.optim.SGD).
struct SGD {
  struct Hyper {
    double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
    bool nesterov = false, maximize = false;
    // The momentum buffer was just created: torch sets buf = grad on its first use.
    bool first_momentum_step = true;
    // Keras's form (fastoptim.keras.SGD): buf = momentum * buf - lr * g, p += buf (Nesterov:
    // p += momentum * buf - lr * g), no dampening, decoupled weight decay p *= 1 - lr * wd.
    bool keras = false;
    // Cautious (Liang et al. 2024), element-wise: the step d is zeroed where d * g <= 0.
    bool cautious = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("momentum", &Hyper::momentum); f("dampening", &Hyper::dampening);
    f("weight_decay", &Hyper::weight_decay); f("nesterov", &Hyper::nesterov);
    f("maximize", &Hyper::maximize); f("first_momentum_step", &Hyper::first_momentum_step);
    f("keras", &Hyper::keras); f("cautious", &Hyper::cautious);
  }
  // d = nesterov ? nesterov_grad * g + nesterov_mom * buf : buf; p = decay * p + neg_lr * d
  struct Coeffs { double gsign, wd, decay, neg_lr, mom_keep, mom_grad, nesterov_mom, nesterov_grad; };
  enum : unsigned { kMomentum = 1, kNesterov = 2, kKeras = 4, kCautious = 8, kVariants = 16 };
  static unsigned variant(const Hyper& h) {
    return (h.momentum != 0 ? kMomentum | (h.nesterov ? kNesterov : 0u) : 0u) |
           (h.keras ? kKeras : 0u) | (h.cautious ? kCautious : 0u);
  }
  static constexpr int nstate(unsigned v) { return (v & kMomentum) ? 1 : 0; }
  static std::vector<const char*> states(unsigned v) {
    if (v & kMomentum) return {"momentum_buffer"};
    return {};
  }
  static Coeffs prepare(const Hyper& h, int64_t /*step*/) {
    if (h.keras) {
      const bool mom = h.momentum != 0;  // the buffer then holds the lr-scaled step
      return {detail::grad_sign(h.maximize), 0.0, 1.0 - h.lr * h.weight_decay,
              mom ? 1.0 : -h.lr, h.momentum, -h.lr, h.momentum, -h.lr};
    }
    // First step: buf = -0 * buf + g on the new (zero) buffer, exactly g as torch's clone, -0
    // included (+0 * buf + g made a -0 gradient +0).
    const bool first = h.first_momentum_step;
    return {detail::grad_sign(h.maximize), h.weight_decay, 1.0, -h.lr,
            first ? -0.0 : h.momentum, first ? 1.0 : 1.0 - h.dampening, h.momentum, 1.0};
  }
};

// ---------------------------------------------------------------------------------------------
// Adagrad (Duchi et al. 2011; torch.optim.Adagrad).
struct Adagrad {
  struct Hyper {
    double lr = 1e-2, lr_decay = 0, weight_decay = 0, eps = 1e-10;
    bool maximize = false;
    // Keras's form: eps inside the square root, decoupled weight decay p *= 1 - lr * wd.
    bool keras = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("lr_decay", &Hyper::lr_decay); f("weight_decay", &Hyper::weight_decay);
    f("eps", &Hyper::eps); f("maximize", &Hyper::maximize); f("keras", &Hyper::keras);
  }
  struct Coeffs { double gsign, wd, decay, neg_clr, eps; };
  enum : unsigned { kKeras = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.keras ? kKeras : 0u; }
  static constexpr int nstate(unsigned) { return 1; }
  static std::vector<const char*> states(unsigned) { return {"sum"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double clr = h.lr / (1.0 + static_cast<double>(step - 1) * h.lr_decay);
    if (h.keras) return {detail::grad_sign(h.maximize), 0.0, 1.0 - h.lr * h.weight_decay, -clr, h.eps};
    return {detail::grad_sign(h.maximize), h.weight_decay, 1.0, -clr, h.eps};
  }
};

// ---------------------------------------------------------------------------------------------
// RMSprop (Hinton's lecture 6e; torch.optim.RMSprop), optionally centered and with momentum.
struct RMSprop {
  struct Hyper {
    double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
    bool centered = false, maximize = false;
    // Keras's form: eps inside the square root, the momentum buffer accumulates lr * g / denom
    // (p -= buf), decoupled weight decay p *= 1 - lr * wd.
    bool keras = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("alpha", &Hyper::alpha); f("eps", &Hyper::eps);
    f("weight_decay", &Hyper::weight_decay); f("momentum", &Hyper::momentum);
    f("centered", &Hyper::centered); f("maximize", &Hyper::maximize); f("keras", &Hyper::keras);
  }
  // step = grad_scale * g / denom; buf = momentum * buf + step; p = decay * p + neg_lr * (buf or step)
  struct Coeffs { double gsign, wd, decay, alpha, one_minus_alpha, eps, momentum, grad_scale, neg_lr; };
  enum : unsigned { kMomentum = 1, kCentered = 2, kKeras = 4, kVariants = 8 };
  static unsigned variant(const Hyper& h) {
    return (h.momentum > 0 ? kMomentum : 0u) | (h.centered ? kCentered : 0u) |
           (h.keras ? kKeras : 0u);
  }
  // Slot order: square_avg, [grad_avg], [momentum_buffer].
  static constexpr int nstate(unsigned v) {
    return 1 + ((v & kCentered) ? 1 : 0) + ((v & kMomentum) ? 1 : 0);
  }
  static std::vector<const char*> states(unsigned v) {
    std::vector<const char*> s{"square_avg"};
    if (v & kCentered) s.push_back("grad_avg");
    if (v & kMomentum) s.push_back("momentum_buffer");
    return s;
  }
  static Coeffs prepare(const Hyper& h, int64_t) {
    if (h.keras)
      return {detail::grad_sign(h.maximize), 0.0, 1.0 - h.lr * h.weight_decay, h.alpha,
              1.0 - h.alpha, h.eps, h.momentum, h.lr, -1.0};
    return {detail::grad_sign(h.maximize), h.weight_decay, 1.0, h.alpha, 1.0 - h.alpha,
            h.eps, h.momentum, 1.0, -h.lr};
  }
};

// ---------------------------------------------------------------------------------------------
// Adadelta (Zeiler 2012; torch.optim.Adadelta).
struct Adadelta {
  struct Hyper {
    double lr = 1.0, rho = 0.9, eps = 1e-6, weight_decay = 0;
    bool maximize = false;
    bool keras = false;  // Keras's form: decoupled weight decay p *= 1 - lr * wd
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("rho", &Hyper::rho); f("eps", &Hyper::eps);
    f("weight_decay", &Hyper::weight_decay); f("maximize", &Hyper::maximize);
    f("keras", &Hyper::keras);
  }
  struct Coeffs { double gsign, wd, decay, rho, one_minus_rho, eps, neg_lr; };
  enum : unsigned { kKeras = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.keras ? kKeras : 0u; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"square_avg", "acc_delta"}; }
  static Coeffs prepare(const Hyper& h, int64_t) {
    const bool k = h.keras;
    return {detail::grad_sign(h.maximize), k ? 0.0 : h.weight_decay,
            k ? 1.0 - h.lr * h.weight_decay : 1.0, h.rho, 1.0 - h.rho, h.eps, -h.lr};
  }
};

// ---------------------------------------------------------------------------------------------
// Adam / AdamW / AMSGrad (Kingma & Ba 2015; Loshchilov & Hutter 2019; Reddi et al. 2018).
struct Adam {
  struct Hyper {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool amsgrad = false, maximize = false, decoupled_weight_decay = false;
    // Keras's eps, added to sqrt(v) before the bias correction: torch's form with
    // eps_t = eps / sqrt(1 - beta2^t).
    bool keras = false;
    // Cautious (Liang et al. 2024), element-wise: the step is zeroed where exp_avg * g <= 0.
    bool cautious = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay);
    f("amsgrad", &Hyper::amsgrad); f("maximize", &Hyper::maximize);
    f("decoupled_weight_decay", &Hyper::decoupled_weight_decay); f("keras", &Hyper::keras);
    f("cautious", &Hyper::cautious);
  }
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc2_sqrt, eps, neg_step; };
  enum : unsigned { kAmsgrad = 1, kCautious = 2, kVariants = 4 };
  static unsigned variant(const Hyper& h) {
    return (h.amsgrad ? kAmsgrad : 0u) | (h.cautious ? kCautious : 0u);
  }
  static constexpr int nstate(unsigned v) { return (v & kAmsgrad) ? 3 : 2; }
  static std::vector<const char*> states(unsigned v) {
    if (v & kAmsgrad) return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
    return {"exp_avg", "exp_avg_sq"};
  }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double s = static_cast<double>(step);
    const double bc1 = 1.0 - std::pow(h.beta1, s), bc2 = 1.0 - std::pow(h.beta2, s);
    const bool dec = h.decoupled_weight_decay;
    return {detail::grad_sign(h.maximize), dec ? 0.0 : h.weight_decay,
            dec ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2,
            1.0 / std::sqrt(bc2), h.keras ? h.eps / std::sqrt(bc2) : h.eps, -h.lr / bc1};
  }
};

// ---------------------------------------------------------------------------------------------
// Adamax (Kingma & Ba 2015, section 7; torch.optim.Adamax).
struct Adamax {
  struct Hyper {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool maximize = false;
    // Keras's form: u = max(beta2 u, |g|) and p -= lr / (1 - beta1^t) * m / (u + eps);
    // decoupled weight decay p *= 1 - lr * wd.
    bool keras = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay); f("maximize", &Hyper::maximize);
    f("keras", &Hyper::keras);
  }
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, eps, neg_clr; };
  enum : unsigned { kKeras = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.keras ? kKeras : 0u; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_inf"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
    const bool k = h.keras;
    return {detail::grad_sign(h.maximize), k ? 0.0 : h.weight_decay,
            k ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2, h.eps, -h.lr / bc1};
  }
};

// ---------------------------------------------------------------------------------------------
// NAdam (Dozat 2016; torch.optim.NAdam).  mu_product is the running product of the momentum
// schedule mu_1 ... mu_{t-1}; the driver advances it after each step (after_step).
struct NAdam {
  struct Hyper {
    double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0,
           momentum_decay = 4e-3, mu_product = 1.0;
    bool decoupled_weight_decay = false, maximize = false;
    // Cautious, element-wise: the update (both terms) is zeroed where it disagrees with g.
    bool cautious = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay);
    f("momentum_decay", &Hyper::momentum_decay); f("mu_product", &Hyper::mu_product);
    f("decoupled_weight_decay", &Hyper::decoupled_weight_decay); f("maximize", &Hyper::maximize);
    f("cautious", &Hyper::cautious);
  }
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc2, eps, grad_coef, avg_coef; };
  enum : unsigned { kCautious = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.cautious ? kCautious : 0u; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_avg_sq"}; }
  static double mu(const Hyper& h, double step) {  // (double: step + 1 never overflows int64)
    return h.beta1 * (1.0 - 0.5 * std::pow(0.96, step * h.momentum_decay));
  }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
    const double t = static_cast<double>(step), mu_t = mu(h, t), mu_next = mu(h, t + 1.0);
    const double prod = h.mu_product * mu_t, prod_next = prod * mu_next;
    const bool dec = h.decoupled_weight_decay;
    return {detail::grad_sign(h.maximize), dec ? 0.0 : h.weight_decay,
            dec ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2, 1.0 / bc2,
            h.eps, -h.lr * (1.0 - mu_t) / (1.0 - prod), (-h.lr * mu_next) / (1.0 - prod_next)};
  }
  static void after_step(Hyper& h, int64_t step) {
    h.mu_product *= mu(h, static_cast<double>(step));
  }
};

// ---------------------------------------------------------------------------------------------
// RAdam (Liu et al. 2020; torch.optim.RAdam).
struct RAdam {
  struct Hyper {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
    bool decoupled_weight_decay = false, maximize = false;
    bool cautious = false;  // Cautious, element-wise: the step is zeroed where exp_avg * g <= 0
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay);
    f("decoupled_weight_decay", &Hyper::decoupled_weight_decay); f("maximize", &Hyper::maximize);
    f("cautious", &Hyper::cautious);
  }
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, lr, bc2_sqrt, eps, rect, rectify; };
  enum : unsigned { kCautious = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.cautious ? kCautious : 0u; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_avg_sq"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double s = static_cast<double>(step);
    const double bc1 = 1.0 - std::pow(h.beta1, s), bc2 = 1.0 - std::pow(h.beta2, s);
    const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * s * std::pow(h.beta2, s) / bc2;
    const bool rectify = rho_t > 5.0;
    const double rect = rectify ? std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                            ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                                : 1.0;
    const bool dec = h.decoupled_weight_decay;
    return {detail::grad_sign(h.maximize), dec ? 0.0 : h.weight_decay,
            dec ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2,
            1.0 / bc1, h.lr, std::sqrt(bc2), h.eps, rect, rectify ? 1.0 : 0.0};
  }
};

// ---------------------------------------------------------------------------------------------
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
struct Lion {
  struct Hyper {
    double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0;
    bool maximize = false;
    bool cautious = false;  // Cautious, element-wise: the sign step is zeroed where it * g <= 0
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("weight_decay", &Hyper::weight_decay); f("maximize", &Hyper::maximize);
    f("cautious", &Hyper::cautious);
  }
  struct Coeffs { double gsign, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr; };
  enum : unsigned { kCautious = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.cautious ? kCautious : 0u; }
  static constexpr int nstate(unsigned) { return 1; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg"}; }
  static Coeffs prepare(const Hyper& h, int64_t) {
    return {detail::grad_sign(h.maximize), 1.0 - h.lr * h.weight_decay, h.beta1, 1.0 - h.beta1,
            h.beta2, 1.0 - h.beta2, -h.lr};
  }
};

// ---------------------------------------------------------------------------------------------
// Rprop, resilient backpropagation (Riedmiller & Braun 1993; torch.optim.Rprop).  The learning
// rate only fills the step_size state when it is created (Python side): no field here.
struct Rprop {
  struct Hyper {
    double etaminus = 0.5, etaplus = 1.2, step_size_min = 1e-6, step_size_max = 50;
    bool maximize = false;
  };
  template <class F> static void fields(F&& f) {
    f("etaminus", &Hyper::etaminus); f("etaplus", &Hyper::etaplus);
    f("step_size_min", &Hyper::step_size_min); f("step_size_max", &Hyper::step_size_max);
    f("maximize", &Hyper::maximize);
  }
  struct Coeffs { double gsign, etaminus, etaplus, step_size_min, step_size_max; };
  enum : unsigned { kVariants = 1 };
  static unsigned variant(const Hyper&) { return 0; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"prev", "step_size"}; }
  static Coeffs prepare(const Hyper& h, int64_t) {
    return {detail::grad_sign(h.maximize), h.etaminus, h.etaplus, h.step_size_min,
            h.step_size_max};
  }
};

// ---------------------------------------------------------------------------------------------
// ASGD, averaged SGD (Polyak & Juditsky 1992; torch.optim.ASGD).  eta (the step's learning rate)
// and mu (the averaging weight) are scalar state like torch's: they start at lr and 1 (the
// Python side fills eta with the group's lr) and after each step are recomputed from the
// group's values of that step (after_step), so a changed lr takes effect one step later, as in
// torch.
struct ASGD {
  struct Hyper {
    double lr = 1e-2, lambd = 1e-4, alpha = 0.75, t0 = 1e6, weight_decay = 0, eta = 1e-2, mu = 1;
    bool maximize = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("lambd", &Hyper::lambd); f("alpha", &Hyper::alpha);
    f("t0", &Hyper::t0); f("weight_decay", &Hyper::weight_decay); f("eta", &Hyper::eta);
    f("mu", &Hyper::mu); f("maximize", &Hyper::maximize);
  }
  struct Coeffs { double gsign, wd, decay, neg_eta, mu, average; };
  enum : unsigned { kVariants = 1 };
  static unsigned variant(const Hyper&) { return 0; }
  static constexpr int nstate(unsigned) { return 1; }
  static std::vector<const char*> states(unsigned) { return {"ax"}; }
  static Coeffs prepare(const Hyper& h, int64_t) {
    return {detail::grad_sign(h.maximize), h.weight_decay, 1.0 - h.lambd * h.eta, -h.eta, h.mu,
            h.mu != 1.0 ? 1.0 : 0.0};
  }
  static void after_step(Hyper& h, int64_t step) {
    const double s = static_cast<double>(step);
    h.eta = h.lr / std::pow(1.0 + h.lambd * h.lr * s, h.alpha);
    h.mu = 1.0 / std::max(1.0, s - h.t0);
  }
};

// ---------------------------------------------------------------------------------------------
// ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
// Optimal Rate"), as the authors' implementation: the first step only sets exp_avg_sq += g^2
// (the parameter and exp_avg are untouched); then the gradient is normalised by the PREVIOUS
// second moment, max(sqrt(v), eps), clipped to [-c, c] with c = (t - 1)^(1/4) (the authors'
// clip_lambda(step) of their 0-based step; +inf without `clip`), averaged into exp_avg, the
// parameter moves by -lr * exp_avg and only then v is updated.  Decoupled weight decay (the
// authors' `decouple`) p *= 1 - lr * wd, from the second step on.
struct ADOPT {
  struct Hyper {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.9999, eps = 1e-6, weight_decay = 0;
    bool clip = true, decoupled_weight_decay = false, maximize = false;
    bool cautious = false;  // Cautious, element-wise: the step is zeroed where exp_avg * g <= 0
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay); f("clip", &Hyper::clip);
    f("decoupled_weight_decay", &Hyper::decoupled_weight_decay); f("maximize", &Hyper::maximize);
    f("cautious", &Hyper::cautious);
  }
  // first != 0: the initialising step (v += g^2 only).
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, eps, clip, neg_lr, first; };
  enum : unsigned { kCautious = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.cautious ? kCautious : 0u; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_avg_sq"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const bool first = step <= 1;
    const bool dec = h.decoupled_weight_decay;
    const double clip = h.clip ? std::pow(static_cast<double>(first ? 0 : step - 1), 0.25)
                               : HUGE_VAL;
    return {detail::grad_sign(h.maximize), dec ? 0.0 : h.weight_decay,
            dec && !first ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2,
            1.0 - h.beta2, h.eps, clip, -h.lr, first ? 1.0 : 0.0};
  }
};

// ---------------------------------------------------------------------------------------------
// Schedule-Free AdamW and SGD (Defazio et al. 2024, "The Road Less Scheduled"), in the form of
// the `schedulefree` package's AdamWScheduleFree / SGDScheduleFree: the parameter holds y, the
// point where the gradient is taken; the state holds z (the base sequence) and, for AdamW,
// exp_avg_sq; the average x = (y - (1 - beta1) z) / beta1 is never stored.  A step, with
// u the (normalised) gradient plus weight_decay * y:
//   y <- lerp(y, z, c_{t+1}) + lr_t (beta1 (1 - c_{t+1}) - 1) u,   z <- z - lr_t u.
// Running scalars (Python-visible struct fields, advanced by after_step): weight_sum (the sum
// of the averaging weights) and lr_max (the largest warmed-up lr so far).  train_mode is only
// recorded here (1: the parameter holds y; 0: x, after eval()).
//
// The `swap` variant is train()/eval(): p <- lerp(p, g, swap_weight) with no state, where the
// caller's plan passes z as the "gradient" (read only): swap_weight = 1 - 1/beta1 moves y to x,
// 1 - beta1 moves x back to y (torch.lerp's formula, from the nearer end).
namespace detail {
struct ScheduleFreeAverage {
  double lr, ckp1, weight_sum, lr_max;
};
// The schedulefree package's per-step scalars at 1-based `step` (its k = step - 1): the warmed-up
// lr, the averaging weight c_{k+1} = w / sum(w) with w = (k + 1)^r lr_max^weight_lr_power, and
// the new running sum and maximum.  A zero sum gives c = 0 (the package's ZeroDivisionError).
inline ScheduleFreeAverage schedule_free_average(double lr, double warmup_steps, double r,
                                                 double weight_lr_power, double weight_sum,
                                                 double lr_max, int64_t step) {
  const double k = static_cast<double>(step - 1);
  const double sched = k < warmup_steps ? (k + 1) / warmup_steps : 1.0;
  const double lr_t = lr * sched;
  const double lr_max_t = std::max(lr_t, lr_max);
  const double weight = std::pow(k + 1, r) * std::pow(lr_max_t, weight_lr_power);
  const double sum = weight_sum + weight;
  return {lr_t, sum != 0 ? weight / sum : 0.0, sum, lr_max_t};
}
}  // namespace detail

struct AdamWScheduleFree {
  struct Hyper {
    double lr = 0.0025, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0,
           warmup_steps = 0, r = 0, weight_lr_power = 2, weight_sum = 0, lr_max = 0,
           train_mode = 1, swap_weight = 0;
    bool maximize = false, swap = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay);
    f("warmup_steps", &Hyper::warmup_steps); f("r", &Hyper::r);
    f("weight_lr_power", &Hyper::weight_lr_power); f("weight_sum", &Hyper::weight_sum);
    f("lr_max", &Hyper::lr_max); f("train_mode", &Hyper::train_mode);
    f("swap_weight", &Hyper::swap_weight); f("maximize", &Hyper::maximize); f("swap", &Hyper::swap);
  }
  // y = lerp(y, z, ckp1) + y_coef * u; z = z + neg_lr * u.  Swap: small = |w| < 0.5.
  struct Coeffs { double gsign, wd, beta2, one_minus_beta2, inv_bc2, eps, ckp1, y_coef, neg_lr, w, small; };
  enum : unsigned { kSwap = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.swap ? kSwap : 0u; }
  static constexpr int nstate(unsigned v) { return (v & kSwap) ? 0 : 2; }
  static std::vector<const char*> states(unsigned v) {
    if (v & kSwap) return {};
    return {"z", "exp_avg_sq"};
  }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    if (h.swap)
      return {1, 0, 0, 0, 0, 0, 0, 0, 0, h.swap_weight, std::abs(h.swap_weight) < 0.5 ? 1.0 : 0.0};
    const auto a = detail::schedule_free_average(h.lr, h.warmup_steps, h.r, h.weight_lr_power,
                                                 h.weight_sum, h.lr_max, step);
    const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
    return {detail::grad_sign(h.maximize), h.weight_decay, h.beta2, 1.0 - h.beta2, 1.0 / bc2,
            h.eps, a.ckp1, a.lr * (h.beta1 * (1.0 - a.ckp1) - 1.0), -a.lr, 0, 0};
  }
  static void after_step(Hyper& h, int64_t step) {
    if (h.swap) return;
    const auto a = detail::schedule_free_average(h.lr, h.warmup_steps, h.r, h.weight_lr_power,
                                                 h.weight_sum, h.lr_max, step);
    h.weight_sum = a.weight_sum;
    h.lr_max = a.lr_max;
  }
};

// Schedule-Free SGD: AdamWScheduleFree without the second moment (u = g + weight_decay * y);
// `momentum` (Python) is the struct's beta1.
struct SGDScheduleFree {
  struct Hyper {
    double lr = 1.0, beta1 = 0.9, weight_decay = 0, warmup_steps = 0, r = 0, weight_lr_power = 2,
           weight_sum = 0, lr_max = 0, train_mode = 1, swap_weight = 0;
    bool maximize = false, swap = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("weight_decay", &Hyper::weight_decay);
    f("warmup_steps", &Hyper::warmup_steps); f("r", &Hyper::r);
    f("weight_lr_power", &Hyper::weight_lr_power); f("weight_sum", &Hyper::weight_sum);
    f("lr_max", &Hyper::lr_max); f("train_mode", &Hyper::train_mode);
    f("swap_weight", &Hyper::swap_weight); f("maximize", &Hyper::maximize); f("swap", &Hyper::swap);
  }
  struct Coeffs { double gsign, wd, ckp1, y_coef, neg_lr, w, small; };
  enum : unsigned { kSwap = 1, kVariants = 2 };
  static unsigned variant(const Hyper& h) { return h.swap ? kSwap : 0u; }
  static constexpr int nstate(unsigned v) { return (v & kSwap) ? 0 : 1; }
  static std::vector<const char*> states(unsigned v) {
    if (v & kSwap) return {};
    return {"z"};
  }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    if (h.swap) return {1, 0, 0, 0, 0, h.swap_weight, std::abs(h.swap_weight) < 0.5 ? 1.0 : 0.0};
    const auto a = detail::schedule_free_average(h.lr, h.warmup_steps, h.r, h.weight_lr_power,
                                                 h.weight_sum, h.lr_max, step);
    return {detail::grad_sign(h.maximize), h.weight_decay, a.ckp1,
            a.lr * (h.beta1 * (1.0 - a.ckp1) - 1.0), -a.lr, 0, 0};
  }
  static void after_step(Hyper& h, int64_t step) {
    if (h.swap) return;
    const auto a = detail::schedule_free_average(h.lr, h.warmup_steps, h.r, h.weight_lr_power,
                                                 h.weight_sum, h.lr_max, step);
    h.weight_sum = a.weight_sum;
    h.lr_max = a.lr_max;
  }
};

// ---------------------------------------------------------------------------------------------
// SparseAdam (torch.optim.SparseAdam): Adam over the elements present in the gradient (rows of a
// sparse gradient: fastoptim::step_rows), with torch's own arithmetic, which differs from Adam's:
// the moments as old + (1 - beta) * (new - old), eps added to sqrt(v) *before* the bias
// correction, folded into the step size lr * sqrt(1 - beta2^t) / (1 - beta1^t).
struct SparseAdam {
  struct Hyper {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    bool maximize = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("maximize", &Hyper::maximize);
  }
  struct Coeffs { double gsign, one_minus_beta1, one_minus_beta2, eps, neg_step; };
  enum : unsigned { kVariants = 1 };
  static unsigned variant(const Hyper&) { return 0; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_avg_sq"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double s = static_cast<double>(step);
    const double bc1 = 1.0 - std::pow(h.beta1, s), bc2 = 1.0 - std::pow(h.beta2, s);
    return {detail::grad_sign(h.maximize), 1.0 - h.beta1, 1.0 - h.beta2, h.eps,
            -(h.lr * std::sqrt(bc2) / bc1)};
  }
};

// ---------------------------------------------------------------------------------------------
// Optimizers with a per-tensor trust ratio (LAMB, LARS): kReduce != 0.  Their step is two passes
// over the plan (step.cpp): pass 1 reduces, per tensor, the sums of squares of the parameter and
// of a second quantity x (kReduce == 1: the transformed gradient, read only; kReduce == 2: the
// update u of the optimizer's Reduce functor, kernels.hpp, which also writes the state); then
// for_tensor(coeffs, sum p^2, sum x^2, ndim) gives each tensor's coefficients, and pass 2 runs
// the element kernel with them.

// LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
// minutes", algorithm 2).  Pass 1: Adam's moments and u = m_hat / (sqrt(v_hat) + eps) + wd * p
// (m_hat, v_hat bias-corrected when bias_correction); pass 2 recomputes u from the stored moments
// (reads them, writes only the parameter): p = decay * p - lr * r * u, with the tensor's trust
// ratio r = min(||decay * p||, max_weight_norm) / ||u|| (1 where either norm is 0), at most
// max_trust_ratio.  decoupled_weight_decay: decay = 1 - lr * wd and no wd * p in u.
struct LAMB {
  struct Hyper {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0,
           max_weight_norm = 10, max_trust_ratio = HUGE_VAL;
    bool bias_correction = true, decoupled_weight_decay = false, maximize = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("beta1", &Hyper::beta1); f("beta2", &Hyper::beta2);
    f("eps", &Hyper::eps); f("weight_decay", &Hyper::weight_decay);
    f("max_weight_norm", &Hyper::max_weight_norm); f("max_trust_ratio", &Hyper::max_trust_ratio);
    f("bias_correction", &Hyper::bias_correction);
    f("decoupled_weight_decay", &Hyper::decoupled_weight_decay); f("maximize", &Hyper::maximize);
  }
  // neg_step: -lr * the tensor's trust ratio (set by for_tensor).
  struct Coeffs { double gsign, wd, decay, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2_sqrt, eps, lr, max_weight_norm, max_trust_ratio, neg_step; };
  static constexpr int kReduce = 2;
  // Pass 2's kernel for a tensor with a state stored in another dtype than it computes in
  // (bfloat16/float16/int8): pass 1 then stores nothing, and pass 2 recomputes the moments from
  // the stored ones and the gradient, applies the u whose norm pass 1 took (from the unrounded
  // moments) and stores the moments.  Not a variant of the hyper-parameters: the driver picks
  // it per tensor.
  static constexpr unsigned kRecompute = 1;
  enum : unsigned { kVariants = 1 };
  static unsigned variant(const Hyper&) { return 0; }
  static constexpr int nstate(unsigned) { return 2; }
  static std::vector<const char*> states(unsigned) { return {"exp_avg", "exp_avg_sq"}; }
  static Coeffs prepare(const Hyper& h, int64_t step) {
    const double s = static_cast<double>(step);
    const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, s) : 1.0;
    const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, s) : 1.0;
    const bool dec = h.decoupled_weight_decay;
    return {detail::grad_sign(h.maximize), dec ? 0.0 : h.weight_decay,
            dec ? 1.0 - h.lr * h.weight_decay : 1.0, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2,
            1.0 / bc1, 1.0 / std::sqrt(bc2), h.eps, h.lr, h.max_weight_norm, h.max_trust_ratio,
            -h.lr};
  }
  static Coeffs for_tensor(const Coeffs& c, double pp, double uu, int /*ndim*/) {
    Coeffs t = c;
    const double w = std::min(std::sqrt(pp) * std::abs(c.decay), c.max_weight_norm);
    const double u = std::sqrt(uu);
    const double r = (w == 0 || u == 0) ? 1.0 : w / u;  // NaN propagates
    t.neg_step = -c.lr * std::min(r, c.max_trust_ratio);
    return t;
  }
};

// LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), SGD with momentum
// and a per-tensor trust ratio, as pytorch_optimizer.LARS: for an adapted tensor
// r = trust_coefficient * ||p|| / (||g|| + wd * ||p||) (1 when ||p|| = 0 or the denominator is
// 0), g <- (g + wd * p) * r; tensors with ndim <= 1 are excluded when exclude_1d (plain SGD with
// momentum: no weight decay, r = 1).  Then b = momentum * b + (1 - dampening) * g (b starts at
// 0), d = g + momentum * b (nesterov) or b, p -= lr * d.  Pass 1 reads p and g only.
struct LARS {
  struct Hyper {
    double lr = 1e-3, momentum = 0.9, dampening = 0, weight_decay = 0, trust_coefficient = 1e-3;
    bool nesterov = false, exclude_1d = true, maximize = false;
  };
  template <class F> static void fields(F&& f) {
    f("lr", &Hyper::lr); f("momentum", &Hyper::momentum); f("dampening", &Hyper::dampening);
    f("weight_decay", &Hyper::weight_decay); f("trust_coefficient", &Hyper::trust_coefficient);
    f("nesterov", &Hyper::nesterov); f("exclude_1d", &Hyper::exclude_1d);
    f("maximize", &Hyper::maximize);
  }
  // wd_t, scale: the tensor's weight decay and trust ratio (set by for_tensor).
  struct Coeffs { double gsign, wd, trust_coefficient, exclude_1d, momentum, one_minus_dampening, neg_lr, wd_t, scale; };
  static constexpr int kReduce = 1;
  enum : unsigned { kMomentum = 1, kNesterov = 2, kVariants = 4 };
  static unsigned variant(const Hyper& h) {
    return h.momentum > 0 ? kMomentum | (h.nesterov ? kNesterov : 0u) : 0u;
  }
  static constexpr int nstate(unsigned v) { return (v & kMomentum) ? 1 : 0; }
  static std::vector<const char*> states(unsigned v) {
    if (v & kMomentum) return {"momentum_buffer"};
    return {};
  }
  static Coeffs prepare(const Hyper& h, int64_t) {
    return {detail::grad_sign(h.maximize), h.weight_decay, h.trust_coefficient,
            h.exclude_1d ? 1.0 : 0.0, h.momentum, 1.0 - h.dampening, -h.lr, 0.0, 1.0};
  }
  static Coeffs for_tensor(const Coeffs& c, double pp, double gg, int ndim) {
    Coeffs t = c;
    if (c.exclude_1d != 0 && ndim <= 1) return t;  // wd_t = 0, scale = 1
    const double pn = std::sqrt(pp), gn = std::sqrt(gg);
    const double den = gn + c.wd * pn;
    t.wd_t = c.wd;
    t.scale = pn > 0 ? (den > 0 ? c.trust_coefficient * pn / den : 1.0) : 1.0;
    return t;
  }
};

// kReduce of an optimizer: 0 (one element-wise pass) unless it declares one.
template <class Opt, class = void> struct reduce_kind { static constexpr int value = 0; };
template <class Opt> struct reduce_kind<Opt, std::void_t<decltype(Opt::kReduce)>> {
  static constexpr int value = Opt::kReduce;
};

// Optimizers with no post-step bookkeeping.
template <class Opt> auto after_step(typename Opt::Hyper& h, int64_t step, int)
    -> decltype(Opt::after_step(h, step)) { Opt::after_step(h, step); }
template <class Opt> void after_step(typename Opt::Hyper&, int64_t, long) {}

}  // namespace fastoptim
