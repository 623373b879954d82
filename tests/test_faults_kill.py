"""A copy killed with SIGKILL never costs the destination its previous image.

Real `dirimage copy` processes are killed at points drawn from a seeded generator
(after a share of the blobs has landed), and at exact points of the commit (a
process that kills itself there: before, inside and after the manifest write,
around the version write, between the commit and the signatures, before the
cleanup). Before the commit the destination's previous image is still whole and
readable by skopeo; after it, the new one is. At every point our own reader and
check_image accept the folder as one image or the other, no blob file holds bytes
other than its name says, and a rerun finishes the copy, copying only what was
missing.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faultkit
import imagekit
import storage

MIB = 1024 * 1024
KILL_SEED = 20260
# One kill point in each band of the copy's progress, drawn from a seeded generator.
_KILL_POINTS = random.Random(KILL_SEED)
BLOB_KILL_POINTS = [
    _KILL_POINTS.uniform(low, high)
    for low, high in ((0.1, 0.35), (0.35, 0.6), (0.6, 0.9))
]
WATCH_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    """A 20-layer image of 160 MiB, built once for the module."""
    folder = tmp_path_factory.mktemp("kill") / "big"
    return faultkit.make_synthetic_image(folder, [8 * MIB] * 20, "kill")


@pytest.fixture
def previous_image(dir_images, tmp_path) -> Path:
    """A destination already holding another image, the one a kill must not harm."""
    return imagekit.copy_image(dir_images["oci"], tmp_path / "destination")


def new_blob_names(source: Path) -> set[str]:
    return {faultkit.blob_name(digest) for digest, _ in faultkit.manifest_blobs(source)}


def landed(destination: Path, names: set[str]) -> set[str]:
    return names & set(os.listdir(destination))


def assert_image_whole(destination: Path, manifest: bytes, workdir: Path) -> None:
    """`destination` holds the image of `manifest`, whole and readable by skopeo,
    and no blob file in it is corrupt."""
    assert (destination / "manifest.json").read_bytes() == manifest
    assert faultkit.corrupt_blobs(destination) == []
    assert storage.check_image(str(destination)) == []
    imagekit.skopeo_accepts(destination, workdir)


def rerun(env: dict, source: Path, destination: Path) -> dict:
    result = faultkit.dirimage(env, "copy", "--json", source, destination)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "fraction", BLOB_KILL_POINTS, ids=lambda f: f"{round(f * 100)}pct"
)
def test_kill_while_blobs_land(fraction, big_image, previous_image, tmp_path, cli_env):
    destination = previous_image
    previous_manifest = (destination / "manifest.json").read_bytes()
    names = new_blob_names(big_image)
    threshold = math.ceil(fraction * len(names))

    process = faultkit.start_dirimage(
        cli_env, "copy", "--parallel", "2", big_image, destination
    )
    try:
        deadline = time.monotonic() + WATCH_TIMEOUT_SECONDS
        while len(landed(destination, names)) < threshold:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the copy made no progress"
            time.sleep(0.005)
        assert process.poll() is None, "the copy finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        faultkit.stop(process)
    assert process.returncode == -signal.SIGKILL

    present = landed(destination, names)
    assert threshold <= len(present) < len(names)
    assert_image_whole(destination, previous_manifest, tmp_path / "skopeo-after-kill")

    summary = rerun(cli_env, big_image, destination)

    assert summary["blobs_reused"] == len(present)
    assert summary["blobs_copied"] == len(names) - len(present)
    source_manifest = (big_image / "manifest.json").read_bytes()
    assert_image_whole(destination, source_manifest, tmp_path / "skopeo-after-rerun")
    assert faultkit.temporary_files(destination) == []
    assert set(os.listdir(destination)) - names <= {
        "manifest.json",
        "version",
        ".dirimage.lock",
    }


# A `dirimage copy` that kills itself at one exact point of the commit: the command
# line runs as usual, with one storage method wrapped.
SELF_KILL_SCRIPT = """
import os, signal, sys, tempfile
import storage.destination as destination
from flows.cli import main

