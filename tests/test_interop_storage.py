"""Round trips through real skopeo: images skopeo wrote are read with storage,
written back with storage alone, and skopeo must accept what was written."""

import os
from pathlib import Path

import pytest

import imagekit
from storage import (
    DirImageDestination,
    DirImageSource,
    check_image,
    plan_image,
)
from storage.layout import layout_kind

VERSION_1_1 = b"Directory Transport Version: 1.1\n"


@pytest.fixture(autouse=True)
def needs_skopeo():
    imagekit.require_tool("skopeo")


def write_back(source_path: Path, target_path: Path, platform: str | None = None):
    """Copy an image with storage only, in the order a copy commits it."""
    plan = plan_image(str(source_path), platform=platform)
    source = DirImageSource(str(source_path))
    destination = DirImageDestination(str(target_path))

    for blob in plan.blobs:
        stream, size = source.get_blob(blob.digest)
        with stream:
            written = destination.put_blob(blob.digest, stream, blob.size)
        assert written == size

    destination.put_signatures(source.get_signatures(plan.signature_instance))
    for instance in plan.instances:
        destination.put_signatures(
            source.get_signatures(instance.digest), instance.digest
        )
        destination.put_manifest(instance.data, instance.digest)
    destination.put_manifest(plan.manifest, layout_version=plan.layout_version)
    return plan, destination


def expected_names(plan) -> set[str]:
    names = {"version", "manifest.json"}
    names |= {blob.digest[7:] for blob in plan.blobs}
    names |= {f"{instance.digest[7:]}.manifest.json" for instance in plan.instances}
    return names


@pytest.mark.parametrize("kind", imagekit.KINDS)
def test_written_back_image_is_accepted_by_skopeo(dir_images, tmp_path, kind):
    """Each kind, rewritten by storage, is inspected and copied out by skopeo."""
    source_path = dir_images[kind]
    target = tmp_path / "written"
    plan, _ = write_back(source_path, target)

    signatures = sorted(p.name for p in source_path.glob("signature-*"))
    assert set(os.listdir(target)) == expected_names(plan) | set(signatures)
    assert (target / "version").read_bytes() == VERSION_1_1
    assert (target / "manifest.json").read_bytes() == plan.manifest
    for name in signatures:
        assert (target / name).read_bytes() == (source_path / name).read_bytes()
    assert check_image(str(target)) == []

    imagekit.skopeo_accepts(target, tmp_path / "skopeo")


@pytest.mark.parametrize("kind", imagekit.LEGACY_KINDS)
def test_legacy_kinds_come_out_as_layout_1_1(dir_images, tmp_path, kind):
    """Legacy images, which skopeo no longer reads, come out as 1.1 it does read."""
    target = tmp_path / "written"
    write_back(dir_images[kind], target)
    names = os.listdir(target)
    assert not [name for name in names if name.endswith(".tar")]
    assert {layout_kind(name) for name in names} == {"version", "manifest", "blob"}
    assert DirImageSource(str(target)).layout_version == "1.1"
    imagekit.skopeo_accepts(target, tmp_path / "skopeo")


def test_signatures_of_the_written_copy_verify(dir_images, tmp_path):
    """Both signatures still verify against the copy with standalone-verify."""
    signing = imagekit.read_signing_info(dir_images["signed"])
    target = tmp_path / "written"
    write_back(dir_images["signed"], target)
    for number in (1, 2):
        assert signing.signs(target, f"signature-{number}")


@pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
def test_one_platform_written_as_a_single_image(dir_images, tmp_path, kind):
    """One platform chosen out of a list is written as a single image skopeo takes."""
    target = tmp_path / "written"
    plan, _ = write_back(dir_images[kind], target, platform="linux/arm64")
    assert set(os.listdir(target)) == expected_names(plan)
    assert not plan.instances
    assert check_image(str(target)) == []
    imagekit.skopeo_accepts(target, tmp_path / "skopeo")


@pytest.mark.parametrize(
    "old_kind, new_kind", [("oci", "list"), ("legacy-1.0", "v2s2")]
)
def test_replacing_an_image_in_place(
    fresh_image, dir_images, tmp_path, old_kind, new_kind
):
    """Writing a new image over an old one and removing the unused files leaves
    exactly the new image, which skopeo accepts."""
    target = fresh_image(old_kind)
    plan, destination = write_back(dir_images[new_kind], target)
    destination.remove_unused(plan.digests)
    assert set(os.listdir(target)) == expected_names(plan)
    assert check_image(str(target)) == []
    imagekit.skopeo_accepts(target, tmp_path / "skopeo")
