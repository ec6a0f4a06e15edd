"""Model layouts: the names, shapes and dtypes that turn a flat float32 vector into tensors.

The runtime packs and encrypts one flat float32 vector per update; a `ModelLayout`
says how that vector splits into a model's named arrays. The aggregator publishes its
layout in the Welcome, and a client refuses a federation whose layout differs from its
own model's, whatever framework trains that model. This module imports no ML framework:
torch models describe themselves through their ``state_dict`` (`ModelLayout.of`),
anything else through named arrays (`ModelLayout.of_arrays`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["FEDERATED_DTYPE", "ModelLayout", "TensorSpec", "is_real_dtype"]

#: What an array federated by the numpy-level client is in a layout. Layouts have named
#: element types in torch's spelling since the first Welcome, so a model trained in any
#: framework must say "torch.float32" to match a torch aggregator's float32 layout.
FEDERATED_DTYPE = "torch.float32"


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """One tensor of a model: its name, shape and element type (torch's dtype name)."""

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
    """The ordered tensors of a model; the flat vector is their concatenation."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> ModelLayout:
        """Describe a torch state_dict (floating-point tensors only; others are rejected)."""
        specs = []
        for name, tensor in state_dict.items():
            if not tensor.is_floating_point():
                raise TypeError(
                    f"state_dict[{name!r}] has dtype {tensor.dtype}; only floating-point "
                    "tensors can be federated"
                )
            specs.append(TensorSpec(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype)))
        return cls(tensors=tuple(specs))

    @classmethod
    def of_arrays(cls, names: Sequence[str], arrays: Sequence[Any]) -> ModelLayout:
        """Describe named real-valued arrays (numpy, or anything ``np.asarray`` takes).

        Every array is federated as float32 (`FEDERATED_DTYPE`) whatever its own float
        type; only the names, their order and the shapes make the layout. Raises
        TypeError for a non-numeric array and ValueError for duplicate or empty names
        or a name count that differs from the array count.
        """
        if isinstance(names, str) or len(names) != len(arrays):
            raise ValueError(
                f"names must be a sequence of one name per array; got {len(arrays)} arrays "
                f"and names {names!r}"
            )
        seen: set[str] = set()
        specs = []
        for name, array in zip(names, arrays, strict=True):
            if not isinstance(name, str) or not name:
                raise ValueError(f"array names must be non-empty strings; got {name!r}")
            if name in seen:
                raise ValueError(f"array name {name!r} appears twice; names must be unique")
            seen.add(name)
            values = np.asarray(array)
            if not is_real_dtype(values.dtype):
                raise TypeError(
                    f"array {name!r} has dtype {values.dtype}; only real-valued arrays "
                    "can be federated"
                )
            specs.append(TensorSpec(name=name, shape=values.shape, dtype=FEDERATED_DTYPE))
        return cls(tensors=tuple(specs))

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors' names, in order."""
        return tuple(spec.name for spec in self.tensors)

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(spec.numel for spec in self.tensors)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        """Views of a flat vector, one per tensor, in the tensors' shapes (no copy)."""
        flat = np.asarray(vector)
        if flat.ndim != 1 or flat.shape[0] != self.numel:
            raise ValueError(
                f"vector has shape {flat.shape}; the layout needs a 1-D vector of {self.numel}"
            )
        arrays = []
        offset = 0
        for spec in self.tensors:
            arrays.append(flat[offset : offset + spec.numel].reshape(spec.shape))
            offset += spec.numel
        return arrays

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

    def difference(self, other: ModelLayout) -> str:
        """The first way ``other`` differs from this layout, in words ("" if equal)."""
        for index, (mine, theirs) in enumerate(zip(self.tensors, other.tensors, strict=False)):
            if mine != theirs:
                return (
                    f"tensor {index} is {theirs.name} {list(theirs.shape)} {theirs.dtype}, "
                    f"not {mine.name} {list(mine.shape)} {mine.dtype}"
                )
        if len(self.tensors) != len(other.tensors):
            return f"{len(other.tensors)} tensors, not {len(self.tensors)}"
        return ""


def is_real_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether arrays of ``dtype`` hold real numbers that convert to float32 as they are.

    Floats, integers, and the extension floats (bfloat16, float8) that JAX hands to numpy.
    """
    return dtype.kind in "fiu" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))
