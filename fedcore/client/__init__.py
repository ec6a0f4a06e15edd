"""The embeddable federated-learning client.

``Client`` (the session driver) runs rounds over the wire; ``UpdatePipeline`` and
``seal`` turn a round into a masked, encrypted update; ``CommitteeMember`` is a key
holder's committee role. Build one ``Client(model, train_fn, evaluate_fn,
ClientConfig(...))`` per participant: a torch module with its callbacks, or an
`ArrayModel` (any framework, numpy arrays in and out) with ``train_fn=None`` and
``evaluate_fn=None``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedcore.client.arrays import ArrayModel
from fedcore.client.committee import CommitteeMember, CommitteeRefusal
from fedcore.client.config import (
    FEDERATION_COMPLETE,
    ClientConfig,
    ClientResult,
    EvaluateFn,
    TrainFn,
    parse_server,
)
from fedcore.client.pipeline import PreparedUpdate, TrainedUpdate, UpdatePipeline, seal

if TYPE_CHECKING:
    from fedcore.client.session import Client
    from fedcore.client.torch_adapter import TorchModel

__all__ = [
    "FEDERATION_COMPLETE",
    "ArrayModel",
    "Client",
    "ClientConfig",
    "ClientResult",
    "CommitteeMember",
    "CommitteeRefusal",
    "EvaluateFn",
    "PreparedUpdate",
    "TorchModel",
    "TrainFn",
    "TrainedUpdate",
    "UpdatePipeline",
    "parse_server",
    "seal",
]

# Imported on first use: these modules import torch, which a client of another framework
# should not pay for when it imports `ArrayModel` or `seal`.
_LAZY = {"Client": "fedcore.client.session", "TorchModel": "fedcore.client.torch_adapter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
