"""A destination without room: a one-line error naming the blob, no partial blob or
temporary file left, and the image that was there before still whole.

Two ways to run out: a real 8 MiB tmpfs (needs root; skipped where mounting is not
permitted, failed under CI), and a file size limit set with `setrlimit` in the
`dirimage` process, which works anywhere.
"""

import resource
import signal
import subprocess
from pathlib import Path

import pytest

import faultkit
import imagekit
import storage

MIB = 1024 * 1024


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for the test and unmounted afterwards."""
    options = ["-t", "tmpfs", "-o", "size=8m", "tmpfs"]
    with faultkit.mounted(options, tmp_path / "small-disk") as folder:
        yield folder


def image_state(folder: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()}


def assert_clean_failure(result, destination: Path, before: dict, workdir: Path):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "copying blob sha256:" in lines[0], lines[0]
    assert str(destination) in lines[0], lines[0]

    after = image_state(destination)
    for name, content in before.items():
        assert after.get(name) == content, f"{name} of the previous image changed"
    assert faultkit.temporary_files(destination) == []
    assert faultkit.corrupt_blobs(destination) == []
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, workdir)


def test_full_tmpfs_fails_cleanly(small_tmpfs, dir_images, tmp_path, cli_env):
    destination = imagekit.copy_image(dir_images["oci"], small_tmpfs / "image")
    before = image_state(destination)
    # 12 MiB of layers cannot fit in 8 MiB, whichever order they land in.
    source = faultkit.make_synthetic_image(tmp_path / "big", [3 * MIB] * 4, "big")

    result = faultkit.dirimage(cli_env, "copy", source, destination)

    assert "No space left on device" in result.stderr
    assert_clean_failure(result, destination, before, tmp_path / "skopeo")


def test_full_tmpfs_reports_the_failing_blob_through_storage(
    small_tmpfs, dir_images, tmp_path
):
    destination = imagekit.copy_image(dir_images["oci"], small_tmpfs / "image")
    source = faultkit.make_synthetic_image(tmp_path / "huge", [10 * MIB], "huge")
    digest, size = faultkit.manifest_blobs(source)[1]

    with pytest.raises(OSError, match=f"copying blob {digest}") as caught:
        storage.transfer_blob(str(source), str(destination), digest, size)

    assert caught.value.errno == 28  # ENOSPC
    assert not storage.is_transient(caught.value)
    assert faultkit.temporary_files(destination) == []
    assert not (destination / faultkit.blob_name(digest)).exists()


def _limit_file_size(limit: int):
    def limit_in_child() -> None:
        # Ignored, SIGXFSZ turns into EFBIG from write(2) instead of a kill.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


def test_file_size_limit_fails_cleanly(dir_images, tmp_path, cli_env):
    destination = imagekit.copy_image(dir_images["oci"], tmp_path / "destination")
    before = image_state(destination)
    source = faultkit.make_synthetic_image(tmp_path / "big", [1 * MIB, 6 * MIB], "fs")

    result = subprocess.run(
        [faultkit.DIRIMAGE, "copy", str(source), str(destination)],
        capture_output=True,
        text=True,
        env=cli_env,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
        preexec_fn=_limit_file_size(4 * MIB),
    )

    assert "File too large" in result.stderr
    assert_clean_failure(result, destination, before, tmp_path / "skopeo")
    # The blob under the limit landed whole; a rerun would reuse it.
    small_digest = faultkit.manifest_blobs(source)[1][0]
    assert (destination / faultkit.blob_name(small_digest)).exists()
