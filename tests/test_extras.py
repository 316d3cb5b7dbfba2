"""The extras of pyproject.toml: what `pip install "specthink[all]"` brings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_all_includes_every_extra_a_user_installs() -> None:
    """If this fails, `specthink[all]` leaves out an extra (it left out `local`, so `specthink
    local up` and `ask` without servers failed after installing "everything")."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    (all_spec,) = extras["all"]
    included = set(re.fullmatch(r"specthink\[(.*)\]", all_spec).group(1).split(","))  # type: ignore[union-attr]
    assert included == set(extras) - {"all", "dev"}
    assert "specthink[all]" in extras["dev"]
