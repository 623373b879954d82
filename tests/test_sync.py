"""Mirroring trees of real skopeo-made images with sync_images."""

import ctypes
import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import faultkit
import imagekit
import prefectapi
import storage
from storage import link as storage_link
from storage.layout import LOCK_FILE

MIB = 1024 * 1024
# Relative path in the tree, OCI layout tag, extra skopeo arguments.
TREE = (
    ("base", "base", ()),
    ("team/app-one", "app-one", ()),
    ("team/nested/deep/app-two", "app-two", ("--format", "v2s2")),
    ("multi/index", imagekit.INDEX_TAG, ("--all",)),
    ("platforms/amd64", "amd64", ()),
)


def derive_image(layout_reference: str, new_tag: str, files: dict, workdir: Path):
    """Tag `new_tag` as the image of `layout_reference` plus a layer of `files`.

    The new image shares every layer of the one it derives from.
    """
    umoci = imagekit.require_tool("umoci")
    layout = layout_reference.rpartition(":")[0]
    env = imagekit.tool_env(workdir)
    imagekit.run_tool([umoci, "tag", "--image", layout_reference, new_tag], env=env)
    bundle = workdir / f"bundle-{new_tag}"
    image = f"{layout}:{new_tag}"
    imagekit.run_tool(
        [umoci, "unpack", "--rootless", "--image", image, str(bundle)], env=env
    )
    for relative, content in files.items():
        target = bundle / "rootfs" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    imagekit.run_tool([umoci, "repack", "--image", image, str(bundle)], env=env)
    shutil.rmtree(bundle)
    return image


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """A tree of five images at depths 1 to 4, built once; copy it, never modify it.

    base, app-one and app-two share base's two layers; app-two is Docker schema 2;
    multi/index is an OCI index over amd64 and arm64; platforms/amd64 is the
    index's amd64 instance on its own, so it shares all its blobs with it.
    """
    imagekit.require_tool("skopeo")
    workdir = tmp_path_factory.mktemp("tree-build")
    base = imagekit.build_oci_layout(workdir, name="base")
    derive_image(base, "app-one", {"app/one.txt": "one\n"}, workdir)
    derive_image(base, "app-two", {"app/two.txt": "two\n"}, workdir)
    imagekit.build_oci_layout(workdir, name="amd64", arch="amd64")
    arm64 = imagekit.build_oci_layout(workdir, name="arm64", arch="arm64")
    imagekit.add_oci_index(
        arm64,
        {
            "amd64": {"architecture": "amd64", "os": "linux"},
            "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
        },
    )
    layout = workdir / "layout"

    root = workdir / "root"
    for relative, tag, arguments in TREE:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        imagekit.skopeo_copy_to_dir(
            f"oci:{layout}:{tag}", root / relative, workdir, list(arguments)
        )
    (root / "docs").mkdir()
    (root / "docs" / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture
def source(image_tree, tmp_path) -> Path:
    return Path(shutil.copytree(image_tree, tmp_path / "source", symlinks=True))


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under root with its inode, size and modification time."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            files[os.path.relpath(path, root)] = (
                info.st_ino,
                info.st_size,
                info.st_mtime_ns,
            )
    return files


def image_files(image: Path) -> dict[str, bytes]:
    return {
        entry.name: entry.read_bytes()
        for entry in image.iterdir()
        if entry.is_file() and entry.name != LOCK_FILE
    }


def blob_digests(image: Path) -> set[str]:
    return {blob.name for blob in imagekit.blob_files(image)}


def statuses(summary) -> dict[str, str]:
    return {image.image: image.status for image in summary.images}


def test_sync_copies_every_image_reading_shared_blobs_once(
    source, tmp_path, prefect_api
):
    from flows.sync import sync_images

    destination = tmp_path / "mirror"

    summary = sync_images(str(source), str(destination))

    names = [relative for relative, _, _ in TREE]
    assert statuses(summary) == {name: "copied" for name in names}
    for name in names:
        assert image_files(destination / name) == image_files(source / name)
        imagekit.skopeo_accepts(destination / name, tmp_path / "skopeo")
    assert not (destination / "docs").exists()

    unique_blobs = set().union(*(blob_digests(source / name) for name in names))
    unique_bytes = sum(
        next(
            (source / name / digest).stat().st_size
            for name in names
            if (source / name / digest).exists()
        )
        for digest in unique_blobs
    )
    # base's layers sit in three images, amd64's blobs in two: read once each.
    assert summary.bytes_from_source == unique_bytes
    assert sum(image.blobs_shared for image in summary.images) > 0


