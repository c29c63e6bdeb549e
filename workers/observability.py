"""Celery's side of logging: its loggers go through :func:`billing.logs.configure` like everything else.

Connecting a ``setup_logging`` receiver tells Celery to leave logging alone (it neither hijacks the
root logger nor redirects stdout), so ``billing worker`` and ``billing beat`` write the same JSON lines
as ``billing web``. Celery's startup banner is printed, not logged; in JSON mode it is switched off
(``--quiet``) and its essentials logged as one line instead. Lines written while a task runs carry
``task_id`` and ``task_name``.
"""

from __future__ import annotations

import logging

from celery import signals
from celery._state import get_current_task

from billing import logs

log = logging.getLogger("workers")


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        task = get_current_task()
        if task is not None and task.request.id and not hasattr(record, "task_id"):
            record.task_id = task.request.id
            record.task_name = task.name
        return True


def _configure(loglevel) -> None:
    logs.configure(level=loglevel or logging.INFO, default_format="json")
    for handler in logging.getLogger().handlers:
        handler.addFilter(TaskContextFilter())


def setup_logging(loglevel: str) -> str:
    """Configure logging now (for lines before Celery starts) and again when Celery asks; returns the
    format in use, ``json`` or ``text``."""
    fmt = logs.resolve_format("json")
    _configure(loglevel)

    def on_setup_logging(loglevel=None, **_kwargs) -> None:
        _configure(loglevel)

    def on_after_setup(sender=None, instance=None, **_kwargs) -> None:
        if fmt == "json" and instance is not None:
            pool = getattr(instance.pool_cls, "__module__", str(instance.pool_cls)).rsplit(".", 1)[-1]
            log.info("worker %s starting: concurrency %s (%s), queues %s", sender, instance.concurrency,
                     "thread" if pool == "thread" else pool, ", ".join(sorted(instance.app.amqp.queues)),
                     extra={"hostname": sender, "concurrency": instance.concurrency, "pool": pool})

    signals.setup_logging.connect(on_setup_logging, weak=False)
    signals.celeryd_after_setup.connect(on_after_setup, weak=False)
    return fmt
