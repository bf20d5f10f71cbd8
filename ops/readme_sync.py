"""Keeps the README's generated parts true: `python -m ops.readme_sync` rewrites the settings table
between its markers; tests/test_readme.py fails when it is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from workers.settings_doc import markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def synced(text: str) -> str:
    return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{markdown()}{END}", text, flags=re.S)


def main(argv=None) -> int:
    text = README.read_text()
    new = synced(text)
    if new != text:
        README.write_text(new)
        print("README settings table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
