"""Round benchmark: federated rounds, encrypted vs plaintext, by phase, MLP and small CNN.

Workload (default): the seed MLP (784-512-256-10, 535,818 parameters) on Fashion-MNIST,
4 clients with IID shards (1 local epoch over the whole shard, 15,000 samples each), a
2048-bit key, 3 rounds, every client a key holder on the committee (--committee-size 0);
then the same federation for one round with committees of 1, 2 and 4 to see how
decryption scales.
``--quick`` trains on 1,000 samples per client for 2 rounds, still with a 2048-bit key.
Clients run as spawned processes (one per client, as on real edge machines) so their
CPU work uses every core; the aggregator runs in this process. Without Fashion-MNIST the
benchmark falls back to digits with the 64-feature MLP (167,178 parameters) and says so.

Workload training-heavy (``--workload``: default, training-heavy or both, the default):
the same clients, shards, key, rounds and committee with a small CNN
(`fedcore.model.cnn`, 206,922 parameters on 28x28 images, 22,602 on 8x8 digits) trained
for ``--heavy-epochs`` local epochs (default 5), enough for local training to dominate a
plaintext round, so it shows what encryption adds when training is the expensive part.
Reported for it under ``training_heavy``, as for the default workload at the top level:
round seconds and encrypted / plaintext, CPU seconds per round, each phase, ciphertexts
per update and bytes. The committee-scaling runs use the default workload only.
``--round-interval S`` paces both federations' rounds S seconds apart (start to start;
`AggregatorConfig.round_interval`), as a scheduled federation would; the pause is in
no phase, so round times stay the aggregator's phases, while CPU per round still counts
what the clients do in it (refilling their encryption pools).
``packing`` tabulates, from fedcore's own codec for the run's key size, ciphertexts per
seed-MLP update and bytes per value at 16 and 8 value bits for 10 and 1,000 clients.

Protocol 3 adds privacy checks to every encrypted round, reported under
``privacy_checks``: clients mask their plaintexts for the round's unmasker and sign a
token; the aggregator checks each token; every committee member checks the named token
set before it works, and the unmasker removes the masks of exactly those contributors
while the other members decrypt. Every figure is one fedcore reports itself: the
round report's ``check_seconds`` (the aggregator's token checks; the members' own
decrypt and unmask seconds, which each shard answer carries) and the clients' ``mask_s``
timing. The aggregator's decrypt phase covers unmasking and decryption, which overlap
across shards and members.

``--key-mode threshold --threshold T --parties N`` compares threshold decryption with
shared-key decryption on the same workload instead: the clients become max(--clients, N),
a T-of-N key of the same size is dealt here (timed: ``deal_s``) and clients 0..N-1 hold
shares 1..N; then the same federation runs in shared mode with the private key on those
same N clients and a committee of N, so both spread decryption over N members. Each shard
goes to one member in shared mode, to T members (partial decryptions with proofs, which
the aggregator verifies and combines) in threshold mode. Reported for both: the phases
(the aggregator's ``decrypt`` phase and its ratio threshold / shared), each member's own
decrypt seconds (the round report's ``member_decrypt_seconds``, mean over rounds; max
and mean over members), shards per round and member answers per round (the clients'
counts), ciphertexts per update, and the global model's test accuracy after each round
(evaluated outside every phase). No plaintext run and no committee-scaling runs in this
mode (``--key-mode shared`` measures those). Measures; never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import (
    ClientSpec,
    Credentials,
    FederationResult,
    aggregator_config,
    deal_key_shares,
    make_credentials,
    run_federation,
)
from bench.packing_table import SEED_MLP_PARAMETERS, packing_lines, packing_table
from bench.round_workloads import (
    DEFAULT,
    PHASES,
    TRAINING_HEAVY,
    RoundWorkload,
    _mean,
    compare,
    summarize,
)
from fedcore.crypto import PublicKey
from fedcore.crypto.modexp import constant_time_backend
from fedcore.data import Dataset, fashion_mnist_available, load_dataset
from fedcore.model import load_flat_into, mlp
from fedcore.training import TrainConfig, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument(
        "--dataset",
        choices=("auto", "fashion-mnist", "digits"),
        default="auto",
        help="auto = Fashion-MNIST when installed (seed MLP), else digits (64-feature MLP)",
    )
    parser.add_argument("--clients", type=int, default=4, help="clients (default 4)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 2)")
    parser.add_argument(
        "--samples-per-client",
        type=int,
        default=None,
        help="cap on each client's shard (default: whole shard; quick 1000)",
    )
    parser.add_argument(
        "--committee-size",
        type=int,
        default=0,
        help="committee of the main encrypted runs (default 0: every connected key holder, "
        "fedcore's default)",
    )
    parser.add_argument(
        "--committee-sizes",
        default="1,2,4",
        help="committee sizes of the decryption-scaling runs (comma-separated; '' = skip)",
    )
    parser.add_argument(
        "--key-mode",
        choices=("shared", "threshold"),
        default="shared",
        help="shared (default): encrypted vs plaintext and committee scaling; threshold: "
        "a T-of-N threshold key vs a shared key, same workload, committee of N each",
    )
    parser.add_argument(
        "--threshold", type=int, default=3, help="T of the threshold key (default 3)"
    )
    parser.add_argument(
        "--parties",
        type=int,
        default=5,
        help="N of the threshold key (default 5); clients become max(--clients, N)",
    )
    parser.add_argument(
        "--workload",
        choices=("default", "training-heavy", "both"),
        default="both",
        help="default: the seed MLP, 1 local epoch (plus the committee-scaling runs); "
        "training-heavy: a small CNN whose local training dominates a plaintext round; "
        "both (default). Shared key mode only",
    )
    parser.add_argument(
        "--heavy-epochs",
        type=int,
        default=TRAINING_HEAVY.local_epochs,
        help=f"local epochs per round of the training-heavy workload "
        f"(default {TRAINING_HEAVY.local_epochs})",
    )
    parser.add_argument(
        "--round-interval",
        type=float,
        default=0.0,
        help="seconds from one round's start to the next (AggregatorConfig.round_interval; "
        "default 0: back to back); a paced federation leaves clients idle time to refill "
        "their encryption pools. Round times are the aggregator's phases, without the pause",
    )
    # Smoke tests only: a tiny key makes the benchmark run in seconds but measures nothing.
    parser.add_argument("--key-bits", type=int, default=2048, help=argparse.SUPPRESS)
    # Smoke tests only: clients as asyncio tasks here (no process start-up), not realistic.
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)


def _progress(message: str) -> None:
    print(f"[round] {message}", file=sys.stderr, flush=True)


def _run(
    credentials: Credentials,
    workdir: Path,
    name: str,
    *,
    workload: RoundWorkload,
    data: Dataset,
    dataset: str,
    clients: int,
    rounds: int,
    samples: int | None,
    committee: int,
    encrypted: bool,
    in_process: bool,
    holders: int | None = None,
    evaluate_global: Callable[[np.ndarray], float] | None = None,
    round_interval: float = 0.0,
) -> FederationResult:
    """One federation of ``workload``'s model; ``in_process`` runs clients as tasks here.

    ``holders``: only clients 0..holders-1 hold key material (None: every client); with
    threshold credentials client i holds key share i + 1 instead of the private key.
    """
    shares = len(credentials.key_shares)
    model_kwargs = workload.model_kwargs(data)
    config = aggregator_config(
        credentials,
        workdir / name,
        model=workload.model,
        model_kwargs=model_kwargs,
        min_clients=clients,
        clients_per_round=clients,
        rounds=rounds,
        committee_size=committee,
        local_epochs=workload.local_epochs,
        seed=0,
        round_interval=round_interval,
    )
    specs = [
        ClientSpec(
            index=i,
            clients=clients,
            dataset=dataset,
            train=TrainConfig(seed=i),
            holds_key=holders is None or i < holders,  # by default all may sit on it
            max_samples=samples,
            key_share=i + 1 if i < shares and (holders is None or i < holders) else None,
            model=workload.model,
            model_kwargs=model_kwargs,
        )
        for i in range(clients)
    ]
    return run_federation(
        config,
        specs,
        credentials,
        encrypted=encrypted,
        processes=not in_process,
        dataset=data if in_process else None,
        evaluate=evaluate_global,
    )


def _setting(args: argparse.Namespace, clients: int) -> tuple[str, Dataset, int, int | None]:
    """The dataset (name and data), the rounds and the per-client sample cap."""
    if args.dataset == "auto":
        dataset_name = "fashion-mnist" if fashion_mnist_available() else "digits"
    else:
        dataset_name = args.dataset
    rounds = args.rounds or (2 if args.quick else 3)
    samples = args.samples_per_client or (1000 if args.quick else None)
    return dataset_name, load_dataset(dataset_name), rounds, samples


def _describe(
    args: argparse.Namespace,
    workload: RoundWorkload,
    setting: tuple[str, Dataset, int, int | None],
    clients: int,
) -> dict[str, Any]:
    """The workload description round.json carries (`compare` adds value_bits)."""
    dataset_name, dataset, rounds, samples = setting
    shard = len(dataset.y_train) // clients
    return {
        "name": workload.name,
        "dataset": dataset_name,
        "model": workload.describe(dataset_name),
        "model_factory": workload.model,
        "parameters": workload.parameters(dataset),
        "clients": clients,
        "rounds": rounds,
        "samples_per_client": min(shard, samples) if samples else shard,
        "local_epochs": workload.local_epochs,
        "key_bits": args.key_bits,
        "committee_size": args.committee_size,
        "round_interval": args.round_interval,
        "weights": "each client's own: min(max_weight, ceil(samples / samples_per_weight))",
        "client_execution": "asyncio tasks in this process (smoke test)"
        if args.in_process
        else "one spawned process per client (torch 1 thread each, plus its "
        "EncryptionPool worker process)",
        "machine_cores_shared": "yes: other work may run on the same cores",
    }


def _chosen(args: argparse.Namespace) -> list[RoundWorkload]:
    """The workloads ``--workload`` names, the heavy one with ``--heavy-epochs``."""
    if isinstance(args.heavy_epochs, bool) or args.heavy_epochs < 1:
        raise ValueError(f"--heavy-epochs must be >= 1; got {args.heavy_epochs}")
    heavy = replace(TRAINING_HEAVY, local_epochs=args.heavy_epochs)
    return {"default": [DEFAULT], "training-heavy": [heavy], "both": [DEFAULT, heavy]}[
        args.workload
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run each workload's encrypted and plaintext federations, and the committee scaling.

    ``--key-mode threshold`` runs the threshold-vs-shared comparison instead.
    """
    if args.key_mode == "threshold":
        return run_threshold(args)
    clients = args.clients
    workloads = _chosen(args)
    setting = _setting(args, clients)
    dataset_name, data, rounds, samples = setting
    committee_sizes = [int(s) for s in str(args.committee_sizes).split(",") if s.strip()]
    if DEFAULT not in workloads:
        committee_sizes = []  # decryption scaling is measured on the default workload only
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedcore-round-bench-") as tmp:
        workdir = Path(tmp)
        credentials = make_credentials(
            workdir, clients=max(clients, *committee_sizes, 1), key_bits=args.key_bits
        )
        common: dict[str, Any] = {
            "data": data,
            "dataset": dataset_name,
            "clients": clients,
            "in_process": args.in_process,
        }
        for workload in workloads:
            description = _describe(args, workload, setting, clients)
            _progress(f"{workload.name} workload: {description}")
            runs = {}
            for mode, encrypted in (("encrypted", True), ("plaintext", False)):
                _progress(f"{workload.name}, {mode} federation: {rounds} rounds")
                runs[mode] = _run(
                    credentials,
                    workdir,
                    f"{workload.name}-{mode}",
                    workload=workload,
                    rounds=rounds,
                    samples=samples,
                    committee=args.committee_size,
                    encrypted=encrypted,
                    round_interval=args.round_interval,
                    **common,
                )
            results[workload.name] = compare(
                description, runs["encrypted"], runs["plaintext"], clients
            )
        decrypt_by_committee: dict[str, float] = {}
        unmask_by_committee: dict[str, float] = {}
        for size in committee_sizes:
            if size > clients:
                _progress(f"committee {size} > {clients} clients: skipped")
                continue
            _progress(f"decryption scaling: committee of {size}, 1 round")
            scaling = _run(
                credentials,
                workdir,
                f"committee-{size}",
                workload=DEFAULT,
                rounds=1,
                samples=min(samples or 256, 256),
                committee=size,
                encrypted=True,
                **common,
            )
            decrypt_by_committee[str(size)] = scaling.rounds[0].phase_seconds["decrypt"]
            unmask_by_committee[str(size)] = scaling.rounds[0].check_seconds.get(
                "member_unmask", 0.0
            )
        packing = packing_table(
            args.key_bits, SEED_MLP_PARAMETERS, public_key=PublicKey.load(credentials.public_key)
        )
    out: dict[str, Any] = {"workloads": [w.name for w in workloads]}
    if DEFAULT.name in results:
        out.update(results[DEFAULT.name])
        out.update(_default_notes(decrypt_by_committee, unmask_by_committee))
    if TRAINING_HEAVY.name in results:
        out["training_heavy"] = results[TRAINING_HEAVY.name]
    out["packing"] = packing
    _print_workloads(results)
    print("\n".join(packing_lines(packing)))
    return out


