"""What a federation runs: :class:`FederationConfig`, and its flat form for Flower's records.

The server sends the client-side part of the configuration with every training message (a
Flower ``ConfigRecord`` holds only flat scalars, strings and lists, so nested values travel as
JSON); the clients need nothing else but their own ``partition-id`` / ``num-partitions`` (or
``data-path``) from their node configuration. A real deployment passes the same keys as
Flower's run config (``[tool.flwr.app.config]``), read by :meth:`FederationConfig.from_record`.
This module does not import Flower.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

from neurofuse.checks import integer, number

FUSION_SOURCES = ("client", "server")

#: methods the strategy refuses: their result is not one network of the clients' architecture
MULTI_NETWORK_METHODS = ("ensemble",)


@dataclasses.dataclass
class FederationConfig:
    """One federation: data, model, clients, local training and the server's aggregation.

    Attributes:
        dataset: a registered dataset (``neurofuse datasets``) the simulation partitions among
            the clients; the server evaluates on its test split.
        arch: a zoo architecture (``neurofuse archs``); its input and class sizes come from
            the dataset. Ignored when ``model`` is given.
        model: the user's model class or factory, ``"package.module:Name"`` (importable on
            every client and on the server).
        model_kw: keyword arguments of ``arch`` or ``model``.
        clients: number of clients (Flower SuperNodes).
        partition: how the training split is divided (``iid``, ``dirichlet``, ``sharded``).
        method: the server's aggregation, any single-network neurofuse method
            (``neurofuse methods``).
        options: options of ``method`` (``neurofuse methods --options METHOD``).
        importance: neuron importance score each client computes on its own data and ships
            with its weights (``uniform``: nothing is computed or sent).
        compare: further methods the server applies to the same client models every round,
            for comparison only (they do not drive the next round); ``fedavg`` is always one.
        compare_rounds: apply ``compare`` (and FedAvg) only in rounds ``1..compare_rounds``
            (``None``: every round); a benchmark that follows FedAvg for many rounds needs the
            one-shot fusions of the first round only.
        rounds: federated rounds; 1 is one-shot fusion.
        local_epochs: epochs each client trains per round.
        lr: peak learning rate of the clients' AdamW (warm-up, cosine decay, every round).
        batch_size: clients' batch size.
        fusion_source: ``"client"`` (client ``fusion_client`` sends ``fusion_size`` samples of
            its own data with its first reply, the paper's setting) or ``"server"`` (a set
            the server holds: a class-balanced draw from the whole training split in the
            simulation, a stand-in for a public proxy set).
        fusion_client: the client (partition id) that contributes the fusion set.
        fusion_data: with ``fusion_source="server"``, a file the server holds (``.npz`` with
            ``x`` and optional ``y``, ``.pt``, a CIFAR-style folder); ``None`` draws the set
            from the dataset's training split.
        fusion_size: number of fusion samples.
        min_clients: fewest usable client models a round needs (default: all of them); below
            it the round keeps the previous global model.
        seed: seeds the partition, the initial model, the clients' training and the fusion.
        client_threads: torch threads per client process.
    """

    dataset: str = "mnist5k"
    arch: str | None = "mlp"
    model: str | None = None
    model_kw: dict[str, Any] = dataclasses.field(default_factory=dict)
    clients: int = 4
    partition: str = "dirichlet"
    method: str = "kf_linear"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    importance: str = "uniform"
    compare: tuple[str, ...] = ()
    compare_rounds: int | None = None
    rounds: int = 1
    local_epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    fusion_source: Literal["client", "server"] = "client"
    fusion_client: int = 0
    fusion_data: str | None = None
    fusion_size: int = 400
    min_clients: int | None = None
    seed: int = 0
    client_threads: int = 1

    def __post_init__(self) -> None:
        from neurofuse.data import PARTITION_SCHEMES
        from neurofuse.methods.registry import get_method

        self.compare = tuple(self.compare)
        ints = {
            "clients": (self.clients, 2),
            "rounds": (self.rounds, 1),
            "local_epochs": (self.local_epochs, 1),
            "batch_size": (self.batch_size, 1),
            "fusion_size": (self.fusion_size, 1),
            "fusion_client": (self.fusion_client, 0),
            "client_threads": (self.client_threads, 1),
            "seed": (self.seed, 0),
        }
        for name, (value, low) in ints.items():
            setattr(self, name, integer(name, value, low, requirement=f"an integer >= {low}"))
        number("lr", self.lr, above=0)
        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(
                f"unknown partition {self.partition!r}; use one of "
                f"{', '.join(sorted(PARTITION_SCHEMES))}"
            )
        if self.fusion_source not in FUSION_SOURCES:
            raise ValueError(
                f"fusion_source must be one of {FUSION_SOURCES}, got {self.fusion_source!r}"
            )
        if self.fusion_client >= self.clients:
            raise ValueError(
                f"fusion_client {self.fusion_client} is not a client (partition ids run from 0 "
                f"to {self.clients - 1})"
            )
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients:
            raise ValueError(
                f"min_clients must lie in [1, clients={self.clients}], got {self.min_clients}"
            )
        if self.compare_rounds is not None and (
            isinstance(self.compare_rounds, bool)
            or not isinstance(self.compare_rounds, int)
            or self.compare_rounds < 0
        ):
            raise ValueError(f"compare_rounds must be an integer >= 0, got {self.compare_rounds!r}")
        if self.arch is None and self.model is None:
            raise ValueError("give arch (a zoo architecture) or model ('package.module:Name')")
        for method in (self.method, *self.compare):
            get_method(method)  # an unknown name raises, listing the valid ones
            if method.startswith("hf_") and self.clients != 2:
                raise ValueError(
                    f"{method} (Hungarian fusion) fuses exactly two models; with "
                    f"{self.clients} clients use the K-means variant "
                    f"{method.replace('hf_', 'kf_')}"
                )
            if method in MULTI_NETWORK_METHODS:
                raise ValueError(
                    f"method {method!r} returns several networks, not one model the clients "
                    "can start the next round from; use a fusion method"
                )

    @property
    def required_clients(self) -> int:
        return self.clients if self.min_clients is None else self.min_clients

    def model_spec(self, model_kw: dict[str, Any] | None = None) -> Any:
        """The :class:`neurofuse.sources.ModelSpec` of the federation's model: ``model`` when
        given, else ``arch``; ``model_kw`` replaces the configured keyword arguments (the
        server's resolved ones)."""
        from neurofuse.sources import ModelSpec

        kwargs = self.model_kw if model_kw is None else model_kw
        return ModelSpec(target=self.model, arch=None if self.model else self.arch, kwargs=kwargs)

    def client_record(self, model_kw: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flat configuration every client receives with its training message;
        ``model_kw``: the model's keyword arguments as the server resolved them (a zoo
        architecture's input and class sizes filled in from the dataset)."""
        record = {
            "dataset": self.dataset,
            "arch": "" if self.model else self.arch or "",
            "model": self.model or "",
            "model-kw": json.dumps(self.model_kw if model_kw is None else model_kw, sort_keys=True),
            "partition": self.partition,
            "importance": self.importance,
            "local-epochs": self.local_epochs,
            "lr": float(self.lr),
            "batch-size": self.batch_size,
            "fusion-client": self.fusion_client if self.fusion_source == "client" else -1,
            "fusion-size": self.fusion_size,
            "seed": self.seed,
            "threads": self.client_threads,
        }
        # no empty strings: Flower 1.41's ConfigRecord.count_bytes refuses them
        return {k: v for k, v in record.items() if v != ""}

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FederationConfig:
        """A configuration from Flower's run config (``[tool.flwr.app.config]``): the keys of
        :meth:`to_dict` with ``-`` or ``_``; ``model-kw`` and ``options`` as JSON strings,
        ``compare`` as a comma-separated string."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in record.items():
            name = key.replace("-", "_")
            if name not in fields:
                continue  # other apps' keys may share the run config
            if name in ("model_kw", "options") and isinstance(value, str):
                value = json.loads(value) if value else {}
            elif name == "compare" and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif name in (
                "arch",
                "model",
                "min_clients",
                "fusion_data",
                "compare_rounds",
            ) and value in ("", -1):
                value = None
            kwargs[name] = value
        return cls(**kwargs)


def client_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """The client's view of :meth:`FederationConfig.client_record`, with its types restored."""
    missing = [k for k in ("dataset", "local-epochs", "lr", "batch-size") if k not in record]
    if missing:
        raise ValueError(
            f"the training message lacks {missing}: is this server a neurofuse federation?"
        )
    return {
        "dataset": str(record["dataset"]),
        "arch": str(record.get("arch", "")) or None,
        "model": str(record.get("model", "")) or None,
        "model_kw": json.loads(str(record.get("model-kw", "{}")) or "{}"),
        "partition": str(record.get("partition", "iid")),
        "importance": str(record.get("importance", "uniform")),
        "epochs": int(record["local-epochs"]),
        "lr": float(record["lr"]),
        "batch_size": int(record["batch-size"]),
        "fusion_client": int(record.get("fusion-client", -1)),
        "fusion_size": int(record.get("fusion-size", 400)),
        "seed": int(record.get("seed", 0)),
        "threads": int(record.get("threads", 1)),
        "round": int(record.get("server-round", 1)),
    }
