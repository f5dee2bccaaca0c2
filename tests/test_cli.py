"""The ``neurofuse`` command line: every command runs, writes what it promises, and turns bad
input into one line ``neurofuse: error: ...`` with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import neurofuse as nf
from neurofuse import cli, data
from neurofuse._version import __version__
from neurofuse.checkpoint import load_checkpoint, load_metadata
from neurofuse.cli._common import architecture_kwargs
from neurofuse.evaluate import evaluate
from neurofuse.importance import available_importance
from neurofuse.models import available_architectures

runner = CliRunner()

# A tiny, fast task: 300 training / 200 test samples of the synthetic cluster dataset.
DATA = ["--dataset", "synthetic", "--data-kw", "num_samples=300", "--data-kw", "num_test=200"]
TRAIN = [*DATA, "--arch-kw", "hidden=[16,16]", "--epochs", "2", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def _wide_console_one_thread(monkeypatch: pytest.MonkeyPatch):
    """Wide consoles so table cells are not cut; one torch thread (tiny matrices)."""
    monkeypatch.setattr(cli, "console", Console(width=250))
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=250))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, one ``neurofuse: error:`` line that contains every needle."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neurofuse: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two MLPs trained on a 2-way sharded split of the tiny synthetic task."""
    out = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "console", Console(width=250))
        result = runner.invoke(
            cli.app, ["train", *TRAIN, "--partition", "sharded", "--seed", "3", "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- help, names


@pytest.mark.parametrize(
    "command",
    [[], ["datasets"], ["archs"], ["methods"], ["importance"], ["train"], ["eval"], ["fuse"]]
    + [["demo"], ["bench"]],
)
def test_every_command_has_help(command):
    result = ok(*command, "--help")
    assert "Usage" in result.output
    assert "--help" in result.output


def test_version_flag_prints_the_package_version():
    assert ok("--version").output.strip() == f"neurofuse {__version__}"


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "neurofuse", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout


def test_methods_lists_every_registered_method():
    output = ok("methods").output
    assert "kf_linear" in output
    for name in nf.available_methods():
        assert name in output


def test_methods_options_shows_each_option_with_its_default():
    output = ok("methods", "--options", "kf_linear").output
    for key, value in nf.method_options("kf_linear").items():
        line = next(row for row in output.splitlines() if f" {key} " in row)
        assert json.dumps(value) in line


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ("datasets", data.available_datasets),
        ("archs", available_architectures),
        ("importance", available_importance),
    ],
)
def test_name_tables_list_the_registries(command, names):
    output = ok(command).output
    for name in names():
        assert name in output


# ----------------------------------------------------------------------------- train


def test_train_writes_checkpoints_sidecars_and_partition(sharded_run: Path):
    record = json.loads((sharded_run / "partition.json").read_text())
    splits = data.load("synthetic", seed=3, num_samples=300, num_test=200)
    assert record["scheme"] == "sharded" and record["n_parts"] == 2
    assert record["dataset"]["name"] == "synthetic"
    parts = [torch.tensor(idx) for idx in record["indices"]]
    assert sorted(torch.cat(parts).tolist()) == list(range(splits.num_train))  # disjoint cover
    for i, idx in enumerate(parts):
        stem = sharded_run / f"model_{i}"
        assert stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".json").is_file()
        model, meta = load_checkpoint(stem)
        counts = torch.bincount(splits.y_train[idx], minlength=splits.num_classes).tolist()
        assert meta["partition"]["part"] == i
        assert meta["partition"]["class_counts"] == counts == record["class_counts"][i]
        assert meta["dataset"] == {
            "name": "synthetic",
            "kwargs": {"num_samples": 300, "num_test": 200},
            "seed": 3,
            "root": None,
        }
        assert meta["seed"] == 3 and meta["model_seed"] == 3 + i
        assert meta["history"]["epochs"] == 2
        assert meta["model"]["kwargs"]["in_features"] == splits.input_shape[0]
        assert meta["model"]["kwargs"]["hidden"] == [16, 16]
        recorded = meta["metrics"]["test"]
        assert recorded["accuracy"] == pytest.approx(
            evaluate(model, splits.x_test, splits.y_test).accuracy
        )
    a, b = (set(map(int, torch.nonzero(torch.tensor(c)).flatten())) for c in record["class_counts"])
    assert a.isdisjoint(b)  # sharded: no class in both parts


