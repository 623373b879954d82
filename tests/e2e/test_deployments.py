"""Deployments against a real Prefect server: `dirimage serve`, prefect.yaml, workers.

Runs are created the way the UI's Run button creates them, through
`POST /api/deployments/{id}/create_flow_run`, and each copy is checked by
skopeo reading the destination.
"""

import json
import os
import re
import subprocess
import time
from datetime import datetime, timezone
from datetime import time as dt_time
from pathlib import Path

import pytest
import yaml
from dask_cluster import running_cluster
from serverkit import executable, start_process, stop_process, tail

import faultkit
import imagekit

pytestmark = pytest.mark.e2e

REPOSITORY = Path(__file__).resolve().parents[2]
README = REPOSITORY / "README.md"
WORK_POOL = "dirimage"
MIB = 1024 * 1024


def copy_parameters(source: Path, destination: Path) -> dict:
    return {"source": str(source), "destination": str(destination), "parallel": 4}


def assert_copied(source: Path, destination: Path, workdir: Path) -> None:
    expected = imagekit.read_manifest(source)
    assert imagekit.read_manifest(destination) == expected
    source_blobs = {blob.name for blob in imagekit.blob_files(source)}
    assert {blob.name for blob in imagekit.blob_files(destination)} == source_blobs
    imagekit.skopeo_accepts(destination, workdir)


@pytest.fixture(scope="module")
def dask_cluster(prefect_server, tmp_path_factory):
    """A Dask scheduler and one worker on 127.0.0.1, for the module."""
    log_dir = tmp_path_factory.mktemp("dask")
    with running_cluster(log_dir, workers=1, env=prefect_server.env) as cluster:
        yield cluster


def assert_blobs_copied_on(cluster, rows: list[dict]) -> None:
    """Every row of a copy's table names a worker process of `cluster`."""
    # A row's `worker` is the host:pid of the process that copied the blob.
    pids = {int(row["worker"].rsplit(":", 1)[1]) for row in rows}
    assert pids and pids <= set(cluster.worker_pids().values()), rows


def test_parameter_schema_describes_every_parameter(served_copy):
    _, deployment = served_copy
    schema = deployment["parameter_openapi_schema"]

    assert deployment["enforce_parameter_schema"] is True
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"source", "destination"}
    for name, prop in schema["properties"].items():
        assert prop.get("title"), f"{name} has no title"
        assert prop.get("description"), f"{name} has no description"
    assert schema["properties"]["parallel"]["minimum"] == 1
    assert schema["properties"]["retries"]["minimum"] == 0


def test_run_created_through_rest_api_completes(
    prefect_server, served_copy, fresh_image, tmp_path
):
    imagekit.require_tool("skopeo")
    source = fresh_image("v2s2")
    destination = tmp_path / "copied"
    served, deployment = served_copy

    response = prefect_server.create_flow_run(
        deployment["id"], parameters=copy_parameters(source, destination)
    )
    assert response.status_code == 201, response.text
    run = prefect_server.wait_for_run(response.json()["id"], log_path=served.log_path)

    assert run["state_type"] == "COMPLETED", tail(served.log_path)
    assert_copied(source, destination, tmp_path)
    task_names = [task["name"] for task in prefect_server.task_runs(run["id"])]
    assert any(name.startswith("copy_blob") for name in task_names), task_names
    kinds = {artifact["type"] for artifact in prefect_server.artifacts(run["id"])}
    assert {"table", "progress"} <= kinds


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"destination": "DEST"}, "source"),
        ({"source": "", "destination": "DEST"}, "source"),
        ({"source": "SRC", "destinaton": "DEST"}, "destination"),
        ({"source": "SRC", "destination": "DEST", "paralel": 2}, "paralel"),
        ({"source": "SRC", "destination": "DEST", "parallel": -1}, "parallel"),
        ({"source": "SRC", "destination": "DEST", "retries": "many"}, "retries"),
        ({"source": "SRC", "destination": "DEST", "runner": "spark"}, "runner"),
    ],
    ids=[
        "missing-source",
        "empty-source",
        "misspelled-destination",
        "misspelled-parallel",
        "negative-parallel",
        "text-retries",
        "unknown-runner",
    ],
)
def test_bad_parameters_are_rejected_before_a_run(
    prefect_server, served_copy, fresh_image, tmp_path, parameters, field
):
    source = fresh_image("oci")
    destination = tmp_path / "never-written"
    values = {"SRC": str(source), "DEST": str(destination)}
    parameters = {key: values.get(value, value) for key, value in parameters.items()}
    _, deployment = served_copy
    runs_before = len(prefect_server.flow_runs(deployment["id"]))

    response = prefect_server.create_flow_run(deployment["id"], parameters=parameters)

    assert response.status_code == 409, response.text
    assert f"'{field}'" in response.json()["detail"]
    assert len(prefect_server.flow_runs(deployment["id"])) == runs_before
    assert not destination.exists()


