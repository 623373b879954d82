"""One Prefect task per storage operation on a dir: image.

Tasks are thin: plain arguments in (paths as str, digests as str), one storage
call, a plain picklable result out, so they run the same on threads and on Dask
workers. Nothing is cached: every run looks at the folders as they are now.
The retry policy lives here (`with_retries`); a flow applies it with the counts
and delays of its run.
"""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

import storage
from storage.manifest import BlobRef
from storage.plan import ImagePlan
from storage.transfer import BlobTransfer

_SETTINGS = {"cache_policy": NO_CACHE, "persist_result": False}


def _run_name(operation: str):
    """A task run name: the operation, then the instance's digest or `top`."""

    def name(parameters: dict) -> str:
        return f"{operation}-{parameters.get('instance') or 'top'}"

    return name


def retry_transient(task, task_run, state) -> bool:
    """Retry condition: only I/O errors that a second attempt may cure.

    A digest mismatch, a missing blob or bad input fails at once.
    """
    error = state.data
    return isinstance(error, BaseException) and storage.is_transient(error)


def with_retries(task, retries: int, retry_delay: float, retry_jitter: float):
    """`task` with the retry policy a flow run chose: transient I/O errors only.

    Args:
        task: Any task of this package.
        retries: How often to retry; 0 for never.
        retry_delay: Seconds before the first retry, doubled for each next one.
        retry_jitter: Random spread of each delay, as a fraction of it.

    Returns:
        A copy of `task` with these options.
    """
    if retries <= 0:
        return task.with_options(retries=0)
    return task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(retry_delay),
        retry_jitter_factor=retry_jitter if retry_jitter > 0 else None,
        retry_condition_fn=retry_transient,
    )


@task(name="plan_image", **_SETTINGS)
def plan_image(
    source: str, platform: str | None = None, strict: bool = True
) -> ImagePlan:
    """Read the manifests of the image in `source` and list its unique blobs.

    Args:
        source: Path of the image folder.
        platform: `os/arch[/variant]` to plan one instance of a list, or None.
        strict: False to record damaged instance manifests in the plan's
            `problems` instead of failing; verification wants them all.

    Returns:
        The plan: manifests to write, blobs to copy, signature origin.

    Raises:
        storage.ImageError: The folder is not an image or a manifest is invalid.
    """
    get_run_logger().info("Planning copy of %s", source)
    return storage.plan_image(source, platform=platform, strict=strict)


@task(name="get_manifest", task_run_name=_run_name("get_manifest"), **_SETTINGS)
def get_manifest(source: str, instance: str | None = None) -> bytes:
    """Read the top-level manifest of `source`, or that of list instance `instance`.

    Raises:
        storage.BlobNotFound: The manifest file is missing.
        storage.TooLarge: The manifest is over the size limit.
    """
    get_run_logger().info("Reading manifest %s of %s", instance or "top", source)
    return storage.DirImageSource(source).get_manifest(instance)


@task(name="put_manifest", task_run_name=_run_name("put_manifest"), **_SETTINGS)
def put_manifest(
    destination: str,
    data: bytes,
    instance: str | None = None,
    layout_version: str | None = None,
) -> None:
    """Write a manifest into `destination` atomically.

    Args:
        destination: Path of the image folder.
        data: The manifest bytes, written unchanged.
        instance: Digest of a list instance, or None for the top-level manifest.
        layout_version: Layout version to record first, for the top-level write.
    """
    get_run_logger().info("Writing manifest %s to %s", instance or "top", destination)
    destination_image = storage.DirImageDestination(destination)
    destination_image.put_manifest(data, instance, layout_version)


@task(name="get_signatures", task_run_name=_run_name("get_signatures"), **_SETTINGS)
def get_signatures(source: str, instance: str | None = None) -> list[bytes]:
    """Read the signatures of `source` (or of list instance `instance`), in order."""
    get_run_logger().info("Reading signatures %s of %s", instance or "top", source)
    return storage.DirImageSource(source).get_signatures(instance)


@task(name="put_signatures", task_run_name=_run_name("put_signatures"), **_SETTINGS)
def put_signatures(
    destination: str, signatures: list[bytes], instance: str | None = None
) -> None:
    """Write `signatures` into `destination`, removing any numbered beyond them."""
    get_run_logger().info(
        "Writing %d signatures %s to %s",
        len(signatures),
        instance or "top",
        destination,
    )
    storage.DirImageDestination(destination).put_signatures(signatures, instance)


