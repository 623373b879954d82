"""Permanent faults fail at once, name the digest, and are never retried.

A missing blob, bytes that hash to something else, a truncated blob, a blob that
grew, and a blob replaced between planning and copying: each stays wrong however
often it is read, so the copy fails on the first attempt and leaves the image that
was in the destination as it was.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import imagekit
import storage

DIRIMAGE = shutil.which("dirimage") or str(
    Path(__file__).parents[1] / ".venv" / "bin" / "dirimage"
)


def first_layer(image: Path) -> tuple[str, int, Path]:
    layer = json.loads((image / "manifest.json").read_bytes())["layers"][0]
    return layer["digest"], layer["size"], image / layer["digest"].split(":", 1)[1]


def remove(blob: Path) -> None:
    blob.unlink()


def flip_last_byte(blob: Path) -> None:
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def truncate(blob: Path) -> None:
    os.truncate(blob, blob.stat().st_size // 2)


def grow(blob: Path) -> None:
    with open(blob, "ab") as file:
        file.write(b"appended after the manifest was written")


# damage, the error it causes, and a piece of the message after the digest
FAULTS = {
    "missing": (remove, storage.BlobNotFound, "is missing"),
    "digest-mismatch": (flip_last_byte, storage.DigestMismatch, "content hashes to"),
    "truncated": (truncate, storage.SizeMismatch, "bytes, found"),
    "grown": (grow, storage.SizeMismatch, "bytes, found more"),
}


def destination_state(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


def assert_previous_image_intact(folder: Path, before: dict[str, bytes]) -> None:
    """Every file of the previous image is unchanged, and no temporary file is
    left; blobs of the new image that did land may stay for the next attempt."""
    after = destination_state(folder)
    for name, content in before.items():
        assert after.get(name) == content, f"{name} changed"
    assert not [name for name in after if name.startswith(".dirimage-tmp")]


def copy_attempts(flow_run_id, prefix: str = "copy_blob") -> dict[str, int]:
    """How often each task of a flow run whose name starts with `prefix` (the
    blob copies by default) started, from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            # Task states reach the server as events; wait until every copy task
            # has its final state recorded.
            task_runs = [
                run
                for run in client.read_task_runs(flow_run_filter=runs_filter)
                if run.name.startswith(prefix)
            ]
            finished = [run.state and run.state.is_final() for run in task_runs]
            if task_runs and all(finished):
                break
            assert time.monotonic() < deadline, "task states never reached the API"
            time.sleep(0.5)
        return {
            run.name: sum(
                1 for state in client.read_task_run_states(run.id) if state.is_running()
            )
            for run in task_runs
        }


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_storage_transfer_fails_at_once_naming_the_digest(fault, fresh_image, tmp_path):
    damage, error, detail = FAULTS[fault]
    source = fresh_image("oci")
    digest, size, blob = first_layer(source)
    damage(blob)
    destination = tmp_path / "destination"

    with pytest.raises(error) as caught:
        storage.transfer_blob(str(source), str(destination), digest, size)

    assert digest in str(caught.value)
    assert detail in str(caught.value)
    assert not storage.is_transient(caught.value)
    assert [p.name for p in destination.iterdir()] == ["version"]


@pytest.mark.parametrize("fault", FAULTS, ids=str)
def test_copy_flow_fails_on_the_first_attempt(
    fault, fresh_image, prefect_api, tmp_path
):
    from flows.copy import copy_image

    damage, error, detail = FAULTS[fault]
    source = fresh_image("oci")
    digest, _, blob = first_layer(source)
    damage(blob)
    destination = fresh_image("v2s2")
    before = destination_state(destination)

    state = copy_image(
        str(source), str(destination), retries=3, retry_delay=0, return_state=True
    )

    assert state.is_failed()
    with pytest.raises(error) as caught:
        state.result()
    assert digest in str(caught.value) and detail in str(caught.value)
    attempts = copy_attempts(state.state_details.flow_run_id)
    assert attempts and all(count == 1 for count in attempts.values()), attempts
    assert_previous_image_intact(destination, before)
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_invalid_manifest_fails_the_plan_on_the_first_attempt(
    fresh_image, prefect_api, tmp_path
):
    """The plan has the blob copies' retries, for transient errors only: a
    manifest that does not parse fails its first and only attempt."""
    from flows.copy import copy_image

    source = fresh_image("oci")
    (source / "manifest.json").write_bytes(b'{"schemaVersion": 2,')

    state = copy_image(
        str(source), str(tmp_path / "copy"), retries=3, retry_delay=0, return_state=True
    )

    assert state.is_failed()
    with pytest.raises(storage.InvalidManifest):
        state.result()
    attempts = copy_attempts(state.state_details.flow_run_id, prefix="plan_image")
    assert list(attempts.values()) == [1], attempts


def test_blob_replaced_between_planning_and_copying(fresh_image, tmp_path):
    """The plan holds the manifest's digest; a blob swapped for other bytes of the
    same size afterwards is caught while it streams, and nothing lands."""
    source = fresh_image("oci")
    plan = storage.plan_image(str(source))
    layer = plan.blobs[1]
    blob = source / layer.digest.split(":", 1)[1]
    replacement = source / "replacement"
    replacement.write_bytes(os.urandom(blob.stat().st_size))
    os.replace(replacement, blob)
    destination = tmp_path / "destination"

    with pytest.raises(storage.DigestMismatch, match=layer.digest):
        storage.transfer_blob(str(source), str(destination), layer.digest, layer.size)
    assert not any(p.name.startswith(".dirimage-tmp") for p in destination.iterdir())
    assert not (destination / layer.digest.split(":", 1)[1]).exists()


def test_blob_growing_while_it_is_read(fresh_image, tmp_path):
    """A source blob still being written (it grows under the reader) is refused as
    soon as it passes the manifest's size, not read to its end."""
    source = fresh_image("oci")
    digest, size, blob = first_layer(source)
    reader = storage.DirImageSource(str(source))
    stream, _ = reader.get_blob(digest)
    with stream, open(blob, "ab") as writer:
        # The reader already holds the file open; the writer keeps appending.
        writer.write(os.urandom(8 * 1024 * 1024))
        writer.flush()
        target = storage.DirImageDestination(str(tmp_path / "destination"))
        with pytest.raises(storage.SizeMismatch, match=f"{digest}: expected {size}"):
            target.put_blob(digest, stream, size)
        assert stream.tell() < size + 2 * 1024 * 1024 + 1
    assert os.listdir(target.path) == ["version"]


@pytest.mark.parametrize("fault", ["missing", "digest-mismatch"])
def test_cli_reports_a_permanent_fault_in_one_line(
    fault, fresh_image, cli_env, tmp_path
):
    damage, _, detail = FAULTS[fault]
    source = fresh_image("oci")
    digest, _, blob = first_layer(source)
    damage(blob)
    destination = fresh_image("v2s2")
    before = destination_state(destination)

    result = subprocess.run(
        [DIRIMAGE, "copy", "--retries", "3", str(source), str(destination)],
        capture_output=True,
        text=True,
        env=cli_env,
        stdin=subprocess.DEVNULL,
        timeout=180,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert digest in lines[0] and detail in lines[0], lines[0]
    assert_previous_image_intact(destination, before)
