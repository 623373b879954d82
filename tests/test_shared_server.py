"""The local Prefect server that commands share when no API URL is configured.

The first command starts it; later commands with the same Prefect home and
settings find it and run at once. It outlives them by DIRIMAGE_SERVER_IDLE_TIMEOUT
seconds of disuse, never stops under a running command, answers only those who
know its password, lets go of the first command's pipes and folder, and records
the task runs of a local Dask cluster's workers. (The rest of the suite sets
the timeout to 0: one server per command.)
"""

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import prefectapi
from flows import temporary_server

REPOSITORY = Path(__file__).resolve().parents[1]
HELLO = REPOSITORY / "tests" / "data" / "hello"
TIMEOUT = 300

# Runs `dirimage` in-process and reports how it reached its server.
RUN_COMMAND = """
import json, sys
from flows import cli, temporary_server

launched = []
real_launch = temporary_server.launch

def launch(verbose=False):
    launched.append(real_launch(verbose))
    return launched[-1]

temporary_server.launch = launch
status = cli.main(sys.argv[1:])
print(json.dumps({
    "status": status,
    "child_started": launched[-1].process is not None,
    "shared": launched[-1].shared,
    "url": launched[-1].api_url,
}))
"""

# Has the child find the running server, which then retires, as far as this
# command can tell, before the command takes its lease; reports what it saw.
RETIRED_BEFORE_THE_LEASE = """
import json, os, pathlib
from flows import cli, temporary_server

reports = []
real_hold_lease = temporary_server.TemporaryServer._hold_lease

def retired_before_the_lease(self, report):
    # What a retiring server does under the registry lock: remove its record.
    reports.append(report)
    if len(reports) == 1:
        os.unlink(pathlib.Path(report["home"]) / temporary_server.RECORD_NAME)
    return real_hold_lease(self, report)

temporary_server.TemporaryServer._hold_lease = retired_before_the_lease
cli._prepare_prefect(verbose=False)
server = temporary_server.launch()
url = server.wait_until_ready(120)  # no settings: the child looks
print(json.dumps([reports, url]))
"""

# Starts a server (or finds one), reports it, and holds it until killed.
HOLD_SERVER = """
import json, sys, time
from flows import temporary_server

server = temporary_server.launch()
url = server.wait_until_ready(120)
print(json.dumps({"url": url}), flush=True)
time.sleep(600)
"""


@pytest.fixture
def home(tmp_path):
    """A Prefect home whose shared server, if any, is killed at the end."""
    home = tmp_path / "home"
    home.mkdir()
    started: list[int] = []
    yield home
    record = read_record(home)
    if record:
        started.append(record["pid"])
    for pid in started:
        if temporary_server._is_our_server(pid):
            os.kill(pid, signal.SIGKILL)


def environment(home: Path, idle_timeout: float, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PYTHONPATH=str(REPOSITORY),
        DIRIMAGE_SERVER_IDLE_TIMEOUT=str(idle_timeout),
        **extra,
    )
    return env


