"""Two writers on one destination: real `dirimage` processes, never a mixed image.

The first copy is frozen with SIGSTOP while it holds the destination's lock, so the
second one meets the lock every time, not only when the timing happens to line up.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

import faultkit
import imagekit
import storage
from storage import layout

MIB = 1024 * 1024
LOCK_WAIT_SECONDS = 240
# Temporary files a delete removes one by one: enough that it still holds the
# lock when the test, polling every 10 ms, freezes it.
FILLER_FILES = 100_000


def wait_until_holding_lock(process, destination: Path) -> None:
    """Return once `process` has taken the destination's lock (it writes its PID
    into the lock file right after `flock` succeeds)."""
    lock = destination / layout.LOCK_FILE
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        assert process.poll() is None, process.communicate()
        if lock.exists() and lock.read_text() == str(process.pid):
            return
        assert time.monotonic() < deadline, "the copy never took the lock"
        time.sleep(0.01)


def wait_until_waiting_for_lock(process, destination: Path) -> None:
    """Return once `process` has the destination's lock file open, as a waiting
    `ImageLock` has while it retries `flock`."""
    lock = str(destination / layout.LOCK_FILE)
    descriptors = Path(f"/proc/{process.pid}/fd")
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        assert process.poll() is None, process.communicate()
        for descriptor in descriptors.iterdir():
            try:
                if os.readlink(descriptor) == lock:
                    return
            except OSError:
                continue
        assert time.monotonic() < deadline, "the process never opened the lock"
        time.sleep(0.05)


def image_files(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if layout.layout_kind(name) == "blob"}


def assert_holds_exactly(destination: Path, source: Path, workdir: Path) -> None:
    """`destination` holds the image of `source` and nothing of any other image."""
    assert (destination / "manifest.json").read_bytes() == (
        source / "manifest.json"
    ).read_bytes()
    wanted = {faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(source)}
    assert image_files(destination) == wanted
    assert faultkit.corrupt_blobs(destination) == []
    assert faultkit.temporary_files(destination) == []
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, workdir)


@pytest.fixture
def big_source(tmp_path) -> Path:
    # Large enough that the copy is still running when the test freezes it.
    return faultkit.make_synthetic_image(tmp_path / "big", [8 * MIB] * 12, "big")


def test_second_copy_into_a_locked_destination_fails_at_once(
    big_source, fresh_image, dir_images, tmp_path, cli_env
):
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    other = fresh_image("v2s2")
    other_blobs = {faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(other)}

    first = faultkit.start_dirimage(
        cli_env, "copy", "--parallel", "1", big_source, destination
    )
    try:
        wait_until_holding_lock(first, destination)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = faultkit.dirimage(cli_env, "copy", other, destination)
            files_while_frozen = set(os.listdir(destination))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=300)
    finally:
        faultkit.stop(first)

    assert second.returncode == 1, second.stderr
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert "being written by another dirimage process" in lines[0]
    assert f"held by process {first.pid}" in lines[0]
    assert str(destination) in lines[0]
    assert not files_while_frozen & other_blobs, "the refused copy wrote blobs"

    assert first.returncode == 0, first_err
    assert_holds_exactly(destination, big_source, tmp_path / "skopeo")


def test_two_copies_started_together_leave_one_whole_image(tmp_path, cli_env):
    """Started at the same moment, the copies either run one after the other or one
    is refused; the destination ends up holding one of the two images, whole."""
    first_source = faultkit.make_synthetic_image(tmp_path / "a", [4 * MIB] * 8, "a")
    second_source = faultkit.make_synthetic_image(tmp_path / "b", [4 * MIB] * 8, "b")
    destination = tmp_path / "destination"

    processes = [
        faultkit.start_dirimage(cli_env, "copy", "--json", source, destination)
        for source in (first_source, second_source)
    ]
    try:
        outcomes = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            faultkit.stop(process)

    codes = [process.returncode for process in processes]
    assert 0 in codes, outcomes
    for code, (_, stderr) in zip(codes, outcomes, strict=True):
        if code != 0:
            assert code == 1
            assert "being written by another dirimage process" in stderr, stderr
            assert len(stderr.splitlines()) == 1, stderr

    held = (destination / "manifest.json").read_bytes()
    sources = (first_source, second_source)
    winners = [
        source
        for source, code in zip(sources, codes, strict=True)
        if code == 0 and (source / "manifest.json").read_bytes() == held
    ]
    assert len(winners) == 1, codes
    winner = winners[0]
    assert_holds_exactly(destination, winner, tmp_path / "skopeo")


def test_copy_and_delete_at_once_never_leave_half_an_image(
    big_source, dir_images, tmp_path, cli_env
):
    """While a copy holds the lock, a delete waits or fails with ImageBusy; either
    way the folder ends up holding the whole new image, or nothing of an image."""
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")

    copy = faultkit.start_dirimage(
        cli_env, "copy", "--parallel", "1", big_source, destination
    )
    delete = None
    try:
        wait_until_holding_lock(copy, destination)
        os.kill(copy.pid, signal.SIGSTOP)
        try:
            delete = faultkit.start_dirimage(cli_env, "delete", destination)
            # Give the delete time to reach the lock while the copy is frozen.
            deadline = time.monotonic() + 60
            while delete.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            files_while_frozen = set(os.listdir(destination))
        finally:
            os.kill(copy.pid, signal.SIGCONT)
        copy_out, copy_err = copy.communicate(timeout=300)
        delete_out, delete_err = delete.communicate(timeout=300)
    finally:
        faultkit.stop(copy)
        if delete is not None:
            faultkit.stop(delete)

    assert copy.returncode == 0, copy_err
    # Nothing of the previous image went while the copy held the lock.
    previous = {
        faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(dir_images["oci"])
    }
    assert previous <= files_while_frozen
    assert "manifest.json" in files_while_frozen
    if delete.returncode == 0:
        # The delete waited for the copy, then removed the whole image.
        remaining = os.listdir(destination) if destination.exists() else []
        assert not [name for name in remaining if layout.layout_kind(name)], remaining
    else:
        assert delete.returncode == 1
        lines = delete_err.splitlines()
        assert len(lines) == 1, delete_err
        assert "being written by another dirimage process" in lines[0]
        assert_holds_exactly(destination, big_source, tmp_path / "skopeo")


def test_copy_into_a_folder_being_deleted_fails_at_once(
    dir_images, fresh_image, tmp_path, cli_env
):
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    for number in range(FILLER_FILES):
        (destination / f"{layout.TEMP_PREFIX}filler-{number}").touch()
    other = fresh_image("v2s2")
    other_blobs = {faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(other)}

    delete = faultkit.start_dirimage(cli_env, "delete", "--json", destination)
    try:
        wait_until_holding_lock(delete, destination)
        os.kill(delete.pid, signal.SIGSTOP)
        try:
            copy = faultkit.dirimage(cli_env, "copy", other, destination)
            files_while_frozen = set(os.listdir(destination))
        finally:
            os.kill(delete.pid, signal.SIGCONT)
        delete_out, delete_err = delete.communicate(timeout=300)
    finally:
        faultkit.stop(delete)

    assert copy.returncode == 1, copy.stderr
    lines = copy.stderr.splitlines()
    assert len(lines) == 1, copy.stderr
    assert "being written by another dirimage process" in lines[0]
    assert f"held by process {delete.pid}" in lines[0]
    assert not files_while_frozen & other_blobs, "the refused copy wrote blobs"
    assert layout.LOCK_FILE in files_while_frozen

    assert delete.returncode == 0, delete_err
    result = json.loads(delete_out)
    assert result["folder_removed"] and result["left"] == []
    assert len(result["removed"]) > FILLER_FILES
    assert not destination.exists()


def test_delete_with_wait_deletes_the_image_a_copy_finished(
    big_source, dir_images, tmp_path, cli_env
):
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    previous = {
        faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(dir_images["oci"])
    }

    copy = faultkit.start_dirimage(
        cli_env, "copy", "--parallel", "1", big_source, destination
    )
    delete = None
    try:
        wait_until_holding_lock(copy, destination)
        os.kill(copy.pid, signal.SIGSTOP)
        try:
            delete = faultkit.start_dirimage(
                cli_env, "delete", "--wait", "240", "--json", destination
            )
            wait_until_waiting_for_lock(delete, destination)
            files_while_waiting = set(os.listdir(destination))
        finally:
            os.kill(copy.pid, signal.SIGCONT)
        copy_out, copy_err = copy.communicate(timeout=300)
        delete_out, delete_err = delete.communicate(timeout=300)
    finally:
        faultkit.stop(copy)
        if delete is not None:
            faultkit.stop(delete)

    assert previous | {"manifest.json"} <= files_while_waiting
    assert copy.returncode == 0, copy_err
    assert delete.returncode == 0, delete_err
    # The delete ran after the copy had committed: it removed the new image.
    result = json.loads(delete_out)
    new_blobs = {faultkit.blob_name(d) for d, _ in faultkit.manifest_blobs(big_source)}
    assert new_blobs | {"manifest.json", "version"} <= set(result["removed"])
    assert not (previous - new_blobs) & set(result["removed"])
    assert result["folder_removed"]
    assert not destination.exists()
