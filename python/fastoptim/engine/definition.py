"""What defines an optimizer, once, for every tier.

A :class:`Definition` holds everything the Python side knows about one optimizer: its
hyper-parameters (names, defaults, the rule each value must satisfy), the rules relating them,
how they map onto the compiled kernel's hyper-parameter struct, its state buffers (names,
initial values, which ones the functional tier takes positionally), its scalar state (NAdam's
``mu_product``), and its documentation (the update rule).  :mod:`fastoptim.definitions` holds
one per optimizer; the NumPy classes (:mod:`fastoptim.optimizers`), the functional functions
(:mod:`fastoptim.functional`) and the PyTorch drop-ins (:mod:`fastoptim.torch`) are generated
from them by :mod:`fastoptim.engine.codegen`, and at run time they validate and compile through
the same :class:`Definition` methods.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, cast

import numpy as np

from . import precision, transforms
from .transforms import is_number as is_number  # (re-exported: the engine checks numbers)

# A hyper-parameter's rule (see Definition.check_value).
NONNEGATIVE = "nonnegative"  # a finite number >= 0 (the default)
UNIT = "unit"  # a number in [0, 1]
OPEN_UNIT = "open_unit"  # a number in [0, 1) (Keras's beta_1, beta_2)
FLAG = "flag"  # a bool: a variant switch, never a schedule
BETAS = "betas"  # a pair (beta1, beta2), each in [0, 1)
PAIR = "pair"  # a pair of finite numbers >= 0 (ordering constraints: Definition.relations)
DTYPES = "dtypes"  # a state dtype policy (engine.precision)
ROUNDING = "rounding"  # 'nearest' or 'stochastic'
SEED = "seed"  # an int in [0, 2**64)
POSITIVE_OR_NONE = "positive_or_none"  # None or a finite number > 0 (transforms' limits)
DECAY_OR_NONE = "decay_or_none"  # None or a number in [0, 1] (ema_decay)
CUSTOM = "custom"  # checked by the Hyper's own `check` (Muon's ns_coefficients, ns_steps...)
PAIRS = (BETAS, PAIR)  # the rules of a pair, whose entries are the struct's `fields`

Number = Union[int, float, np.integer, np.floating]

# torch.optim's arguments that fastoptim.torch records and otherwise ignores (foreach, fused) or
# refuses (capturable, differentiable): name -> (annotation, default).
TORCH_ONLY = {
    "foreach": ("bool | None", None),
    "fused": ("bool | None", None),
    "capturable": ("bool", False),
    "differentiable": ("bool", False),
}


def name_the_call(
    e: BaseException, name: str, method: str | None = None, replacing: str = ""
) -> None:
    """Prefix ``"<name>.<method>: "`` (``"<name>: "`` without a method) to the message of a
    refusal (ValueError, TypeError, OverflowError) raised below a call in other words, in
    place: the exception keeps its type and traceback.  The compiled plans' checks (``"grad
    for param 0: ..."``) are prefixed; a message that begins with `replacing` (``"Adam:"``
    for ``adam_``) has that replaced; one that already begins with `name` is left."""
    if isinstance(e, (ValueError, TypeError, OverflowError)) and len(e.args) == 1:
        msg = e.args[0]
        if isinstance(msg, str) and not msg.startswith(name):
            if replacing and msg.startswith(replacing):
                msg = msg.removeprefix(replacing).lstrip(": ")
            e.args = (f"{name}{'' if method is None else '.' + method}: {msg}",)


@contextlib.contextmanager
def named_refusals(name: str, method: str | None = None, replacing: str = "") -> Iterator[None]:
    """The refusals raised inside, in the call's words (:func:`name_the_call`)."""
    try:
        yield
    except BaseException as e:
        name_the_call(e, name, method, replacing)
        raise


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter: its name, default, rule, whether it is keyword-only in the
    signatures, and whether it may follow a schedule (flags and values read only once, such as
    Adagrad's ``initial_accumulator_value``, may not).  A pair (``betas``, Rprop's ``etas``) is
    compiled into the two struct fields ``fields`` (``beta1``/``beta2`` for betas); its
    entries may follow schedules each."""

    name: str
    default: Any
    rule: str = NONNEGATIVE
    keyword: bool = False
    schedulable: bool = True
    functional: bool = True  # an argument of the functional tier's function
    fields: tuple[str, ...] = ()  # a pair: the compiled struct's fields of its two entries
    annotation: str = ""  # the signatures' annotation when the rule does not give it
    field: str = ""  # the compiled struct's field, when it is not `name` (Keras's epsilon: eps)
    # fastoptim's own option of an optimizer torch.optim has (SGD's ``cautious``): keyword-only,
    # after torch's signature in fastoptim.torch (which otherwise copies torch's exactly).
    extension: bool = False
    # A rule of its own (rule CUSTOM): raises TypeError/ValueError naming the optimizer and the
    # value, from (optimizer name, hyper-parameter name, value).
    check: Callable[[str, str, Any], None] | None = None

    def __post_init__(self) -> None:
        if self.check is not None:
            object.__setattr__(self, "rule", CUSTOM)
        if isinstance(self.default, bool) and self.rule not in (FLAG, CUSTOM):
            object.__setattr__(self, "rule", FLAG)
        if isinstance(self.default, tuple) and self.rule not in (*PAIRS, CUSTOM):
            object.__setattr__(self, "rule", BETAS)
        if self.rule == BETAS and not self.fields:
            object.__setattr__(self, "fields", ("beta1", "beta2"))
        if (self.rule in PAIRS) != (len(self.fields) == 2):
            raise ValueError(f"{self.name}: a pair (and only a pair) names its two fields")
        if self.rule in (FLAG, DTYPES, ROUNDING, SEED, POSITIVE_OR_NONE, DECAY_OR_NONE) or (
            self.rule == CUSTOM and not isinstance(self.default, float)
        ):
            object.__setattr__(self, "schedulable", False)
        if self.extension and not self.keyword:
            raise ValueError(f"{self.name}: an extension of torch's signature is keyword-only")


# Keras's keyword -> (the torch-convention argument, how to spell it): the keyword hints of
# Definition.keyword_hint.
KERAS_KEYWORDS: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", "lr=learning_rate"),
    "beta_1": ("betas", "betas=(beta_1, beta_2)"),
    "beta_2": ("betas", "betas=(beta_1, beta_2)"),
    "epsilon": ("eps", "eps=epsilon (added where torch adds it)"),
    "rho": ("alpha", "alpha=rho (the decay of the squared-gradient average)"),
    "initial_accumulator_value": ("initial_accumulator_value", "initial_accumulator_value"),
}
# Keras keywords whose torch name means the same only in some classes: rho is RMSprop's alpha
# (a class with a Keras twin), not ASGD's (a power of its step size decay); epsilon is a
# scalar eps, not Adafactor's pair.
_KERAS_ONLY_WITH_TWIN = frozenset({"rho"})
_KERAS_SCALAR = frozenset({"epsilon"})


@functools.cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return frozenset()


def accepted_keywords(target: Callable[..., Any]) -> frozenset[str]:
    """The parameter names `target` takes: a function's, or for a class those of every
    ``__init__`` of its MRO (a subclass forwarding ``**kwargs`` to the class that defines the
    optimizer, whose signature takes them, or taking a keyword of its own)."""
    if not isinstance(target, type):
        return _parameters(target)
    inits = (c.__dict__["__init__"] for c in target.__mro__ if "__init__" in c.__dict__)
    return frozenset().union(*map(_parameters, inits))


def check_keywords(
    defn: Definition | None, where: str, target: Callable[..., Any], given: Mapping[str, Any]
) -> None:
    """TypeError with :meth:`Definition.keyword_hint`'s message if `given` (the keywords of a
    call of `target`: a function, or a class) holds a Keras keyword that no signature of
    `target` takes (:func:`accepted_keywords`); else nothing (Python's own binding reports
    any other unknown keyword).  The one place the classes' ``__new__`` and the functional
    functions (:func:`with_keyword_hints`) check."""
    if defn is None or not given or all(k not in KERAS_KEYWORDS for k in given):
        return
    hint = defn.keyword_hint(where, given, accepted_keywords(target))
    if hint is not None:
        raise TypeError(hint)


F = TypeVar("F", bound=Callable[..., Any])


def with_keyword_hints(defn: Definition) -> Callable[[F], F]:
    """Decorator of a functional function: a call with a Keras keyword raises
    :func:`check_keywords`'s TypeError instead of Python's bare one."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TypeError:
                check_keywords(defn, fn.__name__, fn, kwargs)
                raise

        return cast(F, wrapper)

    return decorate


