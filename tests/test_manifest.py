"""Manifests: every kind is recognised, its blobs and instances listed, its digest
computed as skopeo does, and every malformed document refused with a reason."""

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import imagekit
from storage import InvalidManifest, Platform, manifest_digest, parse_manifest
from storage.manifest import (
    DOCKER_MANIFEST_LIST,
    DOCKER_V2_SCHEMA1,
    DOCKER_V2_SCHEMA1_SIGNED,
    DOCKER_V2_SCHEMA2,
    OCI_INDEX,
    OCI_MANIFEST,
)

# The gzip of an empty tar: schema 1 repeats it for every history entry without a layer.
EMPTY_LAYER = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


LAYER_A = sha256(b"layer a")
LAYER_B = sha256(b"layer b")
CONFIG = sha256(b"config")


def skopeo_manifest_digest(path: Path) -> str:
    """The digest skopeo computes for the manifest file at `path`."""
    skopeo = imagekit.require_tool("skopeo")
    completed = subprocess.run(
        [skopeo, "manifest-digest", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout.strip()


def encode(document) -> bytes:
    return json.dumps(document).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def schema1_document(layers: list[str]) -> dict:
    return {
        "schemaVersion": 1,
        "name": "example/app",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": layer} for layer in layers],
        "history": [{"v1Compatibility": "{}"} for _ in layers],
    }


def sign_schema1(payload: bytes, header: dict) -> bytes:
    """Wrap `payload` in a JSON web signature as docker's libtrust lays it out.

    The signature value is not valid: digests cover only the payload, which the
    protected header's formatLength and formatTail describe.
    """
    cut = payload.rindex(b"\n}")
    protected = {
        "formatLength": cut,
        "formatTail": b64url(payload[cut:]),
        "time": "2024-01-01T00:00:00Z",
    }
    signature = {"header": header, "signature": "AAAA", "protected": ""}
    signature["protected"] = b64url(json.dumps(protected).encode())
    block = b',\n   "signatures": [' + json.dumps(signature).encode() + b"]"
    return payload[:cut] + block + payload[cut:]


@pytest.fixture(scope="module")
def jws_header(dir_images) -> dict:
    """A real libtrust header (with its public key), taken from skopeo's schema 1."""
    return imagekit.read_manifest(dir_images["v2s1"])["signatures"][0]["header"]


def image_document(media_type: str | None, layers: list[dict]) -> dict:
    document = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": CONFIG,
            "size": 6,
        },
        "layers": layers,
    }
    if media_type is not None:
        document["mediaType"] = media_type
    return document


def list_document(media_type: str | None, entries: list[dict]) -> dict:
    document = {"schemaVersion": 2, "manifests": entries}
    if media_type is not None:
        document["mediaType"] = media_type
    return document


def list_entry(digest: str, platform: dict | None) -> dict:
    entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": 501}
    if platform is not None:
        entry["platform"] = platform
    return entry


