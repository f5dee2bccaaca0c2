"""How long each importance score takes: a VGG-style CNN, 400 MNIST samples, every level.

    .venv/bin/python benchmarks/importance_speed.py            # 2 threads, CPU
    .venv/bin/python benchmarks/importance_speed.py --device cuda --repeat 3

Prints one row per score: wall-clock seconds (best of ``--repeat``), CPU seconds of this process
(on a busy machine, CPU time is the fairer figure: wall time includes waiting for other jobs),
levels (graph nodes scored) and samples; for Conductance, how far its scores are from a
100-step reference (mean relative difference per neuron, worst level). The ``(Captum, per
level)`` rows call Captum's ``LayerConductance``/``LayerDeepLift`` once per level, as the
reference code does; the others attribute all levels in one pass.
"""

from __future__ import annotations

import argparse
import time

import torch

from neurofuse.graph import affine_nodes, trace, unit_end
from neurofuse.importance import compute_importance, default_nodes
from neurofuse.models import build
from neurofuse.train import TrainConfig, train_model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from neurofuse.data import load

        splits = load("mnist5k", seed=0)
        return splits.x_train, splits.y_train
    except Exception:  # any data problem: the timing does not depend on the pixels
        g = torch.Generator().manual_seed(0)
        return torch.randn(4000, 1, 28, 28, generator=g), torch.randint(0, 10, (4000,), generator=g)


def _model(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """A VGG-style CNN, briefly trained (an untrained ReLU net with zero biases is positively
    homogeneous, which makes any number of Conductance steps exact and hides the step error)."""
    torch.manual_seed(0)
    model = build("vgg", config="vgg_small", in_channels=1, num_classes=10, input_size=28)
    if epochs:
        train_model(model, x, y, TrainConfig(epochs=epochs, device="cpu", val_fraction=0.0))
    return model.eval()


def _time(fn, repeat: int, device: torch.device) -> tuple[float, float]:
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--train-epochs", type=int, default=2, help="train the CNN first (0: untrained)"
    )
    ap.add_argument(
        "--nodes",
        choices=["levels", "auto"],
        default="levels",
        help="levels: the output of every affine unit (what KF/HF Linear ask for); "
        "auto: every node any engine asks for (both sides of activations too)",
    )
    ap.add_argument(
        "--skip-reference", action="store_true", help="skip the slow per-level Captum run"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_all, y_all = _data()
    model = _model(x_all[args.samples :], y_all[args.samples :], args.train_epochs).to(device)
    x, y = x_all[: args.samples].to(device), y_all[: args.samples].to(device)
    gm = trace(model)
    nodes = (
        default_nodes(model)
        if args.nodes == "auto"
        else [unit_end(gm, n).name for n in affine_nodes(gm)]
    )
    rows = [
        ("uniform", "uniform"),
        ("activation", "activation"),
        ("variance", "variance"),
        ("grad_x_activation", "grad_x_activation"),
        ("deeplift (one pass)", "deeplift"),
        ("conductance, n_steps=10 (default)", "conductance"),
        ("conductance, n_steps=20", ("conductance", {"n_steps": 20})),
        ("conductance, n_steps=50 (Captum's default)", ("conductance", {"n_steps": 50})),
    ]
    if not args.skip_reference:
        rows += [
            ("deeplift (Captum, per level)", ("deeplift", {"backend": "captum"})),
            (
                "conductance (Captum, per level), n_steps=10",
                ("conductance", {"n_steps": 10, "backend": "captum"}),
            ),
        ]
    print(f"device {device}, {args.threads} threads, {len(nodes)} levels, {args.samples} samples")
    reference = compute_importance(model, (x, y), ("conductance", {"n_steps": 100}), nodes=nodes)[0]
    print("| score | seconds (wall) | seconds (CPU) | levels | samples | vs n_steps=100 |")
    print("|---|---|---|---|---|---|")
    for label, spec in rows:
        out: list = []
        wall, cpu = _time(
            lambda spec=spec, out=out: out.append(
                compute_importance(model, (x, y), spec, nodes=nodes)[0]
            ),
            args.repeat,
            device,
        )
        gap = _gap(out[-1], reference) if label.startswith("conductance") else ""
        print(
            f"| {label} | {wall:.2f} | {cpu:.2f} | {len(nodes)} | {args.samples} | {gap} |",
            flush=True,
        )


def _gap(scores: dict, reference: dict) -> str:
    """Largest mean relative difference, over levels, of the normalised scores."""
    worst = max(
        float(((scores[n] - r).abs() / r.clamp_min(1e-3)).mean()) for n, r in reference.items()
    )
    return f"{100 * worst:.2f}%"


if __name__ == "__main__":
    main()
