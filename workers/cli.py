"""The worker's commands of `reprise`: `worker` (serve a model on this machine's devices) and `settings`."""

from __future__ import annotations

import logging
import os
import socket
import sys

from scheduler.cli import new_parser, passthrough, run


def _cmd_worker(args) -> int:
    import redis

    from scheduler.app import get_app
    from scheduler.schema import queue_for
    from scheduler.settings import get_settings
    from workers.node import Heartbeat, build_service, node_info, serve_metrics
    from workers.settings import load_worker_settings

    logging.basicConfig(
        level=getattr(logging, args.loglevel.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {k: v for k, v in {"model": args.model, "devices": args.devices}.items() if v}
    if args.no_cache:
        overrides["cache_enabled"] = False
    wsettings = load_worker_settings(**overrides)
    cluster = get_settings()
    client = redis.Redis.from_url(cluster.redis_url)
    print(f"reprise worker: loading {wsettings.model} on {wsettings.devices} ...", flush=True)
    service = build_service(wsettings, cluster, redis_client=client)
    from workers import tasks

    tasks.install(service, client, cluster.progress_interval_s, cluster.queue_prefix)
    queue = queue_for(service.model_name, cluster.queue_prefix)
    serve_metrics(service, wsettings, client, cluster.queue_prefix)
    hostname = args.hostname or f"reprise-{service.model_name}-{os.getpid()}@{socket.gethostname()}"
    service.queue = queue
    service.hostname = hostname  # results name the node that ran them (several nodes may share a machine)
    info = node_info(service, queue)
    info["node"] = hostname
    from workers.tables import TableWatcher

    watcher = TableWatcher(
        service, client, cluster.queue_prefix, info, wsettings.table_refresh_s, wsettings.heartbeat_s * 3
    )
    watcher.start_watching()  # the stored table of this model version, before the first heartbeat
    Heartbeat(service.registry, service.model_name, info, wsettings.heartbeat_s).start()
    app = get_app()
    from kombu import Queue

    control_queue = f"{cluster.queue_prefix}.control"
    app.conf.task_queues = [Queue(queue), Queue(control_queue)]
    from workers import control  # registers the cache control command and tasks

    if service.cache is not None:
        control.start_control(service, client, cluster)
    print(
        f"reprise worker: serving {service.model_name} (version {info['model_version']}) on "
        f"{', '.join(info['devices'])}; queue {queue}",
        flush=True,
    )
    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(service.slots),
        "-Q",
        f"{queue},{control_queue}",
        "-E",
        "-n",
        hostname,
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    service.close()
    return 0


def _cmd_calibrate(args) -> int:
    from workers import calibrate

    return calibrate.run(args)


def _table_calibrate(argv: list[str]) -> int:
    """`reprise cache table calibrate ...`: `reprise calibrate ... --store`."""
    from workers import calibrate

    return calibrate.main([*argv, "--store"])


def add_commands(sub) -> None:
    from scheduler import cache_cli
    from workers.calibrate import add_arguments

    cache_cli.TABLE_CALIBRATE = _table_calibrate
    s = sub.add_parser("calibrate", help="fit the similarity -> K table for a model on a prompt log")
    add_arguments(s)
    s.set_defaults(func=_cmd_calibrate)
    s = sub.add_parser("worker", help="run a worker node: one pipeline per device, one process")
    s.add_argument(
        "--model",
        help="built-in name (tiny, sd15-small, sd15, shapes), diffusers directory or hub id (default: REPRISE_MODEL or tiny)",
    )
    s.add_argument("--devices", help="auto | cpu | sim | cuda:0,cuda:1 (default: REPRISE_DEVICES or auto)")
    s.add_argument("--no-cache", action="store_true", help="serve without the latent cache")
    s.add_argument("--hostname", help="Celery node name (default reprise-<model>-<pid>@<host>)")
    s.add_argument("--loglevel", default="INFO")
    s.set_defaults(func=_cmd_worker)
    passthrough(sub, "settings", "workers.settings_doc", "every setting: environment variable, default, meaning")


def main(argv: list[str] | None = None) -> int:
    return run(new_parser(add_commands), argv)


if __name__ == "__main__":
    sys.exit(main())