class TestRealImages:
    """Manifests written by skopeo, of every kind imagekit builds."""

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_parse_recognises_the_kind(self, dir_images, kind):
        """Each kind parses to its media type."""
        data = (dir_images[kind] / "manifest.json").read_bytes()
        assert parse_manifest(data).media_type == imagekit.KIND_MEDIA_TYPES[kind]

    @pytest.mark.parametrize(
        "kind", [k for k in imagekit.KINDS if k not in imagekit.MULTI_INSTANCE_KINDS]
    )
    def test_single_image_lists_every_blob_file_once(self, dir_images, kind):
        """The blobs of a single image are exactly the blob files in its folder."""
        path = dir_images[kind]
        manifest = parse_manifest((path / "manifest.json").read_bytes())
        digests = [blob.digest for blob in manifest.blobs]
        on_disk = {
            "sha256:" + entry.name.removesuffix(".tar")
            for entry in path.iterdir()
            if entry.name not in ("manifest.json", "version")
            and not entry.name.startswith("signature-")
        }
        assert len(digests) == len(set(digests))
        assert set(digests) == on_disk
        assert manifest.instances == ()

    @pytest.mark.parametrize("kind", ["oci", "v2s2", "signed"])
    def test_sizes_match_the_blob_files(self, dir_images, kind):
        """Each listed size is the size of the blob file."""
        path = dir_images[kind]
        manifest = parse_manifest((path / "manifest.json").read_bytes())
        for blob in manifest.blobs:
            blob_file = path / blob.digest.removeprefix("sha256:")
            assert blob.size == blob_file.stat().st_size

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_list_names_two_instances_with_platforms(self, dir_images, kind):
        """Index and list name both instances, the arm64 one with its variant."""
        path = dir_images[kind]
        manifest = parse_manifest((path / "manifest.json").read_bytes())
        assert manifest.is_list
        assert manifest.blobs == ()
        platforms = [instance.platform for instance in manifest.instances]
        assert platforms == [
            Platform("linux", "amd64"),
            Platform("linux", "arm64", "v8"),
        ]
        for instance in manifest.instances:
            stem = instance.digest.removeprefix("sha256:")
            instance_file = path / f"{stem}.manifest.json"
            assert instance.size == instance_file.stat().st_size
            instance_manifest = parse_manifest(instance_file.read_bytes())
            assert instance_manifest.media_type == instance.media_type
            assert len(instance_manifest.blobs) >= 2

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_manifest_digest_agrees_with_skopeo(self, dir_images, kind):
        """manifest_digest and the parsed digest equal skopeo manifest-digest."""
        manifest_file = dir_images[kind] / "manifest.json"
        data = manifest_file.read_bytes()
        expected = skopeo_manifest_digest(manifest_file)
        assert str(manifest_digest(data)) == expected
        assert parse_manifest(data).digest == expected

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_instance_digests_agree_with_skopeo(self, dir_images, kind):
        """Each instance manifest hashes to the digest that names it."""
        for instance_file in dir_images[kind].glob("*.manifest.json"):
            expected = skopeo_manifest_digest(instance_file)
            assert expected == "sha256:" + instance_file.name.split(".")[0]
            assert str(manifest_digest(instance_file.read_bytes())) == expected

    def test_signed_schema1_digest_covers_only_the_payload(self, dir_images):
        """The digest of skopeo's signed schema 1 is not the hash of the file."""
        data = (dir_images["v2s1"] / "manifest.json").read_bytes()
        assert str(manifest_digest(data)) != sha256(data)


class TestSchema1:
    """Hand-written Docker schema 1 manifests, signed and unsigned."""

    def test_unsigned_lists_duplicate_blobs_once(self):
        """Repeated empty layers appear once, in first-seen order."""
        data = encode(schema1_document([EMPTY_LAYER, LAYER_A, EMPTY_LAYER, LAYER_B]))
        manifest = parse_manifest(data)
        assert manifest.media_type == DOCKER_V2_SCHEMA1
        assert [b.digest for b in manifest.blobs] == [EMPTY_LAYER, LAYER_A, LAYER_B]
        assert all(blob.size is None for blob in manifest.blobs)
        assert manifest.digest == sha256(data)

    def test_unsigned_digest_agrees_with_skopeo(self, tmp_path):
        """An unsigned schema 1 is named by the hash of its bytes, as skopeo says."""
        path = tmp_path / "manifest.json"
        path.write_bytes(encode(schema1_document([LAYER_A, EMPTY_LAYER])))
        assert parse_manifest(path.read_bytes()).digest == skopeo_manifest_digest(path)

    def test_signed_lists_duplicate_blobs_once(self, jws_header):
        """A signed schema 1 lists each blob once and is typed prettyjws."""
        document = schema1_document([EMPTY_LAYER, LAYER_A, EMPTY_LAYER])
        payload = json.dumps(document, indent=3).encode()
        manifest = parse_manifest(sign_schema1(payload, jws_header))
        assert manifest.media_type == DOCKER_V2_SCHEMA1_SIGNED
        assert [b.digest for b in manifest.blobs] == [EMPTY_LAYER, LAYER_A]

    def test_signed_digest_agrees_with_skopeo(self, jws_header, tmp_path):
        """The digest of a signed schema 1 is the payload's, as skopeo computes."""
        document = schema1_document([EMPTY_LAYER, LAYER_A, EMPTY_LAYER])
        payload = json.dumps(document, indent=3).encode()
        path = tmp_path / "manifest.json"
        path.write_bytes(sign_schema1(payload, jws_header))
        expected = skopeo_manifest_digest(path)
        assert expected == sha256(payload)
        assert parse_manifest(path.read_bytes()).digest == expected
        assert str(manifest_digest(path.read_bytes())) == expected

    def test_signed_with_a_bad_protected_header_is_refused(self, jws_header):
        """A protected header that is not base64 JSON is named as the problem."""
        payload = json.dumps(schema1_document([LAYER_A]), indent=3).encode()
        document = json.loads(sign_schema1(payload, jws_header))
        document["signatures"][0]["protected"] = "!!not base64!!"
        with pytest.raises(InvalidManifest, match="protected header"):
            parse_manifest(encode(document))

    def test_signed_with_a_format_length_beyond_the_data_is_refused(self, jws_header):
        """A formatLength longer than the document is out of range."""
        payload = json.dumps(schema1_document([LAYER_A]), indent=3).encode()
        document = json.loads(sign_schema1(payload, jws_header))
        protected = {"formatLength": 10**9, "formatTail": b64url(b"\n}")}
        document["signatures"][0]["protected"] = b64url(encode(protected))
        with pytest.raises(InvalidManifest, match="formatLength"):
            parse_manifest(encode(document))


