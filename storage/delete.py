"""Deleting an image folder: exactly the files of the layout, nothing else."""

import errno
import logging
import os
from dataclasses import dataclass

from storage import layout
from storage.errors import NotAnImage
from storage.lock import ImageLock
from storage.source import image_layout_version

log = logging.getLogger(__name__)

# The top-level manifest goes first: once it is gone the folder no longer claims
# to hold an image, so an interrupted delete leaves nothing that looks whole.
# The version file goes last but one, so a second delete still recognises the
# folder as ours and finishes the work; the lock file goes last.
_FIRST, _LAST = (layout.MANIFEST_FILE,), (layout.VERSION_FILE, layout.LOCK_FILE)


@dataclass(frozen=True)
class DeleteResult:
    """What `delete_image` did.

    `existed` is false when there was no folder to delete. `left` lists the
    entries that are not part of the layout and were left in place; the folder
    itself stays when there are any.
    """

    path: str
    existed: bool
    removed: tuple[str, ...]
    left: tuple[str, ...]
    folder_removed: bool


def delete_image(path: str, wait: float = 0.0) -> DeleteResult:
    """Remove the image in folder `path`, and the folder when nothing else is in it.

    Only files whose names belong to the layout are removed: manifests, blobs,
    signatures, the version file, the lock file and temporary files of dirimage
    and of containers/image. Anything else, folders included, stays and is
    listed in the result. A folder that does not hold an image is refused with
    `NotAnImage` and left untouched; a missing folder is not an error, so
    deleting twice is fine.

    The folder's `ImageLock` is held throughout, waiting up to `wait` seconds, so
    a delete never runs while dirimage copies into the same folder.
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        return DeleteResult(path, False, (), (), False)
    check_deletable(path)

    removed: list[str] = []
    left: list[str] = []
    with ImageLock(path, wait):
        with os.scandir(path) as entries:
            names = {entry.name: entry for entry in entries}
        order = [n for n in _FIRST if n in names]
        order += sorted(n for n in names if n not in _FIRST + _LAST)
        order += [n for n in _LAST if n in names]
        for name in order:
            entry = names[name]
            if entry.is_dir(follow_symlinks=False) or layout.layout_kind(name) is None:
                left.append(name)
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(name)

    folder_removed = False
    if not left:
        try:
            os.rmdir(path)
            folder_removed = True
        except OSError as error:
            # Someone wrote into the folder meanwhile; their file stays with it.
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    log.debug("deleted %d files from %s, left %d", len(removed), path, len(left))
    return DeleteResult(path, True, tuple(removed), tuple(sorted(left)), folder_removed)


def check_deletable(path: str) -> None:
    """Raise `NotAnImage` unless `path` is a folder that `delete_image` may empty.

    That is a folder holding an image by the rule of `image_layout_version` (a
    `version` file, or a `manifest.json` that parses as an image manifest), or
    only the lock and temporary files an interrupted delete leaves.
    """
    if os.path.islink(path) or not os.path.isdir(path):
        raise NotAnImage(f"refusing to delete {path}: it is not a folder")
    try:
        image_layout_version(path)
    except NotAnImage as error:
        if not _only_leftovers(path):
            raise NotAnImage(f"refusing to delete: {error}") from None


def _only_leftovers(path: str) -> bool:
    """Whether `path` holds nothing but lock and temporary files of the layout."""
    with os.scandir(path) as entries:
        kinds = [
            layout.layout_kind(entry.name)
            if not entry.is_dir(follow_symlinks=False)
            else None
            for entry in entries
        ]
    return bool(kinds) and set(kinds) <= {"lock", "temporary"}
