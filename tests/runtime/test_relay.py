"""Relays end to end: real TLS on 127.0.0.1, certificates from `fedcore certs --relays`,
a real Paillier key, real torch clients. A relay tree gives the flat model, a relay's
death costs only its round's partial sum, trees nest, and a relay cannot pass off a sum
that is not the product of the clients it names."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.aggregator import Aggregator, Relay, RelayConfig, RoundReport
from fedcore.aggregator.relay import _RelayRound
from fedcore.credentials import pack_tokens, unpack_tokens
from fedcore.crypto import PrivateKey
from fedcore.data import Dataset
from fedcore.errors import FedcoreError
from protocol.errors import ErrorCode
from protocol.messages import RelayStatus, RoundStart, UpdateChunk

from .conftest import Keys, aggregator_config, make_client
from .rogue import RogueClient

HIDDEN = (32,)
CLIENTS = 10
KEY_HOLDERS = (0, 1)  # connect to the root: key holders never sit behind a relay


def _relay_settings(pki: Path, index: int, upstream_port: int, **changes: Any) -> dict[str, Any]:
    return {
        "upstream": f"127.0.0.1:{upstream_port}",
        "server_hostname": "localhost",
        "cert": pki / f"relay-{index}.pem",
        "key": pki / f"relay-{index}.key",
        "ca": pki / "ca.pem",
        "port": 0,
        "metrics_port": None,
        "backoff_base": 0.1,
        "backoff_max": 0.5,
        "name": "edge",
        **changes,
    }


def _relay(pki: Path, index: int, upstream_port: int, **changes: Any) -> Relay:
    return Relay(RelayConfig.from_mapping(_relay_settings(pki, index, upstream_port, **changes)))


def _aggregator(tmp_path: Path, pki: Path, keys: Keys, **changes: Any) -> Aggregator:
    settings: dict[str, Any] = {
        "model_kwargs": {"in_features": 64, "hidden": list(HIDDEN)},
        "clients_per_round": None,
        "min_clients": 3,
        "rounds": 2,
        "local_epochs": 1,
        **changes,
    }
    return Aggregator(aggregator_config(tmp_path, pki, keys, **settings))


def _clients(pki: Path, keys: Keys, digits: Dataset, agg: Aggregator, **config: Any) -> list[Any]:
    return [
        make_client(
            i,
            pki,
            keys,
            digits,
            CLIENTS,
            federation=agg.federation,
            holds_key=i in KEY_HOLDERS,
            hidden=HIDDEN,
            **config,
        )
        for i in range(CLIENTS)
    ]


class _Tree:
    """A root, its relays and clients running as tasks; `stop()` cancels what is left."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.tasks: list[asyncio.Task[Any]] = []
        self.reports: list[tuple[RoundReport, np.ndarray]] = []
        aggregator._on_round_complete = lambda r, w: self.reports.append((r, w.copy()))

    async def start_root(self) -> asyncio.Task[Any]:
        task = asyncio.create_task(self.aggregator.run())
        await asyncio.wait_for(self.aggregator.wait_started(), 30)
        return task

    async def start_relay(self, relay: Relay) -> asyncio.Task[Any]:
        task = asyncio.create_task(relay.run())
        self.tasks.append(task)
        await asyncio.wait_for(relay.wait_started(), 30)
        return task

    def start_clients(self, clients: list[Any], port: int) -> list[asyncio.Task[Any]]:
        tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in clients]
        self.tasks.extend(tasks)
        return tasks

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task


def _start_six(tree: _Tree, pki: Path, keys: Keys, digits: Dataset, relay_port: int) -> None:
    """Clients 0..5: the key holders on the root, the other four behind one relay."""
    root_port = tree.aggregator.port
    for i, client in enumerate(_clients(pki, keys, digits, tree.aggregator)[:6]):
        tree.start_clients([client], root_port if i in KEY_HOLDERS else relay_port)


