"""Writing an image into a dir: folder, without ever exposing a half-written file."""

import logging
import os
from typing import BinaryIO

from storage import layout
from storage.digest import Digest, parse_digest
from storage.errors import (
    FolderNotEmpty,
    ImageError,
    NotAnImage,
    TooLarge,
    UnsafePath,
)
from storage.files import (
    fsync_folder,
    hash_stream,
    open_inside,
    write_atomically,
    write_blob_atomically,
)
from storage.source import image_layout_version

log = logging.getLogger(__name__)


def _is_empty(path: str) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


class DirImageDestination:
    """An image folder opened for writing.

    Opening creates the folder if needed and marks a new one with a `version`
    file. A folder that already holds an image is opened as it is: nothing is
    deleted until `remove_unused` is called after the new manifest is in place.
    A non-empty folder that holds no image is refused with `FolderNotEmpty` and
    left untouched.

    `put_blob` is safe to call from several threads, and processes, at once.
    Writers of manifests and signatures should hold the folder's `ImageLock`.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise NotAnImage(f"destination {self.path} exists and is not a folder")

        os.makedirs(self.path, exist_ok=True)
        if _is_empty(self.path):
            write_atomically(layout.version_path(self.path), layout.version_text("1.1"))
            fsync_folder(self.path)
        try:
            self.layout_version = image_layout_version(self.path)
        except (NotAnImage, UnsafePath, TooLarge):
            raise FolderNotEmpty(
                f"destination {self.path} is not empty and holds no dir: image; "
                "refusing to write into it"
            ) from None

    def __repr__(self) -> str:
        return f"DirImageDestination({self.path!r})"

    def blob_path(self, digest: "str | Digest") -> str:
        """Where this destination keeps blob `digest` (never a legacy .tar name)."""
        return layout.blob_path(self.path, parse_digest(digest))

    def has_blob(self, digest: "str | Digest", size: int | None = None) -> bool:
        """Whether blob `digest` is present with the right size and content.

        A present blob with wrong bytes counts as absent; the next `put_blob`
        replaces it.
        """
        digest = parse_digest(digest)
        path = self.blob_path(digest)
        try:
            if size is not None and os.stat(path).st_size != size:
                return False
            with open_inside(self.path, path, f"blob {digest}") as file:
                hash_stream(file, digest, size)
        except (FileNotFoundError, ImageError):
            return False
        return True

    def put_blob(
        self, digest: "str | Digest", stream: BinaryIO, size: int | None = None
    ) -> int:
        """Store blob `digest` from `stream`; returns its size in bytes.

        The bytes are hashed as they stream into a temporary file in this folder;
        the file is renamed into place only when size and digest match, after an
        fsync. On any failure nothing is left behind.
        """
        digest = parse_digest(digest)
        return write_blob_atomically(self.blob_path(digest), digest, stream, size)

    def put_manifest(
        self,
        data: bytes,
        instance: "str | Digest | None" = None,
        layout_version: str | None = None,
    ) -> None:
        """Write the top-level manifest, or the manifest of list instance `instance`.

        Writing the top-level manifest is the commit point of a copy, so the folder
        is synced afterwards to make every earlier rename durable with it. With
        `layout_version`, the version file is brought up to date just before.
        """
        digest = parse_digest(instance) if instance is not None else None
        if layout_version is not None:
            self.put_version(layout_version)
        write_atomically(layout.manifest_path(self.path, digest), data)
        if digest is None:
            fsync_folder(self.path)

    def put_signatures(
        self, signatures: list[bytes], instance: "str | Digest | None" = None
    ) -> None:
        """Write `signatures` as signature-1..N and remove any numbered beyond N."""
        digest = parse_digest(instance) if instance is not None else None
        for number, signature in enumerate(signatures, start=1):
            path = layout.signature_path(self.path, number, digest)
            write_atomically(path, signature)

        number = len(signatures) + 1
        while True:
            stale = layout.signature_path(self.path, number, digest)
            if not os.path.lexists(stale):
                break
            os.unlink(stale)
            number += 1

    def put_version(self, version: str) -> None:
        """Record layout `version` ("1.1" or "1.2") unless it is already recorded."""
        if version not in (layout.VERSION_1_1, layout.VERSION_1_2):
            raise ValueError(f"cannot write layout version {version!r}")
        if self.layout_version != version:
            write_atomically(
                layout.version_path(self.path), layout.version_text(version)
            )
            self.layout_version = version

    def remove_unused(self, keep: "set[str]") -> list[str]:
        """Remove layout files that belong to no digest in `keep`; returns their names.

        `keep` holds the digests of the new image: its blobs and list instances. A
        blob or instance file named by one of them stays (legacy `.tar` names never
        do: the new image has its blobs under current names). Temporary files left
        by an earlier killed copy go too. Anything that is not a layout file is left
        alone. Call it only after the new top-level manifest is in place, holding
        the folder's lock.
        """
        keep_stems = {layout.digest_stem(parse_digest(digest)) for digest in keep}
        removed = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not _is_unused(entry.name, keep_stems):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    continue
                os.unlink(entry.path)
                removed.append(entry.name)
        if removed:
            log.debug("removed %d unused files from %s", len(removed), self.path)
        return sorted(removed)


def _is_unused(name: str, keep_stems: "set[str]") -> bool:
    kind = layout.layout_kind(name)
    if kind == "legacy-blob":
        return True
    if kind == "temporary":
        # Only our own: containers/image's may belong to a skopeo running now.
        return name.startswith(layout.TEMP_PREFIX)
    if kind in ("blob", "instance-manifest", "instance-signature"):
        return name.split(".", 1)[0] not in keep_stems
    return False
