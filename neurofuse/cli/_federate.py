"""``neurofuse federate``: a Flower federation with neurofuse aggregation, simulated here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from neurofuse.cli._common import parse_pairs


def federate(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to partition.")] = (
        "mnist5k"
    ),
    arch: Annotated[str, typer.Option(help="Zoo architecture (see: neurofuse archs).")] = "mlp",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="MODULE:CLASS",
            help="Your model class instead of --arch (importable by every client).",
        ),
    ] = None,
    model_kw: Annotated[
        list[str] | None,
        typer.Option("--model-kw", metavar="KEY=VALUE", help="Model argument, JSON value."),
    ] = None,
    clients: Annotated[int, typer.Option(help="Number of clients.")] = 4,
    partition: Annotated[str, typer.Option(help="iid | dirichlet | sharded.")] = "dirichlet",
    method: Annotated[
        str, typer.Option("--method", "-m", help="Server aggregation (a fusion method).")
    ] = "kf_linear",
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", metavar="KEY=VALUE", help="Method option, JSON value."),
    ] = None,
    importance: Annotated[
        str, typer.Option(help="Score each client computes on its own data and sends.")
    ] = "uniform",
    compare: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods also applied to the same client models each round "
            "(fedavg always is).",
        ),
    ] = None,
    compare_rounds: Annotated[
        int | None,
        typer.Option(help="Apply --compare (and fedavg) only up to this round [default: all]."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds (1: one-shot fusion).")] = 1,
    local_epochs: Annotated[int, typer.Option(help="Client epochs per round.")] = 20,
    lr: Annotated[float, typer.Option(help="Clients' peak learning rate (AdamW).")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Clients' batch size.")] = 64,
    fusion_source: Annotated[
        str,
        typer.Option(
            help="client: one client sends part of its data (the paper's setting); server: a "
            "set the server holds.",
        ),
    ] = "client",
    fusion_client: Annotated[
        int, typer.Option(help="Partition id of the client that sends the fusion set.")
    ] = 0,
    fusion_data: Annotated[
        Path | None,
        typer.Option(help="With --fusion-source server: the server's fusion-set file."),
    ] = None,
    fusion_size: Annotated[int, typer.Option(help="Fusion samples.")] = 400,
    min_clients: Annotated[
        int | None, typer.Option(help="Fewest usable client models per round [default: all].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the split, the model and every choice.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for results.json, report.md, accuracy.png, the global model."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json's content on stdout.")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and the clients' logs.")] = False,
) -> None:
    """Run a federated fusion on this machine in Flower's simulation runtime (offline, CPU).

    Every client trains the server's model on its part of the dataset for --local-epochs and
    sends its weights (and importance scores, and for one client the fusion set); the server
    aggregates with --method, evaluates on the test split, and starts the next round from the
    result. FedAvg of the same client models is measured alongside. Needs the extra:
    pip install "neurofuse[federated]". The same server and client run on real machines with
    Flower's flwr run (README: Federated fusion).
    """
    import importlib.util

    from neurofuse.cli import console
    from neurofuse.federated import FLOWER_HINT, FederationConfig, simulate

    if importlib.util.find_spec("flwr") is None:
        raise ValueError(f"neurofuse federate needs Flower: {FLOWER_HINT}")
    config = FederationConfig(
        dataset=dataset,
        arch=None if model else arch,
        model=model,
        model_kw=parse_pairs(model_kw, "--model-kw"),
        clients=clients,
        partition=partition,
        method=method,
        options=parse_pairs(option, "--option"),
        importance=importance,
        compare=tuple(c.strip() for c in (compare or "").split(",") if c.strip()),
        compare_rounds=compare_rounds,
        rounds=rounds,
        local_epochs=local_epochs,
        lr=lr,
        batch_size=batch_size,
        fusion_source=fusion_source,  # type: ignore[arg-type]  # the config checks it
        fusion_client=fusion_client,
        fusion_data=None if fusion_data is None else str(fusion_data),
        fusion_size=fusion_size,
        min_clients=min_clients,
        seed=seed,
    )
    if out is not None and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    result = simulate(config, out, progress=not as_json, verbose=verbose)
    record: dict[str, Any] = result.to_dict()
    if as_json:
        from neurofuse.utils import to_jsonable

        print(json.dumps(to_jsonable(record), indent=2))
        return
    _print_summary(console, result, out)


def _print_summary(console: Any, result: Any, out: Path | None) -> None:
    from rich.table import Table

    c = result.config
    table = Table(
        title=f"{c.clients} clients, {c.partition} {c.dataset}, {c.rounds} round(s): test accuracy"
    )
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row(f"global model ({c.method})", f"{100 * result.fused_accuracy:.1f}")
    for name, acc in result.compared.items():
        table.add_row(f"{name} (same client models)", f"{100 * acc:.1f}")
    if result.ensemble_accuracy is not None:
        table.add_row("ensemble of the clients", f"{100 * result.ensemble_accuracy:.1f}")
    for i, acc in enumerate(result.client_accuracies):
        table.add_row(f"client {i}", f"{100 * acc:.1f}")
    console.print(table)
    for item in result.left_out:
        console.print(f"round {item['round']}: node {item['node']} left out: {item['reason']}")
    console.print(
        f"fusion set: {result.fusion_size} samples from {result.fusion_source}; "
        f"{result.bytes_down / 2**20:.2f} MiB down, {result.bytes_up / 2**20:.2f} MiB up; "
        f"{result.seconds:.1f} s"
    )
    if out is not None:
        console.print(f"wrote {out}/results.json, report.md, accuracy.png, global.safetensors")
