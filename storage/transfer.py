"""Moving one blob from a source folder to a destination folder."""

import logging
import os
import socket
import time
from dataclasses import dataclass

from storage.destination import DirImageDestination
from storage.digest import parse_digest
from storage.errors import BlobNotFound
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
    target = DirImageDestination(destination)

    if target.has_blob(digest, size):
        action, length = REUSED, os.path.getsize(target.blob_path(digest))
    else:
        try:
            stream, length = DirImageSource(source).get_blob(digest)
        except BlobNotFound:
            if not optional:
                raise
            action, length = ABSENT, 0
        else:
            with stream:
                length = target.put_blob(digest, stream, size)
            action = COPIED

    seconds = time.perf_counter() - clock
    log.debug("%s blob %s (%d bytes) in %.3f s", action, digest, length, seconds)
    return BlobTransfer(str(digest), length, action, started, seconds, _worker_name())