def _default_notes(
    decrypt_by_committee: dict[str, float], unmask_by_committee: dict[str, float]
) -> dict[str, Any]:
    """The default workload's committee-scaling figures and the notes that explain them."""
    base = decrypt_by_committee.get("1")
    return {
        "privacy_checks_note": (
            "protocol 3 per-round costs, as fedcore's round reports give them: unmask_s and "
            "member_decrypt_s are the committee members' own seconds summed over shards "
            "(their token-set checks included); both happen inside the aggregator's decrypt "
            "phase and overlap across shards and members, so they do not add up to it. "
            "aggregator_token_check_s is the aggregator's check of every contributor's "
            "UpdateDone token; client_mask_s_per_update is one client deriving and adding "
            "its one-time masks for one update (the clients' mask_s timing, part of "
            "encode_encrypt). bench micro measures each check alone, before and after"
        ),
        "decrypt_s_by_committee_size": decrypt_by_committee,
        "unmask_s_by_committee_size": unmask_by_committee,
        "decrypt_speedup_by_committee_size": {
            k: base / v for k, v in decrypt_by_committee.items() if base and v > 0
        },
        "decrypt_scaling_note": (
            "the decrypt phase includes unmasking (one member, chosen among the key "
            "holders, also unmasks every shard); "
            "each committee member is a client process that decrypts one shard at a time "
            "on one core, with a second shard already received (2 shards in flight per "
            f"member; CRT, constant-time {constant_time_backend()} exponentiation); on an idle "
            "machine the decrypt phase can fall at most by the core count, and members "
            "beyond the core count add nothing. On "
            "cores shared with other work, more member processes also win a larger share "
            "of the contended CPU, so a gain beyond the core count measures contention"
        ),
    }


