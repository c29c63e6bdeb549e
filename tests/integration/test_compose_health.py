"""docker-compose.yml's restart policies and healthchecks match what the processes do: they ride out
dependency restarts and exit non-zero only on errors they cannot recover from (restarted unless an operator
stopped them), and their healthchecks are the probes that tell the truth (/healthz, the heartbeat files)."""

from __future__ import annotations

from tests.integration.test_deploy_files import compose_config


def test_long_running_services_restart_and_check_their_real_health(tmp_path):
    services = compose_config(tmp_path)["services"]
    for name in ("web", "worker", "beat", "postgres", "redis"):
        assert services[name]["restart"] == "unless-stopped", name
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "billing", "worker", "--health"]
    assert services["beat"]["healthcheck"]["test"] == ["CMD", "billing", "beat", "--health"]
    # The image's working directory is not writable by its user: the heartbeats go to /tmp.
    assert services["worker"]["environment"]["BILLING_WORKER_HEALTH_FILE"].startswith("/tmp/")
    assert services["beat"]["environment"]["BILLING_BEAT_HEALTH_FILE"].startswith("/tmp/")
    for name in ("web", "worker", "beat"):
        assert services[name]["healthcheck"].get("start_period"), name