def run(command: list, env, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def dirimage(*arguments, env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flows.cli", *arguments], env)


def copy_hello(destination: Path, env) -> None:
    completed = dirimage("copy", HELLO, destination, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (destination / "manifest.json").read_bytes() == (
        HELLO / "manifest.json"
    ).read_bytes()


def read_record(home: Path) -> dict | None:
    return temporary_server._read_record(home)


def alive(pid: int) -> bool:
    return temporary_server._is_our_server(pid)


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def flow_runs_status(record: dict, auth: str | None) -> int:
    """Status of a request that lists flow runs, with or without the password."""
    request = urllib.request.Request(
        f"{record['url']}/flow_runs/filter", data=b"{}", method="POST"
    )
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        token = base64.b64encode(auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_commands_share_one_server_that_outlives_them(home, tmp_path):
    env = environment(home, idle_timeout=600)

    copy_hello(tmp_path / "first", env)
    record = read_record(home)
    assert record is not None and alive(record["pid"])

    completed = run(
        [sys.executable, "-c", RUN_COMMAND, "copy", HELLO, tmp_path / "second"], env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    second = json.loads(completed.stdout.splitlines()[-1])

    assert second["status"] == 0
    assert second["shared"] and second["url"] == record["url"]
    # It found the server itself, without a child to import Prefect again.
    assert not second["child_started"]
    assert read_record(home) == record
    assert alive(record["pid"])
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(record["url"], auth_string=record["auth"]) as client:
        runs = client.read_flow_runs()
    destinations = {run.parameters.get("destination") for run in runs}
    assert {str(tmp_path / "first"), str(tmp_path / "second")} <= destinations


def test_only_requests_with_its_password_are_answered(home, tmp_path):
    copy_hello(tmp_path / "copy", environment(home, idle_timeout=600))
    record = read_record(home)

    assert flow_runs_status(record, auth=None) == 401
    assert flow_runs_status(record, auth="guess") == 401
    assert flow_runs_status(record, auth=record["auth"]) == 200
    mode = stat.S_IMODE(os.stat(home / temporary_server.RECORD_NAME).st_mode)
    assert mode == 0o600


def test_an_idle_server_stops_and_removes_its_record(home, tmp_path):
    copy_hello(tmp_path / "copy", environment(home, idle_timeout=2))
    record = read_record(home)
    assert record is not None

    assert gone(record["pid"], within=60), "the idle server did not stop"
    assert read_record(home) is None
    log = home / temporary_server.LOG_NAME
    lines = log.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "waits for commands; stops once unused for 2 s",
        "stopped",
    ]
    assert all(f"pid {record['pid']}" in line for line in lines)
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def hold_server(env) -> subprocess.Popen:
    """A command that finds or starts the server and holds it until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SERVER], env=env, stdout=subprocess.PIPE, text=True
    )
    assert json.loads(holder.stdout.readline())["url"] is not None
    return holder


def test_a_running_command_keeps_it_up_and_a_killed_one_lets_it_go(home):
    env = environment(home, idle_timeout=1)
    starter = hold_server(env)
    pid = read_record(home)["pid"]
    user = hold_server(env)
    try:
        assert read_record(home)["pid"] == pid, "the second command did not share"
        starter.kill()
        starter.wait(timeout=30)

        # Several idle timeouts pass without a request: the lease alone holds it.
        assert not gone(pid, within=5), "the server stopped under a command"

        user.send_signal(signal.SIGKILL)
        user.wait(timeout=30)
        assert gone(pid, within=60), "the server outlived its last command"
    finally:
        for holder in (starter, user):
            holder.kill()
            holder.wait()


def test_a_verbose_command_ends_its_output_and_leaves_its_folder(home, tmp_path):
    env = environment(home, idle_timeout=600)
    folder = tmp_path / "work"
    folder.mkdir()

    # A server that kept the command's stderr would hold this run until it stops.
    completed = run(
        [sys.executable, "-m", "flows.cli", "copy", "-v", HELLO, "copy"], env, folder
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    pid = read_record(home)["pid"]
    assert alive(pid)
    deadline = time.monotonic() + 30
    while os.readlink(f"/proc/{pid}/cwd") != str(home):
        assert time.monotonic() < deadline, os.readlink(f"/proc/{pid}/cwd")
        time.sleep(0.1)


def test_other_server_settings_get_a_server_of_their_own(home, tmp_path):
    copy_hello(tmp_path / "first", environment(home, idle_timeout=600))
    first = read_record(home)

    other = environment(home, idle_timeout=600, PREFECT_SERVER_API_DEFAULT_LIMIT="50")
    try:
        copy_hello(tmp_path / "second", other)
        second = read_record(home)
        assert second["pid"] != first["pid"]
        assert second["url"] != first["url"]
    finally:
        os.kill(first["pid"], signal.SIGKILL)


def test_a_server_stopped_by_sigterm_removes_its_record(home, tmp_path):
    copy_hello(tmp_path / "copy", environment(home, idle_timeout=600))
    pid = read_record(home)["pid"]

    os.kill(pid, signal.SIGTERM)

    assert gone(pid, within=30)
    assert read_record(home) is None


def test_a_record_of_a_dead_server_is_not_trusted(home, tmp_path):
    env = environment(home, idle_timeout=600)
    copy_hello(tmp_path / "first", env)
    dead = read_record(home)
    os.kill(dead["pid"], signal.SIGKILL)
    assert gone(dead["pid"], within=30)

    copy_hello(tmp_path / "second", env)

    assert read_record(home)["pid"] != dead["pid"]


def test_stop_server_stops_it_unless_a_command_holds_it(home, tmp_path):
    env = environment(home, idle_timeout=600)
    holder = hold_server(env)
    try:
        pid = read_record(home)["pid"]

        refused = dirimage("stop-server", env=env)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "in use" in refused.stderr
        assert alive(pid)
    finally:
        holder.kill()
        holder.wait()

    stopped = dirimage("stop-server", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {pid}" in stopped.stdout
    assert gone(pid, within=30)
    assert read_record(home) is None
    log = (home / temporary_server.LOG_NAME).read_text()
    assert log.endswith(f"pid {pid}: stopped\n"), log

    again = dirimage("stop-server", env=env)
    assert again.returncode == 0 and "no local Prefect server" in again.stdout


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "1e9"])
def test_a_bad_idle_timeout_is_a_usage_error(home, tmp_path, value):
    env = environment(home, idle_timeout=0)
    env["DIRIMAGE_SERVER_IDLE_TIMEOUT"] = value

    completed = dirimage("copy", HELLO, tmp_path / "copy", env=env)

    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1
    assert "DIRIMAGE_SERVER_IDLE_TIMEOUT" in completed.stderr
    assert not (tmp_path / "copy").exists()


def test_a_flows_package_in_the_current_folder_is_not_what_runs(home, tmp_path):
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text("")
    (project / "flows" / "temporary_server.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('imported').touch()\n"
        "raise SystemExit(9)\n"
    )
    env = environment(home, idle_timeout=600)
    del env["PYTHONPATH"]

    installed = REPOSITORY / ".venv" / "bin" / "dirimage"
    completed = run([installed, "copy", HELLO, "copy"], env, project)

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not (project / "flows" / "imported").exists()
    record = read_record(home)
    assert record is not None and alive(record["pid"])


def test_a_waiting_server_is_not_used_when_temporary_servers_are_off(home, tmp_path):
    copy_hello(tmp_path / "first", environment(home, idle_timeout=600))
    env = environment(
        home, idle_timeout=600, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false"
    )

    completed = dirimage("copy", HELLO, tmp_path / "second", env=env)

    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1 and "PREFECT_API_URL" in completed.stderr
    assert not (tmp_path / "second").exists()


def test_a_server_that_retires_before_its_lease_is_replaced(home, tmp_path):
    env = environment(home, idle_timeout=600)
    copy_hello(tmp_path / "first", env)
    first = read_record(home)

    try:
        completed = run([sys.executable, "-c", RETIRED_BEFORE_THE_LEASE], env)
        assert completed.returncode == 0, completed.stderr[-3000:]
        reports, url = json.loads(completed.stdout.splitlines()[-1])

        assert [report.get("own", False) for report in reports] == [False, True]
        assert reports[0]["pid"] == first["pid"]
        assert url == reports[1]["url"] != first["url"]
        assert read_record(home)["pid"] == reports[1]["pid"]
    finally:
        os.kill(first["pid"], signal.SIGKILL)


def test_blob_tasks_on_a_local_dask_cluster_report_to_the_server(home, tmp_path):
    destination = tmp_path / "copy"
    command = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "copy", "--runner", "dask"]
        + [str(HELLO), str(destination)],
        env=environment(home, idle_timeout=600),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = command.communicate(timeout=TIMEOUT)
    assert command.returncode == 0, stderr[-3000:]
    record = read_record(home)

    # The workers are processes of their own, which must know the server's
    # password: without it, their task runs would never reach the server.
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        temporary_settings,
    )

    server = {PREFECT_API_URL: record["url"], PREFECT_API_AUTH_STRING: record["auth"]}
    with temporary_settings(updates=server):
        [flow_run] = prefectapi.latest_flow_runs(
            "copy-image", "destination", str(destination)
        )
        rows = prefectapi.table_rows(flow_run.id)
        copies = prefectapi.task_runs(flow_run.id, "copy_blob", len(rows), "COMPLETED")

    assert flow_run.state_type == "COMPLETED"
    assert len(copies) == len(rows) >= 2
    workers = {row["worker"].rsplit(":", 1)[1] for row in rows}
    assert str(command.pid) not in workers
    assert (destination / "manifest.json").read_bytes() == (
        HELLO / "manifest.json"
    ).read_bytes()
