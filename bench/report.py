"""`python -m bench all`: run every benchmark, then write REPORT.md and the PNG plots.

Each benchmark writes ``bench/results/<name>.json`` (accuracy: one file per dataset);
the report is rebuilt from those files alone (``--report-only`` skips the runs), so a
figure in REPORT.md always comes from a JSON next to it. Plots use matplotlib's Agg
backend. A missing or failed benchmark is reported as missing, never invented.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RESULTS",
    "plot_accuracy",
    "plot_committee",
    "plot_micro_costs",
    "plot_round_phases",
    "run_all",
    "write_report",
]

log = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("bench/results")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- plots
def plot_accuracy(result: dict[str, Any], path: Path) -> Path:
    """Test accuracy per round, one panel per split, one line per mode."""
    plt = _pyplot()
    table = result.get("table", [])
    splits = list(dict.fromkeys(row["split"] for row in table))  # run order: iid first
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(6 * max(1, len(splits)), 4))
    axes = list(axes) if len(splits) > 1 else [axes]
    styles = {"plaintext": "-", "encrypted-16bit": "--", "encrypted-8bit": ":"}
    for ax, split in zip(axes, splits, strict=False):
        for row in table:
            if row["split"] != split:
                continue
            acc = [100 * a for a in row["accuracy_per_round"]]
            ax.plot(
                range(1, len(acc) + 1),
                acc,
                styles.get(row["mode"], "-"),
                marker="o",
                markersize=3,
                label=row["mode"],
            )
        target = result.get("target_accuracy")
        if target:
            ax.axhline(100 * target, color="grey", linewidth=0.8, label=f"target {100 * target:g}%")
        ax.set_title(f"{result.get('dataset', '')} — {split}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_round_phases(result: dict[str, Any], path: Path) -> Path:
    """Stacked bars: mean seconds per phase of a round, encrypted vs plaintext."""
    plt = _pyplot()
    enc, plain = result["encrypted_phase_s"], result["plaintext_phase_s"]
    phases = list(enc)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottoms = [0.0, 0.0]
    for phase in phases:
        values = [enc[phase], plain[phase]]
        ax.bar(["encrypted", "plaintext"], values, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_ylabel("seconds per round (mean)")
    ratio = result.get("overhead_ratio")
    ax.set_title(f"Round time by phase (encrypted ÷ plaintext = {ratio:.2f}×)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_committee(result: dict[str, Any], path: Path) -> Path:
    """Decrypt-phase seconds against committee size."""
    plt = _pyplot()
    data = result.get("decrypt_s_by_committee_size", {})
    sizes = sorted(data, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([int(s) for s in sizes], [data[s] for s in sizes], marker="o")
    ax.set_xlabel("committee size (decrypting clients)")
    ax.set_ylabel("decrypt phase (s)")
    ax.set_xticks([int(s) for s in sizes])
    ax.set_title("Committee decryption, one seed-MLP sum")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# micro.json key pairs: (label, phe key, packed key); a missing key skips the bar.
_MICRO_COSTS = (
    ("encrypt (s)", "phe_encrypt_s_per_value", "packed_encrypt_s_per_value"),
    ("fold (s)", "phe_add_s_per_value", "fold_s_per_value"),
    ("decrypt (s)", "phe_decrypt_s_per_value", "decrypt_s_per_value"),
    ("bytes", "phe_bytes_per_value", "bytes_per_value"),
)


def micro_costs(micro: dict[str, Any]) -> list[tuple[str, float | None, float]]:
    """(label, phe per value or None, packed per value) for each cost the JSON has.

    phe's fold and size are not always measured; one phe ciphertext per value makes
    its size ``ciphertext bytes`` (2 x key bits / 8) when the JSON names the key size.
    """
    rows: list[tuple[str, float | None, float]] = []
    for label, phe_key, packed_key in _MICRO_COSTS:
        packed = micro.get(packed_key)
        if not isinstance(packed, int | float):
            continue
        phe = micro.get(phe_key)
        if phe is None and label == "bytes" and isinstance(micro.get("key_bits"), int):
            phe = 2 * micro["key_bits"] / 8
        if phe is None and label == "fold (s)" and isinstance(micro.get("mulmod_s"), int | float):
            phe = micro["mulmod_s"]  # one multiplication mod n^2 per value, unpacked
        rows.append((label, float(phe) if isinstance(phe, int | float) else None, float(packed)))
    return rows


def micro_series(
    micro: dict[str, Any], larger_keys: list[dict[str, Any]] | None = None
) -> list[tuple[str, dict[str, float]]]:
    """(cost label, {series: per-value figure}) for the plot, from what the JSONs have.

    Series: phe (one value per ciphertext), fedcore packed at this key size and at each
    larger key size given, fedcore pooled (online encryption with a ready pool) and
    TenSEAL CKKS (encryption and size, when it was installed for the run).
    """
    bits = micro.get("key_bits", "?")
    extra = {"encrypt (s)": "pool_encrypt_s_per_value"}
    tenseal = {"encrypt (s)": "tenseal_encrypt_s_per_value", "bytes": "tenseal_bytes_per_value"}
    out: list[tuple[str, dict[str, float]]] = []
    for label, phe, packed in micro_costs(micro):
        bars: dict[str, float] = {}
        if phe is not None:
            bars[f"phe {bits}"] = phe
        bars[f"packed {bits}"] = packed
        for other in larger_keys or []:
            for other_label, _, other_packed in micro_costs(other):
                if other_label == label:
                    bars[f"packed {other.get('key_bits', '?')}"] = other_packed
        for name, table in (("pooled", extra), ("TenSEAL CKKS", tenseal)):
            value = micro.get(table.get(label, ""))
            if isinstance(value, int | float) and value > 0:
                bars[name] = float(value)
        out.append((label, bars))
    return out


_SERIES_COLORS = {"phe": "tab:red", "pooled": "tab:olive", "TenSEAL": "tab:blue"}


def plot_micro_costs(
    micro: dict[str, Any], path: Path, larger_keys: list[dict[str, Any]] | None = None
) -> Path | None:
    """Log-scale bars of cost per value: phe, fedcore packed (each key size), pooled, TenSEAL."""
    rows = micro_series(micro, larger_keys)
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.8))
    axes = list(axes) if len(rows) > 1 else [axes]
    for ax, (label, bars) in zip(axes, rows, strict=True):
        names = list(bars)
        ax.bar(
            names,
            [bars[n] for n in names],
            color=[_SERIES_COLORS.get(n.split()[0], "tab:green") for n in names],
        )
        ax.set_yscale("log")
        ax.set_title(f"{label} per value")
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.suptitle("Cost per value (log scale; phe: one value per ciphertext)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- report
def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "—" if value is None else str(value)


def _verdict(met: Any) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "—"


# micro.json privacy-check keys: (label, before key or None, after key); seconds.
_MICRO_CHECKS = (
    (
        "encrypt, per ciphertext (224-bit → ceil(k/2)-bit exponent)",
        "encrypt_s_per_ciphertext_before",
        "encrypt_s_per_ciphertext_after",
    ),
    ("encrypt, per value", "encrypt_s_per_value_before", "encrypt_s_per_value_after"),
    ("encrypt with a ready pool, per ciphertext", None, "pool_encrypt_s_per_ciphertext"),
    (
        "decrypt, per ciphertext (Z*_{n²} check added)",
        "decrypt_s_per_ciphertext_before",
        "decrypt_s_per_ciphertext_after",
    ),
    ("client masking, per ciphertext", None, "client_mask_s_per_ciphertext"),
    ("client masking, per value", None, "client_mask_s_per_value"),
    (
        "unmasker mask sum, per contributor per ciphertext",
        None,
        "unmask_mask_sum_add_s_per_contributor_per_ciphertext",
    ),
    ("unmasker mask key, per contributor", None, "unmask_key_s_per_contributor"),
    ("removing the masks, per ciphertext", None, "remove_masks_s_per_ciphertext"),
    ("sign a contributor token", None, "token_sign_s"),
    ("verify a token, cold CA cache", None, "token_verify_cold_s"),
    ("verify a token, cached certificate", None, "token_verify_warm_s"),
    ("verify a committee credential, cold", None, "committee_credential_verify_cold_s"),
    ("check_modulus", None, "check_modulus_s"),
)


def micro_checks(data: dict[str, Any]) -> list[str]:
    """Protocol 3's checks, each alone, and the committee at 10 and 1,000 tokens."""
    rows = [row for row in _MICRO_CHECKS if row[2] in data]
    if not rows:
        return []
    lines = ["", "| privacy check (s) | before | after |", "|---|---:|---:|"]
    for label, before, after in rows:
        lines.append(
            f"| {label} | {_fmt(data.get(before) if before else None)} | {_fmt(data[after])} |"
        )
    scale = data.get("committee_at_scale")
    if isinstance(scale, dict):
        lines += [
            "",
            "| contributors | ciphertexts | committee token-set check (s) | mask sums (s) "
            "| unmask total (s) | aggregator token checks, cold / warm (s) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for key, row in scale.items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"| {key} | {_fmt(row.get('ciphertexts'))} | "
                f"{_fmt(row.get('committee_verify_s'))} | "
                f"{_fmt(row.get('committee_mask_sums_s'))} | "
                f"{_fmt(row.get('committee_unmask_s'))} | "
                f"{_fmt(row.get('aggregator_token_checks_cold_s'))} / "
                f"{_fmt(row.get('aggregator_token_checks_warm_s'))} |"
            )
    return lines


