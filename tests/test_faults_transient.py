"""Faults while an image is read: transient ones are retried, damage never is.

Faults are injected by wrapping the function that opens the source's files: the
open itself fails, or the file it returns fails part way through its reads.
Tasks run on threads of this process, so the wrapper sees every open. Blob
copies, the plan (which reads the manifests) and the signature reads share one
retry policy.
"""

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import faultkit
import imagekit
import storage
import storage.files
import storage.source
from flows import copy_image
from storage import layout

MIB = 1024 * 1024


class FailingFile:
    """An open file whose reads fail with EIO once `good_reads` have succeeded,
    as a disk or NFS server that drops out in the middle of a file does."""

    def __init__(self, file, good_reads: int):
        self.file = file
        self.reads_left = good_reads

    def _count_read(self) -> None:
        if self.reads_left == 0:
            raise OSError(errno.EIO, "Input/output error (injected mid-read)")
        self.reads_left -= 1

    def readinto(self, buffer) -> int:
        self._count_read()
        return self.file.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        self._count_read()
        return self.file.read(size)

    @property
    def name(self):
        return self.file.name

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def fail_reads(
    monkeypatch, module, source: Path, name: str, failures: int, good_reads: int
) -> list[str]:
    """Make the first `failures` opens of file `name` of image `source` (through
    `module.open_inside`) return files whose reads fail after `good_reads`.

    Returns the list of opened paths, one per attempt.
    """
    real_open_inside = module.open_inside
    opened: list[str] = []
    lock = threading.Lock()

    def open_inside(root, path, what):
        file = real_open_inside(root, path, what)
        if Path(root) != source or os.path.basename(path) != name:
            return file
        with lock:
            opened.append(path)
            attempt = len(opened)
        return FailingFile(file, good_reads) if attempt <= failures else file

    monkeypatch.setattr(module, "open_inside", open_inside)
    return opened


def a_layer(source: Path) -> str:
    """The digest of the first layer of the single image in `source`."""
    return imagekit.read_manifest(source)["layers"][0]["digest"]


def layout_files(path: Path) -> dict[str, bytes]:
    return {
        entry.name: entry.read_bytes()
        for entry in path.iterdir()
        if entry.is_file() and entry.name != layout.LOCK_FILE
    }


@pytest.fixture(scope="module")
def large_layer_image(tmp_path_factory) -> Path:
    """An image whose layers are big enough to be copied one per task."""
    folder = tmp_path_factory.mktemp("large-layers")
    return imagekit.write_layered_image(folder / "image", [5 * MIB, 5 * MIB])


@pytest.fixture(params=["small-blob-batch", "large-blob-alone"])
def source_image(request, dir_images) -> Path:
    """Both kinds of copy task: small blobs share one, a large blob has its own."""
    if request.param == "small-blob-batch":
        return dir_images["oci"]
    return request.getfixturevalue("large_layer_image")


def test_transient_fault_is_retried(source_image, monkeypatch, tmp_path, prefect_api):
    digest = a_layer(source_image)
    opened = faultkit.fail_opens(
        monkeypatch, storage.source, source_image, digest, failures=2
    )
    destination = tmp_path / "copy"

    summary = copy_image(str(source_image), str(destination), retries=3, retry_delay=0)

    assert len(opened) == 3
    assert summary.blobs_copied == len(imagekit.blob_files(source_image))
    assert layout_files(destination) == layout_files(source_image)


def test_transient_fault_fails_without_retries(
    source_image, monkeypatch, tmp_path, prefect_api
):
    digest = a_layer(source_image)
    opened = faultkit.fail_opens(
        monkeypatch, storage.source, source_image, digest, failures=1
    )
    destination = tmp_path / "copy"

    with pytest.raises(OSError) as caught:
        copy_image(str(source_image), str(destination), retries=0)

    assert caught.value.errno == errno.EIO
    assert digest in str(caught.value)
    assert len(opened) == 1
    assert not (destination / "manifest.json").exists()


def test_corrupt_blob_is_not_retried_and_keeps_the_previous_image(
    dir_images, fresh_image, monkeypatch, tmp_path, prefect_api
):
    destination = tmp_path / "copy"
    copy_image(str(dir_images["oci"]), str(destination))
    previous_manifest = (destination / "manifest.json").read_bytes()

    source = fresh_image("v2s2")
    digest = a_layer(source)
    blob = source / digest.split(":")[1]
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    opened = faultkit.fail_opens(
        monkeypatch, storage.source, source, digest, failures=0
    )

    with pytest.raises(storage.DigestMismatch) as caught:
        copy_image(str(source), str(destination), retries=3, retry_delay=0)

    assert digest in str(caught.value)
    assert len(opened) == 1
    assert (destination / "manifest.json").read_bytes() == previous_manifest
    assert not (destination / digest.split(":")[1]).exists()
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")


def test_eio_in_the_middle_of_a_blob_is_retried(
    source_image, monkeypatch, tmp_path, prefect_api
):
    """A blob read that fails after its first chunk has streamed into the
    destination is retried from the start and succeeds."""
    digest = a_layer(source_image)
    opened = fail_reads(
        monkeypatch, storage.source, source_image, digest[7:], failures=2, good_reads=1
    )
    destination = tmp_path / "copy"

    summary = copy_image(str(source_image), str(destination), retries=3, retry_delay=0)

    assert len(opened) == 3
    assert summary.blobs_copied == len(imagekit.blob_files(source_image))
    assert layout_files(destination) == layout_files(source_image)