def test_train_is_reproducible_from_its_seed(tmp_path: Path):
    for name in ("a", "b"):
        ok("train", *TRAIN, "--epochs", "1", "--partition", "iid", "--out", tmp_path / name)
    for i in range(2):
        first = load_metadata(tmp_path / "a" / f"model_{i}")["weights"]["sha256"]
        second = load_metadata(tmp_path / "b" / f"model_{i}")["weights"]["sha256"]
        assert first == second
    assert (
        load_metadata(tmp_path / "a" / "model_0")["weights"]["sha256"]
        != load_metadata(tmp_path / "a" / "model_1")["weights"]["sha256"]
    )


# ----------------------------------------------------------------------------- eval


def test_eval_prints_a_metrics_table_with_ensemble(sharded_run: Path):
    paths = [sharded_run / "model_0.safetensors", sharded_run / "model_1.json"]
    output = ok("eval", *paths, "--ensemble").output
    for i in range(2):
        accuracy = load_metadata(sharded_run / f"model_{i}")["metrics"]["test"]["accuracy"]
        row = next(line for line in output.splitlines() if f"model_{i}.safetensors" in line)
        assert f"{100 * accuracy:.2f}%" in row
    assert "ensemble of 2" in output
    for column in ("accuracy", "NLL", "ECE"):
        assert column in output


def test_eval_counts_both_files_of_one_checkpoint_once(sharded_run: Path):
    output = ok("eval", sharded_run / "model_0.safetensors", sharded_run / "model_0.json").output
    assert output.count("model_0.safetensors") == 1


# ----------------------------------------------------------------------------- fuse


def test_fuse_saves_a_checkpoint_with_provenance(sharded_run: Path, tmp_path: Path):
    out = tmp_path / "fused.safetensors"
    ok(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        "--method",
        "kf_linear",
        "--fusion-samples",
        "60",
        "--option",
        "n_init=2",
        "--seed",
        "5",
        "--out",
        out,
    )
    model, meta = load_checkpoint(out)
    fusion = meta["fusion"]
    assert fusion["method"] == "kf_linear" and fusion["importance"] == "uniform"
    assert fusion["options"]["n_init"] == 2 and fusion["seed"] == 5
    for entry, i in zip(meta["inputs"], range(2), strict=True):
        assert entry["sha256"] == load_metadata(sharded_run / f"model_{i}")["weights"]["sha256"]
        assert (out.parent / entry["path"]).resolve() == (
            sharded_run / f"model_{i}.safetensors"
        ).resolve()
    fusion_set = fusion["fusion_set"]
    part0 = set(json.loads((sharded_run / "partition.json").read_text())["indices"][0])
    assert fusion_set["size"] == len(fusion_set["indices"]) == 60
    assert fusion_set["from_part"] == 0 and set(fusion_set["indices"]) <= part0
    splits = data.load("synthetic", seed=3, num_samples=300, num_test=200)
    assert meta["metrics"]["test"]["accuracy"] == pytest.approx(
        evaluate(model, splits.x_test, splits.y_test).accuracy
    )


def test_fuse_without_a_partition_file_draws_from_the_whole_split(
    sharded_run: Path, tmp_path: Path
):
    for i in range(2):
        for suffix in (".safetensors", ".json"):
            name = f"model_{i}{suffix}"
            (tmp_path / name).write_bytes((sharded_run / name).read_bytes())
    out = tmp_path / "fused"
    ok("fuse", tmp_path / "model_0", tmp_path / "model_1", "--fusion-samples", "250", "--out", out)
    fusion_set = load_metadata(out)["fusion"]["fusion_set"]
    part0 = set(json.loads((sharded_run / "partition.json").read_text())["indices"][0])
    assert fusion_set["source"] == "whole training split"
    assert not set(fusion_set["indices"]) <= part0  # 250 samples cannot all come from part 0


def test_fuse_refuses_to_save_a_module_outside_the_zoo(sharded_run: Path, tmp_path: Path):
    if "ensemble" not in nf.available_methods():
        pytest.skip("the ensemble method is not registered")
    out = tmp_path / "ens.safetensors"
    result = invoke(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        *("-m", "ensemble", "--fusion-samples", "60", "--out", out),
    )
    assert_user_error(result, "cannot be saved")
    assert not out.exists()


