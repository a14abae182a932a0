"""Import the experiment scripts (not a package) by path, for the tests that call their functions."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str) -> ModuleType:
    """experiments/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"experiments/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
