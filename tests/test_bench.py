"""The benchmark harness: aggregation arithmetic, table shape, resume, and the quick suite."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

import neurofuse as nf
from neurofuse.bench import accuracy, aggregate, basemodels, runner, tables
from neurofuse.bench.aggregate import BASE_ROWS, egr, mean_std, summarise
from neurofuse.bench.command import bench, parse_seeds
from neurofuse.bench.provenance import UNSTAMPED, code_lines, code_stamp, stamp_name
from neurofuse.bench.spec import Arch, Cell, MethodRun, Split
from neurofuse.bench.suites import Suite, get_suite, grid, register_suite
from neurofuse.utils import resolve_device


def test_mean_std_hand_numbers():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_egr_hand_numbers():
    assert egr(0.9, 0.8, 1.0) == pytest.approx(0.5)
    assert egr(1.0, 0.8, 1.0) == pytest.approx(1.0)
    assert egr(0.8, 0.8, 1.0) == pytest.approx(0.0)
    assert egr(0.7, 0.8, 0.9) == pytest.approx(-1.0)
    assert egr(0.9, 0.8, 0.8) is None  # no ensemble gain to recover


def _record(split: str, seed: int, base: list[float], ens: float, methods: dict) -> dict:
    regime, n = split.split()
    return {
        "cell": {
            "kind": "accuracy",
            "arch": "mlp",
            "split": split,
            "seed": seed,
            "regime": regime,
            "n_models": int(n),
            "variant": "",
        },
        "base": [{"accuracy": a} for a in base],
        "ensemble": {"accuracy": ens},
        "methods": methods,
    }


def _ok(method: str, acc: float) -> dict:
    return {
        "status": "ok",
        "method": method,
        "accuracy": acc,
        "seconds": 1.0,
        "nll": 0.1,
        "ece": 0.01,
    }


def _records() -> list[dict]:
    return [
        _record(
            "sharded 2",
            0,
            [0.5, 0.4],
            0.9,
            {
                "KF Linear | uniform": _ok("kf_linear", 0.8),
                "HF Linear | uniform": _ok("hf_linear", 0.6),
            },
        ),
        _record(
            "sharded 2",
            1,
            [0.6, 0.5],
            0.9,
            {
                "KF Linear | uniform": _ok("kf_linear", 0.9),
                "HF Linear | uniform": _ok("hf_linear", 0.7),
            },
        ),
        _record(
            "sharded 4",
            0,
            [0.3, 0.3, 0.2, 0.3],
            0.8,
            {
                "KF Linear | uniform": _ok("kf_linear", 0.55),
                "HF Linear | uniform": {"status": "n/a", "method": "hf_linear"},
            },
        ),
    ]


def test_summarise_means_and_egr_of_means():
    group = summarise(_records())["mlp"]
    assert group.columns == ["sharded 2", "sharded 4"]
    kf = group.get("KF Linear | uniform", "sharded 2")
    assert kf.mean == pytest.approx(0.85)
    assert kf.std == pytest.approx(mean_std([0.8, 0.9])[1])
    # best base 0.55 (mean of 0.5, 0.6), ensemble 0.9 -> (0.85 - 0.55) / 0.35
    assert kf.egr == pytest.approx(0.3 / 0.35)
    assert group.get("KF Linear | uniform", "sharded 4").egr == pytest.approx(0.5)
    assert group.get(BASE_ROWS[0], "sharded 2").mean == pytest.approx(0.5)
    assert group.get("HF Linear | uniform", "sharded 4").status == "n/a"
    best = aggregate.best_neurofuse(group, "sharded 2")
    assert best is not None and best[0] == "KF Linear | uniform"


def test_the_strongest_baseline_is_the_best_non_neurofuse_one_shot_row():
    record = _record(
        "sharded 2",
        0,
        [0.5, 0.4],
        0.95,
        {
            "KF Linear | uniform": _ok("kf_linear", 0.8),
            "KD | uniform": _ok("kd", 0.7),
            "Git Re-Basin + REPAIR | uniform": _ok("git_rebasin", 0.75),
            "Ensemble-like | uniform": _ok("ensemble", 0.95),
        },
    )
    group = summarise([record])["mlp"]
    rival = aggregate.best_baseline(group, "sharded 2")
    assert rival is not None and rival[0] == "Git Re-Basin + REPAIR | uniform"
    line = tables.best_table(group).splitlines()[2]
    assert "Git Re-Basin + REPAIR" in line and line.rstrip(" |").endswith("+5.0")


def test_a_multi_head_row_is_no_baseline_and_its_cost_is_tabled():
    partial = {**_ok("zipit", 0.9), "parameters_vs_one_model": 1.25}
    record = _record(
        "sharded 2",
        0,
        [0.5, 0.4],
        0.95,
        {
            "KF Linear | uniform": _ok("kf_linear", 0.8),
            "ZipIt! | uniform": {**_ok("zipit", 0.7), "parameters_vs_one_model": 1.0},
            "ZipIt! partial | uniform": partial,
        },
    )
    group = summarise([record])["mlp"]
    rival = aggregate.best_baseline(group, "sharded 2")
    assert rival is not None and rival[0] == "ZipIt! | uniform"
    lines = tables.cost_table(group).splitlines()
    assert lines[2] == "| Ensemble | 2x |"
    assert lines[3] == "| ZipIt! partial (uniform) | 1.25x |" and len(lines) == 4
    assert tables.cost_table(summarise(_records())["mlp"]) is None


def test_accuracy_table_shape_and_entries():
    group = summarise(_records())["mlp"]
    lines = tables.accuracy_table(group).splitlines()
    assert len(lines) == 2 + len(BASE_ROWS) + 2  # header, rule, base rows, two methods
    assert all(line.count("|") == 2 + len(group.columns) for line in lines)
    kf_line = next(line for line in lines if line.startswith("| KF Linear"))
    assert kf_line.endswith("| 85.0 ± 7.1 | 55.0 |")  # one seed: no ±
    assert "| KF Linear (uniform) |" in kf_line
    hf_line = next(line for line in lines if line.startswith("| HF Linear"))
    assert hf_line.rstrip(" |").endswith("n/a")
    egr_lines = tables.egr_table(group).splitlines()
    assert "0.86" in next(line for line in egr_lines if line.startswith("| KF Linear"))


def _tiny_suite(name: str) -> Suite:
    arch = Arch(
        "mlp",
        (("in_features", 20), ("num_classes", 10), ("hidden", (16,))),
        (("epochs", 2), ("lr", 3e-3), ("batch_size", 64), ("val_fraction", 0.1)),
    )
    return Suite(
        name,
        "test",
        "accuracy",
        grid(name, "synthetic", {"tiny": arch}, (Split("sharded", 2), Split("noniid", 4))),
        (
            MethodRun("Vanilla averaging", "vanilla"),
            MethodRun("KF Linear", "kf_linear"),
            MethodRun("HF Linear", "hf_linear", pairwise=True),
        ),
        default_seeds=(0,),
    )


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts fusion runs and trained base models."""
    counts = {"fuse": 0, "train": 0}
    real_fuse, real_train = accuracy.fuse_once, basemodels.prepare.__globals__["_train_one"]

    def fuse(*args, **kwargs):
        counts["fuse"] += 1
        return real_fuse(*args, **kwargs)

    def train(*args, **kwargs):
        counts["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(accuracy, "fuse_once", fuse)
    monkeypatch.setitem(basemodels.prepare.__globals__, "_train_one", train)
    return counts


def test_run_suite_writes_cells_and_resumes_without_recomputing(tmp_path: Path, counted):
    suite = _tiny_suite("tiny-resume")
    paths = runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert [p.name for p in paths] == [
        "synthetic_tiny_sharded2_seed0.json",
        "synthetic_tiny_noniid4_seed0.json",
    ]
    assert counted == {"fuse": 6, "train": 6}
    rec = json.loads(paths[1].read_text())
    assert rec["methods"]["HF Linear | uniform"]["status"] == "n/a"
    assert rec["methods"]["KF Linear | uniform"]["status"] == "ok"
    assert len(rec["base"]) == 4 and not list(tmp_path.glob("cells/*.partial.json"))
    mtimes = [p.stat().st_mtime_ns for p in paths]

    runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 6, "train": 6}
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    # a killed cell: its result is gone but its partial record and cached models remain
    partial = paths[0].with_suffix(".partial.json")
    kept = json.loads(paths[0].read_text())
    del kept["methods"]["KF Linear | uniform"]
    partial.write_text(json.dumps(kept))
    paths[0].unlink()
    runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 7, "train": 6}  # only the missing method; models from cache
    assert set(json.loads(paths[0].read_text())["methods"]) == {
        "Vanilla averaging | uniform",
        "KF Linear | uniform",
        "HF Linear | uniform",
    }


