"""Torch models <-> flat float32 vectors, and the seed MLP.

The runtime packs and encrypts flat vectors, so everything torch-specific stops here:
a `ModelLayout` (`fedcore.layout`, re-exported here) records each tensor's name, shape
and dtype so that a flat vector can be turned back into a ``state_dict`` exactly.
Nothing here knows about Paillier or the wire protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.layout import ModelLayout, TensorSpec, is_real_dtype

__all__ = [
    "ModelLayout",
    "TensorSpec",
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
