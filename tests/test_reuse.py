"""The reuse step of a copy: blobs the destination already holds are hashed in one
task on several threads, and only the others get copy tasks.

A file is reused only when it hashes to its digest; one that is damaged, cut
short or unreadable is left to its own copy task, which replaces it or retries.
"""

import re
import shutil
import threading
import time
from pathlib import Path

import pytest

import faultkit
import imagekit
import prefectapi
import storage
import storage.destination
from flows import copy_image
from storage.manifest import BlobRef
from storage.transfer import COPIED, REUSED

MIB = 1024 * 1024
COMMIT_TASKS = [
    "get_signatures-top",
    "install_signatures",
    "put_manifest-top",
    "remove_unused",
    "stage_signatures",
]


@pytest.fixture
def image(tmp_path) -> Path:
    # Layers above the small-blob size, so that each copy has a task of its own.
    return imagekit.write_layered_image(
        tmp_path / "source", [5 * MIB, 6 * MIB, 7 * MIB]
    )


def blob_refs(image: Path) -> list[BlobRef]:
    return list(storage.plan_image(str(image)).blobs)


def file_of(folder: Path, blob: BlobRef) -> Path:
    return folder / faultkit.blob_name(blob.digest)


def test_present_blobs_are_those_at_their_size_largest_first(image, tmp_path):
    blobs = blob_refs(image)
    destination = tmp_path / "copy"
    shutil.copytree(image, destination)
    config, *layers = sorted(blobs, key=lambda blob: blob.size)
    file_of(destination, layers[0]).write_bytes(b"short")
    file_of(destination, layers[1]).unlink()

    present = storage.present_blobs(str(destination), blobs)

    assert present == sorted([config, layers[2]], key=lambda blob: -blob.size)
    unknown_size = BlobRef(layers[0].digest, None)
    assert storage.present_blobs(str(destination), [unknown_size]) == [unknown_size]


def test_only_intact_files_are_reused(image, tmp_path):
    blobs = blob_refs(image)
    destination = tmp_path / "copy"
    shutil.copytree(image, destination)
    damaged, *intact = blobs
    path = file_of(destination, damaged)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)

    reused = storage.reuse_intact_blobs(str(destination), blobs, workers=4)

    assert sorted(t.digest for t in reused) == sorted(b.digest for b in intact)
    assert {t.action for t in reused} == {REUSED}
    assert {t.digest: t.size for t in reused} == {b.digest: b.size for b in intact}
    assert path.read_bytes() == data, "a damaged file is left for its copy"


def test_files_are_hashed_at_once_on_the_workers(image, tmp_path, monkeypatch):
    blobs = blob_refs(image)
    destination = tmp_path / "copy"
    shutil.copytree(image, destination)
    real_has_blob = storage.DirImageDestination.has_blob
    threads: set[int] = set()

    def slow_has_blob(self, digest, size=None):
        threads.add(threading.get_ident())
        time.sleep(0.2)  # long enough for every worker to take a blob
        return real_has_blob(self, digest, size)

    monkeypatch.setattr(storage.DirImageDestination, "has_blob", slow_has_blob)

    reused = storage.reuse_intact_blobs(str(destination), blobs, workers=len(blobs))

    assert len(reused) == len(blobs)
    assert len(threads) == len(blobs)
    assert storage.reuse_intact_blobs(str(destination), [], workers=4) == []


def test_an_unreadable_file_is_left_out_not_raised(image, tmp_path, monkeypatch):
    blobs = blob_refs(image)
    destination = tmp_path / "copy"
    shutil.copytree(image, destination)
    opened = faultkit.fail_opens(
        monkeypatch, storage.destination, destination, blobs[0].digest, failures=1
    )

    reused = storage.reuse_intact_blobs(str(destination), blobs, workers=2)

    assert len(opened) == 1
    assert sorted(t.digest for t in reused) == sorted(b.digest for b in blobs[1:])


def test_a_rerun_hashes_in_one_task_and_copies_nothing(image, tmp_path, prefect_api):
    destination = tmp_path / "copy"
    first = copy_image(str(image), str(destination), return_state=True)
    first_runs = prefectapi.task_runs(first.state_details.flow_run_id, "", 10)
    assert len(first_runs) == 10
    assert not [run for run in first_runs if run.name.startswith("reuse_blobs")]
    before = {entry.name: entry.stat().st_mtime_ns for entry in destination.iterdir()}

    state = copy_image(str(image), str(destination), return_state=True)

    summary = state.result()
    assert (summary.blobs_copied, summary.blobs_reused) == (0, 4)
    runs = prefectapi.task_runs(state.state_details.flow_run_id, "", 7)
    # Tasks without a run name of their own get a random suffix.
    names = sorted(re.sub(r"-[0-9a-f]{3}$", "", run.name) for run in runs)
    largest = max(blob_refs(image), key=lambda blob: blob.size)
    assert names == sorted(
        ["plan_image", f"reuse_blobs-{largest.digest[:19]}+", *COMMIT_TASKS]
    )
    blob_names = {file_of(destination, blob).name for blob in blob_refs(image)}
    after = {entry.name: entry.stat().st_mtime_ns for entry in destination.iterdir()}
    assert {name: after[name] for name in blob_names} == {
        name: before[name] for name in blob_names
    }


def test_a_partial_destination_copies_only_what_is_missing(
    image, tmp_path, prefect_api
):
    blobs = sorted(blob_refs(image), key=lambda blob: blob.size)
    destination = tmp_path / "copy"
    destination.mkdir()
    (destination / "version").write_text(imagekit.DIR_VERSION_1_1)
    kept, damaged, missing = blobs[3], blobs[2], blobs[1:2] + blobs[:1]
    shutil.copyfile(file_of(image, kept), file_of(destination, kept))
    length = damaged.size
    file_of(destination, damaged).write_bytes(b"\0" * length)

    state = copy_image(str(image), str(destination), return_state=True)

    summary = state.result()
    actions = {transfer.digest: transfer.action for transfer in summary.transfers}
    assert actions == {
        kept.digest: REUSED,
        damaged.digest: COPIED,
        **{blob.digest: COPIED for blob in missing},
    }
    runs = prefectapi.task_runs(state.state_details.flow_run_id, "copy_blob", 3)
    # The config, below the small-blob size, is a batch of one: a task of its own.
    assert sorted(run.name for run in runs) == sorted(
        f"copy_blob-{blob.digest[:19]}" for blob in [damaged, *missing]
    )
    assert (
        file_of(destination, damaged).read_bytes()
        == file_of(image, damaged).read_bytes()
    )


def test_a_file_the_check_cannot_read_is_reused_by_its_copy_task(
    image, tmp_path, monkeypatch, prefect_api
):
    blobs = blob_refs(image)
    destination = tmp_path / "copy"
    copy_image(str(image), str(destination))
    largest = max(blobs, key=lambda blob: blob.size)
    opened = faultkit.fail_opens(
        monkeypatch, storage.destination, destination, largest.digest, failures=1
    )

    # No retries: the check's failed read must not count as a failed copy.
    summary = copy_image(str(image), str(destination), retries=0)

    assert len(opened) == 2, "read by the check, which failed, then by its copy"
    assert (summary.blobs_copied, summary.blobs_reused) == (0, 4)
    assert storage.check_image(str(destination)) == []
