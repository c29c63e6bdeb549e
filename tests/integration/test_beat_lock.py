"""However many ``billing beat`` processes run, exactly one holds RedBeat's Redis lock and sends tasks;
a standby takes over when the active one stops (at once) or dies (when the lock expires)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.conftest import ROOT, billing_command, wait_until
from workers.celery_app import BEAT_LOCK_KEY, BEAT_LOCK_TIMEOUT, TASK_QUEUE


class Beat:
    def __init__(self, env: dict[str, str], log_path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([*billing_command(), "beat", "--loglevel=DEBUG"],
                                         env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def active(self) -> bool:
        return "beat: Acquired lock" in self.log()

    def sent(self) -> int:
        return self.log().count("Sending due task")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)


@pytest.fixture
def beats(base_env, redis_client, tmp_path):
    started: list[Beat] = []

    def start() -> Beat:
        beat = Beat(base_env, tmp_path / f"beat-{len(started)}.log")
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.signal(signal.SIGKILL)


def _one_active(pair: list[Beat]) -> Beat | None:
    active = [b for b in pair if b.active()]
    return active[0] if len(active) == 1 else None


def test_two_beats_one_active_then_failover(beats, redis_client):
    pair = [beats(), beats()]
    active = wait_until(lambda: _one_active(pair), timeout=60, message="one beat to take the lock")
    standby = next(b for b in pair if b is not active)

    # The active beat sends the due tasks (relay-outbox every 10 s); the standby sends nothing for as
    # long as the other holds the lock.
    wait_until(lambda: active.sent() >= 2, timeout=45, message="the active beat to send its due tasks")
    assert not standby.active() and standby.sent() == 0
    assert redis_client.get(BEAT_LOCK_KEY) is not None
    assert redis_client.llen(TASK_QUEUE) >= 2

    # A warm stop releases the lock; the standby takes it within a loop interval.
    active.signal(signal.SIGTERM)
    wait_until(standby.active, timeout=30, message="the standby to take over")
    wait_until(lambda: standby.sent() >= 1, timeout=30, message="the new active beat to send tasks")


@pytest.mark.slow
def test_killed_beat_is_replaced_when_its_lock_expires(beats):
    pair = [beats(), beats()]
    active = wait_until(lambda: _one_active(pair), timeout=60, message="one beat to take the lock")
    standby = next(b for b in pair if b is not active)
    active.signal(signal.SIGKILL)  # no release: the lock has to expire
    killed_at = time.monotonic()
    wait_until(standby.active, timeout=BEAT_LOCK_TIMEOUT + 30, message="the standby to take over")
    assert time.monotonic() - killed_at <= BEAT_LOCK_TIMEOUT + 15
