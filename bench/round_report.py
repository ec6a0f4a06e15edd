"""REPORT.md's round sections, rendered from ``round.json`` and ``round-threshold.json``.

`bench.report` calls `round_section` and `round_threshold_section` for those files;
either can be called on its own with a loaded JSON (`round_section` writes its plots
into ``out``). Every figure comes from the JSON `bench.round_bench` wrote; a workload
or table the JSON lacks (an older run, or ``--workload training-heavy``) is said to be
missing, never invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import _fmt, _pct, plot_committee, plot_round_phases

__all__ = ["round_section", "round_threshold_section"]

_PHASES_NOTE = (
    "Local training and encode+encrypt are client-reported means; upload_and_wait is "
    "what is left of the aggregator's collect phase (upload, stragglers); fold and "
    "decrypt are timed by the aggregator; model_update = select + update + checkpoint."
)


def round_section(data: dict[str, Any], out: Path) -> list[str]:
    """The round section: the default workload, the training-heavy one, the packing table."""
    lines = ["## Round (`round.json`)", "", f"Command: `{data.get('command', '')}`", ""]
    if "encrypted_round_s" in data:
        lines += _default_workload(data, out)
    else:
        lines += ["Default workload (seed MLP): not run (`--workload training-heavy`).", ""]
    heavy = data.get("training_heavy")
    if isinstance(heavy, dict):
        lines += ["### Training-heavy workload", ""]
        lines += _workload_line(heavy) + _headline(heavy) + _phase_table(heavy)
    else:
        missing = "not in this JSON (an older run, or `--workload default`)"
        lines += [f"Training-heavy workload: {missing}.", ""]
    lines += _packing(data.get("packing"))
    return lines


def _workload_line(run: dict[str, Any]) -> list[str]:
    w = run.get("workload", {})
    return ["Workload: " + ", ".join(f"{k} = {v}" for k, v in w.items()), ""]


def _headline(run: dict[str, Any]) -> list[str]:
    """Round and CPU seconds, encrypted ÷ plaintext, dominant phases, bytes, ciphertexts."""
    sent = run["bytes_per_client_per_round"]
    lines = [
        f"- Encrypted round **{_fmt(run['encrypted_round_s'])} s**, plaintext "
        f"**{_fmt(run['plaintext_round_s'])} s**: encrypted ÷ plaintext = "
        f"**{_fmt(run['overhead_ratio'])}×** (CPU per round: "
        f"{_fmt(run.get('encrypted_cpu_s_per_round'))} s vs "
        f"{_fmt(run.get('plaintext_cpu_s_per_round'))} s = "
        f"{_fmt(run.get('cpu_overhead_ratio'))}×).",
        f"- Dominant phase: encrypted **{run.get('dominant_phase_encrypted')}**, "
        f"plaintext **{run.get('dominant_phase_plaintext')}**.",
        f"- Bytes per client per round: encrypted {_fmt(sent['encrypted'] / 1e6)} MB, "
        f"plaintext {_fmt(sent['plaintext'] / 1e6)} MB ({_fmt(run.get('bytes_ratio'))}×).",
    ]
    if "ciphertexts_per_update" in run:
        per_value = run.get("bytes_per_value") or {}
        lines.append(
            f"- Ciphertexts per update: {_fmt(run['ciphertexts_per_update'])} "
            f"({_fmt(per_value.get('encrypted'))} bytes per model value sent, plaintext "
            f"{_fmt(per_value.get('plaintext'))})."
        )
    steps = run.get("encrypted_client_timings") or {}
    if steps:
        pooled = steps.get("pooled_factors")
        lines.append(
            f"- Encrypted clients' encode_encrypt, mean s per update: encode "
            f"{_fmt(steps.get('encode_s'))}, mask {_fmt(steps.get('mask_s'))}, encrypt "
            f"{_fmt(steps.get('encrypt_s'))}, serialize {_fmt(steps.get('serialize_s'))}; "
            f"random factors ready in the pool: "
            f"{_pct(pooled) if isinstance(pooled, int | float) else '—'} (the rest were "
            "made on the spot)."
        )
    training = [
        _share(run[f"{mode}_phase_s"]["local_training"], run[f"{mode}_round_s"])
        for mode in ("plaintext", "encrypted")
    ]
    lines += [
        f"- Local training: {training[0]} of the plaintext round, {training[1]} of the "
        "encrypted round.",
        "",
    ]
    return lines


def _share(part: Any, whole: Any) -> str:
    if isinstance(part, int | float) and isinstance(whole, int | float) and whole > 0:
        return _pct(part / whole)
    return "—"


def _phase_table(run: dict[str, Any]) -> list[str]:
    lines = ["| phase (mean s per round) | encrypted | plaintext |", "|---|---:|---:|"]
    for phase, value in run["encrypted_phase_s"].items():
        lines.append(f"| {phase} | {_fmt(value)} | {_fmt(run['plaintext_phase_s'][phase])} |")
    return [*lines, "", _PHASES_NOTE, ""]


def _default_workload(data: dict[str, Any], out: Path) -> list[str]:
    """Today's layout: workload, headline, phases, committee scaling, checks, plots."""
    lines = _workload_line(data) + _headline(data) + _phase_table(data)
    lines += ["| committee size | decrypt phase (s) | speed-up vs 1 |", "|---:|---:|---:|"]
    speedups = data.get("decrypt_speedup_by_committee_size", {})
    for size, seconds in sorted(
        data.get("decrypt_s_by_committee_size", {}).items(), key=lambda kv: int(kv[0])
    ):
        lines.append(f"| {size} | {_fmt(seconds)} | {_fmt(speedups.get(size))} |")
    lines += ["", str(data.get("decrypt_scaling_note", "")) + ".", ""]
    cores = data.get("machine", {}).get("cpu_count")
    beyond = {k: v for k, v in speedups.items() if cores and int(k) > cores}
    if beyond and max(beyond.values()) > cores:
        lines += [
            f"Here the speed-up passes the {cores} cores the machine has: the extra member "
            "processes took CPU from the other work sharing the cores, not from idle cores.",
            "",
        ]
    lines += _round_checks(data)
    for name, plot in (("round-phases.png", plot_round_phases), ("committee.png", plot_committee)):
        plot(data, out / name)
        lines.append(f"![{name}]({name})")
    lines.append("")
    return lines


