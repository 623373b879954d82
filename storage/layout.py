"""Where each file of a dir: image lives, and which files belong to the layout.

The layout, as containers/image writes it:

- `version`: `Directory Transport Version: 1.1` and a newline (1.2 when some
  digest is not sha256; 1.0 or no file at all in images from 2016 and 2017).
- `manifest.json`: the top-level manifest; `<hex>.manifest.json` for each
  instance of a manifest list or image index.
- blobs (config and layers): named by the bare hex of a sha256 digest, or
  `<algorithm>-<hex>` for other algorithms; `<hex>.tar` in layouts before 1.1.
- `signature-1`, `signature-2`, ...; `<hex>.signature-N` for instances.

Every helper checks its digest again (a `Digest` or its text) before it builds a
path, so no caller can smuggle a path through, however its digest was made.
"""

import os
import re

from storage.digest import HEX_LENGTHS, Digest, parse_digest
from storage.errors import BlobNotFound, NotAnImage, TooLarge
from storage.files import TEMP_PREFIX, read_capped

VERSION_FILE = "version"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".dirimage.lock"
# containers/image names its own temporary blob files so; a killed skopeo leaves them.
FOREIGN_TEMP_PREFIX = "dir-put-blob"

VERSION_PREFIX = "Directory Transport Version: "
VERSION_1_0 = "1.0"
VERSION_1_1 = "1.1"
VERSION_1_2 = "1.2"
LEGACY_2016 = "2016"
KNOWN_VERSIONS = (VERSION_1_0, VERSION_1_1, VERSION_1_2)
# The known lines are 33 bytes; a version file much longer than that is not one.
VERSION_SIZE_LIMIT = 64


def version_text(version: str) -> bytes:
    """The exact content of the `version` file for `version`."""
    return f"{VERSION_PREFIX}{version}\n".encode()


def layout_version_for(digests) -> str:
    """The layout version a writer needs for an image with these digests."""
    if all(parse_digest(d).algorithm == "sha256" for d in digests):
        return VERSION_1_1
    return VERSION_1_2


def is_legacy(version: str) -> bool:
    """Whether `version` names blobs `<hex>.tar` (layouts of 2016 and 1.0)."""
    return version in (LEGACY_2016, VERSION_1_0)


def digest_stem(digest: "Digest | str") -> str:
    """The part of a file name that a digest contributes."""
    digest = parse_digest(digest)
    if digest.algorithm == "sha256":
        return digest.hex
    return f"{digest.algorithm}-{digest.hex}"


def version_path(root: str) -> str:
    return os.path.join(root, VERSION_FILE)


def lock_path(root: str) -> str:
    return os.path.join(root, LOCK_FILE)


def manifest_path(root: str, instance: "Digest | str | None" = None) -> str:
    if instance is None:
        return os.path.join(root, MANIFEST_FILE)
    return os.path.join(root, f"{digest_stem(instance)}.{MANIFEST_FILE}")


def blob_path(root: str, digest: "Digest | str", version: str = VERSION_1_1) -> str:
    if is_legacy(version):
        return os.path.join(root, f"{parse_digest(digest).hex}.tar")
    return os.path.join(root, digest_stem(digest))


def signature_path(
    root: str, number: int, instance: "Digest | str | None" = None
) -> str:
    """The path of signature `number`, counted from 1 as containers/image does."""
    if number < 1:
        raise ValueError(f"signature numbers start at 1, found {number}")
    if instance is None:
        return os.path.join(root, f"signature-{number}")
    return os.path.join(root, f"{digest_stem(instance)}.signature-{number}")


# Exactly the stems digest_stem produces: bare hex for sha256, algorithm-hex of the
# algorithm's own length otherwise. Anything looser would let remove_unused delete a
# foreign file such as `sha512-abc`.
_STEM = (
    "(?:"
    + "|".join(
        "[0-9a-f]{64}" if algorithm == "sha256" else f"{algorithm}-[0-9a-f]{{{length}}}"
        for algorithm, length in HEX_LENGTHS.items()
    )
    + ")"
)
_LAYOUT_NAMES = [
    ("version", re.compile(re.escape(VERSION_FILE))),
    ("manifest", re.compile(re.escape(MANIFEST_FILE))),
    ("lock", re.compile(re.escape(LOCK_FILE))),
    ("instance-manifest", re.compile(rf"{_STEM}\.manifest\.json")),
    ("blob", re.compile(_STEM)),
    ("legacy-blob", re.compile(r"[0-9a-f]{64}\.tar")),
    ("signature", re.compile(r"signature-[1-9][0-9]*")),
    ("instance-signature", re.compile(rf"{_STEM}\.signature-[1-9][0-9]*")),
    ("temporary", re.compile(rf"(?:{re.escape(TEMP_PREFIX)}|{FOREIGN_TEMP_PREFIX}).*")),
]


def layout_kind(name: str) -> str | None:
    """Which kind of layout file `name` is, or None for a file that is not ours.

    Used before deleting anything: a file with no kind is never removed.
    """
    for kind, pattern in _LAYOUT_NAMES:
        if pattern.fullmatch(name):
            return kind
    return None


def read_layout_version(root: str) -> str:
    """The layout version of the image in `root`.

    Returns one of `KNOWN_VERSIONS`, or `LEGACY_2016` when there is no version file
    but there is a manifest. Raises `NotAnImage` when the folder holds neither, or a
    version file this package does not understand, and `UnsafePath` when the
    version file leads outside `root` or is not a regular file (a FIFO would
    block). The message quotes the file only when it starts as a version line,
    so no other bytes are ever echoed.
    """
    path = version_path(root)
    expected = (
        f"expected {VERSION_PREFIX!r} followed by one of {', '.join(KNOWN_VERSIONS)}"
    )
    if os.path.isdir(path):
        raise NotAnImage(f"{path} is a folder; expected a {VERSION_FILE} file")
    try:
        content = read_capped(root, path, VERSION_FILE, VERSION_SIZE_LIMIT)
    except BlobNotFound:
        if os.path.isfile(manifest_path(root)):
            return LEGACY_2016
        raise NotAnImage(
            f"{root} is not a dir: image: it has neither {VERSION_FILE} nor "
            f"{MANIFEST_FILE}"
        ) from None
    except NotADirectoryError:
        raise NotAnImage(f"{root} is not a folder") from None
    except TooLarge:
        raise NotAnImage(
            f"{path} is larger than {VERSION_SIZE_LIMIT} bytes; {expected}"
        ) from None

    for version in KNOWN_VERSIONS:
        if content == version_text(version):
            return version
    if content.startswith(VERSION_PREFIX.encode()):
        raise NotAnImage(f"{path} holds {content!r}; {expected}")
    raise NotAnImage(
        f"{path} does not hold a version line ({len(content)} bytes); {expected}"
    )
