"""The registry of benchmark suites (paper section 5, appendix G; regimes of appendix D).

Each suite lists its cells for given seeds and the method runs every cell performs. Add a suite
with :func:`register_suite`; ``neurofuse bench SUITE`` looks it up by name. The definitions live
in :mod:`.cnn` (MLP and CNN suites) and :mod:`.vit` (Transformer suites and the CI slice), built
from the shared pieces of :mod:`.common`; importing this package registers them all.
"""

from __future__ import annotations

from neurofuse.bench.suites._registry import (
    SUITES,
    Suite,
    available_suites,
    get_suite,
    register_suite,
)

# importing the definitions (cnn, vit) registers their suites
from neurofuse.bench.suites.cnn import CNN1D, MLP, QUICK_MLP, vgg
from neurofuse.bench.suites.common import (
    PAPER_IMPORTANCE,
    PAPER_SPLITS,
    QUALITY_SPLITS,
    gradient_runs,
    grid,
    paper_methods,
    quality_runs,
    strong_baselines,
    train_options,
)
from neurofuse.bench.suites.vit import QUICK_VIT, VIT, VIT_SPLITS, vit_methods

__all__ = [
    "CNN1D",
    "MLP",
    "QUICK_MLP",
    "QUICK_VIT",
    "VIT",
    "VIT_SPLITS",
    "PAPER_IMPORTANCE",
    "PAPER_SPLITS",
    "QUALITY_SPLITS",
    "SUITES",
    "Suite",
    "available_suites",
    "get_suite",
    "gradient_runs",
    "grid",
    "paper_methods",
    "quality_runs",
    "register_suite",
    "strong_baselines",
    "train_options",
    "vgg",
    "vit_methods",
]
