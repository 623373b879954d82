"""Reading images with DirImageSource: every kind and layout, size caps, and
files that are missing, too large, or not what they claim to be."""

import hashlib
import os
from pathlib import Path

import pytest

import imagekit
from storage import (
    BlobNotFound,
    DirImageSource,
    InvalidDigest,
    NotAnImage,
    TooLarge,
    UnsafePath,
    parse_manifest,
)
from storage.layout import version_text
from storage.source import MANIFEST_SIZE_LIMIT, SIGNATURE_SIZE_LIMIT

LAYOUT_VERSIONS = {
    "oci": "1.1",
    "v2s2": "1.1",
    "v2s1": "1.1",
    "index": "1.1",
    "list": "1.1",
    "signed": "1.1",
    "legacy-1.0": "1.0",
    "legacy-2016": "2016",
}


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def all_blobs(source: DirImageSource) -> list[str]:
    """Digests of every blob of the image, through instance manifests too."""
    manifest = parse_manifest(source.get_manifest())
    digests = [blob.digest for blob in manifest.blobs]
    for instance in manifest.instances:
        instance_manifest = parse_manifest(source.get_manifest(instance.digest))
        digests += [blob.digest for blob in instance_manifest.blobs]
    return digests


def make_image(root: Path, blobs: dict[str, bytes], version: str = "1.1") -> Path:
    """A minimal hand-made image folder: a version file, a manifest, raw blobs."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "version").write_bytes(version_text(version))
    (root / "manifest.json").write_bytes(b'{"schemaVersion": 2}')
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    return root


def read_blob(source: DirImageSource, digest: str) -> bytes:
    file, size = source.get_blob(digest)
    with file:
        data = file.read()
    assert len(data) == size
    return data


class TestEveryKind:
    """Reading the real images imagekit builds."""

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_layout_version(self, dir_images, kind):
        """Each kind reports the layout version it was written with."""
        assert DirImageSource(dir_images[kind]).layout_version == LAYOUT_VERSIONS[kind]

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_get_manifest_returns_the_file_bytes(self, dir_images, kind):
        """The top-level manifest comes back byte for byte."""
        path = dir_images[kind]
        expected = (path / "manifest.json").read_bytes()
        assert DirImageSource(path).get_manifest() == expected

    @pytest.mark.parametrize("kind", imagekit.MULTI_INSTANCE_KINDS)
    def test_get_manifest_of_each_instance(self, dir_images, kind):
        """Instance manifests come back by digest, hashing to that digest."""
        source = DirImageSource(dir_images[kind])
        manifest = parse_manifest(source.get_manifest())
        assert len(manifest.instances) == 2
        for instance in manifest.instances:
            assert sha256(source.get_manifest(instance.digest)) == instance.digest

    @pytest.mark.parametrize("kind", imagekit.KINDS)
    def test_get_blob_of_every_blob_hashes_to_its_digest(self, dir_images, kind):
        """Every blob the manifests name opens, with its size, and hashes right."""
        source = DirImageSource(dir_images[kind])
        digests = all_blobs(source)
        assert len(digests) >= 2
        for digest in digests:
            assert sha256(read_blob(source, digest)) == digest

    @pytest.mark.parametrize("kind", imagekit.LEGACY_KINDS)
    def test_legacy_blobs_are_read_from_tar_names(self, dir_images, kind):
        """Legacy layouts resolve blobs to their <hex>.tar files."""
        source = DirImageSource(dir_images[kind])
        for digest in all_blobs(source):
            assert source.blob_path(digest).endswith(f"{digest[7:]}.tar")

    def test_get_signatures_of_the_signed_image(self, dir_images):
        """Both signatures of the signed image come back in order."""
        path = dir_images["signed"]
        expected = [(path / f"signature-{n}").read_bytes() for n in (1, 2)]
        assert DirImageSource(path).get_signatures() == expected

    @pytest.mark.parametrize("kind", [k for k in imagekit.KINDS if k != "signed"])
    def test_get_signatures_of_unsigned_images_is_empty(self, dir_images, kind):
        """An image without signature files has no signatures."""
        assert DirImageSource(dir_images[kind]).get_signatures() == []


class TestHandMadeLayouts:
    """Layouts imagekit does not build: 1.2 and the mixed naming of 2016."""

    def test_layout_1_2_reads_sha512_blobs(self, tmp_path):
        """Layout 1.2 names a sha512 blob sha512-<hex>."""
        data = b"sha512 blob"
        hex_part = hashlib.sha512(data).hexdigest()
        root = make_image(tmp_path / "image", {f"sha512-{hex_part}": data}, "1.2")
        source = DirImageSource(root)
        assert source.layout_version == "1.2"
        assert read_blob(source, f"sha512:{hex_part}") == data

    def test_layout_2016_reads_bare_config_and_tar_layers(self, tmp_path):
        """2016 images kept the config under its bare hex, layers as .tar."""
        config, layer = b"config", b"layer"
        root = tmp_path / "image"
        make_image(
            root,
            {sha256(config)[7:]: config, f"{sha256(layer)[7:]}.tar": layer},
        )
        os.unlink(root / "version")
        source = DirImageSource(root)
        assert source.layout_version == "2016"
        assert read_blob(source, sha256(config)) == config
        assert read_blob(source, sha256(layer)) == layer

    def test_layout_1_1_does_not_read_tar_names(self, tmp_path):
        """Only legacy layouts fall back to .tar names."""
        layer = b"layer"
        root = make_image(tmp_path / "image", {f"{sha256(layer)[7:]}.tar": layer})
        with pytest.raises(BlobNotFound):
            DirImageSource(root).get_blob(sha256(layer))

    def test_instance_signatures(self, tmp_path):
        """Instance signatures are <hex>.signature-N, read up to the first gap."""
        instance = sha256(b"instance")
        root = make_image(tmp_path / "image", {})
        for number in (1, 2):
            (root / f"{instance[7:]}.signature-{number}").write_bytes(b"s%d" % number)
        (root / "signature-1").write_bytes(b"top")
        source = DirImageSource(root)
        assert source.get_signatures(instance) == [b"s1", b"s2"]
        assert source.get_signatures() == [b"top"]


class TestLimits:
    """Manifests and signatures are read with a 4 MiB cap."""

    def test_caps_are_four_mebibytes(self):
        """Both caps are 4 MiB."""
        assert MANIFEST_SIZE_LIMIT == SIGNATURE_SIZE_LIMIT == 4 * 1024 * 1024

    def test_manifest_at_the_cap_is_read(self, tmp_path):
        """A manifest of exactly 4 MiB is still read."""
        root = make_image(tmp_path / "image", {})
        (root / "manifest.json").write_bytes(b" " * MANIFEST_SIZE_LIMIT)
        assert len(DirImageSource(root).get_manifest()) == MANIFEST_SIZE_LIMIT

    def test_manifest_over_the_cap_is_too_large(self, tmp_path):
        """One byte more than 4 MiB is refused, naming the file."""
        root = make_image(tmp_path / "image", {})
        (root / "manifest.json").write_bytes(b" " * (MANIFEST_SIZE_LIMIT + 1))
        with pytest.raises(TooLarge, match=str(root / "manifest.json")):
            DirImageSource(root).get_manifest()

    def test_instance_manifest_over_the_cap_is_too_large(self, tmp_path):
        """The cap applies to instance manifests too."""
        instance = sha256(b"instance")
        root = make_image(tmp_path / "image", {})
        big = root / f"{instance[7:]}.manifest.json"
        big.write_bytes(b" " * (MANIFEST_SIZE_LIMIT + 1))
        with pytest.raises(TooLarge, match=str(big)):
            DirImageSource(root).get_manifest(instance)

    def test_signature_over_the_cap_is_too_large(self, tmp_path):
        """A signature over 4 MiB is refused, naming the file."""
        root = make_image(tmp_path / "image", {})
        (root / "signature-1").write_bytes(b"ok")
        (root / "signature-2").write_bytes(b"x" * (SIGNATURE_SIZE_LIMIT + 1))
        with pytest.raises(TooLarge, match=str(root / "signature-2")):
            DirImageSource(root).get_signatures()


class TestUnsafeAndMissing:
    """Files that are missing, outside the image, or not regular files."""

    def test_missing_blob_names_digest_and_path(self, tmp_path):
        """A missing blob raises BlobNotFound with its digest and path."""
        root = make_image(tmp_path / "image", {})
        digest = sha256(b"absent")
        with pytest.raises(BlobNotFound) as caught:
            DirImageSource(root).get_blob(digest)
        assert digest in str(caught.value)
        assert str(root / digest[7:]) in str(caught.value)
        assert isinstance(caught.value, FileNotFoundError)

    def test_missing_instance_manifest_is_blob_not_found(self, tmp_path):
        """A missing instance manifest raises BlobNotFound naming the instance."""
        root = make_image(tmp_path / "image", {})
        digest = sha256(b"absent")
        with pytest.raises(BlobNotFound, match=digest):
            DirImageSource(root).get_manifest(digest)

    def test_dangling_symlink_blob_is_not_found(self, tmp_path):
        """A blob that is a broken symlink counts as missing."""
        root = make_image(tmp_path / "image", {})
        digest = sha256(b"gone")
        os.symlink(root / "nowhere", root / digest[7:])
        with pytest.raises(BlobNotFound, match=digest):
            DirImageSource(root).get_blob(digest)

    def test_blob_symlink_inside_the_image_is_followed(self, tmp_path):
        """A symlink that stays inside the image is read through."""
        data = b"shared"
        root = make_image(tmp_path / "image", {"kept": data})
        os.symlink("kept", root / sha256(data)[7:])
        assert read_blob(DirImageSource(root), sha256(data)) == data

    def test_blob_symlink_outside_the_image_is_unsafe(self, tmp_path):
        """A blob that links to a file outside the image is refused."""
        secret = tmp_path / "secret"
        secret.write_bytes(b"secret")
        root = make_image(tmp_path / "image", {})
        os.symlink(secret, root / sha256(b"secret")[7:])
        with pytest.raises(UnsafePath, match=str(secret)):
            DirImageSource(root).get_blob(sha256(b"secret"))

    def test_manifest_symlink_outside_the_image_is_unsafe(self, tmp_path):
        """A manifest.json that links outside the image is refused."""
        outside = tmp_path / "elsewhere.json"
        outside.write_bytes(b"{}")
        root = make_image(tmp_path / "image", {})
        os.unlink(root / "manifest.json")
        os.symlink(outside, root / "manifest.json")
        with pytest.raises(UnsafePath):
            DirImageSource(root).get_manifest()

    def test_signature_symlink_through_parent_is_unsafe(self, tmp_path):
        """A relative link climbing out of the image is refused."""
        (tmp_path / "sig").write_bytes(b"signature")
        root = make_image(tmp_path / "image", {})
        os.symlink("../sig", root / "signature-1")
        with pytest.raises(UnsafePath):
            DirImageSource(root).get_signatures()

    @pytest.mark.timeout(20)
    def test_fifo_blob_is_refused_without_hanging(self, tmp_path):
        """A FIFO in place of a blob is refused at once, never opened."""
        root = make_image(tmp_path / "image", {})
        digest = sha256(b"fifo")
        os.mkfifo(root / digest[7:])
        with pytest.raises(UnsafePath, match="not a regular file"):
            DirImageSource(root).get_blob(digest)

    @pytest.mark.timeout(20)
    def test_fifo_manifest_and_signature_are_refused(self, tmp_path):
        """FIFOs in place of the manifest or a signature are refused too."""
        root = make_image(tmp_path / "image", {})
        os.mkfifo(root / "signature-1")
        with pytest.raises(UnsafePath):
            DirImageSource(root).get_signatures()
        os.unlink(root / "manifest.json")
        os.mkfifo(root / "manifest.json")
        with pytest.raises(UnsafePath):
            DirImageSource(root).get_manifest()

    def test_folder_in_place_of_a_blob_is_refused(self, tmp_path):
        """A directory named like a blob is not a regular file."""
        root = make_image(tmp_path / "image", {})
        digest = sha256(b"folder")
        os.mkdir(root / digest[7:])
        with pytest.raises(UnsafePath):
            DirImageSource(root).get_blob(digest)

    @pytest.mark.parametrize("digest", ["sha256:../version", "../manifest.json", ""])
    def test_hostile_digests_are_refused(self, tmp_path, digest):
        """Blob and instance lookups validate the digest before any path."""
        source = DirImageSource(make_image(tmp_path / "image", {}))
        with pytest.raises(InvalidDigest):
            source.get_blob(digest)
        with pytest.raises(InvalidDigest):
            source.get_manifest(digest)
        with pytest.raises(InvalidDigest):
            source.get_signatures(digest)


class TestSignatureNumbering:
    """Signatures are read from 1 up to the first missing number."""

    def test_stops_at_the_first_gap(self, tmp_path):
        """signature-4 after a missing signature-3 is not read."""
        root = make_image(tmp_path / "image", {})
        for number in (1, 2, 4):
            (root / f"signature-{number}").write_bytes(b"%d" % number)
        assert DirImageSource(root).get_signatures() == [b"1", b"2"]

    def test_without_signature_1_there_are_none(self, tmp_path):
        """signature-2 alone is not read."""
        root = make_image(tmp_path / "image", {})
        (root / "signature-2").write_bytes(b"2")
        assert DirImageSource(root).get_signatures() == []

    def test_empty_signature_file_is_kept(self, tmp_path):
        """An empty signature file is a signature of zero bytes."""
        root = make_image(tmp_path / "image", {})
        (root / "signature-1").write_bytes(b"")
        assert DirImageSource(root).get_signatures() == [b""]


class TestNotAnImage:
    """Paths that do not hold an image."""

    def test_missing_path(self, tmp_path):
        """A path that does not exist is NotAnImage naming it."""
        with pytest.raises(NotAnImage, match="does not exist"):
            DirImageSource(tmp_path / "absent")

    def test_file(self, tmp_path):
        """A plain file is NotAnImage."""
        (tmp_path / "file").write_text("x")
        with pytest.raises(NotAnImage, match="not a folder"):
            DirImageSource(tmp_path / "file")

    def test_empty_folder(self, tmp_path):
        """An empty folder is NotAnImage."""
        with pytest.raises(NotAnImage):
            DirImageSource(tmp_path)

    def test_folder_of_other_files(self, tmp_path):
        """A folder of unrelated files is NotAnImage."""
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(NotAnImage):
            DirImageSource(tmp_path)
