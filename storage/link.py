"""Sharing one blob file between images: a reflink where the filesystem offers
one, else a hard link.

A reflink (the FICLONE ioctl; btrfs, XFS, bcachefs, recent ZFS) gives the target
its own inode whose extents are shared copy-on-write, so changing one copy never
changes the other. A hard link is the same inode under two names: a change
through one name shows under every name, which is why verify hashes every image.
"""

import dataclasses
import errno
import fcntl
import logging
import os
import secrets
import struct
import time

from storage import layout
from storage.destination import DirImageDestination
from storage.digest import parse_digest
from storage.errors import BlobNotFound, DigestMismatch, SizeMismatch, UnsafePath
from storage.transfer import COPIED, BlobTransfer, _worker_name, transfer_blob

log = logging.getLogger(__name__)

# From linux/fs.h: _IOW(0x94, 9, int).
FICLONE = 0x40049409
# From linux/fs.h and linux/fiemap.h: _IOWR('f', 11, struct fiemap), its header
# and one extent (logical, physical and length, then flags among reserved words).
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
# Extents whose place on disk is not (yet) known, or is no place of their own.
_EXTENT_UNPLACED = 0x2 | 0x4 | 0x200 | 0x400  # unknown, delalloc, inline, tail
_EXTENTS_PER_CALL = 128
_WHOLE_FILE = 2**64 - 1  # FIEMAP_MAX_OFFSET: the kernel stops at the file's end
# Data kept inside the inode (btrfs stores files up to a page so) is never
# shared; two such files hold the same blob when they hold the same bytes.
_INLINE_LIMIT = 64 * 1024
REFLINK = "reflink"
HARDLINK = "hardlink"
LINKED = "linked"
COPIED_LOCALLY = "copied-locally"
KEPT = "kept"
DAMAGED_DONOR = "donor-damaged"

# Errors that mean "this filesystem, or this pair of folders, cannot share".
_CANNOT_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL}
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}


def _temporary_name(folder: str) -> str:
    return os.path.join(folder, f"{layout.TEMP_PREFIX}{secrets.token_hex(8)}")


def _reflink(source: str, temporary: str) -> bool:
    with open(source, "rb") as reader:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(descriptor, FICLONE, reader.fileno())
            os.fsync(descriptor)
        except OSError as error:
            os.close(descriptor)
            os.unlink(temporary)
            if error.errno in _CANNOT_REFLINK:
                return False
            raise
        os.close(descriptor)
    return True


def link_file(source: str, target: str) -> str:
    """Make `target` share the storage of the regular file `source`, atomically.

    The link is made under a temporary name in the target's folder and renamed
    over `target`, so readers see the old file or the new one, never neither.
    Returns `REFLINK` or `HARDLINK`. Raises `OSError` (EXDEV across filesystems,
    EMLINK at the link limit, ...) when neither can be made.
    """
    folder = os.path.dirname(target)
    temporary = _temporary_name(folder)
    if _reflink(source, temporary):
        method = REFLINK
    else:
        os.link(source, temporary)
        method = HARDLINK
    try:
        os.replace(temporary, target)
    finally:
        # rename() of two names of one inode succeeds and leaves both in place.
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return method


def same_file(first: str, second: str) -> bool:
    """Whether two paths are names of one inode."""
    try:
        return os.path.samefile(first, second)
    except FileNotFoundError:
        return False


def shares_storage(first: str, second: str) -> bool:
    """Whether linking `second` to `first` would change nothing.

    True for two names of one inode (a hard link), for two files made of the
    same extents on disk (a reflink, told by FIEMAP), and for two small files
    that hold the same bytes where one keeps its data inside its inode or is
    empty. False where that cannot be told: a missing file, a filesystem
    without FIEMAP.
    """
    if same_file(first, second):
        return True
    try:
        first_extents, second_extents = _extents(first), _extents(second)
    except OSError:
        return False
    if not (first_extents and second_extents):
        # Empty, or kept inside the inode: nothing on disk to compare.
        return _same_small_bytes(first, second)
    return first_extents == second_extents


def _extents(path: str) -> list[tuple[int, int, int]] | None:
    """The (logical, physical, length) extents of the file at `path`, or None
    when one of them has no place on disk of its own."""
    extents: list[tuple[int, int, int]] = []
    start = 0
    with open(path, "rb") as file:
        while True:
            header = _FIEMAP_HEADER.pack(
                start, _WHOLE_FILE, _FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0
            )
            request = bytearray(header + bytes(_EXTENTS_PER_CALL * _FIEMAP_EXTENT.size))
            fcntl.ioctl(file.fileno(), FS_IOC_FIEMAP, request)
            mapped = _FIEMAP_HEADER.unpack_from(request)[3]
            if not mapped:
                return extents
            for index in range(mapped):
                offset = _FIEMAP_HEADER.size + index * _FIEMAP_EXTENT.size
                extent = _FIEMAP_EXTENT.unpack_from(request, offset)
                logical, physical, length, flags = extent
                if flags & _EXTENT_UNPLACED:
                    return None
                extents.append((logical, physical, length))
                if flags & _EXTENT_LAST:
                    return extents
            start = logical + length


def _same_small_bytes(first: str, second: str) -> bool:
    try:
        with open(first, "rb") as one, open(second, "rb") as other:
            data = one.read(_INLINE_LIMIT + 1)
            small = len(data) <= _INLINE_LIMIT
            return small and data == other.read(_INLINE_LIMIT + 1)
    except OSError:
        return False


