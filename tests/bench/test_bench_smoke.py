"""Smoke tests of the bench suite: each benchmark runs at a tiny size and writes sane JSON.

Tiny keys (512 bits, a hidden flag), 2 clients, 1 round, a few dozen samples: these
check that the benchmarks run end to end and produce their keys, not what they measure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import main as bench_main
from bench.packing_table import SEED_MLP_PARAMETERS
from bench.report import micro_checks, micro_costs, micro_series, run_all, write_report
from bench.round_report import round_section
from bench.round_workloads import PHASES
from fedcore.aggregator.committee import PIPELINE
from fedcore.model import mlp

TINY = ["--clients", "2", "--rounds", "1", "--samples-per-client", "32", "--key-bits", "512"]
CIPHERTEXT_BYTES = 2 * 512 // 8  # a ciphertext is an integer mod n², n of 512 bits


def _run(argv: list[str], out: Path) -> dict[str, Any]:
    assert bench_main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data, dict)
    return data


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results directory with tiny round (both workloads) and accuracy runs in it."""
    out = tmp_path_factory.mktemp("results")
    _run(
        [
            "round",
            "--dataset",
            "digits",
            *TINY,
            "--in-process",
            "--committee-size",
            "1",
            "--committee-sizes",
            "1,2",
            "--heavy-epochs",
            "1",
        ],
        out / "round.json",
    )
    _run(
        ["accuracy", "--dataset", "digits", *TINY, "--no-progress", "--plot", str(out / "a.png")],
        out / "accuracy-digits.json",
    )
    return out


def test_round_benchmark_reports_times_phases_bytes_and_committee_scaling(results: Path) -> None:
    data = json.loads((results / "round.json").read_text())
    assert data["workload"]["clients"] == 2
    assert data["workload"]["key_bits"] == 512
    for key in ("encrypted_round_s", "plaintext_round_s", "overhead_ratio"):
        assert _positive(data[key]), key
    for mode in ("encrypted", "plaintext"):
        phases = data[f"{mode}_phase_s"]
        assert set(phases) >= {"local_training", "encode_encrypt", "fold", "decrypt"}
        assert all(v >= 0 for v in phases.values())
        assert _positive(data["bytes_per_client_per_round"][mode])
        assert _positive(data[f"{mode}_cpu_s_per_round"])
    # each client sent exactly its update: the codec's ciphertexts, or its float32 slots
    ciphertexts = data["ciphertexts_per_update"]
    assert isinstance(ciphertexts, int) and ciphertexts > 0
    sent = data["bytes_per_client_per_round"]
    assert sent["encrypted"] == ciphertexts * CIPHERTEXT_BYTES
    assert sent["plaintext"] == 4 * data["plaintext"]["federation"]["items_per_update"]
    assert data["workload"]["value_bits"] == data["workload"]["federation"]["value_bits"]
    assert data["encrypted_phase_s"]["decrypt"] > data["plaintext_phase_s"]["decrypt"]
    assert set(data["decrypt_s_by_committee_size"]) == {"1", "2"}
    assert all(_positive(v) for v in data["decrypt_s_by_committee_size"].values())


def test_round_benchmark_reports_what_the_privacy_checks_cost(results: Path) -> None:
    checks = json.loads((results / "round.json").read_text())["privacy_checks"]
    # fedcore's own figures: one unmasker served every shard, both contributors masked
    assert checks["shards_unmasked"] >= 1 and checks["shards_decrypted"] >= 1
    assert checks["requests_refused"] == 0
    assert checks["updates_masked"] == 2
    for key in (
        "unmask_s_per_round",
        "member_decrypt_s_per_round",
        "aggregator_token_check_s_per_round",
        "aggregator_token_check_s_per_token",
        "client_mask_s_per_update",
        "unmask_vs_member_decrypt",
    ):
        assert _positive(checks[key]), key


