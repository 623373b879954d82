"""Processes for end-to-end tests: start, stop by PID, and talk to a Prefect server.

`PrefectServer` wraps the REST calls the tests make (the same ones the UI makes);
`client_env` is the environment every process gets that talks to the server.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

SERVER_START_TIMEOUT = 240
SERVE_START_TIMEOUT = 120
RUN_TIMEOUT = 240
STOP_TIMEOUT = 30
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
VENV_BIN = Path(sys.executable).parent


SERVICE_UNAVAILABLE_TRIES = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def executable(name: str) -> str:
    """A console script from the test's virtualenv, or from PATH."""
    candidate = VENV_BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed in {VENV_BIN} nor on PATH")
    return found


def start_process(
    command: list[str], log_path: Path, env: dict, cwd: Path | str | None = None
) -> subprocess.Popen:
    """Start `command` in its own session, output to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or log_path.parent,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen, group: bool = True) -> int | None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit status.

    With `group`, signals go to the whole session the process leads (flow runs
    started by a runner or worker included); otherwise SIGTERM goes to the
    process alone and only the SIGKILL fallback takes the group.
    """
    if process.poll() is None:
        try:
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    returncode = process.poll()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if returncode is None:
        process.wait(timeout=STOP_TIMEOUT)
    return returncode


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} was not written)"


@dataclass
class PrefectServer:
    """A running Prefect server and a small client for the REST calls tests make."""

    url: str
    home: Path
    log_path: Path
    env: dict
    http: httpx.Client = field(repr=False)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send a request, trying again while the server answers 503.

        A server on SQLite answers 503 while its database is locked by its own
        services; Prefect's client and UI try again, and so do the tests.
        """
        for _ in range(SERVICE_UNAVAILABLE_TRIES - 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code != 503:
                return response
            time.sleep(1)
        return self.http.request(method, path, **kwargs)

    def deployment(self, flow_name: str, deployment_name: str) -> dict | None:
        response = self.request(
            "GET", f"/deployments/name/{flow_name}/{deployment_name}"
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def create_flow_run(self, deployment_id: str, **body) -> httpx.Response:
        """What the UI's Run button sends; returns the raw response."""
        return self.request(
            "POST", f"/deployments/{deployment_id}/create_flow_run", json=body
        )

    def flow_run(self, flow_run_id: str) -> dict:
        response = self.request("GET", f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return response.json()

    def flow_runs(self, deployment_id: str) -> list[dict]:
        response = self.request(
            "POST",
            "/flow_runs/filter",
            json={"deployments": {"id": {"any_": [deployment_id]}}},
        )
        response.raise_for_status()
        return response.json()

    def task_runs(self, flow_run_id: str) -> list[dict]:
        response = self.request(
            "POST",
            "/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
        )
        response.raise_for_status()
        return response.json()

    def artifacts(self, flow_run_id: str) -> list[dict]:
        response = self.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
        )
        response.raise_for_status()
        return response.json()

    def table_rows(self, flow_run_id: str) -> list[dict]:
        """The rows of the run's table artifact (the copy summary)."""
        tables = [
            artifact
            for artifact in self.artifacts(flow_run_id)
            if artifact["type"] == "table"
        ]
        assert len(tables) == 1, f"expected one table artifact, found {tables}"
        data = tables[0]["data"]
        return json.loads(data) if isinstance(data, str) else data

    def work_pool(self, name: str) -> dict | None:
        response = self.request("GET", f"/work_pools/{name}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def wait_for_run(
        self, flow_run_id: str, timeout: float = RUN_TIMEOUT, log_path=None
    ) -> dict:
        """Poll until the run reaches a final state; returns the run."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            if run["state_type"] in FINAL_STATES:
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {flow_run_id} still {run['state_type']} after "
                    f"{timeout} s; log:\n{tail(log_path) if log_path else ''}"
                )
            time.sleep(0.5)

    def wait_for_deployment(
        self, flow_name: str, deployment_name: str, process, log_path: Path
    ) -> dict:
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        while time.monotonic() < deadline:
            found = self.deployment(flow_name, deployment_name)
            if found is not None:
                return found
            if process.poll() is not None:
                pytest.fail(
                    f"process exited with {process.returncode} before it registered "
                    f"{flow_name}/{deployment_name}:\n{tail(log_path)}"
                )
            time.sleep(0.5)
        pytest.fail(
            f"{flow_name}/{deployment_name} not registered after "
            f"{SERVE_START_TIMEOUT} s:\n{tail(log_path)}"
        )


def client_env(home: Path, api_url: str) -> dict:
    """Environment for processes that talk to the test server."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_")
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Poll every second instead of every ten: runs start promptly.
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="2",
    )
    return env


@dataclass
class ServeProcess:
    """A running `dirimage serve`."""

    process: subprocess.Popen
    log_path: Path
    name: str

    def stop(self) -> int | None:
        """SIGTERM to the serve process alone, as a service manager sends it."""
        return stop_process(self.process, group=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
