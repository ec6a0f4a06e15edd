"""The framework-neutral client model: named float32 arrays in, trained arrays out.

An app that trains with JAX, Keras, numpy or anything else subclasses `ArrayModel`:
it names its arrays, hands over their shapes (`get_weights`), and trains or evaluates
the global weights it is given as numpy arrays. The torch client is an `ArrayModel`
too (`fedcore.client.torch_adapter.TorchModel`). `trained_vector` and
`evaluation_metrics` hold the contract the client checks every round, before anything
is encoded. This module imports no ML framework and knows nothing of the wire.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcore.errors import ConfigError
from fedcore.layout import ModelLayout, is_real_dtype

__all__ = ["ArrayModel", "checked_training", "evaluation_metrics", "sample_count", "trained_vector"]


class ArrayModel(abc.ABC):
    """A model the client federates as an ordered list of named float32 arrays.

    Subclasses give ``names`` (a class attribute will do) and implement `get_weights`
    and `train`; `evaluate` is optional. The names, their order and the arrays' shapes
    are the model's `layout`, which must equal the aggregator's: for a torch aggregator
    that is its model's ``state_dict`` keys and shapes (``nn.Linear`` weights are
    ``[out, in]``). Arrays may be numpy arrays or anything ``np.asarray`` converts
    (``jax.Array``, a CPU tensor); they travel as float32.

    `train` and `evaluate` run in a worker thread, one round at a time.
    """

    @property
    @abc.abstractmethod
    def names(self) -> Sequence[str]:
        """The arrays' names, in the order `get_weights` and `train` give the arrays."""

    @abc.abstractmethod
    def get_weights(self) -> Sequence[Any]:
        """This model's own arrays, in order; their shapes define the layout."""

    @abc.abstractmethod
    def train(self, weights: list[np.ndarray], config: dict[str, Any]) -> tuple[Sequence[Any], int]:
        """Train from the global ``weights``; return ``(trained arrays, samples used)``.

        ``weights`` are fresh float32 copies, one per name, that the method may change.
        ``config`` is the round's settings (``epochs``, ``lr``, ``seed``). The sample
        count sets this client's FedAvg weight.
        """

    def evaluate(self, weights: list[np.ndarray]) -> Mapping[str, float] | None:
        """Metrics of the global ``weights`` on local data (e.g. accuracy, loss), or None.

        The metrics the federation names travel inside the encrypted update. The default
        evaluates nothing.
        """
        return None

    def warm_up(self) -> None:
        """One-time set-up the first round would otherwise pay (lazy imports, compilation).

        The client calls it once, in a worker thread, before it joins the federation, so
        round 1 costs what every round costs. The default does nothing.
        """
        return None

    @property
    def layout(self) -> ModelLayout:
        """The names and shapes of `get_weights`, as the aggregator's layout must be."""
        try:
            return ModelLayout.of_arrays(self.names, self.get_weights())
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from None


def checked_training(
    layout: ModelLayout, result: object, *, source: str = "train"
) -> tuple[np.ndarray, int]:
    """``(flat float32 vector, samples)`` of what `ArrayModel.train` returned, checked."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise ConfigError(
            f"{source} must return (weights, samples): a sequence of {len(layout.tensors)} "
            f"arrays and a sample count; got {type(result).__name__}"
        )
    arrays, samples = result
    return trained_vector(layout, arrays, source=source), sample_count(samples, source=source)


def trained_vector(layout: ModelLayout, result: object, *, source: str = "train") -> np.ndarray:
    """The flat float32 vector of what ``source`` returned, checked against ``layout``.

    Raises ConfigError (the app broke the `ArrayModel.train` contract, and retrying the
    round cannot help) for anything but one real array per tensor in the layout's
    shapes with finite values; the message names the tensor.
    """
    if isinstance(result, np.ndarray | str | bytes | Mapping) or not isinstance(result, Sequence):
        raise ConfigError(
            f"{source} must return a sequence of {len(layout.tensors)} arrays "
            f"(one per name: {', '.join(layout.names)}); got {type(result).__name__}"
        )
    if len(result) != len(layout.tensors):
        raise ConfigError(
            f"{source} returned {len(result)} arrays; the layout has {len(layout.tensors)} "
            f"({', '.join(layout.names)})"
        )
    parts = []
    for spec, returned in zip(layout.tensors, result, strict=True):
        try:
            values = np.asarray(returned)
        except Exception as exc:  # an array type numpy cannot read (a GPU tensor, say)
            raise ConfigError(
                f"{source} returned {spec.name} as an unreadable array: {exc}"
            ) from None
        if not is_real_dtype(values.dtype):
            raise ConfigError(
                f"{source} returned {spec.name} as {type(returned).__name__} of dtype "
                f"{values.dtype}; it must be a real-valued array"
            )
        if values.shape != spec.shape:
            raise ConfigError(
                f"{source} returned {spec.name} with shape {values.shape}; the layout needs "
                f"{spec.shape}"
            )
        with np.errstate(over="ignore"):  # beyond float32's range is refused just below
            flat = values.astype(np.float32).reshape(-1)
        finite = np.isfinite(flat)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ConfigError(
                f"{source} returned non-finite values in {spec.name}: {bad.size} of {flat.size}, "
                f"the first at flat index {int(bad[0])} is {flat[bad[0]]} as float32"
            )
        parts.append(flat)
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts)


def sample_count(samples: object, *, source: str = "train") -> int:
    """The sample count ``source`` returned, or ConfigError if it is not an int >= 0."""
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 0:
        raise ConfigError(f"{source} must return the number of samples it used, got {samples!r}")
    return int(samples)


def evaluation_metrics(result: object, *, source: str = "evaluate") -> dict[str, float] | None:
    """What ``source`` returned as ``{metric name: float}`` (None stays None); else ConfigError."""
    if result is None:
        return None
    if not isinstance(result, Mapping):
        raise ConfigError(
            f"{source} must return a mapping of metric name to number, got {type(result).__name__}"
        )
    metrics = {}
    for name, value in result.items():
        try:
            metrics[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source} returned metric {name!r} = {value!r}, which is not a number"
            ) from None
    return metrics
