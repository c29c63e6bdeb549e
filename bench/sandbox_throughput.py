"""Throughput of the Stripe sandbox under latency.

Starts ``python -m sandbox`` with a 300 ms median latency and rate limits lifted, then drives
PaymentIntent create + confirm pairs from many concurrent raw-HTTP clients for a bounded time and
prints requests per second. The client side speaks HTTP/1.1 over asyncio streams directly
(see ``Connection``).

    python bench/sandbox_throughput.py [--concurrency 400] [--seconds 10] [--latency-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlencode

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connection:
    """A minimal keep-alive HTTP/1.1 client. httpx's pool, not the sandbox, caps out at a few hundred
    requests/s with hundreds of concurrent connections, so the bench speaks HTTP directly."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, form: dict[str, str]) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        body = urlencode(form).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer sk_test_bench\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length")
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(port: int, concurrency: int, seconds: float) -> tuple[int, int, float]:
    ok = errors = 0
    setup = Connection("127.0.0.1", port)
    _, cus = await setup.post("/v1/customers", {"email": "bench@example.com"})
    setup.close()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal ok, errors
        conn = Connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                status, pi = await conn.post("/v1/payment_intents", {
                    "amount": "1000", "currency": "eur", "customer": cus["id"], "payment_method": "pm_card_visa"})
                if status != 200:
                    errors += 1
                    continue
                ok += 1
                status, _ = await conn.post(f"/v1/payment_intents/{pi['id']}/confirm", {})
                if status == 200:
                    ok += 1
                else:
                    errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=400)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--latency-ms", type=float, default=300.0)
    a = p.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", str(port), "--latency-median-ms",
                             str(a.latency_ms), "--rate-global", "0", "--rate-endpoint", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(base + "/_sandbox/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        ok, errors, elapsed = asyncio.run(drive(port, a.concurrency, a.seconds))
        counters = httpx.get(base + "/_sandbox/requests").json()
        print(f"latency median {a.latency_ms:.0f} ms, concurrency {a.concurrency}, {elapsed:.1f} s")
        print(f"ok {ok}, errors {errors}, max in flight {counters['max_in_flight']}")
        print(f"throughput: {ok / elapsed:.0f} requests/s")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