@pytest.mark.parametrize(
    "method,flag,argument,value,message",
    [
        ("ensemble", "levels", "--levels", "net.0", "does not use levels"),
        ("vanilla", "importance", "-i", "conductance", "does not use importance"),
    ],
)
def test_fuse_refuses_an_argument_the_method_ignores(
    sharded_run: Path, method: str, flag: str, argument: str, value: str, message: str
):
    assert not getattr(nf.method_info(method).caps, flag)
    result = invoke(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        *("-m", method, argument, value, "--fusion-samples", "60"),
    )
    assert_user_error(result, method, message)


def test_fuse_gives_its_default_importance_only_to_methods_that_use_it(
    sharded_run: Path, tmp_path: Path
):
    if "vanilla" not in nf.available_methods():
        pytest.skip("the vanilla method is not registered")
    out = tmp_path / "vanilla"
    output = ok(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        *("-m", "vanilla", "--fusion-samples", "60", "--out", out),
    ).output
    (line,) = [line for line in output.splitlines() if line.startswith("Fusing")]
    assert "importance" not in line
    fusion = load_metadata(out)["fusion"]
    assert fusion["method"] == "vanilla" and fusion["importance"] is None
    assert fusion["levels"] is None


# ----------------------------------------------------------------------------- bad input


def test_unknown_dataset_lists_the_valid_ones(tmp_path: Path):
    line = assert_user_error(invoke("train", "--dataset", "nope", "--out", tmp_path), "nope")
    for name in data.available_datasets():
        assert name in line


def test_bench_unknown_suite_lists_the_suites(tmp_path: Path):
    assert_user_error(invoke("bench", "nope", "--out", tmp_path), "nope", "paper-mlp", "quick")


def test_bench_report_only_writes_a_partial_report(tmp_path: Path):
    result = ok("bench", "quick", "--out", tmp_path, "--report-only")
    text = (tmp_path / "report.md").read_text()
    assert "report.md" in result.output
    assert "PARTIAL (0/3 cells)" in text and "neurofuse bench quick --seeds 0" in text


def test_unknown_method_is_a_clear_error(sharded_run: Path):
    result = invoke("fuse", sharded_run / "model_0", sharded_run / "model_1", "-m", "nope")
    assert_user_error(result, "nope", "kf_linear")


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path):
    assert_user_error(invoke("eval", tmp_path / "absent.safetensors"), "absent")


def test_unknown_partition_scheme_lists_the_valid_ones(tmp_path: Path):
    result = invoke("train", *TRAIN, "--partition", "nope", "--out", tmp_path)
    assert_user_error(result, "nope", "sharded", "dirichlet", "iid", "full")


def test_malformed_key_value_is_a_clear_error(tmp_path: Path):
    result = invoke("train", *TRAIN, "--arch-kw", "hidden", "--out", tmp_path)
    assert_user_error(result, "--arch-kw", "key=value")


def test_methods_options_of_unknown_method(tmp_path: Path):
    assert_user_error(invoke("methods", "--options", "nope"), "nope", "kf_linear")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--epochs", "abc"], "'abc' is not a valid integer"),
        (["train", "--no-such-option", "1"], "No such option '--no-such-option'"),
        (["nope"], "No such command 'nope'"),
        (["eval"], "Missing argument"),
        (["--threads", "0", "methods"], "must be >= 1"),
        (["bench", "quick", "--threads", "0"], "'--threads'"),
    ],
)
def test_command_line_errors_are_one_line_too(args, needle):
    """click's usage errors (bad value, unknown option or command, missing argument) are
    reported like the library's: one line, exit code 2, no usage box."""
    assert_user_error(invoke(*args), needle)


def _hostile_cifar10(root: Path, marker: Path) -> None:
    """A cifar-10-batches-py folder whose first batch runs ``touch marker`` when read by an
    unrestricted unpickler (the test proves neurofuse never does)."""
    import os
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        record = {b"data": Exploit(), b"labels": [0]} if name == "data_batch_1" else {}
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))


