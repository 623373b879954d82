"""Moving one blob from a source folder to a destination folder."""

import logging
import os
import socket
import time
from dataclasses import dataclass

from storage.destination import DirImageDestination
from storage.digest import parse_digest
from storage.errors import BlobNotFound, ImageError
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
