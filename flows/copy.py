"""The copy_image and verify_image flows."""

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

import storage
import tasks
from flows import runners
from flows.bounded import run_bounded
from flows.parameters import FolderPath, Jitter, Parallel, Retries, Runner, Seconds
from flows.progress import ProgressTracker
from storage.manifest import BlobRef
from storage.transfer import COPIED, REUSED, BlobTransfer

# Blobs below this size travel in batches (see tasks.copy_blobs); above it, each
# has its own task, so a failure names it and its retries repeat only it.
SMALL_BLOB_SIZE = 4 * 1024 * 1024
MAX_BATCH_BLOBS = 256
MIB = 1024 * 1024


class ImageCorrupt(storage.ImageError, ValueError):
    """An image folder is missing files or holds files with the wrong content."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        first = problems[0] if problems else "no details"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{path} is damaged: {first}{more}")

    def __reduce__(self):
        # Pickling keeps only the message by default, and __init__ needs the parts.
        return (type(self), (self.path, self.problems))


@dataclass
class CopySummary:
    """The outcome of one copy, as `copy_image` returns it."""

    source: str
    destination: str
    manifest_digest: str
    media_type: str
    blobs_copied: int
    blobs_reused: int
    bytes_copied: int
    bytes_reused: int
    signatures: int
    removed_files: list[str]
    transfer_seconds: float
    seconds: float
    transfers: list[BlobTransfer] = field(default_factory=list, repr=False)

    def as_dict(self, with_transfers: bool = False) -> dict:
        data = asdict(self)
        if not with_transfers:
            data.pop("transfers")
        return data


@dataclass
class VerifyReport:
    """The outcome of `verify_image`: an empty `problems` list means intact."""

    path: str
    manifest_digest: str
    blobs_checked: int
    bytes_checked: int
    seconds: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def image_path(location: str) -> str:
    """An absolute folder path from `location`, accepting skopeo's `dir:` prefix."""
    if location.startswith("dir:"):
        location = location[len("dir:") :]
    if not location:
        raise ValueError("an image path must not be empty")
    return os.path.abspath(location)


def check_distinct(source: str, destination: str) -> None:
    """Refuse a copy of an image onto itself or into a folder inside its source.

    Paths are compared after resolving links, and folders by device and inode
    too, since a bind mount gives one folder two unrelated paths.
    """
    real_source = os.path.realpath(source)
    real_destination = os.path.realpath(destination)
    source_identity = _identity(real_source)
    folder = real_destination
    while True:
        same = folder == real_source or (
            source_identity is not None and _identity(folder) == source_identity
        )
        if same and folder == real_destination:
            raise ValueError(f"refusing to copy {source} onto itself")
        if same:
            raise ValueError(
                f"refusing to copy {source} into {destination}, a folder inside it"
            )
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def batch_blobs(blobs: list[BlobRef], parallel: int) -> list[list[BlobRef]]:
    """Split blobs into work units: one per large blob, batches of small ones.

    Large blobs come first and biggest first, so the longest copies start early;
    small blobs are spread over up to `parallel` batches so they still overlap.
    """
    large = [b for b in blobs if b.size is None or b.size >= SMALL_BLOB_SIZE]
    small = [b for b in blobs if b.size is not None and b.size < SMALL_BLOB_SIZE]
    large.sort(key=lambda blob: -(blob.size or 0))

    units = [[blob] for blob in large]
    if small:
        count = max(min(parallel, len(small)), math.ceil(len(small) / MAX_BATCH_BLOBS))
        units += [small[start::count] for start in range(count)]
    return units


def _copy_task(retries: int, retry_delay: float, retry_jitter: float, single: bool):
    task = tasks.copy_blob if single else tasks.copy_blobs
    return tasks.with_retries(task, retries, retry_delay, retry_jitter)


