"""The layering rules, read from every import in the code (AST), so a breach fails here and not
in a review: cli → pipeline → exporters/runtimes → core.

- runtimes never import exporters, the graph builder or compress (the torch reference runtime,
  which runs the graph itself, is the one exception), and only torch_reference and executorch
  (whose Python binding is torch's) import torch: `edgelm.load` runs bundles without it;
- nothing in the library imports the CLI (`python -m edgelm` is the entry point itself);
- exporters never import a runtime's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_RUNTIMES = {"torch_reference", "executorch"}
FORBIDDEN_IN_RUNTIMES = ("edgelm.exporters", "edgelm.graph", "edgelm.compress")


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import in `path`, at any depth."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found += [(node.lineno, module, alias.name) for alias in node.names]
    return found


def breaches(folder: str, rule) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module, name in imports(path):
            why = rule(path, module, name)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return found


def runtime_rule(path: Path, module: str, name: str | None) -> str | None:
    if module.startswith("."):
        return f"relative import {module} (runtimes install as edgelm.runtimes)"
    if path.stem != "torch_reference" and module.startswith(FORBIDDEN_IN_RUNTIMES):
        return f"a runtime imports {module}"
    if path.stem not in TORCH_RUNTIMES and module.split(".")[0] == "torch":
        return "a runtime without torch imports torch"
    return None


def cli_rule(path: Path, module: str, name: str | None) -> str | None:
    if path.name in ("cli.py", "__main__.py"):
        return None
    if module == "edgelm.cli" or module.startswith("edgelm.cli.") or (module == "edgelm" and name == "cli"):
        return f"library code imports the CLI ({module})"
    return None


def exporter_rule(path: Path, module: str, name: str | None) -> str | None:
    if module.startswith("edgelm.runtimes") and (
        any(part.startswith("_") for part in module.split(".")) or (name or "").startswith("_")
    ):
        return f"an exporter imports a runtime's private name {module}.{name}"
    return None


@pytest.mark.parametrize(
    ("folder", "rule"),
    [
        ("runtimes", runtime_rule),
        ("edgelm", cli_rule),
        ("exporters", cli_rule),
        ("runtimes", cli_rule),
        ("exporters", exporter_rule),
    ],
)
def test_no_layering_breach(folder, rule):
    assert breaches(folder, rule) == []


def test_the_rules_catch_a_breach(tmp_path, monkeypatch):
    """The checks are live: a runtime importing the graph and torch, a library module importing
    the CLI and an exporter reaching into a runtime's private helper are each reported."""
    (tmp_path / "runtimes").mkdir()
    (tmp_path / "runtimes" / "bad.py").write_text("import torch\nfrom edgelm.graph import build_decoder_graph\n")
    (tmp_path / "edgelm").mkdir()
    (tmp_path / "edgelm" / "bad.py").write_text("def f():\n    from edgelm.cli import main\n")
    (tmp_path / "exporters").mkdir()
    (tmp_path / "exporters" / "bad.py").write_text("from edgelm.runtimes.llamacpp import _private\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert len(breaches("runtimes", runtime_rule)) == 2
    assert len(breaches("edgelm", cli_rule)) == 1
    assert len(breaches("exporters", exporter_rule)) == 1


MAX_FUNCTION_LINES = 60


def test_no_function_runs_over_60_lines_except_the_cli_commands():
    """Long functions are split into named steps; the CLI's typer commands (one option per
    parameter) are the exception."""
    import edgelm.cli

    commands = {command.callback.__name__ for command in edgelm.cli.app.registered_commands}
    long = []
    for folder in ("edgelm", "exporters", "runtimes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and not (path.name == "cli.py" and node.name in commands):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
