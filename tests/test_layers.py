"""The layers run one way: the inference core under ingest, the pipeline and the trainer, recipes and the
command line on top. Read from the source's import statements (lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"capfilt": "capfilt", "models": "capfilt.models", "pipelines": "capfilt.pipelines"}

# The layers are folders. The inference core is capfilt/'s own modules and the shapes world (capfilt/shapes/); ingest
# is capfilt/ingest/; the pipeline pipelines/ (capfilt.pipelines); the trainer models/ (capfilt.models); the top is
# the use cases (capfilt/recipes/) and the command line (capfilt/cli.py).
TOP = ("capfilt.cli", "capfilt.recipes")
# Layer of each module -> the layers it may import. The top (cli, demo, experiment, ...) may import anything.
MAY_IMPORT = {
    "core": {"core"},
    "ingest": {"core", "ingest"},
    "pipelines": {"core", "pipelines"},
    "models": {"core", "models"},
}


def layer(module: str) -> str:
    """The layer of a module, from its folder alone."""
    if module.startswith(("capfilt.pipelines.", "capfilt.models.", "capfilt.ingest.", "capfilt.recipes.")) or \
            module in ("capfilt.pipelines", "capfilt.models", "capfilt.ingest", "capfilt.recipes"):
        folder = module.split(".")[1]
        return {"pipelines": "pipelines", "models": "models", "ingest": "ingest", "recipes": "top"}[folder]
    if module in TOP:
        return "top"
    return "core"  # capfilt/*.py and capfilt/shapes/


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The capfilt modules ``path`` imports (``from capfilt.x import y`` counts ``capfilt.x.y`` when a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capfilt"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("capfilt"))
    return {name for name in names if name in known}


def test_the_layers_run_one_way():
    found = modules()
    assert {"capfilt.cli", "capfilt.captioner", "capfilt.pipelines.process", "capfilt.models.train"} <= set(found)
    wrong = []
    for module, path in found.items():
        allowed = MAY_IMPORT.get(layer(module))
        if allowed is None:
            continue
        wrong += [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
                  for target in sorted(imports(path, set(found))) if layer(target) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_no_two_modules_import_each_other():
    found = modules()
    graph = {module: imports(path, set(found)) - {module} for module, path in found.items()}
    cycles = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                     if a in graph.get(b, set()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not cycles, cycles


@pytest.mark.parametrize("module,expected", [("capfilt.captioner", "core"), ("capfilt.shapes.world", "core"),
                                             ("capfilt.ingest.datasets", "ingest"), ("capfilt.ingest.fetch", "ingest"),
                                             ("capfilt.models.med", "models"), ("capfilt.pipelines.report", "pipelines"),
                                             ("capfilt.recipes.bootstrap", "top"), ("capfilt.cli", "top")])
def test_layer_names(module, expected):
    assert layer(module) == expected


def test_every_folder_is_a_layer_and_the_core_holds_no_use_case():
    """A new module lands in a layer by where it is put; the core's root holds no command line or recipe."""
    found = modules()
    root = {m for m in found if m.count(".") == 1}  # capfilt/*.py and the packages beside them
    assert {m for m in root if layer(m) != "core"} == {"capfilt.cli", "capfilt.recipes", "capfilt.ingest",
                                                       "capfilt.pipelines", "capfilt.models"}
    assert {m.split(".")[1] for m in found if m.count(".") >= 2 and layer(m) != "core"} == \
        {"ingest", "pipelines", "models", "recipes"}
