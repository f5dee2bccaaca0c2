"""Is it the output layer's target that keeps KF Linear below the probability ensemble on the
mild non-IID splits? (issue 11)

    .venv/bin/python benchmarks/output_target.py [--suite paper-mlp] [--seeds 0,1,2]
        [--cache benchmarks/.cache] [--splits noniid2,noniid4,weakowner2] [--archs mlp]
        [--out benchmarks/results/output_target] [--report-only]

The logits of the classes cannot be permuted, so KF Linear fits its last layer to the
importance-weighted *mean logits* of the base models; the suites measure it against the
*probability* ensemble (the mean of the softmax outputs), and the issue asks the fused model to
follow that one. On every cell (base models from the suite's cache; a cell whose models are not
cached is skipped) this measures the test accuracy of the best base model, the logit-averaging
and the probability ensembles, KF Linear, and KF Linear with its last Linear layer refitted in
closed form on the fusion set: inputs the fused model's own features at that layer, ridge
towards the fitted layer (strength ``1e-3 x N``, N the fusion rows), targets

- ``mean logits``: the models' mean logits (the control: what KF Linear's own fit targets);
- ``log mean probs, T``: ``T log mean_k softmax(z_k / T)`` for ``T = 1, 2, 4`` (at ``T = 1``
  its softmax is the probability ensemble exactly), shifted per row to the mean logits' row
  mean (a per-row shift changes no softmax, and keeps the targets on the logits' scale).

Records accumulate in ``<out>/records.json`` (a killed run resumes); ``<out>/report.md`` is
regenerated from them.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
RIDGE = 1e-3
TEMPERATURES = (1.0, 2.0, 4.0)
COLUMNS = ("KF Linear", "mean logits") + tuple(f"log mean probs, T={t:g}" for t in TEMPERATURES)


def last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the model has no Linear layer to refit")
    return layers[-1]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s last Linear layer on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hook = last_linear(model).register_forward_hook(
        lambda mod, args, out: seen.__setitem__("x", args[0].detach())
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen["x"]


def refit_last(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose last Linear layer is the ridge solution (towards its current
    weights) mapping its features on ``x`` to ``target``."""
    out = copy.deepcopy(model)
    layer = last_linear(out)
    feats = features(out, x).double()
    rows = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
    start = torch.cat([layer.weight.detach().T.double(), layer.bias.detach()[None].double()])
    lam = RIDGE * len(rows) * torch.eye(rows.shape[1], dtype=rows.dtype)
    w = torch.linalg.solve(rows.T @ rows + lam, rows.T @ target.double() + lam @ start)
    with torch.no_grad():
        layer.weight.copy_(w[:-1].T)
        layer.bias.copy_(w[-1])
    return out


def measure(cell: Any, cache: Path) -> dict[str, Any] | None:
    import neurofuse as nf
    from neurofuse.bench.basemodels import models_cached, prepare
    from neurofuse.evaluate import evaluate

    if not models_cached(cell, cache):
        return None
    s = prepare(cell, cache, "cpu")
    x, y, xt, yt = s.fusion_x, s.fusion_y, s.data.x_test, s.data.y_test

    def acc(m: nn.Module) -> float:
        return 100 * evaluate(m, xt, yt).accuracy

    with torch.no_grad():
        test_logits = torch.stack([m(xt) for m in s.models])
        logits = torch.stack([m(x) for m in s.models])
    mean_logits = logits.mean(0)
    rec: dict[str, Any] = {
        "best base": max(acc(m) for m in s.models),
        "logit ensemble": 100 * float((test_logits.mean(0).argmax(1) == yt).float().mean()),
        "probability ensemble": 100
        * float((F.softmax(test_logits, -1).mean(0).argmax(1) == yt).float().mean()),
    }
    fused = nf.fuse(s.models, (x, y), method="kf_linear", seed=cell.seed)
    rec["KF Linear"] = acc(fused)
    rec["mean logits"] = acc(refit_last(fused, x, mean_logits))
    for t in TEMPERATURES:
        target = t * (
            torch.logsumexp(F.log_softmax(logits / t, -1), 0) - torch.log(torch.tensor(len(logits)))
        )
        target = target - target.mean(1, keepdim=True) + mean_logits.mean(1, keepdim=True)
        rec[f"log mean probs, T={t:g}"] = acc(refit_last(fused, x, target))
    return rec


def by_split(records: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The records grouped by split (the cell id without its seed)."""
    splits: dict[str, list[dict[str, Any]]] = {}
    for cell_id, rec in records.items():
        splits.setdefault(cell_id.rsplit("_seed", 1)[0], []).append(rec)
    return splits


def report(records: dict[str, Any], command: str) -> str:
    splits = by_split(records)
    head = ("best base", "logit ensemble", "probability ensemble") + COLUMNS
    lines = [
        "# The output layer's target: mean logits or the probability ensemble (issue 11)",
        "",
        f"Command: `{command}`; machine: {platform.machine()}, torch {torch.__version__}, CPU. "
        "What each column is: the docstring of `benchmarks/output_target.py`. Test accuracy "
        "in %, mean over the seeds (cells per split in brackets).",
        "",
        "| split | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for split, recs in sorted(splits.items()):
        means = [sum(r[h] for r in recs) / len(recs) for h in head]
        lines.append(f"| {split} ({len(recs)}) | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    lines += ["", "![gain over KF Linear](output_target.png)"]
    lines += [
        "",
        "Per cell:",
        "",
        "| cell | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for cell_id, rec in sorted(records.items()):
        lines.append(f"| {cell_id} | " + " | ".join(f"{rec[h]:.1f}" for h in head) + " |")
    return "\n".join(lines) + "\n"


def plot(records: dict[str, Any], path: Path) -> None:
    """Each refit's and each ensemble's accuracy minus KF Linear's, per split (mean over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from neurofuse.utils import atomic_write_bytes

    splits = by_split(records)
    names = ("logit ensemble", "probability ensemble") + COLUMNS[1:]
    fig = Figure(figsize=(9, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        gains = [
            sum(r[name] - r["KF Linear"] for r in recs) / len(recs)
            for _, recs in sorted(splits.items())
        ]
        ax.bar([i + j * width for i in range(len(splits))], gains, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], sorted(splits))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("test accuracy minus KF Linear's (points)")
    ax.set_title("KF Linear's last layer refitted to other targets, and the two ensembles")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    from neurofuse.bench import get_suite
    from neurofuse.bench.records import measure_cells
    from neurofuse.utils import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="paper-mlp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--splits", default="noniid2,noniid4,weakowner2")
    p.add_argument("--archs", default="mlp")
    p.add_argument("--out", type=Path, default=HERE / "results" / "output_target")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "records.json"
    seeds = [int(k) for k in a.seeds.split(",")]
    cells = [
        c
        for c in get_suite(a.suite).cells(seeds)
        if c.split.key in a.splits.split(",") and c.arch_label in a.archs.split(",")
    ]
    if a.report_only:
        records = json.loads(store.read_text()) if store.exists() else {}
    else:
        records = measure_cells(
            cells,
            store,
            lambda c: measure(c, a.cache),
            lambda r: (
                f"KF Linear {r['KF Linear']:.1f}, probability ensemble "
                f"{r['probability ensemble']:.1f}"
            ),
        )
    command = "python benchmarks/output_target.py"
    atomic_write_text(a.out / "report.md", report(records, command))
    if records:
        plot(records, a.out / "output_target.png")
    print(f"wrote {a.out / 'report.md'}")


if __name__ == "__main__":
    main()
