"""docs/reference.md is generated from the docstrings (bin/gen-api-reference) and kept fresh."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import pytest

import revconn

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bin" / "gen-api-reference"
REFERENCE = ROOT / "docs" / "reference.md"
REGENERATE = "run bin/gen-api-reference (or nox -s docs) and commit docs/reference.md"


@pytest.fixture(scope="module")
def generator() -> types.ModuleType:
    """The script, imported as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("gen_api_reference", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_reference_is_fresh(generator: types.ModuleType) -> None:
    committed = REFERENCE.read_text(encoding="utf-8")
    assert committed == generator.render(revconn), f"docs/reference.md is stale: {REGENERATE}"


def test_every_public_name_and_member_has_a_docstring(generator: types.ModuleType) -> None:
    missing = generator.missing_docstrings(revconn)
    assert not missing, "public names, methods or properties without a docstring:\n  " + (
        "\n  ".join(missing)
    )


def test_reference_covers_every_public_name(generator: types.ModuleType) -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    absent = [n for n in generator.public_names(revconn) if f"\n### {n}\n" not in text]
    assert not absent, f"not in docs/reference.md: {absent}: {REGENERATE}"


def test_reference_header_and_no_object_addresses() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert "bin/gen-api-reference" in first
    assert "(api.md)" in text.split("\n# ", 1)[0]
    assert " at 0x" not in text
    assert "(reference.md)" in (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def test_script_check_mode_with_another_hash_seed() -> None:
    """The script run as documented agrees, whatever the string hashing order."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr or result.stdout


def test_rest_markup_becomes_markdown(generator: types.ModuleType) -> None:
    public = {"Registry"}
    text = generator.markdown(
        "Use ``x = 1`` and :class:`Registry` or :meth:`~revconn.Gateway.serve`::\n\n"
        "    async with x:\n        pass\n\nAfter.",
        public,
    )
    assert text == (
        "Use `x = 1` and [`Registry`](#registry) or `serve`:\n\n"
        "```text\nasync with x:\n    pass\n```\n\nAfter."
    )
