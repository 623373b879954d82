"""Writing images with DirImageDestination: verified blobs that leave nothing behind
on failure, atomic manifests and signatures, and folders that are not ours."""

import hashlib
import io
import json
import os
import threading
from pathlib import Path

import pytest

import storage.destination
from storage import (
    BlobNotFound,
    Digest,
    DigestMismatch,
    DirImageDestination,
    DirImageSource,
    FolderNotEmpty,
    InvalidDigest,
    NotAnImage,
    SizeMismatch,
    UnsafePath,
    check_image,
    plan_image,
)
from storage.files import CHUNK_SIZE
from storage.layout import TEMP_PREFIX, version_text
from storage.manifest import OCI_INDEX, OCI_MANIFEST

VERSION_1_1 = b"Directory Transport Version: 1.1\n"


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def sha512(data: bytes) -> str:
    return f"sha512:{hashlib.sha512(data).hexdigest()}"


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry of `folder` with its content (files) or a marker (others)."""
    result: dict[str, bytes | str] = {}
    for entry in os.scandir(folder):
        if entry.is_symlink():
            result[entry.name] = f"link -> {os.readlink(entry.path)}"
        elif entry.is_file():
            result[entry.name] = Path(entry.path).read_bytes()
        else:
            result[entry.name] = "folder"
    return result


class FailingStream(io.RawIOBase):
    """A stream that yields `good` bytes and then raises, as a dropped NFS read."""

    def __init__(self, good: bytes):
        self.remaining = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.remaining.readinto(buffer)
        if count == 0:
            raise OSError(5, "Input/output error")
        return count


class ReadOnlyStream:
    """A stream with only read(), as some HTTP bodies are."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.inner.read(size)


BLOB = os.urandom(3 * CHUNK_SIZE + 17)


class TestOpening:
    """Opening a destination folder."""

    def test_new_folder_gets_version_1_1(self, tmp_path):
        """A folder that does not exist is created with version 1.1 only."""
        root = tmp_path / "new" / "image"
        destination = DirImageDestination(str(root))
        assert destination.layout_version == "1.1"
        assert listing(root) == ["version"]
        assert (root / "version").read_bytes() == VERSION_1_1

    def test_empty_folder_gets_version_1_1(self, tmp_path):
        """An existing empty folder is taken and marked 1.1."""
        DirImageDestination(str(tmp_path))
        assert (tmp_path / "version").read_bytes() == VERSION_1_1

    def test_non_empty_folder_without_image_is_refused_untouched(self, tmp_path):
        """A folder of other files raises FolderNotEmpty and is left as it was."""
        (tmp_path / "notes.txt").write_text("mine")
        (tmp_path / "manifest.json.bak").write_text("{}")
        (tmp_path / sha256(b"x")[7:]).write_bytes(b"looks like a blob")
        (tmp_path / "sub").mkdir()
        before = snapshot(tmp_path)
        with pytest.raises(FolderNotEmpty) as caught:
            DirImageDestination(str(tmp_path))
        assert str(tmp_path) in str(caught.value)
        assert snapshot(tmp_path) == before

    def test_folder_with_garbage_version_is_refused_untouched(self, tmp_path):
        """A version file this package does not know is not an image of ours."""
        (tmp_path / "version").write_text("Something else\n")
        before = snapshot(tmp_path)
        with pytest.raises(FolderNotEmpty):
            DirImageDestination(str(tmp_path))
        assert snapshot(tmp_path) == before

    def test_path_that_is_a_file_is_not_an_image(self, tmp_path):
        """A destination path naming a file raises NotAnImage; the file stays."""
        path = tmp_path / "file"
        path.write_bytes(b"content")
        with pytest.raises(NotAnImage, match="not a folder"):
            DirImageDestination(str(path))
        assert path.read_bytes() == b"content"

    @pytest.mark.parametrize("kind", ["signed", "index", "legacy-1.0", "legacy-2016"])
    def test_opening_an_image_deletes_nothing(self, fresh_image, kind):
        """Opening a folder that holds an image changes no file in it."""
        root = fresh_image(kind)
        (root / "notes.txt").write_text("foreign")
        before = snapshot(root)
        destination = DirImageDestination(str(root))
        assert snapshot(root) == before
        expected = {"legacy-1.0": "1.0", "legacy-2016": "2016"}.get(kind, "1.1")
        assert destination.layout_version == expected


