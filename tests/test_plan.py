"""Planning copies with plan_image and finding damage with check_image."""

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

import imagekit
from storage import (
    BlobNotFound,
    DigestMismatch,
    DirImageDestination,
    NotAnImage,
    TooLarge,
    UnsafePath,
    check_image,
    parse_manifest,
    plan_image,
    verify_blob,
)
from storage.manifest import (
    OCI_MANIFEST,
)
from storage.source import MANIFEST_SIZE_LIMIT


def sha256_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_digests_on_disk(path: Path) -> set[str]:
    """Digests of the blob files in an image folder, in either naming."""
    return {
        "sha256:" + entry.name.removesuffix(".tar")
        for entry in path.iterdir()
        if imagekit.BLOB_NAME.fullmatch(entry.name.removesuffix(".tar"))
    }


def instance_files(path: Path) -> dict[str, Path]:
    return {
        "sha256:" + entry.name.split(".")[0]: entry
        for entry in path.glob("*.manifest.json")
    }


def first_layer(path: Path) -> tuple[str, Path]:
    """The last blob of the manifest (a layer) and its file."""
    digest = parse_manifest((path / "manifest.json").read_bytes()).blobs[-1].digest
    for name in (digest[7:], f"{digest[7:]}.tar"):
        if (path / name).exists():
            return digest, path / name
    raise AssertionError(f"no file for {digest} in {path}")


