"""The dir: image layout of containers/image, in plain Python.

This package reads and writes images kept as folders: a manifest, one file per
blob named by its digest, numbered signature files and a version file. It uses
only the standard library and knows nothing of Prefect, so it can be used and
tested on its own.
"""

from storage.delete import DeleteResult, delete_image
from storage.destination import DirImageDestination
from storage.digest import Digest, digest_of, parse_digest
from storage.errors import (
    BlobNotFound,
    DigestMismatch,
    FolderNotEmpty,
    ImageBusy,
    ImageError,
    InvalidDigest,
    InvalidManifest,
    NotAnImage,
    SizeMismatch,
    TooLarge,
    UnsafePath,
    is_transient,
)
from storage.link import link_blob, link_file
from storage.lock import ImageLock
from storage.manifest import (
    BlobRef,
    Manifest,
    Platform,
    manifest_digest,
    parse_manifest,
)
from storage.plan import (
    ImagePlan,
    InstanceManifest,
    check_image,
    describe_image,
    plan_image,
    verify_blob,
)
from storage.source import DirImageSource
from storage.transfer import (
    BlobTransfer,
    present_blobs,
    reuse_intact_blobs,
    transfer_blob,
)
from storage.tree import MirrorPlan, find_images, holds_image, plan_mirror

__all__ = [
    "BlobNotFound",
    "BlobRef",
    "BlobTransfer",
    "DeleteResult",
    "Digest",
    "DigestMismatch",
    "DirImageDestination",
    "DirImageSource",
    "FolderNotEmpty",
    "ImageBusy",
    "ImageError",
    "ImageLock",
    "ImagePlan",
    "InstanceManifest",
    "InvalidDigest",
    "InvalidManifest",
    "Manifest",
    "MirrorPlan",
    "NotAnImage",
    "Platform",
    "SizeMismatch",
    "TooLarge",
    "UnsafePath",
    "check_image",
    "delete_image",
    "describe_image",
    "digest_of",
    "find_images",
    "holds_image",
    "is_transient",
    "link_blob",
    "link_file",
    "manifest_digest",
    "parse_digest",
    "parse_manifest",
    "plan_image",
    "plan_mirror",
    "present_blobs",
    "reuse_intact_blobs",
    "transfer_blob",
    "verify_blob",
]
