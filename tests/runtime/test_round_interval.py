"""``round_interval``: a paced federation starts its rounds that many seconds apart."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from fedcore.aggregator import Aggregator

from .conftest import Keys, aggregator_config, make_client, run_federation

INTERVAL = 3.0


async def _round_starts(aggregator: Aggregator, starts: dict[int, float]) -> None:
    """When each round id first appears (polled every 10 ms)."""
    while True:
        state = aggregator.round
        if state is not None and state.round_id not in starts:
            starts[state.round_id] = time.monotonic()
        await asyncio.sleep(0.01)


async def test_rounds_start_round_interval_apart_and_the_pause_is_no_phase(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        min_clients=2,
        clients_per_round=2,
        rounds=3,
        local_epochs=1,
        round_interval=INTERVAL,
    )
    aggregator = Aggregator(config)
    clients = [
        make_client(i, pki, keys, digits, 2, federation=aggregator.federation) for i in range(2)
    ]
    starts: dict[int, float] = {}
    watcher = asyncio.create_task(_round_starts(aggregator, starts))
    try:
        checkpoint, results = await run_federation(aggregator, clients)
    finally:
        watcher.cancel()
    assert checkpoint.rounds_completed == 3
    assert all(r.rounds_contributed == 3 for r in results), results  # type: ignore[union-attr]
    times = [starts[round_id] for round_id in sorted(starts)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    durations = [sum(entry["phase_seconds"].values()) for entry in checkpoint.history]
    # each round ran shorter than the interval, so the next one waited for it
    assert all(d < INTERVAL for d in durations), durations
    assert len(gaps) == 2 and all(INTERVAL - 0.05 <= g <= INTERVAL + 1.5 for g in gaps), gaps
