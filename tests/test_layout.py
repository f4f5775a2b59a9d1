"""The one-way layering of the package: each module imports only modules listed above it.

The order is the README's "Layout" section (checked below): ``_files``, ``_compat``,
``_progress``, then ``frequencies`` (pure math: torch and math only), ``methods/`` (the
registry), ``config``, ``rotary``, ``cache``, ``patch``, ``gguf``, ``loading/``, ``export``,
``vllm/`` (the vLLM plugin), ``eval/``, ``finetune/``, ``cli/``. A lower module may use a higher
one, never the reverse, so that, e.g., the pure math never depends on transformers-facing code.
Imports inside functions count too. Inside ``methods/`` the same rule holds for its own files
(:data:`METHOD_LAYERS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "yarn_rope"

# Top to bottom; a package (folder) counts as one layer.
LAYERS = [
    "_files",
    "_compat",
    "_progress",
    "frequencies",
    "methods",
    "config",
    "rotary",
    "cache",
    "patch",
    "gguf",
    "loading",
    "export",
    "vllm",
    "eval",
    "verify",
    "finetune",
    "cli",
]
# (importing module, imported layer): none left (frequencies' deprecated names moved to the package).
EXCEPTIONS: set[tuple[str, str]] = set()
# The files of methods/, top to bottom; the family files may import the registry (the package's
# __init__, which defines register() before it imports them) but not one another, except
# yarn -> gguf (llama.cpp's attention base).
METHOD_LAYERS = [
    "settings",
    "spec",
    "__init__",
    "gguf",
    "plain",
    "linear",
    "ntk",
    "yarn",
    "llama3",
    "longrope",
]
METHODS = PACKAGE / "methods"


def _layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("yarn_rope."):
                    found.add(node.module.split(".")[1])
                continue
            base = list(package_parts)[: len(package_parts) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # `from . import x` at the package root
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("yarn_rope."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_is_in_a_layer():
    layers = {_layer_of(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert layers <= set(LAYERS), f"add {sorted(layers - set(LAYERS))} to LAYERS (and the README layout)"


def test_imports_point_upwards_only():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer_of(path)
        if layer == "__init__":
            continue
        for imported in _imported_layers(path):
            if imported == layer or imported not in LAYERS or (layer, imported) in EXCEPTIONS:
                continue
            if LAYERS.index(imported) > LAYERS.index(layer):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not wrong, wrong


def test_the_readme_layout_lists_the_layers_in_this_order():
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    positions = [layout.index(f"  {name}") for name in LAYERS]
    assert positions == sorted(positions)


def test_the_math_imports_nothing_of_ours():
    tree = ast.parse((PACKAGE / "frequencies.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    ours = {name for name in imported if name.startswith(".") or name == "yarn_rope"}
    assert not ours, (
        f"frequencies.py imports {ours}: the math module imports torch and the standard library only"
    )


def test_the_methods_package_is_layered_too():
    wrong = []
    for path in METHODS.glob("*.py"):
        layer = path.stem
        assert layer in METHOD_LAYERS, f"add {layer} to METHOD_LAYERS"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level != 1:
                continue
            names = [node.module] if node.module else [alias.name for alias in node.names]
            for name in names:
                imported = name if name in METHOD_LAYERS else "__init__"
                if imported == layer or layer == "__init__":
                    continue
                family = imported in METHOD_LAYERS[4:] and layer in METHOD_LAYERS[4:]
                if family or METHOD_LAYERS.index(imported) > METHOD_LAYERS.index(layer):
                    wrong.append(f"methods/{path.name} imports {imported}")
    assert not wrong, wrong