def test_micro_benchmark_reports_each_privacy_check(tmp_path: Path) -> None:
    argv = ["micro", "--key-bits", "512", "--values", "2000", "--phe-sample", "4"]
    argv += ["--repeats", "1", "--decrypt-workers", "1", "--encrypt-sample", "8"]
    data = _run([*argv, "--contributors", "3,5"], tmp_path / "micro.json")
    assert data["encrypt_exponent_bits_before"] == 224
    assert data["encrypt_exponent_bits_after"] == 256  # ceil(512 / 2)
    for key in (
        "encrypt_s_per_ciphertext_before",
        "encrypt_s_per_ciphertext_after",
        "pool_encrypt_s_per_ciphertext",
        "decrypt_s_per_ciphertext_before",
        "decrypt_s_per_ciphertext_after",
        "client_mask_s_per_value",
        "unmask_mask_sum_add_s_per_contributor_per_ciphertext",
        "token_verify_cold_s",
        "committee_credential_verify_cold_s",
        "check_modulus_s",
        "committee_unmask_s_at_3",
        "committee_unmask_s_at_5",
        "aggregator_token_checks_cold_s_at_5",
        "deal_s",
        "shard_ciphertexts",
        "crt_decrypt_s_per_ct",
        "partial_decrypt_s_per_ct",
        "partial_exponentiation_s_per_ct",
        "partial_vs_crt_ratio",
        "partial_with_proof_vs_crt_ratio",
        "proof_s_per_member_round",
        "combine_s_per_ct",
        "verify_s_per_ct",
    ):
        assert _positive(data[key]), key
    assert (data["threshold"], data["parties"]) == (3, 5)
    assert data["committee_at_scale"]["5"]["contributors"] == 5
    text = "\n".join(micro_checks(data))
    assert "verify a token, cold CA cache" in text and "| 5 |" in text


def test_accuracy_benchmark_reports_accuracies_in_unit_interval(results: Path) -> None:
    data = json.loads((results / "accuracy-digits.json").read_text())
    assert 0.0 <= data["encrypted_accuracy"] <= 1.0
    assert 0.0 <= data["plaintext_accuracy"] <= 1.0
    rows = {(row["split"], row["mode"]) for row in data["table"]}
    assert rows == {
        (split, mode)
        for split in ("iid", "dirichlet")
        for mode in ("plaintext", "encrypted-16bit", "encrypted-8bit")
    }
    for row in data["table"]:
        assert len(row["accuracy_per_round"]) == 1
        assert 0.0 <= row["final_accuracy"] <= 1.0
        assert _positive(row["round_s_mean"])
    assert (results / "a.png").stat().st_size > 0


def test_report_is_built_from_the_json_files(results: Path) -> None:
    micro = {
        "command": "python -m bench micro --quick",
        "key_bits": 512,
        "phe_encrypt_s_per_value": 1e-3,
        "packed_encrypt_s_per_value": 1e-5,
        "fold_s_per_value": 1e-8,
        "mulmod_s": 1e-6,
        "phe_decrypt_s_per_value": 1e-3,
        "decrypt_s_per_value": 1e-5,
        "bytes_per_value": 4.0,
    }
    (results / "micro.json").write_text(json.dumps(micro))
    report = write_report(results)
    text = report.read_text()
    assert "## Round" in text and "## Accuracy, digits" in text and "## Micro" in text
    assert "privacy check (encrypted run)" in text
    for png in ("round-phases.png", "committee.png", "accuracy-digits.png", "micro-costs.png"):
        assert (results / png).stat().st_size > 0, png
        assert f"({png})" in text


def test_micro_series_puts_every_key_size_pool_and_tenseal_side_by_side(results: Path) -> None:
    small = {
        "key_bits": 2048,
        "phe_encrypt_s_per_value": 1e-2,
        "packed_encrypt_s_per_value": 3e-6,
        "pool_encrypt_s_per_value": 2e-7,
        "tenseal_encrypt_s_per_value": 1e-6,
        "bytes_per_value": 6.6,
        "tenseal_bytes_per_value": 81.0,
    }
    large = {"key_bits": 3072, "packed_encrypt_s_per_value": 5e-6, "bytes_per_value": 6.4}
    series = dict(micro_series(small, [large]))
    assert series["encrypt (s)"] == {
        "phe 2048": 1e-2,
        "packed 2048": 3e-6,
        "packed 3072": 5e-6,
        "pooled": 2e-7,
        "TenSEAL CKKS": 1e-6,
    }
    assert series["bytes"] == {
        "phe 2048": 512.0,
        "packed 2048": 6.6,
        "packed 3072": 6.4,
        "TenSEAL CKKS": 81.0,
    }
    (results / "micro.json").write_text(json.dumps(small))
    (results / "micro-3072.json").write_text(json.dumps(large))
    text = write_report(results).read_text()
    assert "## Micro, 2048-bit key (`micro.json`)" in text
    assert "## Micro, 3072-bit key (`micro-3072.json`)" in text
    assert text.count("(micro-costs.png)") == 1


