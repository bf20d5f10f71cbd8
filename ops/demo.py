"""`make demo`: a real cluster on this machine — Redis, one worker process serving every device,
Flower — a handful of prompts with a progress bar each, then a table. Stops what it started."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops.localcluster import LocalCluster
from workers.model_loading import model_extra

# (prompt, seed): a first wave of three scenes, then a second wave that reuses the cache
SHAPES_PROMPTS = [
    ("a small red circle in the top left on a blue background", 42),
    ("a large yellow square in the center on a black background", 42),
    ("a green triangle at the bottom right on a white background", 42),
    # the same request again: an exact hit, no step run
    ("a small red circle in the top left on a blue background", 42),
    # the same prompt with another seed (a user asking for another picture): resumes from the stored state
    ("a large yellow square in the center on a black background", 7),
    # an edit of one attribute: MiniLM scores it 0.99, and the shipped table resumes it only at K = 5 of 25,
    # early enough for the model to move the shape (later, it would keep the first picture's position)
    ("a green triangle at the bottom left on a white background", 42),
]
FREE_PROMPTS = [
    ("a cute puppy playing in a garden", 42),
    ("a lighthouse on a cliff at dusk, oil painting", 42),
    ("a bowl of ramen with a soft-boiled egg, studio photo", 42),
    ("a cute puppy playing in a garden", 42),
    ("a lighthouse on a cliff at dusk, oil painting", 7),
    ("a cute puppy playing in a garden, watercolor painting", 42),
]


def default_model() -> str:
    return (
        "shapes"
        if (Path(__file__).resolve().parents[1] / "workers" / "models" / "shapes" / "model_index.json").exists()
        else "tiny"
    )


def demo_api(
    cluster: LocalCluster, model: str, prompt: str, seed: int, steps: int, guidance: float
) -> tuple[str, str, dict]:
    """Start `reprise api`, make a key, and ask it for one image the way any HTTP client would."""
    import json
    import urllib.request

    from scheduler.api.tenants import KeyStore
    from scheduler.settings import get_settings

    api_url = cluster.start_api()
    # the tenant of the prompts above (the cache is scoped by tenant): the same request again is an exact hit
    key = KeyStore(cluster.redis, get_settings().queue_prefix).create("public")["key"]
    body = {
        "model": model,
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance,
        "response_format": "url",
    }
    request = urllib.request.Request(
        api_url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.load(response)
    return (
        api_url,
        key,
        {
            "seconds": time.perf_counter() - started,
            "hit": answer["results"][0]["cache"]["hit"],
            "url": answer["data"][0]["url"],
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reprise demo", description=__doc__)
    p.add_argument("--model", default=None, help="model to serve (default: the shipped `shapes` model, else `tiny`)")
    p.add_argument("--devices", default="auto")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default: the model's default_guidance_scale, else 5)",
    )
    p.add_argument("--workdir", default="var/demo")
    args = p.parse_args(argv)
    model = args.model or default_model()
    prompts = SHAPES_PROMPTS if model == "shapes" else FREE_PROMPTS
    guidance = (
        args.guidance if args.guidance is not None else float(model_extra(model).get("default_guidance_scale", 5.0))
    )
    console = Console(width=max(Console().width, 160))

    # MiniLM and its calibrated table (README: calibration) unless REPRISE_CACHE_EMBEDDER / _SKIP_TABLE say
    # otherwise: the second wave's edit is scored 0.99 by MiniLM and resumes at K = 5. (`auto` would pick the
    # `shapes` model's own encoder and its shipped 0.95:0.5 table, under which every one-attribute edit, at
    # <= 0.89, is rightly a miss: the demo would show no edit resuming.)
    embedder = os.environ.get("REPRISE_CACHE_EMBEDDER", "minilm")
    workdir = Path(args.workdir).resolve()
    # Every run starts from an empty cache (the worker's embedded one, <workdir>/qdrant): a second run
    # would otherwise answer its first wave from the first run's entries.
    shutil.rmtree(workdir / "qdrant", ignore_errors=True)
    with LocalCluster(workdir=str(workdir)) as cluster:
        console.print(f"[bold]Redis:[/] {cluster.how_redis}")
        console.print(
            f"[bold]Worker:[/] starting `reprise worker --model {model} --devices {args.devices}` with "
            f"REPRISE_CACHE_EMBEDDER={embedder} (loads the model once per device) ..."
        )
        cluster.start_worker(model, args.devices, timeout=300, REPRISE_CACHE_EMBEDDER=embedder)
        from scheduler.cache_admin import CacheAdmin
        from scheduler.client import submit

        for _, entry in sorted(CacheAdmin().registry.nodes().items()):  # what the node serves with, as it says
            table = [tuple(row) for row in entry.get("skip_table") or []]
            console.print(f"[bold]Approximate reuse:[/] skip table {table} (similarity: fraction of steps)")
        flower_url = cluster.start_flower(password="reprise-demo")
        console.print(f"[bold]Flower:[/] {flower_url} (user reprise, password reprise-demo)")

        rows = []
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            # Two waves: the second one reuses what the first wrote to the cache.
            for first, wave in ((True, prompts[:3]), (False, prompts[3:])):
                jobs = []
                for prompt, seed in wave:
                    job = submit(prompt=prompt, steps=args.steps, seed=seed, model=model, guidance_scale=guidance)
                    jobs.append(
                        (
                            f"{prompt} (seed {seed})",
                            job,
                            bar.add_task(f"{prompt[:48]} ({seed})", total=args.steps),
                            time.perf_counter(),
                        )
                    )
                pending = list(jobs)
                while pending:
                    for item in list(pending):
                        prompt, job, task, t0 = item
                        progress = job.progress()
                        bar.update(task, completed=progress.get("step") or 0)
                        if job.ready():
                            result = job.wait(5)
                            bar.update(task, completed=args.steps)
                            rows.append((prompt, result.timings.total_s, result, time.perf_counter() - t0))
                            pending.remove(item)
                    time.sleep(0.1)
                # The second wave reuses what the first wrote: wait until every node's write-backs landed
                # (each node answers once its write-back queue is empty; a node that cannot fails the demo).
                if first:
                    replies = CacheAdmin().drain_writebacks(timeout_s=60)
                    bar.console.print(f"write-backs drained on {', '.join(sorted(replies))}")

        table = Table(title=f"reprise demo — model {model}, {args.steps} steps")
        for col in ("prompt", "seconds", "cache", "steps run", "image"):
            table.add_column(col, overflow="fold")
        for prompt, seconds, result, _ in rows:
            cache = result.cache.hit + (
                f" (K={result.cache.k}, s={result.cache.similarity:.2f})" if result.cache.hit == "approximate" else ""
            )
            table.add_row(
                prompt,
                f"{seconds:.2f}",
                cache,
                str(result.cache.steps_computed),
                result.image_uri.removeprefix("file://"),
            )
        console.print(table)
        api_url, key, answer = demo_api(cluster, model, *prompts[0], args.steps, guidance)
        console.print(f"[bold]HTTP API:[/] {api_url} (docs at {api_url}/docs), key {key} (tenant public)")
        console.print(
            f"  POST /v1/images/generations {prompts[0][0]!r} (seed {prompts[0][1]}) -> {answer['seconds']:.2f}s, "
            f"cache {answer['hit']}, image {answer['url']}"
        )
        console.print(
            f"  try: curl -s {api_url}/v1/images/generations -H 'Authorization: Bearer {key}' "
            f'-H \'Content-Type: application/json\' -d \'{{"model": "{model}", "prompt": "a cat", "steps": 10}}\''
        )
        console.print(
            f"Flower was at {flower_url}; stopping the worker, the API, Flower{' and Redis' if cluster.own_redis else ''} now."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
