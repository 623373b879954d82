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


def test_verify_images_of_a_tree_on_the_thread_runner(
    dir_images, tmp_path, prefect_api
):
    from flows import verify_images

    root = tmp_path / "root"
    kinds = {"apps/oci": "oci", "apps/team/index": "index", "v2s2": "v2s2"}
    for relative, kind in kinds.items():
        imagekit.copy_image(dir_images[kind], root / relative)

    reports = verify_images(f"dir:{root}", parallel=2, runner="thread")

    assert [report.path for report in reports] == [
        str(root / relative) for relative in sorted(kinds)
    ]
    for report, relative in zip(reports, sorted(kinds), strict=True):
        assert report.ok
        planned = storage.plan_image(str(dir_images[kinds[relative]])).blobs
        assert report.blobs_checked == len(planned)

    digest = imagekit.read_manifest(root / "v2s2")["layers"][0]["digest"]
    damage(root / "v2s2" / digest.split(":")[1])
    with pytest.raises(ImageCorrupt) as caught:
        verify_images(str(root), runner="thread")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("v2s2: ")
    assert digest in caught.value.problems[0]


def test_verify_images_refuses_an_unknown_runner(dir_images, tmp_path, prefect_api):
    from prefect.exceptions import ParameterTypeError

    from flows import verify_images

    imagekit.copy_image(dir_images["oci"], tmp_path / "root" / "oci")

    with pytest.raises(ParameterTypeError, match="runner"):
        verify_images(str(tmp_path / "root"), runner="threads")
