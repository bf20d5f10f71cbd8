"""The API's commands of `reprise`: `api` (serve it), `keys create | list | revoke`, `webhooks failed`."""

from __future__ import annotations

import json
import time


def _stores():
    from scheduler.api.tenants import KeyStore
    from scheduler.api.webhooks import Outbox
    from scheduler.redis_conn import redis_client
    from scheduler.settings import get_settings

    s = get_settings()
    r = redis_client(s.redis_url)
    return KeyStore(r, s.queue_prefix), Outbox(r, s.queue_prefix)


def _cmd_api(args) -> int:
    import os

    import uvicorn

    from scheduler.settings import get_settings

    s = get_settings()
    host, port = args.host or s.api_host, args.port or s.api_port
    # create_app reads the settings: the address it was started on is the default base of image URLs
    os.environ["REPRISE_API_HOST"], os.environ["REPRISE_API_PORT"] = host, str(port)
    get_settings.cache_clear()
    print(f"reprise api: http://{host}:{port} (docs at /docs, OpenAPI at /openapi.json)", flush=True)
    uvicorn.run(
        "scheduler.api.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=args.workers,
        log_level=args.loglevel.lower(),
        proxy_headers=True,
    )
    return 0


def _cmd_keys(args) -> int:
    import re

    from scheduler.errors import InvalidRequest

    keys, _ = _stores()
    if args.action == "create":
        if not args.tenant or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", args.tenant):
            problem = "give --tenant NAME (letters, digits, _ . -; at most 64)"
            raise InvalidRequest(f"keys create: {problem}", [{"field": "tenant", "problem": problem}])
        out = keys.create(args.tenant, rate_per_min=args.rate_per_min, max_concurrent=args.max_concurrent)
        if args.json:
            print(json.dumps({"key": out["key"], "webhook_secret": out["webhook_secret"], "id": out["id"]}))
        else:
            print(f"key ({out['id']}, tenant {args.tenant}; shown once, store it now): {out['key']}")
            print(f"webhook secret of tenant {args.tenant} (verifies webhook-signature): {out['webhook_secret']}")
        return 0
    if args.action == "list":
        rows = keys.list(args.tenant)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["created"]))
                print(f"{row['id']}  {row['tenant']:<20} {row['hint']}  created {created} UTC")
        return 0
    if not args.id:
        raise SystemExit("reprise keys revoke: give the key id (reprise keys list)")
    if not keys.revoke(args.id):
        print(f"no key {args.id}")
        return 1
    print(f"revoked {args.id}")
    return 0


def _cmd_webhooks(args) -> int:
    _, outbox = _stores()
    failed = outbox.failed(args.limit)
    if args.json:
        print(json.dumps(failed, indent=2))
        return 0
    for rec in failed:
        last = rec["errors"][-1]["error"] if rec["errors"] else "?"
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.get("failed_at", 0)))
        print(
            f"{rec['id']}  tenant {rec['tenant']}  {rec['event']['type']}  {rec['url']}  "
            f"{rec['attempts']} attempts, last: {last}  ({at} UTC)"
        )
    if not failed:
        print("no failed webhook deliveries")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("api", help="serve the HTTP API (OpenAI images, jobs, webhooks) with uvicorn")
    s.add_argument("--host", help="address to listen on (default: REPRISE_API_HOST, 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default: REPRISE_API_PORT, 8000)")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    s.add_argument("--loglevel", default="info")
    s.set_defaults(func=_cmd_api)

    s = sub.add_parser("keys", help="API keys: create --tenant T [--json] | list | revoke ID")
    s.add_argument("action", choices=["create", "list", "revoke"])
    s.add_argument("id", nargs="?", help="revoke: the key id")
    s.add_argument("--tenant", help="create: the key's tenant (required); list: only this tenant's")
    s.add_argument(
        "--rate-per-min", type=int, help="create: this tenant's request rate (default REPRISE_API_RATE_PER_MIN)"
    )
    s.add_argument(
        "--max-concurrent", type=int, help="create: this tenant's images in flight (default REPRISE_API_MAX_CONCURRENT)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_keys)

    s = sub.add_parser("webhooks", help="webhook deliveries: failed (the dead-letter list)")
    s.add_argument("action", choices=["failed"])
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_webhooks)
