"""The embeddable federated-learning client.

``Client`` (the session driver) runs rounds over the wire; ``UpdatePipeline`` turns a
round into an encrypted update; ``decrypt_shard`` is the committee role. Build one
``Client(model, train_fn, evaluate_fn, ClientConfig(...))`` per participant.
"""

from fedcore.client.committee import decrypt_shard
from fedcore.client.config import (
    FEDERATION_COMPLETE,
    ClientConfig,
    ClientResult,
    EvaluateFn,
    TrainFn,
    parse_server,
)
from fedcore.client.pipeline import PreparedUpdate, UpdatePipeline
from fedcore.client.session import Client

__all__ = [
    "FEDERATION_COMPLETE",
    "Client",
    "ClientConfig",
    "ClientResult",
    "EvaluateFn",
    "PreparedUpdate",
    "TrainFn",
    "UpdatePipeline",
    "decrypt_shard",
    "parse_server",
]
