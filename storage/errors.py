"""The errors of the dir: layout.

Every error raised on purpose by this package derives from `ImageError`. Each
subclass also derives from the builtin that fits it best, so callers that only
know the builtins still catch the right thing. Messages name the file or digest,
what was expected and what was found.
"""

import errno


class ImageError(Exception):
    """Root of the errors raised by the storage package."""


class InvalidDigest(ImageError, ValueError):
    """A digest string is malformed or uses an unsupported algorithm."""


class InvalidManifest(ImageError, ValueError):
    """A manifest cannot be parsed, or is of a kind this package does not know."""


class NotAnImage(ImageError, ValueError):
    """A folder does not hold an image in the dir: layout."""


class FolderNotEmpty(ImageError, FileExistsError):
    """A destination folder holds files but no image, so it is not ours to write."""


class BlobNotFound(ImageError, FileNotFoundError):
    """A blob, manifest or signature the image refers to is not in the folder."""


class DigestMismatch(ImageError, ValueError):
    """Bytes do not hash to the digest that names them."""


class SizeMismatch(ImageError, ValueError):
    """A blob has a different length from the one the manifest records."""


class TooLarge(ImageError, ValueError):
    """A manifest or signature exceeds the size this package agrees to read."""


class UnsafePath(ImageError, ValueError):
    """A file of the image resolves to a place outside the image folder."""


class ImageBusy(ImageError, BlockingIOError):
    """Another process holds the lock on an image folder."""


# Errors that a second attempt can reasonably cure: flaky disks, NFS servers that
# restart, interrupted calls. Everything else (missing files, permissions, full
# disks) fails the same way every time, so retrying only delays the report.
TRANSIENT_ERRNOS = frozenset(
    code
    for code in (
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOLCK,
    )
)


def is_transient(error: BaseException) -> bool:
    """Tell whether `error` is an I/O failure worth retrying.

    Errors of this package are never transient: a wrong digest or a missing blob
    stays wrong. Plain `OSError`s are transient when their errno says so.
    """
    if isinstance(error, ImageError):
        return False
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS
