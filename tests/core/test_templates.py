"""``specthink.templates``: the built-in chat templates as package data, and the wheel that
carries them (and leaves the checkout's benchmarks out)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from specthink.prompts import CHATML, DEEPSEEK_R1, LLAMA3, MISTRAL, JinjaTemplate, resolve_template
from specthink.templates import BUILTIN_NAMES, builtin_source

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [{"type": "function", "function": {"name": "clock", "description": "The time",
                                           "parameters": {"type": "object", "properties": {}}}}]
TOOL_TURNS = [
    {"role": "user", "content": "Time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
    {"role": "tool", "content": "noon"}]


def test_every_builtin_is_read_from_its_package_file() -> None:
    """Broken: a template's source still lives in Python, or a file is missing from the
    package (``resources`` reads what an installed package holds)."""
    files = {path.name for path in resources.files("specthink.templates").iterdir()
             if path.name.endswith(".jinja")}
    assert files == {f"{name}.jinja" for name in BUILTIN_NAMES} | {
        "hermes_tools.jinja", "hermes_tool_calls.jinja"}
    for name, template in zip(BUILTIN_NAMES, (CHATML, DEEPSEEK_R1, LLAMA3, MISTRAL),
                              strict=True):
        assert template.source == builtin_source(name)
        assert resolve_template(name) is template
    with pytest.raises(KeyError):
        builtin_source("../prompts.py")


@pytest.mark.parametrize("template", [CHATML, DEEPSEEK_R1, LLAMA3, MISTRAL],
                         ids=list(BUILTIN_NAMES))
def test_the_shared_hermes_pieces_are_included(template: object) -> None:
    """The tool section and the tool-call blocks come from the included files, with the
    message's own variables in scope (broken: an include renders nothing, or cannot see the
    turn it is included in)."""
    from specthink.prompts import JinjaTemplate

    assert isinstance(template, JinjaTemplate)
    prompt = template.render_text(TOOL_TURNS, TOOLS)
    assert "<tools>\n" + '{"type": "function", "function": {"name": "clock"' in prompt
    assert '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>' in prompt


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_templates_and_not_the_benchmarks(tmp_path: Path) -> None:
    """A wheel built from this checkout (offline, with the installed setuptools) carries
    every template file and no ``benchmarks`` package (broken: package-data lost the
    templates, so an installed specthink cannot render, or the benchmark ships again)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("specthink", "specthink_lc", "specthink_li", "benchmarks"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("specthink-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    templates = {name for name in names if name.startswith("specthink/templates/")}
    assert templates >= {f"specthink/templates/{f.name}"
                         for f in (ROOT / "specthink" / "templates").glob("*.jinja")}
    assert "specthink/templates/__init__.py" in templates
    assert not [name for name in names if name.startswith("benchmarks/")]
    assert "specthink/py.typed" in names


def test_generation_blocks_render_as_transformers_renders_them() -> None:
    """Broken: a Hub template that marks the assistant's text with ``{% generation %}``
    (Phi-4's, Phi-4-reasoning's) does not compile client-side (a ConfigError naming the tag),
    or renders other text than transformers' renderer (vLLM's) does."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    source = (ROOT / "tests" / "data" / "chat_templates"
              / "microsoft-Phi-4-reasoning.jinja").read_text(encoding="utf-8")
    assert "{% generation %}" in source
    messages = [{"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4."},
                {"role": "user", "content": "And 3 + 3?"}]
    theirs, _ = chat_template_utils.render_jinja_template(
        [messages], chat_template=source, add_generation_prompt=True)
    ours = JinjaTemplate(source).render_text(messages)
    assert ours == theirs[0]
    assert "<|im_start|>assistant<|im_sep|><think>\nEasy.\n</think>\n\n4.<|im_end|>" in ours
