"""The layers hold: the contract in pyproject.toml is kept, breaking it is caught, and the producer side
of the command line runs without the model code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("cache", "scheduler", "workers", "ops")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(dst: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    return dst


def test_the_layer_contract_is_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_an_import_against_the_layers_breaks_the_contract(tmp_path):
    tree = copy_tree(tmp_path)
    (tree / "cache" / "probe.py").write_text("def load():\n    import workers.model_loading\n")
    (tree / "scheduler" / "probe.py").write_text("from ops import demo\n")
    out = lint(tree)
    assert out.returncode != 0
    assert "cache is not allowed to import workers" in out.stdout
    assert "scheduler is not allowed to import ops" in out.stdout


def test_producer_commands_need_no_model_code():
    code = (
        "import sys; from scheduler import cli; cli.new_parser(cli.add_commands).parse_args(['submit', 'x']); "
        "bad = [m for m in ('torch', 'diffusers', 'workers', 'ops') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_reprise_command_has_every_layers_commands():
    from ops.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"schema", "submit", "flower", "models", "cache", "coordinator", "worker", "settings"} <= commands
    assert {"bench", "demo", "loadtest", "eval"} <= commands


def import_cycles(package: str) -> list[list[str]]:
    """Cycles among the modules of ``package`` (imports inside functions count too), each as a module path."""
    import grimp

    graph = grimp.build_graph(package)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith(package)} for m in graph.modules}
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(edges.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_circles_in_any_layer(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    found = {pkg: import_cycles(pkg) for pkg in PACKAGES}
    assert not any(found.values()), found


def test_an_import_circle_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "circled"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from circled import b\n")
    (pkg / "b.py").write_text("from circled import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("circled") == [["circled.a", "circled.b", "circled.a"]]
