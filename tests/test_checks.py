"""neurofuse.checks: the argument checks the option classes share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from toys import mlp

import neurofuse as nf
from neurofuse.checks import boolean, integer, number, positive_int, probability
from neurofuse.federated.config import FederationConfig
from neurofuse.finetuning import FinetuneOptions
from neurofuse.fitting import TrainingOptions


def test_integer_accepts_integers_and_returns_plain_ints():
    assert integer("k", 0) == 0
    assert integer("k", 3, 1) == 3
    value = integer("k", np.int64(5), 1)
    assert value == 5 and type(value) is int
    assert type(integer("k", torch.tensor(4).item(), 1)) is int
    assert positive_int("k", 7) == 7


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (True, 0, "k must be an integer >= 0, got True"),
        (2.0, 0, "k must be an integer >= 0, got 2.0"),
        ("3", 1, "k must be a positive integer, got '3'"),
        (0, 1, "k must be a positive integer, got 0"),
        (1, 2, "k must be an integer >= 2, got 1"),
    ],
)
def test_integer_refuses_what_is_not_an_integer_in_range(value, minimum, message):
    with pytest.raises(ValueError) as err:
        integer("k", value, minimum)
    assert str(err.value) == message


def test_integer_takes_a_requirement_phrase():
    with pytest.raises(ValueError, match="chunk must be a number of rows, got -1"):
        integer("chunk", -1, 1, requirement="a number of rows")


def test_number_bounds_and_their_phrases():
    assert number("x", 1) == 1.0 and type(number("x", 1)) is float
    assert number("x", np.float32(0.5), above=0, below=1) == 0.5
    assert number("x", 0, at_least=0, at_most=1) == 0.0
    assert number("x", 1, at_least=0, at_most=1) == 1.0
    cases = [
        (dict(above=0), 0, "x must be a positive number, got 0"),
        (dict(above=0, below=1), 1, "x must be a number in (0, 1), got 1"),
        (dict(at_least=0, below=1), -0.5, "x must be a number in [0, 1), got -0.5"),
        (dict(at_least=0, at_most=1), 1.5, "x must be a number in [0, 1], got 1.5"),
        (dict(at_least=0), -1, "x must be a number >= 0, got -1"),
        (dict(above=2), 2, "x must be a number > 2, got 2"),
        (dict(below=3), 3, "x must be a number < 3, got 3"),
        (dict(at_most=3), 4, "x must be a number <= 3, got 4"),
        ({}, True, "x must be a number, got True"),
        ({}, "1", "x must be a number, got '1'"),
        ({}, math.nan, "x must be a number, got nan"),
        ({}, math.inf, "x must be a number, got inf"),
        (dict(above=0), -math.inf, "x must be a positive number, got -inf"),
    ]
    for bounds, value, message in cases:
        with pytest.raises(ValueError) as err:
            number("x", value, **bounds)
        assert str(err.value) == message, bounds
    with pytest.raises(TypeError, match="at most one bound"):
        number("x", 1, above=0, at_least=0)


def test_probability_and_boolean():
    assert probability("p", 0) == 0.0
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\), got 1"):
        probability("p", 1)
    assert boolean("b", False) is False
    with pytest.raises(ValueError, match="b must be true or false, got 'yes'"):
        boolean("b", "yes")


def test_option_classes_use_the_checks():
    """The option classes refuse bad values with the checks' messages, and store numpy
    integers as plain ints (their reports are written as JSON)."""
    opts = TrainingOptions(epochs=np.int64(3))
    assert type(opts.epochs) is int
    with pytest.raises(ValueError, match="epochs must be a positive integer, got True"):
        TrainingOptions(epochs=True)
    with pytest.raises(ValueError, match="lr must be a positive number, got nan"):
        TrainingOptions(lr=math.nan)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -1"):
        TrainingOptions(weight_decay=-1)
    with pytest.raises(ValueError, match="anchor must be a number >= 0"):
        FinetuneOptions(anchor=-0.1)
    for name in ("temperature", "lr", "anchor"):  # an infinite setting trains nothing
        with pytest.raises(ValueError, match=f"{name} must be .*, got inf"):
            FinetuneOptions(**{name: math.inf})
    with pytest.raises(ValueError, match="mixup must be an integer >= 0, got 1.5"):
        FinetuneOptions(mixup=1.5)
    assert type(FinetuneOptions(synthetic=np.int32(2)).synthetic) is int
    with pytest.raises(ValueError, match="clients must be an integer >= 2, got 1"):
        FederationConfig(clients=1)
    m = mlp()
    x = torch.randn(12, 10)
    with pytest.raises(ValueError, match="probes must be an integer >= 0, got -1"):
        nf.fuse([m, m], x, method="auto", probes=-1)