def micro_threshold(data: dict[str, Any]) -> list[str]:
    """Threshold decryption's costs per ciphertext next to a CRT decryption, if measured."""
    if "partial_decrypt_s_per_ct" not in data:
        return []
    return [
        "",
        f"Threshold key ({data.get('threshold')}-of-{data.get('parties')}, dealt in "
        f"{_fmt(data.get('deal_s'))} s), {_fmt(data.get('shard_ciphertexts'))} ciphertexts:",
        "",
        "| per ciphertext (s) | value | vs CRT decryption |",
        "|---|---:|---:|",
        f"| CRT decryption (shared mode) | {_fmt(data.get('crt_decrypt_s_per_ct'))} | 1 |",
        f"| partial decryption, exponentiation | "
        f"{_fmt(data.get('partial_exponentiation_s_per_ct'))} | "
        f"{_fmt(data.get('partial_vs_crt_ratio'))} |",
        f"| partial decryption with its proof | {_fmt(data.get('partial_decrypt_s_per_ct'))} | "
        f"{_fmt(data.get('partial_with_proof_vs_crt_ratio'))} |",
        f"| combine T partials | {_fmt(data.get('combine_s_per_ct'))} | |",
        f"| verify one member's partials | {_fmt(data.get('verify_s_per_ct'))} | |",
        "",
        f"One member's proof for one shard: {_fmt(data.get('proof_s_per_member_round'))} s.",
    ]


