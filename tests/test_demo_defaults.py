"""The demo's local training: one row per dataset, what the demo federation runs with, and
explicit options (and `fedcore demo` flags) override it field by field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

import fedcore.demo
import fedcore.training
from fedcore.cli import main
from fedcore.contracts import RoundPlan
from fedcore.data import DATASET_NAMES
from fedcore.demo import (
    DEMO_TRAINING,
    DemoOptions,
    DemoTraining,
    _aggregator_config,
    _client_train_config,
)
from fedcore.model import mlp
from fedcore.training import TrainConfig, make_train_fn


def test_every_dataset_has_a_row_and_the_table_is_frozen() -> None:
    assert set(DEMO_TRAINING) == set(DATASET_NAMES)
    with pytest.raises(TypeError):
        DEMO_TRAINING["digits"] = DEMO_TRAINING["fashion-mnist"]  # type: ignore[index]


def _trained_with(
    options: DemoOptions, dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> TrainConfig:
    """The settings a demo client's train_fn trains with in a round of this demo."""
    training = options.training(dataset)
    shape = SimpleNamespace(num_features=4, num_classes=3)
    config = _aggregator_config(options, training, shape, tmp_path)
    # what the aggregator sends in every RoundStart (fedcore.aggregator.service)
    plan = RoundPlan(epochs=config.local_epochs, learning_rate=config.learning_rate, seed=7)
    seen: list[TrainConfig] = []
    monkeypatch.setattr(
        fedcore.training, "train_local", lambda model, x, y, cfg: seen.append(cfg) or len(x)
    )
    x = np.zeros((5, 4), dtype=np.float32)
    train_fn = make_train_fn(
        x, np.zeros(5, dtype=np.int64), _client_train_config(options, training, 1)
    )
    assert train_fn(mlp(4, hidden=(2,), classes=3), plan.config()) == 5
    return seen[0]


@pytest.mark.parametrize("dataset", sorted(DEMO_TRAINING))
def test_the_demo_trains_with_its_dataset_row(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = DEMO_TRAINING[dataset]
    assert DemoOptions().training(dataset) == row
    used = _trained_with(DemoOptions(), dataset, tmp_path, monkeypatch)
    assert (used.epochs, used.lr, used.batch_size, used.momentum) == (
        row.local_epochs,
        row.learning_rate,
        row.batch_size,
        row.momentum,
    )


def test_explicit_options_override_their_field_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = DEMO_TRAINING["digits"]
    options = DemoOptions(local_epochs=row.local_epochs + 2, batch_size=7)
    assert options.training("digits") == DemoTraining(
        local_epochs=row.local_epochs + 2,
        learning_rate=row.learning_rate,
        batch_size=7,
        momentum=row.momentum,
    )
    options = DemoOptions(learning_rate=0.001, momentum=0.0)
    used = _trained_with(options, "fashion-mnist", tmp_path, monkeypatch)
    fashion = DEMO_TRAINING["fashion-mnist"]
    assert (used.epochs, used.lr, used.batch_size, used.momentum) == (
        fashion.local_epochs,
        0.001,
        fashion.batch_size,
        0.0,
    )


class _RecordingDemo:
    """Stands in for `fedcore.demo.Demo`: records its options, runs nothing."""

    options: ClassVar[list[DemoOptions]] = []

    def __init__(self, options: DemoOptions) -> None:
        _RecordingDemo.options.append(options)

    def request_stop(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        return {"interrupted": False, "rounds_completed": self.options[-1].rounds}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], DEMO_TRAINING["digits"]),
        (
            ["--local-epochs", "3", "--lr", "0.2", "--batch-size", "16", "--momentum", "0.5"],
            DemoTraining(local_epochs=3, learning_rate=0.2, batch_size=16, momentum=0.5),
        ),
        (["--lr", "0.01"], dataclasses.replace(DEMO_TRAINING["digits"], learning_rate=0.01)),
    ],
)
def test_demo_flags_override_the_row(
    flags: list[str], expected: DemoTraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedcore.demo, "Demo", _RecordingDemo)
    _RecordingDemo.options = []
    assert main(["demo", "--dataset", "digits", *flags]) == 0
    assert _RecordingDemo.options[0].training("digits") == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--local-epochs", "0"], "local_epochs must be an integer >= 1; got 0"),
        (["--lr", "0"], "learning_rate must be a finite number > 0; got 0.0"),
        (["--lr", "nan"], "learning_rate must be a finite number > 0"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1; got 0"),
        (["--momentum", "1"], "momentum must be in [0, 1); got 1.0"),
    ],
)
def test_bad_training_flags_are_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dataset", "digits", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