class TestPlanImage:
    """What plan_image lists for every kind of image."""

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_plans_every_blob_once(self, dir_images, kind):
        """The plan lists each blob in the folder exactly once, with the manifest."""
        path = dir_images[kind]
        plan = plan_image(str(path))
        digests = [blob.digest for blob in plan.blobs]
        assert len(digests) == len(set(digests))
        assert set(digests) == blob_digests_on_disk(path)
        assert plan.manifest == (path / "manifest.json").read_bytes()
        assert plan.media_type == imagekit.KIND_MEDIA_TYPES[kind]
        assert plan.manifest_digest == parse_manifest(plan.manifest).digest
        assert plan.layout_version == "1.1"
        assert plan.problems == ()
        assert plan.signature_instance is None
        assert plan.source == str(path)

    @pytest.mark.parametrize("kind", ["oci", "v2s2", "signed"])
    def test_total_bytes_is_the_sum_of_blob_files(self, dir_images, kind):
        """total_bytes adds up the sizes of the blob files."""
        path = dir_images[kind]
        expected = sum(
            (path / d[7:]).stat().st_size for d in blob_digests_on_disk(path)
        )
        assert plan_image(str(path)).total_bytes == expected

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_plans_both_instances_with_their_bytes(self, dir_images, kind):
        """Lists plan both instance manifests, with platform and bytes."""
        path = dir_images[kind]
        plan = plan_image(str(path))
        files = instance_files(path)
        assert {i.digest for i in plan.instances} == set(files)
        assert [i.platform for i in plan.instances] == [
            "linux/amd64",
            "linux/arm64/v8",
        ]
        for instance in plan.instances:
            assert instance.data == files[instance.digest].read_bytes()
            assert instance.media_type == parse_manifest(instance.data).media_type
        assert plan.digests == set(files) | blob_digests_on_disk(path)

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    @pytest.mark.parametrize(
        "platform, position",
        [("linux/amd64", 0), ("linux/arm64", 1), ("linux/arm64/v8", 1)],
    )
    def test_platform_selects_one_instance(self, dir_images, kind, platform, position):
        """A platform picks its instance, planned as a single image."""
        path = dir_images[kind]
        entry = parse_manifest((path / "manifest.json").read_bytes()).instances[
            position
        ]
        instance_data = instance_files(path)[entry.digest].read_bytes()
        plan = plan_image(str(path), platform=platform)
        assert plan.manifest == instance_data
        assert plan.manifest_digest == entry.digest
        assert plan.signature_instance == entry.digest
        assert plan.instances == ()
        assert plan.blobs == parse_manifest(instance_data).blobs
        assert plan.media_type == entry.media_type

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    @pytest.mark.parametrize(
        "platform", ["linux/s390x", "linux/arm64/v7", "windows/amd64"]
    )
    def test_absent_platform_lists_the_offered_ones(self, dir_images, kind, platform):
        """An absent platform is refused, naming it and the platforms offered."""
        with pytest.raises(NotAnImage) as caught:
            plan_image(str(dir_images[kind]), platform=platform)
        message = str(caught.value)
        assert platform in message
        assert "linux/amd64, linux/arm64/v8" in message

    @pytest.mark.parametrize("kind", ["oci", "v2s2", "v2s1", "legacy-2016"])
    def test_single_image_of_the_platform_asked_for(self, dir_images, kind):
        """A single image of the platform asked for is planned as usual."""
        plan = plan_image(str(dir_images[kind]), platform="linux/amd64")
        assert plan.manifest == (dir_images[kind] / "manifest.json").read_bytes()
        assert plan.signature_instance is None

    @pytest.mark.parametrize("kind", ["oci", "v2s2", "v2s1", "legacy-1.0"])
    def test_single_image_of_another_platform_is_refused(self, dir_images, kind):
        """A single amd64 image is not an arm64 image."""
        with pytest.raises(
            NotAnImage, match="single linux/amd64 image, not linux/arm64"
        ):
            plan_image(str(dir_images[kind]), platform="linux/arm64")

    def test_sha512_blobs_need_layout_1_2(self, tmp_path):
        """An image with a sha512 blob plans layout 1.2."""
        config = json.dumps({"os": "linux", "architecture": "amd64"}).encode()
        layer = b"layer"
        layer_digest = f"sha512:{hashlib.sha512(layer).hexdigest()}"
        config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": config_digest, "size": len(config)},
            "layers": [{"digest": layer_digest, "size": len(layer)}],
        }
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(config_digest, io.BytesIO(config))
        destination.put_blob(layer_digest, io.BytesIO(layer))
        destination.put_manifest(json.dumps(manifest).encode(), layout_version="1.2")
        plan = plan_image(str(tmp_path))
        assert plan.layout_version == "1.2"
        assert [b.digest for b in plan.blobs] == [config_digest, layer_digest]
        assert check_image(str(tmp_path)) == []

    @pytest.mark.parametrize(
        "config",
        [
            b'{"os": 5, "architecture": "amd64"}',
            b'{"os": "linux", "architecture": ["amd64"]}',
            b'{"os": "linux", "architecture": "amd64", "variant": 8}',
            b'{"os": null, "architecture": {}}',
            b"[" * 100_000 + b"]" * 100_000,
        ],
        ids=["os-number", "arch-list", "variant-number", "null-os", "deep-json"],
    )
    def test_platform_of_a_config_with_wrong_types_is_unknown(self, tmp_path, config):
        """A config whose platform fields are not strings tells no platform: the
        single image is planned as one whose platform cannot be told."""
        layer = b"layer"
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": sha256_of(config), "size": len(config)},
            "layers": [{"digest": sha256_of(layer), "size": len(layer)}],
        }
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha256_of(config), io.BytesIO(config))
        destination.put_blob(sha256_of(layer), io.BytesIO(layer))
        destination.put_manifest(json.dumps(manifest).encode())

        plan = plan_image(str(tmp_path), platform="linux/amd64")

        assert [blob.digest for blob in plan.blobs][0] == sha256_of(config)

    @pytest.mark.parametrize("architecture", [5, ["amd64"], None, ""])
    def test_platform_of_a_schema1_manifest_with_a_wrong_architecture(
        self, tmp_path, architecture
    ):
        """Schema 1 keeps its architecture in the manifest; a wrong type there
        tells no platform either."""
        layer = b"layer"
        manifest = {
            "schemaVersion": 1,
            "architecture": architecture,
            "fsLayers": [{"blobSum": sha256_of(layer)}],
        }
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha256_of(layer), io.BytesIO(layer))
        destination.put_manifest(json.dumps(manifest).encode())

        plan = plan_image(str(tmp_path), platform="linux/arm64")

        assert [blob.digest for blob in plan.blobs] == [sha256_of(layer)]

    def test_missing_instance_raises_when_strict(self, fresh_image):
        """A missing instance manifest fails a strict plan, naming the instance."""
        path = fresh_image("index")
        digest, instance_file = next(iter(instance_files(path).items()))
        instance_file.unlink()
        with pytest.raises(BlobNotFound, match=digest):
            plan_image(str(path))
        plan = plan_image(str(path), strict=False)
        assert len(plan.instances) == 1
        assert len(plan.problems) == 1 and digest in plan.problems[0]

    def test_corrupt_instance_raises_when_strict(self, fresh_image):
        """An instance manifest that no longer hashes to its name is refused."""
        path = fresh_image("list")
        digest, instance_file = next(iter(instance_files(path).items()))
        instance_file.write_bytes(instance_file.read_bytes() + b"\n")
        with pytest.raises(DigestMismatch, match=digest):
            plan_image(str(path))

    def test_not_an_image(self, tmp_path):
        """Planning a folder without an image raises NotAnImage."""
        with pytest.raises(NotAnImage):
            plan_image(str(tmp_path))


