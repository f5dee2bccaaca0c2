"""The registry of benchmark suites (paper section 5, appendix G; regimes of appendix D).

Each suite lists its cells for given seeds and the method runs every cell performs. Add a suite
with :func:`register_suite`; ``neurofuse bench SUITE`` looks it up by name.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named benchmark: ``cells(seeds)`` gives its experiments, ``methods`` what each runs.

    ``kind`` names the cell kind of :data:`neurofuse.bench.kinds.CELL_KINDS` that runs its
    cells and writes its report (``"accuracy"``: fuse and evaluate once per method;
    ``"runtime"``: fuse ``repeats`` times per method in a fresh process and time it;
    ``"compression"``: fuse a large model into a small one)."""

    name: str
    description: str
    kind: str
    cells: Callable[[Sequence[int]], list[Cell]]
    methods: tuple[MethodRun, ...]
    default_seeds: tuple[int, ...] = (0, 1, 2)
    repeats: int = 5


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    """Add ``suite`` to :data:`SUITES` (a name may be registered once). Every method run is
    checked first (:meth:`MethodRun.check`): a run ``nf.fuse`` would refuse in every cell, such
    as an importance score for a method that ignores importance, is an error here."""
    if suite.name in SUITES:
        raise ValueError(f"suite {suite.name!r} is already registered")
    for run in suite.methods:
        run.check()
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(sorted(SUITES))}")
    return SUITES[name]


def available_suites() -> dict[str, str]:
    return {name: s.description for name, s in sorted(SUITES.items())}


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


def _train(epochs: int, lr: float, batch_size: int = 64) -> tuple[tuple[str, object], ...]:
    return (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("val_fraction", 0.1))


MLP = Arch(
    "mlp", (("in_features", 784), ("num_classes", 10), ("hidden", (128, 128))), _train(20, 2e-3)
)
QUICK_MLP = Arch(
    "mlp", (("in_features", 784), ("num_classes", 10), ("hidden", (32, 32))), _train(5, 3e-3)
)


def vgg(batch_norm: bool, epochs: int = 10) -> Arch:
    return Arch(
        "vgg",
        (
            ("config", "vgg_small"),
            ("in_channels", 1),
            ("num_classes", 10),
            ("input_size", 28),
            ("batch_norm", batch_norm),
        ),
        _train(epochs, 2e-3),
    )


CNN1D = Arch(
    "cnn1d",
    (
        ("in_channels", 1),
        ("length", 40),
        ("num_classes", 10),
        ("channels", (32, 32, 32)),
        ("hidden", (64,)),
    ),
    _train(30, 3e-3),
)


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


register_suite(
    Suite(
        "paper-mlp",
        "MNIST-5k, MLP [128,128]: non-IID 2/4/8, sharded 2/4/6, full 2, weak-owner 2 "
        "(Table 12 analogue)",
        "accuracy",
        grid("paper-mlp", "mnist5k", {"mlp": MLP}, QUALITY_SPLITS),
        paper_methods(),
    )
)
register_suite(
    Suite(
        "paper-cnn",
        "MNIST-5k, VGG-small with and without BatchNorm, same regimes and weak-owner 2 "
        "(Table 13 analogue)",
        "accuracy",
        grid("paper-cnn", "mnist5k", {"vgg": vgg(False), "vgg_bn": vgg(True)}, QUALITY_SPLITS),
        paper_methods(),
    )
)
register_suite(
    Suite(
        "mnist1d",
        "MNIST-1D, 1-D CNN, same regimes (Table 14 analogue)",
        "accuracy",
        grid("mnist1d", "mnist1d", {"cnn1d": CNN1D}, PAPER_SPLITS),
        paper_methods(),
    )
)


def _fusion_size_cells(seeds: Sequence[int]) -> list[Cell]:
    arch = vgg(False)
    return [
        Cell(
            "fusion-size",
            "accuracy",
            "mnist5k",
            "vgg",
            arch,
            Split("noniid", 2),
            seed,
            fusion_samples=n,
            augment_copies=aug,
            variant=f"n{n}_aug{aug}",
        )
        for seed in seeds
        for aug in (0, 4)
        for n in (100, 400, 1000)
    ]


register_suite(
    Suite(
        "fusion-size",
        "two non-IID VGG-small: 100/400/1000 fusion samples, with and without "
        "augmentation (4 random-crop copies) (Table 6 analogue)",
        "accuracy",
        _fusion_size_cells,
        (
            MethodRun("KF Linear", "kf_linear"),
            *gradient_runs("kf", "uniform", False),
            MethodRun("KD", "kd"),
        ),
    )
)


def _runtime_cells(seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell("runtime", "runtime", "mnist5k", "vgg", vgg(False), Split("sharded", 2), s)
        for s in seeds
    ]


