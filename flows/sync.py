"""The sync_images flow: mirror every image under one root to another, and the
verify_images flow: check every image under a root.

One flow run covers the whole tree (a flow run costs about a second, a task tens
of milliseconds). The blobs of all images are planned together, so a blob that
several images share is read from the source once: it is copied into the first
image that needs it, and the others get it from there.
"""

import os
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

import storage
import tasks
from flows import runners
from flows.bounded import run_bounded
from flows.copy import (
    MAX_BATCH_BLOBS,
    MIB,
    ImageCorrupt,
    Jitter,
    Parallel,
    Retries,
    Runner,
    Seconds,
    VerifyReport,
    _copy_task,
    batch_blobs,
    blob_bytes,
    commit_image,
    image_path,
)
from flows.progress import ProgressTracker
from storage.manifest import BlobRef
from storage.transfer import COPIED, REUSED, BlobTransfer
from storage.tree import MirrorPlan
from tasks import tree as tree_tasks

COPIED_IMAGE, SKIPPED, FAILED, PRUNED = "copied", "skipped", "failed", "pruned"


@dataclass
class ImageOutcome:
    """What a sync did to one image, named by its path relative to the roots.

    `from_source` counts blobs read from the source image; `shared` those placed
    from another image of the destination (linked, or copied locally); `reused`
    those already there. `seconds` adds up the image's own work, which ran
    alongside the other images', so the sum over images exceeds the wall time.
    """

    image: str
    status: str
    manifest_digest: str = ""
    blobs_from_source: int = 0
    bytes_from_source: int = 0
    blobs_shared: int = 0
    bytes_shared: int = 0
    blobs_reused: int = 0
    bytes_reused: int = 0
    seconds: float = 0.0
    error: str | None = None
    left_files: list[str] = field(default_factory=list)

    def add(self, transfer: BlobTransfer, from_source: bool) -> None:
        self.seconds += transfer.seconds
        if transfer.action == REUSED:
            self.blobs_reused += 1
            self.bytes_reused += transfer.size
        elif transfer.action == COPIED and from_source:
            self.blobs_from_source += 1
            self.bytes_from_source += transfer.size
        elif transfer.action != "absent":
            self.blobs_shared += 1
            self.bytes_shared += transfer.size

    def fail(self, error: BaseException) -> None:
        if self.status != FAILED:
            self.status = FAILED
            self.error = _one_line(error)


@dataclass
class SyncSummary:
    """The outcome of `sync_images`: one `ImageOutcome` per image, sorted by path."""

    source_root: str
    destination_root: str
    images: list[ImageOutcome]
    seconds: float

    def with_status(self, status: str) -> list[ImageOutcome]:
        return [image for image in self.images if image.status == status]

    @property
    def failed(self) -> list[ImageOutcome]:
        return self.with_status(FAILED)

    @property
    def bytes_from_source(self) -> int:
        return sum(image.bytes_from_source for image in self.images)

    def as_dict(self) -> dict:
        return asdict(self)