def test_rerun_fuses_the_named_runs_again_in_finished_cells(tmp_path: Path, counted):
    suite = _tiny_suite("tiny-rerun")
    paths = runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 6, "train": 6}
    before = [json.loads(p.read_text()) for p in paths]
    for p, rec in zip(paths, before, strict=True):  # mark the old KF Linear rows
        rec["methods"]["KF Linear | uniform"]["marker"] = True
        p.write_text(json.dumps(rec))
    runner.run_suite(
        suite, [0], tmp_path, device="cpu", progress=False, threads=None, rerun=["kf_linear"]
    )
    assert counted == {"fuse": 8, "train": 6}  # KF Linear in both cells; models from cache
    for p, rec in zip(paths, before, strict=True):
        new = json.loads(p.read_text())
        assert "marker" not in new["methods"]["KF Linear | uniform"]
        assert new["methods"]["KF Linear | uniform"]["status"] == "ok"
        assert (
            new["methods"]["Vanilla averaging | uniform"]
            == rec["methods"]["Vanilla averaging | uniform"]
        )
    assert not list(tmp_path.glob("cells/*.partial.json"))
    with pytest.raises(ValueError, match="unknown method"):
        runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, rerun=["kf_lineer"])


def test_measure_cells_keeps_one_file_of_records_and_resumes(tmp_path: Path):
    from neurofuse.bench.records import measure_cells

    cells = _tiny_suite("tiny-measure").cells([0])  # two cells
    store, lines, calls = tmp_path / "records.json", [], []

    def measure(cell):
        calls.append(cell.cell_id)
        return None if "noniid4" in cell.cell_id else {"value": len(calls)}

    records = measure_cells(cells, store, measure, lambda r: f"v={r['value']}", lines.append)
    assert records == {cells[0].cell_id: {"value": 1}} == json.loads(store.read_text())
    assert lines[0].startswith(f"[1/2] {cells[0].cell_id}: v=1 (")
    assert lines[1] == f"[2/2] {cells[1].cell_id}: base models not cached, skipped"
    again = measure_cells(cells, store, measure, log=lines.append)  # resumes: cell 0 kept
    assert calls == [cells[0].cell_id, cells[1].cell_id, cells[1].cell_id]
    assert again == records


