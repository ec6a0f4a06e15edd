"""Torch models <-> flat float32 vectors, the seed MLP and a small CNN.

The runtime packs and encrypts flat vectors, so everything torch-specific stops here:
a `ModelLayout` (`fedcore.layout`, re-exported here) records each tensor's name, shape
and dtype so that a flat vector can be turned back into a ``state_dict`` exactly.
Nothing here knows about Paillier or the wire protocol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.layout import ModelLayout, TensorSpec, is_real_dtype

__all__ = [
    "ModelLayout",
    "TensorSpec",
    "cnn",
    "flatten_state_dict",
    "load_flat_into",
    "mlp",
    "module_from_arrays",
    "unflatten_state_dict",
]


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


def module_from_arrays(arrays: Mapping[str, Any]) -> nn.Module:
    """A torch module whose state_dict is ``arrays``: same names, order and shapes, float32.

    For an aggregator whose clients train in another framework: its ``--model`` factory
    returns ``module_from_arrays(initial_weights)``, and the layout it publishes is
    ``ModelLayout.of_arrays`` of the same arrays, which numpy-level clients build from
    their own. Dotted names become submodules (``"dense.0.kernel"``), so names that share
    a prefix must be consecutive and a module's own arrays must come before its
    submodules' (torch's state_dict order); a ValueError says when they are not.
    """
    root = nn.Module()
    for name, array in arrays.items():
        values = np.asarray(array)
        if not is_real_dtype(values.dtype):
            raise ValueError(f"arrays[{name!r}] has dtype {values.dtype}; it must be real")
        *path, leaf = name.split(".")
        owner = root
        try:
            for part in path:
                child = dict(owner.named_children()).get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            tensor = torch.from_numpy(np.array(values, dtype=np.float32))
            owner.register_parameter(leaf, nn.Parameter(tensor))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a torch module cannot hold an array named {name!r}: {exc}") from None
    order = list(root.state_dict())
    if order != list(arrays):
        raise ValueError(
            f"torch would order these arrays {order}, not {list(arrays)}: keep names with a "
            "common prefix together, a module's own arrays before its submodules'"
        )
    return root


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


class _CNN(nn.Module):
    def __init__(self, side: int, channels: Sequence[int], hidden: int, classes: int) -> None:
        super().__init__()
        self.side = side  # a plain attribute: not part of the state_dict, hence the layout
        layers: list[nn.Module] = []
        width, pooled = 1, side
        for size in channels:
            layers += [nn.Conv2d(width, size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width, pooled = size, pooled // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * pooled * pooled, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, 1, self.side, self.side)
        return torch.log_softmax(self.classifier(self.features(images)), dim=1)


def cnn(
    in_features: int = 784,
    classes: int = 10,
    channels: Sequence[int] = (16, 32),
    hidden: int = 128,
) -> nn.Module:
    """A small CNN for square one-channel images given as flat vectors, log-softmax outputs.

    Per entry of ``channels``: a 3x3 convolution (padding 1), ReLU and 2x2 max-pooling;
    then a ``hidden``-unit ReLU layer and ``classes`` outputs. ``in_features`` must be a
    perfect square (784 = 28x28 Fashion-MNIST, 64 = 8x8 digits) whose side survives the
    pooling. With the defaults (Fashion-MNIST) it has 206,922 parameters; with 64 inputs
    22,602. Training it costs far more per parameter than the seed MLP.
    """
    side = math.isqrt(max(0, in_features))
    if in_features < 1 or side * side != in_features:
        raise ValueError(f"cnn needs in_features to be a perfect square >= 1; got {in_features}")
    if classes < 2 or hidden < 1 or not channels or any(c < 1 for c in channels):
        raise ValueError(
            f"cnn needs classes >= 2, hidden >= 1 and at least one positive channel count; "
            f"got classes={classes}, hidden={hidden}, channels={tuple(channels)}"
        )
    if side >> len(channels) < 1:
        raise ValueError(
            f"cnn pools {len(channels)} times, so the image side must be >= "
            f"{1 << len(channels)}; got in_features={in_features} (side {side})"
        )
    return _CNN(side, channels, hidden, classes)