def _accuracy_section(data: dict[str, Any], name: str, out: Path) -> list[str]:
    w = data.get("workload", {})
    lines = [
        f"## Accuracy, {data.get('dataset')} (`{name}.json`)",
        "",
        f"Command: `{data.get('command', '(not recorded: the run was stopped early)')}`",
        "",
    ]
    if data.get("partial"):
        lines += [
            "**Partial run**: stopped before every (split, mode) federation finished; the "
            "table holds only the federations that completed.",
            "",
        ]
    lines += [
        "Workload: " + ", ".join(f"{k} = {v}" for k, v in w.items()),
        "",
        f"- IID, 16 bits: encrypted **{_pct(data['encrypted_accuracy'])}**, "
        f"plaintext **{_pct(data['plaintext_accuracy'])}**, gap "
        f"{_fmt(data.get('gap_pp'))} pp (target: within {data.get('target_gap_pp')} pp → "
        f"{_verdict(data.get('meets_gap_target'))}); accuracy target "
        f"{_pct(data.get('target_accuracy'))} → "
        f"{_verdict(data.get('meets_accuracy_target'))}.",
        "",
        "| split | mode | final accuracy | best | gap vs plaintext (pp) | s/round |",
        "|---|---|---:|---:|---:|---:|",
    ]
    gaps = data.get("gap_pp_by_split_mode", {})
    for row in data.get("table", []):
        gap = gaps.get(f"{row['split']}/{row['mode']}")
        lines.append(
            f"| {row['split']} | {row['mode']} | {100 * row['final_accuracy']:.2f}% | "
            f"{100 * row['best_accuracy']:.2f}% | {_fmt(gap)} | {_fmt(row['round_s_mean'])} |"
        )
    png = out / f"{name}.png"
    plot_accuracy(data, png)
    lines += ["", f"![{png.name}]({png.name})", ""]
    return lines


