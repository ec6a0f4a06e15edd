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
