"""Which code computed a suite's rows.

A suite resumes: rows computed by older code stay in its cells when a later run adds or
reruns others, so a report can mix results of several versions of the library. Every row a
run computes is stamped with :func:`code_stamp` (the package version and, in a git checkout,
the commit and whether the package's files differ from it), and :func:`code_lines` says in
the report which rows came from which code, so a reader can see a table that is not one run's.
"""

from __future__ import annotations

import functools
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neurofuse._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: Rows computed before the stamps existed are reported under this name.
UNSTAMPED = "not recorded (rows older than the code stamps of 2026-12-07)"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR.parent), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_stamp() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}`` of the running neurofuse: ``commit`` is the checkout's
    HEAD (``None`` outside a git checkout, e.g. an installed wheel), ``dirty`` whether files
    of the package differ from it (``None`` when unknown). Computed once per process."""
    commit = _git("rev-parse", "HEAD")
    dirty: bool | None = None
    if commit is not None:
        status = _git("status", "--porcelain", "--", str(PACKAGE_DIR))
        dirty = None if status is None else bool(status)
    return {"version": __version__, "commit": commit, "dirty": dirty}


def stamp_name(stamp: dict[str, Any] | None) -> str:
    """A short name of a stamp for the report: ``commit 1a2b3c4d5e6f`` (``+ local changes``
    when dirty), ``version 0.1.0`` without a commit, :data:`UNSTAMPED` without a stamp."""
    if not stamp:
        return UNSTAMPED
    if stamp.get("commit"):
        name = f"commit {str(stamp['commit'])[:12]}"
        return name + (" + local changes" if stamp.get("dirty") else "")
    return f"version {stamp.get('version', '?')}"


def _rows(records: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for rec in records:
        methods = rec.get("methods") or {}
        entries = methods.values() if isinstance(methods, dict) else methods
        for entry in entries:
            if isinstance(entry, dict) and entry.get("status") == "ok":
                yield entry


def code_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """Report lines saying which code computed the finished rows: one line when every row
    comes from the same code; otherwise the code with most rows, then every other code with
    the labels of its rows, so that a table mixing versions says so."""
    count: Counter[str] = Counter()
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    for entry in _rows(records):
        name = stamp_name(entry.get("code"))
        count[name] += 1
        labels[name][str(entry.get("label", entry.get("method", "?")))] += 1
    if not count:
        return []
    if len(count) == 1:
        (name,) = count
        return [f"- Code: {name}" if name == UNSTAMPED else f"- Code: every row from {name}"]
    (main, n_main), *others = count.most_common()
    out = [f"- Code: rows from {len(count)} versions; {n_main} rows: {main}; the others:"]
    for name, n in others:
        which = ", ".join(f"{label} ({k})" for label, k in sorted(labels[name].items()))
        out.append(f"  - {n} rows: {name}: {which}")
    return out