def test_sync_again_writes_nothing_then_only_what_changed(
    source, image_tree, tmp_path, prefect_api
):
    from flows.sync import sync_images

    destination = tmp_path / "mirror"
    sync_images(str(source), str(destination))
    before = snapshot(destination)

    again = sync_images(str(source), str(destination))

    assert set(statuses(again).values()) == {"skipped"}
    assert again.bytes_from_source == 0
    assert snapshot(destination) == before

    # A new image, and app-one replaced by app-two's image.
    shutil.copytree(source / "base", source / "new" / "copy-of-base")
    shutil.rmtree(source / "team" / "app-one")
    shutil.copytree(source / "team/nested/deep/app-two", source / "team" / "app-one")

    third = sync_images(str(source), str(destination))

    assert statuses(third) == {
        "base": "skipped",
        "multi/index": "skipped",
        "new/copy-of-base": "copied",
        "platforms/amd64": "skipped",
        "team/app-one": "copied",
        "team/nested/deep/app-two": "skipped",
    }
    after = snapshot(destination)
    for path, identity in before.items():
        if not path.startswith("team/app-one/"):
            assert after[path] == identity, path
    for name in ("team/app-one", "new/copy-of-base"):
        assert image_files(destination / name) == image_files(source / name)
        imagekit.skopeo_accepts(destination / name, tmp_path / "skopeo")
    # The blobs only the old app-one had are gone.
    assert blob_digests(destination / "team/app-one") == blob_digests(
        source / "team/app-one"
    )


def test_sync_with_link_stores_shared_blobs_once(source, tmp_path, prefect_api):
    from flows.copy import ImageCorrupt
    from flows.sync import sync_images, verify_images

    destination = tmp_path / "mirror"

    summary = sync_images(str(source), str(destination), link=True)

    assert set(statuses(summary).values()) == {"copied"}
    shared = blob_digests(destination / "base") & blob_digests(
        destination / "team/app-one"
    )
    shared &= blob_digests(destination / "team/nested/deep/app-two")
    assert len(shared) >= 2  # base's two layers, at least
    for digest in shared:
        files = [
            destination / name / digest
            for name in ("base", "team/app-one", "team/nested/deep/app-two")
        ]
        if storage_link.same_file(str(files[0]), str(files[1])):
            assert len({os.stat(file).st_ino for file in files}) == 1
            assert os.stat(files[0]).st_nlink == 3
        else:
            pytest.skip("the filesystem made reflinks, which have their own inodes")
    for relative, _, _ in TREE:
        imagekit.skopeo_accepts(destination / relative, tmp_path / "skopeo")
    assert len(verify_images(str(destination))) == len(TREE)

    # Next night a new image arrives: it links to the unchanged images' files.
    shutil.copytree(source / "team/app-one", source / "team/app-one-copy")
    nightly = sync_images(str(source), str(destination), link=True)
    new = {image.image: image for image in nightly.images}["team/app-one-copy"]
    assert new.status == "copied" and new.bytes_from_source == 0
    for digest in blob_digests(destination / "team/app-one-copy"):
        assert storage_link.same_file(
            str(destination / "team/app-one" / digest),
            str(destination / "team/app-one-copy" / digest),
        )
    linked_images = {"base", "team/app-one", "team/app-one-copy"}
    linked_images.add("team/nested/deep/app-two")

    # Damage the shared layer through one image: every image linking it is damaged.
    digest = sorted(shared)[0]
    with open(destination / "base" / digest, "r+b") as blob:
        first = blob.read(1)
        blob.seek(0)
        blob.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(ImageCorrupt) as caught:
        verify_images(str(destination))
    damaged = {problem.split(":", 1)[0] for problem in caught.value.problems}
    assert damaged == linked_images
    assert all(f"sha256:{digest}" in problem for problem in caught.value.problems)

    # The damaged file keeps its size, so base counts as unchanged; but a new
    # image needing that layer is not linked to it: it reads the source.
    shutil.copytree(source / "base", source / "base-copy")
    later = sync_images(str(source), str(destination), link=True)
    copy = {image.image: image for image in later.images}["base-copy"]
    assert copy.bytes_from_source == (source / "base" / digest).stat().st_size
    assert not storage_link.same_file(
        str(destination / "base" / digest), str(destination / "base-copy" / digest)
    )
    imagekit.skopeo_accepts(destination / "base-copy", tmp_path / "skopeo")


