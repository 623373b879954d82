"""The verify_image flow: intact images pass, damage is reported by digest."""

import json

import pytest

import imagekit
import storage
from flows import ImageCorrupt, verify_image


def instance_digests(image) -> list[str]:
    return [entry["digest"] for entry in imagekit.read_manifest(image)["manifests"]]


def layer_digests(image, instance: str) -> list[str]:
    instance_hex = instance.split(":")[1]
    manifest = json.loads((image / f"{instance_hex}.manifest.json").read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def damage(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", imagekit.KINDS)
def test_intact_image_is_ok(kind, dir_images, prefect_api):
    image = dir_images[kind]

    report = verify_image(f"dir:{image}")

    assert report.ok and report.problems == []
    assert report.blobs_checked == len(storage.plan_image(str(image)).blobs)
    assert report.bytes_checked > 0


def test_missing_blob_is_reported(fresh_image, prefect_api):
    image = fresh_image("oci")
    digest = imagekit.read_manifest(image)["layers"][1]["digest"]
    (image / digest.split(":")[1]).unlink()

    with pytest.raises(ImageCorrupt) as caught:
        verify_image(str(image))

    assert len(caught.value.problems) == 1
    assert digest in caught.value.problems[0]
    assert "missing" in caught.value.problems[0]
    assert digest in str(caught.value)


def test_corrupt_blob_is_reported(fresh_image, prefect_api):
    image = fresh_image("v2s2")
    digest = imagekit.read_manifest(image)["layers"][0]["digest"]
    damage(image / digest.split(":")[1])

    with pytest.raises(ImageCorrupt) as caught:
        verify_image(str(image))

    assert len(caught.value.problems) == 1
    assert digest in caught.value.problems[0]


def test_corrupt_instance_manifest_is_reported(fresh_image, prefect_api):
    image = fresh_image("index")
    instance = instance_digests(image)[0]
    damage(image / f"{instance.split(':')[1]}.manifest.json")

    with pytest.raises(ImageCorrupt) as caught:
        verify_image(str(image))

    assert len(caught.value.problems) == 1
    assert instance in caught.value.problems[0]


def test_every_problem_is_listed(fresh_image, prefect_api):
    image = fresh_image("list")
    first, second = instance_digests(image)
    missing, corrupt = layer_digests(image, second)
    (image / missing.split(":")[1]).unlink()
    damage(image / corrupt.split(":")[1])
    damage(image / f"{first.split(':')[1]}.manifest.json")

    with pytest.raises(ImageCorrupt) as caught:
        verify_image(str(image), parallel=2)

    problems = caught.value.problems
    assert len(problems) == 3
    for digest in (first, missing, corrupt):
        assert sum(digest in problem for problem in problems) == 1
    assert "and 2 more" in str(caught.value)
