"""Path helpers, layout kinds and layout versions of the dir: layout."""

import hashlib
import os

import pytest

from storage import Digest, InvalidDigest, NotAnImage, UnsafePath, parse_digest
from storage.layout import (
    LEGACY_2016,
    blob_path,
    digest_stem,
    layout_kind,
    layout_version_for,
    lock_path,
    manifest_path,
    read_layout_version,
    signature_path,
    version_path,
    version_text,
)

ROOT = "/images/app"
SHA256_HEX = hashlib.sha256(b"layer").hexdigest()
SHA512_HEX = hashlib.sha512(b"layer").hexdigest()
VERSION_PREFIX = b"Directory Transport Version: "
SHA256 = parse_digest(f"sha256:{SHA256_HEX}")
SHA512 = parse_digest(f"sha512:{SHA512_HEX}")


def test_version_text_is_the_exact_containers_image_line():
    """The version file holds the 33-byte line containers/image writes."""
    assert version_text("1.1") == b"Directory Transport Version: 1.1\n"
    assert len(version_text("1.1")) == 33
    assert version_text("1.2") == b"Directory Transport Version: 1.2\n"


def test_fixed_file_paths():
    """version, manifest.json and the lock file sit directly in the folder."""
    assert version_path(ROOT) == f"{ROOT}/version"
    assert manifest_path(ROOT) == f"{ROOT}/manifest.json"
    assert lock_path(ROOT) == f"{ROOT}/.dirimage.lock"


def test_digest_stem_is_bare_hex_for_sha256_and_prefixed_otherwise():
    """sha256 files use the bare hex; layout 1.2 names others algorithm-hex."""
    assert digest_stem(SHA256) == SHA256_HEX
    assert digest_stem(SHA512) == f"sha512-{SHA512_HEX}"


def test_blob_path_for_each_algorithm():
    """Blobs are named by their stem in layouts 1.1 and 1.2."""
    assert blob_path(ROOT, SHA256) == f"{ROOT}/{SHA256_HEX}"
    assert blob_path(ROOT, SHA256, "1.1") == f"{ROOT}/{SHA256_HEX}"
    assert blob_path(ROOT, SHA512, "1.2") == f"{ROOT}/sha512-{SHA512_HEX}"


@pytest.mark.parametrize("version", ["1.0", LEGACY_2016])
def test_blob_path_is_tar_in_legacy_layouts(version):
    """Layouts before 1.1 named every blob <hex>.tar."""
    assert blob_path(ROOT, SHA256, version) == f"{ROOT}/{SHA256_HEX}.tar"


def test_instance_manifest_path_for_each_algorithm():
    """Instance manifests are <stem>.manifest.json."""
    assert manifest_path(ROOT, SHA256) == f"{ROOT}/{SHA256_HEX}.manifest.json"
    assert manifest_path(ROOT, SHA512) == f"{ROOT}/sha512-{SHA512_HEX}.manifest.json"


def test_signature_path_numbers_from_one():
    """Signatures are signature-1, signature-2, ... for the top-level image."""
    assert signature_path(ROOT, 1) == f"{ROOT}/signature-1"
    assert signature_path(ROOT, 2) == f"{ROOT}/signature-2"
    assert signature_path(ROOT, 10) == f"{ROOT}/signature-10"


def test_instance_signature_path_for_each_algorithm():
    """Instance signatures are <stem>.signature-N."""
    assert signature_path(ROOT, 1, SHA256) == f"{ROOT}/{SHA256_HEX}.signature-1"
    assert signature_path(ROOT, 3, SHA512) == f"{ROOT}/sha512-{SHA512_HEX}.signature-3"


@pytest.mark.parametrize("number", [0, -1])
def test_signature_path_refuses_numbers_below_one(number):
    """Signature 0 (or below) does not exist in the layout."""
    with pytest.raises(ValueError, match=str(number)):
        signature_path(ROOT, number)


@pytest.mark.parametrize(
    "parts",
    [("sha256", "../x"), ("sha256", "../../etc/passwd"), ("sha512", "a/" + "b" * 126)],
)
def test_path_helpers_refuse_a_digest_built_around_its_constructor(parts):
    """However a Digest was made, the helpers check it before it becomes a path."""
    digest = Digest._make(parts)
    helpers = [
        lambda: blob_path(ROOT, digest),
        lambda: blob_path(ROOT, digest, "1.0"),
        lambda: manifest_path(ROOT, digest),
        lambda: signature_path(ROOT, 1, digest),
        lambda: digest_stem(digest),
    ]
    for helper in helpers:
        with pytest.raises(InvalidDigest):
            helper()


def test_layout_version_for_picks_1_2_only_for_other_algorithms():
    """1.1 while every digest is sha256; 1.2 once any is not."""
    assert layout_version_for([str(SHA256)]) == "1.1"
    assert layout_version_for([]) == "1.1"
    assert layout_version_for([str(SHA256), str(SHA512)]) == "1.2"


