"""The Transformer suites: ``paper-vit`` (the paper's Tables 2 and 15-16 on MNIST-5k ViTs) and
``quick``, the CI slice with a small MLP and a small ViT."""

from __future__ import annotations

from collections.abc import Sequence

from neurofuse.bench.spec import Arch, Cell, MethodRun, Split
from neurofuse.bench.suites._registry import Suite, register_suite
from neurofuse.bench.suites.cnn import QUICK_MLP
from neurofuse.bench.suites.common import PAPER_IMPORTANCE, grid, quality_runs, train_options

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
    train_options(4, 3e-3),
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
        # ... and the base models scored only where the fusion set shows every class
        MethodRun("auto, bases if covered", "auto", options=(("include_base", "covered"),)),
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
