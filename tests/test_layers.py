"""The architecture's layers hold: import-linter checks the contracts in `.importlinter`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_layers_of_the_design_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is a dev dependency (pip install -e '.[dev]')"
    done = subprocess.run(
        [lint_imports, "--config", str(ROOT / ".importlinter")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


def test_no_module_of_lora_lab_is_in_an_import_cycle():
    import grimp  # import-linter's own import graph

    graph = grimp.build_graph("lora_lab")
    cycles = sorted(
        f"{importer} ↔ {imported}"
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(importer=imported, imported=importer)
    )
    assert not cycles, cycles


def test_no_function_level_import_of_lora_lab_outside_the_cli():
    """A function-level import is how a cycle hides; only the CLI defers its imports (so that
    `lora-lab --help` and a bad override answer before torch loads)."""
    import ast

    hidden = []
    for path in sorted((ROOT / "lora_lab").rglob("*.py")):
        if path.parent.name == "cli":  # lora_lab/cli/
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                names = []
                if isinstance(inner, ast.ImportFrom):
                    # A relative import (`from . import x`) is one of lora_lab's own.
                    names = (
                        ["lora_lab." + (inner.module or "")]
                        if inner.level
                        else [inner.module or ""]
                    )
                elif isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                hidden += [
                    f"{path.relative_to(ROOT)}:{inner.lineno} {name}"
                    for name in names
                    if name.startswith("lora_lab")
                ]
    assert not hidden, hidden