def _print_workloads(results: dict[str, dict[str, Any]]) -> None:
    """Each workload's headline figures side by side (the runner prints only scalars)."""
    names = list(results)
    print(f"  {'per round (mean)':<32}" + "".join(f"{n:>20}" for n in names))
    rows = (
        ("encrypted round (s)", "encrypted_round_s"),
        ("plaintext round (s)", "plaintext_round_s"),
        ("encrypted / plaintext", "overhead_ratio"),
        ("encrypted CPU (s)", "encrypted_cpu_s_per_round"),
        ("plaintext CPU (s)", "plaintext_cpu_s_per_round"),
        ("CPU encrypted / plaintext", "cpu_overhead_ratio"),
        ("ciphertexts per update", "ciphertexts_per_update"),
    )
    for label, key in rows:
        print(f"  {label:<32}" + "".join(f"{results[n][key]:>20.4g}" for n in names))
    for phase in PHASES:
        pairs = [
            (r["encrypted_phase_s"][phase], r["plaintext_phase_s"][phase]) for r in results.values()
        ]
        cells = "".join(f"{enc:>9.3g} /{plain:>9.3g}" for enc, plain in pairs)
        print(f"  {phase + ' (enc / plain s)':<32}{cells}")


# ------------------------------------------------------------------ threshold key mode
def _evaluator(data: Dataset) -> Callable[[np.ndarray], float]:
    """Test accuracy of the global weights (the round bench's only use of the test set)."""
    model = mlp(data.num_features, classes=data.num_classes)

    def accuracy(weights: np.ndarray) -> float:
        load_flat_into(model, weights)
        return float(evaluate(model, data.x_test, data.y_test)["accuracy"])

    return accuracy


