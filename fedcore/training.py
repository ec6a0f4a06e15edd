"""Local training and evaluation callbacks for a federated client.

`make_train_fn` and `make_evaluate_fn` build the ``train_fn``/``evaluate_fn`` that
`fedcore.Client` calls each round. Models must return log-probabilities (the seed
MLP ends in log-softmax), so the loss is NLL. Training is reproducible from
`TrainConfig.seed`: shuffling uses its own `torch.Generator`, never the global RNG.
This module knows nothing of Paillier, packing or the wire protocol, and leaves
torch's thread settings alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TrainConfig",
    "evaluate",
    "make_evaluate_fn",
    "make_train_fn",
    "train_local",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Local SGD settings: epochs per round, mini-batch size, learning rate, momentum, seed."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1; got {self.epochs!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1; got {self.batch_size!r}")
        if not isinstance(self.lr, int | float) or not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got {self.lr!r}")
        if not isinstance(self.momentum, int | float) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    raise ValueError("model has no parameters to train or evaluate")


def _as_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    features = np.asarray(x, dtype=np.float32)
    labels = np.asarray(y, dtype=np.int64)
    if features.ndim < 2:
        raise ValueError(f"x must have shape [N, ...features]; got {features.shape}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"y must be 1-D with one label per row of x; got y {labels.shape}, x {features.shape}"
        )
    if features.shape[0] == 0:
        raise ValueError("x must hold at least one sample")
    # torch.from_numpy shares memory and warns on read-only arrays; copy only then.
    if not (features.flags.writeable and features.flags.c_contiguous):
        features = features.copy()
    if not (labels.flags.writeable and labels.flags.c_contiguous):
        labels = labels.copy()
    return torch.from_numpy(features).to(device), torch.from_numpy(labels).to(device)


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> int:
    """Train ``model`` in place with SGD + NLL loss; returns ``len(x)`` for FedAvg weighting.

    Deterministic for a given ``config.seed``, model state and data (on CPU).
    """
    device = _device_of(model)
    features, labels = _as_tensors(x, y, device)
    num_samples = int(features.shape[0])
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    was_training = model.training
    model.train()
    try:
        for _epoch in range(config.epochs):
            order = torch.randperm(num_samples, generator=generator).to(device)
            for start in range(0, num_samples, config.batch_size):
                batch = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.nll_loss(model(features[batch]), labels[batch])
                loss.backward()
                optimizer.step()
    finally:
        model.train(was_training)
    return num_samples


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024
) -> dict[str, float]:
    """Mean NLL loss and accuracy of ``model`` on ``(x, y)``; also ``num_samples``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = _device_of(model)
    features, labels = _as_tensors(x, y, device)
    num_samples = int(features.shape[0])
    total_loss = 0.0
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, num_samples, batch_size):
                log_probs = model(features[start : start + batch_size])
                batch_labels = labels[start : start + batch_size]
                total_loss += float(F.nll_loss(log_probs, batch_labels, reduction="sum"))
                correct += int((log_probs.argmax(dim=1) == batch_labels).sum())
    finally:
        model.train(was_training)
    return {
        "accuracy": correct / num_samples,
        "loss": total_loss / num_samples,
        "num_samples": float(num_samples),
    }


_OVERRIDABLE = {field.name: field.type for field in dataclasses.fields(TrainConfig)}


def _round_overrides(round_config: Mapping[str, Any]) -> dict[str, Any]:
    """Pick TrainConfig fields out of a round config, converting numbers to the field's type."""
    overrides: dict[str, Any] = {}
    for key, value in round_config.items():
        if key not in _OVERRIDABLE:
            continue  # round configs carry other keys (round id, clip bound, ...)
        if _OVERRIDABLE[key] == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        overrides[key] = value
    return overrides


def make_train_fn(
    x: np.ndarray, y: np.ndarray, config: TrainConfig
) -> Callable[[nn.Module, Mapping[str, Any]], int]:
    """Build ``train_fn(model, round_config) -> num_samples`` over a client's local data.

    ``round_config`` may override any `TrainConfig` field, typically ``"epochs"`` and
    ``"lr"``; a ``"seed"`` there (per round, from the aggregator) is mixed with
    ``config.seed`` so rounds and clients shuffle differently yet reproducibly. Other
    keys are ignored; invalid values raise ValueError.
    """
    _as_tensors(x, y, torch.device("cpu"))  # fail now, not in the first round

    def train_fn(model: nn.Module, round_config: Mapping[str, Any]) -> int:
        """Train ``model`` on this client's data for one round; returns the sample count."""
        overrides = _round_overrides(round_config or {})
        effective = dataclasses.replace(config, **overrides) if overrides else config
        if "seed" in overrides:
            # Mix, don't replace: the aggregator sends one seed per round to everyone, but
            # clients should still shuffle differently from each other.
            mixed = np.random.SeedSequence([config.seed, effective.seed]).generate_state(2)
            effective = dataclasses.replace(
                effective, seed=int(mixed[0]) << 32 | int(mixed[1]) >> 1
            )
        return train_local(model, x, y, effective)

    return train_fn


def make_evaluate_fn(x: np.ndarray, y: np.ndarray) -> Callable[[nn.Module], dict[str, float]]:
    """Build ``evaluate_fn(model) -> {"accuracy", "loss", "num_samples"}`` over ``(x, y)``."""
    _as_tensors(x, y, torch.device("cpu"))

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        """Evaluate ``model`` on this client's held-out data."""
        return evaluate(model, x, y)

    return evaluate_fn