def test_runs_added_to_a_cell_are_never_merged_with_runs_of_other_base_models(
    tmp_path: Path, counted, monkeypatch: pytest.MonkeyPatch
):
    suite = _tiny_suite("tiny-digest")
    one = dataclasses.replace(suite, cells=lambda seeds: suite.cells(seeds)[:1])
    fewer = dataclasses.replace(one, methods=one.methods[:2])
    (path,) = runner.run_suite(fewer, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 2, "train": 2}
    rec = json.loads(path.read_text())
    assert len(rec["base_digest"]) == 16
    # same cached models: the added run joins the record, the earlier ones are kept
    runner.run_suite(one, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 3, "train": 2}
    # the cache is lost: retrained models (other weights) -> every run is fused again
    for f in (tmp_path / "cache").glob("*"):
        f.unlink()
    rec = json.loads(path.read_text())
    rec["methods"]["Vanilla averaging | uniform"]["status"] = "error"  # forces a rerun
    path.write_text(json.dumps(rec))
    counted_train = basemodels.prepare.__globals__["_train_one"]
    monkeypatch.setitem(
        basemodels.prepare.__globals__,
        "_train_one",
        lambda arch, data, idx, seed, device: counted_train(arch, data, idx, seed + 1, device),
    )
    runner.run_suite(one, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 6, "train": 4}  # all three runs, not just the errored one
    new = json.loads(path.read_text())
    assert new["base_digest"] != rec["base_digest"]
    assert all(e["status"] == "ok" for e in new["methods"].values())


