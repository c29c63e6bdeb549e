"""The kombu work-around (workers.broker) on its own: a channel holding an unacknowledged message loses its
Redis, is closed the way Celery 5.7 closes a broken connection (collect, then close), and neither raises
``AttributeError: 'NoneType' object has no attribute 'hostname'`` nor forgets the message: it is back on
the queue as soon as a connection is made again, not after the 30-minute visibility timeout."""

from __future__ import annotations

import kombu
import pytest

from tests.integration.dependencies import PrivateRedis
from workers import broker


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def held_message(url: str) -> tuple[kombu.Connection, kombu.Queue]:
    """A consumer that took one message and has not acknowledged it (a task running, or waiting on its
    countdown)."""
    queue = kombu.Queue("patch-test", kombu.Exchange("patch-test"), routing_key="patch-test")
    with kombu.Connection(url) as producer:
        producer.Producer().publish({"charge_id": 7}, exchange=queue.exchange, routing_key="patch-test",
                                    declare=[queue], serializer="json")
    conn = kombu.Connection(url, transport_options={"visibility_timeout": 1800})
    got = []
    consumer = conn.Consumer([queue], callbacks=[lambda body, message: got.append(message)], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=5)
    assert got and not got[0].acknowledged
    return conn, queue


def close_like_celery(conn: kombu.Connection) -> None:
    """celery.worker.consumer.Consumer.on_connection_error_after_connected: collect, then close."""
    try:
        conn.collect(socket_timeout=1)
    except Exception:
        pass
    kombu.common.ignore_errors(conn, conn.close)


def queued(url: str) -> int:
    with kombu.Connection(url) as conn:
        return conn.default_channel.client.llen("patch-test")


def test_a_redis_restart_neither_crashes_the_close_nor_loses_the_held_message(private_redis):
    broker.apply_patches()
    conn, _queue = held_message(private_redis.url)
    assert queued(private_redis.url) == 0
    private_redis.kill()

    # Unpatched, the close raises AttributeError ('NoneType' object has no attribute 'hostname') when the
    # first close stopped half-way, or gives the message up to the visibility timeout when it did not.
    close_like_celery(conn)
    assert broker.pending_restores() == 1

    private_redis.start()  # with its data: the message waits in Redis's unacked hash
    with kombu.Connection(private_redis.url) as fresh:
        assert broker.restore_deferred(fresh) == 1
    assert broker.pending_restores() == 0
    assert queued(private_redis.url) == 1


def test_a_restore_that_fails_again_is_kept_for_the_next_connection(private_redis):
    broker.apply_patches()
    conn, _queue = held_message(private_redis.url)
    private_redis.kill()
    close_like_celery(conn)
    assert broker.pending_restores() == 1
    with kombu.Connection(private_redis.url, connect_timeout=1) as fresh:
        assert broker.restore_deferred(fresh) == 0  # Redis still down: kept
    assert broker.pending_restores() == 1
    private_redis.wipe()
    private_redis.start(persistence=False)  # back without its data: nothing left to restore
    with kombu.Connection(private_redis.url) as fresh:
        assert broker.restore_deferred(fresh) == 1
    assert broker.pending_restores() == 0 and queued(private_redis.url) == 0
