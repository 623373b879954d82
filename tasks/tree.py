"""Prefect tasks over trees of images: find, plan a mirror, link, share, delete.

Thin like the tasks of `tasks.image`: plain arguments in, one storage call, a
plain picklable result out.
"""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.delete import DeleteResult
from storage.delete import delete_image as storage_delete_image
from storage.link import copy_blob_locally as storage_copy_blob_locally
from storage.link import link_blob as storage_link_blob
from storage.link import share_blob as storage_share_blob
from storage.manifest import BlobRef
from storage.transfer import BlobTransfer
from storage.tree import MirrorPlan
from storage.tree import find_images as storage_find_images
from storage.tree import plan_mirror as storage_plan_mirror

_SETTINGS = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="find_images", **_SETTINGS)
def find_images(root: str) -> list[str]:
    """List the image folders under `root`, relative to it, sorted.

    Raises:
        storage.NotAnImage: `root` exists and is not a folder.
    """
    get_run_logger().info("Finding images under %s", root)
    return storage_find_images(root)


@task(name="plan_mirror", task_run_name="plan_mirror-{relative}", **_SETTINGS)
def plan_mirror(source: str, destination: str, relative: str) -> MirrorPlan:
    """Plan the copy of image `source` to `destination`, noting if it is needed.

    Args:
        source: Path of the source image folder.
        destination: Path the image is mirrored to.
        relative: The image's path relative to the roots, for names and reports.

    Returns:
        The image's plan, and whether the destination already holds it.

    Raises:
        storage.ImageError: The source is not a readable image.
    """
    get_run_logger().info("Planning mirror of %s", relative)
    return storage_plan_mirror(source, destination, relative)


@task(name="link_blobs", task_run_name="link_blobs-{blobs[0].digest:.19}+", **_SETTINGS)
def link_blobs(
    donor: str,
    destination: str,
    blobs: list[BlobRef],
    verify_donor: bool = False,
    fallback_source: str | None = None,
) -> list[BlobTransfer]:
    """Make blobs of `destination` share the files of image folder `donor`.

    A reflink where the filesystem offers one, else a hard link; a copy when the
    two folders cannot share. Linking is cheap, so one task links many blobs.

    Args:
        donor: Image folder holding the blobs.
        destination: Image folder to place them in.
        blobs: The blobs to place.
        verify_donor: Hash each donor blob before linking to it.
        fallback_source: Image folder to copy a blob from when the donor lacks
            it or holds wrong bytes.

    Returns:
        One transfer per blob: linked, reused (already shared) or copied.

    Raises:
        storage.BlobNotFound: The donor lacks a blob and there is no fallback.
    """
    get_run_logger().info(
        "Linking %d blobs from %s into %s", len(blobs), donor, destination
    )
    return [
        storage_link_blob(
            donor,
            destination,
            b.digest,
            b.size,
            b.optional,
            verify_donor,
            fallback_source,
        )
        for b in blobs
    ]


@task(
    name="copy_blobs_locally",
    task_run_name="copy_blobs_locally-{blobs[0].digest:.19}+",
    **_SETTINGS,
)
def copy_blobs_locally(
    holder: str,
    destination: str,
    blobs: list[BlobRef],
    fallback_source: str | None = None,
) -> list[BlobTransfer]:
    """Copy blobs into `destination` from image folder `holder`, which has them.

    Args:
        holder: Image folder of the destination tree holding the blobs.
        destination: Image folder to place them in.
        blobs: The blobs to place.
        fallback_source: Image folder to copy a blob from when the holder lacks
            it or holds wrong bytes.

    Returns:
        One transfer per blob: copied locally, copied from the fallback, or
        reused (already in place and intact).

    Raises:
        storage.BlobNotFound: The holder lacks a blob and there is no fallback.
    """
    get_run_logger().info(
        "Copying %d blobs from %s into %s", len(blobs), holder, destination
    )
    return [
        storage_copy_blob_locally(
            holder, destination, b.digest, b.size, b.optional, fallback_source
        )
        for b in blobs
    ]


@task(
    name="share_blobs", task_run_name="share_blobs-{blobs[0].digest:.19}+", **_SETTINGS
)
def share_blobs(
    donor: str, destination: str, blobs: list[BlobRef]
) -> list[BlobTransfer]:
    """Replace blob files of `destination` by links to the donor's, once hashed.

    For an image that already holds the blobs; the caller holds its lock.

    Args:
        donor: Image folder whose files the others should share.
        destination: Image folder whose files are replaced.
        blobs: The blobs to share.

    Returns:
        One transfer per blob: linked, reused (already one file), kept, or
        donor-damaged (the donor's file did not hash to its digest).
    """
    get_run_logger().info(
        "Sharing %d blobs of %s with %s", len(blobs), destination, donor
    )
    return [storage_share_blob(donor, destination, b.digest, b.size) for b in blobs]


@task(name="delete_image", **_SETTINGS)
def delete_image(path: str, wait: float = 0.0) -> DeleteResult:
    """Remove the layout files of the image in `path`, and the folder if empty.

    Returns:
        What was removed and which unknown entries were left in place.

    Raises:
        storage.NotAnImage: `path` does not hold an image; nothing was touched.
        storage.ImageBusy: Another dirimage process is writing the image.
    """
    get_run_logger().info("Deleting image %s", path)
    return storage_delete_image(path, wait)
