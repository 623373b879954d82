"""End-to-end fixtures: a real `prefect server start`, and `dirimage serve` on it.

The server listens on 127.0.0.1 at a free port with its own PREFECT_HOME (so its
SQLite database is private), and is stopped by PID when the session ends. Every
process a test starts gets `PrefectServer.env`: that server's API, the same home,
and short polling intervals so runs start within a second or two.
"""

import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serverkit import (
    SERVER_START_TIMEOUT,
    PrefectServer,
    ServeProcess,
    client_env,
    executable,
    free_port,
    start_process,
    stop_process,
    tail,
)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1, for the whole session."""
    folder = tmp_path_factory.mktemp("prefect-server")
    home = folder / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    server_env = client_env(home, f"{url}/api")
    del server_env["PREFECT_API_URL"]
    server_env.update(
        # Schedule runs of new interval deployments within a second or two.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        # The UI's pages call this address; by default it would be port 4200.
        PREFECT_SERVER_UI_API_URL=f"{url}/api",
    )
    log_path = folder / "server.log"
    process = start_process(
        [
            executable("prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log_path,
        server_env,
    )
    http = httpx.Client(base_url=f"{url}/api", timeout=30)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"prefect server exited with {process.returncode}:\n"
                    + tail(log_path)
                )
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server not healthy after {SERVER_START_TIMEOUT} s:\n"
                    + tail(log_path)
                )
            time.sleep(0.5)
        yield PrefectServer(
            url=url,
            home=home,
            log_path=log_path,
            env=client_env(home, f"{url}/api"),
            http=http,
        )
    finally:
        http.close()
        stop_process(process)


@contextmanager
def serve_starter(prefect_server: PrefectServer, folder: Path):
    """Yield `start(name, *args)`; stops every process it started on exit."""
    started: list[ServeProcess] = []

    def start(name: str, *args: str) -> ServeProcess:
        log_path = folder / f"serve-{name}.log"
        process = start_process(
            [executable("dirimage"), "serve", "--name", name, *args],
            log_path,
            prefect_server.env,
        )
        served = ServeProcess(process, log_path, name)
        started.append(served)
        prefect_server.wait_for_deployment("copy-image", name, process, log_path)
        return served

    try:
        yield start
    finally:
        for served in started:
            stop_process(served.process)


@pytest.fixture
def dirimage_serve(prefect_server, tmp_path):
    """Start `dirimage serve --name NAME ARGS...`; returns a ServeProcess.

    Waits until the copy-image deployment is registered. Every process started
    is stopped when the test ends.
    """
    with serve_starter(prefect_server, tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def served_copy(prefect_server, tmp_path_factory):
    """One `dirimage serve --name serve` (no defaults, no schedule) per module.

    The deployments get the name plain `dirimage serve` gives them, so examples
    that start `copy-image/serve` run unchanged. Returns the ServeProcess and
    the copy-image deployment it registered.
    """
    with serve_starter(prefect_server, tmp_path_factory.mktemp("serve")) as start:
        served = start("serve")
        yield served, prefect_server.deployment("copy-image", "serve")