def test_micro_costs_skips_what_the_json_lacks() -> None:
    assert micro_costs({}) == []
    rows = micro_costs({"key_bits": 2048, "bytes_per_value": 6.6})
    assert rows == [("bytes", 512.0, 6.6)]


def test_all_runs_every_registered_benchmark_then_reports(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def fake(argv: list[str]) -> int:
        ran.append(argv)
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"command": "x", "n": 1.0}))
        return 0

    report = run_all(quick=True, results=tmp_path, run_one=fake)
    names = {argv[0] for argv in ran}
    assert {"round", "accuracy"} <= names
    assert ["micro", "--key-bits", "3072", "--quick"] in [argv[:4] for argv in ran]
    assert all("--quick" in argv for argv in ran)
    assert report.exists() and "python -m bench round --quick" in report.read_text()


def test_round_benchmark_compares_threshold_with_shared_decryption(tmp_path: Path) -> None:
    argv = ["round", "--dataset", "digits", *TINY, "--in-process"]
    argv += ["--key-mode", "threshold", "--threshold", "2", "--parties", "3"]
    data = _run(argv, tmp_path / "round-threshold.json")
    assert data["clients"] == data["workload"]["clients"] == 3  # raised from 2 to N
    assert (data["threshold"], data["parties"]) == (2, 3)
    assert (data["threshold_mode"], data["shared_mode"]) == ("threshold", "shared")
    for key in ("deal_s", "threshold_decrypt_s", "shared_decrypt_s"):
        assert _positive(data[key]), key
    assert _positive(data["decrypt_threshold_over_shared"])
    for mode in ("threshold", "shared"):
        members = data[f"{mode}_run"]["members"]
        assert set(members["member_decrypt_s_per_round"]) == {f"client-{i}" for i in range(3)}
        assert all(_positive(v) for v in members["member_decrypt_s_per_round"].values())
        assert members["member_decrypt_s_max"] >= members["member_decrypt_s_mean"] > 0
        assert 0.0 <= members["final_accuracy"] <= 1.0
    # each shard: one member's answer with a shared key, T members' with a threshold key;
    # a shared-key member gets PIPELINE shards (one in flight while it works on another)
    shards = data["threshold_shards_per_round"]
    shared = data["shared_shards_per_round"]
    assert shards >= 1 and shared == PIPELINE * shards
    assert data["threshold_member_answers_per_round"] == 2 * shards
    assert data["shared_member_answers_per_round"] == shared


def test_committee_checks_benchmark_measures_and_checks_the_answers(tmp_path: Path) -> None:
    data = _run(
        ["committee-checks", "--quick", "--key-bits", "512", "--repeats", "1"],
        tmp_path / "committee.json",
    )
    assert data["shard_ciphertexts"] == 100
    for key in (
        "decrypt_ms_per_ct",
        "decrypt_with_randomness_ms_per_ct",
        "batched_check_ms_per_ct",
        "separate_check_ms_per_ct",
        "key_proof_ms",
        "key_proof_check_ms",
    ):
        assert _positive(data[key]), key


