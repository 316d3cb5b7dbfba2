"""The public names other code relies on (DESIGN.md "Public surface")."""

from __future__ import annotations

import specthink


def test_exported_names_are_sorted_and_importable() -> None:
    assert specthink.__all__ == sorted(specthink.__all__)
    for name in specthink.__all__:
        assert getattr(specthink, name) is not None


def test_core_names_of_the_design() -> None:
    for name in ("SpeculativeThinker", "TakeoverRules", "Result", "TextEvent", "SpecthinkError",
                 "ConfigError"):
        assert name in specthink.__all__
    assert specthink.SpeculativeThinker.__module__ == "specthink"


def test_core_imports_no_agent_framework() -> None:
    import subprocess
    import sys

    code = ("import sys, specthink, specthink.engine, specthink.rules, specthink.prompts; "
            "print(any(m.split('.')[0] in ('langchain_core', 'llama_index') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
