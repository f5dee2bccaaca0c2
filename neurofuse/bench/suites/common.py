"""Building blocks the suite definitions share: the paper's splits and importance scores, the
method lists of the accuracy suites, training options and the seed x architecture x split grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from neurofuse.bench.spec import Arch, Cell, MethodRun, Split

PAPER_SPLITS = (
    Split("noniid", 2),
    Split("noniid", 4),
    Split("noniid", 8),
    Split("sharded", 2),
    Split("sharded", 4),
    Split("sharded", 6),
    Split("full", 2),
)
PAPER_IMPORTANCE = ("uniform", "conductance", "deeplift")
#: The paper's splits and the one where the fusion-set owner is the weakest model.
QUALITY_SPLITS = (*PAPER_SPLITS, Split("weakowner", 2))


def gradient_runs(kind: str, importance: str, pairwise: bool) -> list[MethodRun]:
    name = f"{kind.upper()} Gradient"
    return [
        MethodRun(
            f"{name} (setting {i})",
            f"{kind}_gradient",
            importance,
            (("preset", f"setting{i}"),),
            pairwise=pairwise,
        )
        for i in (1, 2)
    ]


def paper_methods(
    importances: Sequence[str] = PAPER_IMPORTANCE,
    gradient_importances: Sequence[str] = ("uniform",),
) -> tuple[MethodRun, ...]:
    """Every baseline once, every closed-form importance-aware method once per importance score,
    and the gradient variants once per ``gradient_importances``: the default preset (started
    from the Linear fit) and both Table 9 presets (the rows of the paper's Tables 12-14; a
    preset's run costs many linear ones, ``benchmarks/results/runtime-cpu/report.md``, so by
    default they run with uniform importance only)."""
    runs = [
        MethodRun("Vanilla averaging", "vanilla"),
        MethodRun("FedAvg", "fedavg", needs_counts=True),
        MethodRun("KD", "kd"),
        MethodRun("LP", "lp"),
        MethodRun("NT", "transplant"),
    ]
    for imp in importances:
        runs += [
            MethodRun("OTFusion", "otfusion", imp),
            MethodRun("Git Re-Basin", "git_rebasin", imp),
            MethodRun("HF Linear", "hf_linear", imp, pairwise=True),
            MethodRun("KF Linear", "kf_linear", imp),
        ]
    for imp in gradient_importances:
        runs += [
            MethodRun("HF Gradient", "hf_gradient", imp, pairwise=True),
            MethodRun("KF Gradient", "kf_gradient", imp),
            *gradient_runs("hf", imp, pairwise=True),
            *gradient_runs("kf", imp, pairwise=False),
        ]
    return tuple(runs) + strong_baselines() + quality_runs()


def strong_baselines() -> tuple[MethodRun, ...]:
    """The averaging baselines with the repairs their authors' follow-ups use (REPAIR, Jordan
    et al. 2022; a BatchNorm reset), and the merging methods made for models trained on
    disjoint classes: ZipIt! (fully merged, and partially: every model keeps its own classifier,
    a multi-head model reported with its parameter count) and CCA Merge. REPORT.md compares
    against the best single-network one."""
    repair = (("repair", True),)
    return (
        MethodRun("Vanilla averaging + REPAIR", "vanilla", options=repair),
        MethodRun("OTFusion + REPAIR", "otfusion", options=repair),
        MethodRun("Git Re-Basin + REPAIR", "git_rebasin", options=repair),
        MethodRun("Git Re-Basin + BN reset", "git_rebasin", options=(("reset_bn", True),)),
        MethodRun("ZipIt!", "zipit"),
        MethodRun("ZipIt! + BN reset", "zipit", options=(("reset_bn", True),)),
        MethodRun("ZipIt! + REPAIR", "zipit", options=repair),
        MethodRun("ZipIt! partial (own classifiers)", "zipit", options=(("merge_layers", -1),)),
        MethodRun("CCA Merge", "cca_merge"),
        MethodRun("CCA Merge + REPAIR", "cca_merge", options=repair),
        MethodRun("NT + REPAIR", "transplant", options=repair),
    )


def quality_runs(fine_tune_epochs: int = 10) -> tuple[MethodRun, ...]:
    """Fuse-then-distill (one-shot: the fusion set only), ``auto``, and, on the full-dataset
    splits, KF Linear fine-tuned on the models' labelled training data (the paper's Tables 4,
    14 and 16 setup; not one-shot)."""
    return (
        MethodRun("KF Linear+KD", "kf_linear+kd"),
        MethodRun("HF Linear+KD", "hf_linear+kd", pairwise=True),
        MethodRun("auto", "auto"),
        MethodRun(
            "KF Linear, fine-tuned",
            "kf_linear",
            finetune_epochs=fine_tune_epochs,
            regimes=("full",),
        ),
    )


def train_options(epochs: int, lr: float, batch_size: int = 64) -> tuple[tuple[str, object], ...]:
    return (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("val_fraction", 0.1))


def grid(
    suite: str, dataset: str, archs: dict[str, Arch], splits: Sequence[Split], **extra: object
) -> Callable[[Sequence[int]], list[Cell]]:
    """Cells for every seed x architecture x split (seed outermost, so a partial run covers
    every split of the first seeds)."""

    def cells(seeds: Sequence[int]) -> list[Cell]:
        return [
            Cell(suite, "accuracy", dataset, label, arch, split, seed, **extra)  # type: ignore[arg-type]
            for seed in seeds
            for label, arch in archs.items()
            for split in splits
        ]

    return cells
