"""Prefect tasks, one per storage operation on a dir: image."""

from tasks.image import (
    copy_blob,
    copy_blobs,
    get_manifest,
    get_signatures,
    install_signatures,
    plan_image,
    put_manifest,
    put_signatures,
    remove_unused,
    retry_transient,
    reuse_blobs,
    stage_signatures,
    verify_blob,
    verify_blobs,
    with_retries,
)

__all__ = [
    "copy_blob",
    "copy_blobs",
    "get_manifest",
    "get_signatures",
    "install_signatures",
    "plan_image",
    "put_manifest",
    "put_signatures",
    "remove_unused",
    "retry_transient",
    "reuse_blobs",
    "stage_signatures",
    "verify_blob",
    "verify_blobs",
    "with_retries",
]
