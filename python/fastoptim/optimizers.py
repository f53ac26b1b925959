r"""The optimizers: ``torch.optim``'s names, signatures, defaults and formulas, updating NumPy
arrays in place with one compiled call per parameter group and step.

Notation in the docstrings: :math:`p` parameter, :math:`g` gradient (negated first when
``maximize``; plus :math:`\lambda p` for L2 ``weight_decay`` unless the decay is decoupled),
:math:`\gamma` learning rate, :math:`t` the 1-based step.
"""

from __future__ import annotations

from typing import Any

from . import _core
from ._optimizer import Optimizer, Params, _defaults

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
]


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, dampening and Nesterov momentum
    (``torch.optim.SGD``; Sutskever et al. 2013 for Nesterov).

    .. math::
        b_t = \mu b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
        d_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\quad p_t = p_{t-1} - \gamma d_t

    State: ``momentum_buffer`` (only when ``momentum != 0``).
    """

    _hyper_type = _core.SGDHyper
    _closed_unit = frozenset({"dampening"})
    _core_step = staticmethod(_core.step_sgd)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))

    @classmethod
    def _check_relations(cls, group: Any) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: nesterov=True requires momentum > 0 and dampening = 0")

    @classmethod
    def _core_values(cls, group: Any, fresh: set[str]) -> dict[str, Any]:
        values = super()._core_values(group, fresh)
        values["first_momentum_step"] = "momentum_buffer" in fresh
        return values


class Adagrad(Optimizer):
    r"""Adagrad (Duchi, Hazan & Singer 2011; ``torch.optim.Adagrad``).

    .. math::
        \tilde\gamma = \frac{\gamma}{1 + (t-1)\eta},\quad s_t = s_{t-1} + g_t^2,\quad
        p_t = p_{t-1} - \tilde\gamma \frac{g_t}{\sqrt{s_t} + \epsilon}

    State: ``sum`` (starts at ``initial_accumulator_value``).
    """

    _hyper_type = _core.AdagradHyper
    _core_step = staticmethod(_core.step_adagrad)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))

    def _state_fill(self, name: str, group: Any) -> float:
        return float(group["initial_accumulator_value"])


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, Coursera lecture 6e; ``torch.optim.RMSprop``), optionally centered
    (Graves 2013) and with momentum.

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ (centered)},\quad
        d_t = \frac{g_t}{\sqrt{v_t - \bar g_t^2} + \epsilon},\quad
        b_t = \mu b_{t-1} + d_t,\quad p_t = p_{t-1} - \gamma b_t \text{ (or } \gamma d_t)

    State: ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer`` (momentum > 0).
    """

    _hyper_type = _core.RMSpropHyper
    _closed_unit = frozenset({"alpha"})
    _core_step = staticmethod(_core.step_rmsprop)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler 2012; ``torch.optim.Adadelta``).

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t,\quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2,\quad p_t = p_{t-1} - \gamma \Delta_t

    State: ``square_avg``, ``acc_delta``.
    """

    _hyper_type = _core.AdadeltaHyper
    _closed_unit = frozenset({"rho"})
    _core_step = staticmethod(_core.step_adadelta)

    def __init__(
        self,
        params: Params,
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Adam(Optimizer):
    r"""Adam (Kingma & Ba 2015; ``torch.optim.Adam``), with AMSGrad (Reddi et al. 2018) and
    decoupled weight decay (AdamW, Loshchilov & Hutter 2019).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (amsgrad) or } v_t

        p_t = p_{t-1}(1 - \gamma\lambda_{\text{dec}})
              - \frac{\gamma}{1-\beta_1^t}\,
                \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).
    """

    _hyper_type = _core.AdamHyper
    _core_step = staticmethod(_core.step_adam)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019; ``torch.optim.AdamW``): :class:`Adam` with decoupled
    weight decay, :math:`p \leftarrow p(1-\gamma\lambda)` before the Adam update."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
        )


class Adamax(Optimizer):
    r"""Adamax, the infinity-norm variant of Adam (Kingma & Ba 2015, section 7;
    ``torch.optim.Adamax``).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
        p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t}

    State: ``exp_avg``, ``exp_inf``.
    """

    _hyper_type = _core.AdamaxHyper
    _core_step = staticmethod(_core.step_adamax)

    def __init__(
        self,
        params: Params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class NAdam(Optimizer):
    r"""NAdam, Adam with Nesterov momentum (Dozat 2016; ``torch.optim.NAdam``).

    .. math::
        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad
        m_t, v_t \text{ as Adam},\quad
        d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon

        p_t = p_{t-1} - \gamma \frac{1-\mu_t}{1-\prod_{i\le t}\mu_i} \frac{g_t}{d_t}
              - \gamma \frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i} \frac{m_t}{d_t}

    State: ``exp_avg``, ``exp_avg_sq``, and the group's ``mu_product``.
    """

    _hyper_type = _core.NAdamHyper
    _core_step = staticmethod(_core.step_nadam)
    _scalar_state = ("mu_product",)

    def __init__(
        self,
        params: Params,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class RAdam(Optimizer):
    r"""RAdam, rectified Adam (Liu et al. 2020; ``torch.optim.RAdam``).

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad
        \hat m_t = \frac{m_t}{1-\beta_1^t}

        p_t = p_{t-1} - \gamma \hat m_t r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}
        \text{ if } \rho_t > 5 \text{ else } p_{t-1} - \gamma \hat m_t,\quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    State: ``exp_avg``, ``exp_avg_sq``.
    """

    _hyper_type = _core.RAdamHyper
    _core_step = staticmethod(_core.step_radam)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))


class Lion(Optimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms").

    .. math::
        p_t = p_{t-1}(1-\gamma\lambda) - \gamma\,\mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),
        \quad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\mathrm{sign}(0) = 0`.  State: ``exp_avg``.
    """

    _hyper_type = _core.LionHyper
    _core_step = staticmethod(_core.step_lion)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, _defaults(locals()))