class TestCheckImage:
    """check_image finds what is missing or corrupt, naming the digest."""

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_intact_images_have_no_problems(self, dir_images, kind):
        """Every real image as built is intact."""
        assert check_image(str(dir_images[kind])) == []

    @pytest.mark.parametrize("kind", ["oci", "v2s1", "legacy-1.0", "legacy-2016"])
    def test_missing_blob(self, fresh_image, kind):
        """A deleted blob is reported missing by digest."""
        path = fresh_image(kind)
        digest, blob_file = first_layer(path)
        blob_file.unlink()
        problems = check_image(str(path))
        assert len(problems) == 1
        assert digest in problems[0] and "missing" in problems[0]

    @pytest.mark.parametrize("kind", ["oci", "v2s2", "legacy-1.0"])
    def test_truncated_blob(self, fresh_image, kind):
        """A blob cut short is reported with expected and found sizes."""
        path = fresh_image(kind)
        digest, blob_file = first_layer(path)
        size = blob_file.stat().st_size
        os.truncate(blob_file, size - 1)
        problems = check_image(str(path))
        assert len(problems) == 1
        assert digest in problems[0]
        assert f"expected {size} bytes, found {size - 1}" in problems[0]

    def test_truncated_blob_of_schema1_without_sizes(self, fresh_image):
        """Schema 1 records no sizes; a truncated blob fails on its digest."""
        path = fresh_image("v2s1")
        digest, blob_file = first_layer(path)
        os.truncate(blob_file, blob_file.stat().st_size - 1)
        problems = check_image(str(path))
        assert len(problems) == 1 and digest in problems[0]

    @pytest.mark.parametrize("kind", ["oci", "v2s1", "legacy-2016", "index"])
    def test_corrupted_blob(self, fresh_image, kind):
        """A blob of the right size with a flipped byte fails its digest."""
        path = fresh_image(kind)
        digest = plan_image(str(path)).blobs[-1].digest
        blob_file = next(path.glob(f"{digest[7:]}*"))
        data = bytearray(blob_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob_file.write_bytes(bytes(data))
        problems = check_image(str(path))
        assert len(problems) == 1
        assert digest in problems[0] and "hashes to" in problems[0]

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_missing_instance_manifest(self, fresh_image, kind):
        """A deleted instance manifest is reported by its digest."""
        path = fresh_image(kind)
        digest, instance_file = sorted(instance_files(path).items())[0]
        instance_file.unlink()
        problems = check_image(str(path))
        assert len(problems) == 1
        assert digest in problems[0] and "missing" in problems[0]

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_corrupted_instance_manifest(self, fresh_image, kind):
        """An edited instance manifest is reported corrupt by its digest."""
        path = fresh_image(kind)
        digest, instance_file = sorted(instance_files(path).items())[0]
        instance_file.write_bytes(instance_file.read_bytes() + b" ")
        problems = check_image(str(path))
        assert len(problems) == 1
        assert digest in problems[0] and "corrupt" in problems[0]

    def test_several_problems_are_all_reported(self, fresh_image):
        """A missing and a corrupted blob are both reported."""
        path = fresh_image("v2s2")
        blobs = plan_image(str(path)).blobs
        (path / blobs[0].digest[7:]).unlink()
        (path / blobs[-1].digest[7:]).write_bytes(b"x")
        problems = check_image(str(path))
        assert len(problems) == 2
        assert blobs[0].digest in problems[0] and blobs[-1].digest in problems[1]

    @pytest.mark.parametrize("damage", ["link-outside", "over-the-cap", "fifo"])
    def test_unreadable_instance_manifest_is_a_problem(self, fresh_image, damage):
        """An instance manifest that leads outside the image, is over the size
        cap or is not a regular file is listed, not raised; a strict plan raises."""
        path = fresh_image("index")
        digest, instance_file = sorted(instance_files(path).items())[0]
        if damage == "link-outside":
            outside = path.parent / "outside.manifest.json"
            outside.write_bytes(instance_file.read_bytes())
            instance_file.unlink()
            instance_file.symlink_to(outside)
            expected, error = "points outside the image", UnsafePath
        elif damage == "over-the-cap":
            instance_file.write_bytes(b" " * (MANIFEST_SIZE_LIMIT + 1))
            expected, error = "limit", TooLarge
        else:
            instance_file.unlink()
            os.mkfifo(instance_file)
            expected, error = "not a regular file", UnsafePath

        problems = check_image(str(path))

        assert len(problems) == 1
        assert digest in problems[0] and expected in problems[0]
        with pytest.raises(error):
            plan_image(str(path))

    def test_verify_blob_ignores_a_missing_optional_blob(self, tmp_path):
        """A non-distributable blob that is absent is not a problem."""
        DirImageDestination(str(tmp_path))
        digest = f"sha256:{hashlib.sha256(b'foreign layer').hexdigest()}"
        assert verify_blob(str(tmp_path), digest, 13, optional=True) is None
        assert digest in verify_blob(str(tmp_path), digest, 13)