def _micro_section(
    data: dict[str, Any],
    out: Path,
    name: str = "micro",
    larger_keys: list[dict[str, Any]] | None = None,
) -> list[str]:
    """The cost table of one micro run; the plot (with the other key sizes) for micro.json."""
    lines = [
        f"## Micro, {data.get('key_bits', '?')}-bit key (`{name}.json`)",
        "",
        f"Command: `{data.get('command', '')}`",
        "",
        "| cost per value | phe (1 value / ciphertext) | fedcore packed |",
        "|---|---:|---:|",
    ]
    for label, phe, packed in micro_costs(data):
        lines.append(f"| {label} | {_fmt(phe)} | {_fmt(packed)} |")
    if "decrypt_backend" in data:
        lines += [
            "",
            f"fedcore's decrypt is constant-time ({data['decrypt_backend']} exponentiation); "
            f"{_fmt(data.get('decrypt_speedup_vs_phe'))}x phe per value, "
            f"{_fmt(data.get('decrypt_variable_time_speedup_vs_phe'))}x with GMP's "
            "variable-time powmod.",
        ]
    gmp = data.get("aggregator_update_gmpy2_s_per_value")
    native = data.get("aggregator_update_native_s_per_value")
    batch4 = data.get("aggregator_update_native_batch4_s_per_value")
    if isinstance(gmp, float):
        text = (
            "The aggregator's work per update from wire bytes (validate, then fold): gmpy2 "
            f"engine {_fmt(gmp)} s per value"
        )
        if isinstance(native, float):
            text += (
                f"; native engine (OpenSSL Montgomery, no GIL) {_fmt(native)} s "
                f"({_fmt(data.get('aggregator_native_speedup'))}x)"
            )
        if isinstance(batch4, float):
            text += (
                f", and {_fmt(batch4)} s with 4 updates validated together "
                f"({_fmt(data.get('aggregator_native_batch4_speedup'))}x)"
            )
        lines += ["", text + "."]
    lines += micro_checks(data)
    lines += micro_threshold(data)
    if name == "micro" and plot_micro_costs(data, out / "micro-costs.png", larger_keys):
        lines += ["", "![micro-costs.png](micro-costs.png)"]
    lines.append("")
    return lines


def _scale_section(data: dict[str, Any]) -> list[str]:
    """The generic table, then the targets and the client-count curve, when present."""
    lines = _other_section("scale", data)
    targets = data.get("targets")
    if isinstance(targets, dict) and targets:
        lines += ["| target | verdict |", "|---|---|"]
        lines += [f"| {key} | {_verdict(met)} |" for key, met in targets.items()]
        lines.append("")
    workload = data.get("workload")
    if isinstance(workload, dict):
        shown = (
            "fold_engine",
            "fold_workers",
            "max_inflight_uploads",
            "committee_size",
            "headroom_bits",
            "masks",
        )
        lines += [
            "Workload: " + ", ".join(f"{k} {workload[k]}" for k in shown if k in workload) + ".",
            "",
        ]
    curve = [row for row in data.get("curve") or [] if isinstance(row, dict)]
    if curve:
        committee = any(isinstance(row.get("committee"), dict) for row in curve)
        extra = " unmask (s) | member decrypt (s) |" if committee else ""
        lines += [
            "| clients | folded | round (s) | collect (s) | decrypt (s) | peak RSS (MB) "
            "| CPU (s) |" + extra,
            "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if committee else ""),
        ]
        for row in curve:
            phases = row.get("phase_seconds") or {}
            cells = [
                row.get("clients"),
                row.get("updates_folded"),
                row.get("round_seconds"),
                phases.get("collect"),
                phases.get("decrypt"),
                row.get("aggregator_peak_rss_mb"),
                row.get("aggregator_cpu_s"),
            ]
            if committee:
                members = row.get("committee") or {}
                cells += [members.get("unmask_s"), members.get("decrypt_s")]
            lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
        if committee:
            lines += [
                "",
                "unmask and member decrypt: the committee members' own seconds summed over "
                "shards; both run inside the aggregator's decrypt phase, overlapping across "
                "shards.",
            ]
        lines.append("")
    return lines


def _other_section(name: str, data: dict[str, Any]) -> list[str]:
    lines = [f"## {name} (`{name}.json`)", "", f"Command: `{data.get('command', '')}`", ""]
    lines += ["| figure | value |", "|---|---:|"]
    for key, value in data.items():
        if isinstance(value, int | float | str | bool) and key not in ("command",):
            lines.append(f"| {key} | {_fmt(value)} |")
    lines.append("")
    return lines