#: Options every optimizer has (precision, transforms...): defined here once; the code generator
#: appends them, keyword-only, to every signature of every tier, and every definition validates
#: them (each a Hyper with keyword=True).  The precision options: engine.precision; the
#: gradient transforms: engine.transforms.
COMMON: tuple[Hyper, ...] = (
    Hyper(precision.STATE_DTYPE, None, DTYPES, keyword=True, annotation="StateDType"),
    Hyper(precision.MASTER_WEIGHTS, False, keyword=True, functional=False),
    Hyper(precision.KAHAN, False, keyword=True, functional=False),
    Hyper(precision.ROUNDING, "nearest", ROUNDING, keyword=True, annotation="Rounding"),
    Hyper(precision.SEED, 0, SEED, keyword=True, annotation="int"),
    Hyper(transforms.MAX_GRAD_NORM, None, POSITIVE_OR_NONE, keyword=True, functional=False,
          annotation="float | None"),
    Hyper(transforms.MAX_GRAD_VALUE, None, POSITIVE_OR_NONE, keyword=True,
          annotation="float | None"),
    Hyper(transforms.SKIP_NONFINITE, False, keyword=True, functional=False),
    Hyper(precision.EMA_DECAY, None, DECAY_OR_NONE, keyword=True, annotation="float | None"),
)  # fmt: skip


