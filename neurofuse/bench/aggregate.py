r"""Aggregate cell results over seeds: mean ± std and ensemble-gain recovered (EGR).

.. math::

    \mathrm{EGR} = \frac{\bar a_{\text{fused}} - \bar a_{\text{best base}}}
                        {\bar a_{\text{ensemble}} - \bar a_{\text{best base}}}

with :math:`\bar a` the accuracy averaged over seeds (a ratio of means, which stays defined when
one seed's ensemble happens to equal its best model). 1 means the one fused model matches the
n-model ensemble; 0 means it is no better than the best single base model; negative means worse.
It is undefined (``None``) when the ensemble does not beat the best base model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BASE_ROWS = ("Individual models (mean)", "Best base model", "Ensemble")
#: the one-shot neurofuse methods that compete for "best neurofuse run": the HF/KF variants,
#: their fuse-then-distill forms and ``auto`` (not KD alone, the other baselines, or a run
#: fine-tuned on labelled training data, which is not one-shot)
_CORE = ("hf_linear", "kf_linear", "hf_gradient", "kf_gradient")
NEUROFUSE_METHODS = (*_CORE, *(f"{m}+kd" for m in _CORE), "auto")


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every finished cell result under ``out/cells`` (partial files are ignored)."""
    paths = sorted((Path(out) / "cells").glob("*.json"))
    return [json.loads(p.read_text()) for p in paths if not p.name.endswith(".partial.json")]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def egr(fused: float, best_base: float, ensemble: float) -> float | None:
    """Ensemble-gain recovered, ``(fused - best_base) / (ensemble - best_base)``; None when the
    ensemble is not better than the best base model (nothing to recover)."""
    gap = ensemble - best_base
    if gap <= 1e-12:
        return None
    return (fused - best_base) / gap


@dataclasses.dataclass
class Stat:
    """One table entry: accuracy over seeds (and whatever else was recorded)."""

    values: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    nll: list[float] = dataclasses.field(default_factory=list)
    ece: list[float] = dataclasses.field(default_factory=list)
    status: str = "ok"
    errors: list[str] = dataclasses.field(default_factory=list)
    egr: float | None = None
    method: str = ""
    one_shot: bool = True
    parameters: list[float] = dataclasses.field(default_factory=list)

    @property
    def single_model(self) -> bool:
        """One network's parameters (not a multi-head or multi-member model); runs recorded
        before the parameter count was are taken as single models."""
        return not self.parameters or max(self.parameters) <= 1.0 + 1e-9

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0] if self.values else None

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1] if self.values else None


@dataclasses.dataclass
class Group:
    """One table: every row (method | importance) x column (split) for one architecture."""

    arch: str
    columns: list[str]
    rows: list[str]
    stats: dict[tuple[str, str], Stat]
    seeds: dict[str, list[int]]

    def get(self, row: str, column: str) -> Stat | None:
        return self.stats.get((row, column))


def column_of(cell: dict[str, Any]) -> str:
    variant = cell.get("variant") or ""
    return f"{cell['split']} {variant}".strip()


def _column_rank(column: str) -> tuple[int, int, tuple[Any, ...]]:
    """Regime, then number of models, then the variant with its numbers compared as numbers
    (``n100_aug0`` before ``n1000_aug0``)."""
    regime_order = {"non-IID": 0, "sharded": 1, "full": 2}
    parts = column.split()
    n = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    variant = " ".join(parts[2:])
    natural = tuple(
        (0, int(tok), "") if tok.isdigit() else (1, 0, tok)
        for tok in re.split(r"(\d+)", variant)
        if tok
    )
    return regime_order.get(parts[0], 3), n, natural


def _add(stats: dict[tuple[str, str], Stat], key: tuple[str, str], acc: float) -> Stat:
    stat = stats.setdefault(key, Stat())
    stat.values.append(acc)
    return stat


def summarise(records: Iterable[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, Group]:
    """Group accuracy-cell results by architecture; one :class:`Stat` per row and column.
    Rows follow ``order`` (method keys, e.g. the suite's), then any others alphabetically."""
    groups: dict[str, Group] = {}
    for rec in records:
        cell = rec["cell"]
        if cell["kind"] != "accuracy":
            continue
        g = groups.setdefault(cell["arch"], Group(cell["arch"], [], list(BASE_ROWS), {}, {}))
        col = column_of(cell)
        if col not in g.columns:
            g.columns.append(col)
        g.seeds.setdefault(col, []).append(cell["seed"])
        base = [b["accuracy"] for b in rec["base"]]
        _add(g.stats, (BASE_ROWS[0], col), sum(base) / len(base))
        _add(g.stats, (BASE_ROWS[1], col), max(base))
        _add(g.stats, (BASE_ROWS[2], col), rec["ensemble"]["accuracy"])
        for key, entry in rec["methods"].items():
            if key not in g.rows:
                g.rows.append(key)
            stat = g.stats.setdefault((key, col), Stat())
            stat.method = entry.get("method", "")
            stat.one_shot = not entry.get("finetune_epochs")
            if entry["status"] == "ok":
                stat.values.append(entry["accuracy"])
                stat.seconds.append(entry["seconds"])
                stat.nll.append(entry["nll"])
                stat.ece.append(entry["ece"])
                if "parameters_vs_one_model" in entry:
                    stat.parameters.append(entry["parameters_vs_one_model"])
            else:
                stat.status = entry["status"]
                if entry["status"] == "error":
                    stat.errors.append(entry.get("error", "?"))
    rank = {key: i for i, key in enumerate(order)}
    for g in groups.values():
        methods = sorted(g.rows[len(BASE_ROWS) :], key=lambda k: (rank.get(k, len(rank)), k))
        g.rows = [*BASE_ROWS, *methods]
        g.columns.sort(key=_column_rank)
        for col in g.columns:
            best, ens = g.get(BASE_ROWS[1], col), g.get(BASE_ROWS[2], col)
            for row in g.rows:
                row_stat = g.get(row, col)
                if row_stat is not None and row_stat.values and row != BASE_ROWS[1]:
                    row_stat.egr = egr(row_stat.mean, best.mean, ens.mean)  # type: ignore[arg-type, union-attr]
    return groups


def best_neurofuse(group: Group, column: str) -> tuple[str, Stat] | None:
    """The one-shot neurofuse row (:data:`NEUROFUSE_METHODS`) of highest mean accuracy in
    ``column``."""
    return _best(group, column, lambda stat: stat.method in NEUROFUSE_METHODS)


#: rows that are not fusion baselines: the ensemble is the upper bound, not a merged model
_NOT_BASELINES = ("ensemble",)


def best_baseline(group: Group, column: str) -> tuple[str, Stat] | None:
    """The strongest one-shot baseline in ``column``: the row of highest mean accuracy among
    the methods that are not neurofuse's and return one network (KD, LP and the repaired and
    merging baselines included; the ensemble, multi-head models such as ZipIt!'s partial zip
    and the base models excluded)."""
    return _best(
        group,
        column,
        lambda stat: (
            stat.method not in NEUROFUSE_METHODS
            and stat.method not in _NOT_BASELINES
            and stat.single_model
        ),
    )


def _best(group: Group, column: str, keep: Callable[[Stat], bool]) -> tuple[str, Stat] | None:
    best: tuple[str, Stat] | None = None
    for row in group.rows[len(BASE_ROWS) :]:
        stat = group.get(row, column)
        if stat is None or not stat.values or not stat.one_shot or not keep(stat):
            continue
        if best is None or stat.mean > best[1].mean:  # type: ignore[operator]
            best = (row, stat)
    return best
