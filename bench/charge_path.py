"""The charge path under load: round trips, worker CPU and memory per charge, and the headroom.

Real ``billing worker`` processes drain ``charge_attempt`` tasks against the sandbox, run as its own
process at 300 ms median latency with Stripe's limits lifted, and a private embedded PostgreSQL:

1. **Round trips per charge as the server counts them.** After a warm-up batch (the pools filled), a
   sample of charges runs with ``log_statement = all``; every statement the server logs for the
   workers' ``application_name`` (``BEGIN`` and ``COMMIT`` included) is counted.
2. **Headroom.** Logging off, the main batch is published at once; charges/s is the steady rate of
   the middle 80 % of the payments (``charges.paid_at``), worker CPU per charge is the workers'
   user + system time over the batch, RSS is read when 1,000 charges are decided and at the end.

Each figure is printed beside its goal, as a ratio (≤ 1 is met for costs, ≥ 1 for the rate).

    python bench/charge_path.py [--charges 3000] [--sample 300] [--workers 2] [--concurrency 100]
                                [--pool threads|gevent] [--latency-ms 300]

Any version of the product can be measured: the code imported is the one ``PYTHONPATH`` names first
(the worker processes inherit it). Everything runs under a temporary directory and is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from tests.scale import insert_enrolled_customer  # noqa: E402

GOAL_ROUND_TRIPS = 4.0
GOAL_CPU_MS = 4.0
GOAL_RATE = 250.0
GOAL_RSS_GROWTH_MB = 2.0  # per worker, from the 1,000th charge to the end: memory stays flat
APP_NAME = "bench-worker"
TICK = os.sysconf("SC_CLK_TCK")
# For the comparison only: the product's ``billing worker`` runs the threads pool (it measured better).
GEVENT_WORKER = """
from gevent import monkey; monkey.patch_all()
import sys
from billing import db; db.configure_pool(int(sys.argv[1]))
from workers import observability; observability.setup_logging("INFO")
from workers.celery_app import app
app.worker_main(["--quiet", "worker", "-P", "gevent", "-c", sys.argv[1], "--loglevel=INFO", "--without-mingle",
                 "--without-gossip"])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--charges", type=int, default=3000)
    parser.add_argument("--sample", type=int, default=300, help="charges run with statement logging on")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100, help="threads per worker")
    parser.add_argument("--pool", default="threads", choices=["threads", "gevent"])
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this long")
    parser.add_argument("--statements-out", type=Path, help="write the sample's statements to this file")
    args = parser.parse_args()

    from billing import embedded, migrate

    with tempfile.TemporaryDirectory(prefix="billing-charge-bench-") as tmp:
        data = Path(tmp)
        base_url = embedded.database_url(data, extra_options="-c fsync=off -c synchronous_commit=off")
        db_url = base_url + f"?application_name={APP_NAME}"
        redis_url = embedded.broker_url(data)
        migrate.upgrade(base_url)
        sandbox_port = _free_port()
        sandbox = subprocess.Popen([sys.executable, "-m", "billing.cli", "sandbox", "--port", str(sandbox_port),
                                    "--rate-global", "0", "--rate-endpoint", "0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        env = {**os.environ, "BILLING_DATABASE_URL": db_url, "BILLING_BROKER_URL": redis_url,
               "BILLING_DATA_DIR": str(data), "BILLING_STRIPE_API_KEY": "sk_test_bench",
               "BILLING_STRIPE_API_BASE": sandbox_url, "BILLING_SECRET_KEY": "bench" * 8,
               "BILLING_SMTP_URL": "smtp://127.0.0.1:1", "PYTHONUNBUFFERED": "1",
               # Stripe's limits are lifted at the sandbox; so is our own limiter.
               "BILLING_STRIPE_RATE_LIMIT_GLOBAL": "100000", "BILLING_STRIPE_RATE_LIMIT_ENDPOINT": "100000"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("BILLING_")})
        workers: list[subprocess.Popen] = []
        try:
            control = _wait_sandbox(sandbox_url)
            # The warm-up fills the workers' pools (a new connection costs a few statements of its own,
            # once) and their per-process caches, before anything is counted.
            warmup = min(1000, 4 * args.workers * args.concurrency)
            total = warmup + args.sample + args.charges
            print(f"seeding {total} customers with saved cards…", flush=True)
            ids = seed(total, base_url)
            warmup_ids, sample_ids = ids[:warmup], ids[warmup:warmup + args.sample]
            main_ids = ids[warmup + args.sample:]
            control.set_latency(args.latency_ms, args.latency_ms * 3)
            _pg_log(base_url, statements=True)
            for i in range(args.workers):
                log = open(data / f"worker-{i}.log", "wb")
                cmd = [sys.executable, "-m", "billing.cli", "worker", "--concurrency", str(args.concurrency)]
                if args.pool == "gevent":
                    cmd = [sys.executable, "-c", GEVENT_WORKER, str(args.concurrency)]
                workers.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            _wait_ready(data, args.workers)
            server_log = data / "postgres" / "server.log"
            publish(warmup_ids)
            _wait_decided(base_url, warmup_ids, args.timeout)
            time.sleep(0.5)
            before = _count_statements(server_log)
            print(f"{args.pool}: {args.workers} worker(s) × {args.concurrency}, {args.latency_ms:.0f} ms median "
                  f"latency; sample of {args.sample} charges with statement logging…", flush=True)
            publish(sample_ids)
            _wait_decided(base_url, sample_ids, args.timeout)
            time.sleep(0.5)
            round_trips = (_count_statements(server_log, args.statements_out, skip=before)
                           - before) / len(sample_ids)
            _pg_log(base_url, statements=False)

            pids = [w.pid for w in workers]
            print(f"main batch of {args.charges} charges, logging off (worker pids {pids})…", flush=True)
            cpu0 = _cpu_seconds(pids)
            others = {"sandbox": [sandbox.pid], "PostgreSQL": [_postmaster(data)], "Redis": _redis_pids(redis_url)}
            others0 = {name: _tree_cpu(p) for name, p in others.items()}
            machine0 = _machine_busy_seconds()
            started = time.monotonic()
            threading.Thread(target=publish, args=(main_ids,), daemon=True).start()
            rss_1k = _wait_decided(base_url, main_ids, args.timeout, pids=pids,
                                   rss_after=max(0, 1000 - len(sample_ids) - len(warmup_ids)))
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds(pids) - cpu0
            machine = _machine_busy_seconds() - machine0
            others_cpu = {name: _tree_cpu(p) - others0[name] for name, p in others.items()}
            rss_end = _rss_mb(pids)
            steady, statuses = _steady_rate(base_url, main_ids)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    w.kill()
            sandbox.terminate()
            sandbox.wait(30)
            embedded.stop(data)

    n = len(main_ids)
    cpu_ms = cpu * 1000 / n
    growth = max(b - a for a, b in zip(rss_1k, rss_end, strict=True)) if rss_1k else float("nan")
    print(f"outcomes:                        {statuses}")
    print(f"round trips per charge (server): {round_trips:.2f}   goal ≤ {GOAL_ROUND_TRIPS:.0f}: "
          f"ratio {round_trips / GOAL_ROUND_TRIPS:.2f}")
    print(f"worker CPU per charge:           {cpu_ms:.2f} ms   goal ≤ {GOAL_CPU_MS:.0f} ms: "
          f"ratio {cpu_ms / GOAL_CPU_MS:.2f}")
    print(f"charges/s (steady, limits off):  {steady:.1f}   goal ≥ {GOAL_RATE:.0f}: ratio {steady / GOAL_RATE:.2f}"
          f"   ({n / elapsed:.1f}/s over the whole batch, {elapsed:.1f} s)")
    print(f"worker RSS at 1k / at the end:   {_fmt(rss_1k)} / {_fmt(rss_end)} MB   growth ≤ "
          f"{GOAL_RSS_GROWTH_MB:.0f} MB: ratio {growth / GOAL_RSS_GROWTH_MB:.2f}")
    print("other CPU per charge:            " + ", ".join(f"{name} {sec * 1000 / n:.2f} ms"
                                                     for name, sec in others_cpu.items()))
    print(f"machine CPU per charge:          {machine * 1000 / n:.2f} ms   (every process on the machine)")