class TestPutBlob:
    """Streaming blobs in, verified."""

    def test_round_trip(self, tmp_path):
        """A blob streams in, is named by its digest and reads back the same."""
        destination = DirImageDestination(str(tmp_path))
        written = destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))
        assert written == len(BLOB)
        assert (tmp_path / sha256(BLOB)[7:]).read_bytes() == BLOB
        assert listing(tmp_path) == sorted([sha256(BLOB)[7:], "version"])
        assert destination.has_blob(sha256(BLOB), len(BLOB))
        file, size = DirImageSource(str(tmp_path)).get_blob(sha256(BLOB))
        with file:
            assert size == len(BLOB)
            assert file.read() == BLOB

    def test_without_size_and_from_a_read_only_stream(self, tmp_path):
        """size may be unknown, and a stream without readinto works."""
        destination = DirImageDestination(str(tmp_path))
        assert destination.put_blob(sha256(BLOB), ReadOnlyStream(BLOB)) == len(BLOB)
        assert (tmp_path / sha256(BLOB)[7:]).read_bytes() == BLOB

    def test_empty_blob(self, tmp_path):
        """A zero-byte blob is stored."""
        destination = DirImageDestination(str(tmp_path))
        assert destination.put_blob(sha256(b""), io.BytesIO(b""), 0) == 0
        assert (tmp_path / sha256(b"")[7:]).read_bytes() == b""

    def test_blob_file_is_readable_by_others(self, tmp_path):
        """Blobs get mode 0644 like containers/image writes, not mkstemp's 0600."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha256(b"x"), io.BytesIO(b"x"), 1)
        assert (tmp_path / sha256(b"x")[7:]).stat().st_mode & 0o777 == 0o644

    def test_wrong_digest_leaves_nothing(self, tmp_path):
        """Bytes that hash elsewhere raise DigestMismatch and leave no file."""
        destination = DirImageDestination(str(tmp_path))
        wrong = sha256(b"other")
        with pytest.raises(DigestMismatch, match=wrong):
            destination.put_blob(wrong, io.BytesIO(BLOB), len(BLOB))
        assert listing(tmp_path) == ["version"]

    @pytest.mark.parametrize("offset", [-1, 1, -CHUNK_SIZE, CHUNK_SIZE])
    def test_wrong_size_leaves_nothing(self, tmp_path, offset):
        """Short and long streams raise SizeMismatch naming the digest; no file."""
        destination = DirImageDestination(str(tmp_path))
        with pytest.raises(SizeMismatch, match=sha256(BLOB)):
            destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB) + offset)
        assert listing(tmp_path) == ["version"]

    def test_stream_failing_midway_leaves_nothing(self, tmp_path):
        """An I/O error after two chunks propagates and leaves no file."""
        destination = DirImageDestination(str(tmp_path))
        stream = FailingStream(BLOB[: 2 * CHUNK_SIZE])
        with pytest.raises(OSError, match="Input/output error"):
            destination.put_blob(sha256(BLOB), stream, len(BLOB))
        assert listing(tmp_path) == ["version"]

    def test_failure_keeps_an_existing_good_blob(self, tmp_path):
        """A failed write over a present blob leaves the present blob intact."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))
        with pytest.raises(SizeMismatch):
            destination.put_blob(sha256(BLOB), io.BytesIO(BLOB[:-1]), len(BLOB))
        assert (tmp_path / sha256(BLOB)[7:]).read_bytes() == BLOB
        assert listing(tmp_path) == sorted([sha256(BLOB)[7:], "version"])

    def test_replaces_a_corrupt_blob(self, tmp_path):
        """A corrupt blob file counts as absent and is replaced by put_blob."""
        destination = DirImageDestination(str(tmp_path))
        path = tmp_path / sha256(BLOB)[7:]
        path.write_bytes(b"corrupt")
        assert not destination.has_blob(sha256(BLOB))
        assert not destination.has_blob(sha256(BLOB), len(BLOB))
        destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))
        assert path.read_bytes() == BLOB

    def test_replaces_a_symlink_without_writing_through_it(self, tmp_path):
        """A blob name linking outside is replaced; the link's target is untouched."""
        outside = tmp_path / "outside"
        outside.write_bytes(b"precious")
        root = tmp_path / "image"
        destination = DirImageDestination(str(root))
        os.symlink(outside, root / sha256(BLOB)[7:])
        assert not destination.has_blob(sha256(BLOB))
        destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))
        assert not (root / sha256(BLOB)[7:]).is_symlink()
        assert outside.read_bytes() == b"precious"

    def test_sha512_blob_is_named_with_its_algorithm(self, tmp_path):
        """A sha512 blob is stored as sha512-<hex>."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha512(BLOB), io.BytesIO(BLOB), len(BLOB))
        assert (tmp_path / f"sha512-{sha512(BLOB)[7:]}").read_bytes() == BLOB

    def test_eight_threads_writing_the_same_blob(self, tmp_path):
        """Eight concurrent writes of one digest all succeed; one intact file."""
        destination = DirImageDestination(str(tmp_path))
        results, errors = run_in_threads(
            [lambda: destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))]
            * 8
        )
        assert errors == []
        assert results == [len(BLOB)] * 8
        assert listing(tmp_path) == sorted([sha256(BLOB)[7:], "version"])
        assert (tmp_path / sha256(BLOB)[7:]).read_bytes() == BLOB

    def test_eight_threads_writing_different_blobs(self, tmp_path):
        """Eight concurrent writes of different digests give eight intact files."""
        destination = DirImageDestination(str(tmp_path))
        blobs = [BLOB + bytes([n]) for n in range(8)]

        def writer(data):
            return lambda: destination.put_blob(
                sha256(data), io.BytesIO(data), len(data)
            )

        results, errors = run_in_threads([writer(data) for data in blobs])
        assert errors == []
        assert results == [len(BLOB) + 1] * 8
        assert listing(tmp_path) == sorted([sha256(d)[7:] for d in blobs] + ["version"])
        for data in blobs:
            assert (tmp_path / sha256(data)[7:]).read_bytes() == data

    def test_threads_with_some_failing_leave_only_good_blobs(self, tmp_path):
        """Failing writers beside succeeding ones leave no temporary file."""
        destination = DirImageDestination(str(tmp_path))

        def good():
            return destination.put_blob(sha256(BLOB), io.BytesIO(BLOB), len(BLOB))

        def bad():
            return destination.put_blob(sha256(BLOB), io.BytesIO(BLOB[:-1]), None)

        results, errors = run_in_threads([good, bad] * 4)
        assert len(errors) == 4
        assert all(isinstance(error, DigestMismatch) for error in errors)
        assert listing(tmp_path) == sorted([sha256(BLOB)[7:], "version"])
        assert (tmp_path / sha256(BLOB)[7:]).read_bytes() == BLOB


def run_in_threads(calls):
    """Run each call in its own thread, released together; results and errors."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)
    errors: list = []
    lock = threading.Lock()

    def run(position, call):
        barrier.wait()
        try:
            results[position] = call()
        except Exception as error:
            with lock:
                errors.append(error)

    threads = [
        threading.Thread(target=run, args=(n, call)) for n, call in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return [r for r in results if r is not None], errors


class TestManifestsAndSignatures:
    """Manifests, signatures and the version file."""

    def test_put_manifest_top_level_and_instance(self, tmp_path):
        """The top-level manifest and instance manifests land at their names."""
        destination = DirImageDestination(str(tmp_path))
        instance = sha256(b"instance")
        destination.put_manifest(b"instance", instance)
        destination.put_manifest(b"top")
        assert (tmp_path / "manifest.json").read_bytes() == b"top"
        assert (tmp_path / f"{instance[7:]}.manifest.json").read_bytes() == b"instance"
        assert listing(tmp_path) == sorted(
            ["manifest.json", f"{instance[7:]}.manifest.json", "version"]
        )

    def test_put_manifest_replaces_the_old_one(self, tmp_path):
        """A second put_manifest replaces the first and leaves no temp file."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_manifest(b"old")
        destination.put_manifest(b"new")
        assert (tmp_path / "manifest.json").read_bytes() == b"new"
        assert listing(tmp_path) == ["manifest.json", "version"]

    def test_failed_put_manifest_keeps_the_old_one(self, tmp_path):
        """A write that fails midway leaves the previous manifest whole."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_manifest(b"old")
        with pytest.raises(TypeError):
            destination.put_manifest("text, not bytes")
        assert (tmp_path / "manifest.json").read_bytes() == b"old"
        assert listing(tmp_path) == ["manifest.json", "version"]

    def test_put_signatures_writes_numbered_files(self, tmp_path):
        """Signatures become signature-1..N, byte for byte."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_signatures([b"one", b"two", b"three"])
        assert [(tmp_path / f"signature-{n}").read_bytes() for n in (1, 2, 3)] == [
            b"one",
            b"two",
            b"three",
        ]

    def test_put_signatures_removes_those_beyond_the_new_count(self, tmp_path):
        """Fewer signatures than before remove the higher-numbered files."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_signatures([b"1", b"2", b"3", b"4"])
        destination.put_signatures([b"new"])
        assert listing(tmp_path) == ["signature-1", "version"]
        assert (tmp_path / "signature-1").read_bytes() == b"new"
        destination.put_signatures([])
        assert listing(tmp_path) == ["version"]

    def test_put_signatures_of_an_instance_leaves_others_alone(self, tmp_path):
        """Instance signatures are separate from top-level and other instances."""
        destination = DirImageDestination(str(tmp_path))
        first, second = sha256(b"first"), sha256(b"second")
        destination.put_signatures([b"top"])
        destination.put_signatures([b"a", b"b"], first)
        destination.put_signatures([b"c"], second)
        destination.put_signatures([b"A"], first)
        assert listing(tmp_path) == sorted(
            [
                "signature-1",
                f"{first[7:]}.signature-1",
                f"{second[7:]}.signature-1",
                "version",
            ]
        )
        assert DirImageSource(str(tmp_path)).get_signatures(first) == [b"A"]

    def test_staged_signatures_change_nothing_until_installed(self, tmp_path):
        """Staging writes temporary files beside the old signatures; installing
        renames them into place and removes the numbered ones beyond."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_signatures([b"old 1", b"old 2", b"old 3"])
        before = snapshot(tmp_path)

        staged = destination.stage_signatures([b"new 1", b"new 2"])

        assert all(name.startswith(TEMP_PREFIX) for name in staged)
        assert [(tmp_path / name).read_bytes() for name in staged] == [
            b"new 1",
            b"new 2",
        ]
        assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before

        destination.install_signatures(staged)

        assert listing(tmp_path) == ["signature-1", "signature-2", "version"]
        assert DirImageSource(str(tmp_path)).get_signatures() == [b"new 1", b"new 2"]

    def test_staged_instance_signatures_are_installed_for_their_instance(
        self, tmp_path
    ):
        destination = DirImageDestination(str(tmp_path))
        instance = sha256(b"instance")
        destination.put_signatures([b"top"])

        destination.install_signatures(
            destination.stage_signatures([b"a", b"b"], instance), instance
        )

        source = DirImageSource(str(tmp_path))
        assert source.get_signatures() == [b"top"]
        assert source.get_signatures(instance) == [b"a", b"b"]

    def test_a_failed_staging_leaves_no_temporary_file(self, tmp_path):
        destination = DirImageDestination(str(tmp_path))
        destination.put_signatures([b"old"])
        with pytest.raises(TypeError):
            destination.stage_signatures([b"good", "text, not bytes"])
        assert listing(tmp_path) == ["signature-1", "version"]

    @pytest.mark.parametrize(
        "name",
        ["signature-1", "manifest.json", "../outside", "version", "dir-put-blob1"],
    )
    def test_install_refuses_what_was_not_staged(self, tmp_path, name):
        """Only temporary files of the folder itself are renamed into place."""
        root = tmp_path / "image"
        destination = DirImageDestination(str(root))
        destination.put_signatures([b"kept"])
        destination.put_manifest(b"{}")
        (tmp_path / "outside").write_bytes(b"not ours")
        before = snapshot(root)

        with pytest.raises(UnsafePath):
            destination.install_signatures([name])

        assert snapshot(root) == before
        assert (tmp_path / "outside").read_bytes() == b"not ours"

    def test_install_of_a_missing_staged_file_changes_nothing(self, tmp_path):
        destination = DirImageDestination(str(tmp_path))
        destination.put_signatures([b"kept"])
        staged = destination.stage_signatures([b"one"])
        (tmp_path / staged[0]).unlink()
        (tmp_path / f"{TEMP_PREFIX}folder").mkdir()

        with pytest.raises(BlobNotFound):
            destination.install_signatures(staged)
        with pytest.raises(UnsafePath):
            destination.install_signatures([f"{TEMP_PREFIX}folder"])

        assert DirImageSource(str(tmp_path)).get_signatures() == [b"kept"]

    def test_signatures_staged_by_a_killed_copy_are_removed_as_unused(self, tmp_path):
        destination = DirImageDestination(str(tmp_path))
        staged = destination.stage_signatures([b"one", b"two"])
        assert sorted(destination.remove_unused(set())) == sorted(staged)
        assert listing(tmp_path) == ["version"]

    def test_put_manifest_with_layout_1_2_for_sha512(self, tmp_path):
        """A sha512 image is recorded as layout 1.2, which readers then use."""
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha512(BLOB), io.BytesIO(BLOB), len(BLOB))
        destination.put_manifest(b"{}", layout_version="1.2")
        assert (tmp_path / "version").read_bytes() == version_text("1.2")
        assert destination.layout_version == "1.2"
        source = DirImageSource(str(tmp_path))
        assert source.layout_version == "1.2"
        file, size = source.get_blob(sha512(BLOB))
        with file:
            assert size == len(BLOB)

    def test_put_manifest_upgrades_a_legacy_image_to_1_1(self, fresh_image):
        """Writing over a 1.0 image records 1.1 with the new manifest."""
        root = fresh_image("legacy-1.0")
        destination = DirImageDestination(str(root))
        destination.put_manifest((root / "manifest.json").read_bytes(), None, "1.1")
        assert (root / "version").read_bytes() == VERSION_1_1

    @pytest.mark.parametrize("hex_part", ["../x", "../image/../x", "absolute"])
    def test_a_smuggled_digest_writes_and_deletes_nothing(self, tmp_path, hex_part):
        """An instance Digest made around its constructor never becomes a path:
        nothing beside the folder is written, and nothing there is deleted."""
        root = tmp_path / "image"
        destination = DirImageDestination(str(root))
        (tmp_path / "x.signature-1").write_bytes(b"a file beside the image")
        (tmp_path / "x.signature-2").write_bytes(b"another one")
        before = {
            path.name: path.read_bytes()
            for path in tmp_path.iterdir()
            if path.is_file()
        }
        if hex_part == "absolute":
            hex_part = str(tmp_path / "x")
        smuggled = Digest._make(("sha256", hex_part))

        with pytest.raises(InvalidDigest):
            destination.put_manifest(b"{}", smuggled)
        with pytest.raises(InvalidDigest):
            destination.put_signatures([b"signature"], smuggled)
        with pytest.raises(InvalidDigest):
            destination.put_blob(smuggled, io.BytesIO(b"blob"))

        after = {
            path.name: path.read_bytes()
            for path in tmp_path.iterdir()
            if path.is_file()
        }
        assert after == before
        assert listing(root) == ["version"]

    @pytest.mark.parametrize("version", ["1.0", "2016", "1.3", ""])
    def test_put_version_refuses_versions_it_cannot_write(self, tmp_path, version):
        """Only 1.1 and 1.2 are ever written."""
        destination = DirImageDestination(str(tmp_path))
        with pytest.raises(ValueError, match="layout version"):
            destination.put_version(version)
        assert (tmp_path / "version").read_bytes() == VERSION_1_1


class TestRemoveUnused:
    """Removing what the new image no longer uses, and nothing else."""

    def test_keeps_kept_and_foreign_files_removes_the_rest(self, tmp_path):
        """Only unused layout files and our temporary files are removed."""
        kept_blob, unused_blob = sha256(b"kept"), sha256(b"unused")
        kept_instance, unused_instance = sha256(b"kept i"), sha256(b"unused i")
        kept_sha512 = sha512(b"kept")
        destination = DirImageDestination(str(tmp_path))
        files = {
            "manifest.json": b"m",
            "signature-1": b"s",
            ".dirimage.lock": b"",
            kept_blob[7:]: b"kept",
            f"sha512-{kept_sha512[7:]}": b"kept",
            unused_blob[7:]: b"unused",
            f"{kept_blob[7:]}.tar": b"kept",
            f"{unused_blob[7:]}.tar": b"unused",
            f"{kept_instance[7:]}.manifest.json": b"i",
            f"{kept_instance[7:]}.signature-1": b"i",
            f"{unused_instance[7:]}.manifest.json": b"u",
            f"{unused_instance[7:]}.signature-1": b"u",
            ".dirimage-tmp-abc123": b"partial",
            "dir-put-blob123456": b"skopeo's partial",
            "notes.txt": b"foreign",
            "manifest.json.bak": b"foreign",
            "sha512-abc": b"foreign",
            f"sha256-{kept_blob[7:]}": b"foreign",
        }
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        folder_like_a_blob = sha256(b"folder")[7:]
        (tmp_path / folder_like_a_blob).mkdir()

        removed = destination.remove_unused({kept_blob, kept_sha512, kept_instance})

        expected_removed = sorted(
            [
                unused_blob[7:],
                f"{kept_blob[7:]}.tar",
                f"{unused_blob[7:]}.tar",
                f"{unused_instance[7:]}.manifest.json",
                f"{unused_instance[7:]}.signature-1",
                ".dirimage-tmp-abc123",
            ]
        )
        assert removed == expected_removed
        remaining = set(files) - set(expected_removed)
        remaining |= {"version", folder_like_a_blob}
        assert set(listing(tmp_path)) == remaining
        for name in remaining & set(files):
            assert (tmp_path / name).read_bytes() == files[name]

    def test_on_a_real_image_removes_nothing_it_uses(self, fresh_image):
        """With every digest of the image kept, nothing is removed."""
        root = fresh_image("index")
        before = snapshot(root)
        plan = plan_image(str(root))
        assert DirImageDestination(str(root)).remove_unused(plan.digests) == []
        assert snapshot(root) == before


OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DIGESTERS = {"sha256": sha256, "sha512": sha512}
LAYOUT_OF = {"sha256": "1.1", "sha512": "1.2"}


def descriptor(media_type: str, digest: str, size: int) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size}


def small_image(algorithm: str, seed: str) -> tuple[bytes, dict[str, bytes]]:
    """An OCI manifest whose config and layer are named by `algorithm` digests,
    and those blobs by digest."""
    digest = DIGESTERS[algorithm]
    config = json.dumps({"os": "linux", "architecture": "amd64", "seed": seed})
    config = config.encode()
    layer = f"layer of {seed}".encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, digest(config), len(config)),
        "layers": [descriptor(OCI_LAYER, digest(layer), len(layer))],
    }
    return json.dumps(manifest).encode(), {digest(config): config, digest(layer): layer}


def put_blobs(destination: DirImageDestination, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        destination.put_blob(digest, io.BytesIO(data), len(data))


def written_image(root: Path, algorithm: str, seed: str) -> Path:
    """A folder holding a whole small image written by the destination."""
    manifest, blobs = small_image(algorithm, seed)
    destination = DirImageDestination(str(root))
    put_blobs(destination, blobs)
    destination.put_manifest(manifest)
    return root


def assert_reads_as(root: Path, manifests: set[bytes]) -> None:
    """The folder reads as the image of one of `manifests`, every blob intact."""
    assert DirImageSource(str(root)).get_manifest() in manifests
    assert check_image(str(root)) == []


@pytest.fixture
def previous_image(fresh_image, tmp_path):
    """Return a function that gives a folder holding an image of a layout."""

    def make(kind: str) -> Path:
        if kind in ("legacy-1.0", "legacy-2016"):
            return fresh_image(kind)
        algorithm = "sha256" if kind == "1.1" else "sha512"
        return written_image(tmp_path / kind, algorithm, "previous")

    return make


class Interrupted(BaseException):
    """Stands for a SIGKILL between two renames of a commit."""


def interrupt_after(monkeypatch, writes: int) -> None:
    """Make the destination's file writes stop the process after `writes` of them."""
    real_write = storage.destination.write_atomically
    done = []

    def write_atomically(path, data):
        if len(done) == writes:
            raise Interrupted(path)
        real_write(path, data)
        done.append(path)

    monkeypatch.setattr(storage.destination, "write_atomically", write_atomically)


class TestLayoutVersion:
    """The version file follows what the image needs, by the destination's own
    rule, and never strands the previous image."""

    def test_a_sha512_blob_records_1_2_by_itself(self, tmp_path):
        destination = DirImageDestination(str(tmp_path))
        destination.put_blob(sha512(BLOB), io.BytesIO(BLOB), len(BLOB))
        assert (tmp_path / "version").read_bytes() == version_text("1.2")
        file, _ = DirImageSource(str(tmp_path)).get_blob(sha512(BLOB))
        file.close()

    def test_a_sha512_instance_manifest_records_1_2_by_itself(self, tmp_path):
        destination = DirImageDestination(str(tmp_path))
        destination.put_manifest(b"{}", sha512(b"instance"))
        assert (tmp_path / "version").read_bytes() == version_text("1.2")

    @pytest.mark.parametrize("kind", ["legacy-1.0", "legacy-2016"])
    def test_a_sha512_blob_leaves_a_legacy_version_until_the_commit(
        self, previous_image, kind
    ):
        """1.2 would hide the `.tar` layers of the previous image, so a legacy
        folder keeps its version while the new blobs land."""
        root = previous_image(kind)
        before = (root / "version").read_bytes() if kind == "legacy-1.0" else None
        manifest, blobs = small_image("sha512", "new")
        put_blobs(DirImageDestination(str(root)), blobs)

        if before is None:
            assert not (root / "version").exists()
        else:
            assert (root / "version").read_bytes() == before
        assert_reads_as(root, {(root / "manifest.json").read_bytes()})

    @pytest.mark.parametrize("kind", ["1.1", "1.2", "legacy-1.0", "legacy-2016"])
    @pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
    def test_commit_records_the_version_the_new_image_needs(
        self, previous_image, kind, algorithm
    ):
        root = previous_image(kind)
        manifest, blobs = small_image(algorithm, "new")
        destination = DirImageDestination(str(root))
        put_blobs(destination, blobs)

        destination.put_manifest(manifest)

        expected = LAYOUT_OF[algorithm]
        assert (root / "version").read_bytes() == version_text(expected)
        assert destination.layout_version == expected
        assert plan_image(str(root)).layout_version == expected
        destination.remove_unused(set(blobs))
        assert_reads_as(root, {manifest})

    def test_commit_reads_the_stored_instance_manifests_for_their_blobs(
        self, previous_image
    ):
        """A list named by sha256 whose instance has sha512 blobs needs 1.2; the
        destination finds them in the instance manifest it already holds."""
        root = previous_image("legacy-1.0")
        instance, blobs = small_image("sha512", "instance")
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sha256(instance),
                    "size": len(instance),
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
        destination = DirImageDestination(str(root))
        put_blobs(destination, blobs)
        destination.put_manifest(instance, sha256(instance))

        destination.put_manifest(json.dumps(index).encode())

        assert (root / "version").read_bytes() == version_text("1.2")
        assert check_image(str(root)) == []

    @pytest.mark.parametrize("kind", ["1.1", "1.2", "legacy-1.0", "legacy-2016"])
    @pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
    @pytest.mark.parametrize("writes", [0, 1, 2])
    def test_a_commit_stopped_between_any_two_writes_reads_as_one_image(
        self, previous_image, monkeypatch, kind, algorithm, writes
    ):
        """Stopped before, between or after the version and manifest writes, the
        folder reads as the previous image or as the new one, all blobs intact.
        The version is passed as the copy flow passes it, from the plan."""
        root = previous_image(kind)
        previous = (root / "manifest.json").read_bytes()
        manifest, blobs = small_image(algorithm, "new")
        destination = DirImageDestination(str(root))
        put_blobs(destination, blobs)
        assert_reads_as(root, {previous})
        interrupt_after(monkeypatch, writes)

        try:
            destination.put_manifest(manifest, None, LAYOUT_OF[algorithm])
        except Interrupted:
            pass

        assert_reads_as(root, {previous, manifest})