def _members(result: FederationResult) -> dict[str, Any]:
    """Each member's own decrypt seconds (fedcore's ``member_decrypt_seconds``), per round.

    A member of the round's committee that decrypted nothing in a round counts 0 s there.
    ``max_over_mean`` > 1 says how unevenly the decryption work fell on the members.
    """
    rounds = result.rounds
    names = sorted({m for r in rounds for m in r.member_decrypt_seconds})
    each = {m: _mean([r.member_decrypt_seconds.get(m, 0.0) for r in rounds]) for m in names}
    values = list(each.values())
    peak, mean = (max(values), _mean(values)) if values else (float("nan"), float("nan"))
    unmaskers = int(result.federation.get("unmaskers") or 1)
    clients = result.client_results
    return {
        "member_decrypt_s_per_round": each,
        "member_decrypt_s_by_round": [dict(r.member_decrypt_seconds) for r in rounds],
        "members": len(names),
        "member_decrypt_s_max": peak,
        "member_decrypt_s_mean": mean,
        "member_decrypt_s_max_over_mean": peak / mean if mean > 0 else None,
        "member_decrypt_s_sum_per_round": _mean(
            [sum(r.member_decrypt_seconds.values()) for r in rounds]
        ),
        # the clients' own counts: every shard is unmasked once by each unmasker, and
        # answered by one member (shared) or T members (threshold)
        "shards_per_round": sum(c.get("shards_unmasked", 0) for c in clients)
        / max(1, len(rounds) * unmaskers),
        "member_answers_per_round": sum(c.get("shards_decrypted", 0) for c in clients)
        / max(1, len(rounds)),
        "accuracy_each_round": [r.accuracy for r in rounds],
        "final_accuracy": rounds[-1].accuracy if rounds else None,
    }


