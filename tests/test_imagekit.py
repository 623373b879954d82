"""Check that the image factory makes real images that skopeo reads and checks."""

import hashlib
import json
import os
from pathlib import Path

import pytest

import imagekit

ACCEPTED_KINDS = [kind for kind in imagekit.KINDS if kind not in imagekit.LEGACY_KINDS]
SINGLE_IMAGE_KINDS = [
    kind for kind in ACCEPTED_KINDS if kind not in imagekit.MULTI_INSTANCE_KINDS
]
HELLO_IMAGE = Path(__file__).parent / "data" / "hello"

EXPECTED_MEDIA_TYPES = {
    "oci": imagekit.OCI_MANIFEST,
    "v2s2": imagekit.DOCKER_V2S2,
    "v2s1": imagekit.DOCKER_V2S1_SIGNED,
    "index": imagekit.OCI_INDEX,
    "list": imagekit.DOCKER_LIST,
    "signed": imagekit.DOCKER_V2S2,
    "legacy-1.0": imagekit.DOCKER_V2S2,
    "legacy-2016": imagekit.DOCKER_V2S2,
}
EXPECTED_CONFIG_MEDIA_TYPES = {
    imagekit.OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
    imagekit.DOCKER_V2S2: "application/vnd.docker.container.image.v1+json",
}
EXPECTED_PLATFORMS = [
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "arm64", "os": "linux", "variant": "v8"},
]


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def referenced_blob_digests(manifest: dict) -> list[str]:
    if manifest.get("schemaVersion") == 1:
        return [layer["blobSum"] for layer in manifest["fsLayers"]]
    return [manifest["config"]["digest"]] + [
        layer["digest"] for layer in manifest["layers"]
    ]


def image_manifests(image_path: Path) -> list[dict]:
    """Return the single image manifest, or every instance manifest of a list."""
    manifest = imagekit.read_manifest(image_path)
    if "manifests" not in manifest:
        return [manifest]
    return [
        json.loads((image_path / f"{digest[7:]}.manifest.json").read_text())
        for digest in (instance["digest"] for instance in manifest["manifests"])
    ]


def gpg_agents_serving(gnupghome: Path) -> list[int]:
    running = []
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            command_line = (process / "cmdline").read_bytes()
        except OSError:
            continue
        if b"gpg-agent" in command_line and str(gnupghome).encode() in command_line:
            running.append(int(process.name))
    return running


@pytest.mark.parametrize("kind", imagekit.KINDS)
def test_each_kind_has_its_manifest_type(dir_images, kind):
    manifest = imagekit.read_manifest(dir_images[kind])
    media_type = imagekit.manifest_media_type(manifest)

    assert media_type == EXPECTED_MEDIA_TYPES[kind]
    if media_type in EXPECTED_CONFIG_MEDIA_TYPES:
        assert (
            manifest["config"]["mediaType"] == EXPECTED_CONFIG_MEDIA_TYPES[media_type]
        )
        assert len(manifest["layers"]) == 2


@pytest.mark.parametrize("kind", ACCEPTED_KINDS)
def test_skopeo_accepts_each_current_kind(dir_images, kind, tmp_path):
    imagekit.skopeo_accepts(dir_images[kind], tmp_path)


@pytest.mark.parametrize("kind", ACCEPTED_KINDS)
def test_every_file_is_a_known_part_named_by_its_digest(dir_images, kind):
    image_path = dir_images[kind]

    assert (image_path / "version").read_text() == imagekit.DIR_VERSION_1_1
    for entry in image_path.iterdir():
        if imagekit.BLOB_NAME.fullmatch(entry.name):
            assert sha256_hex(entry) == entry.name
        elif imagekit.INSTANCE_MANIFEST_NAME.fullmatch(entry.name):
            assert sha256_hex(entry) == entry.name.split(".")[0]
        else:
            assert entry.name in ("manifest.json", "version") or (
                imagekit.SIGNATURE_NAME.fullmatch(entry.name)
            ), f"unexpected file {entry.name}"

    for manifest in image_manifests(image_path):
        for digest in referenced_blob_digests(manifest):
            assert (image_path / digest.removeprefix("sha256:")).is_file()


