r"""The optimizers, one :class:`~fastoptim.engine.definition.Definition` each: the single place
(with the C++ struct and kernel, and the NumPy reference) where an optimizer is defined.  The
classes of :mod:`fastoptim.optimizers` and :mod:`fastoptim.torch` and the functions of
:mod:`fastoptim.functional` are generated from these by ``python -m fastoptim.engine.codegen``
(CI checks that the generated code is up to date); see CONTRIBUTING.md.

Notation in the docstrings: :math:`p` parameter, :math:`g` gradient (negated first when
``maximize``; plus :math:`\lambda p` for L2 ``weight_decay`` unless the decay is decoupled),
:math:`\gamma` learning rate, :math:`t` the 1-based step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from . import host
from .engine import transforms
from .engine.definition import (
    NONNEGATIVE,
    OPEN_UNIT,
    PAIR,
    UNIT,
    Definition,
    Host,
    Hyper,
    State,
    is_number,
)


def _sgd_relations(group: Mapping[str, Any]) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("SGD: nesterov=True requires momentum > 0 and dampening = 0")


def _sgd_fields(group: Mapping[str, Any], fresh: AbstractSet[str]) -> dict[str, Any]:
    # torch sets the momentum buffer to the gradient on its first use
    return {"first_momentum_step": "momentum_buffer" in fresh}


def _sgd_rows(group: Mapping[str, Any]) -> str:
    # torch.optim.SGD: grad.add(param) fails for a sparse grad; with momentum torch keeps a
    # sparse momentum buffer that decays every row (not lazy): a dense step computes that.
    if group["weight_decay"] != 0:
        return "weight_decay is not compatible with sparse gradients"
    if group["momentum"] != 0:
        return (
            "momentum is not lazy (every row's buffer decays at every step): pass a dense gradient"
        )
    return ""


def _adagrad_rows(group: Mapping[str, Any]) -> str:
    if group["weight_decay"] != 0:  # (torch.optim.Adagrad's own message)
        return "weight_decay option is not compatible with sparse gradients"
    return ""


def _sparse_adam_relations(group: Mapping[str, Any]) -> None:
    if not group["eps"] > 0:
        raise ValueError(f"SparseAdam: invalid eps={group['eps']!r}: must be > 0")


def _rprop_relations(group: Mapping[str, Any]) -> None:
    etaminus, etaplus = group["etas"]
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Rprop: invalid etas={group['etas']!r}: need 0 < etas[0] < 1 < etas[1]")
    low, high = group["step_sizes"]
    if low > high:
        raise ValueError(
            f"Rprop: invalid step_sizes={group['step_sizes']!r}: need step_sizes[0] <= "
            "step_sizes[1]"
        )


def _asgd_next(group: Mapping[str, Any], t: float) -> dict[str, float]:
    """torch's ASGD scalars after step t: the next step's learning rate and averaging weight."""
    lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
    return {"eta": lr / ((1 + lambd * lr * t) ** alpha), "mu": 1 / max(1, t - t0)}


def _nadam_mu(group: Mapping[str, Any], t: float) -> Any:
    """torch's momentum factor mu_t of NAdam's schedule: a float, or a 0-d tensor where the
    group's ``betas`` or ``momentum_decay`` is one (computed as torch computes it)."""
    return group["betas"][0] * (1.0 - 0.5 * (0.96 ** (t * group["momentum_decay"])))


_CAUTIOUS_DOC = r"""With ``cautious=True`` (Cautious optimizers, Liang et al. 2024), each element's
step is dropped where it disagrees in sign with the gradient: :math:`u \leftarrow u\,[u g > 0]`.
Element-wise only: the paper's rescaling by the tensor's fraction of kept elements
(:math:`u / \mathrm{mean}([u g > 0])`) is *not* applied, so the steps are smaller than the
paper's by that fraction (about half early in training): raise ``lr`` accordingly.
"""

_CAUTIOUS = Hyper("cautious", False, keyword=True, extension=True)


SGD = Definition(
    name="SGD",
    kernel="SGD",
    keras="SGD",
    doc=r"""Stochastic gradient descent with momentum, dampening and Nesterov momentum
(``torch.optim.SGD``; Sutskever et al. 2013 for Nesterov).

.. math::
    b_t = \mu b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
    d_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\quad p_t = p_{t-1} - \gamma d_t

State: ``momentum_buffer`` (only when ``momentum != 0``).

"""
    + _CAUTIOUS_DOC
    + """Here :math:`u = d_t` (no effect without momentum).""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("momentum", 0),
        Hyper("dampening", 0, rule=UNIT),
        Hyper("weight_decay", 0),
        Hyper("nesterov", False),
        Hyper("maximize", False, keyword=True),
        _CAUTIOUS,
    ),
    states=(State("momentum_buffer", optional=True),),
    relations=_sgd_relations,
    extra_fields=_sgd_fields,
    torch_step=False,
    rows=_sgd_rows,
    rows_dense=lambda group: group["weight_decay"] == 0 and group["momentum"] != 0,
    functional_doc=r"""One in-place SGD update (see :class:`fastoptim.SGD`).

``momentum_buffer`` is needed iff ``momentum != 0``.  Like torch, the buffer is *set* to the
(effective) gradient on its first use instead of being decayed: that happens when
``step == 1``, whatever the buffer holds.  Count ``step`` from the update that first uses
the buffer.""",
    torch_doc=r"""Drop-in :class:`torch.optim.SGD` (see :class:`fastoptim.SGD` for the update rule).
State: ``momentum_buffer`` (when ``momentum != 0``), no ``step``, as in torch.""",
)

ADAGRAD = Definition(
    name="Adagrad",
    kernel="Adagrad",
    keras="Adagrad",
    doc=r"""Adagrad (Duchi, Hazan & Singer 2011; ``torch.optim.Adagrad``).

.. math::
    \tilde\gamma = \frac{\gamma}{1 + (t-1)\eta},\quad s_t = s_{t-1} + g_t^2,\quad
    p_t = p_{t-1} - \tilde\gamma \frac{g_t}{\sqrt{s_t} + \epsilon}

State: ``sum`` (starts at ``initial_accumulator_value``).""",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lr_decay", 0),
        Hyper("weight_decay", 0),
        Hyper("initial_accumulator_value", 0, schedulable=False, functional=False),
        Hyper("eps", 1e-10),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("sum", fill="initial_accumulator_value"),),
    torch_eager_state=True,
    rows=_adagrad_rows,
    functional_doc=r"""One in-place Adagrad update (see :class:`fastoptim.Adagrad`).

``sum`` starts at the class's ``initial_accumulator_value`` (0 by default); ``step`` drives
the ``lr_decay``.""",
    torch_doc=r"""Drop-in :class:`torch.optim.Adagrad` (see :class:`fastoptim.Adagrad`).  State:
``step``, ``sum``; created for every parameter at construction, as torch does, and filled
with the constructor's ``initial_accumulator_value`` (torch ignores a group's own).""",
)

RMSPROP = Definition(
    name="RMSprop",
    kernel="RMSprop",
    keras="RMSprop",
    doc=r"""RMSprop (Hinton, Coursera lecture 6e; ``torch.optim.RMSprop``), optionally centered
(Graves 2013) and with momentum.

.. math::
    v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
    \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ (centered)},\quad
    d_t = \frac{g_t}{\sqrt{\max(v_t - \bar g_t^2, 0)} + \epsilon},\quad
    b_t = \mu b_{t-1} + d_t,\quad p_t = p_{t-1} - \gamma b_t \text{ (or } \gamma d_t)

The clamp at 0 departs from torch only where torch's rounded variance is negative and its
step NaN (reduced-precision state makes that far likelier).

State: ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer`` (momentum > 0).""",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("alpha", 0.99, rule=UNIT),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("momentum", 0),
        Hyper("centered", False),
        Hyper("maximize", False, keyword=True),
    ),
    states=(
        State("square_avg"),
        State("grad_avg", optional=True),
        State("momentum_buffer", optional=True),
    ),
    functional_doc=r"""One in-place RMSprop update (see :class:`fastoptim.RMSprop`).

