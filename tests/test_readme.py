"""The README tells the truth about settings and commands."""

import re
from pathlib import Path

from ops.readme_sync import README, synced
from scheduler.cli import build_parser


def test_settings_table_is_current():
    text = README.read_text()
    assert synced(text) == text, "run `python -m ops.readme_sync` to refresh the README's settings table"


def test_every_command_is_in_the_readme():
    text = README.read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"reprise {name}" in text, name
    assert "make demo" in text and "make test" in text


def test_ci_runs_make_test():
    assert "make test" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_the_code_cites_only_documents_that_exist():
    """A comment that sends the reader to a document names one in the repository (or ../shared)."""
    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in [p for d in ("workers", "scheduler", "cache", "ops", "tests") for p in (root / d).rglob("*.py")]:
        for name in re.findall(r"(?<![\w/.-])((?:\.\./)?[\w/-]+\.md)\b", path.read_text()):
            if not (root / name).exists():
                missing.append(f"{path.relative_to(root)}: {name}")
    assert not missing, missing
