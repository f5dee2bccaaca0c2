"""``neurofuse bench SUITE``: run a suite (resuming), then write its report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from neurofuse.bench.report import write_report
from neurofuse.bench.runner import run_suite, select_cells
from neurofuse.bench.suites import get_suite


def parse_seeds(seeds: str | None) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]``; None or empty -> None (the suite's default)."""
    if seeds is None or not seeds.strip():
        return None
    try:
        return [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"seeds must be comma-separated integers such as 0,1,2; got {seeds!r}"
        ) from None


def bench(
    suite: str,
    seeds: str | None = None,
    out: Path | None = None,
    device: str | None = None,
    methods: str | None = None,
    resume: bool = True,
    progress: bool = True,
    cache: Path | None = None,
    splits: str | None = None,
    report_only: bool = False,
    threads: int = 2,
    rerun: str | None = None,
) -> Path:
    """Run ``suite`` into ``out`` (default ``benchmarks/results/<suite>``) and return the
    path of its ``report.md`` (``report_only``: only rewrite the report from finished
    cells). Finished cells are reused when ``resume``; trained base models are cached in
    ``cache`` (default ``out/cache``; suites may share one). ``threads``: torch CPU threads.
    ``rerun``: comma-separated methods/labels fused again in finished cells (rows whose code
    changed); the report's command leaves it out, since a run from scratch makes every row."""
    spec = get_suite(suite)
    seed_list = parse_seeds(seeds) or list(spec.default_seeds)
    out = Path(out) if out is not None else Path("benchmarks/results") / suite
    out.mkdir(parents=True, exist_ok=True)
    method_list = [m for m in methods.split(",") if m.strip()] if methods else None
    parts = [suite, "--seeds", ",".join(map(str, seed_list)), "--out", str(out)]
    if device:
        parts += ["--device", device]
    if methods:
        parts += ["--methods", methods]
    if cache:
        parts += ["--cache", str(cache)]
    split_list = [s for s in splits.split(",") if s.strip()] if splits else None
    if splits:
        parts += ["--splits", splits]
    if threads != 2:
        parts += ["--threads", str(threads)]
    command = "neurofuse bench " + " ".join(shlex.quote(p) for p in parts)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if not report_only:
        run_suite(
            spec,
            seed_list,
            out,
            device=device,
            methods=method_list,
            resume=resume,
            progress=progress,
            log=log,
            splits=split_list,
            cache=Path(cache) if cache else None,
            threads=threads,
            rerun=[m for m in rerun.split(",") if m.strip()] if rerun else None,
        )
    expected = len(select_cells(spec.cells(seed_list), split_list))
    return write_report(spec, out, command, expected, len(spec.cells(seed_list)))