# --- setup ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_sandbox(url: str):
    from sandbox.testing import Control

    control = Control(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            control.requests()
            return control
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def seed(total: int, db_url: str) -> list[int]:
    """Customers and cards at the sandbox, then their subscriptions and first charges by SQL, so the
    bench depends on nothing but the charge task."""
    from billing.stripe_gateway import get_gateway

    gw = get_gateway()

    def one(i: int):
        cus = gw.create_customer(email=f"bench{i}@example.com", name=f"Bench {i}", idempotency_key=f"bench-cus-{i}")
        card = gw.attach_payment_method("pm_card_visa", cus)
        return i, cus, card.payment_method_id, card.fingerprint

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(one, range(total)))
    due = datetime.now(UTC) - timedelta(minutes=1)
    ids = []
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn, conn.cursor() as cur:
        for i, cus, pm, fp in rows:
            cid, pmid = insert_enrolled_customer(cur, i, cus, pm, fp)
            sid = cur.execute("INSERT INTO subscriptions (customer_id, payment_method_id, amount, currency, interval, "
                              "interval_count, anchor_at, next_period_index, next_charge_at, status, "
                              "current_period_start, current_period_end) "
                              "VALUES (%s, %s, 1999, 'eur', 'month', 1, %s, 1, %s, 'active', %s, %s) RETURNING id",
                              (cid, pmid, due, due + timedelta(days=30), due, due + timedelta(days=30))).fetchone()[0]
            ids.append(cur.execute("INSERT INTO charges (subscription_id, period_index, period_start, period_end, "
                                   "amount, currency, status, attempts) VALUES (%s, 0, %s, %s, 1999, 'eur', "
                                   "'pending', 0) RETURNING id", (sid, due, due + timedelta(days=30))).fetchone()[0])
        conn.commit()
    return ids