def test_a_subset_of_runs_never_replaces_a_cell_made_from_other_base_models(
    tmp_path: Path, counted, monkeypatch: pytest.MonkeyPatch
):
    """``--methods`` / ``--rerun`` on a finished cell whose base models are not at hand (an
    empty cache, or one holding other models) would recompute the cell from new base models
    with the selected runs alone, dropping the others' rows: the cell fails instead, its
    record untouched, and without training when the cache lacks the models."""
    suite = _tiny_suite("tiny-keep")
    one = dataclasses.replace(suite, cells=lambda seeds: suite.cells(seeds)[:1])
    (path,) = runner.run_suite(one, [0], tmp_path, device="cpu", progress=False, threads=None)
    before = path.read_text()
    assert counted == {"fuse": 3, "train": 2}
    lines: list[str] = []
    kwargs = dict(device="cpu", progress=False, threads=None, log=lines.append)

    def rerun_kf_linear_from(cache: str) -> None:
        runner.run_suite(
            one,
            [0],
            tmp_path,
            methods=["kf_linear"],
            rerun=["kf_linear"],
            cache=tmp_path / cache,
            **kwargs,
        )

    rerun_kf_linear_from("empty")
    assert counted == {"fuse": 3, "train": 2}  # refused before training or fusing
    assert "FAILED ValueError" in lines[-1] and "would drop 2 other rows" in lines[-1]
    assert "Vanilla averaging | uniform" in lines[-1] and "lacks them" in lines[-1]
    assert path.read_text() == before
    # a cache with other models: refused once their digest is known
    counted_train = basemodels.prepare.__globals__["_train_one"]
    monkeypatch.setitem(
        basemodels.prepare.__globals__,
        "_train_one",
        lambda arch, data, idx, seed, device: counted_train(arch, data, idx, seed + 1, device),
    )
    basemodels.prepare(one.cells([0])[0], tmp_path / "other", "cpu")  # other weights, cached
    rerun_kf_linear_from("other")
    assert counted == {"fuse": 3, "train": 4} and "holds others" in lines[-1]
    assert path.read_text() == before
    # every run selected (and one to redo): the cell is recomputed whole from the models at hand
    rec = json.loads(before)
    rec["methods"]["Vanilla averaging | uniform"]["status"] = "error"
    path.write_text(json.dumps(rec))
    runner.run_suite(one, [0], tmp_path, cache=tmp_path / "other", **kwargs)
    assert counted == {"fuse": 6, "train": 4}
    assert json.loads(path.read_text())["base_digest"] != json.loads(before)["base_digest"]


def test_method_errors_are_recorded_not_raised(tmp_path: Path):
    suite = _tiny_suite("tiny-error")
    bad = MethodRun("FedAvg", "fedavg", options=(("sample_counts", [1]),))
    runner.run_suite(suite, [0], tmp_path, device="cpu", methods=None, progress=False, threads=None)
    cell = suite.cells([0])[0]
    setup = basemodels.prepare(cell, tmp_path / "cache", "cpu")
    entry = accuracy.fuse_once(bad, setup, cell, resolve_device("cpu"))
    assert entry["status"] == "error" and entry["error"]


def test_fusion_set_without_models_is_the_one_prepare_draws(tmp_path: Path):
    cell = _tiny_suite("tiny-fusion-set").cells([1])[0]
    x, y = basemodels.fusion_set(cell)
    setup = basemodels.prepare(cell, tmp_path / "cache", "cpu")
    assert torch.equal(x, setup.fusion_x) and torch.equal(y, setup.fusion_y)
    other = basemodels.fusion_set(_tiny_suite("tiny-fusion-set-0").cells([0])[0])
    assert not torch.equal(other[1], y)  # it depends on the seed


def test_bad_names_raise_with_choices():
    with pytest.raises(ValueError, match="paper-mlp"):
        get_suite("nope")
    with pytest.raises(ValueError, match="kf_linear"):
        runner.select_runs(get_suite("quick").methods, ["nope"])
    with pytest.raises(ValueError, match="0,1,2"):
        parse_seeds("0,x")
    assert parse_seeds("0, 2") == [0, 2] and parse_seeds(None) is None