def _packing(table: Any) -> list[str]:
    """Ciphertexts per update and bytes per value at each value width and round size."""
    if not isinstance(table, dict) or not table.get("rows"):
        return ["Packing table: not in this JSON.", ""]
    lines = [
        f"### Packing: {table.get('key_bits')}-bit key, {_fmt(table.get('parameters'))} "
        "values per update (seed MLP)",
        "",
        "| value bits | clients per round | headroom bits | slot bits | values per ciphertext "
        "| ciphertexts per update | bytes per value |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["rows"]:
        cells = (
            row.get("value_bits"),
            row.get("clients_per_round"),
            row.get("headroom_bits"),
            row.get("slot_bits"),
            row.get("values_per_ciphertext"),
            row.get("ciphertexts_per_update"),
            row.get("bytes_per_value"),
        )
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if table.get("note"):
        lines += ["", str(table["note"]) + "."]
    lines.append("")
    return lines


# round.json privacy_checks keys: (label, key); a missing key skips the row.
_ROUND_CHECKS = (
    ("unmask, per round (members' seconds, all shards)", "unmask_s_per_round"),
    ("decrypt, per round (members' seconds, all shards)", "member_decrypt_s_per_round"),
    ("aggregator decrypt phase, per round (both overlap)", "decrypt_phase_s_per_round"),
    ("aggregator token checks, per round", "aggregator_token_check_s_per_round"),
    ("aggregator token check, per token", "aggregator_token_check_s_per_token"),
    ("client masking, per update", "client_mask_s_per_update"),
)


def _round_checks(data: dict[str, Any]) -> list[str]:
    """The per-round cost of protocol 3's checks, when the JSON has it."""
    checks = data.get("privacy_checks")
    if not isinstance(checks, dict):
        return []
    lines = ["| privacy check (encrypted run) | s |", "|---|---:|"]
    for label, key in _ROUND_CHECKS:
        if key in checks:
            lines.append(f"| {label} | {_fmt(checks[key])} |")
    ratio = checks.get("unmask_vs_member_decrypt")
    if isinstance(ratio, int | float):
        lines += ["", f"Unmasking costs {_fmt(ratio)}x the members' decryption seconds."]
    note = data.get("privacy_checks_note")
    if note:
        lines += ["", str(note) + "."]
    lines.append("")
    return lines


def round_threshold_section(data: dict[str, Any]) -> list[str]:
    """`bench round --key-mode threshold`: decryption under a T-of-N key vs a shared key."""
    w = data.get("workload", {})
    lines = [
        "## Round, threshold key (`round-threshold.json`)",
        "",
        f"Command: `{data.get('command', '')}`",
        "",
        "Workload: " + ", ".join(f"{k} = {v}" for k, v in w.items()),
        "",
        f"{data.get('threshold')}-of-{data.get('parties')} key dealt in "
        f"{_fmt(data.get('deal_s'))} s; {_fmt(data.get('ciphertexts_per_update'))} "
        "ciphertexts per update. Both runs: the same clients, data and seeds; every key "
        "holder on the committee.",
        "",
        "| mean per round | threshold | shared | threshold ÷ shared |",
        "|---|---:|---:|---:|",
        f"| round (s) | {_fmt(data.get('threshold_round_s'))} | "
        f"{_fmt(data.get('shared_round_s'))} | {_fmt(data.get('round_threshold_over_shared'))} |",
        f"| decrypt phase (s) | {_fmt(data.get('threshold_decrypt_s'))} | "
        f"{_fmt(data.get('shared_decrypt_s'))} | "
        f"{_fmt(data.get('decrypt_threshold_over_shared'))} |",
        f"| a member's decrypt seconds, mean (s) | "
        f"{_fmt(data.get('threshold_member_decrypt_s_mean'))} | "
        f"{_fmt(data.get('shared_member_decrypt_s_mean'))} | "
        f"{_fmt(data.get('member_decrypt_threshold_over_shared'))} |",
        f"| member answers per round | "
        f"{_fmt(data.get('threshold_member_answers_per_round'))} | "
        f"{_fmt(data.get('shared_member_answers_per_round'))} | |",
        f"| final accuracy | {_pct(data.get('threshold_final_accuracy'))} | "
        f"{_pct(data.get('shared_final_accuracy'))} | |",
    ]
    for mode in ("threshold", "shared"):
        run = data.get(f"{mode}_run", {})
        cpu = run.get("cpu_s_per_round") if isinstance(run, dict) else None
        if cpu is not None:
            lines.append(
                f"| CPU seconds, all processes ({mode}) | {_fmt(cpu)} | | |"
                if mode == "threshold"
                else f"| CPU seconds, all processes ({mode}) | | {_fmt(cpu)} | |"
            )
    lines += [
        "",
        "A member's seconds are wall-clock as it reports them; here every member is a "
        "process on this machine's shared cores, so they include waiting for a core. "
        "A partial decryption costs about 7x a CRT decryption (see "
        "the micro section) and each ciphertext needs T of them.",
        "",
    ]
    return lines
