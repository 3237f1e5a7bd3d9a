"""Safe by default: servers listen on loopback only, and the team server's basic-auth app refuses strangers."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import mlflow
import pytest
from conftest import TrackingServer, assert_loopback_only, outside_addresses

ADMIN_PASSWORD = "correct-horse-battery"


def status(url: str, user: str = "", password: str = "") -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_the_basic_auth_server_refuses_unauthenticated_requests(tmp_path, monkeypatch, empty_store):
    config = tmp_path / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server = TrackingServer(tmp_path / "server", empty_store, app_name="basic-auth",
                            env={"MLFLOW_AUTH_CONFIG_PATH": str(config),
                                 "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-only-secret"}).start()
    try:
        search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(search) == 401
        assert status(search, "admin", "wrong password") == 401
        assert status(search, "admin", ADMIN_PASSWORD) == 200

        # The project's clients authenticate through MLflow's standard variables.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment("team")
        with mlflow.start_run() as run:
            mlflow.log_metric("test_accuracy", 0.5)
        assert mlflow.get_run(run.info.run_id).data.metrics == {"test_accuracy": 0.5}
        if outside_addresses():
            assert_loopback_only(server.port)
    finally:
        server.stop()


def test_loopback_check_sees_an_outside_address():
    """The binding checks above and in test_registry are only as good as this."""
    if not outside_addresses():
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert all(not a.startswith("127.") for a in outside_addresses())
    assert json.dumps(outside_addresses())