def link_blob(
    donor: str,
    destination: str,
    digest: str,
    size: int | None = None,
    optional: bool = False,
    verify_donor: bool = False,
    fallback_source: str | None = None,
) -> BlobTransfer:
    """Make blob `digest` of image folder `destination` share the donor's file.

    `donor` is another image folder holding the blob. With `verify_donor` its
    file is hashed first; leave it off for a copy verified moments ago. A
    destination blob that already shares the donor's storage (`shares_storage`)
    is `reused`; otherwise it is `linked` over whatever is there. When the two
    folders cannot share storage (another filesystem, link limit reached) the
    blob is copied from the donor, verified, as `copied-locally`. When the donor
    lacks the blob or holds wrong bytes, it is copied from image folder
    `fallback_source` (`copied`), or the error is raised when there is none.
    """
    parsed = parse_digest(digest)
    started, clock = time.time(), time.perf_counter()
    target = DirImageDestination(destination)
    donor_image = DirImageDestination(donor)
    donor_path = donor_image.blob_path(parsed)
    target_path = target.blob_path(parsed)

    usable = os.path.lexists(donor_path)
    if usable and verify_donor:
        usable = donor_image.has_blob(parsed, size)
    if not usable:
        if fallback_source is not None:
            return transfer_blob(
                fallback_source, destination, str(parsed), size, optional
            )
        if optional:
            return BlobTransfer(str(parsed), 0, "absent", started, 0.0, _worker_name())
        raise BlobNotFound(f"blob {parsed} is missing or damaged in {donor}")

    if shares_storage(donor_path, target_path):
        action = "reused"
    else:
        target.prepare_name_for(parsed)
        try:
            method = link_file(donor_path, target_path)
        except OSError as error:
            if error.errno not in _CANNOT_LINK:
                raise
            log.debug("cannot link %s (%s); copying it", target_path, error)
            copied = transfer_blob(donor, destination, str(parsed), size, optional)
            return dataclasses.replace(copied, action=COPIED_LOCALLY)
        log.debug("%s %s to %s", method, donor_path, target_path)
        action = LINKED

    length = os.path.getsize(target_path)
    seconds = time.perf_counter() - clock
    return BlobTransfer(str(parsed), length, action, started, seconds, _worker_name())


def copy_blob_locally(
    holder: str,
    destination: str,
    digest: str,
    size: int | None = None,
    optional: bool = False,
    fallback_source: str | None = None,
) -> BlobTransfer:
    """Copy blob `digest` into image folder `destination` from image folder `holder`.

    The copy is hashed as it streams, as every copy is, so a damaged file of the
    holder is never placed; it is `copied-locally`. When the holder lacks the blob
    or holds wrong bytes, the blob is copied from image folder `fallback_source`
    (`copied`), or the error is raised when there is none.
    """
    try:
        copied = transfer_blob(holder, destination, digest, size, optional)
    except (BlobNotFound, DigestMismatch, SizeMismatch, UnsafePath) as error:
        if fallback_source is None:
            raise
        log.debug(
            "cannot copy %s from %s (%s); reading the source", digest, holder, error
        )
        return transfer_blob(fallback_source, destination, digest, size, optional)
    if copied.action != COPIED:
        return copied
    return dataclasses.replace(copied, action=COPIED_LOCALLY)


def share_blob(
    donor: str, destination: str, digest: str, size: int | None = None
) -> BlobTransfer:
    """Make the file of blob `digest` in image folder `destination` the donor's.

    For images that already hold the blob: nothing new is placed. When the two
    files already share their storage (`shares_storage`), nothing is hashed or
    written (`reused`). Otherwise the donor's file is hashed, and only when it
    matches `digest` and `size` does a link to it replace the destination's
    file, atomically (`linked`). A donor file that does not match is left
    alone, and so is the destination's file (`donor-damaged`); so is a
    destination that no longer has the blob, or a pair of folders that cannot
    share storage (`kept`). The caller holds the destination's lock.
    """
    parsed = parse_digest(digest)
    started, clock = time.time(), time.perf_counter()
    target = DirImageDestination(destination)
    donor_image = DirImageDestination(donor)
    donor_path = donor_image.blob_path(parsed)
    target_path = target.blob_path(parsed)

    def outcome(action: str, length: int = 0) -> BlobTransfer:
        seconds = time.perf_counter() - clock
        return BlobTransfer(
            str(parsed), length, action, started, seconds, _worker_name()
        )

    if not os.path.lexists(target_path):
        return outcome(KEPT)
    if shares_storage(donor_path, target_path):
        return outcome("reused", os.path.getsize(target_path))
    if not donor_image.has_blob(parsed, size):
        log.debug(
            "not linking %s to %s: it does not hash to its name",
            target_path,
            donor_path,
        )
        return outcome(DAMAGED_DONOR)
    try:
        method = link_file(donor_path, target_path)
    except OSError as error:
        if error.errno not in _CANNOT_LINK:
            raise
        log.debug("cannot link %s (%s); keeping it", target_path, error)
        return outcome(KEPT, os.path.getsize(target_path))
    log.debug("%s %s to %s", method, donor_path, target_path)
    return outcome(LINKED, os.path.getsize(target_path))
