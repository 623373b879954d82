"""Faults while a blob is read: transient ones are retried, damage never is.

Faults are injected by wrapping the function that DirImageSource uses to open a
blob. Tasks run on threads of this process, so the wrapper sees every open.
"""

import errno
import os
import threading
from pathlib import Path

import pytest

import imagekit
import storage
import storage.source
from flows import copy_image
from storage import layout

MIB = 1024 * 1024


def count_opens(monkeypatch, source: Path, digest: str, failures: int) -> list[str]:
    """Count opens of blob `digest` in image `source`; fail the first `failures`.

    Returns the list the opened paths are appended to, one per attempt.
    """
    real_open_inside = storage.source.open_inside
    blob_name = digest.split(":")[1]
    opened: list[str] = []
    lock = threading.Lock()

    def open_inside(root, path, what):
        if Path(root) == source and os.path.basename(path).startswith(blob_name):
            with lock:
                opened.append(path)
                attempt = len(opened)
            if attempt <= failures:
                raise OSError(errno.EIO, "Input/output error (injected)")
        return real_open_inside(root, path, what)

    monkeypatch.setattr(storage.source, "open_inside", open_inside)
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
    opened = count_opens(monkeypatch, source_image, digest, failures=2)
    destination = tmp_path / "copy"

    summary = copy_image(str(source_image), str(destination), retries=3, retry_delay=0)

    assert len(opened) == 3
    assert summary.blobs_copied == len(imagekit.blob_files(source_image))
    assert layout_files(destination) == layout_files(source_image)


def test_transient_fault_fails_without_retries(
    source_image, monkeypatch, tmp_path, prefect_api
):
    digest = a_layer(source_image)
    opened = count_opens(monkeypatch, source_image, digest, failures=1)
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
    opened = count_opens(monkeypatch, source, digest, failures=0)

    with pytest.raises(storage.DigestMismatch) as caught:
        copy_image(str(source), str(destination), retries=3, retry_delay=0)

    assert digest in str(caught.value)
    assert len(opened) == 1
    assert (destination / "manifest.json").read_bytes() == previous_manifest
    assert not (destination / digest.split(":")[1]).exists()
    assert list(destination.glob(f"{layout.TEMP_PREFIX}*")) == []
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo")
