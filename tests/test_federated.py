"""Federated fusion on Flower: the strategy's aggregation, its refusals, the client, and a
3-client simulation (Flower's Ray runtime, loopback only). Needs the ``federated`` extra; the
whole module is skipped without it."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from toys import mlp  # noqa: E402

import neurofuse as nf  # noqa: E402
from neurofuse.federated import FederationConfig  # noqa: E402
from neurofuse.federated.records import FUSION_SET, IMPORTANCE  # noqa: E402
from neurofuse.federated.strategy import FusionStrategy  # noqa: E402

pytestmark = pytest.mark.federated


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """As conftest's guard, but Ray's processes talk over loopback: only that is allowed."""
    real_connect = socket.socket.connect

    def loopback_only(self, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (
            host.startswith("127.") or host in ("localhost", "::1") or "/" in host
        ):
            return real_connect(self, address, *args, **kwargs)
        raise RuntimeError(f"network access attempted during tests: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def _train_message(node: int, content: RecordDict | None = None) -> Message:
    """An instruction as the server's Grid would deliver it (Flower fills the metadata of a
    message it routes; outside a run it has to be given)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content or RecordDict(), metadata=metadata)


def _reply(
    model: torch.nn.Module,
    node: int,
    n: int,
    pid: int | None = None,
    importance: dict | None = None,
    fusion: tuple | None = None,
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "num-examples": n,
                    "class-counts": [n // 3] * 3,
                    "partition-id": node if pid is None else pid,
                }
            ),
        }
    )
    if importance is not None:
        content[IMPORTANCE] = ArrayRecord(importance)
    if fusion is not None:
        content[FUSION_SET] = ArrayRecord({"x": fusion[0], "y": fusion[1]})
    return Message(content, reply_to=_train_message(node))


def _models(k: int, hidden: tuple[int, ...] = (16, 16), classes: int = 3) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(100 + seed)
        out.append(mlp(hidden=hidden, classes=classes).eval())
    return out


def _fusion_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v.numpy()) for k, v in record.items()}


def _assert_same(record: ArrayRecord, model: torch.nn.Module) -> None:
    got = _state(record)
    want = model.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("method", ["kf_linear", "otfusion", "fedavg"])