``grad_avg`` is needed iff ``centered``, ``momentum_buffer`` iff ``momentum > 0``.
``step`` does not change the update (it is required for uniformity).""",
    torch_doc=r"""Drop-in :class:`torch.optim.RMSprop` (see :class:`fastoptim.RMSprop`).
State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered).""",
)

ADADELTA = Definition(
    name="Adadelta",
    kernel="Adadelta",
    keras="Adadelta",
    doc=r"""Adadelta (Zeiler 2012; ``torch.optim.Adadelta``).

.. math::
    v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
    \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t,\quad
    u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2,\quad p_t = p_{t-1} - \gamma \Delta_t

State: ``square_avg``, ``acc_delta``.""",
    hyper=(
        Hyper("lr", 1.0),
        Hyper("rho", 0.9, rule=UNIT),
        Hyper("eps", 1e-06),
        Hyper("weight_decay", 0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("square_avg"), State("acc_delta")),
    functional_doc=r"""One in-place Adadelta update (see :class:`fastoptim.Adadelta`).

``step`` does not change the update (it is required for uniformity).""",
    torch_doc=r"""Drop-in :class:`torch.optim.Adadelta` (see :class:`fastoptim.Adadelta`).  State:
``step``, ``square_avg``, ``acc_delta``.""",
)

ADAM = Definition(
    name="Adam",
    kernel="Adam",
    keras="Adam",
    doc=r"""Adam (Kingma & Ba 2015; ``torch.optim.Adam``), with AMSGrad (Reddi et al. 2018) and
decoupled weight decay (AdamW, Loshchilov & Hutter 2019).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
    \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (amsgrad) or } v_t

    p_t = p_{t-1}(1 - \gamma\lambda_{\text{dec}})
          - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).

"""
    + _CAUTIOUS_DOC
    + """Here the mask is :math:`[m_t g_t > 0]` (the sign of the step's).""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("amsgrad", False),
        Hyper("maximize", False, keyword=True),
        Hyper("decoupled_weight_decay", False, keyword=True),
        _CAUTIOUS,
    ),
    states=(State("exp_avg"), State("exp_avg_sq"), State("max_exp_avg_sq", optional=True)),
    functional_doc=r"""One in-place Adam update (see :class:`fastoptim.Adam`);
``decoupled_weight_decay=True`` is AdamW (:func:`adamw_`).

``max_exp_avg_sq`` is needed iff ``amsgrad``.""",
    torch_doc=r"""Drop-in :class:`torch.optim.Adam` (see :class:`fastoptim.Adam`).
State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).""",
)

ADAMW = Definition(
    name="AdamW",
    kernel="Adam",
    keras="AdamW",
    base=ADAM,
    fixed=(("decoupled_weight_decay", True),),
    doc=r"""AdamW (Loshchilov & Hutter 2019; ``torch.optim.AdamW``): :class:`Adam` with decoupled
weight decay, :math:`p \leftarrow p(1-\gamma\lambda)` before the Adam update (which
``cautious`` masks as :class:`Adam`'s; the decay is not masked).""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 1e-2),
        Hyper("amsgrad", False),
        Hyper("maximize", False, keyword=True),
        _CAUTIOUS,
    ),
    states=(State("exp_avg"), State("exp_avg_sq"), State("max_exp_avg_sq", optional=True)),
    functional_doc=r"""One in-place AdamW update (see :class:`fastoptim.AdamW`): Adam with
decoupled weight decay.  ``max_exp_avg_sq`` is needed iff ``amsgrad``.""",
    torch_doc=r"""Drop-in :class:`torch.optim.AdamW` (see :class:`fastoptim.AdamW`).  State: as
:class:`Adam`.""",
)

ADAMAX = Definition(
    name="Adamax",
    kernel="Adamax",
    keras="Adamax",
    doc=r"""Adamax, the infinity-norm variant of Adam (Kingma & Ba 2015, section 7;
``torch.optim.Adamax``).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
    p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t}

State: ``exp_avg``, ``exp_inf``.""",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("exp_avg"), State("exp_inf")),
    functional_doc=r"""One in-place Adamax update (see :class:`fastoptim.Adamax`).""",
    torch_doc=r"""Drop-in :class:`torch.optim.Adamax` (see :class:`fastoptim.Adamax`).
State: ``step``, ``exp_avg``, ``exp_inf``.""",
)

NADAM = Definition(
    name="NAdam",
    kernel="NAdam",
    keras="Nadam",
    doc=r"""NAdam, Adam with Nesterov momentum (Dozat 2016; ``torch.optim.NAdam``).

.. math::
    \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad
    m_t, v_t \text{ as Adam},\quad
    d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon

    p_t = p_{t-1} - \gamma \frac{1-\mu_t}{1-\prod_{i\le t}\mu_i} \frac{g_t}{d_t}
          - \gamma \frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i} \frac{m_t}{d_t}

State: ``exp_avg``, ``exp_avg_sq``, and the group's ``mu_product``.

"""
    + _CAUTIOUS_DOC
    + r"""Here :math:`u` is the whole Nesterov update (both terms), kept where
:math:`u\,g > 0`; the decoupled decay is not masked.""",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("momentum_decay", 4e-3),
        Hyper("decoupled_weight_decay", False),
        Hyper("maximize", False, keyword=True),
        _CAUTIOUS,
    ),
    states=(State("exp_avg"), State("exp_avg_sq")),
    scalars=(("mu_product", 1.0),),
    torch_scalar_factor=_nadam_mu,
    functional_doc=r"""One in-place NAdam update (see :class:`fastoptim.NAdam`).

``mu_product`` (keyword, required) is the product :math:`\prod_{i<t}\mu_i` of the momentum
schedule over the *previous* steps: ``1.0`` at the first step.  Returns the updated product
(times :math:`\mu_t`): pass it to the next call.

    >>> mu = 1.0
    >>> for t in range(1, 4):                                  # doctest: +SKIP
    ...     mu = nadam_(p, g, m, v, step=t, mu_product=mu)""",
    torch_doc=r"""Drop-in :class:`torch.optim.NAdam` (see :class:`fastoptim.NAdam`).
State: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.

``mu_product`` is advanced exactly as torch does (multiplied by :math:`\mu_t` in the
dtype of the ``mu_product`` tensor) and the kernel is given that value, so that the
coefficients match torch's whatever the precision of torch's default dtype.""",
)

RADAM = Definition(
    name="RAdam",
    kernel="RAdam",
    doc=r"""RAdam, rectified Adam (Liu et al. 2020; ``torch.optim.RAdam``).

.. math::
    \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
    \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad
    \hat m_t = \frac{m_t}{1-\beta_1^t}

    p_t = p_{t-1} - \gamma \hat m_t r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}
    \text{ if } \rho_t > 5 \text{ else } p_{t-1} - \gamma \hat m_t,\quad
    r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

State: ``exp_avg``, ``exp_avg_sq``.

"""
    + _CAUTIOUS_DOC
    + """Here the mask is :math:`[m_t g_t > 0]` (the sign of the step's, rectified or not); the
decoupled decay is not masked.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("decoupled_weight_decay", False),
        Hyper("maximize", False, keyword=True),
        _CAUTIOUS,
    ),
    states=(State("exp_avg"), State("exp_avg_sq")),
    functional_doc=r"""One in-place RAdam update (see :class:`fastoptim.RAdam`).""",
    torch_doc=r"""Drop-in :class:`torch.optim.RAdam` (see :class:`fastoptim.RAdam`).
State: ``step``, ``exp_avg``, ``exp_avg_sq``.""",
)

LION = Definition(
    name="Lion",
    kernel="Lion",
    keras="Lion",
    doc=r"""Lion, EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms").

.. math::
    p_t = p_{t-1}(1-\gamma\lambda) - \gamma\,\mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),
    \quad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

with :math:`\mathrm{sign}(0) = 0`.  State: ``exp_avg``.

"""
    + _CAUTIOUS_DOC
    + """Here :math:`u` is the sign step; the decay is not masked.""",
    hyper=(
        Hyper("lr", 1e-4),
        Hyper("betas", (0.9, 0.99)),
        Hyper("weight_decay", 0.0),
        Hyper("maximize", False, keyword=True),
        Hyper("cautious", False, keyword=True),
    ),
    states=(State("exp_avg"),),
    torch_step=False,
    functional_doc=r"""One in-place Lion update (see :class:`fastoptim.Lion`).

``step`` does not change the update (it is required for uniformity).""",
    torch_doc=r"""Lion (Chen et al. 2023; see :class:`fastoptim.Lion`), which ``torch.optim`` lacks,
with :class:`fastoptim.Lion`'s signature and defaults.  State: ``exp_avg`` (no ``step``: the
update does not depend on it), as in the ``lion-pytorch`` package.""",
)

