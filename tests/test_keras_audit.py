"""fastoptim.keras against Keras 3's API, beyond the update rules (tests/test_keras.py): the
faults of an audit, each with its regression test.  Where Keras itself decides (what it accepts,
what its attribute assignment does), the test runs it (torch backend, when it imports)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest

import fastoptim as fo
from fastoptim import keras as fk
from fastoptim import schedules
from test_keras import _np

# Keras (with numpy 2) converts torch tensors through __array__ without copy=: not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _forwarding(base: type) -> type:
    """A subclass forwarding its keywords, the common pattern."""

    class Sub(base):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, **kwargs)

    return Sub


def _torch_params() -> list[Any]:
    torch = pytest.importorskip("torch")
    return [torch.nn.Parameter(torch.ones(3))]


def _np_params() -> list[np.ndarray]:
    return [np.ones(3, np.float32)]


# ---------------------------------------------------------------- 1. keyword hints, subclasses
@pytest.mark.parametrize(
    ("tier", "name", "kwargs"),
    [
        ("keras", "Adam", dict(learning_rate=0.1)),
        ("keras", "Adam", dict(beta_1=0.8)),
        ("keras", "RMSprop", dict(rho=0.8)),
        ("keras", "Adagrad", dict(epsilon=1e-6)),
        ("numpy", "Adagrad", dict(initial_accumulator_value=0.2)),
        ("numpy", "Adadelta", dict(rho=0.8)),
        ("torch", "Adagrad", dict(initial_accumulator_value=0.2)),
        ("torch", "Adadelta", dict(rho=0.8)),
    ],
)
def test_subclass_forwarding_keywords_takes_its_bases_keywords(
    tier: str, name: str, kwargs: dict[str, Any]
) -> None:
    """Keywords are checked against every signature of the class's chain, not only the
    subclass's ``(params, **kwargs)`` (a Keras keyword was refused as "no such option")."""
    if tier == "torch":
        pytest.importorskip("torch")
        import fastoptim.torch as ft

        base, params = getattr(ft, name), _torch_params()
    else:
        base, params = getattr(fk if tier == "keras" else fo, name), _np_params()
    opt = _forwarding(base)(params, **kwargs)
    assert {k: opt.param_groups[0][k] for k in kwargs} == kwargs


def test_subclass_still_gets_the_hint_for_a_keyword_no_class_takes() -> None:
    with pytest.raises(TypeError, match=r"'beta_1'; fastoptim \(like torch.optim\) takes betas="):
        _forwarding(fo.Adam)(_np_params(), beta_1=0.8)

    class OwnKeyword(fo.Adam):  # a subclass taking a Keras keyword itself
        def __init__(self, params: Any, beta_1: float = 0.9) -> None:
            super().__init__(params, betas=(beta_1, 0.999))

    assert OwnKeyword(_np_params(), beta_1=0.8).param_groups[0]["betas"] == (0.8, 0.999)


def test_subclass_keeps_a_keras_option_it_takes_as_an_attribute() -> None:
    """A subclass taking one of Keras's option keywords itself (``name=``) keeps it as a plain
    attribute (``self.name = name`` raised "Keras's name is not an option here"); fastoptim's
    own classes still refuse it with the hint, and so does a Keras option the subclass does
    not take."""

    class NamedAdam(fk.Adam):
        def __init__(self, params: Any, name: str = "adam", **kwargs: Any) -> None:
            super().__init__(params, **kwargs)
            self.name = name

    opt = NamedAdam(_np_params(), name="encoder", learning_rate=0.01)
    assert opt.name == "encoder" and opt.learning_rate == 0.01
    opt.name = "decoder"
    assert opt.name == "decoder"
    with pytest.raises(AttributeError, match="Keras's clipnorm is not an option here"):
        opt.clipnorm = 1.0
    plain = fk.Adam(_np_params())
    with pytest.raises(AttributeError, match="Keras's name is not an option here"):
        plain.name = "x"


def test_subclass_lr_alias() -> None:
    """The legacy ``lr`` through a forwarding subclass (was a bare KeyError)."""

    class MyAdam(fk.Adam):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            kwargs.setdefault("epsilon", 1e-6)
            super().__init__(params, **kwargs)

    opt = MyAdam(_np_params(), lr=0.1)
    assert (opt.param_groups[0]["learning_rate"], opt.param_groups[0]["epsilon"]) == (0.1, 1e-6)
    with pytest.raises(TypeError, match=r"both lr=0\.1 and learning_rate=0\.2"):
        MyAdam(_np_params(), lr=0.1, learning_rate=0.2)


