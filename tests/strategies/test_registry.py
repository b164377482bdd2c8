"""The strategy registry: built-ins, lookups, the decorator and entry points, and that no
strategy defined in the package can be left out of it.

Every test that registers something works on a copy of the registry (monkeypatched), so nothing
leaks into other tests.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

import trustregion
import trustregion.strategies as strategies_pkg
from trustregion.strategies import (
    DRPO,
    ENTRY_POINT_GROUP,
    AnchoredTokens,
    StrategyTerms,
    TrustRegionStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_class,
)

registry = importlib.import_module("trustregion.strategies.registry")

BUILT_INS = {"cispo", "dppo", "dro", "drpo", "drpo_reference", "gspo", "pg_is", "ratio_clip",
             "spo"}


@pytest.fixture()
def private_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type[TrustRegionStrategy]]:
    """A copy of the registry, with entry points not yet loaded and no real ones installed."""
    copy = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", copy)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    return copy


class _Unit(TrustRegionStrategy):
    """A minimal user strategy: plain importance-sampled PG."""

    def terms(self, tokens: AnchoredTokens) -> StrategyTerms:
        return StrategyTerms(objective=tokens.ratio * tokens.advantages,
                             weight=tokens.ratio.new_ones(tokens.ratio.shape),
                             outside=tokens.mask & False)


class _Other(_Unit):
    pass


def test_built_ins_are_registered(private_registry: dict) -> None:
    names = available_strategies()
    assert names == sorted(names)
    # exactly the built-ins come from the package (tests may have added their own elsewhere)
    assert {n for n in names
            if strategy_class(n).__module__.startswith("trustregion.")} == BUILT_INS
    for name in BUILT_INS:
        cls = strategy_class(name)
        assert cls.registered_name == name
        assert cls.__module__.startswith("trustregion.strategies.")
        assert cls.__name__ in strategies_pkg.__all__


def test_get_strategy_passes_hyperparameters() -> None:
    strategy = get_strategy("drpo", delta=0.2)
    assert isinstance(strategy, DRPO)
    assert strategy.delta == 0.2
    assert get_strategy("ratio_clip", epsilon_high=0.28).bounds == pytest.approx((0.8, 1.28))


def test_unknown_name_lists_known_names_and_closest_match(private_registry: dict) -> None:
    with pytest.raises(ValueError, match="Did you mean 'drpo'") as err:
        get_strategy("drpoo")
    message = str(err.value)
    assert "unknown trust-region strategy 'drpoo'" in message
    assert message.endswith("Known strategies: " + ", ".join(available_strategies()))
    assert all(name in message for name in BUILT_INS)
    # nothing close: no suggestion, still the list
    with pytest.raises(ValueError, match="Known strategies: cispo, dppo") as err:
        strategy_class("zzzzzz")
    assert "Did you mean" not in str(err.value)


@pytest.mark.parametrize("name", ["Drpo", "1clip", "my-clip", "my clip", "", "_clip", 3])
def test_invalid_names_rejected(private_registry: dict, name: Any) -> None:
    registry_before = dict(private_registry)
    with pytest.raises(ValueError, match="lower-case letters, digits and underscores"):
        register_strategy(name)
    assert set(private_registry) == set(registry_before)


@pytest.mark.parametrize("thing", [object, int, lambda tokens: None, DRPO()])
def test_registering_a_non_strategy_raises_type_error(private_registry: dict, thing: Any) -> None:
    with pytest.raises(TypeError, match="TrustRegionStrategy subclasses"):
        register_strategy("not_a_strategy")(thing)
    assert "not_a_strategy" not in private_registry


def test_a_different_class_under_a_taken_name_raises(private_registry: dict) -> None:
    taken = "'drpo' is already taken by trustregion.strategies.drpo.DRPO"
    with pytest.raises(ValueError, match=re.escape(taken)):
        register_strategy("drpo")(_Unit)
    assert private_registry["drpo"] is DRPO

    register_strategy("unit")(_Unit)
    with pytest.raises(ValueError, match="already taken"):
        register_strategy("unit")(_Other)
    assert private_registry["unit"] is _Unit
    # registering the same class again under its own name is harmless
    assert register_strategy("unit")(_Unit) is _Unit


def test_a_class_that_only_shares_the_qualified_name_cannot_take_a_built_in_name(
        private_registry: dict) -> None:
    # A user class that happens to be called DRPO, defined in another module, is a different
    # class: it must not silently replace the built-in.
    impostor = type("DRPO", (_Unit,), {"__module__": "user_package.strategies"})
    assert impostor.__qualname__ == DRPO.__qualname__
    with pytest.raises(ValueError, match="already taken"):
        register_strategy("drpo")(impostor)
    assert private_registry["drpo"] is DRPO


def test_decorated_user_strategy_is_returned(private_registry: dict) -> None:
    @register_strategy("my_unit")
    class MyUnit(_Unit):
        def __init__(self, scale: float = 1.0, anchor: str = "behavior") -> None:
            super().__init__(anchor=anchor)  # type: ignore[arg-type]
            self.scale = scale

    assert MyUnit.registered_name == "my_unit"
    assert "my_unit" in available_strategies()
    assert strategy_class("my_unit") is MyUnit
    strategy = get_strategy("my_unit", scale=2.0)
    assert isinstance(strategy, MyUnit) and strategy.scale == 2.0


@dataclass
class FakeEntryPoint:
    name: str
    value: str
    target: Any = None
    error: Exception | None = None
    loaded: int = 0

    def load(self) -> Any:
        self.loaded += 1
        if self.error is not None:
            raise self.error
        return self.target


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, eps: list[FakeEntryPoint]) -> list[str]:
    groups: list[str] = []

    def entry_points(group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return eps

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    return groups


def test_entry_point_registers_a_plugin(monkeypatch: pytest.MonkeyPatch,
                                        private_registry: dict) -> None:
    good = FakeEntryPoint("plugin_unit", "plugin_pkg.mod:PluginUnit", target=_Other)
    groups = fake_entry_points(monkeypatch, [good])
    assert strategy_class("plugin_unit") is _Other
    assert groups == [ENTRY_POINT_GROUP] == ["trustregion.strategies"]
    assert _Other.registered_name == "plugin_unit"
    # loaded once, on the first lookup only
    assert "plugin_unit" in available_strategies()
    assert good.loaded == 1 and len(groups) == 1
    assert isinstance(get_strategy("plugin_unit"), _Other)


def test_broken_entry_points_only_warn(monkeypatch: pytest.MonkeyPatch,
                                       private_registry: dict) -> None:
    broken = FakeEntryPoint("broken_plugin", "broken_pkg:Missing",
                            error=ImportError("No module named 'broken_pkg'"))
    not_a_class = FakeEntryPoint("not_a_class", "pkg:thing", target=object())
    bad_name = FakeEntryPoint("Bad-Name", "pkg:Cls", target=_Other)
    good = FakeEntryPoint("plugin_unit", "plugin_pkg.mod:PluginUnit", target=_Other)
    fake_entry_points(monkeypatch, [broken, not_a_class, bad_name, good])
    with pytest.warns(UserWarning) as record:
        names = available_strategies()
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "'broken_plugin' (broken_pkg:Missing): No module named 'broken_pkg'" in messages[0]
    assert "'not_a_class'" in messages[1]
    assert "'Bad-Name'" in messages[2]
    # the built-ins and the good plug-in still work
    assert BUILT_INS | {"plugin_unit"} <= set(names)
    assert not {"broken_plugin", "not_a_class", "Bad-Name"} & set(names)
    assert get_strategy("drpo", delta=0.1).delta == 0.1


def test_entry_point_cannot_shadow_a_built_in(monkeypatch: pytest.MonkeyPatch,
                                              private_registry: dict) -> None:
    shadow = FakeEntryPoint("drpo", "evil:DRPO", target=_Other)
    fake_entry_points(monkeypatch, [shadow])
    assert strategy_class("drpo") is DRPO
    assert shadow.loaded == 0


# ------------------------------------------------------------------ the registry is complete
def _concrete_strategies_defined_in_the_package() -> set[type[TrustRegionStrategy]]:
    """Every non-abstract TrustRegionStrategy subclass defined in a module of ``trustregion``,
    found by importing every module of the package."""
    found: set[type[TrustRegionStrategy]] = set()
    for info in pkgutil.walk_packages(trustregion.__path__, prefix="trustregion."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, TrustRegionStrategy)
                    and value.__module__ == module.__name__ and not inspect.isabstract(value)):
                found.add(value)
    return found


@pytest.fixture(scope="module")
def package_strategies() -> set[type[TrustRegionStrategy]]:
    # Walked against the real registry (not a test's private copy), so that a class registered
    # by a module imported here for the first time stays registered for the tests after it.
    return _concrete_strategies_defined_in_the_package()


def test_every_concrete_strategy_in_the_package_is_registered(
        package_strategies: set[type[TrustRegionStrategy]]) -> None:
    assert len(package_strategies) >= len(BUILT_INS)  # the walk finds the strategies modules
    registered = {strategy_class(name) for name in available_strategies()}
    unregistered = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in package_strategies
                          if cls not in registered)
    assert not unregistered, (
        f"strategy class(es) {unregistered} are never registered: decorate each with "
        f"@register_strategy('name') and import its module in trustregion/strategies/__init__.py")
    # each under a name of its own (a subclass inherits its parent's registered_name)
    for cls in package_strategies:
        assert cls.registered_name is not None
        assert strategy_class(cls.registered_name) is cls


def test_importing_the_strategies_package_registers_every_built_in(
        package_strategies: set[type[TrustRegionStrategy]]) -> None:
    # A fresh interpreter: in this one other tests have already imported every module.
    script = ("from trustregion.strategies import available_strategies, strategy_class\n"
              "for name in available_strategies():\n"
              "    cls = strategy_class(name)\n"
              "    print(f'{name}={cls.__module__}.{cls.__qualname__}')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, timeout=300)
    after_import = {line for line in result.stdout.split() if "=trustregion." in line}
    everything = {f"{cls.registered_name}={cls.__module__}.{cls.__qualname__}"
                  for cls in package_strategies}
    missing = sorted(everything - after_import)
    assert not missing, (
        f"{missing} register only when their module is imported by hand: import each in "
        f"trustregion/strategies/__init__.py (and add the class to its __all__)")
    assert after_import == everything


def test_the_package_docstring_table_matches_the_registry(private_registry: dict) -> None:
    lines = (strategies_pkg.__doc__ or "").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| name | class |"))
    listed: dict[str, str] = {}
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[header + 2:]):
        match = re.match(r"^\| ``([a-z0-9_]+)`` \| :class:`(\w+)` \|", line)
        assert match, f"a row not of the form | ``name`` | :class:`Class` | ...: {line}"
        name, cls = match.groups()
        assert name not in listed, f"{name!r} is listed twice"
        listed[name] = cls
    built_ins = {name: cls.__name__ for name, cls in private_registry.items()
                 if cls.__module__.startswith("trustregion.")}
    assert listed == built_ins
