"""Writing an image into a dir: folder, without ever exposing a half-written file."""

import logging
import os
import stat
from typing import BinaryIO

from storage import layout
from storage.digest import Digest, parse_digest
from storage.errors import (
    BlobNotFound,
    FolderNotEmpty,
    ImageError,
    InvalidManifest,
    NotAnImage,
    TooLarge,
    UnsafePath,
)
from storage.files import (
    fsync_folder,
    hash_stream,
    open_inside,
    read_capped,
    remove_quietly,
    write_atomically,
    write_blob_atomically,
    write_temporary,
)
from storage.manifest import parse_manifest
from storage.plan import MAX_LIST_DEPTH
from storage.source import MANIFEST_SIZE_LIMIT, image_layout_version

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
        self.prepare_name_for(digest)
        return write_blob_atomically(self.blob_path(digest), digest, stream, size)

    def prepare_name_for(self, digest: "str | Digest") -> None:
        """Record layout 1.2 before a file named by a non-sha256 digest is stored.

        Only a folder at 1.1 is moved on: 1.2 names sha256 files as 1.1 does, so
        the previous image stays readable. A folder of the 1.0 or 2016 layout
        keeps its version until the commit (`put_manifest`), because its previous
        image needs the old names until then.
        """
        if parse_digest(digest).algorithm == "sha256":
            return
        if self.layout_version == layout.VERSION_1_1:
            self.put_version(layout.VERSION_1_2)

    def put_manifest(
        self,
        data: bytes,
        instance: "str | Digest | None" = None,
        layout_version: str | None = None,
    ) -> None:
        """Write the top-level manifest, or the manifest of list instance `instance`.

        Writing the top-level manifest is the commit point of a copy. The version
        file is brought to what the new image needs: 1.2 when a digest of it (its
        blobs and instances, read from the instance manifests already stored) is
        not sha256, else 1.1, or `layout_version` when that asks for more. A
        version that also reads the previous image is written before the
        manifest, any other after it, so a process killed in between leaves a
        folder that reads as the previous image or as the new one. The folder is
        synced afterwards to make every earlier rename durable with the commit.
        """
        if instance is not None:
            digest = parse_digest(instance)
            self.prepare_name_for(digest)
            write_atomically(layout.manifest_path(self.path, digest), data)
            return

        if layout_version not in (None, layout.VERSION_1_1, layout.VERSION_1_2):
            raise ValueError(f"cannot write layout version {layout_version!r}")
        # Another process may have moved the version on since this was opened.
        self.layout_version = layout.read_layout_version(self.path)
        needed = self._version_for(data, layout_version)
        # 1.2 names every sha256 file as 1.1 does, so moving 1.1 on to 1.2 keeps
        # the previous image readable and goes first. Any other change waits for
        # the new manifest: 1.0 and 2016 images keep layers as `.tar`, which 1.1
        # does not name, and a reader of 1.1 need not know `sha512-` names.
        if self.layout_version == layout.VERSION_1_1:
            self.put_version(needed)
        write_atomically(layout.manifest_path(self.path), data)
        fsync_folder(self.path)
        if self.layout_version != needed:
            self.put_version(needed)
            fsync_folder(self.path)

    def _version_for(self, data: bytes, requested: str | None) -> str:
        """The layout version the image of top-level manifest `data` needs."""
        digests = self._digests_of(data, depth=1)
        if digests is None:
            # Bytes that are no manifest tell nothing: keep what is recorded.
            deduced = (
                None if layout.is_legacy(self.layout_version) else self.layout_version
            )
        else:
            deduced = layout.layout_version_for(digests)
        if layout.VERSION_1_2 in (requested, deduced):
            return layout.VERSION_1_2
        return layout.VERSION_1_1

    def _digests_of(self, data: bytes, depth: int) -> list[str] | None:
        """Every digest the manifest `data` names, down through the instance
        manifests this folder holds; None when `data` is not a manifest."""
        try:
            manifest = parse_manifest(data)
        except InvalidManifest:
            return None
        digests = [blob.digest for blob in manifest.blobs]
        for entry in manifest.instances:
            digests.append(entry.digest)
            if depth >= MAX_LIST_DEPTH:
                continue
            path = layout.manifest_path(self.path, entry.digest)
            try:
                instance_data = read_capped(
                    self.path, path, f"manifest of {entry.digest}", MANIFEST_SIZE_LIMIT
                )
            except ImageError:
                continue
            digests += self._digests_of(instance_data, depth + 1) or []
        return digests

    def put_signatures(
        self, signatures: list[bytes], instance: "str | Digest | None" = None
    ) -> None:
        """Write `signatures` as signature-1..N and remove any numbered beyond N."""
        self.install_signatures(self.stage_signatures(signatures, instance), instance)

    def stage_signatures(
        self, signatures: list[bytes], instance: "str | Digest | None" = None
    ) -> list[str]:
        """Write `signatures` to temporary files in this folder, each flushed to
        disk; returns their names, in order, for `install_signatures`.

        Nothing of the image changes: a copy stages the new signatures before its
        commit and installs them right after it. On failure the files staged so
        far are removed; a process killed meanwhile leaves temporary files, which
        `remove_unused` removes.
        """
        if instance is not None:
            self.prepare_name_for(instance)
        staged: list[str] = []
        try:
            for number, signature in enumerate(signatures, start=1):
                path = write_temporary(self.path, signature, f"signature {number}")
                staged.append(os.path.basename(path))
        except BaseException:
            for name in staged:
                remove_quietly(os.path.join(self.path, name))
            raise
        return staged

    def install_signatures(
        self, staged: list[str], instance: "str | Digest | None" = None
    ) -> None:
        """Rename the files `stage_signatures` wrote into place as signature-1..N,
        in order, then remove the numbered signatures beyond N."""
        digest = parse_digest(instance) if instance is not None else None
        sources = [self._staged_path(name) for name in staged]
        for number, source in enumerate(sources, start=1):
            os.replace(source, layout.signature_path(self.path, number, digest))

        number = len(sources) + 1
        while True:
            stale = layout.signature_path(self.path, number, digest)
            if not os.path.lexists(stale):
                break
            os.unlink(stale)
            number += 1
        fsync_folder(self.path)

    def _staged_path(self, name: str) -> str:
        """The path of staged file `name`, which must be a temporary file of ours
        directly in this folder: the name comes from the caller."""
        if (
            not isinstance(name, str)
            or os.path.basename(name) != name
            or not name.startswith(layout.TEMP_PREFIX)
            or layout.layout_kind(name) != "temporary"
        ):
            raise UnsafePath(f"{name!r} is not a staged file of {self.path}")
        path = os.path.join(self.path, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise BlobNotFound(f"staged signature {path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"staged signature {path} is not a regular file")
        return path

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
