"""Moving one blob from a source folder to a destination folder."""

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from storage.destination import DirImageDestination
from storage.digest import parse_digest
from storage.errors import BlobNotFound, ImageError
from storage.manifest import BlobRef
from storage.source import DirImageSource

log = logging.getLogger(__name__)

COPIED = "copied"
REUSED = "reused"
ABSENT = "absent"


@dataclass(frozen=True)
class BlobTransfer:
    """What happened to one blob: `copied`, `reused` (already there and intact), or
    `absent` (an optional blob the source does not have either).

    `started` is a Unix time, so transfers from several machines can be lined up;
    `worker` names the host and process that did the work.
    """

    digest: str
    size: int
    action: str
    started: float
    seconds: float
    worker: str


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def transfer_blob(
    source: str,
    destination: str,
    digest: str,
    size: int | None = None,
    optional: bool = False,
) -> BlobTransfer:
    """Make blob `digest` of image `source` present and intact in `destination`.

    A blob already in the destination is kept when its bytes hash to its digest;
    otherwise it is streamed from the source, verified, and renamed into place.
    Idempotent, so it is safe to retry and to run twice at once.
    """
    digest = parse_digest(digest)
    started = time.time()
    clock = time.perf_counter()
    try:
        action, length = _make_present(source, destination, digest, size, optional)
    except ImageError:
        raise
    except OSError as error:
        # A failed read says only "Input/output error"; name the blob, and keep
        # the errno so that the retry policy still tells transient errors apart.
        raise _naming_blob(error, digest) from error

    seconds = time.perf_counter() - clock
    log.debug("%s blob %s (%d bytes) in %.3f s", action, digest, length, seconds)
    return BlobTransfer(str(digest), length, action, started, seconds, _worker_name())


def present_blobs(destination: str, blobs: list[BlobRef]) -> list[BlobRef]:
    """The blobs of `blobs` that have a file in `destination` of the size their
    manifest records (of any size where it records none), largest first.

    Only a stat each: these are the blobs worth hashing before a copy.
    """
    target = DirImageDestination(destination)
    present = []
    for blob in blobs:
        try:
            status = os.stat(target.blob_path(blob.digest))
        except FileNotFoundError:
            continue
        if blob.size is None or status.st_size == blob.size:
            present.append(blob)
    return sorted(present, key=lambda blob: -(blob.size or 0))


def reuse_intact_blobs(
    destination: str, blobs: list[BlobRef], workers: int
) -> list[BlobTransfer]:
    """Hash the files of `blobs` in `destination`, up to `workers` at once, and
    return a `reused` transfer for each file that holds its blob intact.

    A file that does not hash to its digest, or that cannot be read, is left out
    and nothing is raised: the blob's own copy then replaces the file, or meets
    the same error and retries it under the copy's retry policy.
    """
    target = DirImageDestination(destination)

    def check(blob: BlobRef) -> BlobTransfer | None:
        started = time.time()
        clock = time.perf_counter()
        try:
            if not target.has_blob(blob.digest, blob.size):
                return None
            length = os.path.getsize(target.blob_path(blob.digest))
        except OSError as error:
            log.debug("not reusing blob %s: %s", blob.digest, error)
            return None
        seconds = time.perf_counter() - clock
        return BlobTransfer(
            blob.digest, length, REUSED, started, seconds, _worker_name()
        )

    if not blobs:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(blobs)))) as pool:
        checked = list(pool.map(check, blobs))
    return [transfer for transfer in checked if transfer is not None]


def _make_present(source, destination, digest, size, optional) -> tuple[str, int]:
    target = DirImageDestination(destination)
    if target.has_blob(digest, size):
        return REUSED, os.path.getsize(target.blob_path(digest))
    try:
        stream, length = DirImageSource(source).get_blob(digest)
    except BlobNotFound:
        if not optional:
            raise
        return ABSENT, 0
    with stream:
        return COPIED, target.put_blob(digest, stream, size)


def _naming_blob(error: OSError, digest) -> OSError:
    message = f"copying blob {digest}: {error.strerror or error}"
    if error.errno is None:
        return OSError(message)
    if error.filename is None:
        return OSError(error.errno, message)
    return OSError(error.errno, message, error.filename)
