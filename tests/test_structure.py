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
    "flag_table": 0,  # the flags written down, for --help and typos before the training stack imports
    "compat": 0,  # one module per library's private names; each module is its own surface
    "config": 1,
    "data": 2,
    "model": 3,
    "train": 4,
    "trackers": 4,
    "outputs": 5,
    "sft_trainer": 6,
    "preview": 6,
    "audit": 6,
    "merge": 6,
    "launch": 6,
    "plot": 6,
    "plan": 6,
    "check": 6,
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
        and stage_of(d) != "tuning.compat"
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


def top_level(module: str) -> str:
    return module.split(".")[1] if "." in module else "tuning"


def documented_layers() -> tuple[dict[str, int], dict[str, set[str]]]:
    """ARCHITECTURE.md's layer table: module → layer, module → the top-level names it imports."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = doc.split("| layer | modules | imports |", 1)[1].split("\n\n", 1)[0]
    layers, imports = {}, {}
    for row in table.strip().splitlines()[1:]:
        level, modules, uses = (cell.strip() for cell in row.strip("|").split("|"))
        names = re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", modules))  # not the notes in brackets
        for name in names:
            layers[name] = int(level.split()[0])
            imports[name] = set()
        for part in uses.split(";"):
            if "→" in part:
                source, targets = part.split("→")
                imports[re.findall(r"`(\w+)`", source)[0]] = set(re.findall(r"`(\w+)`", targets))
            else:
                for name in names:
                    imports[name] = set(re.findall(r"`(\w+)`", part))
    return layers, imports


def test_architecture_doc_layer_table_is_the_real_import_graph():
    layers, documented = documented_layers()
    real: dict[str, set[str]] = {name: set() for name in LAYERS}
    for module, deps in graph().items():
        if "." in module:
            real[top_level(module)] |= {top_level(d) for d in deps} - {top_level(module)}
    assert layers == LAYERS, (
        f"ARCHITECTURE.md's layers differ from LAYERS in tests/test_structure.py: {layers}"
    )
    wrong = [
        f"{name}: the table says {sorted(documented.get(name, set()))}, the code imports {sorted(deps)}"
        for name, deps in sorted(real.items())
        if documented.get(name, set()) != deps
    ]
    assert not wrong, "fix docs/ARCHITECTURE.md's layer table:\n" + "\n".join(wrong)


# where a library's private names may be used (tuning/compat/ and the Trainer's own file), and the
# underscore names that are public API despite the underscore
PRIVATE_ALLOWED = ("tuning/compat/", "tuning/train/hf_private.py")
PUBLIC_UNDERSCORE = {"_exit"}  # os._exit


def library_private_uses(path: Path) -> list[str]:
    """``obj._name`` (obj not self/cls/super()), ``getattr(obj, "_name")`` and ``from lib import _name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in ("self", "cls")
            own = own or (isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super")
            name = None if own else f"{ast.unparse(base)}.{node.attr}"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "getattr",
            "hasattr",
            "setattr",
        ):
            key = node.args[1] if len(node.args) > 1 else None
            if (
                isinstance(key, ast.Constant)
                and str(key.value).startswith("_")
                and not str(key.value).startswith("__")
            ):
                name = f"{node.func.id}(..., {key.value!r})"
        elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("tuning"):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            name = f"from {node.module} import {', '.join(private)}" if private else None
        if name and name.rsplit(".", 1)[-1] not in PUBLIC_UNDERSCORE:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    return found


def test_library_private_names_live_in_the_compat_modules():
    found = [
        use
        for path in sorted(PACKAGE.rglob("*.py"))
        if not str(path.relative_to(PACKAGE.parent)).startswith(PRIVATE_ALLOWED)
        for use in library_private_uses(path)
    ]
    assert not found, (
        "a library's private name outside tuning/compat/ (one module per library, pinned by "
        "tests/test_compat.py; Trainer internals: tuning/train/hf_private.py):\n" + "\n".join(found)
    )


def test_library_private_use_detection_really_finds_them(tmp_path):
    sample = PACKAGE / "_probe_for_test.py"
    sample.write_text(
        "import os\nfrom a.b import _c\nx = obj._secret\ny = getattr(obj, '_hidden')\nos._exit(0)\n"
        "class A:\n    def f(self):\n        return self._mine, super()._theirs\n",
        encoding="utf-8",
    )
    try:
        found = [use.split(" ", 1)[1] for use in library_private_uses(sample)]
    finally:
        sample.unlink()
    assert found == ["from a.b import _c", "obj._secret", "getattr(..., '_hidden')"]


def dynamic_or_relative_imports(path: Path) -> list[str]:
    """Relative imports, and ``importlib.import_module``/``__import__``/``spec_from_file_location``
    calls: both slip past the graph above, so our own modules are imported only by name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} relative import")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith(("import_module", "spec_from_file_location")) or func == "__import__":
                argument = ast.unparse(node.args[0]) if node.args else ""
                if (
                    "tuning" in argument
                    or not isinstance(node.args[0], (ast.Constant, ast.Name))
                    or isinstance(node.args[0], ast.Name)
                    and not _names_a_library(path, node.args[0].id)
                ):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {func}({argument})")
    return found


def _names_a_library(path: Path, variable: str) -> bool:
    """A variable passed to import_module holds a third-party package name: every string constant in the
    file that could flow into it must not name a module of ours."""
    constants = [
        n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Constant)
    ]
    return not any(isinstance(c, str) and re.match(r"tuning(\.|:|$)", c) for c in constants)


def test_our_modules_are_imported_by_name_only():
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in dynamic_or_relative_imports(path)]
    assert not found, "import our modules with a plain absolute import, which the graph sees:\n" + "\n".join(
        found
    )


def test_dynamic_and_relative_import_detection_really_finds_them():
    sample = PACKAGE / "_probe_for_test.py"
    sample.write_text(
        "import importlib\nfrom . import errors\nfrom .config import x\n"
        "importlib.import_module('tuning.data')\n__import__('tuning')\nimportlib.import_module('yaml')\n",
        encoding="utf-8",
    )
    try:
        found = [use.split(" ", 1)[1] for use in dynamic_or_relative_imports(sample)]
    finally:
        sample.unlink()
    assert found == [
        "relative import",
        "relative import",
        "importlib.import_module('tuning.data')",
        "__import__('tuning')",
    ]


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