@pytest.mark.parametrize(
    "name, kind",
    [
        ("version", "version"),
        ("manifest.json", "manifest"),
        (".dirimage.lock", "lock"),
        (f"{SHA256_HEX}.manifest.json", "instance-manifest"),
        (f"sha512-{SHA512_HEX}.manifest.json", "instance-manifest"),
        (SHA256_HEX, "blob"),
        (f"sha512-{SHA512_HEX}", "blob"),
        (f"{SHA256_HEX}.tar", "legacy-blob"),
        ("signature-1", "signature"),
        ("signature-12", "signature"),
        (f"{SHA256_HEX}.signature-1", "instance-signature"),
        (f"sha512-{SHA512_HEX}.signature-2", "instance-signature"),
        (".dirimage-tmp-abc123", "temporary"),
        ("dir-put-blob123456", "temporary"),
    ],
)
def test_layout_kind_of_every_layout_file(name, kind):
    """Each file name the layout uses is recognised as its kind."""
    assert layout_kind(name) == kind


@pytest.mark.parametrize(
    "name",
    [
        "foo",
        "manifest.json.bak",
        "manifest.json~",
        "version.old",
        "../x",
        "../manifest.json",
        "sub/manifest.json",
        "",
        "signature-0",
        "signature-01",
        "signature-",
        "signature-1.bak",
        SHA256_HEX[:-1],
        SHA256_HEX + "0",
        SHA256_HEX.upper(),
        f"{SHA256_HEX}.tar.gz",
        f"{SHA256_HEX}.manifest.json.bak",
        f"sha256-{SHA256_HEX}",
        "sha512-abc",
        f"sha512-{SHA512_HEX[:-1]}",
        SHA512_HEX,
        f"md5-{SHA256_HEX[:32]}",
        "README.md",
        ".dirimage-tmp",
    ],
)
def test_layout_kind_of_foreign_names_is_none(name):
    """Names the layout never writes have no kind, so nothing removes them."""
    assert layout_kind(name) is None


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_read_layout_version_of_each_version_file(tmp_path, version):
    """A version file of each known version is read back as that version."""
    (tmp_path / "version").write_bytes(version_text(version))
    assert read_layout_version(str(tmp_path)) == version


def test_read_layout_version_without_version_file_is_2016(tmp_path):
    """A manifest and no version file is the unversioned layout of 2016."""
    (tmp_path / "manifest.json").write_text("{}")
    assert read_layout_version(str(tmp_path)) == LEGACY_2016


@pytest.mark.parametrize(
    "content",
    [
        b"Directory Transport Version: 1.3\n",
        b"Directory Transport Version: 1.1",
        b"Directory Transport Version: 1.1\n\n",
        b"directory transport version: 1.1\n",
        b"garbage",
        b"",
        b"\0" * 300,
        VERSION_PREFIX + b"1.1\n" + b" " * 100_000,
    ],
    ids=lambda content: repr(content[:40]),
)
def test_read_layout_version_refuses_garbage(tmp_path, content):
    """A version file with anything but a known line is not an image."""
    (tmp_path / "version").write_bytes(content)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(NotAnImage, match="version"):
        read_layout_version(str(tmp_path))


def test_read_layout_version_names_a_wrong_version_but_echoes_no_other_bytes(
    tmp_path,
):
    """A version line of an unknown version is quoted; other content is not."""
    (tmp_path / "version").write_bytes(b"Directory Transport Version: 9.9\n")
    with pytest.raises(NotAnImage, match="9.9"):
        read_layout_version(str(tmp_path))

    (tmp_path / "version").write_bytes(b"password=hunter2\n")
    with pytest.raises(NotAnImage) as caught:
        read_layout_version(str(tmp_path))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "content", [b"password=hunter2\n", version_text("1.1")], ids=["secret", "valid"]
)
def test_read_layout_version_refuses_a_link_outside_and_echoes_nothing(
    tmp_path, content
):
    """A version file that links outside the folder is refused, whatever the file
    it points to holds, and none of that file's bytes reach the message."""
    outside = tmp_path / "outside"
    outside.write_bytes(content)
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.json").write_text("{}")
    (image / "version").symlink_to(outside)

    with pytest.raises(UnsafePath, match="outside the image") as caught:
        read_layout_version(str(image))

    assert "hunter2" not in str(caught.value)
    assert "Transport" not in str(caught.value)


def test_read_layout_version_follows_a_link_inside_the_folder(tmp_path):
    """A version file may be a link to another file of the same folder."""
    (tmp_path / "version-file").write_bytes(version_text("1.1"))
    (tmp_path / "version").symlink_to("version-file")
    assert read_layout_version(str(tmp_path)) == "1.1"


def test_read_layout_version_refuses_a_fifo_without_blocking(tmp_path):
    """A FIFO in place of the version file is refused, never read."""
    os.mkfifo(tmp_path / "version")
    with pytest.raises(UnsafePath, match="not a regular file"):
        read_layout_version(str(tmp_path))


def test_read_layout_version_of_an_empty_folder_is_not_an_image(tmp_path):
    """An empty folder has neither version nor manifest."""
    with pytest.raises(NotAnImage, match="neither"):
        read_layout_version(str(tmp_path))


def test_read_layout_version_of_a_file_is_not_an_image(tmp_path):
    """A plain file is not an image folder."""
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotAnImage, match="not a folder"):
        read_layout_version(str(path))


def test_read_layout_version_of_a_version_folder_is_not_an_image(tmp_path):
    """A folder named version is not a version file."""
    os.mkdir(tmp_path / "version")
    with pytest.raises(NotAnImage, match="version"):
        read_layout_version(str(tmp_path))