register_suite(
    Suite(
        "runtime",
        "each method fuses the same two VGG-small CNNs 5 times in a fresh process: "
        "median wall time, peak memory, ratio to OTFusion (Table 10 analogue)",
        "runtime",
        _runtime_cells,
        (
            MethodRun("Vanilla averaging", "vanilla"),
            MethodRun("FedAvg", "fedavg", needs_counts=True),
            MethodRun("OTFusion", "otfusion"),
            MethodRun("Git Re-Basin", "git_rebasin"),
            MethodRun("HF Linear", "hf_linear", pairwise=True),
            MethodRun("KF Linear", "kf_linear"),
            MethodRun("KF Linear", "kf_linear", "conductance"),
            MethodRun("LP", "lp"),
            MethodRun("KD", "kd"),
            MethodRun("NT", "transplant"),
            MethodRun("HF Gradient", "hf_gradient", pairwise=True),
            MethodRun("KF Gradient", "kf_gradient"),
            *gradient_runs("hf", "uniform", True),
            *gradient_runs("kf", "uniform", False),
        ),
        default_seeds=(0,),
    )
)

#: The ViT of the paper-vit suite: 28x28 digits cut into 16 patches of 7x7 plus a class token,
#: width 64, 4 pre-norm blocks of 4 heads, MLP 128 (the paper's CIFAR ViT, scaled to MNIST-5k).
#: Trained as the paper trains its ViTs (AdamW, warm-up and cosine, label smoothing 0.1), with
#: random 2-pixel shifts, the last epoch kept (a 10% validation split of a small part picks an
#: early epoch, which costs accuracy). The accuracy the base ViTs reach is in
#: ``benchmarks/REPORT.md`` (claim 8) and ``benchmarks/results/paper-vit/report.md``.
VIT = Arch(
    "vit",
    (
        ("image_size", 28),
        ("patch_size", 7),
        ("in_channels", 1),
        ("num_classes", 10),
        ("dim", 64),
        ("depth", 4),
        ("heads", 4),
        ("mlp_dim", 128),
    ),
    (
        ("epochs", 50),
        ("lr", 2e-3),
        ("batch_size", 64),
        ("weight_decay", 0.05),
        ("warmup_epochs", 5),
        ("augment", "crop=2"),
        ("val_fraction", 0.0),
    ),
)
QUICK_VIT = Arch(
    "vit",
    (
        ("image_size", 28),
        ("patch_size", 7),
        ("in_channels", 1),
        ("num_classes", 10),
        ("dim", 32),
        ("depth", 2),
        ("heads", 2),
        ("mlp_dim", 64),
    ),
    _train(4, 3e-3),
)
VIT_SPLITS = (
    Split("sharded", 2),
    Split("sharded", 4),
    Split("sharded", 6),
    Split("noniid", 2),
    Split("noniid", 4),
    Split("full", 2),
    Split("full", 4),
    Split("weakowner", 2),
)


def vit_methods(importances: Sequence[str] = PAPER_IMPORTANCE) -> tuple[MethodRun, ...]:
    """The rows of the paper's Tables 2 and 15-16 on our ViTs: the baselines, Transformer
    OTFusion on activations and on weights, Git Re-Basin with heads as units, and both Linear
    and both Gradient variants (the closed-form start), each with every importance score;
    the Gradient variants also with the paper's setting 1 (uniform)."""
    runs = [
        MethodRun("Vanilla averaging", "vanilla"),
        MethodRun("KD", "kd"),
        MethodRun("LP", "lp"),
    ]
    for imp in importances:
        runs += [
            MethodRun("Transformer OTFusion acts", "transformer_otfusion", imp),
            MethodRun(
                "Transformer OTFusion wts",
                "transformer_otfusion",
                imp,
                (("ground_metric", "wts"),),
            ),
            MethodRun("Git Re-Basin", "git_rebasin", imp),
            MethodRun("HF Linear", "hf_linear", imp, pairwise=True),
            MethodRun("KF Linear", "kf_linear", imp),
            MethodRun("HF Gradient", "hf_gradient", imp, pairwise=True),
            MethodRun("KF Gradient", "kf_gradient", imp),
        ]
    runs += [
        MethodRun(
            "HF Gradient (setting 1)",
            "hf_gradient",
            options=(("preset", "setting1"),),
            pairwise=True,
        ),
        MethodRun("KF Gradient (setting 1)", "kf_gradient", options=(("preset", "setting1"),)),
    ]
    # the averaging baselines with REPAIR (issue 16); ZipIt!, CCA Merge and NT refuse
    # transformer-like models (LayerNorm and attention mix the neurons whose statistics they
    # match), so these are the strongest forms of the baselines that exist here
    repair = (("repair", True),)
    runs += [
        MethodRun("Vanilla averaging + REPAIR", "vanilla", options=repair),
        MethodRun("Transformer OTFusion acts + REPAIR", "transformer_otfusion", options=repair),
        MethodRun("Git Re-Basin + REPAIR", "git_rebasin", options=repair),
        # auto with the base models as candidates, each scored against the other models
        # (issue 11; opt-in until every suite has this row)
        MethodRun("auto, bases vs others", "auto", options=(("include_base", "others"),)),
    ]
    return tuple(runs) + quality_runs()