def _transfer_table(transfers: list[BlobTransfer]) -> list[dict]:
    return [
        {
            "blob": transfer.digest,
            "size": transfer.size,
            "action": transfer.action,
            "seconds": round(transfer.seconds, 3),
            "worker": transfer.worker,
        }
        for transfer in transfers
    ]


def reuse_present_blobs(
    destination: str, blobs: list[BlobRef], parallel: int, task_runner=None
) -> list[BlobTransfer]:
    """The `reused` transfers of the `blobs` that `destination` holds intact.

    The files there at their recorded size are hashed in one task on `parallel`
    threads, on `task_runner` as for `copy_blobs_bounded`; with none there, no
    task runs.
    """
    present = storage.present_blobs(destination, blobs)
    if not present:
        return []
    # TODO: On a Dask cluster one worker hashes every present blob; splitting the
    # check by bytes would spread the rerun of a large image over the workers.
    future = runners.submit(
        task_runner,
        tasks.reuse_blobs,
        destination=destination,
        blobs=present,
        workers=parallel,
    )
    return future.result()


def copy_blobs_bounded(
    source: str,
    destination: str,
    blobs: list[BlobRef],
    parallel: int,
    retries: int,
    retry_delay: float,
    retry_jitter: float,
    description: str,
    task_runner=None,
) -> list[BlobTransfer]:
    """Copy `blobs` with at most `parallel` tasks in flight; returns every transfer.

    The blobs that `destination` already has at their size are hashed first, all
    in one task on `parallel` threads; only the others get copy tasks, so a rerun
    over a complete destination records one task run instead of one per blob.
    The tasks go to `task_runner` (from `runners.opened_runner`), or to the
    flow's own task runner when it is None.
    """
    single_task = _copy_task(retries, retry_delay, retry_jitter, single=True)
    batch_task = _copy_task(retries, retry_delay, retry_jitter, single=False)
    total = sum(blob.size or 0 for blob in blobs)
    tracker = ProgressTracker(total, len(blobs), description)
    transfers: list[BlobTransfer] = []

    reused = reuse_present_blobs(destination, blobs, parallel, task_runner)
    if reused:
        transfers.extend(reused)
        tracker.advance(len(reused), sum(transfer.size for transfer in reused))
        # A damaged file is hashed once more by its copy before it is replaced:
        # rare enough not to need a way to skip that check.
        reused_digests = {transfer.digest for transfer in reused}
        blobs = [blob for blob in blobs if blob.digest not in reused_digests]

    def submit(unit: list[BlobRef]):
        if len(unit) == 1:
            blob = unit[0]
            return runners.submit(
                task_runner,
                single_task,
                source=source,
                destination=destination,
                digest=blob.digest,
                size=blob.size,
                optional=blob.optional,
            )
        return runners.submit(
            task_runner, batch_task, source=source, destination=destination, blobs=unit
        )

    def record(unit: list[BlobRef], result) -> None:
        done = [result] if isinstance(result, BlobTransfer) else list(result)
        transfers.extend(done)
        tracker.advance(len(done), sum(transfer.size for transfer in done))

    run_bounded(batch_blobs(blobs, parallel), submit, parallel, record)
    tracker.finish()
    return transfers