RPROP = Definition(
    name="Rprop",
    kernel="Rprop",
    doc=r"""Rprop, resilient backpropagation (Riedmiller & Braun 1993; ``torch.optim.Rprop``):
a per-element step size that grows while the gradient keeps its sign and shrinks when it
flips; only the gradient's sign moves the parameter.  Meant for full-batch training.

.. math::
    f_t = \eta_+ \text{ if } g_t g_{t-1} > 0,\quad \eta_- \text{ if } g_t g_{t-1} < 0,
    \quad 1 \text{ otherwise}

    s_t = \mathrm{clip}(s_{t-1} f_t, s_{\min}, s_{\max}),\quad
    g_t \leftarrow 0 \text{ where } f_t = \eta_-,\quad
    p_t = p_{t-1} - \mathrm{sign}(g_t)\, s_t

with :math:`(\eta_-, \eta_+)` = ``etas``, :math:`(s_{\min}, s_{\max})` = ``step_sizes``.
State: ``prev`` (the last :math:`g_t`, 0 at first) and ``step_size`` (:math:`s_t`, starting
at the group's ``lr`` when the state is created: ``lr`` has no other effect).""",
    hyper=(
        Hyper("lr", 1e-2, functional=False),
        Hyper("etas", (0.5, 1.2), rule=PAIR, fields=("etaminus", "etaplus")),
        Hyper("step_sizes", (1e-6, 50), rule=PAIR, fields=("step_size_min", "step_size_max")),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("prev"), State("step_size", fill="lr")),
    relations=_rprop_relations,
    functional_doc=r"""One in-place Rprop update (see :class:`fastoptim.Rprop`).

Start with ``prev`` zero and ``step_size`` filled with the learning rate (there is no
``lr`` argument: it only sets that initial value).  ``step`` does not change the update (it
is required for uniformity).""",
    torch_doc=r"""Drop-in :class:`torch.optim.Rprop` (see :class:`fastoptim.Rprop`).  State:
``step``, ``prev``, ``step_size`` (filled with the group's ``lr`` at the first step, as in
torch).""",
)

ASGD = Definition(
    name="ASGD",
    kernel="ASGD",
    doc=r"""Averaged stochastic gradient descent (Polyak & Juditsky 1992; ``torch.optim.ASGD``):
SGD with a decaying step size and a decay of the parameters, plus the running average of the
iterates (``ax``, the estimate ASGD is about; the parameters themselves are plain SGD's).

.. math::
    p_t = p_{t-1}(1 - \lambda\eta_t) - \eta_t g_t,\quad
    \bar x_t = \bar x_{t-1} + \mu_t (p_t - \bar x_{t-1}) \text{ (} \bar x_t = p_t
    \text{ while } \mu_t = 1)

    \eta_1 = \gamma,\quad \eta_{t+1} = \frac{\gamma}{(1 + \lambda\gamma t)^\alpha},\quad
    \mu_1 = 1,\quad \mu_{t+1} = \frac{1}{\max(1, t - t_0)}

with :math:`\lambda` = ``lambd``, :math:`t_0` = ``t0``.  As in torch, :math:`\eta` and
:math:`\mu` are computed after each step from that step's values: a changed ``lr`` takes
effect one step later.  State: ``ax``, and the group's ``eta`` and ``mu``.""",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lambd", 1e-4),
        Hyper("alpha", 0.75),
        Hyper("t0", 1e6),
        Hyper("weight_decay", 0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("ax"),),
    scalars=(("eta", "lr"), ("mu", 1.0)),
    scalar_rules=(("eta", NONNEGATIVE),),
    torch_scalar_next=_asgd_next,
    functional_doc=r"""One in-place ASGD update (see :class:`fastoptim.ASGD`).

``eta`` and ``mu`` (keywords, required) are the step's learning rate and averaging weight:
``lr`` and ``1.0`` at the first step.  Returns their values for the next step, ``(eta, mu)``:
pass them to the next call.

    >>> import numpy as np
    >>> p, g, ax = np.ones(3, np.float32), np.full(3, 0.5, np.float32), np.ones(3, np.float32)
    >>> lr = 0.01
    >>> eta, mu = lr, 1.0
    >>> for t in range(1, 4):
    ...     eta, mu = asgd_(p, g, ax, step=t, eta=eta, mu=mu, lr=lr)
    >>> round(mu, 6), p.dtype
    (1.0, dtype('float32'))""",
    torch_doc=r"""Drop-in :class:`torch.optim.ASGD` (see :class:`fastoptim.ASGD`).  State:
``step``, ``eta``, ``mu``, ``ax``; ``eta`` and ``mu`` are computed after each step as torch does
and kept in the dtype of torch's scalar state, and the kernel is given those values.""",
)