register_suite(
    Suite(
        "paper-vit",
        "MNIST-5k, ViT (16 patches, width 64, 4 blocks x 4 heads): sharded 2/4/6, non-IID 2/4, "
        "full 2/4, weak-owner 2 (Tables 2, 15-16 analogue)",
        "accuracy",
        grid("paper-vit", "mnist5k", {"vit": VIT}, VIT_SPLITS),
        vit_methods(),
    )
)


def _quick_cells(seeds: Sequence[int]) -> list[Cell]:
    mlp = grid(
        "quick", "mnist5k", {"mlp_small": QUICK_MLP}, (Split("sharded", 2), Split("noniid", 2))
    )
    vit = grid("quick", "mnist5k", {"vit_small": QUICK_VIT}, (Split("sharded", 2),))
    return mlp(seeds) + vit(seeds)


register_suite(
    Suite(
        "quick",
        "CI slice: MNIST-5k, small MLP (sharded 2, non-IID 2) and small ViT (sharded 2: the "
        "paper-vit slice), one seed, a few methods",
        "accuracy",
        _quick_cells,
        (
            MethodRun("Vanilla averaging", "vanilla"),
            MethodRun("OTFusion", "otfusion"),
            MethodRun("HF Linear", "hf_linear", pairwise=True),
            MethodRun("KF Linear", "kf_linear"),
            MethodRun("KF Linear", "kf_linear", "activation"),
            MethodRun("Transformer OTFusion acts", "transformer_otfusion", archs=("vit_small",)),
            MethodRun(
                "KF Gradient",
                "kf_gradient",
                options=(("epochs", 5), ("last_epochs", 5)),
                archs=("vit_small",),
            ),
        ),
        default_seeds=(0,),
    )
)


def _compression_cells(seeds: Sequence[int]) -> list[Cell]:
    """Wide into narrow (MLP 512-512 into 64-64) and deep into shallow (ResNet-34 into
    ResNet-18 at width 8, levels at the four stage ends and the head)."""
    mlp_student = Arch(
        "mlp", (("in_features", 784), ("num_classes", 10), ("hidden", (64, 64))), _train(20, 2e-3)
    )
    mlp_teacher = Arch(
        "mlp", (("in_features", 784), ("num_classes", 10), ("hidden", (512, 512))), _train(20, 2e-3)
    )

    def resnet(name: str) -> Arch:
        kwargs = (("in_channels", 1), ("num_classes", 10), ("width", 8))
        return Arch(name, kwargs, _train(8, 2e-3))

    pairs = [
        ("mlp512_to_mlp64", mlp_teacher, mlp_student, None),
        (
            "resnet34_to_resnet18",
            resnet("resnet34"),
            resnet("resnet18"),
            ("layer1", "layer2", "layer3", "layer4", "fc"),
        ),
    ]
    return [
        Cell(
            "compression",
            "compression",
            "mnist5k",
            label,
            teacher,
            Split("sharded", 3),
            seed,
            fusion_samples=1000,
            student=student,
            levels=levels,
        )
        for seed in seeds
        for label, teacher, student, levels in pairs
    ]


def _compression_runs() -> tuple[MethodRun, ...]:
    start = (("init_model", None),)
    runs = [MethodRun("KF Linear", "kf_linear", archs=("mlp512_to_mlp64",))]
    for imp in ("uniform", "conductance", "deeplift"):
        for preset in ("setting1", "setting2"):
            runs.append(
                MethodRun(
                    f"KF Gradient ({preset})",
                    "kf_gradient",
                    imp,
                    (("preset", preset), *start),
                )
            )
    runs.append(MethodRun("KD", "kd", options=start))
    return tuple(runs)


register_suite(
    Suite(
        "compression",
        "one model trained on all classes fused into a smaller one, with data from a third of "
        "the classes: MLP 512-512 into 64-64, ResNet-34 into ResNet-18 (Table 7 analogue)",
        "compression",
        _compression_cells,
        _compression_runs(),
    )
)


def _kf_linear_ablation() -> tuple[MethodRun, ...]:
    runs = [MethodRun("KF Linear", "kf_linear")]
    runs += [
        MethodRun(f"KF Linear, ridge {r:g}", "kf_linear", options=(("ridge", r),))
        for r in (1e-4, 1e-2, 1e-1, 1.0)
    ]
    runs += [
        MethodRun("KF Linear, local search", "kf_linear", options=(("local_search", True),)),
        MethodRun("KF Linear, 1 restart", "kf_linear", options=(("n_init", 1),)),
        MethodRun("KF Gradient (setting 1)", "kf_gradient", options=(("preset", "setting1"),)),
        MethodRun(
            "KF Gradient (setting 1), KL head",
            "kf_gradient",
            options=(("preset", "setting1"), ("head_loss", "kl")),
        ),
    ]
    return tuple(runs)


register_suite(
    Suite(
        "ablation-mlp",
        "KF Linear options on the paper-mlp cells (same base models): the relative ridge of the "
        "least-squares fits, swap local search after k-means, k-means restarts; KF Gradient "
        "with the KL head loss",
        "accuracy",
        grid("ablation-mlp", "mnist5k", {"mlp": MLP}, PAPER_SPLITS),
        _kf_linear_ablation(),
    )
)
