"""`reprise settings`: every setting with its environment variable, default and meaning;
`reprise settings --markdown` prints the whole settings page, `docs/settings.md`."""

from __future__ import annotations

import sys

from workers.settings import env_names


def settings_classes():
    from cache.settings import CacheSettings
    from scheduler.coordinator import CoordinatorSettings
    from scheduler.settings import ClusterSettings
    from workers.resilient_cache import ResilienceSettings
    from workers.settings import WorkerSettings

    return [
        ("Cluster (producer, queue, Flower)", ClusterSettings),
        ("Worker", WorkerSettings),
        ("Worker resilience and tenants", ResilienceSettings),
        ("Latent cache", CacheSettings),
        ("Coordinator", CoordinatorSettings),
    ]


def rows():
    for title, cls in settings_classes():
        for name, field in cls.model_fields.items():
            default = field.default if field.default_factory is None else field.default_factory()
            yield title, " / ".join(f"`{n}`" for n in env_names(cls, name, field)), default, field.description or ""


def markdown() -> str:
    out, current = [], None
    for title, env, default, text in rows():
        if title != current:
            out += ["", f"**{title}**", "", "| variable | default | meaning |", "|---|---|---|"]
            current = title
        shown = "" if default is None else str(default)
        text = text.replace("|", "\\|")
        out.append(f"| {env} | `{shown}` | {text} |" if shown != "" else f"| {env} | (unset) | {text} |")
    return "\n".join(out).strip() + "\n"


PAGE_INTRO = """# Settings

Every knob has one home (a pydantic settings class read from the environment) and one line here. This page
is generated from the code: `reprise settings --markdown` prints it, `python -m ops.docs_sync` rewrites it,
and `tests/test_readme.py` fails when it is stale. `reprise settings` prints the tables alone.

"""


def page() -> str:
    return PAGE_INTRO + markdown()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv not in ([], ["--markdown"]):
        print("usage: reprise settings [--markdown]", file=sys.stderr)
        return 2
    sys.stdout.write(page() if argv else markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
