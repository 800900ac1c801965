"""Developer sessions: `nox -s tests lint typecheck`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit, in-process gateway, end-to-end executables on 127.0.0.1)."""
    session.install(".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (with the flake8-async rules) and the formatter check."""
    session.install("ruff>=0.6")
    paths = ("src", "tests", "benchmarks", "noxfile.py", "bin/gen-api-reference")
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate docs/reference.md from the docstrings (not a default session)."""
    session.install(".", "pdoc>=14")
    session.run("python", "bin/gen-api-reference", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install(".[test]", "mypy>=1.11")
    session.run("mypy")
