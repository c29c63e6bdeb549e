"""Live ``billing worker``, ``billing beat`` and ``billing web`` ride out their dependencies restarting: Redis
with its data (and a few seconds of "Redis is loading the dataset in memory"), Redis without it, and a
PostgreSQL crash. None of them exits; while a dependency is down ``/healthz`` answers 503 and the heartbeat
probes (``billing worker --health``, ``billing beat --health``) fail; afterwards they are healthy again, a
charge enqueued after the restart is charged, and the charge that was in flight during it ends decided.

The Redis and PostgreSQL are the module's own (tests/integration/dependencies.py), so crashing them disturbs
no other test; the Stripe sandbox and the SMTP server are the session's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from billing import db as billing_db
from billing.models import Charge, Subscription
from tests import factories, stripe_events
from tests.conftest import environ_applied
from tests.integration.billing_helpers import SETTLED, enrol
from tests.integration.conftest import ROOT, WorkerProcess, billing_command, wait_until
from tests.integration.cycle import web_server_process
from tests.integration.dependencies import PrivatePostgres, PrivateRedis
from workers.celery_app import BEAT_LOCK_KEY, TASK_QUEUE

pytestmark = pytest.mark.slow


class BeatProcess:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([*billing_command(), "beat"],
                                         env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sent_since(self, mark: int) -> int:
        return self.log()[mark:].count("Sending due task")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@dataclass
class Stack:
    env: dict[str, str]
    redis: PrivateRedis
    pg: PrivatePostgres
    worker: WorkerProcess
    beat: BeatProcess
    web_url: str
    web: subprocess.Popen
    sandbox: object
    producer: object

    # --- what a supervisor sees ---------------------------------------------------------------------

    def healthz(self) -> int | None:
        try:
            return httpx.get(f"{self.web_url}/healthz", timeout=10).status_code
        except httpx.HTTPError:
            return None

    def probe(self, kind: str) -> tuple[int, str]:
        result = subprocess.run([*billing_command(), kind, "--health"], env={**os.environ, **self.env}, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout + result.stderr

    def all_alive(self) -> None:
        worker = self.worker
        assert worker.alive(), f"the worker exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}"
        assert self.beat.alive(), f"beat exited with {self.beat.proc.returncode}:\n{self.beat.log()[-3000:]}"
        assert self.web.poll() is None, f"web exited with {self.web.returncode}"

    def healthy_again(self) -> None:
        wait_until(lambda: self.healthz() == 200, timeout=60, message="/healthz to answer 200")
        wait_until(lambda: self.probe("worker")[0] == 0, timeout=90, interval=1, message="the worker probe to pass")
        wait_until(lambda: self.probe("beat")[0] == 0, timeout=90, interval=1, message="the beat probe to pass")

    # --- work -----------------------------------------------------------------------------------------

    def new_charge(self) -> int:
        """A pending charge of a customer with a saved card (its subscription is not due to beat's run)."""
        factory = sessionmaker(bind=billing_db.get_engine(), expire_on_commit=False)
        sub_id = enrol(factory, self.sandbox, "pm_card_visa", email=f"restart-{uuid.uuid4().hex[:10]}@example.com",
                       due=datetime.now(UTC) + timedelta(days=3))
        with factory() as s:
            charge_id = factories.make_charge(s, s.get(Subscription, sub_id)).id
            s.commit()
        return charge_id

    def enqueue(self, charge_id: int, countdown: float | None = None) -> None:
        self.producer.send_task("workers.tasks.charge_attempt", args=[charge_id], countdown=countdown,
                                queue=TASK_QUEUE)

    def status(self, charge_id: int) -> str:
        with billing_db.get_engine().connect() as conn:
            return conn.execute(text("SELECT status FROM charges WHERE id = :id"), {"id": charge_id}).scalar_one()

    def decided(self, *charge_ids: int) -> bool:
        try:
            return all(self.status(c) in SETTLED for c in charge_ids)
        except Exception:
            return False

    def webhook_processed(self) -> bool:
        """A delivery to ``billing web`` (which enqueues it) is stored and processed by the worker."""
        evt = stripe_events.event("customer.updated", {"id": f"cus_restart_{uuid.uuid4().hex[:10]}",
                                                        "object": "customer"})
        body, headers = stripe_events.signed(evt)
        resp = httpx.post(f"{self.web_url}/webhooks/stripe", content=body, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text

        def processed() -> bool:
            with billing_db.get_engine().connect() as conn:
                return conn.execute(text("SELECT processed_at IS NOT NULL FROM webhook_events "
                                         "WHERE stripe_event_id = :id"), {"id": evt["id"]}).scalar() is True

        wait_until(processed, timeout=60, message="the webhook event to be processed")
        return True

    def received(self, charge_id: int, since: int = 0) -> bool:
        return f"'args': '[{charge_id}]'" in self.worker.log()[since:] or f"'args': '({charge_id},)'" in \
            self.worker.log()[since:] or f'"args": "[{charge_id}]"' in self.worker.log()[since:]


def producer_for(env: dict[str, str]):
    """A Celery app of this test's own for the private Redis (the process's app may be bound to the suite's)."""
    from celery import Celery

    from billing.settings import load
    from workers.celery_app import celery_config

    with environ_applied(env):
        config = celery_config(load())
    app = Celery("restart-tests", set_as_current=False)
    app.conf.update(config)
    return app


@pytest.fixture(scope="module")
def stack(base_env, _sandbox_server, _smtp_sink, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("restarts")
    redis_server = PrivateRedis(tmp / "redis")
    redis_server.start()
    # Not under pytest's temporary directory: PostgreSQL runs as an unprivileged user that must reach its
    # data directory, and any pytest session starting meanwhile makes /tmp/pytest-of-<user> private again.
    pg = PrivatePostgres(ROOT / ".billing" / "restarts" / uuid.uuid4().hex[:12])
    env = {**base_env, "BILLING_DATABASE_URL": pg.url, "BILLING_BROKER_URL": redis_server.url,
           "BILLING_DATA_DIR": str(tmp / "data"), "BILLING_STRIPE_API_BASE": _sandbox_server.url,
           "BILLING_STRIPE_API_KEY": _sandbox_server.api_key, "BILLING_SMTP_URL": _smtp_sink.url,
           # Beat's billing run opens due periods: none here, the test opens its own charges.
           "BILLING_BILLING_RUN_INTERVAL_SECONDS": "86400", "BILLING_LOG_FORMAT": "json",
           "BILLING_STRIPE_WEBHOOK_SECRET": stripe_events.SECRET}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(pg.close)
        cleanup.callback(redis_server.stop)
        cleanup.enter_context(environ_applied(env))
        worker = WorkerProcess(env, tmp, concurrency=4)
        cleanup.callback(worker.stop)
        worker.start()
        beat = BeatProcess(env, tmp / "beat.log")
        cleanup.callback(beat.stop)
        web_url, web = cleanup.enter_context(web_server_process(env, tmp / "web.log"))
        producer = producer_for(env)
        cleanup.callback(producer.close)
        built = Stack(env, redis_server, pg, worker, beat, web_url, web, _sandbox_server, producer)
        wait_until(lambda: "beat: Acquired lock" in beat.log(), timeout=60, message="beat to take its lock")
        built.healthy_again()
        yield built


def test_redis_restart_with_its_data(stack):
    """The crash the campaign saw kill both: beat on BusyLoadingError, the worker (status 0) on kombu's
    restore of the messages it held. Both go on; the charge held across the restart is charged."""
    before = stack.new_charge()
    mark = len(stack.worker.log())
    stack.enqueue(before, countdown=10)  # the worker holds it, unacknowledged, while Redis goes away
    wait_until(lambda: stack.received(before, mark), timeout=30, message="the worker to reserve the charge")
    stack.redis.fill()
    time.sleep(1.5)  # the append-only file has it all

    stack.redis.kill()
    wait_until(lambda: stack.healthz() == 503, timeout=30, message="/healthz to say 503 with Redis down")
    _, out = wait_until(lambda: (r := stack.probe("worker"))[0] == 1 and r, timeout=60, interval=1,
                           message="the worker probe to fail with Redis down")
    assert "broker" in out, out
    beat_mark = len(stack.beat.log())
    stack.redis.start(persistence=True, slow_load=True, wait=False)
    loading_503 = stack.healthz()
    stack.redis.wait_ready()
    assert stack.redis.client().exists("filler:1"), "Redis came back without its data"
    assert loading_503 in (503, None)

    stack.all_alive()
    stack.healthy_again()
    assert stack.webhook_processed()  # web enqueues again, the worker takes it
    after = stack.new_charge()
    stack.enqueue(after)
    wait_until(lambda: stack.decided(before, after), timeout=120, interval=0.5,
               message="both charges to be decided")
    wait_until(lambda: stack.beat.sent_since(beat_mark) >= 1, timeout=60, message="beat to send tasks again")
    stack.all_alive()
    if stack.redis.reports_loading:
        assert "BusyLoadingError" in stack.beat.log()[beat_mark:] + stack.worker.log()[mark:]


def test_redis_restart_without_its_data(stack):
    """Redis comes back empty: the queue, the held message, beat's lock and schedule are gone. Beat takes
    the lock and installs its schedule again, the worker declares its queue again, and the charge whose
    message was lost is found by the reconciler's sweep from the database."""
    before = stack.new_charge()
    mark = len(stack.worker.log())
    stack.enqueue(before, countdown=8)
    wait_until(lambda: stack.received(before, mark), timeout=30, message="the worker to reserve the charge")

    stack.redis.kill()
    stack.redis.wipe()
    wait_until(lambda: stack.healthz() == 503, timeout=30, message="/healthz to say 503 with Redis down")
    beat_mark = len(stack.beat.log())
    stack.redis.start(persistence=False)
    assert stack.redis.client().dbsize() == 0

    stack.all_alive()
    stack.healthy_again()
    wait_until(lambda: stack.redis.client().get(BEAT_LOCK_KEY) is not None, timeout=60,
               message="beat to take its lock again")
    wait_until(lambda: stack.beat.sent_since(beat_mark) >= 1, timeout=60, message="beat to send tasks again")
    assert stack.webhook_processed()  # the queue's bindings were declared again
    after = stack.new_charge()
    stack.enqueue(after)
    wait_until(lambda: stack.decided(after), timeout=90, interval=0.5, message="the new charge to be decided")

    if not stack.decided(before):
        # Its message went with Redis. The reconciler's sweep finds pending charges from the database once
        # they are stale (billing.reconciler.STALE_AFTER): that time is skipped here, not the sweep.
        with billing_db.get_engine().begin() as conn:
            conn.execute(text("UPDATE charges SET updated_at = updated_at - interval '1 hour' WHERE id = :id"),
                         {"id": before})
        stack.producer.send_task("workers.tasks.reconcile", queue=TASK_QUEUE)
    wait_until(lambda: stack.decided(before), timeout=90, interval=0.5, message="the lost charge to be decided")
    stack.all_alive()


def test_postgresql_crash_and_restart(stack):
    """PostgreSQL crashes (immediate stop: recovery at the next start) with a charge enqueued meanwhile: the
    task fails on the database and is retried with backoff until the database is back."""
    before = stack.new_charge()
    stack.pg.stop("immediate")
    wait_until(lambda: stack.healthz() == 503, timeout=30, message="/healthz to say 503 with PostgreSQL down")
    _, out = wait_until(lambda: (r := stack.probe("worker"))[0] == 1 and r, timeout=60, interval=1,
                           message="the worker probe to fail with PostgreSQL down")
    assert "database" in out, out
    assert stack.probe("beat")[0] == 0  # beat needs Redis only
    stack.enqueue(before)
    time.sleep(3)  # it fails on the database at least once
    stack.pg.start()
    billing_db.get_engine().dispose()  # this test's own pooled connections died with the server

    stack.all_alive()
    stack.healthy_again()
    assert stack.webhook_processed()  # web enqueues again, the worker takes it
    after = stack.new_charge()
    stack.enqueue(after)
    wait_until(lambda: stack.decided(before, after), timeout=120, interval=0.5,
               message="both charges to be decided")
    with sessionmaker(bind=billing_db.get_engine())() as s:
        assert {s.get(Charge, c).attempts for c in (before, after)} == {1}  # charged once each
    stack.all_alive()
