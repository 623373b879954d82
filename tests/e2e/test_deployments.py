"""Deployments against a real Prefect server: `dirimage serve`, prefect.yaml, workers.

Runs are created the way the UI's Run button creates them, through
`POST /api/deployments/{id}/create_flow_run`, and each copy is checked by
skopeo reading the destination.
"""

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from serverkit import executable, start_process, stop_process, tail

import imagekit

pytestmark = pytest.mark.e2e

REPOSITORY = Path(__file__).resolve().parents[2]
WORK_POOL = "dirimage"


def copy_parameters(source: Path, destination: Path) -> dict:
    return {"source": str(source), "destination": str(destination), "parallel": 4}


def assert_copied(source: Path, destination: Path, workdir: Path) -> None:
    expected = imagekit.read_manifest(source)
    assert imagekit.read_manifest(destination) == expected
    source_blobs = {blob.name for blob in imagekit.blob_files(source)}
    assert {blob.name for blob in imagekit.blob_files(destination)} == source_blobs
    imagekit.skopeo_accepts(destination, workdir)


def test_parameter_schema_describes_every_parameter(served_copy):
    _, deployment = served_copy
    schema = deployment["parameter_openapi_schema"]

    assert deployment["enforce_parameter_schema"] is True
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
        ({"source": "SRC", "destination": "DEST", "parallel": -1}, "parallel"),
        ({"source": "SRC", "destination": "DEST", "retries": "many"}, "retries"),
    ],
    ids=["missing-source", "negative-parallel", "text-retries"],
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


def test_serve_refuses_bad_options_without_a_server(tmp_path):
    result = subprocess.run(
        [executable("dirimage"), "serve", "--param", "parallel=0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "parallel" in result.stderr and "minimum of 1" in result.stderr

    result = subprocess.run(
        [executable("dirimage"), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "PREFECT_API_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_prefect_deploy_all_and_a_process_worker(prefect_server, fresh_image, tmp_path):
    imagekit.require_tool("skopeo")
    prefect = executable("prefect")
    env = prefect_server.env
    declared = yaml.safe_load((REPOSITORY / "prefect.yaml").read_text())
    entrypoints = sorted(item["entrypoint"] for item in declared["deployments"])

    pool = subprocess.run(
        [prefect, "work-pool", "create", WORK_POOL, "--type", "process"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    response = prefect_server.request(
        "POST",
        "/deployments/filter",
        json={"work_pools": {"name": {"any_": [WORK_POOL]}}},
    )
    response.raise_for_status()
    registered = response.json()
    assert sorted(item["entrypoint"] for item in registered) == entrypoints
    copy_deployment = prefect_server.deployment("copy-image", "pool")
    assert copy_deployment["pull_steps"] == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": str(REPOSITORY)
            }
        }
    ]
    example = copy_deployment["schedules"][0]
    assert example["active"] is False

    source = fresh_image("index")
    destination = tmp_path / "by-worker"
    log_path = tmp_path / "worker.log"
    worker = start_process(
        [prefect, "worker", "start", "--pool", WORK_POOL], log_path, env, cwd=tmp_path
    )
    try:
        response = prefect_server.create_flow_run(
            copy_deployment["id"], parameters=copy_parameters(source, destination)
        )
        assert response.status_code == 201, response.text
        run = prefect_server.wait_for_run(response.json()["id"], log_path=log_path)
        assert run["state_type"] == "COMPLETED", tail(log_path)
        assert_copied(source, destination, tmp_path)
    finally:
        stop_process(worker)
