"""The copy_image flow on images that real skopeo made.

Copies are byte-identical and skopeo reads them; one platform comes out of a list
as a single image; blob copies overlap; a rerun after an interruption copies only
what is missing; a locked destination and the copies that make no sense are
refused without touching anything.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import imagekit
import prefectapi
import storage
import tasks
from flows import copy_image, verify_image
from storage import layout
from storage.transfer import COPIED, REUSED

MIB = 1024 * 1024
DIRIMAGE = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "dirimage"
BLOB_NAME = re.compile(r"[0-9a-f]{64}")


def layout_files(path: Path) -> dict[str, bytes]:
    """Every file of an image folder by name, apart from the lock file."""
    return {
        entry.name: entry.read_bytes()
        for entry in Path(path).iterdir()
        if entry.is_file() and entry.name != layout.LOCK_FILE
    }


def expected_copy(source: Path, kind: str) -> dict[str, bytes]:
    """The files a copy of `source` must hold: legacy layouts come out as 1.1."""
    files = layout_files(source)
    if kind in imagekit.LEGACY_KINDS:
        files = {name.removesuffix(".tar"): data for name, data in files.items()}
        files["version"] = imagekit.DIR_VERSION_1_1.encode()
    return files


def assert_same_files(actual: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert sorted(actual) == sorted(expected)
    assert [name for name in expected if actual[name] != expected[name]] == []


def overlapping_pairs(transfers) -> int:
    """How many pairs of transfers ran at the same time, by their intervals."""
    count = 0
    for index, first in enumerate(transfers):
        for second in transfers[index + 1 :]:
            if (
                first.started < second.started + second.seconds
                and second.started < first.started + first.seconds
            ):
                count += 1
    return count


@pytest.mark.parametrize("kind", imagekit.KINDS)
def test_copy_is_byte_identical_and_skopeo_reads_it(
    kind, dir_images, tmp_path, prefect_api
):
    source = dir_images[kind]
    destination = tmp_path / "copy"

    summary = copy_image(str(source), str(destination))

    assert_same_files(layout_files(destination), expected_copy(source, kind))
    assert set(os.listdir(destination)) - set(layout_files(destination)) <= {
        layout.LOCK_FILE
    }
    manifest = (source / "manifest.json").read_bytes()
    assert summary.manifest_digest == str(storage.manifest_digest(manifest))
    blob_count = len(imagekit.blob_files(destination))
    assert (summary.blobs_copied, summary.blobs_reused) == (blob_count, 0)
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_signatures_still_verify_on_the_copy(dir_images, tmp_path, prefect_api):
    source = dir_images["signed"]
    signing = imagekit.read_signing_info(source)
    destination = tmp_path / "copy"

    summary = copy_image(f"dir:{source}", f"dir:{destination}")

    assert summary.signatures == len(signing.signatures) == 2
    for signature in signing.signatures:
        assert signing.signs(destination, signature.name)


@pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
def test_platform_copies_one_instance_as_a_single_image(
    kind, dir_images, tmp_path, prefect_api
):
    source = dir_images[kind]
    top = imagekit.read_manifest(source)
    (arm64,) = [
        entry
        for entry in top["manifests"]
        if entry["platform"]["architecture"] == "arm64"
    ]
    instance_hex = arm64["digest"].split(":")[1]
    instance_bytes = (source / f"{instance_hex}.manifest.json").read_bytes()
    instance = json.loads(instance_bytes)
    wanted_blobs = {instance["config"]["digest"].split(":")[1]} | {
        layer["digest"].split(":")[1] for layer in instance["layers"]
    }
    destination = tmp_path / "copy"

    summary = copy_image(str(source), str(destination), platform="linux/arm64")

    assert summary.manifest_digest == arm64["digest"]
    assert (destination / "manifest.json").read_bytes() == instance_bytes
    assert list(destination.glob("*.manifest.json")) == []
    copied = {blob.name: blob.read_bytes() for blob in imagekit.blob_files(destination)}
    assert set(copied) == wanted_blobs
    assert all(data == (source / name).read_bytes() for name, data in copied.items())
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_absent_platform_fails_listing_the_offered_ones(
    dir_images, tmp_path, prefect_api
):
    destination = tmp_path / "copy"

    with pytest.raises(storage.ImageError) as caught:
        copy_image(str(dir_images["index"]), str(destination), platform="linux/s390x")

    message = str(caught.value)
    assert "linux/s390x" in message
    assert "linux/amd64" in message and "linux/arm64/v8" in message
    assert not destination.exists()


def test_remove_signatures_leaves_no_signature_files(dir_images, tmp_path, prefect_api):
    source = dir_images["signed"]
    destination = tmp_path / "copy"
    copy_image(str(source), str(destination))
    assert len(list(destination.glob("signature-*"))) == 2

    summary = copy_image(str(source), str(destination), remove_signatures=True)

    assert summary.signatures == 0
    assert list(destination.glob("*signature-*")) == []
    assert summary.blobs_copied == 0 and summary.blobs_reused > 0
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


@pytest.fixture(scope="module")
def layered_image(tmp_path_factory) -> Path:
    """An image of four 24 MiB layers: each copy takes long enough to be seen."""
    folder = tmp_path_factory.mktemp("layered")
    return imagekit.write_layered_image(folder / "image", [24 * MIB] * 4)


def test_blob_copies_overlap_in_time(layered_image, tmp_path, prefect_api):
    summary = copy_image(str(layered_image), str(tmp_path / "copy"), parallel=4)

    large = [t for t in summary.transfers if t.size >= 24 * MIB]
    assert len(large) == 4 and all(t.action == COPIED for t in large)
    assert overlapping_pairs(large) >= 1


def test_copy_table_artifact_on_the_api(dir_images, tmp_path, prefect_api):
    state = copy_image(
        str(dir_images["index"]), str(tmp_path / "copy"), return_state=True
    )

    summary = state.result()
    rows = prefectapi.table_rows(state.state_details.flow_run_id)
    assert rows == [
        {
            "blob": transfer.digest,
            "size": transfer.size,
            "action": "copied",
            "seconds": round(transfer.seconds, 3),
            "worker": transfer.worker,
        }
        for transfer in summary.transfers
    ]
    planned = storage.plan_image(str(dir_images["index"])).blobs
    assert sorted(row["blob"] for row in rows) == sorted(b.digest for b in planned)
    assert {row["size"] for row in rows} == {b.size for b in planned}


def test_blob_tasks_are_named_by_digest_with_the_retry_policy(
    layered_image, tmp_path, prefect_api
):
    state = copy_image(
        str(layered_image),
        str(tmp_path / "copy"),
        retries=3,
        retry_delay=2.0,
        retry_jitter=0.25,
        return_state=True,
    )

    digests = sorted(
        blob.digest for blob in storage.plan_image(str(layered_image)).blobs
    )
    runs = prefectapi.task_runs(state.state_details.flow_run_id, "copy_blob", 5)
    # One task per blob: the four layers are large, the config alone in its batch.
    assert [run.name for run in runs] == [f"copy_blob-{d[:19]}" for d in digests]
    assert all(re.fullmatch(r"copy_blob-sha256:[0-9a-f]{12}", r.name) for r in runs)
    for run in runs:
        policy = run.empirical_policy
        assert policy.retries == 3
        assert policy.retry_delay == [2.0, 4.0, 8.0]
        assert policy.retry_jitter_factor == 0.25


def test_retry_options_of_the_blob_tasks():
    from flows.copy import _copy_task

    for single, task in ((True, tasks.copy_blob), (False, tasks.copy_blobs)):
        configured = _copy_task(4, 0.5, 0.5, single=single)
        assert configured.name == task.name
        assert configured.retries == 4
        assert configured.retry_delay_seconds == [0.5, 1.0, 2.0, 4.0]
        assert configured.retry_jitter_factor == 0.5
        assert configured.retry_condition_fn is tasks.retry_transient

        without_jitter = _copy_task(2, 3.0, 0.0, single=single)
        assert without_jitter.retry_delay_seconds == [3.0, 6.0]
        assert without_jitter.retry_jitter_factor is None
        assert _copy_task(0, 3.0, 0.5, single=single).retries == 0


def test_blob_copies_do_not_overlap_one_at_a_time(layered_image, tmp_path, prefect_api):
    summary = copy_image(str(layered_image), str(tmp_path / "copy"), parallel=1)

    assert len(summary.transfers) == 5
    assert overlapping_pairs(summary.transfers) == 0


def test_rerun_copies_only_missing_and_damaged_blobs(dir_images, tmp_path, prefect_api):
    source = dir_images["index"]
    digests = sorted(blob.digest for blob in storage.plan_image(str(source)).blobs)
    assert len(digests) >= 4

    # What an interrupted copy leaves: the version file, some verified blobs, a
    # blob cut short, and a temporary file it was writing when it stopped.
    destination = tmp_path / "copy"
    destination.mkdir()
    (destination / "version").write_text(imagekit.DIR_VERSION_1_1)
    kept, truncated = digests[:2], digests[2]
    for digest in kept:
        name = digest.split(":")[1]
        shutil.copyfile(source / name, destination / name)
    truncated_name = truncated.split(":")[1]
    whole = (source / truncated_name).read_bytes()
    (destination / truncated_name).write_bytes(whole[: len(whole) // 2])
    leftover = destination / f"{layout.TEMP_PREFIX}interrupted"
    leftover.write_bytes(whole[:100])

    summary = copy_image(str(source), str(destination))

    actions = {transfer.digest: transfer.action for transfer in summary.transfers}
    assert sorted(actions) == digests
    assert {d for d, action in actions.items() if action == REUSED} == set(kept)
    assert {d for d, action in actions.items() if action == COPIED} == set(digests[2:])
    assert (summary.blobs_reused, summary.blobs_copied) == (2, len(digests) - 2)
    assert leftover.name in summary.removed_files
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []
    assert_same_files(layout_files(destination), layout_files(source))


def test_killed_copy_is_resumed_by_a_rerun(tmp_path, cli_env):
    source = imagekit.write_layered_image(tmp_path / "big", [8 * MIB] * 25)
    destination = tmp_path / "copy"
    command = [str(DIRIMAGE), "copy", str(source), str(destination), "--parallel", "2"]

    process = subprocess.Popen(
        command,
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        landed = []
        deadline = time.monotonic() + 180
        while not landed and process.poll() is None and time.monotonic() < deadline:
            if destination.is_dir():
                landed = [n for n in os.listdir(destination) if BLOB_NAME.fullmatch(n)]
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert landed, f"no blob landed before the copy ended: {stderr.decode()}"
    assert process.returncode == -signal.SIGKILL
    assert not (destination / "manifest.json").exists()

    summary = copy_image(str(source), str(destination))

    assert summary.blobs_reused >= 1
    assert summary.blobs_reused + summary.blobs_copied == 26
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []
    assert verify_image(str(destination)).ok
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_copy_into_a_locked_destination_fails_at_once(
    dir_images, tmp_path, prefect_api
):
    destination = tmp_path / "copy"
    copy_image(str(dir_images["oci"]), str(destination))
    before = layout_files(destination)

    with storage.ImageLock(str(destination)):
        with pytest.raises(storage.ImageBusy) as caught:
            copy_image(str(dir_images["v2s2"]), str(destination))

    assert str(destination) in str(caught.value)
    assert layout_files(destination) == before


def test_copy_onto_itself_is_refused(fresh_image, tmp_path, prefect_api):
    source = fresh_image("oci")
    before = layout_files(source)
    alias = tmp_path / "alias"
    alias.symlink_to(source)

    for destination in (str(source), f"dir:{source}", str(alias)):
        with pytest.raises(ValueError, match="onto itself"):
            copy_image(str(source), destination)

    assert layout_files(source) == before


def test_copy_into_a_folder_inside_the_source_is_refused(fresh_image, prefect_api):
    source = fresh_image("oci")
    before = layout_files(source)

    with pytest.raises(ValueError, match="inside"):
        copy_image(str(source), str(source / "nested"))

    assert not (source / "nested").exists()
    assert layout_files(source) == before


def test_copy_into_a_folder_without_an_image_is_refused(
    dir_images, tmp_path, prefect_api
):
    destination = tmp_path / "notes"
    destination.mkdir()
    (destination / "todo.txt").write_text("not an image\n")

    with pytest.raises(storage.FolderNotEmpty, match=str(destination)):
        copy_image(str(dir_images["oci"]), str(destination))

    assert os.listdir(destination) == ["todo.txt"]
    assert (destination / "todo.txt").read_text() == "not an image\n"


def test_copy_from_a_folder_without_an_image_is_refused(tmp_path, prefect_api):
    source = tmp_path / "notes"
    source.mkdir()
    (source / "todo.txt").write_text("not an image\n")
    destination = tmp_path / "copy"

    with pytest.raises(storage.NotAnImage, match=str(source)):
        copy_image(str(source), str(destination))

    assert not destination.exists()
