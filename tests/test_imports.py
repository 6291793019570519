"""Dependencies point one way: `lora_trainer.training` names the callbacks only in its config
(`_target_`), never imports them, and `callbacks/` builds on the layers below `training`.

Read from the source: every `import` statement of our modules, at module level or inside a
function (a lazy import counts), followed through our own modules and their parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lora_trainer", "callbacks")


def our_modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that module `name` imports, with the packages above each of them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    with_parents = {
        ".".join(module.split(".")[:end])
        for module in found
        for end in range(1, module.count(".") + 2)
    }
    return {module for module in with_parents if module in modules}


def imported_with(package: str) -> set[str]:
    """Our modules that importing every module of `package` brings in."""
    modules = our_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    seen = {name for name in modules if name == package or name.startswith(package + ".")}
    todo = list(seen)
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_import_graph_sees_lazy_and_package_imports() -> None:
    """The reader follows imports inside functions (the trainer imports the app lazily) and
    the packages above an imported module."""
    modules = our_modules()
    assert "lora_trainer.training.app" in imports_of(
        "lora_trainer.training.launch_train", ROOT / "train.py", modules
    )
    assert {"lora_trainer", "lora_trainer.export"} <= imports_of(
        "callbacks.checkpoint_export", modules["callbacks.checkpoint_export"], modules
    )


def test_the_training_package_does_not_import_the_callbacks() -> None:
    modules = imported_with("lora_trainer.training")
    assert {"lora_trainer.training.app", "lora_trainer.export.snapshot"} <= modules
    assert sorted(m for m in modules if m == "callbacks" or m.startswith("callbacks.")) == []


def test_the_callbacks_do_not_import_the_training_package() -> None:
    modules = imported_with("callbacks")
    assert {"callbacks.checkpoint_export", "lora_trainer.saves"} <= modules
    assert sorted(m for m in modules if m.startswith("lora_trainer.training")) == []
