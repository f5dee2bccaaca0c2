"""The suite registry: a :class:`Suite` names its cells and method runs; ``neurofuse bench``
looks it up by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from neurofuse.bench.spec import Cell, MethodRun


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
