"""The aggregator: round engine, client registry, quorum, committee decryption, checkpoints;
and the relay, an edge aggregator that forwards its clients' folded sum upstream."""

from fedcore.aggregator.checkpoint import Checkpoint, CheckpointError
from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.relay import Relay
from fedcore.aggregator.relay_config import RelayConfig
from fedcore.aggregator.rounds import RoundReport
from fedcore.aggregator.service import Aggregator, build_model

__all__ = [
    "Aggregator",
    "AggregatorConfig",
    "Checkpoint",
    "CheckpointError",
    "Relay",
    "RelayConfig",
    "RoundReport",
    "build_model",
]
