"""Dependencies point one way: `lora_trainer.training` names the callbacks only in its config
(`_target_`), never imports them, and `callbacks/` builds on the layers below `training`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def imported_with(package: str) -> list[str]:
    """Every module in `sys.modules` after importing all modules of `package`, in a fresh
    interpreter."""
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(run.stdout.splitlines()[-1])


def test_the_training_package_does_not_import_the_callbacks() -> None:
    modules = imported_with("lora_trainer.training")
    assert "lora_trainer.training.app" in modules
    assert [m for m in modules if m == "callbacks" or m.startswith("callbacks.")] == []


def test_the_callbacks_do_not_import_the_training_package() -> None:
    modules = imported_with("callbacks")
    assert {"callbacks.checkpoint_export", "lora_trainer.saves"} <= set(modules)
    assert [m for m in modules if m.startswith("lora_trainer.training")] == []
