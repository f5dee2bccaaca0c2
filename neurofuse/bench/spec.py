"""The vocabulary of a benchmark: data regimes, method runs, cells and suites.

A *cell* is one (dataset x architecture x regime x number of models x seed) experiment; it
trains (or reuses) its base models once and fuses them with every :class:`MethodRun` of its
suite. Everything here is plain, frozen data so a cell's identity can be written to JSON and
compared on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from neurofuse.bench.provenance import code_stamp

#: regime name -> (partition scheme, human label)
REGIMES: dict[str, tuple[str, str]] = {
    "noniid": ("dirichlet", "non-IID"),
    "sharded": ("sharded", "sharded"),
    "full": ("full", "full"),
    "weakowner": ("weakowner", "weak-owner"),
}

#: Training samples the fusion-set owner (model 0) keeps in a ``weakowner`` split.
WEAK_OWNER_SAMPLES = 500


@dataclasses.dataclass(frozen=True)
class Split:
    """How the training data is shared among ``n_models`` models.

    ``regime`` is a key of :data:`REGIMES`: ``noniid`` (ordered-Dirichlet class proportions,
    appendix D.1), ``sharded`` (disjoint class sets, D.2), ``full`` (every model sees the
    whole training split; models differ only by seed) or ``weakowner`` (the non-IID split,
    with the smallest part given to model 0, the fusion-set owner, and cut to
    :data:`WEAK_OWNER_SAMPLES` samples: the party that fuses is the weakest)."""

    regime: str
    n_models: int

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose one of {sorted(REGIMES)}")
        if self.n_models < 2:
            raise ValueError(f"a split needs >= 2 models, got {self.n_models}")

    @property
    def label(self) -> str:
        return f"{REGIMES[self.regime][1]} {self.n_models}"

    @property
    def key(self) -> str:
        """``"noniid2"``, ``"sharded6"``, ``"full2"``: the name used to select splits."""
        return f"{self.regime}{self.n_models}"

    @property
    def scheme(self) -> str:
        return REGIMES[self.regime][0]


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One fusion run inside a cell: ``nf.fuse(models, data, method, importance, **options)``
    (``importance`` only for a method that uses it: :meth:`fuse_arguments`).

    ``label`` names the row of the report (e.g. ``"KF Gradient (setting 2)"``); ``pairwise``
    marks methods defined for two equal-width models only (HF), recorded as ``n/a`` for more.
    ``needs_counts`` passes each model's training-sample count as ``sample_counts``;
    ``archs``, when given, limits the run to cells of those architecture labels (others record
    ``n/a``, e.g. a Linear variant where levels hold several layers); ``regimes`` likewise to
    cells of those regimes. ``finetune_epochs > 0`` fine-tunes the fused model afterwards on
    the labelled union of the models' training data (:func:`neurofuse.finetune`), the paper's
    full-dataset setup (Tables 4, 14, 16)."""

    label: str
    method: str
    importance: str = "uniform"
    options: tuple[tuple[str, Any], ...] = ()
    pairwise: bool = False
    needs_counts: bool = False
    archs: tuple[str, ...] = ()
    finetune_epochs: int = 0
    regimes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.label} | {self.importance}"

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def check(self) -> None:
        """Raise a ValueError when ``nf.fuse`` would refuse this run in any cell: an unknown
        method or option, or an importance score other than uniform for a method that does not
        use importance (``method_info(method).caps.importance``)."""
        from neurofuse.methods import method_info, method_options

        info = method_info(self.method)
        unknown = sorted(set(self.kwargs()) - set(method_options(self.method)))
        if unknown:
            raise ValueError(f"run {self.key!r}: method {self.method!r} has no option {unknown}")
        if self.importance != "uniform" and not info.caps.importance:
            raise ValueError(
                f"run {self.key!r}: method {self.method!r} does not use importance scores; "
                "define it with the default importance 'uniform'"
            )

    def fuse_arguments(
        self, levels: Sequence[str] | None = None, target: Any = None
    ) -> dict[str, Any]:
        """This run's ``importance``, and the cell's ``levels`` and ``target``, as keyword
        arguments of ``nf.fuse``, each only when the method's capabilities use it: ``nf.fuse``
        refuses an argument the method would ignore (a method without ``caps.levels`` given
        levels, one with ``caps.target == "none"`` given a target), and a method without
        ``caps.importance`` runs with its default (:meth:`check` makes sure the run asks for
        no other score)."""
        from neurofuse.methods import method_info

        caps = method_info(self.method).caps
        out: dict[str, Any] = {}
        if caps.importance:
            out["importance"] = self.importance
        if levels is not None and caps.levels:
            out["levels"] = list(levels)
        if target is not None and caps.target != "none":
            out["target"] = target
        return out

    def entry(self) -> dict[str, Any]:
        """The identifying fields every result entry of this run starts with."""
        out: dict[str, Any] = {
            "label": self.label,
            "method": self.method,
            "importance": self.importance,
            "options": self.kwargs(),
            "code": code_stamp(),
        }
        if self.finetune_epochs:
            out["finetune_epochs"] = self.finetune_epochs
        return out


