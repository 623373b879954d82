"""Copies on a real Dask cluster: a scheduler and two workers on 127.0.0.1.

The cluster's processes are started and stopped by these tests. The images have
enough blobs of a few MiB that the copies spread over both workers, and a worker
can be killed while it writes one.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from dask_cluster import running_cluster

import imagekit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MIB = 1024 * 1024
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
TEMP_PREFIX = ".dirimage-tmp-"
COMMAND_TIMEOUT = 600


def make_layered_image(path: Path, layers: int, layer_size: int, seed: str) -> Path:
    """Write a dir: image of `layers` uncompressed tar layers of about
    `layer_size` bytes, each holding one file of pseudo-random bytes."""
    path.mkdir(parents=True)
    descriptors = []
    for number in range(layers):
        content = imagekit.pseudo_random_bytes(f"{seed}/{number}", layer_size)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            member = tarfile.TarInfo(f"data/layer-{number}.bin")
            member.size = len(content)
            member.mtime = imagekit.FIXED_MTIME
            tar.addfile(member, io.BytesIO(content))
        descriptors.append(_write_blob(path, buffer.getvalue(), OCI_LAYER))

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {
            "type": "layers",
            "diff_ids": [descriptor["digest"] for descriptor in descriptors],
        },
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": imagekit.OCI_MANIFEST,
        "config": _write_blob(path, json.dumps(config).encode(), OCI_CONFIG),
        "layers": descriptors,
    }
    (path / "manifest.json").write_bytes(json.dumps(manifest).encode())
    (path / "version").write_text("Directory Transport Version: 1.1\n")
    return path


def _write_blob(folder: Path, data: bytes, media_type: str) -> dict:
    hex_digest = hashlib.sha256(data).hexdigest()
    (folder / hex_digest).write_bytes(data)
    return {
        "mediaType": media_type,
        "digest": f"sha256:{hex_digest}",
        "size": len(data),
    }


@pytest.fixture(scope="module")
def prefect_env(prefect_api, tmp_path_factory) -> dict[str, str]:
    """Environment for processes that talk to the session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_env):
    """A scheduler and two workers (one process of two threads each)."""
    imagekit.require_tool("skopeo")
    # Workers learn the API address from each task's context, not from their
    # environment; they get only the private Prefect home.
    env = dict(os.environ)
    env["PREFECT_HOME"] = prefect_env["PREFECT_HOME"]
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with running_cluster(tmp_path_factory.mktemp("dask"), workers=2, env=env) as dask:
        yield dask


@pytest.fixture(scope="module")
def layered_image(tmp_path_factory) -> Path:
    """24 layers of 5 MiB: over the batching threshold, so one task per blob."""
    folder = tmp_path_factory.mktemp("layered")
    image = make_layered_image(folder / "image", 24, 5 * MIB, "dask-layered")
    imagekit.skopeo_accepts(image, folder / "skopeo")
    return image


def dirimage_command() -> list[str]:
    return [str(Path(sys.executable).with_name("dirimage"))]


def run_dirimage(arguments: list[str], env: dict[str, str]):
    return subprocess.run(
        [*dirimage_command(), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


def temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX))


def test_copy_and_verify_spread_over_both_workers(
    prefect_api, cluster, layered_image, tmp_path
):
    from flows.copy import copy_image, verify_image

    destination = tmp_path / "copy"
    summary = copy_image(
        str(layered_image), str(destination), parallel=4, runner=cluster.runner
    )

    assert summary.blobs_copied == 25
    assert summary.blobs_reused == 0
    workers = {transfer.worker for transfer in summary.transfers}
    assert len(workers) == 2, f"blob copies ran on {sorted(workers)}"
    worker_pids = set(cluster.worker_pids().values())
    assert {int(worker.rsplit(":", 1)[1]) for worker in workers} == worker_pids
    assert os.getpid() not in worker_pids
    assert storage_problems(destination) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")

    report = verify_image(str(destination), parallel=4, runner=cluster.runner)
    assert report.ok
    assert report.blobs_checked == 25

    # A rerun hashes what is there in one task, on one of the workers.
    rerun = copy_image(
        str(layered_image), str(destination), parallel=4, runner=cluster.runner
    )
    assert (rerun.blobs_copied, rerun.blobs_reused) == (0, 25)
    checkers = {transfer.worker for transfer in rerun.transfers}
    assert len(checkers) == 1, checkers
    assert int(checkers.pop().rsplit(":", 1)[1]) in worker_pids


def test_command_line_copy_and_verify_on_cluster(
    prefect_env, cluster, layered_image, tmp_path
):
    destination = tmp_path / "copy"
    copied = run_dirimage(
        [
            "copy",
            str(layered_image),
            str(destination),
            "--runner",
            cluster.runner,
            "--parallel",
            "4",
            "--json",
        ],
        prefect_env,
    )
    assert copied.returncode == 0, copied.stderr
    assert json.loads(copied.stdout)["blobs_copied"] == 25
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")

    verified = run_dirimage(
        ["verify", str(destination), "--runner", cluster.runner], prefect_env
    )
    assert verified.returncode == 0, verified.stderr

    # A damaged blob is found by the workers too.
    layer = json.loads((destination / "manifest.json").read_bytes())["layers"][3]
    with open(destination / layer["digest"].split(":")[1], "r+b") as blob:
        blob.seek(MIB)
        blob.write(b"\0" * 16)
    damaged = run_dirimage(
        ["verify", str(destination), "--runner", cluster.runner], prefect_env
    )
    assert damaged.returncode == 1
    assert layer["digest"] in damaged.stderr


