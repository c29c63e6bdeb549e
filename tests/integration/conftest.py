"""Fixtures for tests against the real moving parts: the Stripe sandbox, an SMTP server, and real
``billing worker`` processes on the test PostgreSQL and Redis.

- ``sandbox``: one in-process sandbox for the session, reset before each test that uses it.
- ``smtp_server``: an aiosmtpd server on a free port that keeps every message it receives.
- ``app_env``: the ``BILLING_*`` environment pointing at those (also applied to this process, so
  in-process calls and subprocesses see the same servers).
- ``worker``: a real ``billing worker`` subprocess, started after Redis is flushed and stopped at the
  end; ``worker.kill()`` SIGKILLs it and ``worker.restart()`` starts a fresh one.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import environ_applied
from tests.conftest import reset_process_caches as _reset_process_caches  # noqa: F401 - used by other test modules

ROOT = Path(__file__).resolve().parents[2]
# Generous on purpose: the suite must stay green on a loaded two-core CI box.
WORKER_READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def billing_command() -> list[str]:
    exe = shutil.which("billing", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "billing.cli"]


# --- Stripe sandbox ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def _sandbox_server():
    from sandbox.testing import SandboxServer

    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(_sandbox_server):
    """The session's sandbox, emptied before the test (``.url``, ``.api_key``, ``.control``)."""
    _sandbox_server.control.reset()
    return _sandbox_server


# --- SMTP ----------------------------------------------------------------------------------------------

class SmtpSink:
    """Collects every message delivered to it, parsed (``EmailMessage``), in arrival order."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.messages: list[EmailMessage] = []
        self._cond = threading.Condition()

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()
        return "250 OK"

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[EmailMessage]:
        """At least ``count`` messages (fails the test after ``timeout``)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                pytest.fail(f"expected {count} email(s) within {timeout:.0f}s, got {len(self.messages)}")
            return list(self.messages)

    def to(self, address: str) -> list[EmailMessage]:
        with self._cond:
            return [m for m in self.messages if address in str(m["To"])]


@pytest.fixture(scope="session")
def _smtp_sink():
    from aiosmtpd.controller import Controller

    sink = SmtpSink("127.0.0.1", free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    yield sink
    controller.stop()


@pytest.fixture
def smtp_server(_smtp_sink):
    _smtp_sink.clear()
    return _smtp_sink


# --- the product's environment ----------------------------------------------------------------------

@pytest.fixture
def app_env(base_env, sandbox, smtp_server) -> Iterator[dict[str, str]]:
    """``base_env`` plus the sandbox and SMTP server; applied to this process for the test too."""
    env = {
        **base_env,
        "BILLING_STRIPE_API_BASE": sandbox.url,
        "BILLING_STRIPE_API_KEY": sandbox.api_key,
        "BILLING_SMTP_URL": smtp_server.url,
    }
    with environ_applied(env):
        yield env


# --- real worker processes ----------------------------------------------------------------------------

class WorkerProcess:
    """A ``billing worker`` subprocess whose log goes to a file the test can read."""

    def __init__(self, env: dict[str, str], log_dir: Path, concurrency: int = 4):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        self.starts += 1
        self.log_path = self.log_dir / f"worker-{self.starts}-{uuid.uuid4().hex[:6]}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*billing_command(), "worker", f"--concurrency={self.concurrency}"],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT) -> None:
        """Celery logs ``… ready.`` once it consumes from the queue."""
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(f"billing worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"billing worker not ready after {timeout:.0f}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no acknowledgement, nothing put back on the queue."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM: finish running tasks), SIGKILL if it takes too long."""
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, *, kill: bool = True) -> WorkerProcess:
        self.kill() if kill else self.stop()
        return self.start()


@pytest.fixture
def worker_factory(app_env, redis_client, tmp_path) -> Iterator:
    """Start any number of workers (``worker_factory(concurrency=8)``); all are stopped at the end.

    Depends on ``redis_client``, which flushes Redis first: queues left by an earlier test are gone,
    and the workers declare their queue bindings again when they start.
    """
    started: list[WorkerProcess] = []

    def start(concurrency: int = 4) -> WorkerProcess:
        w = WorkerProcess(app_env, tmp_path, concurrency=concurrency)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def worker(worker_factory) -> WorkerProcess:
    return worker_factory()