def test_cells_cover_the_paper_grid():
    cells = get_suite("paper-mlp").cells([0, 1, 2])
    assert len(cells) == 3 * 8
    assert {c.split.label for c in cells} == {
        "non-IID 2",
        "non-IID 4",
        "non-IID 8",
        "sharded 2",
        "sharded 4",
        "sharded 6",
        "full 2",
        "weak-owner 2",
    }
    assert len({c.cell_id for c in cells}) == len(cells)
    sizes = get_suite("fusion-size").cells([0])
    assert len({c.models_id for c in sizes}) == 1  # every variant reuses the same base models
    assert sorted({c.fusion_samples for c in sizes}) == [100, 400, 1000]


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path: Path):
    report = bench("quick", out=tmp_path, device="cpu", progress=False)
    text = report.read_text()
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cells) == len(get_suite("quick").cells([0]))
    assert "Status: complete" in text and "EGR" in text and "sharded 2" in text
    assert f"- Code: every row from {stamp_name(code_stamp())}" in text
    runs = get_suite("quick").methods
    for path in cells:
        rec = json.loads(path.read_text())
        arch = rec["cell"]["arch"]
        ok = [e for e in rec["methods"].values() if e["status"] == "ok"]
        assert len(ok) == sum(1 for r in runs if not r.archs or arch in r.archs)
        assert all(0.0 <= e["accuracy"] <= 1.0 and e["seconds"] > 0 for e in ok)
        assert all(e["code"] == code_stamp() for e in ok)  # which code computed each row
        if arch == "vit_small":  # the paper-vit slice: a fused ViT, not an error
            assert {e["method"] for e in ok} >= {"transformer_otfusion", "kf_linear"}
    assert (tmp_path / "mlp_small_accuracy.png").stat().st_size > 0
    assert (tmp_path / "vit_small_accuracy.png").stat().st_size > 0
    # a method added to a finished suite is run on the cached base models and recorded
    before = {p.name: json.loads(p.read_text()) for p in cells}
    with_more = dataclasses.replace(
        get_suite("quick"), methods=(*runs, MethodRun("Git Re-Basin", "git_rebasin"))
    )
    runner.run_suite(with_more, [0], tmp_path, device="cpu", progress=False)
    for path in cells:
        rec = json.loads(path.read_text())
        assert rec["methods"]["Git Re-Basin | uniform"]["status"] == "ok"
        for key, entry in before[path.name]["methods"].items():
            assert rec["methods"][key] == entry  # earlier runs are kept as they were
        # the cell's compute time adds the new run's to the earlier ones
        assert rec["seconds"] > before[path.name]["seconds"]


def test_select_cells_by_split_key():
    cells = get_suite("paper-cnn").cells([0])
    chosen = runner.select_cells(cells, ["noniid2", "sharded2"])
    assert {c.split.key for c in chosen} == {"noniid2", "sharded2"}
    assert len(chosen) == 4  # two architectures
    assert runner.select_cells(cells, None) == cells
    with pytest.raises(ValueError, match="sharded6"):
        runner.select_cells(cells, ["sharded9"])


@pytest.mark.slow
def test_runtime_cell_times_each_method_in_its_own_process(tmp_path: Path):
    base = _tiny_suite("tiny-runtime")
    suite = Suite(
        "tiny-runtime",
        "test",
        "runtime",
        lambda seeds: [
            Cell("tiny-runtime", "runtime", c.dataset, c.arch_label, c.arch, c.split, c.seed)
            for c in base.cells(seeds)[:1]
        ],
        (MethodRun("OTFusion", "otfusion"), MethodRun("KF Linear", "kf_linear")),
        default_seeds=(0,),
        repeats=2,
    )
    (path,) = runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=1)
    rec = json.loads(path.read_text())
    ot, kf = rec["methods"]["OTFusion | uniform"], rec["methods"]["KF Linear | uniform"]
    assert ot["status"] == "ok" and kf["status"] == "ok", (ot, kf)
    assert len(kf["times"]) == 2 and kf["median_seconds"] > 0
    assert ot["ratio_to_otfusion"] == pytest.approx(1.0)
    assert kf["ratio_to_otfusion"] == pytest.approx(kf["median_seconds"] / ot["median_seconds"])
    assert kf["warm_median_seconds"] == pytest.approx(kf["times"][1])  # every call but the first
    assert kf["forward_seconds"] > 0
    assert kf["ratio_to_forward"] == pytest.approx(kf["times"][1] / kf["forward_seconds"])
    report = tables.runtime_table(rec)
    assert "KF Linear (uniform)" in report and "÷ OTFusion" in report
    unit = (ot["forward_seconds"] + kf["forward_seconds"]) / 2  # median of the run's two
    row = next(r for r in report.splitlines() if r.startswith("| KF Linear (uniform)"))
    assert row.split("|")[5].strip() == f"{kf['warm_median_seconds'] / unit:.1f}×"
    from neurofuse.bench.report import write_report

    text = write_report(suite, tmp_path, "cmd", 1).read_text()
    assert "## seed 0" in text and report in text and (tmp_path / "runtime_seed0.png").exists()


