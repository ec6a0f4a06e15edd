"""Smoke test of the scale benchmark: a real daemon, 4 real TLS clients, one round.

A 512-bit key (the hidden smoke-test flag), a 16-32-10 MLP and two load processes:
this checks that the benchmark drives the whole data path and reports its figures,
not what it measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main

TINY = ["--key-bits", "512", "--model-kwargs", '{"in_features": 16, "hidden": [32]}']


@pytest.mark.timeout(120)
def test_scale_benchmark_folds_every_client_and_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = ["scale", "--clients", "4", "--curve", "", *TINY, "--loadgen-procs", "2"]
    assert bench_main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())

    assert data["clients"] == 4
    assert data["params"] == 16 * 32 + 32 + 32 * 10 + 10
    assert data["updates_folded"] == 4, data.get("aggregator_log_tail")
    assert data["targets"]["all_folded"] is True
    # The round really summed four copies of the update: seed + mean == seed + update.
    assert data["model_update_ok"] is True
    assert data["round_seconds"] > 0
    assert data["aggregator_peak_rss_mb"] > 0
    assert data["aggregator_cpu_s"] > 0
    assert data["aggregator_exit_code"] == 0
    assert data["bytes_received"] >= 4 * data["bytes_per_update"]
    assert data["connect_seconds"] >= 0
    assert data["handshake_failures"] == 0
    loadgen = data["runs"][0]["loadgen"]
    assert loadgen["acked"] == 4
    assert loadgen["tokens_signed"] == 4
    assert loadgen["federation_mismatches"] == 0 and loadgen["credential_failures"] == 0
    # the key holders' CommitteeMember checked the tokens and did both jobs
    assert loadgen["shards_decrypted"] >= 1
    assert loadgen["shards_unmasked"] >= 1
    assert loadgen["requests_refused"] == 0, loadgen["refusals"]
    assert loadgen["byes"] == {"federation complete": 4}
    assert [point["clients"] for point in data["curve"]] == [4]


@pytest.mark.timeout(120)
def test_scale_benchmark_with_per_client_masks_decodes_the_sum(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = ["scale", "--clients", "3", "--curve", "", *TINY, "--per-client-masks"]
    assert bench_main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())

    assert data["updates_folded"] == 3, data.get("aggregator_log_tail")
    assert data["model_update_ok"] is True  # three different masks, all removed
    assert data["runs"][0]["loadgen"]["masked_uploads"] == 3


@pytest.mark.timeout(180)
def test_scale_benchmark_through_relays_counts_every_leaf(tmp_path: Path) -> None:
    """12 clients, 2 relay processes: the 2 key holders upload to the root, 10 clients
    through the relays; then a flat run of 4 clients. The root folds 2 relay sums + 2
    direct updates; its round record counts all 12 clients."""
    out = tmp_path / "scale-relays.json"
    argv = ["scale", "--clients", "12", "--relays", "2", "--flat-clients", "4", *TINY]
    assert bench_main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())

    assert data["relays"] == 2
    assert data["leaf_updates_folded"] == 12, data.get("aggregator_log_tail")
    assert data["committee_members_direct"] == 2 and data["direct_contributors"] == 2
    assert data["root_updates_folded"] == 2 + 2  # the relays' sums + the key holders' own
    assert data["root_updates_folded_from_record"] == 4
    assert data["model_update_ok"] is True  # relayed sums decode like direct updates
    assert data["round_seconds"] > 0
    assert data["root_peak_rss_mb"] > 0 and data["relay_peak_rss_mb"] > 0
    relays = data["per_relay"]
    assert [r["relay_id"] for r in relays] == ["relay-0/edge-0", "relay-1/edge-1"]
    assert [r["clients_in_root_record"] for r in relays] == [5, 5]
    assert [r["updates_folded"] for r in relays] == [5, 5]
    assert [r["clients_joined_log"] for r in relays] == [5, 5]
    for relay in relays:
        assert relay["exit_code"] == 0, relay.get("log_tail")
        assert relay["cpu_s"] > 0 and relay["collect_seconds"] >= 0
        assert relay["round_start_to_forward_s"] >= 0 and relay["forward_to_accepted_s"] >= 0
    loadgen = data["runs"][0]["loadgen"]
    assert loadgen["acked"] == 12 and loadgen["handshake_failures"] == 0
    assert loadgen["byes"] == {"federation complete": 12}
    # the flat comparison run, same invocation
    assert data["flat"]["clients"] == 4 and data["flat"]["updates_folded"] == 4
    assert data["flat_round_seconds"] > 0
    estimate = data["extrapolation"]
    assert "NOT a measurement" in estimate["is"]
    assert estimate["relays"] == 10 and estimate["clients"] == 50
    low, high = estimate["round_seconds"]
    assert 0 < low <= high