def readme_python_example() -> str:
    """The code block under the README's "Start a copy from Python" heading."""
    text = README.read_text()
    section = text.split("### Start a copy from Python", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "no python block under 'Start a copy from Python'"
    return found.group(1)


def test_readme_run_deployment_example_completes(
    prefect_server, served_copy, fresh_image, tmp_path
):
    imagekit.require_tool("skopeo")
    source = fresh_image("oci")
    destination = tmp_path / "from-python"
    example = readme_python_example()
    assert '"copy-image/serve"' in example
    # Only the folders change: the README's are not on this machine.
    code = example.replace("/srv/images/app", str(source)).replace(
        "/backup/images/app", str(destination)
    )
    assert str(source) in code and str(destination) in code

    result = subprocess.run(
        [executable("python"), "-c", code],
        capture_output=True,
        text=True,
        env=prefect_server.env,
        cwd=tmp_path,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "StateType.COMPLETED"
    assert_copied(source, destination, tmp_path)


def test_runner_parameter_sends_blob_copies_to_a_dask_cluster(
    prefect_server, served_copy, dask_cluster, tmp_path
):
    imagekit.require_tool("skopeo")
    source = faultkit.make_synthetic_image(tmp_path / "layers", [5 * MIB] * 4, "dask")
    destination = tmp_path / "by-dask"
    served, deployment = served_copy
    parameters = {**copy_parameters(source, destination), "runner": dask_cluster.runner}

    response = prefect_server.create_flow_run(deployment["id"], parameters=parameters)
    assert response.status_code == 201, response.text
    run = prefect_server.wait_for_run(response.json()["id"], log_path=served.log_path)

    assert run["state_type"] == "COMPLETED", tail(served.log_path)
    assert run["parameters"]["runner"] == dask_cluster.runner
    rows = prefect_server.table_rows(run["id"])
    assert len(rows) == 5, rows
    assert_blobs_copied_on(dask_cluster, rows)
    assert_copied(source, destination, tmp_path)


def test_sigterm_during_a_copy_cancels_it_and_keeps_the_previous_image(
    prefect_server, dirimage_serve, dir_images, tmp_path
):
    imagekit.require_tool("skopeo")
    # Forty 8 MiB layers copied one at a time: seconds of copying, so the
    # SIGTERM sent once the first new blob lands finds the copy in flight.
    source = faultkit.make_synthetic_image(tmp_path / "big", [8 * MIB] * 40, "term")
    new_blobs = {
        faultkit.blob_name(digest) for digest, _ in faultkit.manifest_blobs(source)
    }
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    previous_manifest = (destination / "manifest.json").read_bytes()
    previous_files = set(os.listdir(destination))
    served = dirimage_serve("sigterm")
    deployment = prefect_server.deployment("copy-image", "sigterm")

    response = prefect_server.create_flow_run(
        deployment["id"],
        parameters={**copy_parameters(source, destination), "parallel": 1},
    )
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 120
    while not new_blobs & set(os.listdir(destination)):
        assert time.monotonic() < deadline, tail(served.log_path)
        time.sleep(0.02)
    returncode = served.stop()
    run = prefect_server.wait_for_run(response.json()["id"], log_path=served.log_path)

    log = served.log()
    assert returncode == 0, log
    assert "Traceback" not in log
    assert run["state_type"] == "CANCELLED", run["state"]
    landed = new_blobs & set(os.listdir(destination))
    assert len(landed) < len(new_blobs), "the copy finished before SIGTERM reached it"
    # The previous image is still the destination's image, whole; the new
    # blobs that landed are complete and verified, and no temporary file is left.
    assert (destination / "manifest.json").read_bytes() == previous_manifest
    assert previous_files <= set(os.listdir(destination))
    assert faultkit.corrupt_blobs(destination) == []
    assert faultkit.temporary_files(destination) == []
    imagekit.skopeo_accepts(destination, tmp_path)

    # Started again, the copy keeps the blobs that landed and copies the rest.
    rerun = faultkit.dirimage(
        prefect_server.env, "copy", "--json", str(source), str(destination)
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["blobs_reused"] >= len(landed)
    assert summary["blobs_copied"] + summary["blobs_reused"] == len(new_blobs)
    assert_copied(source, destination, tmp_path)


def test_interval_schedule_starts_runs_and_sigterm_stops_cleanly(
    prefect_server, dirimage_serve, fresh_image, tmp_path
):
    imagekit.require_tool("skopeo")
    source = fresh_image("oci")
    destination = tmp_path / "scheduled"
    served = dirimage_serve(
        "every-few-seconds",
        "--interval",
        "5",
        "--limit",
        "1",
        "--param",
        f"source={source}",
        "--param",
        f"destination={destination}",
    )
    deployment = prefect_server.deployment("copy-image", "every-few-seconds")
    assert deployment["schedules"][0]["schedule"]["interval"] == 5

    completed = None
    runs: list[dict] = []
    for _ in range(240):
        runs = prefect_server.flow_runs(deployment["id"])
        finished = [run for run in runs if run["state_type"] == "COMPLETED"]
        if finished:
            completed = finished[0]
            break
        failed = [run for run in runs if run["state_type"] in ("FAILED", "CRASHED")]
        assert not failed, tail(served.log_path)
        time.sleep(0.5)
    assert completed is not None, f"no scheduled run completed: {runs}"
    assert completed["auto_scheduled"] is True
    assert_copied(source, destination, tmp_path)

    returncode = served.stop()
    log = served.log()
    assert returncode == 0, log
    assert "Traceback" not in log
    paused = prefect_server.deployment("copy-image", "every-few-seconds")
    assert paused["paused"] is True


def test_cron_schedule_plans_runs_at_that_time_in_utc(prefect_server, dirimage_serve):
    served = dirimage_serve(
        "nightly",
        "--cron",
        "0 3 * * *",
        "--param",
        "source=/srv/images/app",
        "--param",
        "destination=/backup/images/app",
    )
    deployment = prefect_server.deployment("copy-image", "nightly")
    [schedule] = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *"
    assert schedule["active"] is True

    deadline = time.monotonic() + 120
    while not (runs := prefect_server.flow_runs(deployment["id"])):
        assert time.monotonic() < deadline, tail(served.log_path)
        time.sleep(0.5)
    for run in runs:
        assert run["state_type"] == "SCHEDULED"
        assert run["parameters"]["source"] == "/srv/images/app"
        start = datetime.fromisoformat(run["expected_start_time"])
        assert start.astimezone(timezone.utc).time() == dt_time(3, 0), start


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--param", "parallel=0"], "parallel of copy-image: 0 is less than"),
        (["--param", "paralel=2"], "takes no parameter paralel"),
        (
            [
                "--cron",
                "61 * * * *",
                "--param",
                "source=/a",
                "--param",
                "destination=/b",
            ],
            "--cron '61 * * * *' is not a valid cron expression",
        ),
        (["--cron", "0 3 * * *"], "needs defaults for --param source=..."),
        ([], "PREFECT_API_URL"),
    ],
    ids=[
        "out-of-range",
        "unknown-name",
        "bad-cron",
        "cron-without-folders",
        "no-server",
    ],
)
def test_serve_refuses_bad_options_without_a_server(tmp_path, arguments, expected):
    result = subprocess.run(
        [executable("dirimage"), "serve", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path)},
    )

    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("dirimage: ") and expected in line


