"""Tests for fedcore.model.cnn: size, shapes, refused inputs, and that it learns digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.aggregator import build_model
from fedcore.data import load_digits
from fedcore.model import ModelLayout, cnn, flatten_state_dict, load_flat_into
from fedcore.training import TrainConfig, evaluate, train_local


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("in_features", "expected"), [(784, 206_922), (64, 22_602)])
def test_cnn_parameter_count(in_features: int, expected: int) -> None:
    assert _parameters(cnn(in_features)) == expected


@pytest.mark.parametrize(("in_features", "classes"), [(784, 10), (64, 10), (16, 3)])
def test_cnn_maps_flat_images_to_log_probabilities(in_features: int, classes: int) -> None:
    torch.manual_seed(0)
    out = cnn(in_features, classes=classes)(torch.rand(5, in_features))
    assert out.shape == (5, classes)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("in_features", [0, -4, 63, 65, 101, 783])
def test_cnn_refuses_non_square_inputs(in_features: int) -> None:
    with pytest.raises(ValueError, match="perfect square"):
        cnn(in_features)


def test_cnn_refuses_images_too_small_to_pool() -> None:
    with pytest.raises(ValueError, match="side must be >= 4"):
        cnn(1)
    with pytest.raises(ValueError, match="classes >= 2"):
        cnn(64, classes=1)


def test_cnn_is_an_aggregator_model_factory_like_mlp() -> None:
    kwargs = {"in_features": 64, "classes": 10}
    a = build_model("fedcore.model:cnn", kwargs, seed=3)
    b = build_model("fedcore.model:cnn", kwargs, seed=3)
    flat = flatten_state_dict(a.state_dict())
    assert np.array_equal(flat, flatten_state_dict(b.state_dict()))  # seeded: same init
    assert ModelLayout.of(a.state_dict()).numel == len(flat) == 22_602
    other = cnn(64)
    load_flat_into(other, flat)  # the layout round-trips through a flat vector
    assert np.array_equal(flatten_state_dict(other.state_dict()), flat)


def test_cnn_learns_digits_well_above_chance() -> None:
    digits = load_digits()
    torch.manual_seed(0)
    model = cnn(digits.num_features, classes=digits.num_classes)
    before = evaluate(model, digits.x_test, digits.y_test)["accuracy"]
    train_local(model, digits.x_train, digits.y_train, TrainConfig(epochs=5, seed=0))
    after = evaluate(model, digits.x_test, digits.y_test)["accuracy"]
    assert before < 0.3  # an untrained model is near chance (0.1)
    assert after > 0.85