# ---------------------------------------------------------------- 2. attributes
def test_learning_rate_attribute_matches_keras(keras: Any) -> None:
    """``opt.learning_rate = x``, Keras 3's way, sets the rate (was an unused attribute)."""
    w = np.ones(3, np.float32)
    opt = fk.SGD([w], learning_rate=0.1, momentum=0.5)
    kv = keras.Variable(np.ones(3, np.float32))
    kopt = keras.optimizers.SGD(learning_rate=0.1, momentum=0.5)
    for lr in (0.1, 0.001, 0.25):
        opt.learning_rate = lr
        kopt.learning_rate = lr
        assert opt.learning_rate == lr
        opt.step([np.ones(3, np.float32)])
        kopt.apply_gradients([(keras.ops.ones(3), kv)])
    np.testing.assert_allclose(w, _np(kv), rtol=1e-6)
    assert "learning_rate" not in vars(opt)


def test_attributes_set_every_group_validated_first() -> None:
    a, b = np.ones(3), np.ones(2)
    opt = fk.Adam([{"params": [a]}, {"params": [b], "learning_rate": 0.5}], learning_rate=0.1)
    differ = r"different learning_rate \(\[0\.1, 0\.5\]\).*param_groups"
    with pytest.raises(ValueError, match=differ):
        opt.learning_rate  # noqa: B018
    for bad, error in [(-1.0, ValueError), ("x", TypeError), (None, TypeError)]:
        with pytest.raises(error, match="learning_rate"):
            opt.learning_rate = bad
        assert [g["learning_rate"] for g in opt.param_groups] == [0.1, 0.5]  # nothing changed
    opt.learning_rate = schedules.exponential(0.2, 0.5)
    assert opt.learning_rate == 0.2 and "learning_rate" in opt.schedules(1)
    opt.step([np.ones(3), np.ones(2)])
    assert opt.learning_rate == 0.1
    opt.lr = 0.1  # Keras 2's alias, as the constructor's; replaces the schedule (same value)
    assert opt.learning_rate == 0.1 and opt.schedules(0) == {} == opt.schedules(1)
    opt.step([np.ones(3), np.ones(2)])
    assert opt.learning_rate == 0.1
    with pytest.raises(ValueError, match=r"invalid beta_1=1\.0"):
        opt.beta_1 = 1.0
    opt.beta_1 = 0.5
    assert opt.beta_1 == 0.5 and [g["beta_1"] for g in opt.param_groups] == [0.5, 0.5]
    opt.amsgrad = True  # a variant: its state appears at the next step
    opt.step([np.ones(3), np.ones(2)])
    assert "max_exp_avg_sq" in opt.state[0]
    with pytest.raises(AttributeError, match="no attribute 'momentum'"):
        opt.momentum  # noqa: B018  (Adam has none)


def test_per_group_options_and_keras_options_are_not_attributes() -> None:
    opt = fk.Adam(_np_params())
    with pytest.raises(AttributeError, match=r"max_grad_norm is set per group.*param_groups"):
        opt.max_grad_norm = 1.0
    with pytest.raises(AttributeError, match=r"clipvalue is not an option.*max_grad_value="):
        opt.clipvalue = 0.5
    with pytest.raises(AttributeError, match="use_ema"):
        opt.use_ema  # noqa: B018
    assert opt.param_groups[0]["max_grad_norm"] is None