@pytest.mark.parametrize(
    ("kind", "instance_media_type"),
    [("index", imagekit.OCI_MANIFEST), ("list", imagekit.DOCKER_V2S2)],
)
def test_multi_instance_kinds_hold_two_platforms(dir_images, kind, instance_media_type):
    image_path = dir_images[kind]
    instances = imagekit.read_manifest(image_path)["manifests"]

    assert [instance["platform"] for instance in instances] == EXPECTED_PLATFORMS
    for instance in instances:
        assert instance["mediaType"] == instance_media_type
        instance_file = image_path / f"{instance['digest'][7:]}.manifest.json"
        assert instance_file.stat().st_size == instance["size"]
        assert sha256_hex(instance_file) == instance["digest"][7:]


def test_schema_one_kind_is_a_signed_schema_one_manifest(dir_images):
    manifest = imagekit.read_manifest(dir_images["v2s1"])

    assert manifest["schemaVersion"] == 1
    assert manifest["architecture"] == "amd64"
    assert len(manifest["fsLayers"]) == len(manifest["history"])
    assert len(manifest["signatures"]) == 1


@pytest.mark.parametrize("kind", imagekit.LEGACY_KINDS)
def test_legacy_kinds_store_every_blob_as_tar(dir_images, kind):
    image_path = dir_images[kind]
    manifest = imagekit.read_manifest(image_path)

    assert imagekit.blob_files(image_path) == []
    tar_files = sorted(image_path.glob("*.tar"))
    assert len(tar_files) == len(referenced_blob_digests(manifest)) == 3
    for digest in referenced_blob_digests(manifest):
        blob = image_path / f"{digest.removeprefix('sha256:')}.tar"
        assert sha256_hex(blob) == digest.removeprefix("sha256:")

    version_file = image_path / "version"
    if kind == "legacy-1.0":
        assert version_file.read_text() == imagekit.DIR_VERSION_1_0
    else:
        assert not version_file.exists()


@pytest.mark.parametrize("kind", imagekit.LEGACY_KINDS)
def test_skopeo_reads_the_legacy_manifest_but_not_its_blobs(dir_images, kind, tmp_path):
    skopeo = imagekit.require_tool("skopeo")
    image_path = dir_images[kind]
    env = imagekit.tool_env(tmp_path)

    # skopeo does not look at the version file when reading, so only the
    # blob lookup by bare hex name makes it fail.
    raw = imagekit.run_tool([skopeo, "inspect", "--raw", f"dir:{image_path}"], env=env)
    assert raw.stdout == (image_path / "manifest.json").read_bytes()
    with pytest.raises(imagekit.ToolError, match="no such file or directory"):
        imagekit.run_tool([skopeo, "inspect", f"dir:{image_path}"], env=env)
    with pytest.raises(AssertionError):
        imagekit.skopeo_accepts(image_path, tmp_path)


def test_both_signatures_of_the_signed_kind_verify(dir_images):
    signed = imagekit.read_signing_info(dir_images["signed"])
    manifest_path = signed.path / "manifest.json"

    assert [path.name for path in signed.signatures] == ["signature-1", "signature-2"]
    for signature in signed.signatures:
        assert imagekit.verify_signature(
            signed.gnupghome,
            manifest_path,
            signed.identity,
            signed.fingerprint,
            signature,
        )


def test_a_tampered_manifest_fails_verification(fresh_image):
    signed = imagekit.read_signing_info(fresh_image("signed"))
    manifest_path = signed.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["layers"].reverse()
    manifest_path.write_text(json.dumps(manifest))

    for signature in signed.signatures:
        assert not imagekit.verify_signature(
            signed.gnupghome,
            manifest_path,
            signed.identity,
            signed.fingerprint,
            signature,
        )


def test_another_identity_fails_verification(dir_images):
    signed = imagekit.read_signing_info(dir_images["signed"])

    assert not imagekit.verify_signature(
        signed.gnupghome,
        signed.path / "manifest.json",
        "registry.example/dirimage/someone-else:v1",
        signed.fingerprint,
        signed.signatures[0],
    )


