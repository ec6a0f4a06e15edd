"""Accuracy benchmark: does packed Paillier cost accuracy? Encrypted vs plaintext FedAvg.

Workload: the seed MLP shape for the dataset (Fashion-MNIST 784-512-256-10; digits
64-512-256-10), 10 clients, IID and Dirichlet(alpha = 0.5) label-skewed splits, for each
split a plaintext federation and encrypted ones at 16-bit and 8-bit quantization, all
with the same seeds (model init, shards, shuffling, stochastic rounding). Test-set
accuracy of the global model after every round. Key: 2048 bits; ``--quick`` uses a
1024-bit key (the key size does not change the arithmetic's result), 3 rounds and at
most 300 samples per client, and says so. Clients are asyncio tasks in this process
(accuracy does not depend on where they run); the committee member decrypts with a
process pool over every core. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import ClientSpec, aggregator_config, make_credentials, run_federation
from fedcore.data import Dataset, default_dataset_name, load_dataset
from fedcore.model import load_flat_into, mlp
from fedcore.training import TrainConfig, evaluate

# mode name -> value_bits (None = plaintext float32 updates)
MODES: dict[str, int | None] = {"plaintext": None, "encrypted-16bit": 16, "encrypted-8bit": 8}
SPLITS = ("iid", "dirichlet")

# Tuned per dataset so FedAvg converges within the stated rounds (see module docstring).
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"rounds": 15, "local_epochs": 5, "lr": 0.1, "batch_size": 32},
    "fashion-mnist": {"rounds": 20, "local_epochs": 2, "lr": 0.05, "batch_size": 64},
}
TARGETS: dict[str, float] = {"digits": 0.97, "fashion-mnist": 0.88}
TARGET_GAP_PP = 0.3  # encrypted (16 bits) within this many percentage points of plaintext


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument(
        "--dataset",
        choices=("auto", "fashion-mnist", "digits"),
        default="auto",
        help="auto = Fashion-MNIST when installed, else digits",
    )
    parser.add_argument("--clients", type=int, default=10, help="clients (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default per dataset)")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--local-epochs", type=int, default=None, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=None, help="local SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="local mini-batch size")
    parser.add_argument("--momentum", type=float, default=0.9, help="local SGD momentum")
    parser.add_argument("--clip", type=float, default=0.5, help="update clip bound (encrypted)")
    parser.add_argument(
        "--samples-per-client", type=int, default=None, help="cap on each shard (quick: 300)"
    )
    parser.add_argument("--key-bits", type=int, default=None, help="default 2048; quick 1024")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default next to JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _progress(message: str) -> None:
    print(f"[accuracy] {message}", file=sys.stderr, flush=True)


def _settings(args: argparse.Namespace, dataset_name: str) -> dict[str, Any]:
    base = DEFAULTS[dataset_name]
    return {
        "rounds": args.rounds or (3 if args.quick else base["rounds"]),
        "local_epochs": args.local_epochs or base["local_epochs"],
        "lr": args.lr or base["lr"],
        "batch_size": args.batch_size or base["batch_size"],
        "momentum": args.momentum,
        "clip": args.clip,
        "key_bits": args.key_bits or (1024 if args.quick else 2048),
        "samples_per_client": args.samples_per_client or (300 if args.quick else None),
    }


def _evaluator(data: Dataset) -> Any:
    model = mlp(data.num_features, classes=data.num_classes)

    def accuracy(weights: np.ndarray) -> float:
        load_flat_into(model, weights)
        return float(evaluate(model, data.x_test, data.y_test)["accuracy"])

    return accuracy


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (split, mode) federation; return the table and the headline figures."""
    dataset_name = default_dataset_name() if args.dataset == "auto" else args.dataset
    data = load_dataset(dataset_name)
    s = _settings(args, dataset_name)
    splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    clients = args.clients
    workload = {
        "dataset": dataset_name,
        "model": f"mlp({data.num_features}) {data.num_features}-512-256-{data.num_classes}",
        "parameters": sum(p.numel() for p in mlp(data.num_features).parameters()),
        "clients": clients,
        "splits": splits,
        "dirichlet_alpha": args.alpha,
        "modes": modes,
        **s,
        "aggregation": "FedAvg, all clients every round, each weighted by its own "
        "min(max_weight, ceil(samples / samples_per_weight)) (defaults 64 and 100)",
        "client_execution": "asyncio tasks in one process; committee of 1 decrypting "
        f"with {os.cpu_count()} worker processes",
        "seeds": "model init 0; shards 0; client i shuffles with seed i; same in every mode",
    }
    if s["key_bits"] < 2048:
        workload["key_note"] = f"{s['key_bits']}-bit key (not 2048): accuracy is unaffected"
    _progress(f"workload: {workload}")
    evaluate_global = _evaluator(data)
    table: list[dict[str, Any]] = []
    use_tqdm = not args.no_progress
    with tempfile.TemporaryDirectory(prefix="fedcore-accuracy-bench-") as tmp:
        workdir = Path(tmp)
        credentials = make_credentials(workdir, clients=clients, key_bits=s["key_bits"])
        for split in splits:
            for mode in modes:
                value_bits = MODES[mode]
                config = aggregator_config(
                    credentials,
                    workdir / f"{split}-{mode}",
                    model_kwargs={"in_features": data.num_features, "classes": data.num_classes},
                    min_clients=clients,
                    clients_per_round=clients,
                    rounds=s["rounds"],
                    committee_size=1,
                    value_bits=value_bits or 16,
                    clip=s["clip"],
                    local_epochs=s["local_epochs"],
                    learning_rate=s["lr"],
                    seed=0,
                )
                specs = [
                    ClientSpec(
                        index=i,
                        clients=clients,
                        dataset=dataset_name,
                        train=TrainConfig(
                            batch_size=s["batch_size"], momentum=s["momentum"], seed=i
                        ),
                        holds_key=i == 0,
                        scheme=split,
                        alpha=args.alpha,
                        max_samples=s["samples_per_client"],
                        decrypt_workers=max(1, os.cpu_count() or 1),
                    )
                    for i in range(clients)
                ]
                bar = None
                if use_tqdm:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=s["rounds"], desc=f"{split} {mode}", unit="round", file=sys.stderr
                    )

                def tick(record: Any, bar: Any = bar) -> None:
                    if bar is not None:
                        bar.set_postfix(acc=f"{record.accuracy:.4f}", refresh=False)
                        bar.update(1)

                started = time.perf_counter()
                try:
                    result = run_federation(
                        config,
                        specs,
                        credentials,
                        encrypted=value_bits is not None,
                        processes=False,
                        dataset=data,
                        evaluate=evaluate_global,
                        on_round=tick,
                    )
                finally:
                    if bar is not None:
                        bar.close()
                per_round = [float(r.accuracy or 0.0) for r in result.rounds]
                row = {
                    "split": split,
                    "mode": mode,
                    "value_bits": value_bits,
                    "final_accuracy": per_round[-1],
                    "best_accuracy": max(per_round),
                    "accuracy_per_round": per_round,
                    "round_s_mean": float(np.mean([r.round_s for r in result.rounds])),
                    "wall_s": time.perf_counter() - started,
                }
                _progress(
                    f"{split} {mode}: final {100 * row['final_accuracy']:.2f}% "
                    f"({row['round_s_mean']:.1f} s/round)"
                )
                table.append(row)
                _save_partial(dataset_name, workload, table, args)
    return _headline(dataset_name, workload, table, args)