def _sources(clients: list[Any], relay_ports: list[int], root_port: int) -> list[int]:
    """Key holders on the root; the others spread over the relays in turn."""
    ports = []
    others = 0
    for i in range(len(clients)):
        if i in KEY_HOLDERS:
            ports.append(root_port)
        else:
            ports.append(relay_ports[others % len(relay_ports)])
            others += 1
    return ports


@pytest.mark.slow
async def test_a_relay_tree_gives_the_flat_model(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """Root + 2 relays + 10 clients vs the same 10 clients on the root: same rounds,
    same contributors, same total weight, and global models within one quantization step
    after the first round (stochastic rounding draws fresh randomness in each run)."""
    runs: dict[str, list[tuple[RoundReport, np.ndarray]]] = {}
    for layout in ("flat", "relays"):
        # every round waits for all ten: clients warm up before they join, so they do
        # not all arrive at once, and the two layouts must select the same clients
        aggregator = _aggregator(tmp_path / layout, pki, keys, clients_per_round=CLIENTS)
        tree = _Tree(aggregator)
        root = await tree.start_root()
        try:
            clients = _clients(pki, keys, digits, aggregator)
            if layout == "flat":
                tree.start_clients(clients, aggregator.port)
            else:
                relays = [_relay(pki, i, aggregator.port) for i in range(2)]
                for relay in relays:
                    await tree.start_relay(relay)
                ports = _sources(clients, [r.port for r in relays], aggregator.port)
                for client, port in zip(clients, ports, strict=True):
                    tree.start_clients([client], port)
            checkpoint = await asyncio.wait_for(root, 240)
        finally:
            await tree.stop()
        assert checkpoint.rounds_completed == 2
        runs[layout] = tree.reports
        if layout == "relays":
            assert all(r.rounds_forwarded == 2 for r in relays)
            for record in checkpoint.history:
                assert record["relays"] == {"relay-0/edge": 4, "relay-1/edge": 4}, record

    everyone = tuple(sorted(f"client-{i}" for i in range(CLIENTS)))
    step = aggregator.codec.spec.step  # type: ignore[union-attr]
    for (flat, _), (tree_report, _) in zip(runs["flat"], runs["relays"], strict=True):
        assert flat.round_id == tree_report.round_id
        assert flat.contributors == tree_report.contributors == everyone
        assert flat.total_weight == tree_report.total_weight  # exact: an integer in the sum
    first_gap = float(np.max(np.abs(runs["flat"][0][1] - runs["relays"][0][1])))
    print(f"round 1: largest weight difference {first_gap:.3g}, quantization step {step:.3g}")
    assert 0 < first_gap <= step * 1.0001, (first_gap, step)
    final_gap = float(np.max(np.abs(runs["flat"][-1][1] - runs["relays"][-1][1])))
    assert final_gap <= 4 * step, (final_gap, step)


@pytest.mark.slow
async def test_a_dead_relay_costs_only_its_round_and_a_restarted_one_resumes(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """Round 1: relay-1 dies while its clients train and comes back on the same port:
    its clients re-send the same updates through it and every client is counted once.
    Round 2: relay-1 dies for good: once it has not come back within resume_grace the
    root stops waiting for it and completes the round by quorum from the others, without
    relay-1's clients, and nothing of them is counted."""
    aggregator = _aggregator(
        tmp_path, pki, keys, round_timeout=15.0, resume_grace=3.0, clients_per_round=CLIENTS
    )
    tree = _Tree(aggregator)
    root = await tree.start_root()
    release = {1: threading.Event(), 2: threading.Event()}

    def held(train_fn: Any) -> Any:
        def train(model: Any, config: Any) -> int:
            state = aggregator.round  # train only once this round's relay-1 was killed
            release[2 if state is None else state.round_id].wait(60)
            return int(train_fn(model, config))

        return train

    async def kill_relay_1_in(round_id: int) -> int:
        while (
            aggregator.round is None
            or aggregator.round.round_id != round_id
            or "relay-1/edge" not in aggregator.round.selected
            or relays[1]._round is None
        ):
            await asyncio.sleep(0.05)
        port = relays[1].port
        relays[1].request_stop()  # its partial sum dies with it
        await asyncio.wait_for(relay_tasks[1], 30)
        return port

    try:
        relays = [_relay(pki, i, aggregator.port) for i in range(2)]
        relay_tasks = [await tree.start_relay(relay) for relay in relays]
        ports = _sources(list(range(CLIENTS)), [r.port for r in relays], aggregator.port)
        behind_1 = {i for i, p in enumerate(ports) if p == relays[1].port}
        clients = [
            make_client(
                i,
                pki,
                keys,
                digits,
                CLIENTS,
                federation=aggregator.federation,
                holds_key=i in KEY_HOLDERS,
                hidden=HIDDEN,
                train_wrapper=held if i in behind_1 else None,
                reconnect_attempts=400,
            )
            for i in range(CLIENTS)
        ]
        for client, port in zip(clients, ports, strict=True):
            tree.start_clients([client], port)
        port = await kill_relay_1_in(1)
        relays[1] = _relay(pki, 1, aggregator.port, port=port)
        relay_tasks[1] = await tree.start_relay(relays[1])
        release[1].set()
        await kill_relay_1_in(2)
        release[2].set()
        checkpoint = await asyncio.wait_for(root, 240)
    finally:
        for event in release.values():
            event.set()
        await tree.stop()
    assert checkpoint.rounds_completed == 2
    first, second = checkpoint.history
    everyone = [f"client-{i}" for i in range(CLIENTS)]
    assert first["contributors"] == everyone
    assert first["relays"] == {"relay-0/edge": 4, "relay-1/edge": 4}
    weights = {r.round_id: r.total_weight for r, _ in tree.reports}
    assert weights[first["round_id"]] == 2 * CLIENTS  # each client's weight 2, counted once
    assert second["contributors"] == [c for i, c in enumerate(everyone) if i not in behind_1]
    assert second["relays"] == {"relay-0/edge": 4}
    assert second["relays_lost"] == ["relay-1/edge"]
    assert weights[second["round_id"]] == 2 * (CLIENTS - len(behind_1))
    # the root stopped waiting for the dead relay after resume_grace, not at the deadline
    collect = {r.round_id: r.phase_seconds["collect"] for r, _ in tree.reports}
    assert collect[second["round_id"]] < 10.0  # resume_grace 3 s; round_timeout is 15 s


@pytest.mark.slow
async def test_relays_nest_three_levels_deep(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """root <- relay-0 <- relay-1 <- clients: the root folds one contribution for them,
    counts each client, and relay-0 reports the clients relay-1 serves."""
    aggregator = _aggregator(tmp_path, pki, keys, rounds=1)
    tree = _Tree(aggregator)
    root = await tree.start_root()
    try:
        middle = _relay(pki, 0, aggregator.port)
        await tree.start_relay(middle)
        edge = _relay(pki, 1, middle.port)
        await tree.start_relay(edge)
        clients = _clients(pki, keys, digits, aggregator)[:6]
        ports = [aggregator.port if i in KEY_HOLDERS else edge.port for i in range(6)]
        for client, port in zip(clients, ports, strict=True):
            tree.start_clients([client], port)
        checkpoint = await asyncio.wait_for(root, 240)
        assert middle.rounds_forwarded == edge.rounds_forwarded == 1
    finally:
        await tree.stop()
    record = checkpoint.history[-1]
    assert record["contributors"] == [f"client-{i}" for i in range(6)]
    assert record["relays"] == {"relay-0/edge": 4}


class _DroppingRelay(Relay):
    """A deviating relay: forwards its whole sum but names one client fewer."""

    async def _collect(self, relay_round: _RelayRound) -> None:
        await super()._collect(relay_round)
        if relay_round.contributors:
            tokens = unpack_tokens(relay_round.contributors)
            relay_round.contributors = pack_tokens(tokens[1:])


@pytest.mark.slow
async def test_a_relay_cannot_pass_off_an_unnamed_update(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """The relay folds 4 clients but names 3: the unmaskers remove only the named masks,
    the leftover mask makes the sum noise, it does not decode, and nothing is released:
    the global model stays exactly the seeded one."""
    aggregator = _aggregator(tmp_path, pki, keys, rounds=1, max_failed_rounds=1)
    seeded = aggregator.checkpoint.global_weights.copy()
    tree = _Tree(aggregator)
    root = await tree.start_root()
    relay = _DroppingRelay(RelayConfig.from_mapping(_relay_settings(pki, 2, aggregator.port)))
    try:
        await tree.start_relay(relay)
        _start_six(tree, pki, keys, digits, relay.port)
        with pytest.raises(Exception, match="rounds in a row failed"):
            await asyncio.wait_for(root, 240)
    finally:
        await tree.stop()
    failed = aggregator.checkpoint.history[-1]
    assert "does not decode" in failed["failure"] or "refused" in failed["failure"], failed
    assert len(failed["contributors"]) == 5  # 2 direct + the 3 the relay named
    assert tree.reports == []
    np.testing.assert_array_equal(aggregator.checkpoint.global_weights, seeded)


async def test_the_root_refuses_what_a_relay_may_not_claim(
    tmp_path: Path, pki: Path, keys: Keys
) -> None:
    """A rogue relay over real TLS: a client named twice, tokens of another round, a
    client certificate saying it is a relay, and a client uploading other clients' tokens
    are refused and counted; nothing of theirs is folded.
    A key holder that reaches a relay is turned away (it must talk to the root)."""
    aggregator = _aggregator(tmp_path, pki, keys, rounds=1, round_timeout=60.0)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    holder = RogueClient(pki, 0)
    await holder.connect(
        aggregator.port,
        committee=holder.credential(aggregator.federation),
        key=PrivateKey.load(keys.private),
    )
    leaves = [RogueClient(pki, i) for i in (1, 2, 3)]
    for leaf in leaves:  # they never connect: the rogue relay holds their uploads
        leaf.federation, leaf.codec = aggregator.federation, aggregator.codec  # type: ignore[assignment]

    async def rogue_relay() -> tuple[RogueClient, RoundStart]:
        relay = RogueClient(pki, 0, identity="relay-0")
        await relay.connect(aggregator.port, relay="rogue")
        await relay.send(RelayStatus(clients=3))
        return relay, await relay.expect(RoundStart)

    def rejected(reason: str) -> float:
        value = aggregator.metrics.registry.get_sample_value(
            "fedcore_updates_rejected_total", {"reason": reason}
        )
        return value or 0.0

    try:
        relay, start = await rogue_relay()
        payloads = [leaf.payloads(start) for leaf in leaves]
        tokens = [leaf.token(start, p) for leaf, p in zip(leaves, payloads, strict=True)]
        before = rejected("replay")
        twice = pack_tokens([tokens[0], tokens[1], tokens[0]])
        await relay.upload(start, payloads[0], contributors=twice)
        assert await relay.error_code() == ErrorCode.REPLAY
        assert rejected("replay") == before + 1

        relay, start = await rogue_relay()  # back in the same round: asked again
        other_round = RoundStart(
            round_id=start.round_id + 1,
            weights=start.weights,
            clip=start.clip,
            value_bits=start.value_bits,
            deadline_s=1.0,
            committee=start.committee,
        )
        stale = leaves[2].token(other_round, payloads[2])
        before = rejected("bad_token")
        await relay.upload(start, payloads[0], contributors=pack_tokens([tokens[0], stale]))
        assert await relay.error_code() == ErrorCode.BAD_TOKEN
        assert rejected("bad_token") == before + 1

        while "relay-0/rogue" in aggregator.clients:  # the refused relay's goodbye
            await asyncio.sleep(0.01)
        counted = aggregator.hub.leaf_count
        posing = RogueClient(pki, 5)  # a client certificate cannot claim to be a relay
        with pytest.raises(AssertionError, match="got Error"):
            await posing.connect(aggregator.port, relay="fake")
        assert posing.received[-1].code == ErrorCode.UNKNOWN_CLIENT
        assert "not a relay's" in posing.received[-1].reason
        assert aggregator.hub.leaf_count == counted  # no client count it could inflate

        start = await holder.expect(RoundStart)
        mine = holder.payloads(start)
        await holder.upload(start, mine, contributors=pack_tokens(tokens))  # not a relay
        assert await holder.error_code() == ErrorCode.BAD_TOKEN
        assert rejected("bad_token") == before + 2

        state = aggregator.round
        assert state is not None and not state.folded  # nothing of any of it counted

        real = _relay(pki, 1, aggregator.port)
        relay_task = asyncio.create_task(real.run())
        await asyncio.wait_for(real.wait_started(), 30)
        key_holder = RogueClient(pki, 4)
        with pytest.raises(AssertionError, match="got Error"):
            await key_holder.connect(
                real.port, committee=key_holder.credential(aggregator.federation)
            )
        assert key_holder.received[-1].code == ErrorCode.BAD_TOKEN
        assert "key holders connect to the root" in key_holder.received[-1].reason
        real.request_stop()
        await asyncio.wait_for(relay_task, 30)
    finally:
        aggregator.request_stop()
        await asyncio.wait_for(task, 30)


async def test_a_plaintext_root_turns_relays_away(tmp_path: Path, pki: Path, keys: Keys) -> None:
    config = aggregator_config(tmp_path, pki, keys, model_kwargs={"in_features": 64})
    aggregator = Aggregator(config, encrypted=False)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    try:
        relay = _relay(pki, 0, aggregator.port, reconnect_attempts=0)
        with pytest.raises(FedcoreError, match="relays need an encrypted federation"):
            await asyncio.wait_for(relay.run(), 30)
    finally:
        aggregator.request_stop()
        await asyncio.wait_for(task, 30)


class _CutOnceRelay(Relay):
    """The network drops the relay's upstream connection after its 3rd chunk, once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_seqs: list[int] = []
        self._cut = False

    async def _forward(self, conn: Any, send_lock: Any, relay_round: Any, grant: Any) -> None:
        grant.add_done_callback(lambda f: self.start_seqs.append(f.result().start_seq))
        if not self._cut:
            send, sent = conn.send, []

            async def cut_after_three(message: Any) -> None:
                if isinstance(message, UpdateChunk):
                    sent.append(message.seq)
                    if len(sent) == 3:
                        self._cut = True
                        conn._abort()  # no Bye, no close_notify: a network cut
                        raise ConnectionResetError("cut")
                await send(message)

            conn.send = cut_after_three
        await super()._forward(conn, send_lock, relay_round, grant)


@pytest.mark.slow
async def test_a_relay_resumes_its_upload_after_a_network_cut(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """The relay's upstream connection drops mid-upload: it reconnects, the root grants
    from the 2 chunks it holds, the relay sends the rest, and the round counts each of
    its clients once."""
    aggregator = _aggregator(tmp_path, pki, keys, rounds=1, chunk_ciphertexts=8, resume_grace=30.0)
    tree = _Tree(aggregator)
    root = await tree.start_root()
    relay = _CutOnceRelay(RelayConfig.from_mapping(_relay_settings(pki, 0, aggregator.port)))
    try:
        await tree.start_relay(relay)
        _start_six(tree, pki, keys, digits, relay.port)
        checkpoint = await asyncio.wait_for(root, 240)
    finally:
        await tree.stop()
    assert relay.start_seqs == [0, 2]  # resumed where the root's partial upload stopped
    record = checkpoint.history[-1]
    assert record["contributors"] == [f"client-{i}" for i in range(6)]
    assert record["relays"] == {"relay-0/edge": 4}
    assert tree.reports[0][0].total_weight == 2 * 6
