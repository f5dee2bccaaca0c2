"""``FusionStrategy``: Flower's FedAvg with a neurofuse method in place of the average.

Sampling, messaging, evaluation rounds and the round loop (``Strategy.start``) are Flower's;
only ``aggregate_train`` changes: every reply is checked (:func:`records.read_reply`), replies
that failed or carry another architecture, another class count, non-finite weights or malformed
extras are left out with the reason logged and kept in :attr:`FusionStrategy.rounds`, and the
rest are fused with :func:`neurofuse.fuse` on the fusion set. Flower's own reply validation is
not used: it raises on the first inconsistent reply, which would end the round for everyone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from logging import ERROR, INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import Tensor, nn

from neurofuse.federated.config import MULTI_NETWORK_METHODS
from neurofuse.federated.records import (
    ClientUpdate,
    Rejection,
    load_state,
    read_reply,
    to_arrays,
)


@dataclasses.dataclass
class RoundRecord:
    """What happened in one training round.

    Attributes:
        round: the server round (from 1).
        used: node ids whose models were fused.
        left_out: ``(node id, reason)`` of every reply that was not used.
        bytes_down: bytes sent to clients (model weights and configuration).
        bytes_up: bytes the used and refused replies carried (weights, metrics, extras).
        seconds: time the server spent aggregating (fusion and comparisons).
        class_counts: each used client's samples per class.
        compare_errors: comparison methods that failed, with their error.
    """

    round: int
    used: list[int] = dataclasses.field(default_factory=list)
    left_out: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    class_counts: list[list[int]] = dataclasses.field(default_factory=list)
    compare_errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RoundModels:
    """The models of the latest aggregated round (for evaluation on the server)."""

    round: int
    clients: list[nn.Module]
    fused: nn.Module
    compared: dict[str, nn.Module]


class FusionStrategy(FedAvg):
    """Federated aggregation by neuron-interpolation fusion (or any single-network method).

    Args:
        template: the federation's model; replies must match its ``state_dict`` keys and
            shapes. It is copied, never modified.
        method: a :func:`neurofuse.available_methods` name that returns one network.
        fusion_data: the server's fusion set (inputs, or an ``(inputs, labels)`` pair); ``None``
            takes the one a client sends (the ``"fusion-set"`` record of its reply).
        options: options of ``method``. ``fedavg`` gets ``sample_counts`` from the replies.
        compare: further methods applied to the same client models every round, kept in
            :attr:`latest` for evaluation, never sent to clients; a failing one is recorded.
        compare_rounds: apply ``compare`` only in rounds ``1..compare_rounds`` (``None``: all).
        seed: the fusion's seed.
        device: where to fuse (default CPU).
        progress: show the fusion's progress bars.
        **fedavg_kwargs: Flower ``FedAvg`` arguments (``min_train_nodes``,
            ``min_available_nodes``, ``fraction_train``, ``fraction_evaluate``, ...).
            ``min_train_nodes`` is also the fewest usable replies a round needs; below it the
            round keeps the previous global model.

    After each round, :attr:`rounds` holds a :class:`RoundRecord` and :attr:`latest` the
    client models, the fused model and the comparison models.
    """

    def __init__(
        self,
        template: nn.Module,
        method: str = "kf_linear",
        *,
        fusion_data: Any = None,
        options: dict[str, Any] | None = None,
        compare: Sequence[str] = (),
        compare_rounds: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        from neurofuse.methods.registry import get_method

        super().__init__(**fedavg_kwargs)
        for name in (method, *compare):
            get_method(name)
            if name in MULTI_NETWORK_METHODS:
                raise ValueError(f"method {name!r} returns several networks; use a fusion method")
        if not isinstance(template, nn.Module):
            raise TypeError(f"template must be an nn.Module, got {type(template).__name__}")
        self.template = load_state(template, template.state_dict()).cpu()  # a copy
        self.template_state = {
            k: v.detach().cpu().clone() for k, v in template.state_dict().items()
        }
        self.method = method
        self.options = dict(options or {})
        self.compare = tuple(c for c in compare if c != method)
        self.compare_rounds = compare_rounds
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = progress
        self.fusion_data = fusion_data
        self.fusion_source = "server" if fusion_data is not None else None
        self.rounds: list[RoundRecord] = []
        self.latest: RoundModels | None = None
        self._down: dict[int, int] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Aggregation: neurofuse %s (compared: %s)", self.method, self.compare)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fusion_data is not None and config.get("fusion-client", -1) != -1:
            # the fusion set is here already: no client needs to send it again
            config = ConfigRecord({**config, "fusion-client": -1})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        per_message = arrays.count_bytes() + config.count_bytes()
        self._down[server_round] = per_message * len(messages)
        return messages

    def _fusion_set(self, updates: list[ClientUpdate]) -> Any:
        if self.fusion_data is None:
            for update in updates:
                if update.fusion_set is not None:
                    self.fusion_data = update.fusion_set
                    who = (
                        f"partition {update.partition_id}"
                        if update.partition_id is not None and update.partition_id >= 0
                        else f"node {update.node_id}"
                    )
                    self.fusion_source = f"client {who} (its own training data)"
                    break
        if self.fusion_data is None:
            raise ValueError(
                "no fusion set: give FusionStrategy(fusion_data=...) a set the server holds, "
                "or let one client send its own (fusion_source='client' in the federation's "
                "configuration)"
            )
        return self.fusion_data

    def _fuse(self, method: str, models: list[nn.Module], updates: list[ClientUpdate]) -> nn.Module:
        import neurofuse as nf
        from neurofuse.methods.registry import get_method

        info = get_method(method)
        options = dict(self.options) if method == self.method else {}
        if method == "fedavg":
            options["sample_counts"] = [u.num_examples for u in updates]
        importance: Any = "uniform"
        scores = [u.importance for u in updates]
        if info.caps.importance and all(s is not None for s in scores):
            importance = scores
        elif info.caps.importance and any(s is not None for s in scores):
            log(WARNING, "only some clients sent importance scores; fusing with uniform ones")
        fused = nf.fuse(
            models,
            self._fusion_set(updates),
            method=method,
            importance=importance,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
            **options,
        )
        state = fused.state_dict()
        if [(k, tuple(v.shape)) for k, v in state.items()] != [
            (k, tuple(v.shape)) for k, v in self.template_state.items()
        ]:
            raise ValueError(
                f"method {method!r} returned a model of another shape than the federation's; "
                "it cannot be the next round's global model (use a method whose target is the "
                "clients' architecture)"
            )
        return fused.cpu()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        record = RoundRecord(round=server_round, bytes_down=self._down.get(server_round, 0))
        self.rounds.append(record)
        updates: list[ClientUpdate] = []
        for message in replies:
            outcome = read_reply(message, self.template_state)
            if isinstance(outcome, Rejection):
                record.left_out.append((outcome.node_id, outcome.reason))
                log(
                    WARNING,
                    "round %d: client node %d left out of the aggregation: it %s",
                    server_round,
                    outcome.node_id,
                    outcome.reason,
                )
                continue
            updates.append(outcome)
            record.bytes_up += outcome.bytes
        updates.sort(key=lambda u: (u.partition_id is None, u.partition_id, u.node_id))
        record.used = [u.node_id for u in updates]
        record.class_counts = [u.class_counts for u in updates]
        log(INFO, "round %d: %d usable client models", server_round, len(updates))
        if len(updates) < max(self.min_train_nodes, 1):
            log(
                ERROR,
                "round %d: %d usable client models, fewer than min_train_nodes=%d; the global "
                "model stays as it was",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            return None, None
        models = [load_state(self.template, u.state) for u in updates]
        fused = self._fuse(self.method, models, updates)
        compared: dict[str, nn.Module] = {}
        compare = self.compare
        if self.compare_rounds is not None and server_round > self.compare_rounds:
            compare = ()
        for name in compare:
            try:
                compared[name] = self._fuse(name, models, updates)
            except (ValueError, TypeError, RuntimeError) as err:
                record.compare_errors[name] = str(err)
                log(WARNING, "round %d: comparison %s failed: %s", server_round, name, err)
        self.latest = RoundModels(server_round, models, fused, compared)
        record.seconds = time.perf_counter() - start
        metrics = MetricRecord(
            {
                "num-examples": sum(u.num_examples for u in updates),
                "clients-used": len(updates),
                "clients-left-out": len(record.left_out),
            }
        )
        return to_arrays(_as_template_dtypes(fused.state_dict(), self.template_state)), metrics


def _as_template_dtypes(state: dict[str, Tensor], template: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().to(template[k].dtype) for k, v in state.items()}