@flow(name="copy-image", persist_result=False)
def copy_image(
    source: FolderPath,
    destination: FolderPath,
    parallel: Parallel = 8,
    retries: Retries = 3,
    retry_delay: Seconds = 1.0,
    retry_jitter: Jitter = 0.5,
    remove_signatures: bool = False,
    platform: Annotated[str | None, Field(pattern=r"^[^/]+/[^/]+(/[^/]+)?$")] = None,
    runner: Runner = runners.THREAD,
) -> CopySummary:
    """Copy a container image between two dir: folders, verified and resumable.

    Blobs already in the destination are kept when their bytes match their
    digest; the rest are copied in parallel, each verified before it is renamed
    into place. The destination's previous image stays readable until the new
    top-level manifest replaces it; only then are its unused files removed.

    Args:
        source: Folder of the image to copy (a `dir:` prefix is accepted).
        destination: Folder to copy into: new, empty, or holding an image.
        parallel: How many blob copies may run at once.
        retries: How often a blob copy is retried after a transient I/O error.
        retry_delay: Seconds before the first retry; doubled for each next one.
        retry_jitter: Random spread of retry delays, as a fraction of the delay.
        remove_signatures: Leave signatures out of the copy.
        platform: `os/arch[/variant]` to copy one instance of a multi-platform
            image as a single image; by default every instance is copied.
        runner: Where the blob copies run: `thread` (this process), `dask` (a
            temporary local Dask cluster) or `dask://HOST:PORT` (a running one,
            whose workers see `source` and `destination` at the same paths).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    source, destination = image_path(source), image_path(destination)
    check_distinct(source, destination)
    runners.check_runner(runner)
    storage.DirImageSource(source)

    plan = tasks.with_retries(tasks.plan_image, retries, retry_delay, retry_jitter)(
        source, platform
    )
    storage.DirImageDestination(destination)
    # The lock stays in this process; tasks elsewhere only write verified blobs.
    with storage.ImageLock(destination):
        transfer_started = time.perf_counter()
        with runners.opened_runner(runner) as task_runner:
            transfers = copy_blobs_bounded(
                source,
                destination,
                list(plan.blobs),
                parallel,
                retries,
                retry_delay,
                retry_jitter,
                f"Copying {len(plan.blobs)} blobs into {destination}",
                task_runner,
            )
        transfer_seconds = time.perf_counter() - transfer_started

        signatures, removed = commit_image(
            source,
            destination,
            plan,
            remove_signatures,
            retries=retries,
            retry_delay=retry_delay,
            retry_jitter=retry_jitter,
        )

    copied = [t for t in transfers if t.action == COPIED]
    reused = [t for t in transfers if t.action == REUSED]
    summary = CopySummary(
        source=source,
        destination=destination,
        manifest_digest=plan.manifest_digest,
        media_type=plan.media_type,
        blobs_copied=len(copied),
        blobs_reused=len(reused),
        bytes_copied=sum(t.size for t in copied),
        bytes_reused=sum(t.size for t in reused),
        signatures=signatures,
        removed_files=removed,
        transfer_seconds=round(transfer_seconds, 3),
        seconds=round(time.perf_counter() - started, 3),
        transfers=transfers,
    )
    _report_copy(logger, summary)
    return summary


def commit_image(
    source: str,
    destination: str,
    plan,
    remove_signatures: bool = False,
    retries: int = 0,
    retry_delay: float = 1.0,
    retry_jitter: float = 0.0,
) -> tuple[int, list[str]]:
    """Write what follows the blobs of a copy, the top-level manifest as commit.

    Every signature is read first, with `retries` for transient errors as the
    blob copies have them, so an unreadable one fails the copy before anything
    is written. Then the instance manifests, and the new signatures staged in
    temporary files. Then the top-level manifest with the layout version, the
    commit point, and right after it the staged signatures are renamed into
    place. Signatures sign a manifest: in place before the commit, they would
    replace the previous image's own while its manifest still stands, and a
    copy killed then would lose them. Last, the previous image's unused files
    are removed, temporary files of a killed copy among them. Every blob must be
    in place; the caller holds the lock. Returns the number of top-level
    signatures and the names of removed files.
    """
    read = tasks.with_retries(tasks.get_signatures, retries, retry_delay, retry_jitter)
    signatures = _read_signatures(source, plan, remove_signatures, read)
    for instance in plan.instances:
        tasks.put_manifest(destination, instance.data, instance.digest)
    # TODO: A commit that fails after this leaves the staged files in place until
    # the next copy's cleanup or a delete removes them.
    staged = tasks.stage_signatures(destination, list(signatures.items()))
    tasks.put_manifest(destination, plan.manifest, None, plan.layout_version)
    tasks.install_signatures(destination, staged)
    removed = tasks.remove_unused(destination, sorted(plan.digests))
    return len(signatures[None]), removed


def _read_signatures(
    source, plan, remove_signatures: bool, read=tasks.get_signatures
) -> dict[str | None, list[bytes]]:
    """Top-level (key None) and per-instance signatures to write, by instance,
    each read with the task `read`."""

    def signatures_of(instance: str | None) -> list[bytes]:
        return [] if remove_signatures else read(source, instance)

    signatures = {None: signatures_of(plan.signature_instance)}
    for instance in plan.instances:
        signatures[instance.digest] = signatures_of(instance.digest)
    return signatures


def _report_copy(logger, summary: CopySummary) -> None:
    rate = summary.bytes_copied / MIB / max(summary.transfer_seconds, 1e-6)
    logger.info(
        "Copied %d blobs (%.1f MiB) and reused %d (%.1f MiB) in %.2f s: %.1f MiB/s",
        summary.blobs_copied,
        summary.bytes_copied / MIB,
        summary.blobs_reused,
        summary.bytes_reused / MIB,
        summary.transfer_seconds,
        rate,
    )
    create_table_artifact(
        table=_transfer_table(summary.transfers),
        description=(
            f"**{summary.source}** to **{summary.destination}**: "
            f"{summary.blobs_copied} blobs copied "
            f"({summary.bytes_copied / MIB:.1f} MiB), "
            f"{summary.blobs_reused} reused ({summary.bytes_reused / MIB:.1f} MiB), "
            f"{summary.signatures} signatures, "
            f"manifest {summary.manifest_digest}, {summary.seconds:.2f} s."
        ),
    )


def blob_bytes(path: str, blobs: tuple[BlobRef, ...]) -> int:
    """Bytes of `blobs` in the image at `path`: the sizes the manifests record or,
    where they record none (schema 1), the sizes of the files."""
    source = storage.DirImageSource(path)
    total = 0
    for blob in blobs:
        if blob.size is not None:
            total += blob.size
            continue
        try:
            total += os.path.getsize(source.blob_path(blob.digest))
        except OSError:  # BlobNotFound too: a missing blob is already a problem
            pass
    return total


@flow(name="verify-image", persist_result=False)
def verify_image(
    path: FolderPath, parallel: Parallel = 8, runner: Runner = runners.THREAD
) -> VerifyReport:
    """Hash every blob of an image in parallel and report what is missing or corrupt.

    Args:
        path: Folder of the image to check (a `dir:` prefix is accepted).
        parallel: How many blobs may be hashed at once.
        runner: Where the hashing runs, as for `copy_image`.

    Raises:
        ImageCorrupt: Something is missing or corrupt; `problems` lists it all.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    path = image_path(path)
    runners.check_runner(runner)
    plan = tasks.plan_image(path, None, strict=False)
    problems = list(plan.problems)

    def record(unit: list[BlobRef], result: list[str | None]) -> None:
        problems.extend(problem for problem in result if problem)

    with runners.opened_runner(runner) as task_runner:

        def submit(unit: list[BlobRef]):
            return runners.submit(
                task_runner, tasks.verify_blobs, path=path, blobs=unit
            )

        units = batch_blobs(list(plan.blobs), parallel)
        run_bounded(units, submit, parallel, record)
    report = VerifyReport(
        path=path,
        manifest_digest=plan.manifest_digest,
        blobs_checked=len(plan.blobs),
        bytes_checked=blob_bytes(path, plan.blobs),
        seconds=round(time.perf_counter() - started, 3),
        problems=problems,
    )
    if problems:
        for problem in problems:
            logger.error("%s", problem)
        raise ImageCorrupt(path, problems)
    logger.info(
        "Verified %d blobs (%.1f MiB) of %s in %.2f s",
        report.blobs_checked,
        report.bytes_checked / MIB,
        path,
        report.seconds,
    )
    return report
