"""One round of neurofuse fusion against FedAvg run for 1 to 20 rounds, on Flower (issue 14).

    .venv/bin/python benchmarks/federated.py [--archs mlp,vgg] [--partitions dirichlet,sharded]
        [--clients 4,8] [--seed 0] [--out benchmarks/results/federated]

Every cell (architecture x partition x clients) is three Flower simulations of
``neurofuse.federated`` (the code path of ``neurofuse federate``), all from the same seeded
initial model, every client training the same local epochs per round (MLP 784-128-128-10: 20
epochs; VGG-small: 10; AdamW, lr 2e-3, batch 64, as the paper suites train their base models):

- ``fedavg-20``: FedAvg for 20 rounds; in round 1 the server also fuses the same client models
  with every neurofuse method and baseline (one-shot fusion, fusion set: 400 samples that
  client 0 sends from its own data, the paper's setting);
- ``server-set``: the same round 1 (same seeds, same client models) fused on 400 samples the
  server holds (a class-balanced draw from the whole training split: a public proxy set);
- ``kf-5``: KF Linear instead of averaging in every round, for 5 rounds.

The question: how many FedAvg rounds does one round of fusion save? For each one-shot fusion,
the report gives the first FedAvg round whose accuracy reaches it and the bytes both moved
(tensor payload: weights down and up, importance, the fusion set; not protocol framing).
Writes ``REPORT.md``, ``summary.json`` and ``rounds.png`` into ``--out``; every simulation's own
folder (``runs/<cell>-<run>/``, with its ``results.json``) is kept, and a killed benchmark
resumes at the first simulation without one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from neurofuse.federated import FederationConfig, simulate
from neurofuse.utils import atomic_write_bytes, atomic_write_text

OUT = Path(__file__).parent / "results" / "federated"
ONE_SHOT = ("kf_linear", "kf_gradient", "kf_linear+kd", "auto", "otfusion", "git_rebasin")
NEUROFUSE = ("kf_linear", "kf_gradient", "kf_linear+kd", "auto")
ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "mlp", "model_kw": {"hidden": [128, 128]}, "local_epochs": 20},
    "vgg": {
        "arch": "vgg",
        "model_kw": {"config": "vgg_small", "batch_norm": False},
        "local_epochs": 10,
    },
}
FEDAVG_ROUNDS = 20
FUSION_ROUNDS = 5


def runs(arch: str, partition: str, clients: int, seed: int) -> dict[str, FederationConfig]:
    common = dict(
        dataset="mnist5k",
        clients=clients,
        partition=partition,
        lr=2e-3,
        batch_size=64,
        fusion_size=400,
        seed=seed,
        **ARCHS[arch],
    )
    return {
        "fedavg-20": FederationConfig(
            method="fedavg",
            rounds=FEDAVG_ROUNDS,
            compare=ONE_SHOT,
            compare_rounds=1,
            **common,  # type: ignore[arg-type]
        ),
        "server-set": FederationConfig(
            method="fedavg",
            rounds=1,
            compare=ONE_SHOT,
            fusion_source="server",
            **common,  # type: ignore[arg-type]
        ),
        "kf-5": FederationConfig(
            method="kf_linear",
            rounds=FUSION_ROUNDS,
            **common,  # type: ignore[arg-type]
        ),
    }


def run_cached(folder: Path, config: FederationConfig) -> dict[str, Any]:
    path = folder / "results.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record["config"] == json.loads(json.dumps(config.to_dict())):
            return record
    simulate(config, folder)
    return json.loads(path.read_text())


def rounds_to_reach(curve: list[float], target: float) -> int | None:
    """First FedAvg round (1-based) whose accuracy reaches ``target``; None: never."""
    for r, acc in enumerate(curve, start=1):
        if acc >= target - 1e-9:
            return r
    return None


def summarise(cell: str, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    fed = records["fedavg-20"]
    history = fed["history"]
    curve = [row["accuracy"] for row in history if row["round"] > 0]
    first = next(row for row in history if row["round"] == 1)
    later = [row for row in history if row["round"] > 1]
    per_round = later[0]["bytes_down"] + later[0]["bytes_up"] if later else None
    one_shot_bytes = first["bytes_down"] + first["bytes_up"]
    server = next(row for row in records["server-set"]["history"] if row["round"] == 1)
    fusions: dict[str, dict[str, Any]] = {}
    for source, row in (("client 0", first), ("server", server)):
        for name, acc in row["compared"].items():
            if name == "fedavg":
                continue
            fusions[f"{name} ({source} set)"] = {
                "accuracy": acc,
                "fedavg_rounds_to_reach": rounds_to_reach(curve, acc),
            }
    kf = records["kf-5"]["history"]
    return {
        "cell": cell,
        "fedavg_curve": curve,
        "fedavg_bytes_per_round": per_round,
        "one_shot_bytes": one_shot_bytes,
        "ensemble_accuracy": first["ensemble_accuracy"],
        "client_accuracies": first["client_accuracies"],
        "fusions": fusions,
        "kf_linear_every_round": [row["accuracy"] for row in kf if row["round"] > 0],
        "fedavg_of_kf_round_clients": [
            row.get("compared", {}).get("fedavg") for row in kf if row["round"] > 0
        ],
        "seconds": {name: rec["seconds"] for name, rec in records.items()},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(summaries: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# One round of fusion against FedAvg (Flower simulation)",
        "",
        f"Command: `{command}` ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}).",
        "",
        "MNIST-5k, clients on a Dirichlet or sharded split, all starting from the same seeded "
        "model. FedAvg runs 20 rounds; the one-shot fusions use the client models of its first "
        "round. Accuracy on the 1,000-sample test split (%). *Rounds to reach*: the first FedAvg "
        "round at least as accurate as the one-shot fusion (1: FedAvg's first round already is; "
        "'>20': never within 20). Bytes are tensor payload (weights down and up, metrics, the "
        "fusion set when client 0 sends it).",
        "",
    ]
    for s in summaries:
        curve = s["fedavg_curve"]
        lines += [
            f"## {s['cell']}",
            "",
            f"FedAvg: round 1 {_pct(curve[0])}, round 5 {_pct(curve[4] if len(curve) > 4 else None)}, "
            f"round 20 {_pct(curve[-1])}; ensemble of the round-1 clients "
            f"{_pct(s['ensemble_accuracy'])}; clients "
            f"{', '.join(_pct(a) for a in s['client_accuracies'])}.",
            f"One round moves {s['one_shot_bytes'] / 2**20:.2f} MiB with the fusion set, a FedAvg "
            f"round {(s['fedavg_bytes_per_round'] or 0) / 2**20:.2f} MiB.",
            "",
            "| one-shot fusion | accuracy | FedAvg rounds to reach | FedAvg bytes to reach |",
            "|---|---:|---:|---:|",
        ]
        for name, f in s["fusions"].items():
            r = f["fedavg_rounds_to_reach"]
            need = "-" if r is None else f"{r * (s['fedavg_bytes_per_round'] or 0) / 2**20:.2f} MiB"
            lines.append(
                f"| {name} | {_pct(f['accuracy'])} | {'>20' if r is None else r} | {need} |"
            )
        kf = s["kf_linear_every_round"]
        lines += [
            "",
            "KF Linear in every round (clients start from the fused model): "
            + ", ".join(f"r{i + 1} {_pct(a)}" for i, a in enumerate(kf))
            + "; FedAvg of those same client models: "
            + ", ".join(
                f"r{i + 1} {_pct(a)}" for i, a in enumerate(s["fedavg_of_kf_round_clients"])
            )
            + ".",
            "",
        ]
    lines.append("![FedAvg per round against one-shot fusion](rounds.png)")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 4
    rows = (len(summaries) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for i, s in enumerate(summaries):
        ax = fig.add_subplot(rows, cols, i + 1)
        curve = s["fedavg_curve"]
        ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], "k-o", ms=3, label="FedAvg")
        kf = s["kf_linear_every_round"]
        ax.plot(
            range(1, len(kf) + 1), [100 * a for a in kf], "-s", ms=3, label="KF Linear each round"
        )
        for name, style in (
            ("kf_linear (client 0 set)", "C0--"),
            ("kf_linear (server set)", "C2--"),
            ("auto (client 0 set)", "C3:"),
        ):
            if name in s["fusions"]:
                ax.axhline(
                    100 * s["fusions"][name]["accuracy"],
                    ls=style[2:],
                    color=style[:2],
                    label=f"one-shot {name}",
                )
        ax.set_title(s["cell"], fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="mlp,vgg")
    parser.add_argument("--partitions", default="dirichlet,sharded")
    parser.add_argument("--clients", default="4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    command = "python benchmarks/federated.py " + " ".join(
        f"--{k} {v}"
        for k, v in (
            ("archs", args.archs),
            ("partitions", args.partitions),
            ("clients", args.clients),
            ("seed", args.seed),
        )
    )
    summaries = []
    for arch in args.archs.split(","):
        for partition in args.partitions.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                cell = f"{arch} {partition} {clients} clients"
                records = {}
                for name, config in runs(arch, partition, clients, args.seed).items():
                    folder = args.out / "runs" / f"{arch}-{partition}-{clients}-{name}"
                    start = time.perf_counter()
                    records[name] = run_cached(folder, config)
                    print(f"{cell}: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
                summaries.append(summarise(cell, records))
                atomic_write_text(args.out / "summary.json", json.dumps(summaries, indent=2) + "\n")
    atomic_write_text(args.out / "REPORT.md", markdown(summaries, command))
    plot(summaries, args.out / "rounds.png")
    print(markdown(summaries, command))


if __name__ == "__main__":
    main()
