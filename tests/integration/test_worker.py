"""A real ``billing worker`` process takes tasks from the test Redis and runs them."""

from __future__ import annotations

from tests.integration.conftest import wait_until


def test_worker_runs_a_billing_run_and_survives_a_kill(worker):
    from workers.tasks import run_billing

    run_billing.delay()
    wait_until(lambda: "workers.tasks.run_billing" in worker.log() and "succeeded" in worker.log(),
               message="the worker to run the billing run")
    assert "(thread)" in worker.log()  # the threads pool: charging waits on I/O

    first_pid = worker.pid
    worker.restart(kill=True)
    assert worker.pid != first_pid and worker.alive()
    run_billing.delay()
    wait_until(lambda: "succeeded" in worker.log(), message="the restarted worker to run a task")
