"""The README and docs/ tell the truth about settings and commands, and every link in them resolves."""

import ast
import re
from pathlib import Path

from ops.cli import build_parser
from ops.docs_sync import SETTINGS_PAGE
from workers.settings_doc import page, rows, settings_classes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _all_docs() -> str:
    return "\n".join(p.read_text() for p in PAGES)


def test_settings_page_is_generated_from_the_code():
    assert SETTINGS_PAGE.read_text() == page(), "run `python -m ops.docs_sync` to refresh docs/settings.md"


def test_every_command_is_in_the_docs():
    text = _all_docs()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"reprise {name}" in text, name
    front = README.read_text()
    assert "make demo" in front and "make test" in front


def test_the_readme_is_a_front_page_and_every_link_resolves():
    """The README stays short; each relative link of README and docs/ names a file that exists, and each
    #anchor a heading of that page."""
    assert len(README.read_text().splitlines()) <= 300
    broken = []
    for path in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                if anchor not in slugs:
                    broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_ci_runs_make_test():
    assert "make test" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_the_code_cites_only_documents_that_exist():
    """A comment that sends the reader to a document names one in the repository (or ../shared)."""
    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in [p for d in ("workers", "scheduler", "cache", "ops", "tests") for p in (root / d).rglob("*.py")]:
        for name in re.findall(r"(?<![\w/.-])((?:\.\./)?[\w/-]+\.md)\b", path.read_text()):
            if name.startswith("../shared/") and not (root / "../shared").is_dir():
                continue  # the shared folder lies beside the repository (and beside CI's clone), not in a bare clone
            if not (root / name).exists():
                missing.append(f"{path.relative_to(root)}: {name}")
    assert not missing, missing


def _table_variables() -> set[str]:
    return {name for _, env, _, _ in rows() for name in re.findall(r"`([A-Z0-9_]+)`", env)}


def _names_read(packages) -> set[str]:
    """Attribute names and string constants in the code of ``packages`` (how a setting is read)."""
    names = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.add(node.value)
    return names


def test_every_setting_in_the_table_is_read_by_the_code():
    """A row of the settings table is a field some code reads (`settings.<field>`), not a knob that nothing reads."""
    read = _names_read(("workers", "scheduler", "cache", "ops"))
    unread = [
        f"{cls.__name__}.{name}" for _, cls in settings_classes() for name in cls.model_fields if name not in read
    ]
    assert not unread, f"settings nothing reads: {unread}"


def test_every_variable_the_services_or_the_readme_name_is_in_the_table():
    """Workers, scheduler and cache read their knobs only through the settings classes (so the table lists
    them all), and README and docs name no variable the table lacks (REPRISE_FAULT_* are the fault hooks)."""
    table = _table_variables()
    in_code = {
        n for n in _names_read(("workers", "scheduler", "cache")) if re.fullmatch(r"REPRISE_[A-Z0-9_]*[A-Z0-9]", n)
    }
    assert in_code <= table, sorted(in_code - table)
    in_readme = {
        n for n in re.findall(r"\bREPRISE_[A-Z0-9_]*[A-Z0-9]\b", _all_docs()) if not n.startswith("REPRISE_FAULT_")
    }
    assert in_readme <= table, sorted(in_readme - table)
