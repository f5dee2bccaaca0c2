"""How long weighted k-means (KF's grouping) takes on random points, at three shapes.

    .venv/bin/python benchmarks/grouping_speed.py

Shapes (n points, dimension D, k groups): many samples and few neurons (256 x 300000, k=128,
where seeding and Lloyd run on n-dimensional Gram coordinates), a wide level (1000 x 600,
k=500) and a mid-sized one (512 x 4096, k=256). Prints wall and CPU seconds (on a busy machine
CPU time is the fairer figure) and the grouping cost of each.
"""

from __future__ import annotations

import time

import torch

from neurofuse.grouping import weighted_kmeans

SHAPES = [(256, 300_000, 128), (1000, 600, 500), (512, 4096, 256)]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n, dim, k in SHAPES:
        z = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
        s = torch.rand(n, generator=torch.Generator().manual_seed(1))
        weighted_kmeans(z[:16], s[:16], 4)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        g = weighted_kmeans(z, s, k, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"n={n} D={dim} k={k}: {wall:.3f} s wall, {cpu:.3f} s cpu, cost {g.cost:.5g}")


if __name__ == "__main__":
    main()
