"""Reading an image from a dir: folder."""

import os
from typing import BinaryIO

from storage import layout
from storage.digest import Digest, parse_digest
from storage.errors import (
    BlobNotFound,
    InvalidManifest,
    NotAnImage,
    TooLarge,
    UnsafePath,
)
from storage.files import open_inside, read_capped
from storage.manifest import parse_manifest

# Manifests and signatures are small; a multi-megabyte one is damage or an attack.
MANIFEST_SIZE_LIMIT = 4 * 1024 * 1024
SIGNATURE_SIZE_LIMIT = 4 * 1024 * 1024
SIGNATURE_COUNT_LIMIT = 1000


def image_layout_version(path: str) -> str:
    """The layout version of the image in folder `path`, by the one rule that tells
    whether a folder holds an image at all.

    A folder with a known `version` file holds an image. Without one, only a
    `manifest.json` that parses as a known manifest makes it an image (the layout
    of 2016): a web app's manifest.json, or the one `docker save` writes, does
    not. Raises `NotAnImage` otherwise, and `UnsafePath` for a version file that
    leads outside the folder. Deciding to write into, delete or prune a folder
    goes through this.
    """
    version = layout.read_layout_version(path)
    if version == layout.LEGACY_2016:
        manifest = layout.manifest_path(path)
        try:
            parse_manifest(read_capped(path, manifest, "manifest", MANIFEST_SIZE_LIMIT))
        except (InvalidManifest, BlobNotFound, TooLarge, UnsafePath) as error:
            raise NotAnImage(
                f"{path} is not a dir: image: it has no {layout.VERSION_FILE} file "
                f"and its {layout.MANIFEST_FILE} is not an image manifest ({error})"
            ) from None
    return version


class DirImageSource:
    """An image folder opened for reading.

    Reads layouts 1.2, 1.1, 1.0 and the unversioned layout of 2016. Every file it
    opens must resolve inside the folder. Safe to use from several threads at once:
    it keeps no open files between calls.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise NotAnImage(f"{self.path} does not exist")
        if not os.path.isdir(self.path):
            raise NotAnImage(f"{self.path} is not a folder")
        self.layout_version = layout.read_layout_version(self.path)

    def __repr__(self) -> str:
        return f"DirImageSource({self.path!r})"

    def get_manifest(self, instance: "str | Digest | None" = None) -> bytes:
        """The top-level manifest, or the manifest of list instance `instance`."""
        digest = parse_digest(instance) if instance is not None else None
        path = layout.manifest_path(self.path, digest)
        what = "manifest" if digest is None else f"manifest of instance {digest}"
        return read_capped(self.path, path, what, MANIFEST_SIZE_LIMIT)

    def blob_path(self, digest: "str | Digest") -> str:
        """The path of blob `digest`, raising `BlobNotFound` when it is absent."""
        digest = parse_digest(digest)
        path = layout.blob_path(self.path, digest, self.layout_version)
        if os.path.lexists(path):
            return path
        # Images of 2016 kept the config under its bare hex and only layers as .tar;
        # try the other naming before giving up.
        other = layout.blob_path(self.path, digest, layout.VERSION_1_1)
        if layout.is_legacy(self.layout_version) and os.path.lexists(other):
            return other
        raise BlobNotFound(f"blob {digest} is missing: {path}")

    def get_blob(self, digest: "str | Digest") -> tuple[BinaryIO, int]:
        """Open blob `digest`; returns the open file and its size in bytes.

        The caller closes the file. The bytes are not checked here: readers hash
        them as they stream.
        """
        digest = parse_digest(digest)
        file = open_inside(self.path, self.blob_path(digest), f"blob {digest}")
        return file, os.fstat(file.fileno()).st_size

    def get_signatures(self, instance: "str | Digest | None" = None) -> list[bytes]:
        """Signatures 1, 2, 3, ... up to the first missing number."""
        digest = parse_digest(instance) if instance is not None else None
        signatures = []
        for number in range(1, SIGNATURE_COUNT_LIMIT + 2):
            path = layout.signature_path(self.path, number, digest)
            if not os.path.lexists(path):
                return signatures
            if number > SIGNATURE_COUNT_LIMIT:
                raise TooLarge(
                    f"{self.path} has more than {SIGNATURE_COUNT_LIMIT} signatures"
                )
            what = f"signature {number}"
            signatures.append(read_capped(self.path, path, what, SIGNATURE_SIZE_LIMIT))
        return signatures