def test_compression_cell_fuses_the_teacher_into_the_student(tmp_path: Path):
    def arch(hidden: tuple[int, ...]) -> Arch:
        return Arch(
            "mlp",
            (("in_features", 20), ("num_classes", 10), ("hidden", hidden)),
            (("epochs", 2), ("lr", 3e-3), ("batch_size", 64), ("val_fraction", 0.1)),
        )

    cell = Cell(
        "tiny-compression",
        "compression",
        "synthetic",
        "wide_to_narrow",
        arch((32,)),
        Split("sharded", 3),
        0,
        fusion_samples=60,
        student=arch((8,)),
        levels=("act1", "head"),  # given to KF Gradient only: KF Linear and KD ignore levels
    )
    suite = Suite(
        "tiny-compression",
        "test",
        "compression",
        lambda seeds: [cell],
        (
            MethodRun("KF Linear", "kf_linear"),
            MethodRun("KF Linear", "kf_linear", "activation", archs=("other_pair",)),
            MethodRun(
                "KF Gradient",
                "kf_gradient",
                options=(("init_model", None), ("epochs", 2), ("last_epochs", 2)),
            ),
            MethodRun("KD", "kd", options=(("init_model", None), ("epochs", 2))),
        ),
        default_seeds=(0,),
    )
    (path,) = runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    rec = json.loads(path.read_text())
    assert len(rec["seen_classes"]) in (3, 4)  # a third of the 10 classes
    assert set(rec["fusion_set"]["classes"]) <= set(rec["seen_classes"])
    kf, kd = rec["methods"]["KF Linear | uniform"], rec["methods"]["KD | uniform"]
    kfg = rec["methods"]["KF Gradient | uniform"]
    assert all(e["status"] == "ok" for e in (kf, kd, kfg)), (kf, kd, kfg)
    assert rec["methods"]["KF Linear | activation"]["status"] == "n/a"
    for entry in (kf, kd, kfg, rec["student"], rec["teacher"]):
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["accuracy_seen_classes"] <= 1.0
    from neurofuse.bench.report import write_report

    report = write_report(suite, tmp_path, "cmd", 1).read_text()
    assert "| Student (trained on a third of the classes) |" in report
    assert "| KF Linear (uniform) |" in report and (tmp_path / "compression.png").exists()


def test_fuse_arguments_only_what_the_method_uses():
    """levels, importance and target reach nf.fuse only for a method whose capabilities use
    them (nf.fuse refuses an argument the method would ignore)."""
    target = object()
    kfg = MethodRun("KF Gradient", "kf_gradient", "conductance")
    assert kfg.fuse_arguments(levels=("a", "b"), target=target) == {
        "importance": "conductance",
        "levels": ["a", "b"],
        "target": target,
    }
    assert MethodRun("KF Linear", "kf_linear", "deeplift").fuse_arguments(levels=("a",)) == {
        "importance": "deeplift"
    }
    assert MethodRun("KD", "kd").fuse_arguments(levels=("a",), target=target) == {"target": target}
    assert MethodRun("Ensemble", "ensemble").fuse_arguments(levels=("a",), target=target) == {}
    assert MethodRun("Vanilla", "vanilla").fuse_arguments() == {}


def test_every_suite_run_is_one_nf_fuse_accepts():
    """No registered suite gives a method an importance score it ignores, an unknown option or
    an option of the wrong type; register_suite refuses such a run."""
    from neurofuse.bench.suites import SUITES
    from neurofuse.methods.registry import build_options, method_info

    for suite in SUITES.values():
        for run in suite.methods:
            run.check()
            build_options(method_info(run.method), run.kwargs())
    bad = dataclasses.replace(
        _tiny_suite("tiny-ignored-importance"),
        methods=(MethodRun("Vanilla averaging", "vanilla", "conductance"),),
    )
    with pytest.raises(ValueError, match="does not use importance"):
        register_suite(bad)
    typo = dataclasses.replace(
        _tiny_suite("tiny-unknown-option"),
        methods=(MethodRun("KF", "kf_linear", options=(("rdge", 1.0),)),),
    )
    with pytest.raises(ValueError, match="rdge"):
        register_suite(typo)
    assert "tiny-ignored-importance" not in SUITES and "tiny-unknown-option" not in SUITES