class TestImageManifests:
    """Hand-written Docker schema 2 and OCI image manifests."""

    LAYERS = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": LAYER_A,
            "size": 7,
        },
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": LAYER_B,
            "size": 7,
        },
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": LAYER_A,
            "size": 7,
        },
    ]

    @pytest.mark.parametrize(
        "media_type, expected",
        [
            (DOCKER_V2_SCHEMA2, DOCKER_V2_SCHEMA2),
            (OCI_MANIFEST, OCI_MANIFEST),
            (None, OCI_MANIFEST),
        ],
    )
    def test_lists_config_then_unique_layers(self, media_type, expected):
        """Config first, then each layer once, with sizes and media types."""
        data = encode(image_document(media_type, self.LAYERS))
        manifest = parse_manifest(data)
        assert manifest.media_type == expected
        assert [(b.digest, b.size) for b in manifest.blobs] == [
            (CONFIG, 6),
            (LAYER_A, 7),
            (LAYER_B, 7),
        ]
        assert manifest.blobs[0].media_type.endswith("image.config.v1+json")
        assert manifest.digest == sha256(data)
        assert not manifest.is_list

    def test_layer_with_urls_is_optional(self):
        """A non-distributable layer (with urls) is marked optional."""
        layers = [{"digest": LAYER_A, "size": 7, "urls": ["https://example.invalid"]}]
        manifest = parse_manifest(encode(image_document(OCI_MANIFEST, layers)))
        assert [b.optional for b in manifest.blobs] == [False, True]

    def test_missing_size_is_none(self):
        """A descriptor without size has size None."""
        manifest = parse_manifest(encode(image_document(None, [{"digest": LAYER_A}])))
        assert manifest.blobs[1].size is None

    def test_sha512_layer_is_accepted(self):
        """Layers may use sha512 digests."""
        digest = f"sha512:{hashlib.sha512(b'x').hexdigest()}"
        manifest = parse_manifest(encode(image_document(None, [{"digest": digest}])))
        assert manifest.blobs[1].digest == digest


class TestLists:
    """Hand-written Docker manifest lists and OCI image indexes."""

    ENTRIES = [
        list_entry(LAYER_A, {"os": "linux", "architecture": "amd64"}),
        list_entry(LAYER_B, {"os": "linux", "architecture": "arm", "variant": "v7"}),
        list_entry(CONFIG, None),
    ]

    @pytest.mark.parametrize(
        "media_type, expected",
        [
            (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST),
            (OCI_INDEX, OCI_INDEX),
            (None, OCI_INDEX),
        ],
    )
    def test_lists_instances_with_platforms_and_variants(self, media_type, expected):
        """Each entry becomes an instance with its platform, variant or none."""
        data = encode(list_document(media_type, self.ENTRIES))
        manifest = parse_manifest(data)
        assert manifest.media_type == expected
        assert manifest.is_list
        assert manifest.blobs == ()
        assert [i.digest for i in manifest.instances] == [LAYER_A, LAYER_B, CONFIG]
        assert [i.platform for i in manifest.instances] == [
            Platform("linux", "amd64"),
            Platform("linux", "arm", "v7"),
            None,
        ]
        assert [str(i.platform) for i in manifest.instances[:2]] == [
            "linux/amd64",
            "linux/arm/v7",
        ]
        assert all(i.size == 501 for i in manifest.instances)
        assert manifest.digest == sha256(data)

    def test_empty_list_has_no_instances(self):
        """A list with no entries is valid and empty."""
        manifest = parse_manifest(encode(list_document(OCI_INDEX, [])))
        assert manifest.instances == ()


def good_image(**changes) -> dict:
    document = image_document(DOCKER_V2_SCHEMA2, [{"digest": LAYER_A, "size": 7}])
    document.update(changes)
    return document