def test_aggregation_equals_fuse_on_the_same_weights_and_fusion_set(method):
    models = _models(3)
    data = _fusion_data()
    counts = [30, 50, 20]
    strategy = FusionStrategy(models[0], method, fusion_data=data, seed=3, min_train_nodes=3)
    replies = [
        _reply(m, node=i + 1, n=c) for i, (m, c) in enumerate(zip(models, counts, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    options = {"sample_counts": counts} if method == "fedavg" else {}
    expected = nf.fuse(models, data, method=method, seed=3, **options)
    _assert_same(arrays, expected)
    assert metrics["num-examples"] == 100 and metrics["clients-used"] == 3
    assert strategy.rounds[0].used == [1, 2, 3] and strategy.rounds[0].left_out == []


def test_client_importance_scores_reach_the_fusion():
    models = _models(2)
    data = _fusion_data()
    scores = nf.compute_importance(models, data[0], "activation")
    replies = [
        _reply(m, i + 1, 40, importance=s)
        for i, (m, s) in enumerate(zip(models, scores, strict=True))
    ]
    strategy = FusionStrategy(models[0], "kf_linear", fusion_data=data, min_train_nodes=2)
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_same(arrays, nf.fuse(models, data, method="kf_linear", importance=scores))
    uniform = nf.fuse(models, data, method="kf_linear")
    assert not all(
        torch.equal(a, b)
        for a, b in zip(_state(arrays).values(), uniform.state_dict().values(), strict=True)
    )


def test_the_fusion_set_a_client_sends_is_used_and_kept_for_later_rounds():
    models = _models(2)
    data = _fusion_data()
    strategy = FusionStrategy(models[0], "kf_linear", min_train_nodes=2)
    replies = [_reply(models[0], 1, 40, pid=0, fusion=data), _reply(models[1], 2, 40, pid=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    _assert_same(arrays, nf.fuse(models, data, method="kf_linear"))
    assert strategy.fusion_source.startswith("client partition 0")
    # round 2: nobody sends it again, the kept one is used
    arrays2, _ = strategy.aggregate_train(2, [_reply(models[1], 2, 40), _reply(models[0], 1, 40)])
    assert arrays2 is not None


def test_no_fusion_set_is_a_clear_error():
    models = _models(2)
    strategy = FusionStrategy(models[0], "kf_linear", min_train_nodes=2)
    with pytest.raises(ValueError, match="no fusion set.*fusion_data"):
        strategy.aggregate_train(1, [_reply(m, i + 1, 10) for i, m in enumerate(models)])


def test_failed_and_foreign_clients_are_left_out_with_their_reason_and_nothing_is_mutated():
    good = _models(3)
    wide = _models(1, hidden=(32, 16))[0]
    five_classes = _models(1, classes=5)[0]
    broken = _models(1)[0]
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    failed = Message(Error(code=0, reason="CUDA out of memory"), reply_to=_train_message(9))
    replies = [_reply(m, i + 1, 30) for i, m in enumerate(good)]
    replies += [_reply(wide, 5, 30), _reply(five_classes, 6, 30), _reply(broken, 7, 30), failed]
    before = [{k: v.numpy().copy() for k, v in r.content["arrays"].items()} for r in replies[:3]]
    data = _fusion_data()
    strategy = FusionStrategy(good[0], "kf_linear", fusion_data=data, min_train_nodes=2)
    arrays, metrics = strategy.aggregate_train(1, replies)
    _assert_same(arrays, nf.fuse(good, data, method="kf_linear"))
    reasons = dict(strategy.rounds[0].left_out)
    assert set(reasons) == {5, 6, 7, 9}
    assert "another architecture" in reasons[5] and "(16, 10)" in reasons[5]
    assert "5 classes where the federation has 3" in reasons[6]
    assert "non-finite" in reasons[7]
    assert reasons[9] == "failed: CUDA out of memory"
    assert metrics["clients-left-out"] == 4
    for reply, saved in zip(replies[:3], before, strict=True):
        for key, value in reply.content["arrays"].items():
            assert (value.numpy() == saved[key]).all()


def test_a_round_with_too_few_usable_models_keeps_the_global_model():
    models = _models(2)
    wide = _models(1, hidden=(32, 16))[0]
    strategy = FusionStrategy(models[0], "kf_linear", fusion_data=_fusion_data(), min_train_nodes=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply(models[1], 1, 10), _reply(wide, 2, 10)])
    assert arrays is None and metrics is None
    assert strategy.rounds[0].used == [1]


def test_a_failing_comparison_is_recorded_and_the_round_goes_on():
    models = _models(3)
    strategy = FusionStrategy(
        models[0],
        "kf_linear",
        fusion_data=_fusion_data(),
        compare=("hf_linear", "fedavg"),
        min_train_nodes=3,
    )
    arrays, _ = strategy.aggregate_train(1, [_reply(m, i + 1, 10) for i, m in enumerate(models)])
    assert arrays is not None
    assert "two models" in strategy.rounds[0].compare_errors["hf_linear"]
    assert set(strategy.latest.compared) == {"fedavg"}


def test_strategy_refuses_multi_network_methods_and_unknown_names():
    with pytest.raises(ValueError, match="several networks"):
        FusionStrategy(_models(1)[0], "ensemble")
    with pytest.raises(ValueError, match="unknown fusion method .kf_lineer.; valid methods: auto"):
        FusionStrategy(_models(1)[0], "kf_lineer")


def test_configuration_checks_and_its_run_config_form():
    with pytest.raises(ValueError, match="fusion_client 4 is not a client"):
        FederationConfig(clients=4, fusion_client=4)
    with pytest.raises(ValueError, match="exactly two models.*kf_linear"):
        FederationConfig(clients=3, method="hf_linear")
    with pytest.raises(ValueError, match="unknown partition"):
        FederationConfig(partition="shards")
    with pytest.raises(ValueError, match="several networks"):
        FederationConfig(compare=("ensemble",))
    with pytest.raises(ValueError, match="min_clients"):
        FederationConfig(clients=3, min_clients=4)
    config = FederationConfig.from_record(
        {
            "clients": 3,
            "method": "fedavg",
            "compare": "kf_linear, otfusion",
            "model-kw": '{"hidden": [8]}',
            "fusion-source": "server",
            "min-clients": -1,
            "other-app-key": 1,
        }
    )
    assert config.compare == ("kf_linear", "otfusion") and config.model_kw == {"hidden": [8]}
    assert config.fusion_source == "server" and config.min_clients is None
    record = config.client_record({"hidden": [8], "in_features": 784})
    assert "" not in record.values() and record["fusion-client"] == -1
    ConfigRecord(record).count_bytes()  # Flower accepts every value


def test_the_client_trains_its_partition_and_sends_counts_importance_and_the_fusion_set():
    from neurofuse.data import load, partition
    from neurofuse.federated.client import train_client
    from neurofuse.federated.server import resolve_model

    config = FederationConfig(
        arch="mlp",
        model_kw={"hidden": [16]},
        clients=3,
        partition="sharded",
        local_epochs=1,
        importance="activation",
        fusion_size=50,
    )
    splits = load("mnist5k", seed=0)
    model, kwargs = resolve_model(config, splits)
    message = _train_message(
        11,
        RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "config": ConfigRecord({**config.client_record(kwargs), "server-round": 1}),
            }
        ),
    )
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    reply = train_client(message, context)
    metrics = reply.content["metrics"]
    part = partition(splits.y_train, 3, "sharded", seed=0, num_classes=10)
    mine = torch.bincount(splits.y_train[part.indices[0]], minlength=10)
    assert metrics["num-examples"] == len(part.indices[0])
    assert metrics["class-counts"] == mine.tolist()
    fusion = reply.content[FUSION_SET]
    y = torch.tensor(fusion["y"].numpy())
    assert len(y) == 50 and set(y.tolist()) <= set(torch.nonzero(mine).flatten().tolist())
    from neurofuse.importance import default_nodes

    assert set(reply.content[IMPORTANCE]) == set(default_nodes(model))
    sent = _state(reply.content["arrays"])
    assert any(not torch.equal(sent[k], v) for k, v in model.state_dict().items())  # trained


@pytest.mark.slow
def test_federate_command_one_round_beats_fedavg_on_a_sharded_split(tmp_path):
    from typer.testing import CliRunner

    from neurofuse.cli import app

    args = [
        "federate",
        "--clients",
        "3",
        "--partition",
        "sharded",
        "--model-kw",
        "hidden=[32, 32]",
        "--local-epochs",
        "5",
        "--lr",
        "0.003",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((tmp_path / "results.json").read_text())
    assert printed == written
    for key in (
        "method",
        "rounds",
        "clients",
        "fused_accuracy",
        "fedavg_accuracy",
        "client_accuracies",
        "ensemble_accuracy",
    ):
        assert key in written
    assert written["method"] == "kf_linear" and written["clients"] == 3
    assert len(written["client_accuracies"]) == 3
    assert written["fused_accuracy"] > written["fedavg_accuracy"] + 0.1
    assert written["fused_accuracy"] > max(written["client_accuracies"])
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "| global model (kf_linear) |" in (tmp_path / "report.md").read_text()
    from neurofuse.checkpoint import load_checkpoint
    from neurofuse.data import load
    from neurofuse.evaluate import evaluate

    model, _ = load_checkpoint(tmp_path / "global")
    splits = load("mnist5k", seed=0)
    assert evaluate(model, splits.x_test, splits.y_test).accuracy == pytest.approx(
        written["fused_accuracy"]
    )


@pytest.mark.slow
def test_a_failing_client_is_left_out_and_the_round_goes_on(tmp_path):
    from federated_clients import app as failing_client

    from neurofuse.federated import simulate

    config = FederationConfig(
        arch="mlp",
        model_kw={"hidden": [32]},
        clients=3,
        partition="iid",
        local_epochs=3,
        min_clients=2,
        fusion_client=0,
        lr=3e-3,
    )
    result = simulate(config, tmp_path, progress=False, client_app=failing_client)
    assert len(result.left_out) == 1
    assert result.left_out[0]["reason"] == "failed: disk full on client 1"
    assert len(result.client_accuracies) == 2
    assert result.fused_accuracy > 0.5
    assert "disk full on client 1" in (tmp_path / "report.md").read_text()


def test_the_example_flower_app_is_valid_and_its_run_config_is_a_federation():
    """examples/federated/pyproject.toml (the README's `flwr run` path): Flower accepts it, its
    components import, and every run-config key reaches FederationConfig."""
    import dataclasses
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: Flower's own dependency
        import tomli as tomllib

    from flwr.common.config import validate_config

    path = Path(__file__).parents[1] / "examples" / "federated" / "pyproject.toml"
    config = tomllib.loads(path.read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=path.parent)
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    fields = {f.name for f in dataclasses.fields(FederationConfig)}
    assert {k.replace("-", "_") for k in run_config} - {"out"} == fields
    run_config = {k: v for k, v in run_config.items() if k != "out"}
    federation = FederationConfig.from_record(run_config)
    assert federation.model_kw == {"hidden": [128, 128]} and federation.min_clients is None
    assert federation.fusion_data is None and federation.compare_rounds is None


def test_a_users_model_class_travels_to_the_clients_by_name():
    from neurofuse.data import load
    from neurofuse.federated.client import build_model
    from neurofuse.federated.config import client_settings
    from neurofuse.federated.server import resolve_model

    config = FederationConfig(
        model="toys:mlp", model_kw={"d_in": 784, "hidden": [8], "classes": 10}
    )
    template, kwargs = resolve_model(config, load("mnist5k", seed=0))
    record = config.client_record(kwargs)
    assert "arch" not in record and record["model"] == "toys:mlp"
    built = build_model(client_settings(record))
    shapes = {k: v.shape for k, v in built.state_dict().items()}
    assert shapes == {k: v.shape for k, v in template.state_dict().items()}
    assert shapes["1.weight"] == (8, 784)