@dataclasses.dataclass(frozen=True)
class Arch:
    """A base-model architecture: ``neurofuse.models.build(name, **kwargs)`` plus how to train
    it (``neurofuse.train.TrainConfig`` fields)."""

    name: str
    kwargs: tuple[tuple[str, Any], ...]
    train: tuple[tuple[str, Any], ...]

    def build_kwargs(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One experiment of a suite; ``cell_id`` names its result file.

    ``variant`` distinguishes cells that share base models but fuse differently (e.g. the
    fusion-set size), so they also share the trained-model cache (``models_id``).
    ``student`` and ``levels`` are for compression cells: the small architecture the model is
    fused into, and the module names that end each level (``None``: automatic)."""

    suite: str
    kind: str
    dataset: str
    arch_label: str
    arch: Arch
    split: Split
    seed: int
    fusion_samples: int = 400
    augment_copies: int = 0
    variant: str = ""
    student: Arch | None = None
    levels: tuple[str, ...] | None = None

    @property
    def models_id(self) -> str:
        """Identity of the trained base models: data, architecture, training, split, seed."""
        blob = json.dumps(
            [
                self.dataset,
                self.arch.name,
                self.arch.kwargs,
                self.arch.train,
                self.split.regime,
                self.split.n_models,
                self.seed,
                *(
                    [self.student.name, self.student.kwargs, self.student.train]
                    if self.student
                    else []
                ),
            ],
            default=str,
        )
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        return (
            f"{self.dataset}_{self.arch_label}_{self.split.regime}{self.split.n_models}"
            f"_seed{self.seed}_{digest}"
        )

    @property
    def cell_id(self) -> str:
        suffix = f"_{self.variant}" if self.variant else ""
        return (
            f"{self.dataset}_{self.arch_label}_{self.split.regime}{self.split.n_models}"
            f"{suffix}_seed{self.seed}"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "kind": self.kind,
            "dataset": self.dataset,
            "arch": self.arch_label,
            "arch_build": {"name": self.arch.name, **self.arch.build_kwargs()},
            "train": dict(self.arch.train),
            "regime": self.split.regime,
            "scheme": self.split.scheme,
            "n_models": self.split.n_models,
            "split": self.split.label,
            "seed": self.seed,
            "fusion_samples": self.fusion_samples,
            "augment_copies": self.augment_copies,
            "variant": self.variant,
            **(
                {
                    "student_build": {"name": self.student.name, **self.student.build_kwargs()},
                    "student_train": dict(self.student.train),
                    "levels": list(self.levels) if self.levels else None,
                }
                if self.student
                else {}
            ),
        }
