"""One error family: every error the library and the trainer raise for bad input is an
``InstructMoLEError`` (so the nodes, both command lines and notebooks catch one class), there is one
``ConfigError``, and the core and the trainer word the same mistake the same way (one set of checks,
``instructmole.validation``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import instructmole
import training
from instructmole import InstructMoLEError, MoLEConfig
from instructmole.validation import checked_bool, checked_choice, checked_int, checked_real, whole_number


def _error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of ``instructmole`` or ``training``, by its full name."""
    found = {}
    for package in (instructmole, training):
        for module_info in pkgutil.iter_modules(package.__path__):
            if module_info.name == "__main__":  # runs its command line when imported
                continue
            module = importlib.import_module(f"{package.__name__}.{module_info.name}")
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_error_class_of_the_library_and_the_trainer_is_an_instructmole_error():
    classes = _error_classes()
    assert "training.errors.TrainingError" in classes and "instructmole.adapter.AdapterError" in classes
    outside = [name for name, cls in classes.items() if not issubclass(cls, InstructMoLEError)]
    assert not outside, f"errors outside the family: {outside}"
    assert issubclass(InstructMoLEError, ValueError)  # callers of the earlier ValueError subclasses keep working


def test_there_is_exactly_one_config_error():
    import instructmole.config
    import instructmole.errors
    import training.errors

    assert training.errors.ConfigError is instructmole.config.ConfigError
    assert instructmole.ConfigError is instructmole.errors.ConfigError is instructmole.config.ConfigError
    named = [name for name in _error_classes() if name.rsplit(".", 1)[1] == "ConfigError"]
    assert named == ["instructmole.errors.ConfigError"]


def test_the_trainers_errors_are_one_family_with_the_cores():
    from training.errors import CheckpointError, ConfigError, DataError, ModelLoadError, TrainingError

    for cls in (CheckpointError, DataError, ModelLoadError):
        assert issubclass(cls, TrainingError) and issubclass(cls, InstructMoLEError)
    with pytest.raises(InstructMoLEError):  # what training/cli.py catches: a config mistake too
        raise ConfigError("x")


def test_the_core_and_the_trainer_word_one_mistake_alike(tmp_path):
    from training.config import load_config

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    (tmp_path / "model").mkdir()
    base = [f"data.manifest={manifest}", f"model.pretrained={tmp_path / 'model'}"]
    for key, text, value, words in (
        ("rank", "0", 0, "must be a positive integer (from 1 to 4096)"),
        ("alpha", "2e6", 2e6, "is too large: it must be a number greater than 0 and at most 1e+06"),
        ("router_dropout", "1", 1, "is too large: it must be a number of at least 0 and less than 1"),
        ("gate_noise", "'yes'", "yes", "must be true or false"),
        ("token_weights", "softmax", "softmax", "must be one of: probs, renormalised"),
    ):
        with pytest.raises(InstructMoLEError) as core:
            MoLEConfig.for_flux(1, 1, 64, **{key: value})
        with pytest.raises(InstructMoLEError) as trainer:
            load_config(None, [*base, f"adapter.{key}={text}"])
        assert str(core.value).startswith(f"{key}=") and str(core.value).endswith(words)
        assert str(trainer.value) == f"adapter.{core.value}"


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (
            lambda v: checked_int("n", v, {"min": 0, "max": 9}),
            10,
            "n=10 is too large: it must be an integer from 0 to 9",
        ),
        (lambda v: checked_int("n", v, {"min": 0}), -1, "n=-1 is too small: it must be an integer of at least 0"),
        (lambda v: checked_int("n", v), 2.0, "n=2.0 must be an integer"),
        (lambda v: checked_int("n", v), True, "n=True must be an integer"),
        (lambda v: checked_real("x", v, {"gt": 0}), 0, "x=0.0 is too small: it must be a number greater than 0"),
        (lambda v: checked_real("x", v, {"lt": 1}), 1, "x=1.0 is too large: it must be a number less than 1"),
        (lambda v: checked_real("x", v), float("nan"), "x=nan must be a finite number"),
        (lambda v: checked_real("x", v), 10**400, "x=<an integer of 1329 bits> must be a finite number"),
        (lambda v: checked_real("x", v), "1", "x='1' must be a number"),
        (lambda v: checked_bool("b", v), 1, "b=1 must be true or false"),
        (lambda v: checked_choice("c", v, ("a", "b")), True, "c=True must be one of: a, b"),
        (lambda v: checked_choice("c", v, ("1",)), 1, "c=1 must be one of: 1"),
    ],
)
def test_each_check_names_the_input_the_value_and_what_is_allowed(check, value, message):
    with pytest.raises(InstructMoLEError) as err:
        check(value)
    assert str(err.value) == message


def test_a_long_value_is_cut_short():
    with pytest.raises(InstructMoLEError) as err:
        checked_choice("c", "x" * 10**6, ("a", "b"))
    assert str(err.value) == "c='" + "x" * 27 + "..." + "x" * 28 + "' must be one of: a, b"


def test_whole_numbers_are_ints_of_any_kind_but_never_bools_or_floats():
    import numpy as np
    import torch

    assert [whole_number(v) for v in (3, np.int64(3), torch.tensor(3))] == [3, 3, 3]
    assert [whole_number(v) for v in (True, np.bool_(True), torch.tensor(True), 3.0, "3", None)] == [None] * 6