class SyncFailed(storage.ImageError, RuntimeError):
    """Some images of a sync failed; the others were synced. `summary` tells all."""

    def __init__(self, summary: SyncSummary):
        self.summary = summary
        failed = summary.failed
        names = ", ".join(f"{image.image} ({image.error})" for image in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        super().__init__(
            f"{len(failed)} of {len(summary.images)} images failed to sync: "
            f"{names}{more}"
        )

    def __reduce__(self):
        return (type(self), (self.summary,))


def check_roots(source_root: str, destination_root: str) -> None:
    """Refuse roots that are the same folder or lie one inside the other.

    A destination inside the source would be mirrored into itself on the next
    run; a source inside the destination would be pruned away.
    """
    real_source = os.path.realpath(source_root)
    real_destination = os.path.realpath(destination_root)
    common = os.path.commonpath([real_source, real_destination])
    if common in (real_source, real_destination):
        raise ValueError(
            f"refusing to sync {source_root} to {destination_root}: the roots "
            "must not be the same folder or lie one inside the other"
        )


def _below(root: str, relative: str) -> str:
    return os.path.normpath(os.path.join(root, relative))


@flow(name="sync-images", persist_result=False)
def sync_images(
    source_root: str,
    destination_root: str,
    parallel: Parallel = 8,
    retries: Retries = 3,
    retry_delay: Seconds = 1.0,
    retry_jitter: Jitter = 0.5,
    prune: bool = False,
    link: bool = False,
    runner: Runner = runners.THREAD,
) -> SyncSummary:
    """Mirror every image folder under one root to the same path under another.

    An image the destination already holds unchanged (same manifests and
    signatures, every blob present at its size) is skipped without writing
    anything. The others are copied together: each blob is read from the source
    once, however many images share it, and every image is committed as
    `copy_image` commits it. One image failing does not stop the others.

    Args:
        source_root: Folder holding the images, at any depth (`dir:` accepted).
        destination_root: Folder to mirror them into; created when missing.
        parallel: How many blob copies may run at once.
        retries: How often a blob copy is retried after a transient I/O error.
        retry_delay: Seconds before the first retry; doubled for each next one.
        retry_jitter: Random spread of retry delays, as a fraction of the delay.
        prune: Delete images under the destination root that the source root no
            longer has (only their layout files; anything else stays).
        link: Let identical blobs of different destination images share storage:
            a reflink where the filesystem supports it, else a hard link.
        runner: Where the blob copies and links run, as for `copy_image`.

    Returns:
        One outcome per image: copied, skipped, failed (with the error) or pruned.

    Raises:
        SyncFailed: At least one image failed, after all others were synced.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    source_root = image_path(source_root)
    destination_root = image_path(destination_root)
    check_roots(source_root, destination_root)
    runners.check_runner(runner)
    if not os.path.isdir(source_root):
        raise storage.NotAnImage(f"source root {source_root} is not a folder")

    relatives = tree_tasks.find_images(source_root)
    outcomes = {
        relative: ImageOutcome(relative, COPIED_IMAGE) for relative in relatives
    }
    mirrors = _plan_mirrors(
        source_root, destination_root, relatives, parallel, outcomes
    )
    for mirror in mirrors:
        outcomes[mirror.relative].manifest_digest = mirror.plan.manifest_digest
        if mirror.current:
            outcomes[mirror.relative].status = SKIPPED
    changed = [mirror for mirror in mirrors if not mirror.current]
    skipped = [mirror for mirror in mirrors if mirror.current]
    options = (parallel, retries, retry_delay, retry_jitter)

    with ExitStack() as locks:
        ready = _lock_destinations(changed, locks, outcomes)
        task_runner = locks.enter_context(runners.opened_runner(runner))
        _place_blobs(ready, skipped, outcomes, link, options, task_runner)
        for mirror in ready:
            outcome = outcomes[mirror.relative]
            if outcome.status == FAILED:
                continue
            commit_started = time.perf_counter()
            try:
                commit_image(mirror.source, mirror.destination, mirror.plan)
            except Exception as error:
                outcome.fail(error)
            outcome.seconds += time.perf_counter() - commit_started

    if prune:
        if relatives:
            _prune(destination_root, set(relatives), outcomes)
        else:
            logger.warning(
                "Not pruning %s: the source root %s holds no images at all",
                destination_root,
                source_root,
            )

    summary = SyncSummary(
        source_root=source_root,
        destination_root=destination_root,
        images=[outcomes[name] for name in sorted(outcomes)],
        seconds=round(time.perf_counter() - started, 3),
    )
    for outcome in summary.images:
        outcome.seconds = round(outcome.seconds, 3)
    _report_sync(logger, summary)
    if summary.failed:
        raise SyncFailed(summary)
    return summary


def _plan_mirrors(source_root, destination_root, relatives, parallel, outcomes):
    """Plan every image, bounded; a failure marks that image and the rest go on."""
    mirrors: list[MirrorPlan] = []

    def submit(relative: str):
        return tree_tasks.plan_mirror.submit(
            _below(source_root, relative), _below(destination_root, relative), relative
        )

    def record(relative: str, mirror: MirrorPlan) -> None:
        mirrors.append(mirror)

    def fail(relative: str, error: Exception) -> None:
        outcomes[relative].fail(error)

    run_bounded(relatives, submit, parallel, record, fail)
    return sorted(mirrors, key=lambda mirror: mirror.relative)


def _lock_destinations(changed, locks: ExitStack, outcomes) -> list[MirrorPlan]:
    """Open and lock each changed image's destination; returns those that could be.

    TODO: Every lock holds a file descriptor until the commits are done, so a
    sync of more changed images than the descriptor limit (often 1024) fails the
    images beyond it; locking in groups would lift that.
    """
    ready = []
    for mirror in changed:
        try:
            storage.DirImageDestination(mirror.destination)
            locks.enter_context(storage.ImageLock(mirror.destination))
        except (storage.ImageError, OSError) as error:
            outcomes[mirror.relative].fail(error)
            continue
        ready.append(mirror)
    return ready


@dataclass(frozen=True)
class _Job:
    """Blobs to place in image `mirror`, read from folder `origin`.

    `origin` is the image's own source when `from_source`; otherwise the
    destination folder of another image holding the blobs, to link (`link`,
    hashing the donor's files first with `verify_donor`) or to copy locally.
    """

    mirror: MirrorPlan
    origin: str
    blobs: tuple[BlobRef, ...]
    from_source: bool
    link: bool = False
    verify_donor: bool = False


def _link_units(blobs: list[BlobRef]) -> list[list[BlobRef]]:
    return [
        blobs[start : start + MAX_BATCH_BLOBS]
        for start in range(0, len(blobs), MAX_BATCH_BLOBS)
    ]


def _place_blobs(ready, skipped, outcomes, link: bool, options, task_runner) -> None:
    """Put every blob of the `ready` images in place, each read from the source once.

    First the blobs each image is the first to need: from its source, or with
    `link` from an unchanged image of the destination that holds them (hashed
    before it is linked to). Then the blobs an earlier image already holds: a
    link to that image's file, or a local copy of it. Whenever the image to take
    a blob from lacks it, the blob is read from the image's own source instead.
    """
    parallel = options[0]
    donors = {}
    if link:
        for mirror in skipped:
            for blob in mirror.plan.blobs:
                donors.setdefault(blob.digest, mirror.destination)

    first_holder: dict[str, MirrorPlan] = {}
    first_jobs: list[_Job] = []
    from_holder: dict[str, list[BlobRef]] = defaultdict(list)
    for mirror in ready:
        from_source: list[BlobRef] = []
        from_donor: dict[str, list[BlobRef]] = defaultdict(list)
        for blob in mirror.plan.blobs:
            if blob.digest in first_holder:
                from_holder[mirror.relative].append(blob)
                continue
            first_holder[blob.digest] = mirror
            if blob.digest in donors:
                from_donor[donors[blob.digest]].append(blob)
            else:
                from_source.append(blob)
        first_jobs += [
            _Job(mirror, mirror.source, tuple(unit), from_source=True)
            for unit in batch_blobs(from_source, parallel)
        ]
        first_jobs += [
            _Job(mirror, donor, tuple(unit), False, link=True, verify_donor=True)
            for donor, blobs in from_donor.items()
            for unit in _link_units(blobs)
        ]

    total = sum(mirror.plan.total_bytes for mirror in ready)
    count = sum(len(mirror.plan.blobs) for mirror in ready)
    tracker = ProgressTracker(
        total, count, f"Syncing {count} blobs of {len(ready)} images"
    )
    placed: set[tuple[str, str]] = set()
    _run_jobs(first_jobs, outcomes, tracker, placed, options, task_runner)

    second_jobs = []
    for mirror in ready:
        by_origin: dict[str, list[BlobRef]] = defaultdict(list)
        for blob in from_holder[mirror.relative]:
            holder = first_holder[blob.digest]
            if (holder.relative, blob.digest) in placed:
                by_origin[holder.destination].append(blob)
            else:
                by_origin[mirror.source].append(blob)
        for origin, blobs in by_origin.items():
            own_source = origin == mirror.source
            if link and not own_source:
                second_jobs += [
                    _Job(mirror, origin, tuple(unit), False, link=True)
                    for unit in _link_units(blobs)
                ]
            else:
                second_jobs += [
                    _Job(mirror, origin, tuple(unit), own_source)
                    for unit in batch_blobs(blobs, parallel)
                ]
    _run_jobs(second_jobs, outcomes, tracker, placed, options, task_runner)
    tracker.finish()


def _run_jobs(jobs, outcomes, tracker, placed, options, task_runner) -> None:
    parallel, retries, retry_delay, retry_jitter = options
    single_task = _copy_task(retries, retry_delay, retry_jitter, single=True)
    batch_task = _copy_task(retries, retry_delay, retry_jitter, single=False)

    def submit(job: _Job):
        destination = job.mirror.destination
        if job.link:
            return runners.submit(
                task_runner,
                tree_tasks.link_blobs,
                donor=job.origin,
                destination=destination,
                blobs=list(job.blobs),
                verify_donor=job.verify_donor,
                fallback_source=job.mirror.source,
            )
        if len(job.blobs) == 1:
            blob = job.blobs[0]
            return runners.submit(
                task_runner,
                single_task,
                source=job.origin,
                destination=destination,
                digest=blob.digest,
                size=blob.size,
                optional=blob.optional,
            )
        return runners.submit(
            task_runner,
            batch_task,
            source=job.origin,
            destination=destination,
            blobs=list(job.blobs),
        )

    def record(job: _Job, result) -> None:
        done = [result] if isinstance(result, BlobTransfer) else list(result)
        outcome = outcomes[job.mirror.relative]
        for transfer in done:
            # A link task that found its donor lacking copied from the source.
            outcome.add(transfer, job.from_source or job.link)
            placed.add((job.mirror.relative, transfer.digest))
        tracker.advance(len(done), sum(transfer.size for transfer in done))

    def fail(job: _Job, error: Exception) -> None:
        outcomes[job.mirror.relative].fail(error)

    run_bounded(jobs, submit, parallel, record, fail)


def _prune(destination_root: str, keep: set[str], outcomes) -> None:
    logger = get_run_logger()
    for relative in tree_tasks.find_images(destination_root):
        if relative in keep:
            continue
        outcome = outcomes.setdefault(relative, ImageOutcome(relative, PRUNED))
        started = time.perf_counter()
        try:
            result = tree_tasks.delete_image(_below(destination_root, relative))
        except Exception as error:
            outcome.fail(error)
            continue
        outcome.seconds = time.perf_counter() - started
        outcome.left_files = list(result.left)
        if result.left:
            logger.warning(
                "Pruned %s but left %d files that are not part of an image: %s",
                result.path,
                len(result.left),
                ", ".join(result.left),
            )


def _report_sync(logger, summary: SyncSummary) -> None:
    counts = {
        status: len(summary.with_status(status))
        for status in (COPIED_IMAGE, SKIPPED, FAILED, PRUNED)
    }
    line = ", ".join(f"{count} {status}" for status, count in counts.items())
    logger.info(
        "Synced %s to %s: %s; %.1f MiB read from the source in %.2f s",
        summary.source_root,
        summary.destination_root,
        line,
        summary.bytes_from_source / MIB,
        summary.seconds,
    )
    for outcome in summary.failed:
        logger.error("%s failed: %s", outcome.image, outcome.error)
    create_table_artifact(
        key="sync-images",
        table=[
            {
                "image": outcome.image,
                "status": outcome.status,
                "bytes from source": outcome.bytes_from_source,
                "bytes shared": outcome.bytes_shared,
                "bytes reused": outcome.bytes_reused,
                "seconds": outcome.seconds,
                "error": outcome.error or "",
            }
            for outcome in summary.images
        ],
        description=(
            f"**{summary.source_root}** to **{summary.destination_root}**: {line}; "
            f"{summary.bytes_from_source / MIB:.1f} MiB read from the source "
            f"in {summary.seconds:.2f} s."
        ),
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@flow(name="verify-images", persist_result=False)
def verify_images(root: str, parallel: Parallel = 8) -> list[VerifyReport]:
    """Hash every blob of every image under `root` and report what is damaged.

    The blobs of all images share one bounded pool of tasks.

    Args:
        root: Folder holding images at any depth (`dir:` accepted).
        parallel: How many blob batches may be hashed at once.

    Returns:
        One report per image, sorted by path.

    Raises:
        ImageCorrupt: Some image is missing files or holds corrupt ones;
            `problems` names each image and digest.
        storage.NotAnImage: `root` holds no images.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    root = image_path(root)
    relatives = tree_tasks.find_images(root)
    if not relatives:
        raise storage.NotAnImage(f"{root} holds no dir: images")

    problems: dict[str, list[str]] = {relative: [] for relative in relatives}
    plans = {}
    for relative in relatives:
        try:
            plan = tasks.plan_image(_below(root, relative), None, strict=False)
        except Exception as error:
            problems[relative].append(_one_line(error))
            continue
        plans[relative] = plan
        problems[relative].extend(plan.problems)

    units = [
        (relative, unit)
        for relative, plan in plans.items()
        for unit in batch_blobs(list(plan.blobs), parallel)
    ]

    def submit(item):
        relative, unit = item
        return tasks.verify_blobs.submit(_below(root, relative), unit)

    def record(item, result: list[str | None]) -> None:
        problems[item[0]].extend(problem for problem in result if problem)

    def fail(item, error: Exception) -> None:
        problems[item[0]].append(_one_line(error))

    run_bounded(units, submit, parallel, record, fail)
    seconds = round(time.perf_counter() - started, 3)
    reports = []
    for relative in relatives:
        plan = plans.get(relative)
        reports.append(
            VerifyReport(
                path=_below(root, relative),
                manifest_digest=plan.manifest_digest if plan else "",
                blobs_checked=len(plan.blobs) if plan else 0,
                bytes_checked=blob_bytes(plan.source, plan.blobs) if plan else 0,
                seconds=seconds,
                problems=problems[relative],
            )
        )
    damaged = [
        f"{relative}: {problem}"
        for relative in relatives
        for problem in problems[relative]
    ]
    if damaged:
        for problem in damaged:
            logger.error("%s", problem)
        raise ImageCorrupt(root, damaged)
    logger.info(
        "Verified %d images (%.1f MiB) under %s in %.2f s",
        len(reports),
        sum(report.bytes_checked for report in reports) / MIB,
        root,
        time.perf_counter() - started,
    )
    return reports