def test_compression_suite_cells():
    cells = get_suite("compression").cells([0, 1])
    assert len(cells) == 4 and all(c.student is not None for c in cells)
    resnet = next(c for c in cells if c.arch.name == "resnet34")
    assert resnet.student.name == "resnet18" and resnet.levels[-1] == "fc"
    assert len({c.models_id for c in cells}) == 4


def test_columns_sort_by_regime_models_then_variant_numbers():
    from neurofuse.bench.plots import model_counts

    cols = ["non-IID 2 n1000_aug0", "sharded 2", "non-IID 2 n100_aug4", "non-IID 2 n100_aug0"]
    assert sorted(cols, key=aggregate._column_rank) == [
        "non-IID 2 n100_aug0",
        "non-IID 2 n100_aug4",
        "non-IID 2 n1000_aug0",
        "sharded 2",
    ]
    assert model_counts(["non-IID 2", "non-IID 4", "sharded 2", "full 2"]) == {2, 4}
    assert model_counts(["non-IID 2 n100_aug0", "non-IID 2 n400_aug0"]) == set()


def test_ablation_suite_reuses_the_paper_mlp_models():
    ablation, paper = get_suite("ablation-mlp").cells([0, 1]), get_suite("paper-mlp").cells([0, 1])
    assert {c.models_id for c in ablation} <= {c.models_id for c in paper}
    assert len(ablation) == 2 * 7
    assert {r.method for r in get_suite("ablation-mlp").methods} == {"kf_linear", "kf_gradient"}


def test_weak_owner_split_gives_the_fusion_set_owner_the_least_data():
    from neurofuse.bench.basemodels import dataset, split_data
    from neurofuse.bench.spec import WEAK_OWNER_SAMPLES
    from neurofuse.data import partition

    cell = next(c for c in get_suite("paper-mlp").cells([1]) if c.split.regime == "weakowner")
    data = dataset(cell.dataset)
    parts, part = split_data(cell, data)
    dirichlet = partition(data.y_train, 2, "dirichlet", seed=1, num_classes=data.num_classes)
    small, large = sorted(dirichlet.indices, key=len)
    assert len(parts[0]) == WEAK_OWNER_SAMPLES < len(parts[1])
    assert set(parts[0].tolist()) <= set(small.tolist())  # a subset of the smaller part
    assert parts[1].tolist() == large.tolist()
    assert part.class_counts.sum(1).tolist() == [len(p) for p in parts]
    assert part.scheme == "weakowner"


def test_runs_limited_to_regimes_and_fine_tuned_runs(tmp_path: Path):
    suite = _tiny_suite("tiny-regimes")
    cell = suite.cells([0])[0]
    setup = basemodels.prepare(cell, tmp_path / "cache", "cpu")
    dev = resolve_device("cpu")
    other = "full" if cell.split.regime != "full" else "sharded"
    skipped = MethodRun("KF Linear", "kf_linear", regimes=(other,))
    assert accuracy.fuse_once(skipped, setup, cell, dev)["status"] == "n/a"
    tuned = MethodRun("KF Linear, fine-tuned", "kf_linear", finetune_epochs=2)
    plain = accuracy.fuse_once(MethodRun("KF Linear", "kf_linear"), setup, cell, dev)
    entry = accuracy.fuse_once(tuned, setup, cell, dev)
    assert entry["status"] == "ok" and entry["finetune_epochs"] == 2
    assert entry["accuracy"] != plain["accuracy"] or entry["loss"] != plain["loss"]


def test_cell_kinds_are_listed_in_one_registry_with_a_module_each():
    from neurofuse.bench import compression, kinds, runtime

    assert set(kinds.CELL_KINDS) == {"accuracy", "runtime", "compression"}
    assert kinds.CELL_KINDS["accuracy"].run is accuracy.run_accuracy_cell
    assert kinds.CELL_KINDS["runtime"].run is runtime.run_runtime_cell
    assert kinds.CELL_KINDS["compression"].report is compression.compression_report
    with pytest.raises(ValueError, match="accuracy, compression, runtime"):
        kinds.get_kind("nope")


def test_a_suite_of_an_unknown_kind_is_refused_before_any_cell_runs(tmp_path: Path, counted):
    tiny = _tiny_suite("tiny-kind")
    suite = dataclasses.replace(
        tiny,
        kind="nope",
        cells=lambda seeds: [dataclasses.replace(c, kind="nope") for c in tiny.cells(seeds)],
    )
    with pytest.raises(ValueError, match="unknown cell kind 'nope'"):
        runner.run_suite(suite, [0], tmp_path, device="cpu", progress=False, threads=None)
    assert counted == {"fuse": 0, "train": 0}