def write_report(results: Path = DEFAULT_RESULTS, *, commands: list[str] | None = None) -> Path:
    """Build ``results/REPORT.md`` and the PNGs from the JSON files in ``results``."""
    from bench.relay_report import scale_relays_missing, scale_relays_section  # uses _fmt
    from bench.round_report import round_section, round_threshold_section  # use _fmt

    results.mkdir(parents=True, exist_ok=True)
    files = sorted(results.glob("*.json"))
    machine: dict[str, Any] = {}
    for file in files:
        data = _load(file)
        if data and isinstance(data.get("machine"), dict):
            machine = data["machine"]
            break
    lines = [
        "# fedcore benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        "`python -m bench all` from the JSON files in this directory "
        "(`python -m bench all --report-only` rebuilds it).",
        "",
        "Machine: "
        + (", ".join(f"{k} {v}" for k, v in machine.items() if k != "date") or platform.platform())
        + ". The cores are shared with other work, so absolute times are noisy; compare "
        "ratios measured within one run.",
        "",
    ]
    if commands:
        lines += ["Commands:", "", "```", *commands, "```", ""]
    seen = False
    for file in files:
        data = _load(file)
        if data is None:
            continue
        seen = True
        name = file.stem
        try:
            if name == "round":
                section = round_section(data, results)
            elif name == "round-threshold":
                section = round_threshold_section(data)
            elif name.startswith("accuracy"):
                section = _accuracy_section(data, name, results)
            elif name == "micro":
                others = [_load(f) for f in sorted(results.glob("micro-*.json"))]
                section = _micro_section(data, results, name, [o for o in others if o])
            elif name.startswith("micro-"):
                section = _micro_section(data, results, name)
            elif name == "scale":
                section = _scale_section(data)
            elif name == "scale-relays":
                section = scale_relays_section(data)
            else:
                section = _other_section(name, data)
            date = (data.get("machine") or {}).get("date")
            if date:  # results of one report can come from different days and commits
                section[1:1] = ["", f"Measured {date}."]
            lines += section
        except (KeyError, TypeError, ValueError) as exc:
            lines += [f"## {name}", "", f"(could not summarize {file.name}: {exc!r})", ""]
    if not (results / "scale-relays.json").exists():
        lines += scale_relays_missing()
    if not seen:
        lines.append("No benchmark results yet: run `python -m bench all`.")
    report = results / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _planned_runs(quick: bool) -> list[tuple[str, list[str]]]:
    """(result name, argv) for every registered benchmark that imports."""
    import importlib

    from bench.__main__ import BENCHMARKS
    from fedcore.data import fashion_mnist_available

    runs: list[tuple[str, list[str]]] = []
    for name, module_name in BENCHMARKS.items():
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            log.warning("benchmark %s is not installed: skipped", name)
            continue
        if name == "accuracy":
            datasets = ["digits"] + (["fashion-mnist"] if fashion_mnist_available() else [])
            for dataset in datasets:
                runs.append((f"accuracy-{dataset}", [name, "--dataset", dataset]))
        else:
            runs.append((name, [name]))
        if name == "micro":  # the cost plot compares key sizes
            runs.append(("micro-3072", [name, "--key-bits", "3072"]))
        if name == "round":  # the same round under a 3-of-5 key, next to a shared key
            runs.append(("round-threshold", [name, "--key-mode", "threshold"]))
    if quick:
        runs = [(n, [*argv, "--quick"]) for n, argv in runs]
    return runs


def run_all(
    *,
    quick: bool,
    results: Path = DEFAULT_RESULTS,
    report_only: bool = False,
    run_one: Callable[[list[str]], int] | None = None,
) -> Path:
    """Run every registered benchmark (tqdm progress), then write the report."""
    commands: list[str] = []
    if not report_only:
        from tqdm import tqdm

        from bench.__main__ import main as run_benchmark

        runner: Callable[[list[str]], int] = run_one or run_benchmark
        runs = _planned_runs(quick)
        for name, argv in tqdm(runs, desc="bench all", unit="benchmark", file=sys.stderr):
            argv = [*argv, "--json", str(results / f"{name}.json")]
            commands.append("python -m bench " + " ".join(argv))
            try:
                runner(argv)
            except Exception:  # one broken benchmark must not lose the others' results
                log.exception("benchmark %s failed", name)
                print(f"benchmark {name} FAILED (see log); continuing", file=sys.stderr)
    return write_report(results, commands=commands or None)
