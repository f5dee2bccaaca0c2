"""The MLP and CNN suites: the paper's accuracy tables on MNIST-5k and MNIST-1D, the fusion-set
size study, the runtime table, compression and the KF Linear ablation."""

from __future__ import annotations

from collections.abc import Sequence

from neurofuse.bench.spec import Arch, Cell, MethodRun, Split
from neurofuse.bench.suites._registry import Suite, register_suite
from neurofuse.bench.suites.common import (
    PAPER_SPLITS,
    QUALITY_SPLITS,
    gradient_runs,
    grid,
    paper_methods,
    train_options,
)

MLP = Arch(
    "mlp",
    (("in_features", 784), ("num_classes", 10), ("hidden", (128, 128))),
    train_options(20, 2e-3),
)
QUICK_MLP = Arch(
    "mlp", (("in_features", 784), ("num_classes", 10), ("hidden", (32, 32))), train_options(5, 3e-3)
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
        train_options(epochs, 2e-3),
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
    train_options(30, 3e-3),
)


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


def _compression_cells(seeds: Sequence[int]) -> list[Cell]:
    """Wide into narrow (MLP 512-512 into 64-64) and deep into shallow (ResNet-34 into
    ResNet-18 at width 8, levels at the four stage ends and the head)."""
    mlp_student = Arch(
        "mlp",
        (("in_features", 784), ("num_classes", 10), ("hidden", (64, 64))),
        train_options(20, 2e-3),
    )
    mlp_teacher = Arch(
        "mlp",
        (("in_features", 784), ("num_classes", 10), ("hidden", (512, 512))),
        train_options(20, 2e-3),
    )

    def resnet(name: str) -> Arch:
        kwargs = (("in_channels", 1), ("num_classes", 10), ("width", 8))
        return Arch(name, kwargs, train_options(8, 2e-3))

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
