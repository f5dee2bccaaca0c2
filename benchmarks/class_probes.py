"""Inputs synthesised from the models for the classes a fusion set lacks (issue 11): do they
help ``auto`` choose, or fuse-then-distill learn?

    .venv/bin/python benchmarks/class_probes.py [--suite paper-mlp] [--seeds 0,1,2]
        [--cache benchmarks/.cache] [--splits noniid2,...] [--archs vgg_bn,...]
        [--out benchmarks/results/class_probes] [--train] [--report-only]

A fusion set drawn from one owner's data shows only the owner's classes (sharded splits), so
neither ``auto``'s held-out rows nor its mixup probes can see a candidate forget the others,
and fuse-then-distill has no input of those classes to distil on. REPORT.md named the next
experiment: inputs synthesised from the models themselves, by model inversion (steps on the
input, the models fixed, on ``-log p_bar(c | x)`` with ``p_bar`` the base models' probability
ensemble). Two recipes:

- ``data`` probes: start from fusion-set inputs, 50 Adam steps (step 0.05 x the inputs' std),
  no prior (Mahendran & Vedaldi 2015 in its plainest form; this benchmark's own loop);
- ``prior`` probes: :func:`neurofuse.data.inversion.synthesise` (DeepInversion, Yin et al.
  2020): start from the background value plus noise, 100 Adam steps with total-variation and
  L2 priors, clamped to the data's range, and the BatchNorm-statistics prior where the models
  have BatchNorm.

It measures, on every cell of the suite (base models from its cache; a cell whose models are
not cached is skipped, or trained and cached with ``--train``):

1. **Selection**: as ``auto`` does, 25% of the fusion set held out (per label), each default
   portfolio candidate fused on the rest; then each candidate's share of misses on the
   held-out labels, on the mixup probes (against the ensemble) and on 20 ``data`` probes per
   class started from the held-out inputs (against the ensemble), and its mean KL to the
   ensemble on those probes. Rules: ``labels`` (``auto``'s criterion), ``labels + class
   probes`` (the probes appended to its rows) and ``class-balanced`` (the mean over classes of
   the miss rate on the held-out rows of that class, or on its probes where the fusion set
   has none of it); the test accuracy of what each picks.
2. **Distillation**: KF Linear on the whole fusion set, then ``kf_linear+kd``'s distillation
   (:func:`neurofuse.finetune` with the base models as teachers, its defaults) on the fusion
   set alone; on the fusion set followed by 40 probes per class of each recipe (every class);
   and with ``synthetic=40`` (the library's option: 40 ``prior`` inputs for each class the
   fusion set's labels lack, none where it shows every class).

Records accumulate in ``<out>/records.json`` (a killed run resumes); ``<out>/report.md`` and
``<out>/class_probes.png`` are regenerated from them.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
HOLDOUT = 0.25  # auto's default
RULES = ("labels", "labels + class probes", "class-balanced")
DISTILL = ("KF Linear", "+KD", "+KD, data probes", "+KD, prior probes", "+KD, synthetic=40")
#: the runs whose records the committed report holds
COMMANDS = (
    "`python benchmarks/class_probes.py` (paper-mlp), `python benchmarks/class_probes.py "
    "--suite paper-cnn --archs vgg_bn --splits sharded4,sharded6,sharded2,noniid2`, "
    "`python benchmarks/class_probes.py --suite paper-cnn --archs vgg --splits sharded4,sharded6` "
    "and `python benchmarks/class_probes.py --suite paper-cnn --archs vgg_bn --splits noniid4`"
)
SPLITS = ("noniid2", "noniid4", "sharded2", "sharded4", "sharded6", "weakowner2")


def invert(
    models: list[torch.nn.Module], start: torch.Tensor, per_class: int, seed: int
) -> torch.Tensor:
    """The ``data`` recipe: ``per_class`` inputs for every output class, class by class, each
    a row of ``start`` moved by 50 Adam steps on ``-log p_bar(c | x)`` and nothing else."""
    from neurofuse.methods.ensemble import _mean_probs_log

    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        classes = int(models[0](start[:1]).shape[-1])
    out = []
    for c in range(classes):
        x = start[torch.randint(len(start), (per_class,), generator=g)].clone().requires_grad_()
        opt = torch.optim.Adam([x], lr=0.05 * (float(start.std()) or 1.0))
        target = torch.full((per_class, 1), c)
        for _ in range(50):
            loss = -_mean_probs_log([m(x) for m in models]).gather(1, target).sum()
            (x.grad,) = torch.autograd.grad(loss, x)  # the inputs only: no model is touched
            opt.step()
        out.append(x.detach())
    return torch.cat(out)


def measure_cell(cell: Any, cache: Path, train_missing: bool = False) -> dict[str, Any] | None:
    import neurofuse as nf
    from neurofuse.bench.basemodels import models_cached, prepare
    from neurofuse.data.inversion import synthesise
    from neurofuse.evaluate import evaluate, evaluate_ensemble
    from neurofuse.finetuning import mixup_inputs
    from neurofuse.methods.auto import PORTFOLIO, holdout_split
    from neurofuse.methods.ensemble import ensemble_log_probs

    if not train_missing and not models_cached(cell, cache):
        return None
    s = prepare(cell, cache, "cpu")  # trains (and caches) the base models it lacks
    x, y, xt, yt = s.fusion_x, s.fusion_y, s.data.x_test, s.data.y_test

    def acc(m: torch.nn.Module) -> float:
        return 100 * evaluate(m, xt, yt).accuracy

    rec: dict[str, Any] = {
        "group": cell.cell_id.rsplit("_seed", 1)[0],  # dataset, architecture and split
        "best": max(acc(m) for m in s.models),
        "ensemble": 100 * evaluate_ensemble(s.models, xt, yt).accuracy,
        "fusion_classes": sorted(set(y.tolist())),
    }
    # 1. selection, on auto's split of the fusion set
    train, held = holdout_split(len(x), HOLDOUT, y, cell.seed)
    mix = mixup_inputs(x[held], 1, cell.seed)[len(held) :]
    probes = invert(s.models, x[held], 20, cell.seed)
    ens_mix = ensemble_log_probs(s.models, mix).argmax(-1)
    ens_probe = ensemble_log_probs(s.models, probes)
    rec["held_labels"] = y[held].tolist()
    rec["probe_classes"] = torch.arange(ens_probe.shape[1]).repeat_interleave(20).tolist()
    rec["candidates"] = {}
    for label, method, options in PORTFOLIO:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                f = nf.fuse(
                    s.models, (x[train], y[train]), method=method, seed=cell.seed, **options
                )
            except (ValueError, NotImplementedError):
                continue  # a candidate that does not apply (HF for more than two models)
        with torch.no_grad():
            out = torch.log_softmax(f(probes), -1)
            rec["candidates"][label] = {
                "accuracy": acc(f),
                "held_miss": (f(x[held]).argmax(-1) != y[held]).tolist(),
                "mixup_miss": (f(mix).argmax(-1) != ens_mix).tolist(),
                "probe_miss": (out.argmax(-1) != ens_probe.argmax(-1)).tolist(),
                "probe_kl": float((ens_probe.exp() * (ens_probe - out)).sum(-1).mean()),
            }
    # 2. distillation after KF Linear, on the whole fusion set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = nf.fuse(s.models, (x, y), method="kf_linear", seed=cell.seed)
    rec["distill"] = {"KF Linear": acc(fused)}
    every = list(range(int(ensemble_log_probs(s.models, x[:1]).shape[1])))
    for name, extra in (
        ("+KD", None),
        ("+KD, data probes", lambda: invert(s.models, x, 40, cell.seed)),
        ("+KD, prior probes", lambda: synthesise(s.models, x, every, 40, seed=cell.seed)),
    ):
        inputs = x if extra is None else torch.cat([x, extra()])
        # synthetic=0: these rows distil on their inputs only (the default synthesises for
        # BatchNorm teachers since 2026-12-07; the last row measures that option)
        rec["distill"][name] = acc(
            nf.finetune(fused, inputs, teachers=s.models, seed=cell.seed, synthetic=0)
        )
    rec["distill"]["+KD, synthetic=40"] = acc(
        nf.finetune(fused, (x, y), teachers=s.models, seed=cell.seed, synthetic=40)
    )
    return rec


def choose(rec: dict[str, Any], rule: str) -> tuple[str, float]:
    """The candidate ``rule`` picks (fewest misses; ties to the portfolio's order) and its
    test accuracy."""
    labels = rec["held_labels"]
    classes = rec["probe_classes"]

    def score(c: dict[str, Any]) -> float:
        held, mix, probe = c["held_miss"], c["mixup_miss"], c["probe_miss"]
        if rule == "labels":
            rows = held + mix
            return sum(rows) / len(rows)
        if rule == "labels + class probes":
            rows = held + mix + probe
            return sum(rows) / len(rows)
        per_class = []
        for k in sorted(set(classes)):
            own = [m for m, lab in zip(held, labels, strict=True) if lab == k]
            if not own:
                own = [m for m, cls in zip(probe, classes, strict=True) if cls == k]
            per_class.append(sum(own) / len(own))
        return sum(per_class) / len(per_class)

    name = min(rec["candidates"], key=lambda n: score(rec["candidates"][n]))
    return name, rec["candidates"][name]["accuracy"]


def report(records: dict[str, Any], out: Path, commands: str = COMMANDS) -> None:
    from neurofuse.utils import atomic_write_text

    seeds: dict[str, list[str]] = {}  # the cells of each architecture and split
    for c, rec in sorted(records.items(), key=lambda kv: (kv[1]["group"], kv[0])):
        seeds.setdefault(rec["group"], []).append(c)

    def mean(vals: list[float]) -> str:
        return f"{sum(vals) / len(vals):.1f}"

    lines = [
        "# Class probes: inputs synthesised from the models (issue 11)",
        "",
        f"Commands: {commands}; machine: {platform.machine()}, torch {torch.__version__}, CPU, "
        "2 threads. What the inputs are and how each number is made: the docstring of "
        "`benchmarks/class_probes.py`. Test accuracy in %, mean over the seeds of each split "
        f"({', '.join(f'{s}: {len(v)}' for s, v in seeds.items())} cells).",
        "",
        "## 1. Choosing among `auto`'s candidates (fused on 75% of the fusion set)",
        "",
        "| split | best base | ensemble | " + " | ".join(RULES) + " | best candidate |",
        "|---|---:|---:|" + "---:|" * (len(RULES) + 1),
    ]
    for s, cells in seeds.items():
        row = [
            s,
            mean([records[c]["best"] for c in cells]),
            mean([records[c]["ensemble"] for c in cells]),
        ]
        row += [mean([choose(records[c], r)[1] for c in cells]) for r in RULES]
        row.append(
            mean([max(v["accuracy"] for v in records[c]["candidates"].values()) for c in cells])
        )
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Per cell, for the sharded and weak-owner splits: each candidate's test accuracy, its "
        "miss rate on the held-out labels / on the class probes, and its mean KL to the "
        "ensemble on the class probes.",
        "",
        "| cell | fusion-set classes | candidate: accuracy, held-out misses, class-probe "
        "misses, class-probe KL |",
        "|---|---|---|",
    ]
    for c, rec in records.items():
        if not any(k in rec["group"] for k in ("sharded", "weakowner")):
            continue
        parts = [
            f"{n}: {v['accuracy']:.1f}, {sum(v['held_miss']) / len(v['held_miss']):.2f}, "
            f"{sum(v['probe_miss']) / len(v['probe_miss']):.3f}, {v['probe_kl']:.3f}"
            for n, v in rec["candidates"].items()
        ]
        lines.append(f"| {c} | {rec['fusion_classes']} | {'; '.join(parts)} |")
    lines += [
        "",
        "## 2. Fuse-then-distill with class probes in the distillation set",
        "",
        "| split | best base | ensemble | " + " | ".join(DISTILL) + " |",
        "|---|---:|---:|" + "---:|" * len(DISTILL),
    ]
    for s, cells in seeds.items():
        row = [
            s,
            mean([records[c]["best"] for c in cells]),
            mean([records[c]["ensemble"] for c in cells]),
        ]
        row += [mean([records[c]["distill"][d] for c in cells]) for d in DISTILL]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![distillation with class probes](class_probes.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    _plot(records, seeds, out / "class_probes.png")


def _plot(records: dict[str, Any], seeds: dict[str, list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["best base", "ensemble", *DISTILL]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = []
        for cells in seeds.values():
            pick = [
                records[c]["best"]
                if name == "best base"
                else records[c]["ensemble"]
                if name == "ensemble"
                else records[c]["distill"][name]
                for c in cells
            ]
            vals.append(sum(pick) / len(pick))
        ax.bar([i + j * width for i in range(len(seeds))], vals, width, label=name)
    ticks = [g.split("_", 1)[-1] for g in seeds]  # without the dataset
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(seeds))], ticks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("fuse-then-distill with inputs synthesised from the models")
    ax.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="paper-mlp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "class_probes")
    parser.add_argument("--splits", default=",".join(SPLITS), help="split keys to run")
    parser.add_argument("--archs", default="", help="architecture labels to run (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--train", action="store_true", help="train (and cache) base models not in the cache"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from neurofuse.bench.records import measure_cells
    from neurofuse.bench.suites import get_suite

    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(v) for v in args.seeds.split(",")]
    cells = [] if args.report_only else get_suite(args.suite).cells(seeds)
    splits, archs = args.splits.split(","), [a for a in args.archs.split(",") if a]
    cells = [
        c
        for c in cells
        if c.split.key in splits
        and (not archs or any(f"_{a}_{c.split.key}_" in c.cell_id for a in archs))
    ]

    def summary(rec: dict[str, Any]) -> str:
        picks = {rule: choose(rec, rule)[0] for rule in RULES}
        return f"{picks}, distill { {k: round(v, 1) for k, v in rec['distill'].items()} }"

    records = measure_cells(
        cells,
        args.out / "records.json",
        lambda cell: measure_cell(cell, args.cache, args.train),
        summary,
        log=lambda line: print(line, flush=True),
    )
    default = args.out.resolve() == (HERE / "results" / "class_probes").resolve()
    argv = " ".join(a for a in sys.argv[1:] if a != "--report-only")
    report(
        records, args.out, COMMANDS if default else f"`python benchmarks/class_probes.py {argv}`"
    )
    print(f"report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