def _pg_log(db_url: str, *, statements: bool) -> None:
    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_line_prefix = '%a|'")
        conn.execute(f"ALTER SYSTEM SET log_statement = '{'all' if statements else 'none'}'")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)


def _count_statements(server_log: Path, out: Path | None = None, skip: int = 0) -> int:
    """Statements the server ran for the workers: ``statement:`` (simple protocol: BEGIN, COMMIT, …) and
    ``execute`` (extended protocol) lines; a statement logged on several lines counts once. With
    ``out``, the statements after the first ``skip`` are written there (their first line)."""
    n = 0
    prefix = f"{APP_NAME}|LOG:  "
    sink = open(out, "w") if out else None
    with open(server_log, errors="replace") as f:
        for line in f:
            if line.startswith(prefix) and line[len(prefix):].startswith(("statement:", "execute")):
                n += 1
                if sink and n > skip:
                    sink.write(line[len(prefix):][:160].rstrip() + "\n")
    if sink:
        sink.close()
    return n


def _wait_ready(data: Path, count: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        logs = [(data / f"worker-{i}.log").read_text(errors="replace") for i in range(count)]
        if all(" ready." in log for log in logs):
            return
        time.sleep(0.3)
    raise SystemExit("the workers did not start:\n" + "\n".join(logs))


# --- the run -------------------------------------------------------------------------------------------

def publish(charge_ids: list[int]) -> None:
    from workers.tasks import charge_attempt

    for charge_id in charge_ids:
        charge_attempt.delay(charge_id)


def _wait_decided(db_url: str, ids: list[int], timeout: float, *, pids: list[int] | None = None,
                  rss_after: int | None = None) -> list[float]:
    """Poll until no charge of ``ids`` is pending/processing; RSS of ``pids`` once ``rss_after`` are decided."""
    deadline = time.monotonic() + timeout
    rss: list[float] = []
    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        while True:
            open_ = conn.execute("SELECT count(*) FROM charges WHERE id = ANY(%s) AND status IN "
                                 "('pending', 'processing')", (ids,)).fetchone()[0]
            if pids and rss_after is not None and not rss and len(ids) - open_ >= rss_after:
                rss = _rss_mb(pids)
            if open_ == 0:
                return rss
            if time.monotonic() > deadline:
                raise SystemExit(f"{open_} charges still undecided after {timeout:.0f} s")
            time.sleep(0.1)


def _steady_rate(db_url: str, ids: list[int]) -> tuple[float, dict[str, int]]:
    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        paid = [r[0] for r in conn.execute("SELECT paid_at FROM charges WHERE id = ANY(%s) AND paid_at IS NOT NULL "
                                           "ORDER BY paid_at", (ids,))]
        statuses = dict(conn.execute("SELECT status, count(*) FROM charges WHERE id = ANY(%s) GROUP BY status",
                                     (ids,)).fetchall())
    if len(paid) < 10:
        return 0.0, statuses
    lo, hi = paid[len(paid) // 10], paid[len(paid) * 9 // 10]
    span = (hi - lo).total_seconds()
    return ((len(paid) * 9 // 10 - len(paid) // 10) / span if span > 0 else 0.0), statuses


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK
    return total


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _tree_cpu(pids: list[int]) -> float:
    """CPU of processes and their descendants: live ones read directly, reaped ones through cutime."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                continue
    total, todo = 0.0, list(pids)
    while todo:
        pid = todo.pop()
        try:
            f = _stat(pid)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15]) / TICK
        todo.extend(children.get(pid, []))
    return total


def _postmaster(data: Path) -> int:
    return int((data / "postgres" / "postmaster.pid").read_text().splitlines()[0])


def _redis_pids(redis_url: str) -> list[int]:
    """Redis renames its process to ``redis-server 127.0.0.1:<port>``: found by its port."""
    marker = ":" + redis_url.rsplit(":", 1)[1].split("/")[0]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                words = cmdline.replace("\0", " ").split()
                if words and words[0].endswith("redis-server") and any(w.endswith(marker) for w in words):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK


def _rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out.append(int(line.split()[1]) / 1024)
    return out


def _fmt(values: list[float]) -> str:
    return "+".join(f"{v:.1f}" for v in values) if values else "n/a"


if __name__ == "__main__":
    main()