def _bench_imports(tree: ast.Module, names: set[str], name: str) -> set[str]:
    """The modules of neurofuse.bench that ``tree`` imports (lazy imports too); asserts that it
    registers nothing into another module's table at import."""
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "neurofuse.bench":
            edges |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("neurofuse.bench."):
                edges.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            edges |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("neurofuse.bench.")
            }
        # a module-level assignment into another module's table is a registration
        if isinstance(node, ast.Assign) and node in tree.body:
            assert not any(isinstance(t, ast.Subscript) for t in node.targets), name
    return edges


def test_bench_modules_import_each_other_without_a_cycle():
    """Every import between the modules of neurofuse.bench (lazy ones inside functions
    too) forms no cycle, and no module registers itself into another when imported."""
    import neurofuse.bench

    folder = Path(neurofuse.bench.__file__).parent
    # a module, or a subpackage (every file of it taken together)
    files = {p.stem: [p] for p in folder.glob("*.py")}
    files |= {p.parent.name: sorted(p.parent.glob("*.py")) for p in folder.glob("*/__init__.py")}
    names = set(files) - {"__init__", "__main__"}
    assert "suites" in names
    graph: dict[str, set[str]] = {}
    for name in names:
        edges = set()
        for tree in (ast.parse(f.read_text()) for f in files[name]):
            edges |= _bench_imports(tree, names, name)
        graph[name] = edges - {name}

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        for nxt in sorted(graph[name]):
            visit(nxt, [*path, name])

    for name in sorted(names):
        visit(name, [])
    assert not graph["runtime"] & {"runner", "kinds"}
    assert not graph["compression"] & {"runner", "kinds"}
    assert not graph["accuracy"] & {"runner", "kinds"}


def test_code_lines_name_the_rows_that_other_code_computed():
    now = {"version": "0.1.0", "commit": "a" * 40, "dirty": False}
    old = {"version": "0.1.0", "commit": "b" * 40, "dirty": True}

    def row(label: str, code: dict | None, status: str = "ok") -> dict:
        return {"label": label, "status": status, **({"code": code} if code else {})}

    one = [{"methods": {"A": row("A", now), "B": row("B", now), "C": row("C", old, "error")}}]
    assert code_lines(one) == [f"- Code: every row from commit {'a' * 12}"]
    mixed = [
        {"methods": {"A": row("A", now), "B": row("B", now), "K": row("KF Linear", old)}},
        {"methods": {"A": row("A", now), "B": row("B", now), "K": row("KF Linear", None)}},
        {"methods": {"A": row("A", now), "K": row("KF Linear", old)}},
    ]
    lines = code_lines(mixed)
    assert lines[0] == f"- Code: rows from 3 versions; 5 rows: commit {'a' * 12}; the others:"
    assert lines[1] == f"  - 2 rows: commit {'b' * 12} + local changes: KF Linear (2)"
    assert lines[2] == f"  - 1 rows: {UNSTAMPED}: KF Linear (1)"
    assert code_lines([{"methods": {}}]) == []
    assert code_lines([{"methods": {"A": row("A", None)}}]) == [f"- Code: {UNSTAMPED}"]


def test_code_stamp_names_this_checkouts_commit():
    stamp = code_stamp()
    assert stamp["version"] == nf.__version__
    head = subprocess.run(
        ["git", "-C", str(Path(nf.__file__).parents[1]), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert stamp["commit"] == head.stdout.strip() and isinstance(stamp["dirty"], bool)


def test_models_cached_follows_the_cache_names_prepare_uses(tmp_path):
    from neurofuse.bench.basemodels import model_path, models_cached
    from neurofuse.checkpoint import checkpoint_paths

    cell = get_suite("paper-mlp").cells([0])[0]
    assert not models_cached(cell, tmp_path)
    for i in range(cell.split.n_models - 1):
        checkpoint_paths(model_path(cell, tmp_path, i))[0].write_bytes(b"")
    assert not models_cached(cell, tmp_path)  # one model is still missing
    checkpoint_paths(model_path(cell, tmp_path, cell.split.n_models - 1))[0].write_bytes(b"")
    assert models_cached(cell, tmp_path)