@dataclass(frozen=True)
class State:
    """One state buffer (torch's name).  ``fill``: its initial value, a number or the name of
    the hyper-parameter that holds it.  ``optional``: only some variants use it (the functional
    tier then takes ``None`` for it)."""

    name: str
    fill: float | str = 0.0
    optional: bool = False
    # The buffer starts as a copy of its parameter (Schedule-Free's ``z``), taken when the
    # state is first used (``fill`` is then only the arena's placeholder).
    like_param: bool = False
    # Not shaped like its parameter (host definitions only: Adafactor's factored second
    # moments): the buffer's shape for a parameter of the given shape, or None where such a
    # parameter has no such buffer (Adafactor's ``row_var`` for a vector).  Every tier
    # allocates, checks, saves and loads it with that shape; it never enters a compiled plan.
    shape: Callable[[tuple[int, ...]], tuple[int, ...] | None] | None = None


@dataclass(frozen=True)
class Host:
    """A step that is not element-wise (Muon's Newton-Schulz orthogonalisation, L-BFGS's
    two-loop recursion and line search): the engine runs it in Python, over NumPy arrays (BLAS
    for the matrix products), instead of a compiled kernel.  Everything else stays the engine's:
    signatures (code generation), validation, parameter groups, schedules, state buffers,
    gradient buffers and their checks, state_dict and checkpoints.

    ``update(group, params, grads, states, step)``: one update of a group's parameters in
    place: ``group`` the validated hyper-parameters, ``states`` state name -> one array per
    parameter, ``step`` the 1-based update number.  (``None`` for a ``closure`` optimizer.)
    ``check_param(optimizer, label, shape)``: raises ValueError for a parameter the
    optimizer cannot update (Muon: not 2-D).
    ``closure``: ``closure(objective, state, group)`` runs one ``step(closure)`` (L-BFGS) on a
    :class:`fastoptim.host.Objective` (the group's parameters as one vector) and the group's
    whole state (a dict of torch's names); such an optimizer has one parameter group, its
    classes derive from :class:`fastoptim.engine.closure.ClosureOptimizer` (NumPy) and
    ``fastoptim.torch.ClosureOptimizer``, and it has no functional tier.
    ``resolve(defaults)``: fills the defaults that depend on others, in place, at
    construction (L-BFGS's ``max_eval = max_iter * 5 // 4``, as torch).
    """

    update: Callable[..., None] | None = None
    check_param: Callable[[str, str, tuple[int, ...]], None] | None = None
    closure: Callable[..., Any] | None = None
    resolve: Callable[[dict[str, Any]], None] | None = None

    def closure_defaults(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """A ``closure`` optimizer's defaults at construction (both tiers): a copy, completed
        by ``resolve``."""
        assert self.closure is not None
        out = dict(defaults)
        if self.resolve is not None:
            self.resolve(out)
        return out


class HostHyper:
    """What stands for the compiled hyper-parameter struct of a :class:`Host` optimizer: its
    fields as attributes, and the state buffers (all of the definition's)."""

    _states: tuple[str, ...] = ()
    _fields: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields:
            raise AttributeError(f"no field {name!r}")
        object.__setattr__(self, name, value)

    def state_names(self) -> list[str]:
        return list(self._states)


@dataclass(frozen=True)
class Definition:
    """One optimizer, for every tier (see the module docstring)."""

    name: str  # the class name in every tier
    kernel: str  # the compiled optimizer (registry.hpp): _core.<kernel>Hyper, step_<kernel>
    hyper: tuple[Hyper, ...]
    states: tuple[State, ...]
    doc: str  # the class docstring: the update rule, state, references
    functional_doc: str = ""  # what the functional tier's docstring adds
    torch_doc: str = ""  # what fastoptim.torch's class docstring adds
    # Rules relating several hyper-parameters: raise ValueError naming them.
    relations: Callable[[Mapping[str, Any]], None] | None = None
    # Compiled fields that are not hyper-parameters, from (group, fresh state names).
    extra_fields: Callable[[Mapping[str, Any], AbstractSet[str]], dict[str, Any]] | None = None
    # Scalar state kept by the kernel's struct (name -> initial value, a number or the name of
    # the hyper-parameter that holds it): NAdam's mu_product; ASGD's eta (= lr) and mu.
    scalars: tuple[tuple[str, float | str], ...] = ()
    # Rules of the scalar state (name -> UNIT or NONNEGATIVE; UNIT when not listed).
    scalar_rules: tuple[tuple[str, str], ...] = ()
    # Hyper-parameters fixed by this optimizer (AdamW: decoupled_weight_decay=True): stored in
    # every group, absent from the signatures.
    fixed: tuple[tuple[str, Any], ...] = ()
    base: Definition | None = None  # AdamW: Adam (the NumPy class subclasses its class)
    torch_step: bool = True  # fastoptim.torch keeps torch's per-parameter ``step`` tensor
    torch_eager_state: bool = False  # torch creates the state at construction (Adagrad)
    # torch's per-step scalar update (NAdam's momentum factor mu_t from (group, t)): a float,
    # or a 0-d tensor where a hyper-parameter it reads is a tensor.
    torch_scalar_factor: Callable[[Mapping[str, Any], float], Any] | None = None
    # torch's scalar state after step t, from (group, t) (ASGD's eta and mu): fastoptim.torch
    # stores them in torch's scalar dtype and gives the kernel those values at the next step.
    torch_scalar_next: Callable[[Mapping[str, Any], float], dict[str, float]] | None = None
    # The class of fastoptim.keras with Keras's names and maths for this optimizer, if any
    # (named by the keyword hints: see keyword_hint).
    keras: str = ""
    # A hand-written base class that the generated NumPy and fastoptim.torch classes subclass
    # instead of the tier's Optimizer (each tier's module defines one of that name): extra
    # methods such as Schedule-Free's train() / eval().
    mixin: str = ""
    # A step that is not element-wise, run in Python (Muon, LBFGS): see Host.  Such an
    # optimizer has no compiled kernel (``kernel`` is ""), and no precision options (COMMON).
    host: Host | None = None
    # Sparse row updates (the NumPy tier's ``step_rows``, fastoptim.torch's sparse COO
    # gradients, the compiled ``rows_<kernel>``): None if the optimizer has none, else a
    # function of a group's values returning why those values cannot take sparse gradients
    # ("" if they can): torch.optim's own refusals (Adagrad's weight_decay...).
    rows: Callable[[Mapping[str, Any]], str] | None = None
    # Values for which fastoptim.torch computes a sparse gradient densely, as torch's result
    # is the dense update's (SGD with momentum: torch's sparse buffer decays every row).
    rows_dense: Callable[[Mapping[str, Any]], bool] | None = None
    # fastoptim.torch takes sparse gradients only, as torch.optim does (SparseAdam).
    torch_sparse_only: bool = False
    # The step reduces every whole tensor (LAMB's and LARS's per-tensor trust ratios, the
    # driver's two-pass optimizers): a shard of a parameter (ZeRO-1's flat pieces, FSDP2's
    # DTensor shards) cannot be stepped on its own, and the wrappers that shard refuse it.
    per_tensor: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def options(self) -> tuple[Hyper, ...]:
        """Every hyper-parameter: the optimizer's own, then ``COMMON`` (keyword-only; not for a
        :class:`Host` optimizer, whose arithmetic is NumPy's in the parameters' dtype)."""
        return self.hyper if self.host is not None else self.hyper + COMMON

    # ------------------------------------------------------------------ compiled kernel
    @property
    def hyper_type(self) -> Any:
        """The compiled hyper-parameter struct class (:class:`HostHyper` for a host step)."""
        if self.host is not None:
            t = self._cache.get("hyper_type")
            if t is None:
                names = {h.name for h in self.hyper} | {k for k, _ in self.fixed}
                t = self._cache["hyper_type"] = type(
                    f"{self.name}Hyper",
                    (HostHyper,),
                    {
                        "_states": tuple(s.name for s in self.states),
                        "_fields": frozenset(names),
                    },
                )
            return t
        from .. import _core  # here: the code generator reads definitions without the build

        return getattr(_core, f"{self.kernel}Hyper")

    @property
    def core_step(self) -> Any:
        """The compiled step function."""
        if self.host is not None:
            return None
        from .. import _core

        return getattr(_core, f"step_{self.kernel.lower()}")

    @property
    def core_rows(self) -> Any:
        """The compiled sparse row update (None without one)."""
        if self.rows is None:
            return None
        from .. import _core

        return getattr(_core, f"rows_{self.kernel.lower()}")

    @property
    def core_steps(self) -> Any:
        """The compiled step function of several groups in one call."""
        if self.host is not None:
            return None
        from .. import _core

        return getattr(_core, f"steps_{self.kernel.lower()}")

    @property
    def fields(self) -> frozenset[str]:
        """Names of the compiled struct's fields."""
        f = self._cache.get("fields")
        if f is None and self.host is not None:
            f = self._cache["fields"] = self.hyper_type._fields
        if f is None:
            h = self.hyper_type()
            f = self._cache["fields"] = frozenset(
                n for n in dir(h) if not n.startswith("_") and not callable(getattr(h, n))
            )
        return f

    def defaults(self) -> dict[str, Any]:
        """Every hyper-parameter's default, fixed ones included."""
        out = {h.name: h.default for h in self.options}
        out.update(self.fixed)
        return out

    def core_values(self, group: Mapping[str, Any], fresh: AbstractSet[str]) -> dict[str, Any]:
        """The compiled struct's fields for `group` (field name -> value): the entries of the
        same name, pairs as their two fields (``betas`` as ``beta1``/``beta2``), and
        ``extra_fields``.  `fresh`: the state buffers just created (not yet used by a
        step)."""
        fields = self.fields
        values = {k: v for k, v in group.items() if k in fields}
        for h in self.options:
            if h.field and h.name in group:
                values[h.field] = group[h.name]
            if h.fields and h.name in group:
                values[h.fields[0]], values[h.fields[1]] = group[h.name]
        if self.extra_fields is not None:
            values.update(self.extra_fields(group, fresh))
        return values

    def compile(self, group: Mapping[str, Any], fresh: AbstractSet[str] = frozenset()) -> Any:
        """A compiled struct holding `group`'s (validated) values."""
        h = self.hyper_type()
        for name, value in self.core_values(group, fresh).items():
            setattr(h, name, value)
        return h

    @property
    def shaped(self) -> frozenset[str]:
        """The state buffers not shaped like their parameters (see ``shape`` of :class:`State`)."""
        f = self._cache.get("shaped")
        if f is None:
            f = self._cache["shaped"] = frozenset(s.name for s in self.states if s.shape)
        return f

    def state_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape of state buffer `name` for a parameter of `shape` (the parameter's, but
        for a buffer with a :class:`State` ``shape``), or None where that parameter has no
        such buffer."""
        for s in self.states:
            if s.name == name and s.shape is not None:
                return s.shape(tuple(shape))
        return tuple(shape)

    def layouts(
        self,
        group: Mapping[str, Any],
        params: Iterable[tuple[str, tuple[int, ...], int]],
        names: tuple[str, ...],
    ) -> list[dict[str, str]]:
        """Per parameter (its dtype name, shape and size): its state buffers, name -> kind
        (:func:`~fastoptim.engine.precision.buffers` for the states `names` under `group`'s
        precision options), without a shaped state the parameter has none of (Adafactor's
        row_var/col_var for a vector).  Both tiers allocate and check their state from this."""
        out = []
        for dtype, shape, size in params:
            kinds = precision.buffers(group, dtype, names, size)
            for n in self.shaped:
                if n in kinds and self.state_shape(n, shape) is None:
                    del kinds[n]
            out.append(kinds)
        return out

    def like_param(self, name: str) -> bool:
        """Whether state buffer `name` starts as a copy of its parameter."""
        return any(s.name == name and s.like_param for s in self.states)

    def fill(self, name: str, group: Mapping[str, Any]) -> float:
        """Initial value of state buffer `name` for `group`."""
        for s in self.states:
            if s.name == name:
                return float(group[s.fill]) if isinstance(s.fill, str) else float(s.fill)
        return 0.0

    def scalar_fill(self, name: str, group: Mapping[str, Any]) -> float:
        """Initial value of scalar state `name` for `group`."""
        fill = dict(self.scalars)[name]
        return float(group[fill]) if isinstance(fill, str) else float(fill)

    def scalar_problem(self, name: str, value: Any) -> str | None:
        """What is wrong with `value` as scalar state `name` (None if it is fine): a number in
        [0, 1] (running products, averaging weights) or, for a NONNEGATIVE one, >= 0."""
        unit = dict(self.scalar_rules).get(name, UNIT) == UNIT
        try:
            finite = is_number(value) and math.isfinite(value)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite or value < 0 or (unit and value > 1):
            return f"{name} must be a number in {'[0, 1]' if unit else '[0, inf)'}, got {value!r}"
        return None

    def keyword_hint(self, where: str, given: Iterable[str], accepted: Iterable[str]) -> str | None:
        """A TypeError message for a Keras keyword (``beta_1``, ``learning_rate``...) among the
        `given` keywords that `accepted` (the signature's) lacks, naming the torch-convention
        equivalent and the :mod:`fastoptim.keras` class; None if there is none."""
        accepted = set(accepted)
        for key in given:
            if key in accepted or key not in KERAS_KEYWORDS:
                continue
            torch_name, spelled = KERAS_KEYWORDS[key]
            default = next((h.default for h in self.hyper if h.name == torch_name), None)
            if (
                torch_name in accepted
                and (key not in _KERAS_ONLY_WITH_TWIN or self.keras)
                and (key not in _KERAS_SCALAR or not isinstance(default, tuple))
            ):
                advice = f"fastoptim (like torch.optim) takes {spelled}"
            else:
                advice = f"{self.name} has no such option"
            keras = f"; for Keras's names and maths use fastoptim.keras.{self.keras}"
            return f"{where}: unknown argument {key!r}; {advice}{keras if self.keras else ''}"
        return None

    # ------------------------------------------------------------------ validation
    @property
    def rules(self) -> dict[str, str]:
        r = self._cache.get("rules")
        if r is None:
            r = self._cache["rules"] = {h.name: h.rule for h in self.options}
            for k, v in self.fixed:
                r[k] = FLAG if isinstance(v, bool) else NONNEGATIVE
        return r

    @property
    def unschedulable(self) -> frozenset[str]:
        """Hyper-parameters that cannot follow a schedule."""
        return frozenset(h.name for h in self.options if not h.schedulable) | frozenset(
            k for k, _ in self.fixed
        )

    def check(self, group: Mapping[str, Any]) -> None:
        """Raise TypeError/ValueError naming any invalid hyper-parameter of `group`."""
        for key, value in group.items():
            if key != "params":
                self.check_value(key, value)
        self.check_relations(group)

    def check_value(self, key: str, value: Any) -> None:
        """One hyper-parameter against its rule."""
        rule = self.rules.get(key, NONNEGATIVE)
        if rule == FLAG:
            check_flag(self.name, key, value)
        elif rule == BETAS:
            check_betas(self.name, value)
        elif rule == PAIR:
            check_pair(self.name, key, value)
        elif rule == UNIT:
            check_unit(self.name, key, value, closed=True)
        elif rule == DTYPES:
            precision.check_state_dtype(self.name, value, tuple(s.name for s in self.states))
        elif rule == ROUNDING:
            precision.check_rounding(self.name, value)
        elif rule == SEED:
            precision.check_seed(self.name, value)
        elif rule == OPEN_UNIT:
            check_unit(self.name, key, value)
        elif rule == POSITIVE_OR_NONE:
            transforms.check_positive(self.name, key, value)
        elif rule == DECAY_OR_NONE:
            transforms.check_decay(self.name, value)
        elif rule == CUSTOM:
            check = next(h.check for h in self.hyper if h.name == key)
            assert check is not None
            check(self.name, key, value)
        else:
            check_nonnegative(self.name, key, value)

    def check_relations(self, group: Mapping[str, Any]) -> None:
        precision.check_layout(self.name, group)
        if self.relations is not None:
            self.relations(group)

    def check_keys(self, group: Mapping[str, Any], allowed: Any = ()) -> None:
        """ValueError for entries of `group` that are no hyper-parameter of this optimizer."""
        unknown = set(group) - set(self.rules) - {"params", *allowed}
        if unknown:
            raise ValueError(
                f"{self.name}: unknown hyper-parameter(s) {sorted(unknown)} in a group"
            )


# ---------------------------------------------------------------------- validation helpers
def check_nonnegative(cls: str, name: str, value: Any) -> None:
    if not is_number(value):
        raise TypeError(f"{cls}: {name} must be a number, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float
        finite = False
    if not finite or not (value >= 0.0):
        raise ValueError(f"{cls}: invalid {name}={value!r}: must be finite and >= 0")


def check_unit(cls: str, name: str, value: Any, closed: bool = False) -> None:
    """0 <= value < 1 (or <= 1 when `closed`)."""
    check_nonnegative(cls, name, value)
    if value > 1.0 or (value == 1.0 and not closed):
        raise ValueError(
            f"{cls}: invalid {name}={value!r}: must be in [0, 1{']' if closed else ')'}"
        )


def check_betas(cls: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}: betas must be a pair (beta1, beta2), got {betas!r}")
    check_unit(cls, "betas[0]", betas[0])
    check_unit(cls, "betas[1]", betas[1])


def check_pair(cls: str, name: str, value: Any) -> None:
    """A pair of finite numbers >= 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{cls}: {name} must be a pair of numbers, got {value!r}")
    check_nonnegative(cls, f"{name}[0]", value[0])
    check_nonnegative(cls, f"{name}[1]", value[1])


def check_flag(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{cls}: {name} must be a bool, got {value!r}")
