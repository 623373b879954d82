"""The temporary Prefect server the command line starts before importing Prefect.

With DIRIMAGE_SERVER_IDLE_TIMEOUT=0, as the suite sets it, the server serves the
runs of one command when no API URL is configured and stops with the command
(even when the command is killed). It stays out of the way when an API URL is
configured in the environment or in the active Prefect profile. The shared
server, the default, has tests of its own in test_shared_server.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import temporary_server

REPOSITORY = Path(__file__).resolve().parents[1]
HELLO = REPOSITORY / "tests" / "data" / "hello"

# Runs `dirimage` in-process so that the test can see which server it used.
RUN_COMMAND = """
import json, os, sys
from flows import cli, temporary_server

launched = []
real_launch = temporary_server.launch

def launch(verbose=False):
    server = real_launch(verbose)
    launched.append(server)
    return server

temporary_server.launch = launch
status = cli.main(sys.argv[1:])
server = launched[0] if launched else None
print(json.dumps({
    "status": status,
    "api_url": os.environ.get("PREFECT_API_URL"),
    "server_url": server.api_url if server else None,
    "server_pid": server.process.pid if server else None,
}))
"""

# Starts a temporary server, reports it, and waits to be killed.
HOLD_SERVER = """
import json, sys, time
from flows import temporary_server

server = temporary_server.launch()
url = server.wait_until_ready(120)
print(json.dumps({"pid": server.process.pid, "url": url}), flush=True)
time.sleep(600)
"""


def clean_environment(prefect_home: Path) -> dict[str, str]:
    """The caller's environment without Prefect settings, and a new Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(prefect_home)
    env["PYTHONPATH"] = str(REPOSITORY)
    return env


def run_command(args: list[str], env: dict[str, str]) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", RUN_COMMAND, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def gone(pid: int, within: float) -> bool:
    """Whether process `pid` has ended (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_command_without_api_url_runs_on_its_own_server(tmp_path):
    destination = tmp_path / "copy"

    report, stderr = run_command(
        ["copy", str(HELLO), str(destination)],
        clean_environment(tmp_path / "home"),
    )

    assert report["status"] == 0, stderr
    assert report["server_url"] is not None
    assert report["api_url"] == report["server_url"]
    assert (destination / "manifest.json").read_bytes() == (
        HELLO / "manifest.json"
    ).read_bytes()
    assert gone(report["server_pid"], within=5), "the temporary server outlived it"


def test_the_server_stops_when_the_command_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SERVER],
        env=clean_environment(tmp_path / "home"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        report = json.loads(holder.stdout.readline())
        assert report["url"] is not None
        assert not gone(report["pid"], within=0.5)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)

        assert gone(report["pid"], within=30), "the server outlived a killed command"
    finally:
        holder.kill()
        holder.wait()


def test_an_api_url_in_the_profile_is_used(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        'active = "mirror"\n\n[profiles.mirror]\n'
        f'PREFECT_API_URL = "{PREFECT_API_URL.value()}"\n'
    )
    env = clean_environment(tmp_path / "home")
    env["PREFECT_PROFILES_PATH"] = str(profiles)
    destination = tmp_path / "copy"

    report, stderr = run_command(["copy", str(HELLO), str(destination)], env)

    assert report["status"] == 0, stderr
    assert report["api_url"] is None
    assert gone(report["server_pid"], within=5)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    destinations = [run.parameters.get("destination") for run in runs]
    assert str(destination) in destinations


def test_no_api_url_and_no_temporary_servers_allowed_is_one_line(tmp_path):
    env = clean_environment(tmp_path / "home")
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"

    report, stderr = run_command(["copy", str(HELLO), str(tmp_path / "copy")], env)

    assert report["status"] == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "PREFECT_API_URL" in lines[0], stderr
    assert not (tmp_path / "copy").exists()


def test_none_is_started_when_the_environment_names_a_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")

    assert temporary_server.launch() is None


def pipe_watcher(exits_at_once: bool) -> temporary_server.TemporaryServer:
    """A child that behaves like the server towards its pipes, and serves nothing:
    it exits at once without a report, or reports nothing and waits for its end
    of the watched pipe."""
    watched, parent_pipe = os.pipe()
    report_pipe, report_end = os.pipe()
    code = "import os, sys\n" + (
        "sys.exit(3)" if exits_at_once else "os.read(int(sys.argv[1]), 1)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(watched)], pass_fds=(watched, report_end)
    )
    os.close(watched)
    os.close(report_end)
    return temporary_server.TemporaryServer(process, report_pipe, parent_pipe)


def test_a_server_that_exits_is_not_waited_for():
    server = pipe_watcher(exits_at_once=True)

    started = time.monotonic()
    assert server.wait_until_ready(timeout=60) is None
    assert time.monotonic() - started < 30


def test_a_server_that_never_answers_is_stopped():
    server = pipe_watcher(exits_at_once=False)

    assert server.wait_until_ready(timeout=0.5) is None
    assert server.process.returncode == 0
    server.stop()  # a second stop does nothing


@pytest.mark.parametrize("command", ["verify", "delete"])
def test_other_flow_commands_use_it_too(tmp_path, command):
    target = tmp_path / "image"
    subprocess.run(["cp", "-r", str(HELLO), str(target)], check=True)

    report, stderr = run_command(
        [command, str(target)], clean_environment(tmp_path / "home")
    )

    assert report["status"] == 0, stderr
    assert report["server_url"] is not None
    assert report["api_url"] == report["server_url"]
    assert target.exists() == (command == "verify")
