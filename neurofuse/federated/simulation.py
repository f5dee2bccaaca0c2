"""The whole federation on this machine: Flower's simulation runtime (Ray), offline, CPU.

:func:`simulate` runs the same ``ServerApp`` logic (:func:`neurofuse.federated.server.serve`)
and the same ``ClientApp`` (:data:`neurofuse.federated.client.app`) as a deployment; Flower
runs each client in a Ray worker process (one CPU each, ``config.client_threads`` torch
threads) and the server in this process. The result is a :class:`FederationResult`; with
``out`` it is written as ``results.json``, ``report.md``, ``accuracy.png`` and the final global
model (``global.safetensors`` + ``global.json``, loadable by ``neurofuse eval``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from neurofuse.federated.config import FederationConfig


@dataclasses.dataclass
class FederationResult:
    """What a federation measured (accuracies on the dataset's test split, in [0, 1]).

    Attributes:
        config: the federation's configuration.
        fused_accuracy: the final global model (the configured method's aggregate).
        fedavg_accuracy: FedAvg of the same client models in the last aggregated round.
        client_accuracies: each client's model in the last aggregated round.
        ensemble_accuracy: their probability ensemble (clients x the inference cost).
        compared: each comparison method's accuracy in the last aggregated round.
        history: one dict per round (see :class:`neurofuse.federated.server.ServerOutcome`).
        bytes_down, bytes_up: payload bytes sent to and received from clients, all rounds.
        fusion_source, fusion_size: where the fusion set came from, and its size.
        left_out: every reply that was not used, with its round and reason.
        seconds: wall time of the simulation.
        model_kw: the model's keyword arguments as the server resolved them.
        state: the final global model's weights (not in ``to_dict``).
    """

    config: FederationConfig
    fused_accuracy: float
    fedavg_accuracy: float | None
    client_accuracies: list[float]
    ensemble_accuracy: float | None
    compared: dict[str, float]
    history: list[dict[str, Any]]
    bytes_down: int
    bytes_up: int
    fusion_source: str
    fusion_size: int
    left_out: list[dict[str, Any]]
    seconds: float
    model_kw: dict[str, Any]
    state: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "rounds": self.config.rounds,
            "clients": self.config.clients,
            "fused_accuracy": self.fused_accuracy,
            "fedavg_accuracy": self.fedavg_accuracy,
            "client_accuracies": self.client_accuracies,
            "ensemble_accuracy": self.ensemble_accuracy,
            "compared": self.compared,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "fusion_source": self.fusion_source,
            "fusion_size": self.fusion_size,
            "left_out": self.left_out,
            "seconds": self.seconds,
            "config": self.config.to_dict(),
            "model_kw": self.model_kw,
            "history": self.history,
        }


def summarise(config: FederationConfig, outcome: Any, seconds: float) -> FederationResult:
    history = outcome.history
    aggregated = [row for row in history if "client_accuracies" in row]
    last = aggregated[-1] if aggregated else {}
    left_out = [
        {"round": row["round"], **item} for row in history for item in row.get("left_out", [])
    ]
    return FederationResult(
        config=config,
        fused_accuracy=history[-1]["accuracy"],
        fedavg_accuracy=(
            history[-1]["accuracy"]
            if config.method == "fedavg"
            else last.get("compared", {}).get("fedavg")
        ),
        client_accuracies=last.get("client_accuracies", []),
        ensemble_accuracy=last.get("ensemble_accuracy"),
        compared=dict(last.get("compared", {})),
        history=history,
        bytes_down=sum(row.get("bytes_down", 0) for row in history),
        bytes_up=sum(row.get("bytes_up", 0) for row in history),
        fusion_source=outcome.fusion_source,
        fusion_size=outcome.fusion_size,
        left_out=left_out,
        seconds=seconds,
        model_kw=outcome.model_kw,
        state=outcome.state,
    )


class _QuietFlower(logging.Filter):
    """Drops Flower's warnings about choices this module makes on purpose: ``run_simulation``
    (deprecated for ``flwr run``, which needs a Flower app project; the README shows it for
    deployments) and ``fraction_evaluate=0`` (the server evaluates on the test split)."""

    EXPECTED = ("DEPRECATED FEATURE", "run_simulation", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


def backend_config(config: FederationConfig, verbose: bool) -> dict[str, Any]:
    """Ray's resources: one CPU per client, at most as many workers as this machine's CPUs."""
    cpus = max(1, min(config.clients, os.cpu_count() or 1))
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }


def simulate(
    config: FederationConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    verbose: bool = False,
    client_app: Any = None,
) -> FederationResult:
    """Run the federation of ``config`` in Flower's simulation runtime and measure it.

    Args:
        config: the federation.
        out: a folder for ``results.json``, ``report.md``, ``accuracy.png`` and the global
            model; ``None`` writes nothing.
        progress: show which round is training and how many clients have replied (stderr).
        verbose: show Flower's and the clients' logs (otherwise warnings and errors only).
        client_app: a Flower ``ClientApp`` to run instead of neurofuse's (for clients that load
            their data or train their own way; it must reply as
            :mod:`neurofuse.federated.records` says).

    A client that fails or replies with another architecture is left out of its round (the
    reason is in ``result.left_out``); the run stops with the server's error when a round has
    fewer usable models than ``config.min_clients`` and nothing can be aggregated at all, or
    when the aggregation itself fails.
    """
    from neurofuse.federated import require_flower

    require_flower()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline machines: no telemetry
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import warnings

    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from neurofuse.federated.client import app as default_client
    from neurofuse.federated.server import serve

    box: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            box["outcome"] = serve(grid, config, progress=progress)
        except BaseException as err:  # re-raised in this thread once Flower has shut down
            box["error"] = err

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    quiet = _QuietFlower()
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(quiet)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=default_client if client_app is None else client_app,
                num_supernodes=config.clients,
                backend_config=backend_config(config, verbose),
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)
    if "error" in box:
        raise box["error"]
    if "outcome" not in box:
        raise RuntimeError("the Flower simulation ended without a result; rerun with --verbose")
    result = summarise(config, box["outcome"], time.perf_counter() - start)
    if out is not None:
        from neurofuse.federated.report import write_outputs

        write_outputs(result, Path(out))
    return result