def run_threshold(args: argparse.Namespace) -> dict[str, Any]:
    """A T-of-N threshold federation, then the same workload with a shared key."""
    t, n = args.threshold, args.parties
    if not 1 <= t <= n or n < 2:
        raise ValueError(f"--threshold must be in 1..--parties, --parties >= 2; got {t}, {n}")
    clients = max(args.clients, n)
    clients_note = (
        f"{clients} clients (--clients {args.clients} raised to --parties {n}: one client "
        "per key share)"
        if clients != args.clients
        else f"{clients} clients (--clients; N = {n} of them hold key material)"
    )
    setting = _setting(args, clients)
    dataset_name, data, rounds, samples = setting
    workload = _describe(args, DEFAULT, setting, clients)
    workload.update(
        key_mode="threshold",
        threshold=t,
        parties=n,
        committee_size=n,
        clients_note=clients_note,
        key_holders=f"clients 0..{n - 1}: key shares 1..{n} (threshold run), the whole "
        "private key (shared run); the others hold nothing",
    )
    _progress(clients_note)
    _progress(f"workload: {workload}")
    evaluate_global = _evaluator(data)
    with tempfile.TemporaryDirectory(prefix="fedcore-round-bench-") as tmp:
        workdir = Path(tmp)
        shared_credentials = make_credentials(workdir, clients=clients, key_bits=args.key_bits)
        _progress(f"dealing a {args.key_bits}-bit {t}-of-{n} key")
        credentials, deal_s = deal_key_shares(
            shared_credentials, workdir / "threshold-keys", threshold=t, parties=n
        )
        _progress(f"dealt in {deal_s:.1f} s")
        common: dict[str, Any] = {
            "workload": DEFAULT,
            "data": data,
            "dataset": dataset_name,
            "clients": clients,
            "rounds": rounds,
            "samples": samples,
            "committee": n,
            "encrypted": True,
            "holders": n,
            "evaluate_global": evaluate_global,
            "in_process": args.in_process,
        }
        _progress(f"threshold federation ({t}-of-{n}): {rounds} rounds")
        threshold_run = _run(credentials, workdir, "threshold", **common)
        _progress(f"shared-key federation (committee of {n}): {rounds} rounds")
        shared_run = _run(shared_credentials, workdir, "shared", **common)
    workload["value_bits"] = threshold_run.federation.get("value_bits")
    out: dict[str, Any] = {"workload": workload, "clients": clients, "clients_note": clients_note}
    out.update(key_mode="threshold", threshold=t, parties=n, deal_s=deal_s)
    summaries = {}
    for mode, result in (("threshold", threshold_run), ("shared", shared_run)):
        summary = summarize(result, clients)
        summary["members"] = _members(result)
        summaries[mode] = summary
        out[f"{mode}_mode"] = result.federation.get("mode")
        out[f"{mode}_round_s"] = summary["round_s"]
        out[f"{mode}_decrypt_s"] = summary["aggregator_phase_s"]["decrypt"]
        for key in ("member_decrypt_s_max", "member_decrypt_s_mean", "shards_per_round"):
            out[f"{mode}_{key}"] = summary["members"][key]
        out[f"{mode}_member_answers_per_round"] = summary["members"]["member_answers_per_round"]
        out[f"{mode}_final_accuracy"] = summary["members"]["final_accuracy"]
        out[f"{mode}_cpu_s_per_round"] = summary["cpu_s_per_round"]
        out[f"{mode}_cpu_s_aggregator_per_round"] = summary["cpu_s_aggregator_per_round"]
        out[f"{mode}_phase_s"] = summary["phase_s"]
    thr, sh = summaries["threshold"], summaries["shared"]
    out["decrypt_threshold_over_shared"] = (
        out["threshold_decrypt_s"] / out["shared_decrypt_s"]
        if out["shared_decrypt_s"] > 0
        else float("nan")
    )
    out["round_threshold_over_shared"] = (
        thr["round_s"] / sh["round_s"] if sh["round_s"] > 0 else float("nan")
    )
    out["member_decrypt_threshold_over_shared"] = (
        out["threshold_member_decrypt_s_mean"] / out["shared_member_decrypt_s_mean"]
        if out["shared_member_decrypt_s_mean"] > 0
        else float("nan")
    )
    out["ciphertexts_per_update"] = threshold_run.federation.get("items_per_update")
    out["skipped"] = "plaintext run and committee-scaling runs (run --key-mode shared)"
    out["threshold_note"] = (
        f"both runs: the same {clients} clients, data, seeds and rounds, with key material on "
        f"clients 0..{n - 1} and every one of those {n} on the committee. Shared: each shard "
        f"is decrypted (CRT, constant-time {constant_time_backend()}) by one member. "
        f"Threshold: each shard is partially decrypted, with a proof, by {t} of the {n} "
        "members (a rotating window), and the aggregator verifies the proofs and combines "
        "the partials inside its decrypt phase; unmasking is inside both decrypt phases. "
        "member_decrypt_s are the members' own reported wall seconds (mean over rounds per "
        "member; max and mean over members); they overlap across members and, with more "
        "member processes than cores, include waiting for a core. cpu_s_per_round counts "
        "every process (aggregator: proof checks and combining in threshold mode)"
    )
    out["threshold_run"] = thr
    out["shared_run"] = sh
    _print_comparison(out, thr, sh)
    return out


def _print_comparison(out: dict[str, Any], thr: dict[str, Any], sh: dict[str, Any]) -> None:
    """The per-phase and per-member figures side by side (the runner prints the scalars)."""
    print(f"{out['threshold']}-of-{out['parties']} threshold key vs shared key:")
    print(f"  {'phase (mean s/round)':<26}{'threshold':>12}{'shared':>12}")
    for name in PHASES:
        print(f"  {name:<26}{thr['phase_s'][name]:>12.3f}{sh['phase_s'][name]:>12.3f}")
    print(f"  {'round':<26}{thr['round_s']:>12.3f}{sh['round_s']:>12.3f}")
    print(f"  {'member decrypt (mean s/round)':<32}{'threshold':>12}{'shared':>12}")
    names = sorted(
        set(thr["members"]["member_decrypt_s_per_round"])
        | set(sh["members"]["member_decrypt_s_per_round"])
    )
    for name in names:
        a = thr["members"]["member_decrypt_s_per_round"].get(name, float("nan"))
        b = sh["members"]["member_decrypt_s_per_round"].get(name, float("nan"))
        print(f"  {name:<32}{a:>12.3f}{b:>12.3f}")
