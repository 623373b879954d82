"""Property-based tests: digest parsing, path helpers and manifest parsing raise only
our own errors on any input, and never let a digest name a file outside the image.
"""

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import layout
from storage.digest import HEX_LENGTHS, Digest, parse_digest
from storage.errors import InvalidDigest, InvalidManifest
from storage.manifest import (
    DOCKER_MANIFEST_LIST,
    DOCKER_V2_SCHEMA2,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_manifest,
)

# Bounded and without deadlines, so a slow moment on a busy machine never fails them.
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ROOT = "/srv/images/root"

hex_text = st.sampled_from("0123456789abcdef")


@st.composite
def valid_digests(draw) -> str:
    algorithm = draw(st.sampled_from(sorted(HEX_LENGTHS)))
    length = HEX_LENGTHS[algorithm]
    hex_part = draw(st.text(hex_text, min_size=length, max_size=length))
    return f"{algorithm}:{hex_part}"


def near_digests():
    """Text that looks like a digest: the likeliest way to slip past a parser."""
    algorithm = st.sampled_from(["sha256", "sha512", "SHA256", "md5", "", "sha256/.."])
    body = st.text(st.sampled_from("0123456789abcdefABCDEF./\\:-\x00 \n"), max_size=140)
    separator = st.sampled_from(":-")
    return st.builds(lambda a, s, b: f"{a}{s}{b}", algorithm, separator, body)


def assert_inside_root(path: str) -> None:
    assert os.path.commonpath([ROOT, os.path.normpath(path)]) == ROOT
    assert os.path.dirname(path) == ROOT, f"{path} is not directly in {ROOT}"


@PROPERTY_SETTINGS
@given(st.one_of(st.text(), near_digests(), valid_digests()))
def test_parse_digest_raises_only_invalid_digest_or_gives_safe_paths(text):
    try:
        digest = parse_digest(text)
    except InvalidDigest:
        return

    assert isinstance(digest, Digest)
    assert str(digest) == text
    paths_and_kinds = [
        (layout.blob_path(ROOT, digest), "blob"),
        (layout.manifest_path(ROOT, digest), "instance-manifest"),
        (layout.signature_path(ROOT, 1, digest), "instance-signature"),
        (layout.signature_path(ROOT, 12, digest), "instance-signature"),
    ]
    if digest.algorithm == "sha256":
        # Layouts before 1.1 only ever held sha256 blobs.
        paths_and_kinds.append(
            (layout.blob_path(ROOT, digest, layout.VERSION_1_0), "legacy-blob")
        )
    for path, kind in paths_and_kinds:
        assert_inside_root(path)
        assert layout.layout_kind(os.path.basename(path)) == kind, path


def path_helpers(digest) -> list[tuple[object, str]]:
    """Each path helper bound to `digest`, with the layout kind its name must be."""
    return [
        (lambda: layout.blob_path(ROOT, digest), "blob"),
        (lambda: layout.blob_path(ROOT, digest, layout.VERSION_1_2), "blob"),
        (lambda: layout.manifest_path(ROOT, digest), "instance-manifest"),
        (lambda: layout.signature_path(ROOT, 3, digest), "instance-signature"),
    ]


algorithm_parts = st.one_of(
    st.text(max_size=10), st.sampled_from(sorted(HEX_LENGTHS) + ["md5", "../sha256"])
)
hex_parts = st.one_of(
    st.text(max_size=140),
    st.text(st.sampled_from("0123456789abcdef./\\\x00"), max_size=130),
    st.builds(lambda n: "0" * n, st.sampled_from([64, 128])),
)


@PROPERTY_SETTINGS
@given(algorithm_parts, hex_parts)
def test_digest_of_any_parts_is_refused_or_names_a_file_inside(algorithm, hex_part):
    """A Digest built from any two strings, by its constructor or around it, is
    refused by every path helper with InvalidDigest, or names a layout file
    directly inside the folder."""
    try:
        built = Digest(algorithm, hex_part)
    except InvalidDigest:
        built = None
    smuggled = Digest._make((algorithm, hex_part))

    for digest in (built, smuggled):
        if digest is None:
            continue
        for helper, kind in path_helpers(digest):
            try:
                path = helper()
            except InvalidDigest:
                assert built is None, f"{built!r} is valid yet was refused"
                continue
            assert built is not None, f"{digest!r} is invalid yet named {path}"
            assert_inside_root(path)
            assert layout.layout_kind(os.path.basename(path)) == kind, path


@PROPERTY_SETTINGS
@given(st.none() | st.integers() | st.floats() | st.binary() | st.lists(st.text()))
def test_parse_digest_rejects_values_that_are_not_text(value):
    try:
        parse_digest(value)
    except InvalidDigest:
        return
    raise AssertionError(f"parse_digest accepted {value!r}")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | valid_digests(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)

