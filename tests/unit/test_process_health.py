"""What ``billing worker|beat --health`` answers from a heartbeat file, and what exit status ``billing worker``
and ``billing beat`` hand their supervisor (the processes themselves are exercised in
tests/integration/test_restarts.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from billing import cli
from workers import beat, health


def beat_file(tmp_path, kind="worker", *, age=0.0, status="ok", pid=None, **checks):
    path = health.default_path(kind, tmp_path, pid or os.getpid())
    health.write(path, {"kind": kind, "pid": pid or os.getpid(), "at": time.time() - age, "status": status,
                        "checks": checks or {"broker": "ok"}})
    return path


def test_a_fresh_ok_heartbeat_is_healthy(tmp_path):
    beat_file(tmp_path)
    code, lines = health.probe("worker", data_dir=tmp_path)
    assert code == 0 and "ok" in lines[0]


def test_a_dependency_down_is_unhealthy_and_named(tmp_path):
    beat_file(tmp_path, status="unavailable", broker="error: BusyLoadingError", database="ok")
    code, [line] = health.probe("worker", data_dir=tmp_path)
    assert code == 1 and "broker error: BusyLoadingError" in line and "database" not in line


def test_a_heartbeat_that_stopped_changing_is_a_stuck_process(tmp_path):
    beat_file(tmp_path, age=health.MAX_AGE["worker"] + 5)
    code, [line] = health.probe("worker", data_dir=tmp_path)
    assert code == 1 and "stuck" in line


def test_the_file_of_a_process_that_is_gone_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = beat_file(tmp_path, pid=dead.pid)
    code, [line] = health.probe("worker", data_dir=tmp_path)
    assert code == 1 and "no running worker" in line and not path.exists()


def test_every_running_process_must_be_healthy(tmp_path):
    beat_file(tmp_path)
    beat_file(tmp_path, pid=os.getppid(), status="unavailable", database="error: OperationalError")
    code, lines = health.probe("worker", data_dir=tmp_path)
    assert code == 1 and len(lines) == 2


def test_beat_backoff_doubles_with_jitter_and_is_capped():
    assert 0 < beat.backoff(1) <= beat.FIRST_BACKOFF
    assert beat.backoff(3) <= 4 * beat.FIRST_BACKOFF
    assert all(beat.MAX_BACKOFF / 2 <= beat.backoff(50) <= beat.MAX_BACKOFF for _ in range(20))


# --- the command line -------------------------------------------------------------------------------------

@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path))
    from billing.settings import get_settings

    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


@pytest.mark.parametrize("kind", ["worker", "beat"])
def test_health_flag_exit_status(runner, tmp_path, kind):
    assert runner.invoke(cli.app, [kind, "--health"]).exit_code == 1  # nothing running
    beat_file(tmp_path, kind)
    result = runner.invoke(cli.app, [kind, "--health"])
    assert result.exit_code == 0, result.output
    explicit = tmp_path / "elsewhere.json"
    assert runner.invoke(cli.app, [kind, "--health", "--health-file", str(explicit)]).exit_code == 1


@pytest.fixture
def celery_exits(monkeypatch):
    """``billing worker`` / ``billing beat`` with Celery's own run replaced by an exit status."""
    from billing import db
    from workers import celery_app, observability

    monkeypatch.setattr(observability, "setup_logging", lambda level: "text")
    monkeypatch.setattr(db, "configure_pool", lambda concurrency: None)
    monkeypatch.setattr(health.WorkerHeartbeat, "start", lambda self: self)
    monkeypatch.setattr(beat, "heartbeat_path", None)  # set by ``billing beat``; put back afterwards
    status: dict[str, int | None] = {}
    monkeypatch.setattr(celery_app.app, "start", lambda argv: status["code"])
    return status


@pytest.mark.parametrize("kind", ["worker", "beat"])
@pytest.mark.parametrize(("celery", "expected"), [(0, 0), (None, 0), (1, 1)])
def test_the_exit_status_reaches_the_supervisor(runner, celery_exits, kind, celery, expected):
    """Celery.worker_main drops the status: a worker that died of an unrecoverable error exited 0, and a
    supervisor with Restart=on-failure left it dead."""
    celery_exits["code"] = celery
    assert runner.invoke(cli.app, [kind]).exit_code == expected