def test_sync_with_prune_removes_images_gone_from_the_source(
    source, tmp_path, prefect_api
):
    from flows.sync import sync_images

    destination = tmp_path / "mirror"
    sync_images(str(source), str(destination))
    shutil.rmtree(source / "team" / "app-one")
    shutil.rmtree(source / "multi")
    (destination / "multi" / "index" / "notes.txt").write_text("someone's notes")
    kept = {
        path: identity
        for path, identity in snapshot(destination).items()
        if not path.startswith(("team/app-one/", "multi/"))
    }

    without_prune = sync_images(str(source), str(destination))
    assert "team/app-one" not in statuses(without_prune)
    assert (destination / "team" / "app-one" / "manifest.json").exists()

    pruned = sync_images(str(source), str(destination), prune=True)

    assert statuses(pruned)["team/app-one"] == "pruned"
    assert statuses(pruned)["multi/index"] == "pruned"
    assert not (destination / "team" / "app-one").exists()
    assert os.listdir(destination / "multi" / "index") == ["notes.txt"]
    index_outcome = [i for i in pruned.images if i.image == "multi/index"][0]
    assert index_outcome.left_files == ["notes.txt"]
    assert snapshot(destination) == {
        **kept,
        "multi/index/notes.txt": snapshot(destination)["multi/index/notes.txt"],
    }


def test_one_corrupt_source_image_fails_and_the_others_complete(
    source, tmp_path, prefect_api
):
    from flows.sync import SyncFailed, sync_images

    # app-one's own layer (not shared with base) loses its last byte.
    own = blob_digests(source / "team/app-one") - blob_digests(source / "base")
    layers = [d for d in own if (source / "team/app-one" / d).stat().st_size > 200]
    damaged = max(layers, key=lambda d: (source / "team/app-one" / d).stat().st_size)
    path = source / "team" / "app-one" / damaged
    path.write_bytes(path.read_bytes()[:-1])
    destination = tmp_path / "mirror"

    with pytest.raises(SyncFailed) as caught:
        sync_images(str(source), str(destination), retries=0)

    summary = caught.value.summary
    outcomes = statuses(summary)
    assert outcomes.pop("team/app-one") == "failed"
    assert set(outcomes.values()) == {"copied"}
    failed = summary.failed[0]
    assert f"sha256:{damaged}" in failed.error
    assert not (destination / "team" / "app-one" / "manifest.json").exists()
    for name in outcomes:
        imagekit.skopeo_accepts(destination / name, tmp_path / "skopeo")


def test_a_shared_blob_corrupt_in_one_source_is_read_from_the_others(
    source, tmp_path, prefect_api
):
    from flows.sync import SyncFailed, sync_images

    # base is the first image to need the shared layer, so its copy is read
    # first; the images deriving from base then read their own intact copies.
    shared = blob_digests(source / "base") & blob_digests(source / "team/app-one")
    digest = max(shared, key=lambda d: (source / "base" / d).stat().st_size)
    (source / "base" / digest).write_bytes(b"damaged")
    destination = tmp_path / "mirror"

    with pytest.raises(SyncFailed) as caught:
        sync_images(str(source), str(destination), retries=0, link=True)

    outcomes = statuses(caught.value.summary)
    assert outcomes.pop("base") == "failed"
    assert set(outcomes.values()) == {"copied"}
    for name in ("team/app-one", "team/nested/deep/app-two"):
        imagekit.skopeo_accepts(destination / name, tmp_path / "skopeo")


