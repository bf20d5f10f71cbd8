"""The README tells the truth about settings and commands."""

from pathlib import Path

from ops.cli import build_parser
from ops.readme_sync import README, synced


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
