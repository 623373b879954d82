"""Copying a blob from file to file: the kernel copies the bytes, dirimage hashes
what landed, and streaming through a buffer takes over where the kernel cannot.

Every case runs on real files. The fallback is reached the way users reach it: a
source on another file system (a tmpfs mounted by the test) and a source that is
not a file at all.
"""

import errno
import hashlib
import io
import mmap
import os
from pathlib import Path

import pytest

import faultkit
import storage.files
from storage import DigestMismatch, DirImageDestination, SizeMismatch
from storage.digest import parse_digest
from storage.files import copy_verified

PAGE = mmap.ALLOCATIONGRANULARITY
# Not a multiple of the page size, so that windows start mid-page.
BLOB = os.urandom(5 * PAGE * 7 + 123)
BLOB_SIZE = len(BLOB)
DIGEST = parse_digest(f"sha256:{hashlib.sha256(BLOB).hexdigest()}")


@pytest.fixture
def kernel_copies(monkeypatch) -> list[tuple[int, str]]:
    """Record each copy_file_range call (bytes asked for, and its outcome)."""
    real = os.copy_file_range
    calls: list[tuple[int, str]] = []

    def recording(source, sink, count, *offsets):
        try:
            copied = real(source, sink, count, *offsets)
        except OSError as error:
            calls.append((count, errno.errorcode.get(error.errno, "?")))
            raise
        calls.append((count, str(copied)))
        return copied

    monkeypatch.setattr(os, "copy_file_range", recording)
    return calls


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 7 pages and a few bytes: every window but the first is unaligned."""
    monkeypatch.setattr(storage.files, "COPY_WINDOW", 7 * PAGE + 5)


def copy_file(source: Path, sink_path: Path, digest=DIGEST, size=BLOB_SIZE) -> int:
    with open(source, "rb") as stream, open(sink_path, "w+b", buffering=0) as sink:
        return copy_verified(stream, sink, digest, size)


def test_regular_files_are_copied_by_the_kernel(tmp_path, kernel_copies):
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    copied = copy_file(source, tmp_path / "copy")

    assert copied == len(BLOB)
    assert (tmp_path / "copy").read_bytes() == BLOB
    assert kernel_copies and all(outcome.isdigit() for _, outcome in kernel_copies)


def test_unaligned_windows_hash_every_byte_once(tmp_path, small_windows, kernel_copies):
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    assert copy_file(source, tmp_path / "copy") == len(BLOB)
    assert (tmp_path / "copy").read_bytes() == BLOB
    assert len(kernel_copies) > 5


@pytest.mark.parametrize("size", [len(BLOB), None], ids=["size known", "size unknown"])
def test_size_known_or_not(tmp_path, small_windows, size):
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    assert copy_file(source, tmp_path / "copy", size=size) == len(BLOB)


def test_empty_blob(tmp_path):
    source = tmp_path / "empty"
    source.write_bytes(b"")
    empty = parse_digest(f"sha256:{hashlib.sha256(b'').hexdigest()}")

    assert copy_file(source, tmp_path / "copy", digest=empty, size=0) == 0


def test_other_bytes_fail_naming_the_digest(tmp_path, small_windows):
    source = tmp_path / "blob"
    source.write_bytes(BLOB[:-1] + bytes([BLOB[-1] ^ 1]))

    with pytest.raises(DigestMismatch, match=str(DIGEST)):
        copy_file(source, tmp_path / "copy")


@pytest.mark.parametrize("change", [-1, 1, PAGE], ids=["shorter", "longer", "a page"])
def test_a_source_of_another_length_fails(tmp_path, small_windows, change):
    source = tmp_path / "blob"
    source.write_bytes(BLOB[:change] if change < 0 else BLOB + os.urandom(change))

    with pytest.raises(SizeMismatch, match=str(DIGEST)):
        copy_file(source, tmp_path / "copy")


def test_a_longer_source_is_not_copied_to_its_end(tmp_path, kernel_copies):
    """A blob that is far too long stops one byte past the size it should have."""
    source = tmp_path / "blob"
    source.write_bytes(BLOB + os.urandom(4 * 1024 * 1024))

    with pytest.raises(SizeMismatch, match="found more"):
        copy_file(source, tmp_path / "copy")
    assert sum(int(outcome) for _, outcome in kernel_copies) == len(BLOB) + 1


def test_put_blob_from_a_file_leaves_nothing_on_failure(tmp_path, kernel_copies):
    source = tmp_path / "blob"
    source.write_bytes(BLOB[:-1])
    destination = DirImageDestination(str(tmp_path / "image"))

    with open(source, "rb") as stream, pytest.raises(SizeMismatch):
        destination.put_blob(DIGEST, stream, len(BLOB))
    assert sorted(os.listdir(tmp_path / "image")) == ["version"]
    assert kernel_copies


@pytest.fixture
def writebacks(monkeypatch) -> list[tuple[int, int]]:
    """Record each request to start writing a range back to disk."""
    real = storage.files.start_writeback
    ranges: list[tuple[int, int]] = []

    def recording(descriptor, start, length):
        ranges.append((start, length))
        real(descriptor, start, length)

    monkeypatch.setattr(storage.files, "start_writeback", recording)
    return ranges


def covers_the_blob(ranges: list[tuple[int, int]], end: int) -> bool:
    """Whether `ranges` follow each other from 0 without a gap or overlap."""
    expected_start = 0
    for start, length in ranges:
        if start != expected_start or length <= 0:
            return False
        expected_start += length
    return expected_start == end


def test_the_kernel_copy_writes_back_behind_itself(tmp_path, small_windows, writebacks):
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    copy_file(source, tmp_path / "copy")

    assert len(writebacks) > 5
    assert covers_the_blob(writebacks, len(BLOB))


def test_the_buffered_copy_writes_back_behind_itself(
    tmp_path, small_windows, writebacks
):
    with open(tmp_path / "copy", "w+b", buffering=0) as sink:
        copy_verified(io.BytesIO(BLOB), sink, DIGEST, len(BLOB))

    assert writebacks
    start, length = writebacks[-1]
    assert covers_the_blob(writebacks, start + length)
    assert len(BLOB) - (start + length) < storage.files.COPY_WINDOW


def test_a_failure_while_hashing_stops_the_copy(tmp_path, small_windows, monkeypatch):
    """Windows are hashed on a second thread; its failure reaches the caller,
    and the copy stops instead of waiting on it."""
    real = storage.files._hash_written
    hashed: list[int] = []

    def failing_on_the_third(descriptor, start, length, hasher):
        hashed.append(start)
        if len(hashed) == 3:
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(descriptor, start, length, hasher)

    monkeypatch.setattr(storage.files, "_hash_written", failing_on_the_third)
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    with pytest.raises(OSError, match="injected"):
        copy_file(source, tmp_path / "copy")
    assert len(hashed) == 3


def test_a_stream_that_is_no_file_is_streamed(tmp_path, kernel_copies):
    with open(tmp_path / "copy", "w+b", buffering=0) as sink:
        assert copy_verified(io.BytesIO(BLOB), sink, DIGEST, len(BLOB)) == len(BLOB)
    assert (tmp_path / "copy").read_bytes() == BLOB
    assert kernel_copies == []


def test_a_partly_read_file_is_streamed_from_where_it_stands(tmp_path, kernel_copies):
    source = tmp_path / "blob"
    source.write_bytes(b"header" + BLOB)

    with open(source, "rb") as stream, open(tmp_path / "copy", "w+b") as sink:
        stream.read(len(b"header"))
        assert copy_verified(stream, sink, DIGEST, len(BLOB)) == len(BLOB)
    assert (tmp_path / "copy").read_bytes() == BLOB
    assert kernel_copies == []


def test_without_memory_maps_the_window_is_read_back(tmp_path, monkeypatch):
    """File systems that cannot map files still get every byte hashed."""

    def no_maps(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(storage.files.mmap, "mmap", no_maps)
    source = tmp_path / "blob"
    source.write_bytes(BLOB)

    assert copy_file(source, tmp_path / "copy") == len(BLOB)
    source.write_bytes(BLOB[:-1] + b"\0")
    with pytest.raises(DigestMismatch):
        copy_file(source, tmp_path / "again")


@pytest.fixture
def other_file_system(tmp_path):
    """A tmpfs mounted for the test: a different file system from tmp_path's."""
    options = ["-t", "tmpfs", "-o", "size=16m", "tmpfs"]
    with faultkit.mounted(options, tmp_path / "tmpfs") as folder:
        yield folder


def test_across_file_systems_the_bytes_are_streamed(
    tmp_path, other_file_system, kernel_copies
):
    source = other_file_system / "blob"
    source.write_bytes(BLOB)

    assert copy_file(source, tmp_path / "copy") == len(BLOB)
    assert (tmp_path / "copy").read_bytes() == BLOB
    # The kernel was asked once, refused, and the buffer did the rest.
    assert kernel_copies == [(len(BLOB) + 1, "EXDEV")]


def test_across_file_systems_damage_is_still_caught(
    tmp_path, other_file_system, kernel_copies
):
    source = other_file_system / "blob"
    source.write_bytes(BLOB[:-1])

    with pytest.raises(SizeMismatch, match=str(DIGEST)):
        copy_file(source, tmp_path / "copy")
