"""Tests for fedcore.training: config validation, determinism, learning, callbacks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedcore.data import Dataset, load_digits
from fedcore.model import flatten_state_dict, mlp
from fedcore.training import (
    TrainConfig,
    evaluate,
    make_evaluate_fn,
    make_train_fn,
    train_local,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def _fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(64, hidden=(64,))


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"seed": -1}, "seed"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict[str, Any], parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        TrainConfig(**kwargs)


def test_train_local_is_deterministic_for_a_seed(digits: Dataset) -> None:
    config = TrainConfig(epochs=1, seed=7)
    a, b, c = _fresh_model(), _fresh_model(), _fresh_model()
    train_local(a, digits.x_train, digits.y_train, config)
    train_local(b, digits.x_train, digits.y_train, config)
    train_local(c, digits.x_train, digits.y_train, TrainConfig(epochs=1, seed=8))
    weights_a = flatten_state_dict(a.state_dict())
    assert np.array_equal(weights_a, flatten_state_dict(b.state_dict()))
    assert not np.array_equal(weights_a, flatten_state_dict(c.state_dict()))
    assert not np.array_equal(weights_a, flatten_state_dict(_fresh_model().state_dict()))


def test_train_local_does_not_touch_the_global_rng(digits: Dataset) -> None:
    model = _fresh_model()
    torch.manual_seed(123)
    train_local(model, digits.x_train[:100], digits.y_train[:100], TrainConfig(epochs=2))
    after_training = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_training, torch.rand(3))


def test_train_local_learns_digits(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = mlp(64)
    before = evaluate(model, digits.x_test, digits.y_test)
    seen = train_local(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, lr=0.02))
    after = evaluate(model, digits.x_test, digits.y_test)
    assert seen == digits.x_train.shape[0]
    assert before["accuracy"] < 0.3
    assert after["accuracy"] >= 0.9
    assert after["loss"] < before["loss"]
    assert after["num_samples"] == digits.x_test.shape[0]


def test_train_local_restores_eval_mode_and_accepts_read_only_arrays(digits: Dataset) -> None:
    model = _fresh_model()
    model.eval()
    x = digits.x_train[:64].copy()
    x.flags.writeable = False
    assert train_local(model, x, digits.y_train[:64], TrainConfig()) == 64
    assert not model.training


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (np.zeros((0, 64), np.float32), np.zeros(0, np.int64)),
        (np.zeros((4, 64), np.float32), np.zeros(3, np.int64)),
        (np.zeros(64, np.float32), np.zeros(1, np.int64)),
    ],
)
def test_train_local_rejects_bad_data(x: np.ndarray, y: np.ndarray) -> None:
    with pytest.raises(ValueError):
        train_local(_fresh_model(), x, y, TrainConfig())


def test_evaluate_counts_correct_predictions() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.0, 5.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.bias.expand(x.shape[0], 2), dim=1)

    x = np.zeros((4, 3), np.float32)
    result = evaluate(Fixed(), x, np.array([1, 1, 1, 0]), batch_size=3)
    assert result["accuracy"] == pytest.approx(0.75)
    expected_loss = -(3 * np.log(1 / (1 + np.exp(-5))) + np.log(1 / (1 + np.exp(5)))) / 4
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_make_train_fn_applies_round_overrides(digits: Dataset) -> None:
    x, y = digits.x_train[:200], digits.y_train[:200]
    train_fn = make_train_fn(x, y, TrainConfig(epochs=1, seed=3))
    overridden, reference = _fresh_model(), _fresh_model()
    assert train_fn(overridden, {"epochs": 2, "lr": 0.01, "round_id": 5}) == 200
    train_local(reference, x, y, TrainConfig(epochs=2, lr=0.01, seed=3))
    assert np.array_equal(
        flatten_state_dict(overridden.state_dict()), flatten_state_dict(reference.state_dict())
    )
    with pytest.raises(ValueError, match="epochs"):
        train_fn(_fresh_model(), {"epochs": 0})


def test_make_evaluate_fn_matches_evaluate(digits: Dataset) -> None:
    model = _fresh_model()
    evaluate_fn = make_evaluate_fn(digits.x_test, digits.y_test)
    assert evaluate_fn(model) == evaluate(model, digits.x_test, digits.y_test)
    with pytest.raises(ValueError):
        make_evaluate_fn(digits.x_test, digits.y_test[:-1])


def test_round_seed_is_mixed_with_the_client_seed(digits: Dataset) -> None:
    x, y = digits.x_train[:200], digits.y_train[:200]

    def trained(client_seed: int, round_config: dict[str, Any]) -> np.ndarray:
        model = _fresh_model()
        make_train_fn(x, y, TrainConfig(seed=client_seed))(model, round_config)
        return flatten_state_dict(model.state_dict())

    round_1 = trained(1, {"seed": 1001})
    assert np.array_equal(round_1, trained(1, {"seed": 1001}))
    assert not np.array_equal(round_1, trained(1, {"seed": 1002}))
    assert not np.array_equal(round_1, trained(2, {"seed": 1001}))
    assert not np.array_equal(round_1, trained(1, {}))