point = sys.argv[1]
Destination = destination.DirImageDestination
original_put_manifest = Destination.put_manifest
original_put_version = Destination.put_version
original_install_signatures = Destination.install_signatures
original_remove_unused = Destination.remove_unused


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def put_manifest(self, data, instance=None, layout_version=None):
    if instance is None and point == "before-manifest":
        die()
    if instance is None and point == "manifest-half-written":
        # The state a kill inside write_atomically leaves: a temporary file
        # holding part of the new manifest, not yet renamed.
        descriptor, _ = tempfile.mkstemp(prefix=".dirimage-tmp-", dir=self.path)
        os.write(descriptor, data[: len(data) // 2])
        os.fsync(descriptor)
        die()
    return original_put_manifest(self, data, instance, layout_version)


def put_version(self, version):
    if point == "before-version":
        die()
    original_put_version(self, version)
    if point == "after-version":
        die()


def install_signatures(self, staged, instance=None):
    if point == "before-signatures":
        die()
    return original_install_signatures(self, staged, instance)


def remove_unused(self, keep):
    if point == "before-cleanup":
        die()
    return original_remove_unused(self, keep)


Destination.put_manifest = put_manifest
Destination.put_version = put_version
Destination.install_signatures = install_signatures
Destination.remove_unused = remove_unused
sys.exit(main(["copy", *sys.argv[2:]]))
"""


def copy_killed_at(point: str, source: Path, destination: Path, env: dict) -> None:
    """Run `dirimage copy` that kills itself at `point` of the commit."""
    result = subprocess.run(
        [sys.executable, "-c", SELF_KILL_SCRIPT, point, str(source), str(destination)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.mark.parametrize(
    "point", ["before-manifest", "manifest-half-written", "before-cleanup"]
)
def test_kill_during_commit(point, fresh_image, previous_image, tmp_path, cli_env):
    source = fresh_image("index")
    destination = previous_image
    previous_manifest = (destination / "manifest.json").read_bytes()
    previous_blobs = {path.name for path in imagekit.blob_files(destination)}
    source_manifest = (source / "manifest.json").read_bytes()

    copy_killed_at(point, source, destination, cli_env)

    committed = point == "before-cleanup"
    expected = source_manifest if committed else previous_manifest
    assert_image_whole(destination, expected, tmp_path / "skopeo-after-kill")
    if point == "manifest-half-written":
        assert len(faultkit.temporary_files(destination)) == 1

    summary = rerun(cli_env, source, destination)

    # Every blob landed before the kill, so the rerun only reuses them.
    assert summary["blobs_copied"] == 0
    assert summary["blobs_reused"] == len(storage.plan_image(str(source)).blobs)
    assert_image_whole(destination, source_manifest, tmp_path / "skopeo-after-rerun")
    assert faultkit.temporary_files(destination) == []
    # What only the previous image used is gone now that the new one is committed.
    new_blobs = {path.name for path in imagekit.blob_files(source)}
    assert not (previous_blobs - new_blobs) & set(os.listdir(destination))


def test_kill_before_commit_keeps_the_previous_signatures(
    fresh_image, dir_images, tmp_path, cli_env
):
    """Signatures belong to the manifest they sign: until the new manifest is
    committed, the previous image keeps its own."""
    destination = imagekit.copy_image(dir_images["signed"], tmp_path / "destination")
    before = {p.name: p.read_bytes() for p in destination.iterdir()}
    source = fresh_image("oci")

    copy_killed_at("before-manifest", source, destination, cli_env)

    for name, content in before.items():
        assert (destination / name).read_bytes() == content, f"{name} changed"
    assert imagekit.read_signing_info(dir_images["signed"]).signs(destination)


def test_unreadable_source_signature_keeps_the_previous_signatures(
    fresh_image, dir_images, tmp_path, cli_env
):
    """A source signature that cannot be read fails the copy before any signature
    of the previous image is replaced."""
    destination = imagekit.copy_image(dir_images["signed"], tmp_path / "destination")
    before = {p.name: p.read_bytes() for p in destination.iterdir()}
    source = fresh_image("index")
    instance = json.loads((source / "manifest.json").read_bytes())["manifests"][0]
    oversize = source / f"{faultkit.blob_name(instance['digest'])}.signature-1"
    oversize.write_bytes(b"\0" * (storage.source.SIGNATURE_SIZE_LIMIT + 1))

    result = faultkit.dirimage(cli_env, "copy", source, destination)

    assert result.returncode == 1, result.stderr
    assert "limit" in result.stderr and len(result.stderr.splitlines()) == 1
    for name, content in before.items():
        assert (destination / name).read_bytes() == content, f"{name} changed"


def test_kill_between_commit_and_signatures_is_repaired_by_the_rerun(
    fresh_image, dir_images, tmp_path, cli_env
):
    """The new signatures wait in fsynced temporary files during the commit and
    are renamed into place right after it. A kill in between leaves the new
    manifest beside the previous image's signatures, a folder our reader takes
    for the new image; the rerun installs the right signatures, removes the
    surplus and the killed copy's temporary files."""
    source = dir_images["signed"]
    destination = fresh_image("oci")
    old_signatures = [f"previous signature {n}\n".encode() for n in (1, 2, 3)]
    for number, content in enumerate(old_signatures, start=1):
        (destination / f"signature-{number}").write_bytes(content)
    new_signatures = storage.DirImageSource(str(source)).get_signatures()
    assert len(new_signatures) == 2

    copy_killed_at("before-signatures", source, destination, cli_env)

    assert (destination / "manifest.json").read_bytes() == (
        source / "manifest.json"
    ).read_bytes()
    assert storage.DirImageSource(str(destination)).get_signatures() == old_signatures
    staged = faultkit.temporary_files(destination)
    assert sorted((destination / name).read_bytes() for name in staged) == sorted(
        new_signatures
    )
    assert faultkit.corrupt_blobs(destination) == []
    assert storage.check_image(str(destination)) == []

    summary = rerun(cli_env, source, destination)

    assert summary["signatures"] == 2
    assert storage.DirImageSource(str(destination)).get_signatures() == new_signatures
    assert not (destination / "signature-3").exists()
    assert faultkit.temporary_files(destination) == []
    assert imagekit.read_signing_info(source).signs(destination)
    imagekit.skopeo_accepts(destination, tmp_path / "skopeo-after-rerun")


@pytest.mark.parametrize("point", ["before-version", "after-version"])
@pytest.mark.parametrize("kind", ["legacy-1.0", "legacy-2016"])
def test_kill_around_the_version_write_of_a_legacy_upgrade(
    point, kind, fresh_image, tmp_path, cli_env
):
    """Copying over a 1.0 or 2016 image records version 1.1. Killed just before
    or just after that write, the folder reads as the previous image (its `.tar`
    layers found) or as the new one, never as neither; the rerun finishes."""
    destination = fresh_image(kind)
    previous_manifest = (destination / "manifest.json").read_bytes()
    source = fresh_image("oci")
    source_manifest = (source / "manifest.json").read_bytes()

    copy_killed_at(point, source, destination, cli_env)

    manifest = storage.DirImageSource(str(destination)).get_manifest()
    assert manifest in (previous_manifest, source_manifest)
    assert storage.check_image(str(destination)) == []
    assert faultkit.corrupt_blobs(destination) == []
    if manifest == source_manifest:
        imagekit.skopeo_accepts(destination, tmp_path / "skopeo-after-kill")

    rerun(cli_env, source, destination)

    assert (destination / "version").read_bytes() == faultkit.VERSION_1_1
    assert not list(destination.glob("*.tar"))
    assert_image_whole(destination, source_manifest, tmp_path / "skopeo-after-rerun")