def _save_partial(
    dataset_name: str,
    workload: dict[str, Any],
    table: list[dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    """Write the rows finished so far to ``--json`` (marked partial): long runs that are
    stopped early keep their completed federations. The runner overwrites it at the end."""
    json_path = getattr(args, "json", None)
    if json_path is None:
        return
    import json

    partial = _headline(dataset_name, workload, table, args, plot=False)
    partial["partial"] = True
    partial["command"] = "python -m bench " + " ".join(sys.argv[1:])
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(partial, indent=2) + "\n")


def _final(table: list[dict[str, Any]], split: str, mode: str) -> float | None:
    for row in table:
        if row["split"] == split and row["mode"] == mode:
            return float(row["final_accuracy"])
    return None


def _headline(
    dataset_name: str,
    workload: dict[str, Any],
    table: list[dict[str, Any]],
    args: argparse.Namespace,
    *,
    plot: bool = True,
) -> dict[str, Any]:
    """Headline figures (IID, 16 bits) against the targets, the table and the plot."""
    encrypted = _final(table, "iid", "encrypted-16bit")
    plaintext = _final(table, "iid", "plaintext")
    gaps: dict[str, float] = {}
    for split in {row["split"] for row in table}:
        plain = _final(table, split, "plaintext")
        for mode in ("encrypted-16bit", "encrypted-8bit"):
            enc = _final(table, split, mode)
            if plain is not None and enc is not None:
                gaps[f"{split}/{mode}"] = 100 * (plain - enc)
    target = TARGETS[dataset_name]
    result: dict[str, Any] = {
        "dataset": dataset_name,
        "workload": workload,
        "encrypted_accuracy": encrypted,
        "plaintext_accuracy": plaintext,
        "gap_pp": None if encrypted is None or plaintext is None else 100 * (plaintext - encrypted),
        "gap_pp_by_split_mode": gaps,
        "target_accuracy": target,
        "target_gap_pp": TARGET_GAP_PP,
        "meets_accuracy_target": None if encrypted is None else encrypted >= target,
        "meets_gap_target": None
        if encrypted is None or plaintext is None
        else abs(plaintext - encrypted) * 100 <= TARGET_GAP_PP,
        "table": table,
    }
    if not plot:
        return result
    path = args.plot
    if path is None:
        json_path = getattr(args, "json", None)
        path = (
            Path(json_path).with_suffix(".png")
            if json_path is not None
            else Path("bench/results") / f"accuracy-{dataset_name}.png"
        )
    from bench.report import plot_accuracy

    plot_accuracy(result, path)
    result["plot"] = str(path)
    return result