# ---------------------------------------------------------------- 3. fixed entries
@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (fk.Adam, "keras", False),
        (fk.Adam, "decoupled_weight_decay", False),
        (fk.SGD, "keras", False),
        (fk.Nadam, "momentum_decay", 0.004),
    ],
)
def test_fixed_entries_cannot_change(cls: Any, key: str, value: Any) -> None:
    w = np.ones(3, np.float32)
    opt = cls([w], learning_rate=0.1, weight_decay=0.5)
    opt.step([np.full(3, 1e-4, np.float32)])
    before = w.copy()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"'{key}' is fixed to"):
        opt.step([np.full(3, 1e-4, np.float32)])
    np.testing.assert_array_equal(w, before)
    with pytest.raises(ValueError, match=rf"'{key}' is fixed to"):
        opt.add_param_group({"params": [np.ones(2, np.float32)], key: value})
    assert len(opt.param_groups) == 1
    fixed = dict(cls._definition.fixed)[key]
    opt.param_groups[0][key] = fixed  # its own value: accepted (a copied group holds it)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["hyper"][key] = value
    with pytest.raises(ValueError, match=rf"load_state_dict: group 0: the group entry '{key}'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0][key] == fixed
    opt.add_param_group({"params": [np.ones(2, np.float32)], key: fixed})
    opt.step([np.full(3, 1e-4, np.float32), np.ones(2, np.float32)])
    copy.deepcopy(opt)  # rebuilt from its groups, fixed entries included


# ---------------------------------------------------------------- 4. weight_decay=None
def test_weight_decay_none_as_keras(keras: Any) -> None:
    """None where Keras's default is None (no decay, everywhere); AdamW refuses it, as Keras's."""
    with pytest.raises(ValueError, match="weight_decay"):
        keras.optimizers.AdamW(weight_decay=None)
    keras.optimizers.Adam(weight_decay=None)
    with pytest.raises(TypeError, match="AdamW: weight_decay must be a number"):
        fk.AdamW(_np_params(), weight_decay=None)
    opt = fk.AdamW(_np_params())
    with pytest.raises(TypeError, match="AdamW: weight_decay must be a number"):
        opt.add_param_group({"params": [np.ones(2, np.float32)], "weight_decay": None})
    with pytest.raises(TypeError, match="AdamW: weight_decay must be a number"):
        opt.weight_decay = None
    assert opt.weight_decay == 0.004


def test_weight_decay_none_in_groups() -> None:
    opt = fk.Adam(_np_params(), weight_decay=0.1)
    group = {"params": [np.ones(2, np.float32)], "weight_decay": None}
    opt.add_param_group(group)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and group["weight_decay"] is None
    opt.param_groups[0]["weight_decay"] = None
    opt.step([np.ones(3, np.float32), np.ones(2, np.float32)])
    assert opt.param_groups[0]["weight_decay"] == 0.0
    opt.weight_decay = None
    assert opt.weight_decay == 0.0


# ---------------------------------------------------------------- 5. ReduceLROnPlateau
def test_plateau_refuses_keras_classes_at_construction() -> None:
    opt = fk.Adam(_np_params(), learning_rate=0.01)
    with pytest.raises(TypeError, match=r"no 'lr' entry.*'learning_rate'"):
        schedules.ReduceLROnPlateau(opt, patience=0)
    assert opt._plateau is None
    torch_convention = fo.Adam(_np_params(), lr=0.01)
    plateau = schedules.ReduceLROnPlateau(torch_convention, patience=0)
    plateau.step(1.0)
    plateau.step(1.0)
    assert torch_convention.param_groups[0]["lr"] == pytest.approx(0.001)


# ---------------------------------------------------------------- 6. zero-argument callables
def test_zero_argument_learning_rate_is_refused_clearly(keras: Any) -> None:
    keras.optimizers.SGD(learning_rate=lambda: 0.1)  # Keras calls it at every update
    match = r"learning_rate is a callable taking no argument.*schedules take the update number"
    with pytest.raises(TypeError, match=match):
        fk.SGD(_np_params(), learning_rate=lambda: 0.1)
    opt = fk.SGD(_np_params(), learning_rate=0.1)
    with pytest.raises(TypeError, match=match):
        opt.learning_rate = lambda: 0.2
    with pytest.raises(TypeError, match=match):
        opt.add_param_group({"params": [np.ones(2, np.float32)], "learning_rate": lambda: 0.2})
    opt.param_groups[0]["learning_rate"] = lambda: 0.2
    with pytest.raises(TypeError, match=match):
        opt.step([np.ones(3, np.float32)])
    opt.param_groups[0]["learning_rate"] = lambda t: 0.2 / (t + 1)  # a schedule
    opt.step([np.ones(3, np.float32)])
    assert opt.learning_rate == 0.1


# ---------------------------------------------------------------- 7. row updates
@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_keras_classes_say_they_have_no_row_updates(name: str) -> None:
    opt = getattr(fk, name)([np.ones((4, 2), np.float32)])
    with pytest.raises(TypeError) as info:
        opt.step_rows([(np.array([0]), np.ones((1, 2), np.float32))])
    message = str(info.value)
    assert "no sparse row updates" in message and "not fastoptim.keras's classes" in message
    assert "(SGD, Adagrad and SparseAdam do)" not in message


# ---------------------------------------------------------------- 8. Keras's common options
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("clipvalue", 0.5, "max_grad_value="),
        ("global_clipnorm", 1.0, "max_grad_norm="),
        ("clipnorm", 1.0, "no per-variable norm clip"),
        ("use_ema", True, "ema_decay="),
        ("ema_momentum", 0.9, "ema_decay="),
        ("ema_overwrite_frequency", 10, "never overwrites"),
        ("loss_scale_factor", 128.0, "grad_scale="),
        ("gradient_accumulation_steps", 4, "accumulate"),
        ("name", "adam", "no name"),
        ("decay", 1e-6, "inverse_time"),
    ],
)
def test_keras_options_name_the_equivalent(keras: Any, key: str, value: Any, named: str) -> None:
    with warnings.catch_warnings():  # Keras's own keyword (decay: ignored, with a warning)
        warnings.simplefilter("ignore")
        keras.optimizers.Adam(**{key: value})
    with pytest.raises(TypeError, match=rf"Adam: Keras's {key}= is not an option.*{named}"):
        fk.Adam(_np_params(), **{key: value})
    with pytest.raises(TypeError, match=rf"MyAdam: Keras's {key}="):
        type("MyAdam", (_forwarding(fk.Adam),), {})(_np_params(), **{key: value})


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_documented_equivalents_of_keras_clipping(keras: Any, name: str) -> None:
    """clipvalue is max_grad_value; global_clipnorm is max_grad_norm but for torch's +1e-6 in
    the divisor (so no alias): float64, where the runs agree to rounding without clipping."""

    def error(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
        rng = np.random.default_rng(0)
        shapes = [(4,), (3, 2)]
        params = [rng.standard_normal(s) for s in shapes]
        kvars = [keras.Variable(p.copy(), dtype="float64") for p in params]
        opt = getattr(fk, name)(params, learning_rate=0.125, **ours)
        kopt = getattr(keras.optimizers, name)(learning_rate=0.125, **theirs)
        for _ in range(4):
            grads = [5 * rng.standard_normal(s) for s in shapes]
            opt.step(grads)
            kopt.apply_gradients(
                [(keras.ops.convert_to_tensor(g), v) for g, v in zip(grads, kvars)]
            )
        return max(float(np.max(np.abs(p / _np(v) - 1))) for p, v in zip(params, kvars))

    assert error({}, {}) < 1e-13
    assert error(dict(max_grad_value=0.5), dict(clipvalue=0.5)) < 1e-13
    assert 1e-10 < error(dict(max_grad_norm=1.0), dict(global_clipnorm=1.0)) < 1e-5


# ---------------------------------------------------------------- minor: lr in a group
def test_lr_in_a_group_names_learning_rate() -> None:
    opt = fk.Adam(_np_params(), lr=0.1)
    with pytest.raises(ValueError, match="its 'learning_rate' entry"):
        opt.add_param_group({"params": [np.ones(2, np.float32)], "lr": 0.5})
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match="its 'learning_rate' entry"):
        opt.step([np.ones(3, np.float32)])