def with_layer(**fields) -> dict:
    layer = {"digest": LAYER_A, "size": 7}
    layer.update(fields)
    return image_document(DOCKER_V2_SCHEMA2, [layer])


MALFORMED = [
    ("empty", b"", "not valid JSON"),
    ("not json", b"hello", "not valid JSON"),
    ("truncated", encode(good_image())[:-10], "not valid JSON"),
    ("not utf-8", b'{"schemaVersion": 2, "x": "\xff"}', "not valid JSON"),
    ("a list", b"[]", "must be a JSON object, found list"),
    ("a string", b'"manifest"', "must be a JSON object, found str"),
    ("no schemaVersion", encode({"layers": []}), "schemaVersion must be 1 or 2"),
    ("schemaVersion 3", encode(good_image(schemaVersion=3)), "found 3"),
    ("schemaVersion string", encode(good_image(schemaVersion="2")), "found '2'"),
    ("schemaVersion true", encode(good_image(schemaVersion=True)), "found True"),
    ("schemaVersion 2.0", encode(good_image(schemaVersion=2.0)), "found 2.0"),
    (
        "schemaVersion 1.0",
        encode(dict(schema1_document([LAYER_A]), schemaVersion=1.0)),
        "found 1.0",
    ),
    (
        "unknown mediaType",
        encode(good_image(mediaType="application/vnd.example+json")),
        "unknown mediaType 'application/vnd.example+json'",
    ),
    ("mediaType not a string", encode(good_image(mediaType=7)), "mediaType must be"),
    (
        "no mediaType nor keys",
        encode({"schemaVersion": 2, "layers": []}),
        "no mediaType",
    ),
    ("layers not a list", encode(good_image(layers={"a": 1})), "layers must be a list"),
    (
        "layers missing",
        encode({k: v for k, v in good_image().items() if k != "layers"}),
        "layers must be a list, found nothing",
    ),
    ("config missing", encode(good_image(config=None)), "config must be a JSON object"),
    ("layer not an object", encode(good_image(layers=["x"])), "layers[0] must be"),
    ("size negative", encode(with_layer(size=-1)), "layers[0].size"),
    ("size bool", encode(with_layer(size=True)), "layers[0].size"),
    ("size string", encode(with_layer(size="7")), "layers[0].size"),
    ("size float", encode(with_layer(size=7.5)), "layers[0].size"),
    ("digest invalid", encode(with_layer(digest="sha256:../x")), "sha256:../x"),
    ("digest upper", encode(with_layer(digest=LAYER_A.upper())), "layers[0]"),
    ("digest missing", encode(with_layer(digest=None)), "layers[0].digest"),
    ("digest number", encode(with_layer(digest=5)), "layers[0].digest"),
    (
        "layer mediaType number",
        encode(with_layer(mediaType=5)),
        "layers[0].mediaType",
    ),
    (
        "manifests not a list",
        encode(list_document(OCI_INDEX, None)),
        "manifests must be a list",
    ),
    (
        "instance digest invalid",
        encode(list_document(OCI_INDEX, [{"digest": "md5:abc", "size": 1}])),
        "manifests[0]",
    ),
    (
        "platform not an object",
        encode(list_document(OCI_INDEX, [list_entry(LAYER_A, None) | {"platform": 1}])),
        "manifests[0].platform",
    ),
    (
        "platform without os",
        encode(list_document(OCI_INDEX, [list_entry(LAYER_A, {"architecture": "x"})])),
        "manifests[0].platform.os",
    ),
    (
        "variant not a string",
        encode(
            list_document(
                OCI_INDEX,
                [list_entry(LAYER_A, {"os": "l", "architecture": "a", "variant": 8})],
            )
        ),
        "platform.variant",
    ),
    (
        "fsLayers not a list",
        encode(dict(schema1_document([]), fsLayers="x")),
        "fsLayers must be a list",
    ),
    (
        "blobSum invalid",
        encode(schema1_document(["sha256:../x"])),
        "fsLayers[0]",
    ),
    (
        "blobSum missing",
        encode(dict(schema1_document([]), fsLayers=[{}])),
        "fsLayers[0].blobSum",
    ),
]


@pytest.mark.parametrize(
    "data, message", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_parse_manifest_refuses_malformed_documents(data, message):
    """Each malformed manifest raises InvalidManifest saying what is wrong."""
    with pytest.raises(InvalidManifest) as caught:
        parse_manifest(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_manifest_is_a_value_error():
    """Callers that only know the builtins catch InvalidManifest as ValueError."""
    with pytest.raises(ValueError):
        parse_manifest(b"{")