ADOPT = Definition(
    name="ADOPT",
    kernel="ADOPT",
    doc=r"""ADOPT, Adam with the gradient normalised by the *previous* second moment and the
momentum taken after the normalisation (Taniguchi et al. 2024, "ADOPT: Modified Adam Can
Converge with Any :math:`\beta_2` with the Optimal Rate"), as the authors' implementation.
``torch.optim`` has no ADOPT.

.. math::
    t = 1:\quad v_1 = g_1^2 \text{ (the parameter and } m \text{ are untouched)}

    t > 1:\quad m_t = \beta_1 m_{t-1} + (1-\beta_1)\,
        \mathrm{clip}\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, c_t\Big),\quad
    p_t = p_{t-1}(1-\gamma\lambda_{\text{dec}}) - \gamma m_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

with :math:`\mathrm{clip}(x, c) = \min(\max(x, -c), c)` and :math:`c_t = (t-1)^{1/4}`
(the authors' default ``clip_lambda = lambda step: step**0.25`` of their 0-based step, the
paper's schedule); ``clip=False`` is the authors' ``clip_lambda=None`` (no clipping, the
paper's first version).  Other clipping schedules are not supported.
``decoupled_weight_decay`` is the authors' ``decouple`` (use it where you would use AdamW):
:math:`p \leftarrow p(1-\gamma\lambda)` from the second step on; otherwise ``weight_decay``
is L2, added to the gradient (the first step's :math:`v_1` included).  State: ``exp_avg``,
``exp_avg_sq``.

"""
    + _CAUTIOUS_DOC
    + """Here the mask is :math:`[m_t g_t > 0]`; the decay is not masked.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.9999)),
        Hyper("eps", 1e-6),
        Hyper("clip", True),
        Hyper("weight_decay", 0),
        Hyper("decoupled_weight_decay", False),
        Hyper("maximize", False, keyword=True),
        Hyper("cautious", False, keyword=True),
    ),
    states=(State("exp_avg"), State("exp_avg_sq")),
    functional_doc=r"""One in-place ADOPT update (see :class:`fastoptim.ADOPT`).

``step == 1`` is the initialising step: it only adds :math:`g^2` to ``exp_avg_sq`` (start
it, and ``exp_avg``, at zero), whatever the other arguments.""",
    torch_doc=r"""ADOPT (Taniguchi et al. 2024; see :class:`fastoptim.ADOPT`), which
``torch.optim`` lacks, with :class:`fastoptim.ADOPT`'s signature and the authors' defaults
(their ``clip_lambda`` is ``clip``, their ``decouple`` is ``decoupled_weight_decay``).
State: ``step``, ``exp_avg``, ``exp_avg_sq``, as in the authors' implementation; the first step
of each parameter only initialises ``exp_avg_sq``.""",
)


def _schedule_free_relations(group: Mapping[str, Any]) -> None:
    beta = group["betas"][0] if "betas" in group else group["momentum"]
    if not beta > 0:
        what = f"betas[0]={beta!r}" if "betas" in group else f"momentum={beta!r}"
        raise ValueError(
            f"Schedule-Free: invalid {what}: must be in (0, 1) (eval() divides by it: "
            "x = (y - (1 - beta) z) / beta)"
        )


def schedule_free_average(
    group: Mapping[str, Any], k: int, weight_sum: float, lr_max: float
) -> tuple[float, float, float, float]:
    """The ``schedulefree`` package's per-step scalars of its step ``k`` (0-based): the
    warmed-up lr, the averaging weight ``c = w / sum(w)`` with ``w = (k+1)^r lr_max^p``, and
    the new ``weight_sum`` and ``lr_max`` (what the compiled kernels compute in C++;
    fastoptim.torch keeps them in the parameter group, as the package does)."""
    warmup = group["warmup_steps"]
    lr = float(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
    lr_max = max(lr, lr_max)
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = weight_sum + weight
    return lr, (weight / weight_sum if weight_sum != 0 else 0.0), weight_sum, lr_max


_SF_DOC = r"""

Schedule-Free learning (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky 2024, "The Road
Less Scheduled") replaces the learning-rate schedule by an average: the parameters hold
:math:`y_t`, the point where gradients are taken, between the base sequence :math:`z_t` (state
``z``) and the weighted average :math:`x_t` of the :math:`z` (never stored:
:math:`x = (y - (1-\beta_1) z)/\beta_1`), and at every step

.. math::
    \gamma_t = \gamma \min(1, t/T_{\text{warmup}}),\quad
    c_{t+1} = \frac{w_t}{\sum_{i\le t} w_i},\quad
    w_t = t^r \, (\max_{i\le t}\gamma_i)^{p}

    y_{t+1} = (1-c_{t+1})\, y_t + c_{t+1} z_t + \gamma_t(\beta_1(1-c_{t+1}) - 1)\, u_t,\quad
    z_{t+1} = z_t - \gamma_t u_t

(the paper's :math:`y = (1-\beta_1) z + \beta_1 x`, :math:`x_{t+1} = (1-c_{t+1}) x_t +
c_{t+1} z_{t+1}`, written in :math:`y` and :math:`z` as the ``schedulefree`` package's
memory-efficient classes do), with :math:`T_{\text{warmup}}` = ``warmup_steps``, :math:`r` =
``r``, :math:`p` = ``weight_lr_power`` and :math:`u_t` given below.  Weight decay is taken
at :math:`y` and is not normalised.

**train() / eval()**: evaluate (and save checkpoints) with the parameters at :math:`x`:
``eval()`` moves every parameter in place to :math:`x = \mathrm{lerp}(y, z, 1 - 1/\beta_1)`,
``train()`` back to :math:`y = \mathrm{lerp}(x, z, 1 - \beta_1)` (torch.lerp's arithmetic, in
every precision layout: master copies, copy-outs and compensation follow).  The optimizer
starts in train mode; ``step()`` in eval mode raises ``RuntimeError``.  Parameters whose
``z`` has not been used by a step yet are not moved (:math:`x = y = z` there).  The mode is
part of the state (checkpoints included): a checkpoint saved in eval mode and loaded
continues bit for bit.  The two lerps are inverse up to rounding only, as in the package.
State: ``z`` (a copy of the parameter when first used), the running scalars ``weight_sum``
and ``lr_max`` and ``train_mode``."""


ADAMWSCHEDULEFREE = Definition(
    name="AdamWScheduleFree",
    kernel="AdamWScheduleFree",
    mixin="ScheduleFreeOptimizer",
    doc=r"""Schedule-Free AdamW (``schedulefree.AdamWScheduleFree``, same name, signature,
defaults and update).

.. math::
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda y_t"""
    + _SF_DOC
    + r"""  And ``exp_avg_sq`` (:math:`v`).

The bias correction is applied to :math:`v` (as in Adam and in the package's
``AdamWScheduleFree`` and ``AdamWScheduleFreeReference``), not folded into the learning rate as
the paper's Algorithm 1 and the package's ``AdamWScheduleFreePaper`` do
(:math:`\gamma_t \sqrt{1-\beta_2^t}` and an uncorrected :math:`\epsilon`).""",
    hyper=(
        Hyper("lr", 0.0025),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0),
        Hyper("warmup_steps", 0, schedulable=False),
        Hyper("r", 0.0),
        Hyper("weight_lr_power", 2.0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("z", like_param=True), State("exp_avg_sq")),
    relations=_schedule_free_relations,
    scalars=(("weight_sum", 0.0), ("lr_max", 0.0)),
    scalar_rules=(("weight_sum", NONNEGATIVE), ("lr_max", NONNEGATIVE)),
    torch_step=False,
    functional_doc=r"""One in-place Schedule-Free AdamW update of :math:`y` (``param``) and
``z`` (see :class:`fastoptim.AdamWScheduleFree`).

Start ``z`` as a copy of the parameter, ``exp_avg_sq`` at zero, ``weight_sum`` and
``lr_max`` at ``0.0``; returns the updated ``(weight_sum, lr_max)``: pass them to the next
call.  :math:`x` (for evaluation) is ``param + (1 - 1/beta1) * (z - param)``.""",
    torch_doc=r"""Schedule-Free AdamW (see :class:`fastoptim.AdamWScheduleFree`), a drop-in
for ``schedulefree.AdamWScheduleFree`` with its signature and defaults (its ``foreach`` is not
taken: every step is one fused call), plus ``maximize`` and the precision options.

State as the package keeps it: per parameter ``z`` and ``exp_avg_sq``; per group ``k`` (the
step count), ``weight_sum``, ``lr_max``, ``scheduled_lr`` and ``train_mode``, so
``state_dict`` checkpoints move between the package and fastoptim.  Unlike the package, the
optimizer starts in train mode (calling ``train()`` first, as the package requires, is
harmless).""",
)

SGDSCHEDULEFREE = Definition(
    name="SGDScheduleFree",
    kernel="SGDScheduleFree",
    mixin="ScheduleFreeOptimizer",
    doc=r"""Schedule-Free SGD (``schedulefree.SGDScheduleFree``, same name, signature, defaults
and update), with :math:`\beta_1` = ``momentum`` in (0, 1).

.. math::
    u_t = g_t + \lambda y_t"""
    + _SF_DOC,
    hyper=(
        Hyper("lr", 1.0),
        Hyper("momentum", 0.9, rule=OPEN_UNIT, field="beta1"),
        Hyper("weight_decay", 0),
        Hyper("warmup_steps", 0, schedulable=False),
        Hyper("r", 0.0),
        Hyper("weight_lr_power", 2.0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("z", like_param=True),),
    relations=_schedule_free_relations,
    scalars=(("weight_sum", 0.0), ("lr_max", 0.0)),
    scalar_rules=(("weight_sum", NONNEGATIVE), ("lr_max", NONNEGATIVE)),
    torch_step=False,
    functional_doc=r"""One in-place Schedule-Free SGD update of :math:`y` (``param``) and ``z``
(see :class:`fastoptim.SGDScheduleFree`).

Start ``z`` as a copy of the parameter, ``weight_sum`` and ``lr_max`` at ``0.0``; returns the
updated ``(weight_sum, lr_max)``: pass them to the next call.""",
    torch_doc=r"""Schedule-Free SGD (see :class:`fastoptim.SGDScheduleFree`), a drop-in for
``schedulefree.SGDScheduleFree`` with its signature and defaults (its ``foreach`` is not taken),
plus ``maximize`` and the precision options.  State as the package keeps it (see
:class:`AdamWScheduleFree`).""",
)


SPARSEADAM = Definition(
    name="SparseAdam",
    kernel="SparseAdam",
    doc=r"""SparseAdam (``torch.optim.SparseAdam``): lazy Adam for embedding-like parameters whose
gradients come as rows (:meth:`~fastoptim.Optimizer.step_rows`; in :mod:`fastoptim.torch`
sparse COO gradients, e.g. from ``nn.Embedding(sparse=True)``).

Only the elements present in the gradient are updated, parameter *and* moments; the other
rows keep their values and their moments (they do not decay).  Duplicate row indices are
summed first (torch coalesces).  A dense gradient (:meth:`~fastoptim.Optimizer.step`) counts
every element as present: then the update is torch's SparseAdam with every row in the
gradient.  Bias corrections use the step count :math:`t` (steps taken, not the times a row
was present).  torch's arithmetic, which differs from :class:`Adam`'s in where :math:`\epsilon`
goes:

.. math::
    m \leftarrow m + (1-\beta_1)(g - m),\quad v \leftarrow v + (1-\beta_2)(g^2 - v),\quad
    p \leftarrow p - \gamma\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v} + \epsilon}

on the present elements.  State: ``exp_avg``, ``exp_avg_sq``.  ``eps`` must be > 0 (as in
torch); ``lr = 0`` is accepted (torch requires > 0) so that schedules may start at 0.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-8),
        Hyper("maximize", False),
    ),
    states=(State("exp_avg"), State("exp_avg_sq")),
    relations=_sparse_adam_relations,
    rows=lambda group: "",
    torch_sparse_only=True,
    functional_doc=r"""One in-place SparseAdam update of every element (see
:class:`fastoptim.SparseAdam`), the gradient being dense: torch's SparseAdam with every
element present.  For rows, :func:`fastoptim.functional.sparse_rows_`.""",
    torch_doc=r"""Drop-in :class:`torch.optim.SparseAdam` (see :class:`fastoptim.SparseAdam`).
Gradients must be sparse COO tensors (``RuntimeError`` otherwise, as torch); each is coalesced
and its rows updated by the compiled row kernel.  State: ``step``, ``exp_avg``,
``exp_avg_sq``.""",
)


# Every optimizer, in documentation order.
def _lamb_fields(group: Mapping[str, Any], fresh: AbstractSet[str]) -> dict[str, Any]:
    # None: no clamp (the struct holds +inf)
    return {
        k: math.inf if group[k] is None else group[k]
        for k in ("max_weight_norm", "max_trust_ratio")
        if k in group
    }


LAMB = Definition(
    name="LAMB",
    kernel="LAMB",
    per_tensor=True,
    doc=r"""LAMB, Adam's update scaled per tensor by a trust ratio (You et al. 2020, "Large
Batch Optimization for Deep Learning: Training BERT in 76 minutes", algorithm 2).
``torch.optim`` has no LAMB.

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
    \quad u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
    + \lambda p_{t-1}

    r_t = \frac{\min(\|p_{t-1}\|, w_{\max})}{\|u_t\|} \text{ (1 if either norm is 0)},\quad
    p_t = p_{t-1} - \gamma\,\min(r_t, r_{\max})\,u_t

with the norms over each parameter tensor (2-norms of all its elements).  ``bias_correction=
False`` drops the two :math:`1-\beta^t` factors (the paper's first versions,
``pytorch_optimizer.Lamb``'s :math:`u`).  :math:`w_{\max}` is ``max_weight_norm`` (the paper's
:math:`\phi(z) = \min(z, w_{\max})`; 10 as ``pytorch_optimizer`` and ``torch-optimizer``;
``None``: no clamp, as NVIDIA apex's FusedLAMB) and :math:`r_{\max}` is ``max_trust_ratio``
(``None``: no clamp; 1 is timm's ``trust_clip``, "LAMBC").  ``decoupled_weight_decay=True``
takes :math:`\lambda` out of :math:`u_t` and decays first, as ``pytorch_optimizer.Lamb``'s
``weight_decouple``: :math:`p \leftarrow p(1-\gamma\lambda)`, then :math:`r_t` from the decayed
norm and :math:`p_t = p - \gamma r_t u_t`.  A tensor whose update norm is not finite gets a
non-finite step (no ratio of 1 for NaN).  State: ``exp_avg``, ``exp_avg_sq``.

The step is two passes over the group (fastoptim's per-tensor reduction phase): the first
updates :math:`m, v` and sums :math:`p^2` and :math:`u^2` per tensor, in an order fixed by the
tensor alone (the same bits for any thread count, in a group with other tensors or alone); the
second recomputes :math:`u` from the stored :math:`m, v` and moves the parameters (40 bytes
per float32 element).  A tensor whose state is stored rounded (``state_dtype`` bfloat16,
float16, int8) leaves it untouched in the first pass, and the second recomputes the moments
from the stored ones before storing them: :math:`u` is always that of the unrounded moments,
so every layout is a float32 step followed by its rounding.  A whole parameter per tensor:
sharded parameters (FSDP2's DTensor, ZeRO-1 of :mod:`fastoptim.distributed`) are refused.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999)),
        Hyper("eps", 1e-6),
        Hyper("weight_decay", 0),
        Hyper("bias_correction", True),
        Hyper("max_weight_norm", 10.0, check=transforms.check_positive, annotation="float | None"),
        Hyper("max_trust_ratio", None, check=transforms.check_positive, annotation="float | None"),
        Hyper("decoupled_weight_decay", False),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("exp_avg"), State("exp_avg_sq")),
    extra_fields=_lamb_fields,
    functional_doc=r"""One in-place LAMB update of one tensor (see :class:`fastoptim.LAMB`): the
trust ratio from ``param``'s own norms.""",
    torch_doc=r"""LAMB (You et al. 2020; see :class:`fastoptim.LAMB`), which ``torch.optim``
lacks, with :class:`fastoptim.LAMB`'s signature.  State: ``step``, ``exp_avg``,
``exp_avg_sq``.""",
)

LARS = Definition(
    name="LARS",
    kernel="LARS",
    per_tensor=True,
    doc=r"""LARS, SGD with momentum and a per-tensor trust ratio (You et al. 2017, "Large Batch
Training of Convolutional Networks"), as ``pytorch_optimizer.LARS``.  ``torch.optim`` has no
LARS.

.. math::
    r_t = \frac{\eta\,\|p_{t-1}\|}{\|g_t\| + \lambda \|p_{t-1}\|}
    \text{ (1 if } \|p_{t-1}\| = 0 \text{ or the denominator is 0)},\quad
    \tilde g_t = r_t\,(g_t + \lambda p_{t-1})

    b_t = \mu b_{t-1} + (1-\tau)\tilde g_t \;(b_0 = 0),\quad
    d_t = \tilde g_t + \mu b_t \text{ (nesterov) or } b_t,\quad p_t = p_{t-1} - \gamma d_t

with :math:`\eta` ``trust_coefficient`` and the norms over each parameter tensor.  Tensors
with at most one dimension (biases, normalisation scales, scalars) are excluded from the
adaptation and the weight decay when ``exclude_1d`` (the default, ``pytorch_optimizer``'s
rule and the usual practice): :math:`\tilde g_t = g_t`.  ``exclude_1d=False`` adapts every
tensor.  With ``momentum=0`` there is no buffer: :math:`d_t = \tilde g_t`.  Unlike
``torch.optim.SGD`` the buffer starts at zero (:math:`b_1 = (1-\tau)\tilde g_1`).  State:
``momentum_buffer`` (when ``momentum > 0``).

The step is two passes over the group (fastoptim's per-tensor reduction phase): the first
reads :math:`p` and :math:`g` and sums their squares per tensor, in an order fixed by the tensor
alone (the same bits for any thread count, in a group with other tensors or alone); the second
is the element-wise update.  A whole parameter per tensor: sharded parameters (FSDP2's
DTensor, ZeRO-1 of :mod:`fastoptim.distributed`) are refused.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("momentum", 0.9, rule=UNIT),
        Hyper("dampening", 0, rule=UNIT),
        Hyper("weight_decay", 0),
        Hyper("trust_coefficient", 1e-3),
        Hyper("nesterov", False),
        Hyper("exclude_1d", True),
        Hyper("maximize", False, keyword=True),
    ),
    states=(State("momentum_buffer", optional=True),),
    functional_doc=r"""One in-place LARS update of one tensor (see :class:`fastoptim.LARS`): the
trust ratio from ``param``'s own norms (``exclude_1d`` reads ``param.ndim``).
``momentum_buffer`` is needed iff ``momentum > 0``.""",
    torch_doc=r"""LARS (You et al. 2017; see :class:`fastoptim.LARS`), which ``torch.optim``
lacks, with :class:`fastoptim.LARS`'s signature (``pytorch_optimizer.LARS``'s defaults).
State: ``step``, ``momentum_buffer`` (when ``momentum > 0``).""",
)


ALL: tuple[Definition, ...] = (
    SGD,
    ADAGRAD,
    RMSPROP,
    ADADELTA,
    ADAM,
    ADAMW,
    ADAMAX,
    NADAM,
    RADAM,
    LION,
    RPROP,
    ASGD,
    ADOPT,
)
ALL += (ADAMWSCHEDULEFREE, SGDSCHEDULEFREE)
ALL += (SPARSEADAM,)
# Two-pass (per-tensor trust ratio) optimizers: the driver's reduction phase.
ALL += (LAMB, LARS)


# ----------------------------------------------------------------------------- not element-wise
# Their step runs in Python (NumPy, and BLAS for the matrix products; fastoptim.host) instead of
# a compiled kernel: see engine.definition.Host.  Not in ALL, whose optimizers the element-wise
# test table (tests/cases.py) runs; tests/test_muon.py and tests/test_lbfgs.py test these.
def _check_ns_coefficients(owner: str, name: str, value: Any) -> None:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(is_number(v) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"{owner}: {name} must be three finite numbers (a, b, c), got {value!r}")


def _check_int(low: int, high: int | None = None, none: bool = False) -> Any:
    def check(owner: str, name: str, value: Any) -> None:
        if none and value is None:
            return
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
        if value < low or (high is not None and value >= high):
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise ValueError(f"{owner}: invalid {name}={value!r}: must be {bound}")

    return check


def _check_choice(choices: tuple[Any, ...]) -> Any:
    def check(owner: str, name: str, value: Any) -> None:
        if value not in choices or isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")

    return check


MUON = Definition(
    name="Muon",
    kernel="",
    host=Host(update=host.muon_update, check_param=host.check_muon_param),
    doc=r"""Muon: momentum orthogonalized by Newton-Schulz (Jordan et al. 2024, "Muon: An
optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is Scalable for LLM
Training"), as ``torch.optim.Muon``.  **2-D parameters only** (matrices of hidden layers;
optimize biases, norms and embeddings with e.g. :class:`AdamW`).

.. math::
    B_t = \mathrm{lerp}(B_{t-1}, g_t, 1-\mu) \;(B_0 = 0),\quad
    \tilde B_t = \mathrm{lerp}(g_t, B_t, \mu) \text{ (nesterov) or } B_t,

    O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t),\quad
    p_t = p_{t-1}(1 - \gamma\lambda) - \gamma\,r(A, B)\,O_t

:math:`\mathrm{NS}`: :math:`X_0 = \tilde B / \max(\|\tilde B\|_F, \epsilon)` (transposed
when it has more rows than columns), then ``ns_steps`` times :math:`A = X X^T`,
:math:`X \leftarrow aX + (bA + cA^2)X` (``ns_coefficients`` :math:`(a, b, c)`).
:math:`r(A, B)` for an :math:`A \times B` parameter: ``adjust_lr_fn=None`` or ``"original"``
:math:`\sqrt{\max(1, A/B)}`; ``"match_rms_adamw"`` :math:`0.2\sqrt{\max(A, B)}`.
The weight decay is decoupled.  State: ``momentum_buffer``.

The matrix products run through NumPy's ``@`` (BLAS).  ``ns_dtype`` (fastoptim's option):
``"bfloat16"`` (the default) is torch's convention: the iteration's input, norm and the result
of every product are rounded to bfloat16, products accumulate in float32, so the result matches
``torch.optim.Muon`` up to float32 summation order: BLAS sums in another order than torch,
which flips the bfloat16 rounding of a few elements, and the iteration amplifies such flips
where the matrix has small singular values, so elements of :math:`O_t` differ by a bfloat16
ulp (2**-8 of themselves); measured, the parameters stay within 5e-6 relative of torch's
after 10 steps at :math:`\gamma = 10^{-3}` (the difference grows with :math:`\gamma`).
``"float32"`` / ``"float64"`` run the iteration without rounding to bfloat16: a more exact
orthogonalisation that differs from torch's by about 1e-2 relative in :math:`O_t`; measured
after 10 steps at :math:`\gamma = 10^{-3}` on unit-scale parameters, 1e-5 of their scale
(about 1e-4 for parameters of scale 0.1), 5 times the bfloat16 convention's difference.
The momentum and the update compute in the parameter's dtype (float32 or float64).  The
iteration's scratch arrays (:math:`2m^2 + mn` values for the largest :math:`m \times n`
matrix, :math:`m \le n`) are kept between steps, one set per thread that steps a Muon;
``fastoptim.host.release_workspace()`` frees the calling thread's.""",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("weight_decay", 0.1),
        Hyper("momentum", 0.95, rule=UNIT),
        Hyper("nesterov", True),
        Hyper(
            "ns_coefficients",
            host.NS_COEFFICIENTS,
            check=_check_ns_coefficients,
            annotation="tuple[float, float, float]",
        ),
        Hyper("eps", 1e-7),
        Hyper("ns_steps", 5, check=_check_int(0, 100), annotation="int"),
        Hyper(
            "adjust_lr_fn",
            None,
            check=_check_choice(host.ADJUST_LR_FNS),
            annotation="str | None",
        ),
        Hyper(
            "ns_dtype",
            "bfloat16",
            check=_check_choice(host.NS_DTYPES),
            keyword=True,
            extension=True,
            annotation='Literal["bfloat16", "float32", "float64"]',
        ),
    ),
    states=(State("momentum_buffer"),),
    torch_step=False,
    functional_doc=r"""One in-place Muon update of the 2-D `param` (see :class:`fastoptim.Muon`).
``momentum_buffer`` starts at zero; ``step`` is not used by the update (kept for the
signature every functional update has).""",
    torch_doc=r"""Drop-in :class:`torch.optim.Muon` (see :class:`fastoptim.Muon` for the update
rule and ``ns_dtype``).  2-D float32/float64 parameters; state: ``momentum_buffer``, as in
torch.  The Newton-Schulz products run through NumPy's BLAS on the tensors' memory.""",
)

LBFGS = Definition(
    name="LBFGS",
    kernel="",
    host=Host(closure=host.lbfgs_step, resolve=host.lbfgs_defaults),
    doc=r"""L-BFGS (Liu & Nocedal 1989), with an optional strong-Wolfe line search (after
minFunc), as ``torch.optim.LBFGS``: **its step takes a closure** that re-evaluates the
objective, and runs up to ``max_iter`` iterations (``max_eval`` evaluations) per step, over
the group's parameters as one vector.  One parameter group only, as torch.

Each iteration: the direction :math:`d = -H g` from the two-loop recursion over the last
``history_size`` pairs :math:`(s_i, y_i)` (pairs with :math:`y^T s \le 10^{-10}` are
skipped), :math:`H_0 = \frac{y^T s}{y^T y} I`; the step :math:`p \leftarrow p + t d` with
:math:`t = \gamma` (:math:`\min(1, 1/\|g\|_1)\gamma` at the very first iteration) or, with
``line_search_fn="strong_wolfe"``, the :math:`t` the line search finds (sufficient decrease
:math:`c_1 = 10^{-4}`, curvature :math:`c_2 = 0.9`).  It stops when
:math:`\|g\|_\infty \le` ``tolerance_grad``, when :math:`g^T d > -`
``tolerance_change``, when :math:`\|t d\|_\infty` or the change of the loss is below
``tolerance_change``, or at ``max_iter`` iterations / ``max_eval`` evaluations
(default ``max_iter * 5 // 4``).

**The closure** (NumPy tier): ``closure()`` computes the loss at the current parameters and
either writes the gradients into ``opt.grads`` (the optimizer's buffers) and returns the
loss, or returns ``(loss, grads)`` with ``grads`` a list (or dict) of arrays as
:meth:`~fastoptim.Optimizer.step` takes them.  ``step(closure)`` returns the first loss the
closure returned.

The parameters stay in place: each evaluation *gathers* the gradients into one new flat
vector (a copy, as torch's ``_gather_flat_grad``), and each update *scatters* :math:`t d`
into each parameter's slice; the line search keeps a copy of the parameters.  State (torch's
names, kept for the group, see ``opt.state``): ``func_evals``, ``n_iter``, ``d``, ``t``,
``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``.
Memory: ``2 * history_size + 3`` vectors of the parameters' size.""",
    hyper=(
        Hyper("lr", 1),
        Hyper("max_iter", 20, check=_check_int(0), annotation="int"),
        Hyper("max_eval", None, check=_check_int(0, none=True), annotation="int | None"),
        Hyper("tolerance_grad", 1e-7, schedulable=False),
        Hyper("tolerance_change", 1e-9, schedulable=False),
        Hyper("history_size", 100, check=_check_int(1), annotation="int"),
        Hyper(
            "line_search_fn",
            None,
            check=_check_choice(host.LINE_SEARCH_FNS),
            annotation="str | None",
        ),
    ),
    states=(),
    torch_step=False,
    torch_doc=r"""Drop-in :class:`torch.optim.LBFGS` (see :class:`fastoptim.LBFGS`):
``step(closure)`` with a closure that zeroes the gradients, computes the loss, calls
``backward()`` and returns the loss.  float32/float64 parameters (CPU); the state is
torch's (tensors under the first parameter), so ``state_dict`` moves between
``torch.optim.LBFGS`` and this class both ways.  The vector arithmetic runs in NumPy on
the tensors' memory.""",
)

ADAFACTOR = Definition(
    name="Adafactor",
    kernel="",
    host=Host(update=host.adafactor_update),
    doc=r"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost"), as ``torch.optim.Adafactor``: a second moment **factored** into row and column
statistics for every parameter of two or more dimensions (reduced over its last two: a
tensor of shape :math:`(\dots, R, C)` keeps :math:`(\dots, R, 1)` + :math:`(\dots, 1, C)`
values), a full one for 0-D and 1-D parameters; a relative step size; update clipping.

.. math::
    \hat\beta_{2t} = 1 - t^{\tau},\quad
    \rho_t = \min(\gamma, 1/\sqrt{t}),\quad
    \alpha_t = \max(\epsilon_2, \mathrm{RMS}(p_{t-1}))\,\rho_t,\quad
    p \leftarrow p\,(1 - \gamma\lambda)

    \text{matrices: } R_t = \mathrm{lerp}(R_{t-1}, \mathrm{mean}_{-1}(g^2), t^{\tau}),\;
    C_t = \mathrm{lerp}(C_{t-1}, \mathrm{mean}_{-2}(g^2), t^{\tau}),\;
    \hat V_t = \frac{R_t C_t}{\max(\mathrm{mean}_{-2}(R_t), \epsilon_1)}

    \text{vectors: } \hat V_t = V_t = \mathrm{lerp}(V_{t-1}, g^2, t^{\tau})

    U_t = \frac{g}{\sqrt{\max(\hat V_t, \epsilon_1^2)}},\quad
    p_t = p - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\,U_t

(:math:`\tau` = ``beta2_decay`` <= 0, :math:`(\epsilon_1, \epsilon_2)` = ``eps``, with
:math:`\epsilon_1` = None meaning the machine epsilon of the group's first parameter's
dtype; :math:`d` the clipping threshold >= 1; :math:`\lambda` ``weight_decay``, decoupled and
scaled by :math:`\gamma`; :math:`g` negated with ``maximize``; RMS over the whole tensor,
computed before the weight decay for :math:`\alpha_t`).  As torch, :math:`\gamma` is only the
cap of the relative step size (and the decay's factor), not the step itself.

State (torch's names and shapes): ``row_var`` :math:`(\dots, R, 1)` and ``col_var``
:math:`(\dots, 1, C)` for a parameter of two or more dimensions, ``variance`` (the
parameter's shape) for the others, all starting at zero; the step count :math:`t` (the
group's, in ``fastoptim.torch`` torch's per-parameter ``step``).

The update runs in NumPy (a host step: float32 and float64 parameters, no precision or
gradient-transform options): per tensor one reduction pass over the gradient for the row and
column means of :math:`g^2` (float64 accumulation in a fixed block order, so the result does
not depend on threads), then the element-wise passes; the RMS of the parameter and of
:math:`U_t` are reductions too.  Results match torch's for-loop path within a few ulps
(4 measured over 30 steps, float32 and float64).  An
empty parameter is left unchanged (torch divides by its zero size).""",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("beta2_decay", -0.8, check=host.check_beta2_decay),
        Hyper(
            "eps",
            (None, 1e-3),
            check=host.check_adafactor_eps,
            annotation="tuple[float | None, float]",
        ),
        Hyper("d", 1.0, check=host.check_clip_threshold),
        Hyper("weight_decay", 0.0),
        Hyper("maximize", False, keyword=True),
    ),
    states=(
        State("row_var", optional=True, shape=host.row_var_shape),
        State("col_var", optional=True, shape=host.col_var_shape),
        State("variance", optional=True, shape=host.variance_shape),
    ),
    functional_doc=r"""One in-place Adafactor update of `param` (see
:class:`fastoptim.Adafactor`): a parameter of two or more dimensions takes ``row_var``
(shape ``param.shape[:-1] + (1,)``) and ``col_var`` (``param.shape[:-2] + (1,
param.shape[-1])``), a 0-D or 1-D one ``variance`` (its shape); the others are None.  All
start at zero; ``step`` is the 1-based update number (it sets :math:`\hat\beta_{2t}` and
:math:`\rho_t`).""",
    torch_doc=r"""Drop-in :class:`torch.optim.Adafactor` (see :class:`fastoptim.Adafactor` for
the update rule).  float32/float64 parameters; state as torch's: ``step`` and ``row_var`` /
``col_var`` (two or more dimensions) or ``variance``, so ``state_dict`` moves between
``torch.optim.Adafactor`` and this class both ways.  The update runs in NumPy on the tensors'
memory.""",
)

# Optimizers whose step is not element-wise (code generated like ALL's).
HOST = (MUON, LBFGS, ADAFACTOR)


# ----------------------------------------------------------------------------- Keras
# fastoptim.keras: Keras 3's optimizers, with Keras's names, defaults and update rules, on the
# kernels above.  Each is a torch-convention kernel with its ``keras`` variant (Keras's epsilon
# placement, lr inside the momentum buffers, decoupled weight decay p *= 1 - lr * wd applied
# before the update) or with per-step scalars (Adam's eps, NAdam's momentum schedule).  Keras
# names the state differently; fastoptim keeps torch's names (see fastoptim.keras).
def _keras_lion_relations(group: Mapping[str, Any]) -> None:
    if not group["beta_1"] > 0:
        raise ValueError(
            f"Lion: invalid beta_1={group['beta_1']!r}: must be in (0, 1] (Keras's rule; 0 "
            "degenerates to SignSGD)"
        )


def _learning_rate(default: float) -> Hyper:
    return Hyper("learning_rate", default, field="lr")


_EPSILON = Hyper("epsilon", 1e-7, field="eps")
_WEIGHT_DECAY = Hyper("weight_decay", 0.0)  # Keras's None: no decay
_BETA_1 = Hyper("beta_1", 0.9, rule=OPEN_UNIT, field="beta1")
_BETA_2 = Hyper("beta_2", 0.999, rule=OPEN_UNIT, field="beta2")
_WD_DOC = r"""With ``weight_decay`` (Keras's decoupled decay, applied first):
:math:`p \leftarrow p(1 - \gamma\lambda)`."""

KERAS_SGD = Definition(
    name="SGD",
    kernel="SGD",
    doc=r"""Keras's SGD (``keras.optimizers.SGD``): the momentum buffer holds the lr-scaled step.

.. math::
    v_t = \mu v_{t-1} - \gamma g_t,\quad
    p_t = p_{t-1} + v_t \text{, or } p_{t-1} + \mu v_t - \gamma g_t \text{ (nesterov)}

(:math:`p_t = p_{t-1} - \gamma g_t` without momentum).

"""
    + _WD_DOC
    + """

State: ``momentum_buffer`` (Keras's ``momentum``) when ``momentum != 0``.""",
    hyper=(
        _learning_rate(0.01),
        Hyper("momentum", 0.0, rule=UNIT),
        Hyper("nesterov", False),
        _WEIGHT_DECAY,
    ),
    states=(State("momentum_buffer", optional=True),),
    fixed=(("keras", True),),
)

KERAS_RMSPROP = Definition(
    name="RMSprop",
    kernel="RMSprop",
    doc=r"""Keras's RMSprop (``keras.optimizers.RMSprop``): epsilon inside the square root, and
the momentum buffer accumulates lr-scaled steps.

.. math::
    v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
    \bar g_t = \rho \bar g_{t-1} + (1-\rho) g_t \text{ (centered)},\quad
    s_t = \frac{\gamma g_t}{\sqrt{\max(v_t - \bar g_t^2, 0) + \epsilon}}

    b_t = \mu b_{t-1} + s_t,\quad p_t = p_{t-1} - b_t \text{ (or } s_t \text{ without momentum)}



"""
    + _WD_DOC
    + """

State: ``square_avg`` (Keras's ``velocity``), ``grad_avg``
(``average_gradient``, centered), ``momentum_buffer`` (``momentum``, momentum > 0).""",
    hyper=(
        _learning_rate(0.001),
        Hyper("rho", 0.9, rule=UNIT, field="alpha"),
        Hyper("momentum", 0.0),
        _EPSILON,
        Hyper("centered", False),
        _WEIGHT_DECAY,
    ),
    states=(
        State("square_avg"),
        State("grad_avg", optional=True),
        State("momentum_buffer", optional=True),
    ),
    fixed=(("keras", True),),
)

KERAS_ADAGRAD = Definition(
    name="Adagrad",
    kernel="Adagrad",
    doc=r"""Keras's Adagrad (``keras.optimizers.Adagrad``): the accumulator starts at 0.1 and
epsilon is inside the square root.

.. math::
    s_t = s_{t-1} + g_t^2,\quad p_t = p_{t-1} - \gamma \frac{g_t}{\sqrt{s_t + \epsilon}}



"""
    + _WD_DOC
    + """

State: ``sum`` (Keras's ``accumulator``).""",
    hyper=(
        _learning_rate(0.001),
        Hyper("initial_accumulator_value", 0.1, schedulable=False, functional=False),
        _EPSILON,
        _WEIGHT_DECAY,
    ),
    states=(State("sum", fill="initial_accumulator_value"),),
    fixed=(("keras", True),),
)

KERAS_ADADELTA = Definition(
    name="Adadelta",
    kernel="Adadelta",
    doc=r"""Keras's Adadelta (``keras.optimizers.Adadelta``): torch's rule (see
:class:`fastoptim.Adadelta`) with Keras's defaults (``learning_rate=0.001``, ``rho=0.95``,
``epsilon=1e-7``).

"""
    + _WD_DOC
    + """

State: ``square_avg``, ``acc_delta`` (Keras's
``accumulated_grad``, ``accumulated_delta_var``).""",
    hyper=(
        _learning_rate(0.001),
        Hyper("rho", 0.95, rule=UNIT),
        _EPSILON,
        _WEIGHT_DECAY,
    ),
    states=(State("square_avg"), State("acc_delta")),
    fixed=(("keras", True),),
)

KERAS_ADAM = Definition(
    name="Adam",
    kernel="Adam",
    doc=r"""Keras's Adam (``keras.optimizers.Adam``): epsilon is added to :math:`\sqrt{v_t}`
before the bias correction (torch's rule with :math:`\epsilon_t = \epsilon/\sqrt{1-\beta_2^t}`).

.. math::
    p_t = p_{t-1} - \gamma\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
          \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

with :math:`m_t, v_t, \hat v_t` as :class:`fastoptim.Adam`.

"""
    + _WD_DOC
    + """

State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (Keras's
``momentum``, ``velocity``, ``velocity_hat``).""",
    hyper=(
        _learning_rate(0.001),
        _BETA_1,
        _BETA_2,
        _EPSILON,
        Hyper("amsgrad", False),
        _WEIGHT_DECAY,
    ),
    states=(State("exp_avg"), State("exp_avg_sq"), State("max_exp_avg_sq", optional=True)),
    fixed=(("keras", True), ("decoupled_weight_decay", True)),
)

KERAS_ADAMW = Definition(
    name="AdamW",
    kernel="Adam",
    base=KERAS_ADAM,
    doc=r"""Keras's AdamW (``keras.optimizers.AdamW``): :class:`Adam` (Keras's) with
``weight_decay=0.004`` by default.""",
    hyper=(
        _learning_rate(0.001),
        Hyper("weight_decay", 0.004),
        _BETA_1,
        _BETA_2,
        _EPSILON,
        Hyper("amsgrad", False),
    ),
    states=(State("exp_avg"), State("exp_avg_sq"), State("max_exp_avg_sq", optional=True)),
    fixed=(("keras", True), ("decoupled_weight_decay", True)),
)

KERAS_ADAMAX = Definition(
    name="Adamax",
    kernel="Adamax",
    doc=r"""Keras's Adamax (``keras.optimizers.Adamax``): epsilon in the denominator, not in
the infinity norm.

.. math::
    u_t = \max(\beta_2 u_{t-1}, |g_t|),\quad
    p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t + \epsilon}



"""
    + _WD_DOC
    + """

State: ``exp_avg``, ``exp_inf`` (Keras's ``momentum``, ``norm``).""",
    hyper=(_learning_rate(0.001), _BETA_1, _BETA_2, _EPSILON, _WEIGHT_DECAY),
    states=(State("exp_avg"), State("exp_inf")),
    fixed=(("keras", True),),
)

KERAS_NADAM = Definition(
    name="Nadam",
    kernel="NAdam",
    doc=r"""Keras's Nadam (``keras.optimizers.Nadam``): torch's NAdam rule with the momentum
schedule :math:`\mu_t = \beta_1(1 - \tfrac12 0.96^t)` (torch's ``momentum_decay=1``).

.. math::
    p_t = p_{t-1} - \gamma \Big(\frac{\mu_{t+1} m_t}{1-\prod_{i\le t+1}\mu_i}
          + \frac{(1-\mu_t) g_t}{1-\prod_{i\le t}\mu_i}\Big)
          \Big/ \Big(\sqrt{\frac{v_t}{1-\beta_2^t}} + \epsilon\Big)



"""
    + _WD_DOC
    + """

State: ``exp_avg``, ``exp_avg_sq`` (Keras's ``momentum``,
``velocity``) and the group's ``mu_product`` (Keras's ``u_product``).""",
    hyper=(_learning_rate(0.001), _BETA_1, _BETA_2, _EPSILON, _WEIGHT_DECAY),
    states=(State("exp_avg"), State("exp_avg_sq")),
    scalars=(("mu_product", 1.0),),
    fixed=(("momentum_decay", 1.0), ("decoupled_weight_decay", True)),
)

KERAS_LION = Definition(
    name="Lion",
    kernel="Lion",
    doc=r"""Keras's Lion (``keras.optimizers.Lion``): :class:`fastoptim.Lion`'s rule with
Keras's defaults (``learning_rate=0.001``) and ``beta_1`` in (0, 1].

"""
    + _WD_DOC
    + """

State: ``exp_avg`` (Keras's ``momentum``).""",
    hyper=(
        _learning_rate(0.001),
        Hyper("beta_1", 0.9, rule=UNIT, field="beta1"),
        Hyper("beta_2", 0.99, rule=UNIT, field="beta2"),
        _WEIGHT_DECAY,
    ),
    states=(State("exp_avg"),),
    relations=_keras_lion_relations,
)

# fastoptim.keras, in Keras's documentation order.
KERAS = (
    KERAS_SGD,
    KERAS_RMSPROP,
    KERAS_ADAGRAD,
    KERAS_ADADELTA,
    KERAS_ADAM,
    KERAS_ADAMW,
    KERAS_ADAMAX,
    KERAS_NADAM,
    KERAS_LION,
)
