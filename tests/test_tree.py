"""Finding image folders under a root, linking blobs, and the mirror check."""

import hashlib
import io
import os
import shutil

import pytest
from test_delete import FOREIGN_FOLDERS, content_snapshot

import storage
from storage import link
from storage.layout import version_text
from storage.tree import ROOT_IMAGE, find_images, holds_image, plan_mirror


def make_fake_image(folder) -> None:
    """A folder that the tree search counts as an image: a version file and a
    manifest.json (whose content only a copy would read)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as file:
        file.write("{}")
    with open(os.path.join(folder, "version"), "wb") as file:
        file.write(version_text("1.1"))


def test_find_images_at_several_depths(tmp_path):
    for relative in ("a", "b/c", "b/d/e/f", "g h/i"):
        make_fake_image(tmp_path / relative)
    (tmp_path / "b" / "empty").mkdir()
    (tmp_path / "note.txt").write_text("not an image")

    assert find_images(str(tmp_path)) == ["a", "b/c", "b/d/e/f", "g h/i"]


def test_find_images_does_not_descend_into_an_image(tmp_path):
    make_fake_image(tmp_path / "outer")
    make_fake_image(tmp_path / "outer" / "inner")

    assert find_images(str(tmp_path)) == ["outer"]


def test_find_images_reports_the_root_itself(tmp_path):
    make_fake_image(tmp_path)
    make_fake_image(tmp_path / "below")

    assert find_images(str(tmp_path)) == [ROOT_IMAGE]


def test_find_images_never_follows_symlinked_folders(tmp_path):
    outside = tmp_path / "outside"
    make_fake_image(outside / "secret")
    root = tmp_path / "root"
    make_fake_image(root / "real")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "image-link").symlink_to(root / "real", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)

    assert find_images(str(root)) == ["real"]


def test_find_images_counts_a_manifest_without_version_only_if_it_parses(
    dir_images, tmp_path
):
    """The rule delete uses: with no version file, a folder is an image only if
    its manifest.json is an image manifest (the 2016 layout), so a web app or
    `docker save` output is never listed, and so never pruned."""
    shutil.copytree(dir_images["legacy-2016"], tmp_path / "old")
    for kind, make in FOREIGN_FOLDERS.items():
        make(tmp_path / "mirror" / kind)

    assert find_images(str(tmp_path)) == ["old"]
    assert find_images(str(tmp_path / "mirror" / "web-app")) == []


def test_sync_prune_leaves_foreign_manifest_folders_byte_for_byte(
    dir_images, tmp_path, prefect_api
):
    from flows.sync import sync_images

    source = tmp_path / "source"
    shutil.copytree(dir_images["oci"], source / "app")
    destination = tmp_path / "mirror"
    for kind, make in FOREIGN_FOLDERS.items():
        make(destination / kind)
    before = content_snapshot(destination)

    summary = sync_images(str(source), str(destination), prune=True)

    assert [(i.image, i.status) for i in summary.images] == [("app", "copied")]
    after = content_snapshot(destination)
    assert {p: c for p, c in after.items() if not p.startswith("app")} == before


def test_find_images_of_missing_root_and_of_a_file(tmp_path):
    assert find_images(str(tmp_path / "missing")) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.NotAnImage):
        find_images(str(tmp_path / "file"))


def test_link_file_shares_storage_and_replaces_atomically(tmp_path):
    source = tmp_path / "a" / "blob"
    source.parent.mkdir()
    source.write_bytes(b"layer bytes")
    target_folder = tmp_path / "b"
    target_folder.mkdir()
    target = target_folder / "blob"
    target.write_bytes(b"older bytes")

    method = link.link_file(str(source), str(target))

    assert target.read_bytes() == b"layer bytes"
    assert method in (link.REFLINK, link.HARDLINK)
    if method == link.HARDLINK:
        assert os.stat(source).st_ino == os.stat(target).st_ino
        assert os.stat(source).st_nlink == 2
    assert sorted(os.listdir(target_folder)) == ["blob"]


def test_link_file_twice_leaves_no_temporary_file(tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 10)
    target_folder = tmp_path / "other"
    target_folder.mkdir()

    link.link_file(str(source), str(target_folder / "blob"))
    link.link_file(str(source), str(target_folder / "blob"))

    assert os.listdir(target_folder) == ["blob"]


def test_link_blob_of_a_sha512_blob_records_layout_1_2(tmp_path):
    """Linking stores a blob as copying does, so a sha512 one moves a 1.1
    folder on to 1.2, which its readers need for the `sha512-` name."""
    data = b"a layer named by sha512"
    digest = f"sha512:{hashlib.sha512(data).hexdigest()}"
    donor = storage.DirImageDestination(str(tmp_path / "donor"))
    donor.put_blob(digest, io.BytesIO(data), len(data))
    target = tmp_path / "target"
    storage.DirImageDestination(str(target))

    transfer = link.link_blob(str(tmp_path / "donor"), str(target), digest, len(data))

    assert transfer.action == link.LINKED
    assert (target / "version").read_bytes() == version_text("1.2")
    assert (target / f"sha512-{digest[7:]}").read_bytes() == data


def test_plan_mirror_of_a_real_image(dir_images, tmp_path):
    source = dir_images["index"]
    destination = tmp_path / "copy"

    assert not plan_mirror(str(source), str(destination), "x").current

    shutil.copytree(source, destination)
    mirror = plan_mirror(str(source), str(destination), "x")
    assert mirror.current
    assert mirror.plan.instances

    blob = mirror.plan.blobs[0]
    blob_file = destination / blob.digest.split(":")[1]
    blob_file.write_bytes(blob_file.read_bytes()[:-1])
    assert not holds_image(str(destination), mirror.plan)


def test_holds_image_notices_changed_signatures(dir_images, tmp_path):
    source = dir_images["signed"]
    destination = tmp_path / "copy"
    shutil.copytree(source, destination)
    plan = storage.plan_image(str(source))
    assert holds_image(str(destination), plan)

    (destination / "signature-2").unlink()
    assert not holds_image(str(destination), plan)