def test_distributed_wrappers_forward_keras_attributes() -> None:
    """``z.learning_rate = x`` on ZeroRedundancyOptimizer / DataParallel over a Keras-tier
    optimizer sets the wrapped optimizer's rate, as ``opt.learning_rate = x`` does (it had
    become a plain attribute of the wrapper that no step read; keras audit K01); reading
    gives the optimizer's, and Keras's options get the same hint (one process)."""
    pytest.importorskip("mpi4py")
    from fastoptim.distributed import DataParallel, ZeroRedundancyOptimizer

    grads = [[np.random.default_rng(t).standard_normal(s) for s in ((6,), (3,))] for t in range(6)]
    p, q = [np.ones(6), np.ones(3)], [np.ones(6), np.ones(3)]
    z = ZeroRedundancyOptimizer(p, fk.Adam, learning_rate=0.01)
    ref = fk.Adam(q, learning_rate=0.01)
    for t, g in enumerate(grads):
        if t == 3:
            z.learning_rate = ref.learning_rate = 0.005
        z.step(g)
        ref.step(g)
    assert "learning_rate" not in vars(z) and z.learning_rate == 0.005
    assert all(np.array_equal(a, b) for a, b in zip(p, q))
    inner = fk.Adam([np.ones(4)], learning_rate=0.01)
    dp = DataParallel(inner)
    dp.beta_1 = 0.5
    assert inner.beta_1 == 0.5 and dp.beta_1 == 0.5 and "beta_1" not in vars(dp)
    with pytest.raises(AttributeError, match="Keras's clipnorm is not an option here"):
        dp.clipnorm = 1.0
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        dp.no_such_thing  # noqa: B018