def test_a_missing_signature_file_raises(dir_images, tmp_path):
    signed = imagekit.read_signing_info(dir_images["signed"])

    with pytest.raises(imagekit.ToolError):
        imagekit.verify_signature(
            signed.gnupghome,
            signed.path / "manifest.json",
            signed.identity,
            signed.fingerprint,
            tmp_path / "signature-9",
        )


def test_no_gpg_agent_outlives_signing_or_verifying(dir_images):
    signed = imagekit.read_signing_info(dir_images["signed"])
    imagekit.verify_signature(
        signed.gnupghome,
        signed.path / "manifest.json",
        signed.identity,
        signed.fingerprint,
        signed.signatures[1],
    )

    assert gpg_agents_serving(signed.gnupghome) == []


def test_skopeo_accepts_rejects_a_corrupted_layer(fresh_image, tmp_path):
    image_path = fresh_image("v2s2")
    layer_digest = imagekit.read_manifest(image_path)["layers"][0]["digest"]
    layer = image_path / layer_digest.removeprefix("sha256:")
    content = bytearray(layer.read_bytes())
    content[len(content) // 2] ^= 0xFF
    layer.write_bytes(bytes(content))

    with pytest.raises(AssertionError, match="Digest did not match"):
        imagekit.skopeo_accepts(image_path, tmp_path / "work")


def test_skopeo_accepts_rejects_a_changed_instance_manifest(fresh_image, tmp_path):
    image_path = fresh_image("index")
    first_digest = imagekit.read_manifest(image_path)["manifests"][0]["digest"]
    instance_file = image_path / f"{first_digest[7:]}.manifest.json"
    instance = json.loads(instance_file.read_text())
    instance["annotations"] = {"changed": "yes"}
    instance_file.write_text(json.dumps(instance))

    with pytest.raises(AssertionError, match="does not match"):
        imagekit.skopeo_accepts(image_path, tmp_path / "work")


def read_layout_image(layout_image: str) -> tuple[dict, dict]:
    """Return the manifest and config of a tagged image in an OCI layout."""
    layout_text, _, tag = layout_image.rpartition(":")
    layout = Path(layout_text)
    descriptor = next(
        descriptor
        for descriptor in json.loads((layout / "index.json").read_text())["manifests"]
        if descriptor["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / descriptor["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    return manifest, config


def test_build_oci_layout_sets_platform_and_adds_a_layer_for_files(tmp_path):
    plain = imagekit.build_oci_layout(tmp_path / "plain", name="plain")
    extended = imagekit.build_oci_layout(
        tmp_path / "extended",
        name="extended",
        arch="arm64",
        os_="linux",
        files={"srv/notes.txt": "extra layer\n"},
    )

    plain_manifest, plain_config = read_layout_image(plain)
    extended_manifest, extended_config = read_layout_image(extended)
    assert (plain_config["architecture"], plain_config["os"]) == ("amd64", "linux")
    assert (extended_config["architecture"], extended_config["os"]) == (
        "arm64",
        "linux",
    )
    assert len(plain_manifest["layers"]) == 2
    assert len(extended_manifest["layers"]) == 3
    assert len(extended_config["rootfs"]["diff_ids"]) == 3


def test_build_oci_layout_is_reproducible(tmp_path):
    first = imagekit.build_oci_layout(tmp_path / "first", name="same")
    second = imagekit.build_oci_layout(tmp_path / "second", name="same")

    assert read_layout_image(first) == read_layout_image(second)


def test_checked_in_hello_image_is_a_small_two_layer_oci_image(tmp_path):
    manifest = imagekit.read_manifest(HELLO_IMAGE)
    total_size = sum(entry.stat().st_size for entry in HELLO_IMAGE.iterdir())

    assert imagekit.manifest_media_type(manifest) == imagekit.OCI_MANIFEST
    assert len(manifest["layers"]) == 2
    assert total_size < 16 * 1024
    imagekit.skopeo_accepts(HELLO_IMAGE, tmp_path)


def test_fresh_image_is_an_independent_copy(dir_images, fresh_image):
    original = dir_images["oci"]
    copy = fresh_image("oci")
    (copy / "manifest.json").write_text("{}")

    assert copy != original
    assert json.loads((original / "manifest.json").read_text())["schemaVersion"] == 2
    assert sorted(os.listdir(copy)) == sorted(os.listdir(original))