def wait_for_work_pool(prefect_server, name: str, worker, log_path: Path) -> dict:
    deadline = time.monotonic() + 120
    while (pool := prefect_server.work_pool(name)) is None:
        assert worker.poll() is None, f"worker exited:\n{tail(log_path)}"
        assert time.monotonic() < deadline, f"no work pool {name}:\n{tail(log_path)}"
        time.sleep(0.5)
    return pool


def test_worker_then_prefect_deploy_all_on_a_fresh_server(
    prefect_server, dask_cluster, fresh_image, tmp_path
):
    """The README's two commands, in its order, on a server without the pool."""
    imagekit.require_tool("skopeo")
    prefect = executable("prefect")
    declared = yaml.safe_load((REPOSITORY / "prefect.yaml").read_text())
    entrypoints = sorted(item["entrypoint"] for item in declared["deployments"])
    # As at a terminal: Prefect would ask whatever prefect.yaml leaves open, and
    # a question here reads end-of-file and fails the deploy.
    deploy_env = {**prefect_server.env, "PREFECT_CLI_PROMPT": "true"}

    def deploy_all() -> subprocess.CompletedProcess:
        return subprocess.run(
            [prefect, "deploy", "--all"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            env=deploy_env,
            cwd=REPOSITORY,
            timeout=300,
        )

    # Why the worker comes first: `prefect deploy` refuses a missing pool and
    # cannot create one.
    assert prefect_server.work_pool(WORK_POOL) is None
    refused = deploy_all()
    assert refused.returncode == 1
    assert "work pool 'dirimage' which does not exist" in " ".join(
        refused.stdout.split()
    )

    log_path = tmp_path / "worker.log"
    worker = start_process(
        [prefect, "worker", "start", "--pool", WORK_POOL],
        log_path,
        prefect_server.env,
        cwd=tmp_path,
    )
    try:
        pool = wait_for_work_pool(prefect_server, WORK_POOL, worker, log_path)
        assert pool["type"] == "process"
        deploy = deploy_all()
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        # Deploying again, as after an edit of prefect.yaml, asks nothing either.
        again = deploy_all()
        assert again.returncode == 0, again.stdout + again.stderr

        response = prefect_server.request(
            "POST",
            "/deployments/filter",
            json={"work_pools": {"name": {"any_": [WORK_POOL]}}},
        )
        response.raise_for_status()
        registered = response.json()
        assert sorted(item["entrypoint"] for item in registered) == entrypoints
        assert all(
            item["parameter_openapi_schema"]["properties"] for item in registered
        )
        copy_deployment = prefect_server.deployment("copy-image", "pool")
        assert copy_deployment["pull_steps"] == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": str(REPOSITORY)
                }
            }
        ]
        [example] = copy_deployment["schedules"]
        assert example["active"] is False

        # A run on the worker, its blob copies on the Dask cluster.
        source = fresh_image("index")
        destination = tmp_path / "by-worker"
        parameters = {
            **copy_parameters(source, destination),
            "runner": dask_cluster.runner,
        }
        response = prefect_server.create_flow_run(
            copy_deployment["id"], parameters=parameters
        )
        assert response.status_code == 201, response.text
        run = prefect_server.wait_for_run(response.json()["id"], log_path=log_path)
        assert run["state_type"] == "COMPLETED", tail(log_path)
        assert_blobs_copied_on(dask_cluster, prefect_server.table_rows(run["id"]))
        assert_copied(source, destination, tmp_path)

        # `prefect deploy` builds the schema itself and leaves unknown names
        # open: a misspelled name is accepted, and the run crashes as it starts.
        misspelled = tmp_path / "misspelled"
        response = prefect_server.create_flow_run(
            copy_deployment["id"],
            parameters={
                "source": str(source),
                "destination": str(misspelled),
                "paralel": 2,
            },
        )
        assert response.status_code == 201, response.text
        run = prefect_server.wait_for_run(response.json()["id"], log_path=log_path)
        assert run["state_type"] == "CRASHED", run["state"]
        assert not misspelled.exists()
    finally:
        stop_process(worker)