def test_round_benchmark_reports_a_training_heavy_workload(results: Path) -> None:
    data = json.loads((results / "round.json").read_text())
    assert data["workloads"] == ["default", "training-heavy"]
    heavy = data["training_heavy"]
    assert heavy["workload"]["model_factory"] == "fedcore.model:cnn"
    assert heavy["workload"]["parameters"] == 22_602  # the CNN on 8x8 digits
    assert heavy["workload"]["local_epochs"] == data["workload"]["local_epochs"] == 1
    assert heavy["workload"]["clients"] == data["workload"]["clients"] == 2
    for key in (
        "encrypted_round_s",
        "plaintext_round_s",
        "overhead_ratio",
        "encrypted_cpu_s_per_round",
        "plaintext_cpu_s_per_round",
        "cpu_overhead_ratio",
        "bytes_ratio",
    ):
        assert _positive(heavy[key]), key
    for mode in ("encrypted", "plaintext"):
        assert set(heavy[f"{mode}_phase_s"]) == set(PHASES)
        assert heavy[f"{mode}_phase_s"]["local_training"] > 0
    # a CNN update is smaller than the MLP's, so it packs into fewer ciphertexts
    ciphertexts = heavy["ciphertexts_per_update"]
    assert isinstance(ciphertexts, int) and 0 < ciphertexts < data["ciphertexts_per_update"]
    assert heavy["bytes_per_client_per_round"]["encrypted"] == ciphertexts * CIPHERTEXT_BYTES
    assert heavy["bytes_per_value"]["encrypted"] == pytest.approx(
        ciphertexts * CIPHERTEXT_BYTES / 22_602
    )


def test_round_benchmark_tabulates_packing_at_10_and_1000_clients(results: Path) -> None:
    packing = json.loads((results / "round.json").read_text())["packing"]
    assert packing["key_bits"] == 512  # the run's key size
    assert (
        packing["parameters"] == SEED_MLP_PARAMETERS == sum(p.numel() for p in mlp().parameters())
    )
    rows = {(row["value_bits"], row["clients_per_round"]): row for row in packing["rows"]}
    assert set(rows) == {(16, 10), (16, 1000), (8, 10), (8, 1000)} and len(packing["rows"]) == 4
    for clients, headroom in ((10, 10), (1000, 16)):  # ceil(log2(clients x max_weight 64))
        wide, narrow = rows[(16, clients)], rows[(8, clients)]
        assert wide["headroom_bits"] == narrow["headroom_bits"] == headroom
        assert wide["slot_bits"] == 16 + headroom and narrow["slot_bits"] == 8 + headroom
        assert narrow["ciphertexts_per_update"] < wide["ciphertexts_per_update"]
    for row in packing["rows"]:
        assert row["bytes_per_value"] == pytest.approx(
            CIPHERTEXT_BYTES * row["ciphertexts_per_update"] / SEED_MLP_PARAMETERS
        )
    # more clients need more headroom per slot, so more ciphertexts
    assert rows[(16, 1000)]["ciphertexts_per_update"] > rows[(16, 10)]["ciphertexts_per_update"]


def test_round_section_renders_both_workloads_and_the_packing_table(
    results: Path, tmp_path: Path
) -> None:
    data = json.loads((results / "round.json").read_text())
    text = "\n".join(round_section(data, tmp_path))
    assert text.startswith("## Round (`round.json`)")
    assert text.count("| phase (mean s per round) | encrypted | plaintext |") == 2
    heavy = text[text.index("### Training-heavy workload") :]
    assert f"Ciphertexts per update: {data['training_heavy']['ciphertexts_per_update']} " in heavy
    assert "| committee size |" not in heavy  # committee scaling: default workload only
    assert "| 16 | 10 | 10 | 26 |" in heavy and "| 8 | 1000 | 16 | 24 |" in heavy
    assert (tmp_path / "round-phases.png").stat().st_size > 0


def test_round_benchmark_runs_the_training_heavy_workload_alone(tmp_path: Path) -> None:
    argv = ["round", "--dataset", "digits", *TINY, "--in-process", "--committee-size", "1"]
    argv += ["--workload", "training-heavy", "--heavy-epochs", "2"]
    data = _run(argv, tmp_path / "round-heavy.json")
    assert data["workloads"] == ["training-heavy"]
    assert "encrypted_round_s" not in data and "decrypt_s_by_committee_size" not in data
    assert data["training_heavy"]["workload"]["local_epochs"] == 2
    assert _positive(data["training_heavy"]["overhead_ratio"])
    text = "\n".join(round_section(data, tmp_path))
    assert "Default workload (seed MLP): not run" in text
    assert "### Training-heavy workload" in text and "### Packing" in text
