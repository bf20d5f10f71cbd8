"""Every runtime dependency in pyproject.toml is used by the product (workers, scheduler, cache, ops)."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("workers", "scheduler", "cache", "ops")
# Dependencies the product uses without importing them, and how.
USED_WITHOUT_IMPORT = {
    "flower": "run as `celery ... flower` by `reprise flower` (scheduler/cli.py)",
    "safetensors": "the weight format diffusers and transformers read and write for the models",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_dependencies() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [_norm(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in deps]


def _imported_modules() -> set[str]:
    seen = set()
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    seen |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    seen.add(node.module.split(".")[0])
    return seen


def test_every_runtime_dependency_is_imported_by_the_product():
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_norm(dist), set()).add(module)
    imported = _imported_modules()
    unused = [
        dep
        for dep in _runtime_dependencies()
        if dep not in USED_WITHOUT_IMPORT and not modules_of.get(dep, {dep.replace("-", "_")}) & imported
    ]
    assert not unused, f"runtime dependencies nothing in {PRODUCT} imports: {unused}"


def test_the_exceptions_are_still_dependencies():
    assert set(USED_WITHOUT_IMPORT) <= set(_runtime_dependencies())
