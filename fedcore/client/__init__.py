"""The embeddable federated-learning client.

``Client`` (the session driver) runs rounds over the wire; ``UpdatePipeline`` and
``seal`` turn a round into a masked, encrypted update; ``CommitteeMember`` is a key
holder's committee role. Build one ``Client(model, train_fn, evaluate_fn,
ClientConfig(...))`` per participant.
"""

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
from fedcore.client.session import Client

__all__ = [
    "FEDERATION_COMPLETE",
    "Client",
    "ClientConfig",
    "ClientResult",
    "CommitteeMember",
    "CommitteeRefusal",
    "EvaluateFn",
    "PreparedUpdate",
    "TrainFn",
    "TrainedUpdate",
    "UpdatePipeline",
    "parse_server",
    "seal",
]
