"""Torch models <-> flat float32 vectors, and the seed MLP.

The runtime packs and encrypts flat vectors, so everything model-specific stops here:
a `ModelLayout` records each tensor's name, shape and dtype so that a flat vector can
be turned back into a ``state_dict`` exactly. Nothing here knows about Paillier or the
wire protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "ModelLayout",
    "TensorSpec",
    "flatten_state_dict",
    "load_flat_into",
    "mlp",
    "unflatten_state_dict",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """One tensor of a state_dict: its key, shape and torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of scalar values in the tensor."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLayout:
    """The ordered tensors of a state_dict; the flat vector is their concatenation."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, state_dict: dict[str, torch.Tensor]) -> ModelLayout:
        """Describe a state_dict (floating-point tensors only; others are rejected)."""
        specs = []
        for name, tensor in state_dict.items():
            if not tensor.is_floating_point():
                raise TypeError(
                    f"state_dict[{name!r}] has dtype {tensor.dtype}; only floating-point "
                    "tensors can be federated"
                )
            specs.append(TensorSpec(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype)))
        return cls(tensors=tuple(specs))

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(spec.numel for spec in self.tensors)

    def to_json(self) -> str:
        """Serialize as a JSON string (for the Welcome message)."""
        return json.dumps([[t.name, list(t.shape), t.dtype] for t in self.tensors])

    @classmethod
    def from_json(cls, text: str) -> ModelLayout:
        """Parse `to_json` output; raises ValueError on any other shape."""
        try:
            rows = json.loads(text)
            tensors = tuple(
                TensorSpec(name=str(name), shape=tuple(int(d) for d in shape), dtype=str(dt))
                for name, shape, dt in rows
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"model layout is not valid JSON of [name, shape, dtype]: {exc}"
            ) from exc
        return cls(tensors=tensors)


def flatten_state_dict(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """Concatenate every tensor of ``state_dict`` (in order) into one float32 vector."""
    if not state_dict:
        return np.zeros(0, dtype=np.float32)
    parts = [t.detach().to("cpu", torch.float32).reshape(-1) for t in state_dict.values()]
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def unflatten_state_dict(vector: np.ndarray, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors with the layout's names, shapes and dtypes."""
    flat = np.asarray(vector)
    if flat.ndim != 1 or flat.shape[0] != layout.numel:
        raise ValueError(
            f"vector has shape {flat.shape}; the layout needs a 1-D vector of {layout.numel}"
        )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in layout.tensors:
        piece = flat[offset : offset + spec.numel].reshape(spec.shape)
        dtype = getattr(torch, spec.dtype.removeprefix("torch."))
        out[spec.name] = torch.from_numpy(np.array(piece, dtype=np.float32)).to(dtype)
        offset += spec.numel
    return out


def load_flat_into(model: nn.Module, vector: np.ndarray) -> None:
    """Overwrite ``model``'s parameters and buffers from a flat vector of its own layout."""
    layout = ModelLayout.of(model.state_dict())
    model.load_state_dict(unflatten_state_dict(vector, layout))


class _MLP(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.layers(x.flatten(1)), dim=1)


def mlp(in_features: int = 784, hidden: Sequence[int] = (512, 256), classes: int = 10) -> nn.Module:
    """The seed MLP: in_features-512-256-classes with ReLU and log-softmax outputs.

    With the defaults (Fashion-MNIST) it has 535,818 parameters.
    """
    if in_features < 1 or classes < 2 or any(h < 1 for h in hidden):
        raise ValueError(
            f"mlp needs in_features >= 1, classes >= 2 and positive hidden sizes; got "
            f"in_features={in_features}, hidden={tuple(hidden)}, classes={classes}"
        )
    return _MLP(in_features, hidden, classes)