manifest_keys = st.sampled_from(
    [
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "fsLayers",
        "blobSum",
        "digest",
        "size",
        "urls",
        "platform",
        "os",
        "architecture",
        "variant",
        "signatures",
        "protected",
    ]
)
manifest_like_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=2**40)
    | st.sampled_from([1, 2, 2.0, OCI_MANIFEST, OCI_INDEX, DOCKER_V2_SCHEMA2, ""])
    | st.text(max_size=8)
    | valid_digests()
    | near_digests(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(manifest_keys, children, max_size=7)
    ),
    max_leaves=40,
)


def assert_parses_or_raises_invalid_manifest(data: bytes) -> None:
    try:
        manifest = parse_manifest(data)
    except InvalidManifest:
        return
    for blob in manifest.blobs:
        parse_digest(blob.digest)
    for instance in manifest.instances:
        parse_digest(instance.digest)


@PROPERTY_SETTINGS
@given(st.one_of(json_values, manifest_like_values))
def test_parse_manifest_of_any_json_raises_only_invalid_manifest(document):
    assert_parses_or_raises_invalid_manifest(json.dumps(document).encode())


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
def test_parse_manifest_of_any_bytes_raises_only_invalid_manifest(data):
    assert_parses_or_raises_invalid_manifest(data)


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from("[{"))
def test_parse_manifest_of_deeply_nested_json_raises_invalid_manifest(depth, opener):
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        data = ('{"a":' * depth + "1" + closer * depth).encode()
    else:
        data = (opener * depth + closer * depth).encode()
    assert_parses_or_raises_invalid_manifest(data)


def descriptors(digests):
    return st.builds(
        lambda digest, size, media_type: {
            "mediaType": media_type,
            "digest": digest,
            "size": size,
        },
        digests,
        st.integers(min_value=0, max_value=2**40),
        st.sampled_from(
            [
                "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ]
        ),
    )


@st.composite
def image_manifests(draw):
    """A valid OCI or Docker schema 2 manifest whose layers may repeat digests."""
    pool = draw(st.lists(valid_digests(), min_size=1, max_size=6, unique=True))
    media_type = draw(st.sampled_from([OCI_MANIFEST, DOCKER_V2_SCHEMA2, None]))
    config = draw(descriptors(st.sampled_from(pool)))
    layers = draw(st.lists(descriptors(st.sampled_from(pool)), max_size=12))
    document = {"schemaVersion": 2, "config": config, "layers": layers}
    if media_type is not None:
        document["mediaType"] = media_type
    return document


@st.composite
def schema1_manifests(draw):
    pool = draw(st.lists(valid_digests(), min_size=1, max_size=4, unique=True))
    sums = draw(st.lists(st.sampled_from(pool), max_size=10))
    return {
        "schemaVersion": 1,
        "name": "library/test",
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": digest} for digest in sums],
        "history": [{"v1Compatibility": "{}"} for _ in sums],
    }


@st.composite
def list_manifests(draw):
    media_type = draw(st.sampled_from([OCI_INDEX, DOCKER_MANIFEST_LIST]))
    entries = draw(
        st.lists(
            st.builds(
                lambda descriptor, os_, arch: {
                    **descriptor,
                    "platform": {"os": os_, "architecture": arch},
                },
                descriptors(valid_digests()),
                st.sampled_from(["linux", "windows"]),
                st.sampled_from(["amd64", "arm64", "s390x"]),
            ),
            max_size=6,
        )
    )
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}


def expected_blob_digests(document: dict) -> list[str]:
    """Digests in first-seen order, each once."""
    if document["schemaVersion"] == 1:
        listed = [layer["blobSum"] for layer in document["fsLayers"]]
    else:
        listed = [document["config"]["digest"]]
        listed += [layer["digest"] for layer in document["layers"]]
    return list(dict.fromkeys(listed))


@PROPERTY_SETTINGS
@given(st.one_of(image_manifests(), schema1_manifests()))
def test_valid_image_manifests_parse_and_list_each_blob_once(document):
    manifest = parse_manifest(json.dumps(document, indent=1).encode())

    found = [blob.digest for blob in manifest.blobs]
    assert found == expected_blob_digests(document)
    assert not manifest.is_list
    assert manifest.instances == ()


@PROPERTY_SETTINGS
@given(list_manifests())
def test_valid_lists_parse_with_every_instance_in_order(document):
    manifest = parse_manifest(json.dumps(document).encode())

    assert manifest.is_list
    assert manifest.blobs == ()
    assert [i.digest for i in manifest.instances] == [
        entry["digest"] for entry in document["manifests"]
    ]
    assert [str(i.platform) for i in manifest.instances] == [
        f"{e['platform']['os']}/{e['platform']['architecture']}"
        for e in document["manifests"]
    ]
