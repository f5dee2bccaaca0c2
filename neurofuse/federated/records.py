"""What travels between clients and server, and the server's checks on what comes back.

A client's training reply holds, under these keys of its ``RecordDict``:

- ``"arrays"``: its model's ``state_dict`` (an ``ArrayRecord``);
- ``"metrics"``: ``num-examples`` (its training samples, FedAvg's weight), ``class-counts``
  (samples per class), ``num-classes`` and ``train-seconds``;
- ``"importance"`` (optional): one score tensor per fx node, computed on its own data
  (``neurofuse.compute_importance``);
- ``"fusion-set"`` (optional, one client, first round): ``x`` and ``y`` of the samples it
  contributes as the fusion set.

Every tensor is copied out of a record, never viewed, so no client's weights can be changed by
the server's work on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import Tensor, nn

ARRAYS = "arrays"
METRICS = "metrics"
IMPORTANCE = "importance"
FUSION_SET = "fusion-set"


def to_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_arrays(record: ArrayRecord) -> dict[str, Tensor]:
    # Array.numpy() deserialises a fresh read-only buffer; copy it into a writable tensor
    return {k: torch.tensor(v.numpy()) for k, v in record.items()}


def payload_bytes(record: RecordDict) -> int:
    """Bytes of every array and metric in ``record`` (tensor data, not protocol framing)."""
    total = 0
    for value in record.values():
        if isinstance(value, ArrayRecord | MetricRecord):
            total += value.count_bytes()
    return total


@dataclasses.dataclass
class ClientUpdate:
    """One usable training reply: the client's model and what came with it."""

    node_id: int
    partition_id: int | None
    state: dict[str, Tensor]
    num_examples: int
    class_counts: list[int]
    importance: dict[str, Tensor] | None
    fusion_set: tuple[Tensor, Tensor] | None
    bytes: int


@dataclasses.dataclass
class Rejection:
    """A reply left out of a round, and why."""

    node_id: int
    reason: str


def _shape_problem(template: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    missing = [k for k in template if k not in state]
    unexpected = [k for k in state if k not in template]
    if missing or unexpected:
        return (
            "returned a model of another architecture "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
            f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    last = list(template)[-1]  # the classifier's bias (or weight): its length is the classes
    ref, got = template[last], state[last]
    if ref.ndim >= 1 and got.ndim == ref.ndim and got.shape[0] != ref.shape[0]:
        return (
            f"returned a model with {got.shape[0]} classes where the federation has "
            f"{ref.shape[0]} ({last}: {tuple(got.shape)})"
        )
    for key, ref in template.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            return (
                f"returned a model of another architecture ({key} has shape "
                f"{tuple(state[key].shape)}, the federation's model {tuple(ref.shape)})"
            )
    return None


def short_reason(reason: str | None) -> str:
    """The client's own error message out of Flower's report (which, in the simulation, wraps
    it in Ray's traceback)."""
    text = (reason or "no reason given").strip()
    marker = "occurred. Message: "
    if marker in text:
        text = text.rsplit(marker, 1)[1].strip().removesuffix("'>").strip()
    return text if len(text) <= 300 else text[:297] + "..."


def read_reply(message: Message, template: Mapping[str, Tensor]) -> ClientUpdate | Rejection:
    """The update carried by a training reply, or why it cannot be used."""
    node = int(message.metadata.src_node_id)
    if message.has_error():
        return Rejection(node, f"failed: {short_reason(message.error.reason)}")
    content = message.content
    if ARRAYS not in content.array_records:
        return Rejection(node, f"sent no {ARRAYS!r} record (no model weights)")
    metrics = content.metric_records.get(METRICS)
    if metrics is None or "num-examples" not in metrics:
        return Rejection(node, f"sent no {METRICS!r} record with num-examples")
    num = metrics["num-examples"]
    if not isinstance(num, int) or num < 1:
        return Rejection(node, f"reported num-examples={num!r}, not a positive integer")
    state = from_arrays(content.array_records[ARRAYS])
    problem = _shape_problem(template, state)
    if problem is not None:
        return Rejection(node, problem)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return Rejection(node, f"returned non-finite weights in {bad[:4]}")
    state = {k: v.to(template[k].dtype) for k, v in state.items()}
    importance = None
    if IMPORTANCE in content.array_records:
        importance = from_arrays(content.array_records[IMPORTANCE])
        if not all(v.ndim == 1 and torch.isfinite(v).all() for v in importance.values()):
            return Rejection(node, "sent importance scores that are not finite 1-d tensors")
    fusion_set = None
    if FUSION_SET in content.array_records:
        arrays = from_arrays(content.array_records[FUSION_SET])
        if set(arrays) != {"x", "y"} or len(arrays["x"]) != len(arrays["y"]):
            return Rejection(node, "sent a fusion set that is not an x, y pair of equal length")
        fusion_set = (arrays["x"], arrays["y"].long())
    counts = metrics.get("class-counts", [])
    partition = metrics.get("partition-id")
    return ClientUpdate(
        node_id=node,
        partition_id=int(partition) if isinstance(partition, int) else None,
        state=state,
        num_examples=num,
        class_counts=[int(c) for c in counts] if isinstance(counts, list) else [],
        importance=importance,
        fusion_set=fusion_set,
        bytes=payload_bytes(content),
    )


def load_state(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A fresh copy of ``template`` holding ``state`` (the template itself is left alone)."""
    import copy

    model = copy.deepcopy(template)
    model.load_state_dict(dict(state))
    return model.eval()
