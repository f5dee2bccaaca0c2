"""The federation's ``ClientApp`` (:data:`app`): train locally, score neurons, send weights.

A client learns everything it needs from the server's training message (dataset, model,
epochs, learning rate, importance score, whether it contributes the fusion set: see
:meth:`FederationConfig.client_record`) and from its own node configuration:

- ``partition-id`` and ``num-partitions`` (set by the simulation, or by
  ``flower-supernode --node-config``): the client trains on that part of the dataset's
  training split, partitioned with the federation's scheme and seed; or
- ``data-path``: its own ``.npz`` (``x``, ``y``) or ``.pt`` file, for a real deployment where
  every client holds private data (``partition-id`` still names it in the reports).

The client trains the global model it received (every round starts from the server's model),
computes importance scores on its own data when the server asks for them, and replies with
the records described in :mod:`neurofuse.federated.records`. Any exception becomes Flower's
error reply, which the server logs and leaves out.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from neurofuse.federated.config import client_settings
from neurofuse.federated.records import (
    ARRAYS,
    FUSION_SET,
    IMPORTANCE,
    METRICS,
    from_arrays,
    to_arrays,
)

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _partitioned(dataset: str, n: int, scheme: str, seed: int) -> tuple[Any, Any]:
    from neurofuse.data import load, partition

    splits = load(dataset, seed=0)
    part = partition(splits.y_train, n, scheme, seed=seed, num_classes=splits.num_classes)
    return splits, part


def local_data(settings: dict[str, Any], node_config: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """This client's training data: its ``data-path`` file, or its part of the dataset."""
    path = node_config.get("data-path")
    if path:
        from neurofuse.data import load_fusion_file

        x, y = load_fusion_file(str(path))
        if y is None:
            raise ValueError(f"{path}: a client's data file needs labels (y) to train on")
        return x, y
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "this client has neither data-path nor partition-id/num-partitions in its node "
            "configuration (flower-supernode --node-config 'partition-id=0 num-partitions=4')"
        )
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    splits, part = _partitioned(settings["dataset"], n, settings["partition"], settings["seed"])
    idx = part.indices[pid]
    return splits.x_train[idx], splits.y_train[idx]


def build_model(settings: dict[str, Any]) -> nn.Module:
    """The federation's architecture, with the keyword arguments the server resolved."""
    from neurofuse.sources import ModelSpec

    spec = ModelSpec(target=settings["model"], arch=settings["arch"], kwargs=settings["model_kw"])
    return spec.build()


def _received_model(message: Message, settings: dict[str, Any]) -> nn.Module:
    model = build_model(settings)
    state = from_arrays(message.content.array_records[ARRAYS])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"the server's model does not fit this client's model class: {err}"
        ) from err
    return model


def _seed(settings: dict[str, Any], pid: int) -> int:
    return settings["seed"] * 1_000_003 + 1009 * pid + settings["round"]


def train_client(message: Message, context: Context) -> Message:
    """Train the received model on local data; reply with weights, counts and extras."""
    from neurofuse.data import fusion_indices
    from neurofuse.importance import compute_importance
    from neurofuse.train import TrainConfig, train_model

    settings = client_settings(message.content.config_records["config"])
    torch.set_num_threads(settings["threads"])
    node_config = dict(context.node_config)
    pid = int(node_config.get("partition-id", -1))
    x, y = local_data(settings, node_config)
    model = _received_model(message, settings)
    num_classes = int(list(model.state_dict().values())[-1].shape[0])
    seed = _seed(settings, pid)
    torch.manual_seed(seed)
    config = TrainConfig(
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        seed=seed,
        device="cpu",
        progress=False,
    )
    start = time.perf_counter()
    train_model(model, x, y, config, num_classes=num_classes)
    seconds = time.perf_counter() - start
    model.eval()
    counts = torch.bincount(y, minlength=num_classes)
    content = RecordDict(
        {
            ARRAYS: to_arrays(model.state_dict()),
            METRICS: MetricRecord(
                {
                    "num-examples": len(y),
                    "class-counts": [int(c) for c in counts],
                    "num-classes": num_classes,
                    "partition-id": pid,
                    "train-seconds": seconds,
                }
            ),
        }
    )
    n_local = min(settings["fusion_size"], len(y))
    if settings["importance"] != "uniform" or settings["fusion_client"] == pid:
        idx = fusion_indices(y, None, n_local, seed=settings["seed"])
        if settings["importance"] != "uniform":
            scores = compute_importance(model, (x[idx], y[idx]), settings["importance"])[0]
            content[IMPORTANCE] = to_arrays(scores)
        if settings["fusion_client"] == pid:
            content[FUSION_SET] = to_arrays({"x": x[idx], "y": y[idx]})
    return Message(content=content, reply_to=message)


def evaluate_client(message: Message, context: Context) -> Message:
    """Accuracy and loss of the received model on this client's own data."""
    from neurofuse.evaluate import evaluate

    settings = client_settings(message.content.config_records["config"])
    torch.set_num_threads(settings["threads"])
    x, y = local_data(settings, dict(context.node_config))
    metrics = evaluate(_received_model(message, settings), x, y)
    record = MetricRecord(
        {"num-examples": len(y), "accuracy": metrics.accuracy, "loss": metrics.nll}
    )
    return Message(content=RecordDict({METRICS: record}), reply_to=message)


app.train()(train_client)
app.evaluate()(evaluate_client)
