# Type stubs for the compiled module fastoptim._core (cpp/bindings/module.cpp).
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

class Plan:
    def __init__(
        self,
        params: Sequence[np.ndarray],
        labels: Sequence[str],
        state_names: Sequence[str],
        states: Sequence[Sequence[np.ndarray | tuple[np.ndarray, np.ndarray]]],
        *,
        masters: Sequence[np.ndarray | None] | None = None,
        comps: Sequence[np.ndarray | None] | None = None,
        outs: Sequence[np.ndarray | None] | None = None,
        ids: Sequence[int] | None = None,
        emas: Sequence[np.ndarray | None] | None = None,
        qmaps: Sequence[str] | None = None,
    ) -> None: ...
    def set_rounding(self, mode: str, seed: int = 0) -> None: ...
    def set_grad_transform(self, mul: float, clip: float) -> None: ...
    @property
    def grad_mul(self) -> float: ...
    @property
    def grad_clip(self) -> float: ...
    def set_ema_decay(self, decay: float) -> None: ...
    @property
    def ema_decay(self) -> float: ...
    def grad_stats(self) -> tuple[float, bool]: ...
    @property
    def rounding(self) -> str: ...
    @property
    def seed(self) -> int: ...
    def bind_grads(self, grads: Sequence[np.ndarray | Any]) -> None: ...  # or DLPack capsules
    def check(self) -> None: ...
    def release_grads(self) -> None: ...
    def watch_torch(self, states: list[Any], scalars: list[np.ndarray]) -> None: ...
    def bind_torch(self, params: list[Any]) -> bool: ...
    @property
    def completed(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def numel(self) -> int: ...
    @property
    def state_names(self) -> list[str]: ...

class SGDHyper:
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    first_momentum_step: bool
    keras: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class AdagradHyper:
    lr: float
    lr_decay: float
    weight_decay: float
    eps: float
    maximize: bool
    keras: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class RMSpropHyper:
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    keras: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class AdadeltaHyper:
    lr: float
    rho: float
    eps: float
    weight_decay: float
    maximize: bool
    keras: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class AdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool
    keras: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class AdamaxHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    keras: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class NAdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    momentum_decay: float
    mu_product: float
    decoupled_weight_decay: bool
    maximize: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class RAdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class LionHyper:
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class RpropHyper:
    etaminus: float
    etaplus: float
    step_size_min: float
    step_size_max: float
    maximize: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class ASGDHyper:
    lr: float
    lambd: float
    alpha: float
    t0: float
    weight_decay: float
    eta: float
    mu: float
    maximize: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class ADOPTHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clip: bool
    decoupled_weight_decay: bool
    maximize: bool
    cautious: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class SparseAdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    maximize: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class LAMBHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    max_weight_norm: float
    max_trust_ratio: float
    bias_correction: bool
    decoupled_weight_decay: bool
    maximize: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class LARSHyper:
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    trust_coefficient: float
    nesterov: bool
    exclude_1d: bool
    maximize: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class AdamWScheduleFreeHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    warmup_steps: float
    r: float
    weight_lr_power: float
    weight_sum: float
    lr_max: float
    train_mode: float
    swap_weight: float
    maximize: bool
    swap: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

class SGDScheduleFreeHyper:
    lr: float
    beta1: float
    weight_decay: float
    warmup_steps: float
    r: float
    weight_lr_power: float
    weight_sum: float
    lr_max: float
    train_mode: float
    swap_weight: float
    maximize: bool
    swap: bool
    def __init__(self) -> None: ...
    def state_names(self) -> list[str]: ...

def step_sgd(
    plan: Plan,
    hyper: SGDHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_sgd(
    plans: Sequence[Plan],
    hypers: Sequence[SGDHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_adagrad(
    plan: Plan,
    hyper: AdagradHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adagrad(
    plans: Sequence[Plan],
    hypers: Sequence[AdagradHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_rmsprop(
    plan: Plan,
    hyper: RMSpropHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_rmsprop(
    plans: Sequence[Plan],
    hypers: Sequence[RMSpropHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_adadelta(
    plan: Plan,
    hyper: AdadeltaHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adadelta(
    plans: Sequence[Plan],
    hypers: Sequence[AdadeltaHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_adam(
    plan: Plan,
    hyper: AdamHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adam(
    plans: Sequence[Plan],
    hypers: Sequence[AdamHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_adamax(
    plan: Plan,
    hyper: AdamaxHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adamax(
    plans: Sequence[Plan],
    hypers: Sequence[AdamaxHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_nadam(
    plan: Plan,
    hyper: NAdamHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_nadam(
    plans: Sequence[Plan],
    hypers: Sequence[NAdamHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_radam(
    plan: Plan,
    hyper: RAdamHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_radam(
    plans: Sequence[Plan],
    hypers: Sequence[RAdamHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_lion(
    plan: Plan,
    hyper: LionHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_lion(
    plans: Sequence[Plan],
    hypers: Sequence[LionHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_rprop(
    plan: Plan,
    hyper: RpropHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_rprop(
    plans: Sequence[Plan],
    hypers: Sequence[RpropHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_asgd(
    plan: Plan,
    hyper: ASGDHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_asgd(
    plans: Sequence[Plan],
    hypers: Sequence[ASGDHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_adopt(
    plan: Plan,
    hyper: ADOPTHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adopt(
    plans: Sequence[Plan],
    hypers: Sequence[ADOPTHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_sparseadam(
    plan: Plan,
    hyper: SparseAdamHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_sparseadam(
    plans: Sequence[Plan],
    hypers: Sequence[SparseAdamHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def rows_sgd(
    jobs: Sequence[
        tuple[SGDHyper, int, np.ndarray, np.ndarray, np.ndarray, Sequence[np.ndarray], str]
    ],
    ran: list[bool] | None = None,
) -> None: ...
def rows_adagrad(
    jobs: Sequence[
        tuple[AdagradHyper, int, np.ndarray, np.ndarray, np.ndarray, Sequence[np.ndarray], str]
    ],
    ran: list[bool] | None = None,
) -> None: ...
def rows_sparseadam(
    jobs: Sequence[
        tuple[SparseAdamHyper, int, np.ndarray, np.ndarray, np.ndarray, Sequence[np.ndarray], str]
    ],
    ran: list[bool] | None = None,
) -> None: ...
def step_adamwschedulefree(
    plan: Plan,
    hyper: AdamWScheduleFreeHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_adamwschedulefree(
    plans: Sequence[Plan],
    hypers: Sequence[AdamWScheduleFreeHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_sgdschedulefree(
    plan: Plan,
    hyper: SGDScheduleFreeHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_sgdschedulefree(
    plans: Sequence[Plan],
    hypers: Sequence[SGDScheduleFreeHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_lamb(
    plan: Plan,
    hyper: LAMBHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_lamb(
    plans: Sequence[Plan],
    hypers: Sequence[LAMBHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def step_lars(
    plan: Plan,
    hyper: LARSHyper,
    step: int,
    grads: Sequence[np.ndarray] | None = None,
    release: bool = False,
) -> None: ...
def steps_lars(
    plans: Sequence[Plan],
    hypers: Sequence[LARSHyper],
    steps: Sequence[int],
    release: Sequence[bool],
) -> None: ...
def check_disjoint(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> None: ...

class Snapshot:
    def __init__(self, d: Mapping[Any, Any]) -> None: ...
    def same(self, d: object) -> bool: ...

def set_torch_api(api: object, tensor: type, parameter: type) -> bool: ...
def quant_map(name: str) -> np.ndarray: ...
def quantize_blockwise(
    values: np.ndarray, codes: np.ndarray, absmax: np.ndarray, map: str
) -> None: ...
def dequantize_blockwise(
    codes: np.ndarray, absmax: np.ndarray, out: np.ndarray, map: str
) -> None: ...
def isa() -> str: ...
def available_isas() -> list[str]: ...
def set_isa(name: str) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def max_threads() -> int: ...
def available_cpus() -> int: ...
def _cgroup_cpu_limit(root: str) -> int: ...
def set_grain(bytes: int) -> None: ...
def get_grain() -> int: ...
def stream_read(array: np.ndarray) -> float: ...
def combine(
    out: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    alpha: float,
    beta: float,
    bf16: bool = False,
) -> None: ...
def lerp(out: np.ndarray, a: np.ndarray, b: np.ndarray, weight: float) -> None: ...
def divide(x: np.ndarray, divisor: float, bf16: bool = False) -> None: ...
def round_bfloat16(x: np.ndarray) -> None: ...
def round_to(out: np.ndarray, x: np.ndarray) -> None: ...

class BlasOnPool:
    def __init__(self, setter: int) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(self, *args: object) -> bool: ...
    @staticmethod
    def calls() -> tuple[int, int]: ...

def symmetrize(a: np.ndarray, bf16: bool = False) -> None: ...
def transpose(out: np.ndarray, x: np.ndarray) -> None: ...
def accumulate(plans: Sequence[Plan], scale: float) -> None: ...
def stream(arrays: Sequence[np.ndarray]) -> None: ...
def stream_mixed(
    rw: Sequence[np.ndarray],
    grad: np.ndarray,
    out: np.ndarray | None = None,
    codes: np.ndarray | None = None,
) -> None: ...
