"""The public names other code relies on (DESIGN.md "Public surface")."""

from __future__ import annotations

import specthink


def test_exported_names_are_sorted_and_importable() -> None:
    assert specthink.__all__ == sorted(specthink.__all__)
    for name in specthink.__all__:
        assert getattr(specthink, name) is not None


def test_core_names_of_the_design() -> None:
    """Broken: a name docs/architecture.md lists for the package root is not exported there
    (``TakeoverPolicy`` was missing), or the root's is another object than its module's."""
    for name in ("SpeculativeThinker", "TakeoverRules", "TakeoverPolicy", "Result", "TextEvent",
                 "SpecthinkError", "ConfigError"):
        assert name in specthink.__all__
    from specthink.engine import SpeculativeThinker
    from specthink.rules import TakeoverPolicy

    assert specthink.SpeculativeThinker is SpeculativeThinker
    assert specthink.TakeoverPolicy is TakeoverPolicy


def test_the_error_tree_draws_every_exception_class() -> None:
    """Broken: an exception class of the package (``PolicyStateError`` and ``GradingError``
    were) is missing
    from the tree in ``specthink.errors``' docstring, so users cannot see where it belongs."""
    import importlib
    import pkgutil

    import specthink.errors

    drawn = specthink.errors.__doc__ or ""
    classes = set()
    for info in pkgutil.walk_packages(specthink.__path__, "specthink."):
        if info.name.endswith(".__main__"):  # importing one would run its command
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an extra that is not installed
            continue
        classes.update(value for value in vars(module).values()
                       if isinstance(value, type) and issubclass(value, specthink.SpecthinkError)
                       and value.__module__ == info.name)
    assert classes
    assert sorted(c.__name__ for c in classes if f" {c.__name__}" not in drawn) == []


def test_the_in_stream_errors_are_named_as_errors_and_the_old_names_still_import() -> None:
    """``StreamErrorEvent``/``ContextLimitEvent`` read like trace events; they are
    ``InStreamError``/``InStreamContextLimitError`` now, and code written against the old
    names gets the same classes with a DeprecationWarning (broken: an import error after an
    upgrade, or a silent alias that never goes away)."""
    import pytest

    from specthink import errors

    assert "InStreamError" in specthink.__all__ and "StreamErrorEvent" not in specthink.__all__
    assert issubclass(errors.InStreamContextLimitError, errors.ContextLimitError)
    assert issubclass(errors.InStreamContextLimitError, errors.InStreamError)
    for old, new in (("StreamErrorEvent", errors.InStreamError),
                     ("ContextLimitEvent", errors.InStreamContextLimitError)):
        with pytest.warns(DeprecationWarning, match=new.__name__):
            assert getattr(errors, old) is new
    with pytest.warns(DeprecationWarning, match="InStreamError"):
        assert specthink.StreamErrorEvent is errors.InStreamError  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        errors.NoSuchError  # type: ignore[attr-defined]  # noqa: B018


def test_exported_classes_keep_their_module_so_their_annotations_resolve() -> None:
    """Broken: ``__module__`` is rewritten to ``specthink`` (as the package root once did), and
    ``typing.get_type_hints`` (pydantic, dataclass tooling, IDEs) resolves a class's annotations
    in the wrong namespace: ``TakeoverRules`` failed on ``Literal``, ``TextEvent`` on
    ``Source``."""
    import typing

    for name in specthink.__all__:
        exported = getattr(specthink, name)
        if isinstance(exported, type):
            assert exported.__module__.startswith("specthink."), name
            typing.get_type_hints(exported)


def test_the_version_is_the_distributions() -> None:
    """Broken: ``specthink.__version__`` and pyproject.toml's version drift apart."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    with pyproject.open("rb") as handle:
        assert specthink.__version__ == tomllib.load(handle)["project"]["version"]


def test_core_imports_no_agent_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, specthink, specthink.engine, specthink.rules, specthink.prompts; "
            "print(any(m.split('.')[0] in ('langchain_core', 'llama_index') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backend_modules_import_neither_the_engine_nor_the_rules() -> None:
    """Broken: a wire protocol module reaches into the engine or the takeover rules (or names an
    attribute of the package root, which imports the engine), so the layers no longer stand
    alone and a new protocol cannot be written against ``specthink.backends`` only."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib\n"
        "import specthink.backends as package\n"
        "names = [m.name for m in pkgutil.iter_modules(package.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module('specthink.backends.' + name)\n"
        "print(sorted(names))\n"
        "print(sorted(m for m in ('specthink.engine', 'specthink.rules') if m in sys.modules))\n")
    # Importing specthink.backends runs specthink/__init__, which imports the engine: the
    # check needs a package root that does not, so the modules are loaded from a stub root.
    stub = ("import sys, types, pathlib\n"
            "import importlib.util\n"
            "spec = importlib.util.find_spec('specthink')\n"
            "root = types.ModuleType('specthink')\n"
            "root.__path__ = list(spec.submodule_search_locations)\n"
            "sys.modules['specthink'] = root\n")
    out = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True,
                         check=True)
    modules, loaded = out.stdout.strip().splitlines()
    assert "tgi" in modules and "openai" in modules and "_connection" in modules
    assert loaded == "[]"


def _core_imports(package: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every name an adapter package imports from ``specthink``."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(importlib.import_module(package).__file__ or "").parent
    found: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "specthink":
                found.extend((node.module, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                found.extend((alias.name, "") for alias in node.names
                             if alias.name.split(".")[0] == "specthink")
    return found


def test_adapters_import_only_public_core_names() -> None:
    """Broken: an adapter reaches into a private core module or name (``specthink._sync``,
    ``specthink._constants`` were), so "add an adapter in 4 files" needs the core's insides."""
    for package in ("specthink_lc", "specthink_li"):
        imported = _core_imports(package)
        assert imported, package
        private = [(module, name) for module, name in imported
                   if any(part.startswith("_") for part in module.split("."))
                   or name.startswith("_")]
        assert private == [], package


def test_adapters_declare_no_pair_setting_of_their_own() -> None:
    """Broken: the LangChain model or the LlamaIndex LLM declares a field of the pair's
    settings itself (URLs, backend, rules, templates, key, retries, timeouts), so the five
    declarations of them the core's PairSettings replaced come back."""
    from specthink.settings import PairSettings
    from specthink_lc import ChatSpeculativeThinking
    from specthink_li import SpeculativeThinkingLLM

    pair = set(PairSettings.model_fields)
    for adapter in (ChatSpeculativeThinking, SpeculativeThinkingLLM):
        assert issubclass(adapter, PairSettings)
        assert pair <= set(adapter.model_fields), adapter
        assert pair & set(vars(adapter).get("__annotations__", {})) == set(), adapter
