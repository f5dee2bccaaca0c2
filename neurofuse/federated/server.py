"""The server side of a federation: what the ``ServerApp`` runs, in a simulation or a deployment.

:func:`serve` builds the federation's model (seeded, the same initial weights for every client),
the fusion set when the server holds it, and a :class:`FusionStrategy` that aggregates with the
configured method and, for comparison, FedAvg and the ``compare`` methods on the same client
models; it runs Flower's round loop and evaluates on the dataset's test split after every round:
the global model, every client's model, their probability ensemble and each comparison.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import Tensor, nn

from neurofuse.federated.config import FederationConfig
from neurofuse.federated.records import from_arrays, load_state, to_arrays
from neurofuse.federated.strategy import FusionStrategy

COMPARISON = "fedavg"
"""Always applied to the same client models as the configured method (the question every
federated user asks first: better than averaging?)."""


@dataclasses.dataclass
class ServerOutcome:
    """What the server saw and measured.

    Attributes:
        history: one dict per round (round 0: the initial model): ``accuracy`` of the global
            model and, from round 1, ``client_accuracies``, ``ensemble_accuracy``,
            ``compared`` (method -> accuracy), ``bytes_down``, ``bytes_up``, ``used``,
            ``left_out``, ``class_counts``, ``aggregation_seconds``, ``seconds`` (wall time
            since the start).
        state: the final global model's weights.
        model_kw: the model's keyword arguments as resolved on the server.
        fusion_source: where the fusion set came from.
        fusion_size: its number of samples.
    """

    history: list[dict[str, Any]]
    state: dict[str, Tensor]
    model_kw: dict[str, Any]
    fusion_source: str
    fusion_size: int


def resolve_model(config: FederationConfig, splits: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The federation's initial model (seeded) and its resolved keyword arguments."""
    kwargs = dict(config.model_kw)
    if config.model is None:
        from neurofuse.cli._common import architecture_kwargs

        assert config.arch is not None
        kwargs = architecture_kwargs(config.arch, kwargs, splits)
    torch.manual_seed(config.seed)
    return config.model_spec(kwargs).build().eval(), kwargs


def server_fusion_set(config: FederationConfig, splits: Any) -> tuple[Any, str] | None:
    """The fusion set the server holds (``fusion_source="server"``), or None."""
    if config.fusion_source != "server":
        return None
    if config.fusion_data is not None:
        from neurofuse.data import load_fusion_file

        x, y = load_fusion_file(config.fusion_data)
        return (x if y is None else (x, y)), f"server file {config.fusion_data}"
    from neurofuse.data import fusion_indices

    idx = fusion_indices(splits.y_train, None, config.fusion_size, seed=config.seed)
    return splits.subset(idx), "server (class-balanced draw from the whole training split)"


class ProgressGrid(Grid):
    """A ``Grid`` that shows how many clients have replied while a round trains (stderr)."""

    def __init__(self, grid: Grid, enabled: bool) -> None:
        self._grid = grid
        self._enabled = enabled
        self._calls = 0

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from neurofuse.progress import progress_bar

        messages = list(messages)
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        if kind.startswith("train"):
            self._calls += 1
        pending = set(self.push_messages(messages))
        total = len(pending)
        end = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        label = f"round {self._calls}: clients {kind.split('.')[0]}ing"
        with progress_bar(self._enabled, label, total) as update:
            while pending and (end is None or time.time() < end):
                got = list(self.pull_messages(pending))
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                update(total - len(pending))
                if pending:
                    time.sleep(0.1)
        return replies


def serve(grid: Grid, config: FederationConfig, progress: bool = False) -> ServerOutcome:
    """Run the federation's rounds on ``grid`` and measure every round (see the module)."""
    from neurofuse.data import load
    from neurofuse.evaluate import evaluate, evaluate_ensemble

    start = time.perf_counter()
    splits = load(config.dataset, seed=0)
    template, model_kw = resolve_model(config, splits)
    held = server_fusion_set(config, splits)
    strategy = FusionStrategy(
        template,
        config.method,
        fusion_data=None if held is None else held[0],
        options=config.options,
        compare=(COMPARISON, *config.compare),
        compare_rounds=config.compare_rounds,
        seed=config.seed,
        min_train_nodes=config.required_clients,
        min_available_nodes=config.clients,
        fraction_evaluate=0.0,
    )
    x_test, y_test = splits.x_test, splits.y_test
    history: list[dict[str, Any]] = []

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, x_test, y_test).accuracy

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": accuracy(load_state(template, from_arrays(arrays))),
        }
        if server_round > 0:
            record = strategy.rounds[-1]
            row.update(
                used=record.used,
                left_out=[{"node": n, "reason": r} for n, r in record.left_out],
                bytes_down=record.bytes_down,
                bytes_up=record.bytes_up,
            )
            latest = strategy.latest
            if latest is not None and latest.round == server_round:
                row.update(
                    client_accuracies=[accuracy(m) for m in latest.clients],
                    ensemble_accuracy=evaluate_ensemble(latest.clients, x_test, y_test).accuracy,
                    compared={name: accuracy(m) for name, m in latest.compared.items()},
                    compare_errors=dict(record.compare_errors),
                    class_counts=record.class_counts,
                    aggregation_seconds=record.seconds,
                )
            else:
                row["skipped"] = True
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        return MetricRecord({"accuracy": row["accuracy"]})

    client_record = config.client_record(model_kw)
    result = strategy.start(  # Flower writes server-round into each: two records
        grid=ProgressGrid(grid, progress),
        initial_arrays=to_arrays(template.state_dict()),
        num_rounds=config.rounds,
        train_config=ConfigRecord(client_record),
        evaluate_config=ConfigRecord(client_record),
        evaluate_fn=evaluate_round,
    )
    final = result.arrays if len(result.arrays) else to_arrays(template.state_dict())
    fusion_source = strategy.fusion_source or "none (no round was aggregated)"
    fusion_size = 0
    if strategy.fusion_data is not None:
        data = strategy.fusion_data
        fusion_size = len(data[0] if isinstance(data, tuple) else data)
    return ServerOutcome(
        history=history,
        state=from_arrays(final),
        model_kw=model_kw,
        fusion_source=fusion_source if held is None else held[1],
        fusion_size=fusion_size,
    )
