"""The package reads no private Lightning attribute: no ``obj._name`` on another object, no
``getattr(obj, "_name")``, and no ``self._name`` in a Lightning subclass that Lightning itself
defines (overriding or reading a private member of Trainer, loops, connectors, callbacks or
LightningModule)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from functools import cache
from pathlib import Path

import trustregion

PACKAGE = Path(trustregion.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@cache
def _lightning_private_names(cls: type) -> frozenset[str]:
    """Private names Lightning's classes in ``cls``'s MRO define: methods, and attributes
    assigned on ``self``."""
    names: set[str] = set()
    for base in cls.__mro__:
        if not base.__module__.startswith(("lightning", "pytorch_lightning")):
            continue
        names.update(n for n in vars(base) if _private(n))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and _private(node.attr)):
                names.add(node.attr)
    return frozenset(names)


def _classes_by_name(path: Path) -> dict[str, type]:
    module_name = ".".join(("trustregion", *path.relative_to(PACKAGE).with_suffix("").parts))
    module_name = module_name.removesuffix(".__init__")
    module = importlib.import_module(module_name)
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    classes = _classes_by_name(path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or node.name not in classes:
            continue
        lightning_names = _lightning_private_names(classes[node.name])
        for inner in ast.walk(node):
            name = None
            if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                name = inner.name
            elif (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)
                  and inner.value.id == "self"):
                name = inner.attr
            if name is not None and _private(name) and name in lightning_names:
                found.append(f"{path}:{inner.lineno}: {node.name} uses Lightning's private "
                             f"{name}")
    return found


def test_every_package_module_is_scanned() -> None:
    modules = {m.name for m in pkgutil.walk_packages(trustregion.__path__, "trustregion.")}
    assert "trustregion.module" in modules and "trustregion.callbacks.progress" in modules
    assert len(_sources()) >= len(modules)


def test_the_package_reads_no_private_lightning_attribute() -> None:
    found = [v for path in _sources() for v in _violations(path)]
    assert found == []


def test_the_scan_finds_what_it_forbids(tmp_path: Path) -> None:
    # The old logging path: a loop counter and the logger connector, both private.
    bad = tmp_path / "bad.py"
    bad.write_text("def f(trainer):\n"
                   "    trainer._logger_connector.log_metrics({})\n"
                   "    return trainer.fit_loop.epoch_loop._batches_that_stepped\n")
    tree = ast.parse(bad.read_text())
    private = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and _private(n.attr)
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert len(private) == 2
    # A private member Lightning's RichProgressBar defines is caught by name.
    from lightning.pytorch.callbacks import RichProgressBar

    assert "_get_train_description" in _lightning_private_names(RichProgressBar)