@task(name="stage_signatures", **_SETTINGS)
def stage_signatures(
    destination: str, signatures: list[tuple[str | None, list[bytes]]]
) -> list[tuple[str | None, list[str]]]:
    """Write a copy's signatures to temporary files in `destination`, flushed to
    disk, leaving the image as it is until `install_signatures`.

    Args:
        destination: Path of the image folder.
        signatures: (instance, signatures) pairs, instance None for the
            top-level signatures, else the digest of a list instance.

    Returns:
        The same pairs, with the names of the staged files for the bytes.
    """
    count = sum(len(instance_signatures) for _, instance_signatures in signatures)
    get_run_logger().info("Staging %d signatures in %s", count, destination)
    target = storage.DirImageDestination(destination)
    return [
        (instance, target.stage_signatures(instance_signatures, instance))
        for instance, instance_signatures in signatures
    ]


@task(name="install_signatures", **_SETTINGS)
def install_signatures(
    destination: str, staged: list[tuple[str | None, list[str]]]
) -> None:
    """Rename the signatures `stage_signatures` wrote into place, per instance,
    and remove the numbered ones beyond each new count.

    Raises:
        storage.UnsafePath: A name is not a temporary file of `destination`.
        storage.BlobNotFound: A staged file is gone.
    """
    get_run_logger().info("Installing the staged signatures in %s", destination)
    target = storage.DirImageDestination(destination)
    for instance, names in staged:
        target.install_signatures(names, instance)


@task(name="copy_blob", task_run_name="copy_blob-{digest:.19}", **_SETTINGS)
def copy_blob(
    source: str,
    destination: str,
    digest: str,
    size: int | None = None,
    optional: bool = False,
) -> BlobTransfer:
    """Make blob `digest` present and intact in `destination`, copying if needed.

    Opens the source blob and streams it into the destination inside this one
    task: open files never cross a task boundary.

    Args:
        source: Path of the source image folder.
        destination: Path of the destination image folder.
        digest: The blob's digest, `algorithm:hex`.
        size: The size the manifest records, or None when it records none.
        optional: True for non-distributable layers, which may be absent.

    Returns:
        What was done (copied, reused or absent), bytes and seconds.

    Raises:
        storage.BlobNotFound: The source has no such blob.
        storage.DigestMismatch: The source bytes do not hash to `digest`.
        storage.SizeMismatch: The source blob is not `size` bytes long.
    """
    get_run_logger().info("Copying blob %s (%s bytes)", digest, size)
    return storage.transfer_blob(source, destination, digest, size, optional)


@task(name="copy_blobs", task_run_name="copy_blobs-{blobs[0].digest:.19}+", **_SETTINGS)
def copy_blobs(
    source: str, destination: str, blobs: list[BlobRef]
) -> list[BlobTransfer]:
    """Copy several small blobs in one task, one after the other.

    Each task run costs the Prefect server tens of milliseconds, more than copying
    a small layer, so small blobs travel in batches.
    """
    get_run_logger().info("Copying %d small blobs", len(blobs))
    return [
        storage.transfer_blob(source, destination, b.digest, b.size, b.optional)
        for b in blobs
    ]


@task(
    name="reuse_blobs", task_run_name="reuse_blobs-{blobs[0].digest:.19}+", **_SETTINGS
)
def reuse_blobs(
    destination: str, blobs: list[BlobRef], workers: int
) -> list[BlobTransfer]:
    """Hash the blobs `destination` already has, `workers` at once, in one task.

    Returns a `reused` transfer for each that is intact. The others are left
    for their own copies, which replace a damaged file and retry a failed read;
    a rerun over a complete destination then records one task run, not one per
    blob.
    """
    get_run_logger().info(
        "Checking %d blobs already in %s on %d threads",
        len(blobs),
        destination,
        min(workers, len(blobs)),
    )
    return storage.reuse_intact_blobs(destination, blobs, workers)


@task(name="verify_blob", task_run_name="verify_blob-{digest:.19}", **_SETTINGS)
def verify_blob(
    path: str, digest: str, size: int | None = None, optional: bool = False
) -> str | None:
    """Hash blob `digest` of the image at `path`; returns what is wrong, or None."""
    get_run_logger().info("Verifying blob %s of %s", digest, path)
    return storage.verify_blob(path, digest, size, optional)


@task(
    name="verify_blobs",
    task_run_name="verify_blobs-{blobs[0].digest:.19}+",
    **_SETTINGS,
)
def verify_blobs(path: str, blobs: list[BlobRef]) -> list[str | None]:
    """Hash several small blobs in one task; one problem (or None) per blob."""
    get_run_logger().info("Verifying %d blobs of %s", len(blobs), path)
    return [storage.verify_blob(path, b.digest, b.size, b.optional) for b in blobs]


@task(name="remove_unused", **_SETTINGS)
def remove_unused(destination: str, keep: list[str]) -> list[str]:
    """Remove layout files of `destination` named by no digest in `keep`."""
    get_run_logger().info("Removing files of the previous image in %s", destination)
    return storage.DirImageDestination(destination).remove_unused(set(keep))
