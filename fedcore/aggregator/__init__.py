"""The aggregator: round engine, client registry, quorum, committee decryption, checkpoints."""

from fedcore.aggregator.checkpoint import Checkpoint, CheckpointError
from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.rounds import RoundReport
from fedcore.aggregator.service import Aggregator, build_model

__all__ = [
    "Aggregator",
    "AggregatorConfig",
    "Checkpoint",
    "CheckpointError",
    "RoundReport",
    "build_model",
]
