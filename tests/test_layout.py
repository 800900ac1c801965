"""The arrows between the package's sides point one way: the agent never loads
the gateway's libraries, and the protocol layer imports no trio.

The sys.modules checks run in a fresh interpreter (this one has loaded
everything); on failure they name the import chain that pulled the module in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import revconn

PACKAGE = Path(revconn.__file__).parent

GATEWAY_LIBRARIES = ("quart", "quart_trio", "werkzeug", "hypercorn")


def _run(code: str, cwd: Path) -> tuple[dict[str, list[str]], str, str]:
    """Run ``code`` in a fresh interpreter (with -X importtime); it must print,
    last, one JSON line. Returns that, the rest of stdout, and the import log."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *output, last = result.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(output), result.stderr


def _import_chain(import_log: str, module: str) -> str:
    """``a -> b -> module``: who imported ``module`` first, from -X importtime's
    tree (children are logged before their parent, one indent deeper)."""
    entries: list[tuple[int, str]] = []
    for line in import_log.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        name_part = line.split("|")[2][1:]
        name = name_part.strip()
        if name == "imported package":
            continue
        entries.append(((len(name_part) - len(name_part.lstrip(" "))) // 2, name))
    for i, (depth, name) in enumerate(entries):
        if name == module:
            chain = [name]
            for later_depth, later_name in entries[i + 1 :]:
                if later_depth < depth:
                    chain.append(later_name)
                    depth = later_depth
            return " -> ".join(reversed(chain))
    return f"{module} (not in the import log)"


def _explain(what: str, modules: list[str], import_log: str) -> str:
    """``what loaded quart_trio: a -> b -> quart_trio; ...`` (top-level packages
    and revconn's own modules, each with the import chain that loaded it)."""
    names = sorted({m if m.startswith("revconn.") else m.split(".")[0] for m in modules})
    chains = "; ".join(_import_chain(import_log, name) for name in names[:5])
    return f"{what} loaded {', '.join(names)}: {chains}"


_FORBIDDEN_FOR_AGENT = """
def forbidden():
    return sorted(
        m for m in sys.modules
        if m.split(".")[0] in {libraries!r} or m.startswith("revconn._gateway")
    )
"""


def test_importing_the_agent_side_loads_nothing_of_the_gateway(tmp_path: Path) -> None:
    code = f"""
import json, sys
{_FORBIDDEN_FOR_AGENT.format(libraries=GATEWAY_LIBRARIES)}
import revconn
revconn.Agent, revconn.AgentConfig
import revconn._agent.agent, revconn._agent.upstream, revconn._agent.demo
import revconn._cli.agent
print(json.dumps({{"forbidden": forbidden(), "loaded": "revconn._agent.agent" in sys.modules}}))
"""
    result, _, import_log = _run(code, tmp_path)
    assert result["loaded"]
    assert result["forbidden"] == [], _explain(
        "importing the agent side", result["forbidden"], import_log
    )


def test_revconn_agent_serve_help_loads_nothing_of_the_gateway(tmp_path: Path) -> None:
    code = f"""
import json, sys
{_FORBIDDEN_FOR_AGENT.format(libraries=GATEWAY_LIBRARIES)}
from revconn._cli.agent import main
sys.argv = ["revconn-agent", "serve", "--help"]
try:
    main()  # as the console script runs it
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(json.dumps({{"forbidden": forbidden()}}))
"""
    result, help_text, import_log = _run(code, tmp_path)
    assert "--gateway" in help_text  # the help really ran
    assert result["forbidden"] == [], _explain(
        "`revconn-agent serve --help`", result["forbidden"], import_log
    )


def test_the_protocol_package_imports_no_trio(tmp_path: Path) -> None:
    code = """
import json, sys
import revconn._proto.session, revconn._proto.headers, revconn._proto.rules
import revconn._proto.h2compat
print(json.dumps({"forbidden": sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("trio", "trio_websocket")
    or m.startswith(("revconn._runtime", "revconn._gateway", "revconn._agent", "revconn._cli"))
)}))
"""
    result, _, import_log = _run(code, tmp_path)
    assert result["forbidden"] == [], _explain(
        "importing revconn._proto", result["forbidden"], import_log
    )


# -- the same arrows, read from the source -------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved; ``from x import
    y`` counts as x and x.y), including imports under TYPE_CHECKING."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _violations(folders: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for folder in folders:
        target = PACKAGE / folder
        paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in paths:
            bad = sorted(
                m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden)
            )
            if bad:
                out[str(path.relative_to(PACKAGE.parent))] = bad
    return out


def test_import_resolution_sees_relative_imports() -> None:
    imports = _imports(PACKAGE / "_agent" / "agent.py")
    assert "revconn._proto.session" in imports and "revconn._runtime.tunnel" in imports


@pytest.mark.parametrize(
    ("folders", "forbidden"),
    [
        (["_agent", "_runtime", "_cli/agent.py", "_cli/common.py"], ("revconn._gateway",)),
        (
            ["_proto"],
            (
                "trio",
                "trio_websocket",
                "revconn._runtime",
                "revconn._gateway",
                "revconn._agent",
                "revconn._cli",
            ),
        ),
    ],
    ids=["agent-and-runtime-not-gateway", "proto-no-trio-nothing-above"],
)
def test_source_imports_point_one_way(folders: list[str], forbidden: tuple[str, ...]) -> None:
    assert _violations(folders, forbidden) == {}