def test_eio_in_the_middle_of_a_blob_fails_without_retries(
    source_image, monkeypatch, tmp_path, prefect_api
):
    digest = a_layer(source_image)
    opened = fail_reads(
        monkeypatch, storage.source, source_image, digest[7:], failures=1, good_reads=1
    )
    destination = tmp_path / "copy"

    with pytest.raises(OSError) as caught:
        copy_image(str(source_image), str(destination), retries=0)

    assert caught.value.errno == errno.EIO
    assert digest in str(caught.value)
    assert len(opened) == 1
    assert not (destination / "manifest.json").exists()
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []


def fail_kernel_copies(monkeypatch, blob: Path, failures: int, after: int) -> list:
    """Make the first `failures` kernel copies out of file `blob` that start at or
    beyond byte `after` fail with EIO, as a disk dropping out part way through
    does. Returns the list the failed offsets are appended to."""
    real_copy = os.copy_file_range
    failed: list[int] = []
    lock = threading.Lock()

    def copy_file_range(source, sink, count, offset_source=None, *rest):
        if offset_source is not None and offset_source >= after:
            if os.readlink(f"/proc/self/fd/{source}") == str(blob):
                with lock:
                    failing = len(failed) < failures
                    if failing:
                        failed.append(offset_source)
                if failing:
                    raise OSError(errno.EIO, "Input/output error (injected)")
        return real_copy(source, sink, count, offset_source, *rest)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return failed


@pytest.mark.parametrize("retries", [3, 0])
def test_eio_in_the_middle_of_a_kernel_copy(
    large_layer_image, monkeypatch, tmp_path, prefect_api, retries
):
    """A blob the kernel copies in windows fails after two of them: with
    retries it is copied again from the start; without, the copy fails naming
    the blob and leaves no partial file."""
    monkeypatch.setattr(storage.files, "COPY_WINDOW", MIB)
    digest = a_layer(large_layer_image)
    blob = large_layer_image / digest[7:]
    failed = fail_kernel_copies(monkeypatch, blob, failures=2, after=2 * MIB)
    destination = tmp_path / "copy"

    if retries:
        copy_image(str(large_layer_image), str(destination), retries=3, retry_delay=0)
        assert failed == [2 * MIB, 2 * MIB]
        assert layout_files(destination) == layout_files(large_layer_image)
        return

    with pytest.raises(OSError) as caught:
        copy_image(str(large_layer_image), str(destination), retries=0)
    assert caught.value.errno == errno.EIO
    assert digest in str(caught.value)
    assert failed == [2 * MIB]
    assert not (destination / "manifest.json").exists()
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []


@pytest.mark.parametrize(
    "kind, name",
    [
        ("oci", "manifest.json"),
        ("index", "instance manifest"),
        ("signed", "signature-1"),
    ],
)
def test_eio_reading_a_manifest_or_signature_is_retried(
    dir_images, monkeypatch, tmp_path, prefect_api, kind, name
):
    """The plan (manifests) and the signature reads retry transient errors as
    the blob copies do."""
    source = dir_images[kind]
    if name == "instance manifest":
        name = sorted(p.name for p in source.glob("*.manifest.json"))[0]
    opened = fail_reads(
        monkeypatch, storage.files, source, name, failures=2, good_reads=0
    )
    destination = tmp_path / "copy"

    copy_image(str(source), str(destination), retries=3, retry_delay=0)

    assert len(opened) == 3
    assert layout_files(destination) == layout_files(source)


@pytest.mark.parametrize(
    "kind, name", [("oci", "manifest.json"), ("signed", "signature-2")]
)
def test_eio_reading_a_manifest_or_signature_fails_without_retries(
    dir_images, fresh_image, monkeypatch, tmp_path, prefect_api, kind, name
):
    """Without retries the copy fails naming the file, and the destination keeps
    its previous image, signatures included."""
    source = dir_images[kind]
    destination = fresh_image("signed")
    before = layout_files(destination)
    opened = fail_reads(
        monkeypatch, storage.files, source, name, failures=1, good_reads=0
    )

    with pytest.raises(OSError) as caught:
        copy_image(str(source), str(destination), retries=0)

    assert caught.value.errno == errno.EIO
    assert name in str(caught.value)
    assert len(opened) == 1
    assert layout_files(destination) == before


def task_run_names(flow_run_id, until: str) -> list[str]:
    """Names of the task runs of a flow run, once one named `until` is recorded:
    task runs reach the server as events, after the flow has returned."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=runs_filter)
            names = [run.name for run in runs]
            if any(name.startswith(until) for name in names):
                return names
            assert time.monotonic() < deadline, f"no {until} run reached the API"
            time.sleep(0.5)


def test_commit_task_runs_name_their_instance_or_top(dir_images, tmp_path, prefect_api):
    """Runs of the manifest and signature tasks say which manifest they are for:
    an instance's digest, or `top` for the image's own."""
    source = dir_images["index"]
    state = copy_image(str(source), str(tmp_path / "copy"), return_state=True)
    assert state.is_completed()

    names = task_run_names(state.state_details.flow_run_id, until="remove_unused")

    instances = [i.digest for i in storage.plan_image(str(source)).instances]
    assert "put_manifest-top" in names and "get_signatures-top" in names
    for digest in instances:
        assert f"put_manifest-{digest}" in names
        assert f"get_signatures-{digest}" in names
    for task_name in ("stage_signatures", "install_signatures"):
        assert any(name.startswith(task_name) for name in names), names
    assert not [name for name in names if name.endswith("None")], names