def test_command_line_sync_and_verify_of_a_tree_on_cluster(
    prefect_env, cluster, tmp_path
):
    source_root = tmp_path / "source"
    for name in ("team/app", "team/base", "tools"):
        make_layered_image(source_root / name, 6, 5 * MIB, f"dask-sync-{name}")
    destination_root = tmp_path / "mirror"
    before = cluster.executed_counts()

    synced = run_dirimage(
        [
            "sync",
            str(source_root),
            str(destination_root),
            "--runner",
            cluster.runner,
            "--parallel",
            "4",
            "--json",
        ],
        prefect_env,
    )

    assert synced.returncode == 0, synced.stderr
    after = cluster.executed_counts()
    ran = {worker: after[worker] - before.get(worker, 0) for worker in after}
    assert len(ran) == 2 and all(count > 0 for count in ran.values()), ran
    assert sum(ran.values()) >= 3 * 7
    for name in ("team/app", "team/base", "tools"):
        assert storage_problems(destination_root / name) == []
        imagekit.skopeo_accepts(destination_root / name, tmp_path / "skopeo")

    # verify of the whole tree hashes on the cluster too.
    before = cluster.executed_counts()
    verified = run_dirimage(
        [
            "verify",
            str(destination_root),
            "--runner",
            cluster.runner,
            "--parallel",
            "4",
            "--json",
        ],
        prefect_env,
    )

    assert verified.returncode == 0, verified.stderr
    reports = json.loads(verified.stdout)
    assert [report["problems"] for report in reports] == [[], [], []]
    assert sum(report["blobs_checked"] for report in reports) == 3 * 7
    after = cluster.executed_counts()
    ran = {worker: after[worker] - before.get(worker, 0) for worker in after}
    assert len(ran) == 2 and all(count > 0 for count in ran.values()), ran
    assert sum(ran.values()) >= 3 * 7


def storage_problems(path: Path) -> list[str]:
    import storage

    return storage.check_image(str(path))


def corrupt_blobs(folder: Path) -> list[str]:
    """Names of the blob files in `folder` whose bytes do not hash to their name."""
    return [
        path.name
        for path in sorted(folder.iterdir())
        if imagekit.BLOB_NAME.fullmatch(path.name)
        and hashlib.sha256(path.read_bytes()).hexdigest() != path.name
    ]


def open_temp_file_of(pids: list[int], folder: Path) -> int | None:
    """The first of `pids` that has a temporary file in `folder` open, or None."""
    prefix = str(folder / TEMP_PREFIX)
    for pid in pids:
        fd_folder = Path(f"/proc/{pid}/fd")
        try:
            descriptors = list(fd_folder.iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(descriptor).startswith(prefix):
                    return pid
            except OSError:
                continue
    return None


def test_worker_killed_mid_copy(prefect_env, cluster, tmp_path):
    source = make_layered_image(tmp_path / "source", 32, 8 * MIB, "dask-kill")
    destination = tmp_path / "copy"
    destination.mkdir()
    worker_pids = sorted(cluster.worker_pids().values())
    arguments = [
        "copy",
        str(source),
        str(destination),
        "--runner",
        cluster.runner,
        "--parallel",
        "4",
        "--json",
    ]

    copy = subprocess.Popen(
        [*dirimage_command(), *arguments],
        env=prefect_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while copy.poll() is None and time.monotonic() < deadline:
            killed = open_temp_file_of(worker_pids, destination)
            if killed:
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.002)
        stdout, stderr = copy.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(timeout=30)
    assert killed, f"no worker was seen writing a blob; copy said: {stderr}"

    print(f"killed worker {killed}; copy exited {copy.returncode}: {stderr.strip()}")
    if copy.returncode != 0:
        # The copy may give up on the lost task; then it says so on one line,
        # and a second run on the restarted worker completes it.
        lines = stderr.strip().splitlines()
        assert lines and lines[-1].startswith("dirimage: "), stderr
        assert corrupt_blobs(destination) == []
        cluster.wait_for_workers(2)
        rerun = run_dirimage(arguments, prefect_env)
        assert rerun.returncode == 0, rerun.stderr
        stdout = rerun.stdout

    summary = json.loads(stdout)
    assert summary["blobs_copied"] + summary["blobs_reused"] == 33
    assert corrupt_blobs(destination) == []
    assert storage_problems(destination) == []
    assert temp_files(destination) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")
    # The nanny replaces the killed worker process.
    cluster.wait_for_workers(2)


def test_temporary_local_cluster(prefect_api, fresh_image, tmp_path):
    from flows.copy import copy_image

    source = fresh_image("oci")
    summary = copy_image(str(source), str(tmp_path / "copy"), runner="dask")

    assert summary.blobs_copied >= 3
    workers = {transfer.worker.rsplit(":", 1)[1] for transfer in summary.transfers}
    assert str(os.getpid()) not in workers
    assert storage_problems(tmp_path / "copy") == []
    imagekit.skopeo_accepts(tmp_path / "copy", tmp_path / "skopeo")
