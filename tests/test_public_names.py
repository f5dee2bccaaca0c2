"""Every ``__all__`` in the package names only things that exist, each once, so that
``from module import *`` works for every module."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest

import neurofuse

# neurofuse.federated's modules import Flower, an optional extra; without it only the package
# itself and its (Flower-free) configuration can be imported.
_FLOWER_FREE = {"neurofuse.federated", "neurofuse.federated.config"}


def _modules() -> list[str]:
    names = ["neurofuse"]
    names += [m.name for m in pkgutil.walk_packages(neurofuse.__path__, "neurofuse.")]
    if importlib.util.find_spec("flwr") is None:
        names = [n for n in names if not n.startswith("neurofuse.federated.") or n in _FLOWER_FREE]
    return sorted(names)


MODULES = _modules()


def test_the_walk_finds_the_subpackages():
    assert {"neurofuse.bench.kinds", "neurofuse.cli._errors", "neurofuse.optimizers"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_exists(name: str):
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None)
    if public is None:
        return
    assert isinstance(public, list | tuple), f"{name}.__all__ is a {type(public).__name__}"
    assert all(isinstance(item, str) for item in public), public
    duplicates = sorted({item for item in public if list(public).count(item) > 1})
    assert not duplicates, f"{name}.__all__ lists {duplicates} twice"
    missing = [item for item in public if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ lists {missing}, which {name} does not define"
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    assert set(public) <= set(namespace)


def test_star_import_of_the_package_gives_its_lazy_public_names():
    namespace: dict[str, object] = {}
    exec("from neurofuse import *", namespace)
    assert callable(namespace["fuse"]) and callable(namespace["finetune"])
    assert namespace["__version__"] == neurofuse.__version__
    assert set(neurofuse.__all__) <= set(namespace)


def test_names_one_module_imports_from_another_are_in_its_all():
    """A name that a module of the package imports from another module that declares
    ``__all__`` is part of that module's public surface, so ``__all__`` must list it (a
    helper added later and never listed makes ``__all__`` stale)."""
    import ast
    from pathlib import Path

    root = Path(neurofuse.__file__).parent
    declared: dict[str, set[str]] = {}
    for name in MODULES:
        public = getattr(importlib.import_module(name), "__all__", None)
        if public is not None:
            declared[name] = set(public)
    stale = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in declared:
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") or name in declared[node.module]:
                    continue
                if f"{node.module}.{name}" in MODULES:  # a submodule, not a name
                    continue
                stale.append(f"{path.relative_to(root.parent)}: {node.module}.{name}")
    assert not stale, "imported but missing from __all__:\n" + "\n".join(stale)


def test_only_the_federated_package_imports_flower():
    """Flower is an optional extra: no module outside neurofuse.federated may import it (nor
    may neurofuse.federated's package or configuration, which the CLI imports)."""
    from pathlib import Path

    root = Path(neurofuse.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        inside = relative.startswith("federated/") and relative not in (
            "federated/__init__.py",
            "federated/config.py",
        )
        text = path.read_text(encoding="utf-8")
        if not inside and ("import flwr" in text or "from flwr" in text):
            offenders.append(relative)
    assert offenders == []