def test_a_hostile_pickle_is_refused_in_one_line(sharded_run: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    _hostile_cifar10(tmp_path / "data", marker)
    root = tmp_path / "data"
    result = invoke("eval", sharded_run / "model_0", "--dataset", "cifar10", "--root", root)
    line = assert_user_error(result, "data_batch_1", "refusing to load global", "system")
    assert not marker.exists(), line
    # a file that is no pickle at all is a user error as well
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    result = invoke("train", "--dataset", "cifar10", "--root", root, "--out", tmp_path)
    assert_user_error(result, "data_batch_1", "not a readable pickle")


def test_os_errors_on_the_users_paths_are_user_errors(tmp_path: Path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    result = invoke("train", *TRAIN, "--epochs", "1", "--out", taken)
    assert_user_error(result, "a_file")


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch: pytest.MonkeyPatch):
    from neurofuse.checkpoint import CheckpointError

    result = invoke("--debug", "eval", "absent")
    assert isinstance(result.exception, CheckpointError) and result.exit_code == 1
    assert "neurofuse: error" not in result.stderr
    assert_user_error(invoke("eval", "absent"), "absent")  # --debug lasts one command
    monkeypatch.setenv("NEUROFUSE_DEBUG", "1")
    assert isinstance(invoke("eval", "absent").exception, CheckpointError)


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch):
    def broken() -> dict[str, str]:
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(data, "available_datasets", broken)
    result = invoke("datasets")
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert "neurofuse: error" not in result.stderr


