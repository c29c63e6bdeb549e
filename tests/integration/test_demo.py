"""`billing demo` runs the whole story on embedded defaults and stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import httpx
import psutil

from tests.integration.conftest import ROOT, billing_command, wait_until


def _our_children_left(before: set[int]) -> list[str]:
    me = psutil.Process()
    return [" ".join(p.cmdline()[:3]) for p in psutil.process_iter() if p.pid not in before
            and p.pid != me.pid and any("demo" in part for part in _safe_cmdline(p))]


def _safe_cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.Error, OSError):
        return []


def test_demo_runs_end_to_end_with_nothing_configured_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "TEST_"))}
    env["BILLING_DATA_DIR"] = str(tmp_path / "data")  # keep the developer's own .billing/ out of it
    before = {p.pid for p in psutil.process_iter()}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*billing_command(), "demo"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: "Press Ctrl-C" in log_path.read_text() or proc.poll() is not None, timeout=240,
                   interval=0.5, message="the demo to tell its story")
        out = log_path.read_text()
        assert proc.poll() is None, out[-3000:]
        # The web app stays up with the finance console.
        console = out.split("Finance console", 1)[1].split()[0]
        assert httpx.get(console.replace("/finance/", "/healthz"), timeout=10).status_code == 200
        # The printed key and curl line work; without the key the API refuses.
        key = re.search(r"^ +API key +(bk_\S+)", out, re.MULTILINE).group(1)
        example = re.search(rf"curl -H 'Authorization: Bearer {re.escape(key)}' (\S+)$", out, re.MULTILINE).group(1)
        assert httpx.get(example, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        assert httpx.get(example, timeout=10).status_code == 401
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert "Billing cycle 1" in out and "Billing cycle 2" in out
    assert "authentication_required" in out and "lost_card" in out and "insufficient_funds" in out
    assert "(previous authorization)" in out
    assert "/recover/" in out and "email(s) sent by SMTP" in out
    assert "the charge is paid; the new card" in out  # one recovery completed through the page's calls
    assert "login finance@demo.example" in out
    assert "Stopped everything the demo started." in out
    # The embedded servers ran under the data dir given, not the machine's own services.
    assert (tmp_path / "data" / "demo" / "logs" / "worker.log").exists()
    assert _our_children_left(before) == []