def test_sync_refuses_nested_roots(source, prefect_api):
    from flows.sync import sync_images

    with pytest.raises(ValueError, match="one inside the other"):
        sync_images(str(source), str(source / "mirror"))
    with pytest.raises(ValueError, match="one inside the other"):
        sync_images(str(source / "team"), str(source))


def run_dirimage(arguments: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run the command line as a user would, with an embedded Prefect server."""
    environment = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    environment.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )


def test_dirimage_sync_and_verify_a_root(source, tmp_path):
    destination = tmp_path / "mirror"
    home = tmp_path / "prefect-home"
    victim_name = "team/nested/deep/app-two"
    victim = source / victim_name
    digest = sorted(blob_digests(victim) - blob_digests(source / "base"))[0]
    (victim / digest).write_bytes(b"not the blob")

    synced = run_dirimage(
        ["sync", str(source), str(destination), "--retries", "0"], home
    )

    assert synced.returncode == 1, synced.stderr
    assert victim_name in synced.stderr and digest in synced.stderr
    assert "copied   base" in synced.stdout
    assert not (destination / victim_name / "manifest.json").exists()

    # Put the damaged image into the mirror by hand, then verify the root.
    shutil.copytree(victim, destination / victim_name, dirs_exist_ok=True)
    verified = run_dirimage(["verify", str(destination)], home)

    assert verified.returncode == 1
    damaged_lines = [line for line in verified.stderr.splitlines() if digest in line]
    assert damaged_lines and all(victim_name in line for line in damaged_lines)
    assert "multi/index" not in verified.stderr


def shared_blob_files(root: Path) -> dict[str, list[Path]]:
    """Each blob digest that several images under `root` hold, with their files."""
    files: dict[str, list[Path]] = {}
    for relative, _, _ in TREE:
        for blob in imagekit.blob_files(root / relative):
            files.setdefault(blob.name, []).append(blob)
    return {digest: paths for digest, paths in files.items() if len(paths) > 1}


def inodes(paths: list[Path]) -> set[int]:
    return {os.stat(path).st_ino for path in paths}


def skip_unless_hard_links(folder: Path) -> None:
    """Skip where the filesystem makes reflinks, which have inodes of their own."""
    scratch = folder / "link-probe"
    scratch.mkdir()
    (scratch / "a").write_bytes(b"probe")
    (scratch / "b").write_bytes(b"probe")
    method = storage_link.link_file(str(scratch / "a"), str(scratch / "b"))
    shutil.rmtree(scratch)
    if method != storage_link.HARDLINK:
        pytest.skip("the filesystem makes reflinks, which have inodes of their own")


def test_link_sync_after_a_plain_sync_shares_the_unchanged_images_blobs(
    source, tmp_path, prefect_api
):
    from flows.sync import sync_images, verify_images

    destination = tmp_path / "mirror"
    sync_images(str(source), str(destination))
    shared = shared_blob_files(destination)
    assert len(shared) >= 3  # base's layers and config, amd64's blobs
    assert all(len(inodes(paths)) == len(paths) for paths in shared.values())

    skip_unless_hard_links(tmp_path)

    linked = sync_images(str(source), str(destination), link=True)

    assert set(statuses(linked).values()) == {"skipped"}
    assert linked.bytes_from_source == 0
    for paths in shared.values():
        assert len(inodes(paths)) == 1, paths
    outcomes = {image.image: image for image in linked.images}
    assert outcomes["base"].blobs_shared == 0  # the first holder is the donor
    assert outcomes["team/app-one"].blobs_shared >= 2
    assert outcomes["platforms/amd64"].blobs_shared == len(
        blob_digests(source / "platforms/amd64")
    )
    assert len(verify_images(str(destination))) == len(TREE)
    for relative, _, _ in TREE:
        imagekit.skopeo_accepts(destination / relative, tmp_path / "skopeo")

    # Everything shares already: the next --link sync writes nothing at all.
    before = snapshot(destination)
    again = sync_images(str(source), str(destination), link=True)
    assert sum(image.blobs_shared for image in again.images) == 0
    assert snapshot(destination) == before


def test_link_sync_keeps_files_of_a_damaged_donor_and_of_a_busy_image(
    source, tmp_path, prefect_api
):
    from flows.copy import ImageCorrupt
    from flows.sync import SyncFailed, sync_images, verify_images

    destination = tmp_path / "mirror"
    sync_images(str(source), str(destination))
    # base is the first holder of its layers, so the others would link to it.
    shared_with_base = blob_digests(source / "base") & blob_digests(
        source / "team/app-one"
    )
    damaged = max(shared_with_base, key=lambda d: (source / "base" / d).stat().st_size)
    with open(destination / "base" / damaged, "r+b") as blob:
        first = blob.read(1)
        blob.seek(0)
        blob.write(bytes([first[0] ^ 0xFF]))
    busy = destination / "platforms" / "amd64"
    busy_blobs = {path.name: os.stat(path) for path in imagekit.blob_files(busy)}
    skip_unless_hard_links(tmp_path)

    with storage.ImageLock(str(busy)):
        state = sync_images(str(source), str(destination), link=True, return_state=True)

    with pytest.raises(SyncFailed) as caught:
        state.result()
    outcomes = {image.image: image for image in caught.value.summary.images}
    assert outcomes["platforms/amd64"].status == "failed"
    assert "being written by another dirimage process" in (
        outcomes["platforms/amd64"].error
    )
    after = {path.name: os.stat(path) for path in imagekit.blob_files(busy)}
    assert {name: info.st_ino for name, info in after.items()} == {
        name: info.st_ino for name, info in busy_blobs.items()
    }
    for relative in ("team/app-one", "team/nested/deep/app-two"):
        assert outcomes[relative].status == "skipped"
        assert not storage_link.same_file(
            str(destination / "base" / damaged), str(destination / relative / damaged)
        )
    warnings = prefectapi.log_messages(
        state.state_details.flow_run_id, logging.WARNING, "Not linking"
    )
    refused = [message for message in warnings if "Not linking" in message]
    assert len(refused) == 2 and all(f"sha256:{damaged}" in m for m in refused)
    # The other layer base shares is intact, so it is linked.
    for digest in shared_with_base - {damaged}:
        assert storage_link.same_file(
            str(destination / "base" / digest),
            str(destination / "team/app-one" / digest),
        )
    with pytest.raises(ImageCorrupt) as verified:
        verify_images(str(destination))
    damaged_images = {problem.split(":", 1)[0] for problem in verified.value.problems}
    assert damaged_images == {"base"}
    for relative in ("team/app-one", "team/nested/deep/app-two", "platforms/amd64"):
        imagekit.skopeo_accepts(destination / relative, tmp_path / "skopeo")


def test_sync_of_more_images_than_the_process_may_open_files(tmp_path, cli_env):
    """Each changed image is locked through a file descriptor of its own."""
    limit = 64
    source = tmp_path / "source"
    first = faultkit.make_synthetic_image(source / "image-000", [4096], "many")
    names = [f"image-{number:03d}" for number in range(limit + 16)]
    for name in names[1:]:
        shutil.copytree(first, source / name)
    destination = tmp_path / "mirror"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    synced = subprocess.run(
        [faultkit.DIRIMAGE, "sync", str(source), str(destination), "--json"],
        capture_output=True,
        text=True,
        env=cli_env,
        stdin=subprocess.DEVNULL,
        timeout=600,
        preexec_fn=low_limit,
    )

    assert synced.returncode == 0, synced.stderr
    summary = json.loads(synced.stdout)
    assert {image["image"]: image["status"] for image in summary["images"]} == {
        name: "copied" for name in names
    }
    blob_bytes = sum(size for _, size in faultkit.manifest_blobs(first))
    assert summary["images"][0]["bytes_from_source"] == blob_bytes
    assert sum(image["bytes_from_source"] for image in summary["images"]) == blob_bytes
    for name in names:
        assert image_files(destination / name) == image_files(first)
    imagekit.skopeo_accepts(destination / names[-1], tmp_path / "skopeo")


class OpenCounter:
    """Counts the opens of files in some folders, as the kernel reports them
    through inotify."""

    IN_OPEN = 0x20
    EVENT = struct.Struct("iIII")

    def __init__(self, folders: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.descriptor = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.descriptor >= 0, os.strerror(ctypes.get_errno())
        self.folders = {}
        for folder in folders:
            watch = self.libc.inotify_add_watch(
                self.descriptor, str(folder).encode(), self.IN_OPEN
            )
            assert watch >= 0, os.strerror(ctypes.get_errno())
            self.folders[watch] = folder

    def opens(self) -> Counter:
        """(folder, file name) to how often it was opened since the start."""
        counts: Counter = Counter()
        while True:
            try:
                data = os.read(self.descriptor, 1 << 16)
            except BlockingIOError:
                return counts
            offset = 0
            while offset < len(data):
                watch, mask, _, length = self.EVENT.unpack_from(data, offset)
                offset += self.EVENT.size
                name = data[offset : offset + length].rstrip(b"\0").decode()
                offset += length
                assert watch in self.folders, "the event queue overflowed"
                if name:
                    counts[(self.folders[watch], name)] += 1

    def close(self) -> None:
        os.close(self.descriptor)


def test_a_shared_blob_is_opened_in_the_source_once(source, tmp_path, prefect_api):
    from flows.sync import sync_images

    folders = [source / relative for relative, _, _ in TREE]
    wanted = Counter(digest for folder in folders for digest in blob_digests(folder))
    assert max(wanted.values()) == 3  # base's layers are in three images
    counter = OpenCounter(folders)
    try:
        sync_images(str(source), str(tmp_path / "mirror"))
        opens = counter.opens()
    finally:
        counter.close()

    blob_opens = Counter()
    for (_, name), count in opens.items():
        if name in wanted:
            blob_opens[name] += count
    assert blob_opens == Counter({digest: 1 for digest in wanted})


def test_one_flow_run_and_its_table_for_a_whole_tree(source, tmp_path, prefect_api):
    from flows.sync import sync_images

    runs_before = prefectapi.all_flow_run_count()

    state = sync_images(str(source), str(tmp_path / "mirror"), return_state=True)

    assert prefectapi.all_flow_run_count() == runs_before + 1
    summary = state.result()
    rows = prefectapi.table_rows(state.state_details.flow_run_id, "sync-images")
    assert rows == [
        {
            "image": image.image,
            "status": "copied",
            "bytes from source": image.bytes_from_source,
            "bytes shared": image.bytes_shared,
            "bytes reused": 0,
            "seconds": image.seconds,
            "error": "",
        }
        for image in summary.images
    ]
    assert [row["image"] for row in rows] == sorted(r for r, _, _ in TREE)
    assert sum(row["bytes from source"] for row in rows) == summary.bytes_from_source


def test_prune_from_a_source_without_images_prunes_nothing(
    source, tmp_path, prefect_api
):
    from flows.sync import sync_images

    destination = tmp_path / "mirror"
    sync_images(str(source), str(destination))
    before = snapshot(destination)
    empty = tmp_path / "unmounted"
    empty.mkdir()

    state = sync_images(str(empty), str(destination), prune=True, return_state=True)

    assert state.result().images == []
    assert snapshot(destination) == before
    warnings = prefectapi.log_messages(
        state.state_details.flow_run_id, logging.WARNING, "Not pruning"
    )
    assert [message for message in warnings if "Not pruning" in message] == [
        f"Not pruning {destination}: the source root {empty} holds no images at all"
    ]


def test_dirimage_sync_exits_0_and_prints_json(source, tmp_path, cli_env):
    destination = tmp_path / "mirror"

    synced = faultkit.dirimage(cli_env, "sync", source, destination, "--json")

    assert synced.returncode == 0, synced.stderr
    assert synced.stderr == ""
    summary = json.loads(synced.stdout)
    assert summary["source_root"] == str(source)
    assert summary["destination_root"] == str(destination)
    assert {image["image"]: image["status"] for image in summary["images"]} == {
        relative: "copied" for relative, _, _ in TREE
    }
    assert all(image["error"] is None for image in summary["images"])

    again = faultkit.dirimage(cli_env, "sync", source, destination)

    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert len(lines) == len(TREE)
    assert all(line.startswith("skipped  ") for line in lines), lines


@pytest.mark.parametrize(
    "flow_name, parameters",
    [
        ("sync_images", {"source_root": "", "destination_root": "/mirror"}),
        ("sync_images", {"source_root": "/images", "destination_root": ""}),
        ("verify_images", {"root": ""}),
        ("delete_image", {"path": ""}),
    ],
    ids=["sync-source", "sync-destination", "verify-root", "delete-path"],
)
def test_empty_paths_are_refused_before_a_run(flow_name, parameters, prefect_api):
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    import flows

    flow = getattr(flows, flow_name)
    (empty,) = [name for name, value in parameters.items() if value == ""]
    schema = parameter_schema(flow).model_dump_for_openapi()
    assert schema["properties"][empty]["minLength"] == 1

    # What the server checks before it creates a run of a deployment.
    with pytest.raises(ValidationError, match=f"for field '{empty}'"):
        validate(parameters, schema, raise_on_error=True, ignore_required=True)
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters(parameters)


HELLO = Path(__file__).parent / "data" / "hello"


def test_share_blob_links_only_to_a_donor_that_hashes_to_its_digest(tmp_path):
    donor, target, damaged = (
        Path(shutil.copytree(HELLO, tmp_path / name))
        for name in ("donor", "target", "damaged")
    )
    skip_unless_hard_links(tmp_path)
    name = max(blob_digests(HELLO), key=lambda d: (HELLO / d).stat().st_size)
    digest, size = f"sha256:{name}", (HELLO / name).stat().st_size
    (damaged / name).write_bytes(b"x" * size)

    refused = storage_link.share_blob(str(damaged), str(target), digest, size)
    linked = storage_link.share_blob(str(donor), str(target), digest, size)
    shared_inode = storage_link.same_file(str(donor / name), str(target / name))
    again = storage_link.share_blob(str(donor), str(target), digest, size)
    (target / name).unlink()
    missing = storage_link.share_blob(str(donor), str(target), digest, size)

    assert refused.action == storage_link.DAMAGED_DONOR
    assert (linked.action, linked.size) == (storage_link.LINKED, size)
    assert shared_inode
    assert again.action == "reused"
    assert missing.action == storage_link.KEPT
    assert not (target / name).exists(), "a blob the image lacks was added"
    assert (damaged / name).read_bytes() == b"x" * size
    # No temporary file is left behind.
    assert sorted(os.listdir(target)) == sorted(set(os.listdir(HELLO)) - {name})


def test_copy_blob_locally_falls_back_to_the_source(tmp_path):
    holder = Path(shutil.copytree(HELLO, tmp_path / "holder"))
    name = max(blob_digests(HELLO), key=lambda d: (HELLO / d).stat().st_size)
    digest, size = f"sha256:{name}", (HELLO / name).stat().st_size

    local = storage_link.copy_blob_locally(
        str(holder), str(tmp_path / "first"), digest, size, fallback_source=str(HELLO)
    )
    (holder / name).write_bytes(b"x" * size)
    fallback = storage_link.copy_blob_locally(
        str(holder), str(tmp_path / "second"), digest, size, fallback_source=str(HELLO)
    )

    assert local.action == storage_link.COPIED_LOCALLY
    assert fallback.action == "copied"
    for folder in ("first", "second"):
        assert (tmp_path / folder / name).read_bytes() == (HELLO / name).read_bytes()
    with pytest.raises(storage.DigestMismatch):
        storage_link.copy_blob_locally(str(holder), str(tmp_path / "third"), digest)


@pytest.fixture
def reflink_folder(tmp_path):
    """A folder on a btrfs file system that lives in a file and is loop-mounted
    for the test: a file system that makes reflinks, unlike ext4."""
    imagekit.require_tool("mkfs.btrfs")
    disk = tmp_path / "btrfs.img"
    with open(disk, "wb") as file:
        file.truncate(512 * MIB)  # sparse: costs only what the test writes
    subprocess.run(["mkfs.btrfs", "-q", str(disk)], check=True, capture_output=True)
    with faultkit.mounted(["-o", "loop", str(disk)], tmp_path / "btrfs") as where:
        yield where


def test_shares_storage_tells_reflinks_hard_links_and_copies_apart(reflink_folder):
    donor = reflink_folder / "donor"
    donor.write_bytes(os.urandom(3 * MIB + 5))
    reflinked, hard_linked, copied = (reflink_folder / n for n in ("r", "h", "c"))
    reflinked.write_bytes(b"older bytes")

    method = storage_link.link_file(str(donor), str(reflinked))
    os.link(donor, hard_linked)
    shutil.copyfile(donor, copied)

    assert method == storage_link.REFLINK
    assert os.stat(reflinked).st_ino != os.stat(donor).st_ino
    assert os.stat(donor).st_nlink == 2  # the hard link only
    assert storage_link.shares_storage(str(donor), str(reflinked))
    assert storage_link.shares_storage(str(donor), str(hard_linked))
    assert not storage_link.shares_storage(str(donor), str(copied))
    # Copy-on-write: a change to the reflink is its own, and ends the sharing.
    with open(reflinked, "r+b") as file:
        file.write(b"changed")
    assert donor.read_bytes()[:7] != b"changed"
    assert not storage_link.shares_storage(str(donor), str(reflinked))
    # Files small enough to live inside their inodes share nothing on disk; the
    # same bytes count as shared, other bytes do not.
    for name, data in (("small", b"config"), ("same", b"config"), ("other", b"c0nfig")):
        (reflink_folder / name).write_bytes(data)
    small, same, other = (str(reflink_folder / n) for n in ("small", "same", "other"))
    assert storage_link.shares_storage(small, same)
    assert not storage_link.shares_storage(small, other)


def test_link_sync_on_a_reflink_file_system_writes_nothing_the_second_time(
    reflink_folder, tmp_path, prefect_api
):
    from flows.sync import sync_images, verify_images

    # Two versions of an app that share their first two layers.
    source = tmp_path / "source"
    faultkit.make_synthetic_image(source / "app/v1", [2 * MIB, 512 * 1024], "app")
    faultkit.make_synthetic_image(
        source / "app/v2", [2 * MIB, 512 * 1024, 64 * 1024], "app"
    )
    destination = reflink_folder / "mirror"

    first = sync_images(str(source), str(destination), link=True)
    shared = blob_digests(destination / "app/v1") & blob_digests(destination / "app/v2")
    before = snapshot(destination)
    second = sync_images(str(source), str(destination), link=True)

    assert set(statuses(first).values()) == {"copied"}
    assert sum(image.blobs_shared for image in first.images) == 2
    assert len(shared) == 2
    for name in shared:
        v1, v2 = (str(destination / "app" / v / name) for v in ("v1", "v2"))
        assert os.stat(v1).st_ino != os.stat(v2).st_ino, "a reflink, not a hard link"
        assert storage_link.shares_storage(v1, v2)
    assert set(statuses(second).values()) == {"skipped"}
    assert snapshot(destination) == before, "the second sync rewrote files"
    assert len(verify_images(str(destination))) == 2


def test_a_new_version_keeps_the_blobs_its_folder_holds_checked_in_one_task(
    tmp_path, prefect_api
):
    from flows.sync import sync_images

    # Layers above the small-blob size, so that each copy has a task of its own.
    source, destination = tmp_path / "source", tmp_path / "mirror"
    faultkit.make_synthetic_image(source / "app", [5 * MIB, 6 * MIB], "app")
    sync_images(str(source), str(destination))
    before = snapshot(destination / "app")
    shutil.rmtree(source / "app")
    faultkit.make_synthetic_image(source / "app", [5 * MIB, 6 * MIB, 7 * MIB], "app")
    kept = blob_digests(destination / "app") & blob_digests(source / "app")

    state = sync_images(str(source), str(destination), return_state=True)

    [outcome] = state.result().images
    assert outcome.status == "copied"
    assert len(kept) == 2
    assert (outcome.blobs_reused, outcome.blobs_from_source) == (2, 2)
    after = snapshot(destination / "app")
    assert {name: after[name] for name in kept} == {name: before[name] for name in kept}
    assert image_files(destination / "app") == image_files(source / "app")
    flow_run_id = state.state_details.flow_run_id
    prefectapi.task_runs(flow_run_id, "remove_unused", 1)
    names = [run.name for run in prefectapi.task_runs(flow_run_id, "", 1)]
    assert len([name for name in names if name.startswith("reuse_blobs")]) == 1
    assert len([name for name in names if name.startswith("copy_blob")]) == 2