def test_the_installed_entry_points_print_one_line_and_exit_2(tmp_path: Path):
    for module, args in [
        ("neurofuse", ["train", "--epochs", "abc"]),
        ("neurofuse", ["eval", str(tmp_path / "absent")]),
        ("neurofuse.bench", ["nope", "--out", str(tmp_path)]),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neurofuse: error: "), done.stderr


# ----------------------------------------------------------------------------- demo


def _check_demo_output(out: Path) -> dict:
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    results = json.loads((out / "results.json").read_text())
    kinds = [row["kind"] for row in results["rows"]]
    assert kinds.count("base") == 2 and "ensemble" in kinds and "fused" in kinds
    assert all(0 <= row["accuracy"] <= 1 for row in results["rows"])
    digits = [set(d.split(",")) for d in results["partition"]["digits"]]
    assert digits[0].isdisjoint(digits[1]) and len(digits[0] | digits[1]) == 10
    return results


def test_demo_quick_writes_chart_and_results(tmp_path: Path):
    output = ok("demo", "--quick", "--out", tmp_path).output
    results = _check_demo_output(tmp_path)
    assert results["quick"] is True
    assert "kf_linear" in [row["method"] for row in results["rows"]]
    assert "kf_linear" in output and "ensemble" in output


@pytest.mark.slow
def test_full_demo_fusion_beats_each_base_model(tmp_path: Path):
    ok("demo", "--out", tmp_path)
    results = _check_demo_output(tmp_path)
    rows = {row["method"]: row for row in results["rows"]}
    best_base = max(row["accuracy"] for row in results["rows"] if row["kind"] == "base")
    assert rows["kf_linear"]["accuracy"] > best_base + 0.2
    assert results["total_seconds"] < 180


def test_threads_option_sets_torch_threads():
    ok("--threads", "2", "methods")
    assert torch.get_num_threads() == 2  # the autouse fixture restores the previous value
    assert invoke("--threads", "0", "methods").exit_code == 2


@pytest.mark.parametrize(
    ("arch", "shape", "given"),
    [
        ("mlp", (1, 28, 28), {}),
        ("mlp", (20,), {"hidden": [8]}),
        ("vgg", (1, 28, 28), {"config": [8, "M"]}),
        ("resnet18", (3, 16, 16), {"width": 4}),
        ("vit_tiny", (1, 28, 28), {"patch_size": 7}),
        ("cnn1d", (1, 40), {"channels": [4]}),
    ],
)
def test_architecture_kwargs_fill_input_size_and_classes(arch, shape, given):
    from types import SimpleNamespace

    from neurofuse.models import build

    splits = SimpleNamespace(input_shape=shape, num_classes=7)
    kwargs = architecture_kwargs(arch, given, splits)
    assert all(kwargs[key] == value for key, value in given.items())
    assert build(arch, **kwargs)(torch.zeros(2, *shape)).shape == (2, 7)


def test_fuse_fills_fedavg_sample_counts_from_metadata(sharded_run: Path, tmp_path: Path):
    if "fedavg" not in nf.available_methods():
        pytest.skip("the fedavg method is not registered")
    out = tmp_path / "fedavg"
    ok(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        *("-m", "fedavg", "--fusion-samples", "60", "--out", out),
    )
    record = json.loads((sharded_run / "partition.json").read_text())
    expected = [len(idx) for idx in record["indices"]]
    assert load_metadata(out)["fusion"]["options"]["sample_counts"] == expected


def test_methods_options_shows_descriptions_users_and_json():
    output = ok("methods", "--options", "hf_linear").output
    assert "ridge" in output and "n_init" not in output and "relative ridge" in output
    listing = json.loads(ok("methods", "--options", "kf_linear", "--json").stdout)
    assert listing["n_init"]["default"] == "auto" and "k-means" in listing["n_init"]["description"]
    assert "kf_linear" in listing["n_init"]["used_by"]
    assert "hf_linear" not in listing["n_init"]["used_by"]
    methods = json.loads(ok("methods", "--json").stdout)
    assert methods["zipit"]["capabilities"]["exact"] is True


def test_bench_help_lists_every_suite_and_bench_honours_the_global_threads(monkeypatch):
    from neurofuse.bench.suites import available_suites
    from neurofuse.cli._bench import SUITE_NAMES

    assert sorted(SUITE_NAMES) == sorted(available_suites())
    text = " ".join(ok("bench", "--help").output.split())
    assert all(name in text for name in available_suites())
    seen: dict[str, int] = {}

    def fake_bench(*args, threads: int = 0, **kwargs):
        seen["threads"] = threads
        return "r.md"

    monkeypatch.setattr("neurofuse.bench.command.bench", fake_bench)
    ok("--threads", "1", "bench", "quick", "--report-only")
    assert seen["threads"] == 1
    ok("bench", "quick", "--report-only")
    assert seen["threads"] == 2  # the default the committed reports were measured with
    ok("--threads", "1", "bench", "quick", "--report-only", "--threads", "3")
    assert seen["threads"] == 3


def test_from_part_chooses_the_fusion_sets_part_whatever_the_argument_order(
    sharded_run: Path, tmp_path: Path
):
    import yaml

    parts = json.loads((sharded_run / "partition.json").read_text())["indices"]
    reversed_models = [sharded_run / "model_1", sharded_run / "model_0", "--fusion-samples", "40"]
    ok("fuse", *reversed_models, "--out", tmp_path / "a")
    recipe = yaml.safe_load((tmp_path / "a.recipe.yaml").read_text())
    assert recipe["from_part"] == 1  # the first model's own part, now written down
    out = tmp_path / "b"
    ok("fuse", *reversed_models, "--from-part", "0", "--out", out)
    fusion_set = load_metadata(out)["fusion"]["fusion_set"]
    assert fusion_set["from_part"] == 0 and set(fusion_set["indices"]) <= set(parts[0])
    result = invoke(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        "--from-part",
        "5",
        "--fusion-samples",
        "40",
    )
    assert_user_error(result, "from_part")


def test_fuse_reads_a_fusion_set_from_a_pt_file(sharded_run: Path, tmp_path: Path):
    splits = data.load("synthetic", seed=3, num_samples=300, num_test=200)
    torch.save({"x": splits.x_train[:50], "y": splits.y_train[:50]}, tmp_path / "f.pt")
    result = ok(
        "fuse",
        sharded_run / "model_0",
        sharded_run / "model_1",
        "--data",
        tmp_path / "f.pt",
        "--json",
    )
    payload = json.loads(result.stdout)
    assert payload["fusion_set"]["size"] == 50 and payload["fusion_set"]["labelled"]
    assert "fused" in payload["metrics"]  # the checkpoints' recorded dataset is the test set
    torch.save([1, 2, 3], tmp_path / "bad.pt")
    result = invoke(
        "fuse", sharded_run / "model_0", sharded_run / "model_1", "--data", tmp_path / "bad.pt"
    )
    assert_user_error(result, "bad.pt", "tensor")


def test_federate_without_flower_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    assert_user_error(invoke("federate", "--clients", "3"), 'pip install "neurofuse[federated]"')


def test_federate_refuses_a_bad_federation_before_any_work():
    pytest.importorskip("flwr")
    assert_user_error(
        invoke("federate", "--clients", "3", "--method", "hf_linear"),
        "hf_linear (Hungarian fusion) fuses exactly two models",
        "kf_linear",
    )
    assert_user_error(
        invoke("federate", "--fusion-source", "cloud"), "fusion_source must be one of"
    )
