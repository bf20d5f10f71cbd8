"""Keeps the generated docs true: `python -m ops.docs_sync` rewrites `docs/settings.md` from the settings
classes (`reprise settings --markdown`); tests/test_readme.py fails when it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

from workers.settings_doc import page

SETTINGS_PAGE = Path(__file__).resolve().parents[1] / "docs/settings.md"


def main(argv=None) -> int:
    if not SETTINGS_PAGE.exists() or SETTINGS_PAGE.read_text() != page():
        SETTINGS_PAGE.write_text(page())
        print(f"{SETTINGS_PAGE} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
