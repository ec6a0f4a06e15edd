"""The torch client on the numpy-level API: a ``torch.nn.Module`` and the app's callbacks.

`TorchModel` is the `ArrayModel` that ``Client(model, train_fn, evaluate_fn, config)``
builds for a torch model: it loads the global arrays into the module, calls the app's
``train_fn(model, round_config) -> samples`` or ``evaluate_fn(model) -> metrics``, and
hands the module's ``state_dict`` back as arrays. The only client module that imports
torch; the pipeline imports it only when it is given a torch model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedcore.client.arrays import ArrayModel, sample_count
from fedcore.client.config import EvaluateFn, TrainFn
from fedcore.errors import ConfigError
from fedcore.layout import ModelLayout
from fedcore.model import flatten_state_dict, load_flat_into

__all__ = ["TorchModel"]


class TorchModel(ArrayModel):
    """A torch module trained in place by ``train_fn`` and evaluated by ``evaluate_fn``.

    Its layout is the module's ``state_dict``: names, shapes and torch dtypes (a float16
    model's tensors are federated as float32 and stored back as float16).
    """

    def __init__(
        self, module: torch.nn.Module, train_fn: TrainFn | None, evaluate_fn: EvaluateFn | None
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                "model must be a torch.nn.Module (with train_fn) or a fedcore.client.ArrayModel; "
                f"got {type(module).__name__}"
            )
        if train_fn is None or not callable(train_fn):
            raise ConfigError(
                f"a torch model needs train_fn(model, round_config) -> samples; got {train_fn!r}"
            )
        self.module = module
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self._layout = ModelLayout.of(module.state_dict())

    @property
    def names(self) -> Sequence[str]:
        """The module's ``state_dict`` keys."""
        return self._layout.names

    @property
    def layout(self) -> ModelLayout:
        """The module's ``state_dict`` layout, with its own torch dtypes."""
        return self._layout

    def warm_up(self) -> None:
        """Pay torch's first-step costs now: an optimizer step on a throwaway parameter.

        The first ``optimizer.step()`` in a process imports torch's compiler machinery
        lazily (≈ 0.8 s here); one SGD-with-momentum step on a one-element tensor does it
        without touching the app's model or data.
        """
        scratch = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([scratch], lr=0.1, momentum=0.9)
        (scratch * scratch).sum().backward()
        optimizer.step()

    def get_weights(self) -> list[np.ndarray]:
        """The module's current ``state_dict``, as float32 arrays."""
        return self._layout.split(flatten_state_dict(self.module.state_dict()))

    def train(
        self, weights: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int]:
        """Load ``weights``, run ``train_fn`` on the module, return its new state and samples."""
        self._load(weights)
        samples = sample_count(self.train_fn(self.module, config), source="train_fn")
        return self.get_weights(), samples

    def evaluate(self, weights: list[np.ndarray]) -> Mapping[str, float] | None:
        """Load ``weights`` and run ``evaluate_fn`` on the module (None without one)."""
        if self.evaluate_fn is None:
            return None
        self._load(weights)
        return self.evaluate_fn(self.module)

    def _load(self, weights: list[np.ndarray]) -> None:
        parts = [np.asarray(w, dtype=np.float32).reshape(-1) for w in weights]
        load_flat_into(self.module, np.concatenate(parts) if parts else np.zeros(0, np.float32))
