"""Guards on the node's broker connection: a Redis restart or failover never stops the node (kombu's channel close after a detach, kombu #970/#582), running jobs are not pushed back on a reconnect, and the consumer is watched."""

from __future__ import annotations

import logging

log = logging.getLogger("reprise.worker")


def keep_broker_channels_closable() -> None:
    """A Redis restart must not stop the node (kombu #970, #582, still in kombu 5.7.0).

    When the broker connection drops, Celery's consumer first calls ``Connection.collect()``, which
    closes the channel and then detaches the transport from its ``Connection`` (``transport.client =
    None``). If Redis died while the channel was inside BRPOP, that first close raised a connection
    error before the channel was marked closed, so Celery's second ``connection.close()`` closes it
    again; the close restores the unacknowledged messages (``QoS.restore_unacked``), which needs a new
    pool, and ``Channel._connparams`` reads ``self.connection.client.hostname`` on ``None``: an
    ``AttributeError``, which Celery treats as unrecoverable, and the worker process exits. Task threads
    still running acknowledge through the same channel (by then closed: ``channel.connection`` is None
    too) and hit the same error.

    The channel keeps the transport and the ``Connection`` it was opened from and puts them back when
    it needs a pool again (both already detached: no live connection uses them). The restore then either reaches Redis (it is back)
    or raises a connection error that kombu's cleanup ignores: the messages stay in kombu's
    ``unacked`` hash in Redis and come back after the visibility timeout; the ledger covers the rest."""
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel, "_reprise_closable", False):
        return
    init = channel.__init__

    def remembering_init(self, connection, *args, **kwargs):
        self._reprise_transport, self._reprise_client = connection, connection.client
        init(self, connection, *args, **kwargs)

    channel.__init__ = remembering_init
    for cls in (kombu_redis.Channel, kombu_redis.SentinelChannel):
        get_pool = cls.__dict__["_get_pool"]

        def reattached_get_pool(self, asynchronous=False, _get_pool=get_pool):
            if self.connection is None and getattr(self, "_reprise_transport", None) is not None:
                self.connection = self._reprise_transport  # a closed channel acknowledging a job that just ended
            if self.connection.client is None and getattr(self, "_reprise_client", None) is not None:
                self.connection.client = self._reprise_client  # a transport no live Connection uses any more
            return _get_pool(self, asynchronous)

        cls._get_pool = reattached_get_pool
    channel._reprise_closable = True


def keep_running_jobs_on_reconnect() -> None:
    """A lost broker connection must not hand this node's running jobs to another node.

    On a connection loss Celery closes the old channel, and kombu's close pushes every message the channel
    delivered and saw no ack for back onto its queue (``QoS.restore_unacked_once``). Under the thread pool
    those jobs keep running here, so another node (or this one, after reconnecting) runs them a second time
    at once — measured in the redis_failover fault: one job computed on two nodes, one of them from an
    approximate cache hit, so two different images under one job id. The old channel skips that restore on
    the connection-loss path only (a warm shutdown still restores): each running job acknowledges through
    its old channel when it ends (keep_broker_channels_closable keeps that channel able to reach Redis), and
    a job whose node dies before that is still in kombu's ``unacked`` hash in Redis, redelivered after the
    visibility timeout like any job of a dead node."""
    from celery.worker.consumer.consumer import Consumer

    if getattr(Consumer, "_reprise_keeps_running_jobs", False):
        return
    on_error = Consumer.on_connection_error_after_connected

    def on_connection_error_after_connected(self, exc):
        transport = getattr(self.connection, "_transport", None) if self.connection is not None else None
        channels = list(getattr(transport, "channels", []) or [])
        default = getattr(self.connection, "_default_channel", None) if self.connection is not None else None
        for channel in channels + ([default] if default is not None else []):
            channel.do_restore = False
        return on_error(self, exc)

    Consumer.on_connection_error_after_connected = on_connection_error_after_connected
    Consumer._reprise_keeps_running_jobs = True


def guard_broker_consumer() -> None:
    """One undecodable item pushed onto a queue list (not JSON, not a kombu envelope) makes kombu's Redis
    consumer raise inside the worker's event loop, which Celery treats as unrecoverable: the node stops
    serving. Drop such an item with an error line instead. (BRPOP has already removed it from Redis.)"""
    from queue import Empty

    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel, "_reprise_guarded", False):
        return
    read = channel._brpop_read

    def io_errors(errors: tuple) -> tuple:  # kombu counts KeyError as a connection error; from a message it is not
        return tuple(e for e in errors if e is not KeyError)

    def guarded_read(self, **options):
        try:
            return read(self, **options)
        except (Empty, *io_errors(self.connection_errors)):
            raise
        except Exception as exc:
            log.error("dropped an undecodable message from the broker (%s: %s)", type(exc).__name__, str(exc)[:200])
            return True

    channel._brpop_read = guarded_read
    channel._reprise_guarded = True

    # A well-formed envelope around a malformed task body (e.g. not [args, kwargs, embed]) raises inside
    # Celery's task handler: left alone, the message stays reserved and the node stops fetching. Reject
    # it as an invalid task, as Celery does for the malformations it knows.
    from celery.exceptions import InvalidTaskError
    from celery.worker.consumer.consumer import Consumer

    make_handler = Consumer.create_task_handler

    def create_task_handler(self, *args, **kwargs):
        handler = make_handler(self, *args, **kwargs)

        def on_task_received(message):
            try:
                return handler(message)
            except Exception as exc:
                if isinstance(exc, io_errors(self.connection_errors)):
                    raise
                return self.on_invalid_task(None, message, InvalidTaskError(f"{type(exc).__name__}: {exc}"))

        return on_task_received

    Consumer.create_task_handler = create_task_handler
