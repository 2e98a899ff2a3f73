"""The package's shape: stages import only downwards and no module imports itself back through others.

Stages, bottom to top: neutral helpers → config → data → model → train (with trackers) → outputs → the
commands. Imports inside functions count too: hiding an import in a function hides a cycle, it does
not remove it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tuning"

# top-level module or package of tuning → its layer; a module may import only from its layer or below
LAYERS = {
    "errors": 0,
    "files": 0,
    "logs": 0,
    "dtypes": 0,
    "lock": 0,
    "config": 1,
    "data": 2,
    "model": 3,
    "train": 4,
    "trackers": 4,
    "outputs": 5,
    "sft_trainer": 6,
    "preview": 6,
    "merge": 6,
    "launch": 6,
    "plot": 6,
    "plan": 6,
    "tiny": 6,
    "cli": 7,
    "testing": 8,  # tiny models for tests, the demo and benchmarks: nothing in a run imports them
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every ``tuning.*`` module this file imports, at module level or inside functions.

    ``from tuning.data import formats`` imports the module ``tuning.data.formats``; ``from tuning.data
    import DataStats`` imports the package's ``__init__`` (its public surface)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tuning")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuning"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(files)
    return {
        name: {m for m in imports_of(path, names) if m in names and m != name} for name, path in files.items()
    }


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package's own __init__
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: add its top-level name to LAYERS in tests/test_structure.py")
    return LAYERS[parts[1]]


def test_every_import_points_down_or_sideways():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        for d in deps
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" → ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_read():
    edges = graph()
    assert "tuning.config.args" in edges["tuning.config.parser"]
    assert "tuning.data.prepare" in edges["tuning.data.pipeline"]


def stage_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_stages_use_each_others_public_surface():
    """Across stages a module imports the stage package (``tuning.data``), not its insides
    (``tuning.data.prepare``): what a stage offers is what its ``__init__`` exports."""
    reaching = [
        f"{m} imports {d}; import it from {stage_of(d)}"
        for m, deps in graph().items()
        for d in deps
        if stage_of(d) != stage_of(m)
        and d != stage_of(d)
        and (PACKAGE / "/".join(stage_of(d).split(".")[1:])).is_dir()
    ]
    assert not reaching, "\n".join(sorted(reaching))


def test_architecture_doc_names_every_module_and_only_real_paths():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tuning/[\w/.]+)`", doc))
    missing_paths = sorted(p for p in named if not (PACKAGE.parent / p).exists())
    assert not missing_paths, f"ARCHITECTURE.md names paths that don't exist: {missing_paths}"
    folders = {p for p in named if p.endswith("/")}
    unnamed = sorted(
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
        and str(p.relative_to(PACKAGE.parent)) not in named
        and not any(str(p.relative_to(PACKAGE.parent)).startswith(f) for f in folders)
    )
    assert not unnamed, f"add these modules to docs/ARCHITECTURE.md: {unnamed}"


@pytest.mark.slow
def test_a_wheel_ships_the_fsdp_defaults_and_the_tiny_models(tmp_path):
    """``tuning launch`` reads its FSDP defaults from the package, so an installed wheel must carry them."""
    from tuning import launch

    assert launch.FSDP_DEFAULTS.is_file() and PACKAGE in launch.FSDP_DEFAULTS.parents
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            str(PACKAGE.parent),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tuning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("accelerate_fsdp_defaults", "accelerate_deepspeed_zero2", "accelerate_deepspeed_zero3"):
        assert f"tuning/fixtures/{config}.yaml" in names  # tuning launch finds them by name
    assert "tuning/testing/tiny_model.py" in names
