"""The sync_images flow: mirror every image under one root to another, and the
verify_images flow: check every image under a root.

One flow run covers the whole tree (a flow run costs about a second, a task tens
of milliseconds). The blobs of all images are planned together, so a blob that
several images share is read from the source once: it is copied into the first
image that needs it, and the others get it from there. Images are locked and
committed in groups, so the number of images is not bounded by the number of
files a process may have open.
"""

import os
import resource
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
    VerifyReport,
    _copy_task,
    batch_blobs,
    blob_bytes,
    commit_image,
    image_path,
    reuse_present_blobs,
)
from flows.parameters import FolderPath, Jitter, Parallel, Retries, Runner, Seconds
from flows.progress import ProgressTracker
from storage.layout import blob_path
from storage.link import COPIED_LOCALLY, DAMAGED_DONOR, LINKED, shares_storage
from storage.manifest import BlobRef
from storage.transfer import COPIED, REUSED, BlobTransfer
from storage.tree import MirrorPlan
from tasks import tree as tree_tasks

COPIED_IMAGE, SKIPPED, FAILED, PRUNED = "copied", "skipped", "failed", "pruned"
# Locks held at once at most, however high the descriptor limit.
MAX_LOCKED_IMAGES = 256


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

    def add(self, transfer: BlobTransfer) -> None:
        """Count one placed blob: `copied` ones were read from the image's source."""
        self.seconds += transfer.seconds
        if transfer.action == REUSED:
            self.blobs_reused += 1
            self.bytes_reused += transfer.size
        elif transfer.action == COPIED:
            self.blobs_from_source += 1
            self.bytes_from_source += transfer.size
        elif transfer.action in (LINKED, COPIED_LOCALLY):
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
    source_root: FolderPath,
    destination_root: FolderPath,
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
    signatures, every blob present at its size) is skipped: nothing of it is
    written, except that `link` may replace its blob files by links. The others
    are copied together: each blob is read from the source once, however many
    images share it, and every image is committed as `copy_image` commits it.
    One image failing does not stop the others.

    Args:
        source_root: Folder holding the images, at any depth (`dir:` accepted).
        destination_root: Folder to mirror them into; created when missing.
        parallel: How many blob copies may run at once.
        retries: How often a blob copy is retried after a transient I/O error.
        retry_delay: Seconds before the first retry; doubled for each next one.
        retry_jitter: Random spread of retry delays, as a fraction of the delay.
        prune: Delete images under the destination root that the source root no
            longer has (only their layout files; anything else stays).
        link: Let identical blobs of the mirrored images share storage, changed
            images and unchanged ones alike: a reflink where the filesystem
            supports it, else a hard link. A file is linked to only once it
            hashes to its digest.
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
    plan_task = tasks.with_retries(
        tree_tasks.plan_mirror, retries, retry_delay, retry_jitter
    )
    mirrors = _plan_mirrors(
        plan_task, source_root, destination_root, relatives, parallel, outcomes
    )
    for mirror in mirrors:
        outcomes[mirror.relative].manifest_digest = mirror.plan.manifest_digest
        if mirror.current:
            outcomes[mirror.relative].status = SKIPPED
    changed = [mirror for mirror in mirrors if not mirror.current]
    skipped = [mirror for mirror in mirrors if mirror.current]

    donors: dict[str, str] = {}
    if link:
        for mirror in skipped:
            for blob in mirror.plan.blobs:
                donors.setdefault(blob.digest, mirror.destination)
    shares = _shares(skipped, donors)
    total_bytes = sum(mirror.plan.total_bytes for mirror in changed)
    total_bytes += sum(blob.size or 0 for _, blobs in shares for blob in blobs)
    total_blobs = sum(len(mirror.plan.blobs) for mirror in changed)
    total_blobs += sum(len(blobs) for _, blobs in shares)
    images = len(changed) + len(shares)
    tracker = ProgressTracker(
        total_bytes, total_blobs, f"Syncing {total_blobs} blobs of {images} images"
    )
    options = _Options(parallel, retries, retry_delay, retry_jitter, link)

    if images:
        with runners.opened_runner(runner) as task_runner:
            placer = _Placer(outcomes, options, task_runner, tracker, donors)
            _in_locked_groups(changed, lambda mirror: mirror, outcomes, placer.place)
            _in_locked_groups(shares, lambda share: share[0], outcomes, placer.share)
    tracker.finish()

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


def lock_group_size() -> int:
    """How many image folders a sync locks at once.

    Each lock holds a file descriptor until its images are committed, so a sync
    works through its images in groups of a quarter of the process's descriptor
    limit, leaving the rest to Prefect and to the blob copies.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_LOCKED_IMAGES
    return max(1, min(MAX_LOCKED_IMAGES, soft // 4))


def _plan_mirrors(
    plan_task, source_root, destination_root, relatives, parallel, outcomes
):
    """Plan every image with `plan_task`, bounded; a failure marks that image and
    the rest go on."""
    mirrors: list[MirrorPlan] = []

    def submit(relative: str):
        return plan_task.submit(
            _below(source_root, relative), _below(destination_root, relative), relative
        )

    def record(relative: str, mirror: MirrorPlan) -> None:
        mirrors.append(mirror)

    def fail(relative: str, error: Exception) -> None:
        outcomes[relative].fail(error)

    run_bounded(relatives, submit, parallel, record, fail)
    return sorted(mirrors, key=lambda mirror: mirror.relative)


def _shares(skipped, donors: dict[str, str]) -> list[tuple[MirrorPlan, list[BlobRef]]]:
    """The unchanged images with blobs to link to another image's file (`donors`).

    Blobs already sharing the donor's storage (one inode, or a reflink of its
    extents) are left out, so a sync that finds nothing to link locks nothing and
    writes nothing.
    """
    shares = []
    for mirror in skipped:
        blobs = []
        for blob in mirror.plan.blobs:
            donor = donors.get(blob.digest, mirror.destination)
            if donor == mirror.destination:
                continue
            digest = storage.parse_digest(blob.digest)
            if not shares_storage(
                blob_path(donor, digest), blob_path(mirror.destination, digest)
            ):
                blobs.append(blob)
        if blobs:
            shares.append((mirror, blobs))
    return shares


def _in_locked_groups(items: list, mirror_of, outcomes, work) -> None:
    """Call `work(group)` on groups of `items` while their images are locked.

    `mirror_of(item)` is the item's image. An image that cannot be locked is
    marked failed and left out of its group.
    """
    size = lock_group_size()
    for start in range(0, len(items), size):
        group = items[start : start + size]
        with ExitStack() as locks:
            mirrors = [mirror_of(item) for item in group]
            locked = {m.relative for m in _lock_destinations(mirrors, locks, outcomes)}
            work([item for item in group if mirror_of(item).relative in locked])


def _lock_destinations(mirrors, locks: ExitStack, outcomes) -> list[MirrorPlan]:
    """Open and lock each image's destination; returns those that could be."""
    ready = []
    for mirror in mirrors:
        try:
            storage.DirImageDestination(mirror.destination)
            locks.enter_context(storage.ImageLock(mirror.destination))
        except (storage.ImageError, OSError) as error:
            outcomes[mirror.relative].fail(error)
            continue
        ready.append(mirror)
    return ready


@dataclass(frozen=True)
class _Options:
    parallel: int
    retries: int
    retry_delay: float
    retry_jitter: float
    link: bool


# How a job places its blobs: copied from the image's own source (with retries),
# linked to another image's file, or copied from another image's file.
FROM_SOURCE, LINK, LOCAL_COPY = "source", "link", "local"


@dataclass(frozen=True)
class _Job:
    """Blobs to place in image `mirror`, read from folder `origin`.

    `origin` is the image's own source for `FROM_SOURCE` jobs, otherwise the
    destination folder of another image holding the blobs; `verify_origin` asks
    for its files to be hashed before they are linked to.
    """

    mirror: MirrorPlan
    origin: str
    blobs: tuple[BlobRef, ...]
    how: str
    verify_origin: bool = False


def _link_units(blobs: list[BlobRef]) -> list[list[BlobRef]]:
    return [
        blobs[start : start + MAX_BATCH_BLOBS]
        for start in range(0, len(blobs), MAX_BATCH_BLOBS)
    ]


class _Placer:
    """Places the blobs of a sync's images, group after group of locked images.

    `donors` maps a digest to an image folder outside the group at work that
    holds the blob: an unchanged image (with `link`), or an image an earlier
    group committed. Their files are checked before use: hashed before they are
    linked to, hashed while they are copied.
    """

    def __init__(self, outcomes, options: _Options, task_runner, tracker, donors):
        self.outcomes = outcomes
        self.options = options
        self.task_runner = task_runner
        self.tracker = tracker
        self.donors = donors

    def place(self, ready: list[MirrorPlan]) -> None:
        """Put every blob of the `ready` images in place, then commit each.

        First the blobs each image is the first of the group to need: from a
        donor, else from its own source, unless the image's folder holds them
        intact already. Then the blobs an earlier image of the group already
        holds: a link to that image's file, or a local copy of it.
        Whenever the image to take a blob from lacks it, the blob is read from
        the image's own source instead.
        """
        first_holder: dict[str, MirrorPlan] = {}
        from_source: dict[str, list[BlobRef]] = defaultdict(list)
        from_donor: dict[str, dict[str, list[BlobRef]]] = defaultdict(dict)
        from_holder: dict[str, list[BlobRef]] = defaultdict(list)
        for mirror in ready:
            for blob in mirror.plan.blobs:
                if blob.digest in first_holder:
                    from_holder[mirror.relative].append(blob)
                    continue
                first_holder[blob.digest] = mirror
                if blob.digest in self.donors:
                    donor = self.donors[blob.digest]
                    from_donor[mirror.relative].setdefault(donor, []).append(blob)
                else:
                    from_source[mirror.relative].append(blob)
        placed: set[tuple[str, str]] = set()
        self._reuse(ready, from_source, placed)

        first_jobs: list[_Job] = []
        for mirror in ready:
            missing = [
                blob
                for blob in from_source[mirror.relative]
                if (mirror.relative, blob.digest) not in placed
            ]
            first_jobs += self._jobs(mirror, mirror.source, missing)
            for donor, blobs in from_donor[mirror.relative].items():
                first_jobs += self._jobs(mirror, donor, blobs, verify_origin=True)
        self._run(first_jobs, placed)

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
                second_jobs += self._jobs(mirror, origin, blobs)
        self._run(second_jobs, placed)
        for mirror in ready:
            self._commit(mirror)

    def _reuse(self, ready, from_source, placed: set[tuple[str, str]]) -> None:
        """Keep what each image's folder already holds intact, of the blobs it
        is to read from its source, as a copy does: one image at a time, since
        each check hashes on `parallel` threads. Kept blobs are counted as
        reused and as placed."""
        for mirror in ready:
            try:
                reused = reuse_present_blobs(
                    mirror.destination,
                    from_source[mirror.relative],
                    self.options.parallel,
                    self.task_runner,
                )
            except Exception as error:
                # Its blobs are then copied as if none were there, and their own
                # tasks meet whatever went wrong, under the retry policy.
                get_run_logger().warning(
                    "Could not check the blobs already in %s: %s",
                    mirror.destination,
                    _one_line(error),
                )
                continue
            for transfer in reused:
                self.outcomes[mirror.relative].add(transfer)
                placed.add((mirror.relative, transfer.digest))
            self.tracker.advance(len(reused), sum(t.size for t in reused))

    def _jobs(self, mirror, origin: str, blobs, verify_origin=False) -> list[_Job]:
        if origin == mirror.source:
            how = FROM_SOURCE
        else:
            how = LINK if self.options.link else LOCAL_COPY
        # Links are cheap and travel in large batches; copies and hashing spread
        # over tasks as a copy's blobs do.
        if how == LINK and not verify_origin:
            units = _link_units(blobs)
        else:
            units = batch_blobs(blobs, self.options.parallel)
        return [_Job(mirror, origin, tuple(unit), how, verify_origin) for unit in units]

    def _commit(self, mirror: MirrorPlan) -> None:
        """Commit an image whose blobs are in place; it becomes a donor."""
        outcome = self.outcomes[mirror.relative]
        if outcome.status == FAILED:
            return
        started = time.perf_counter()
        try:
            commit_image(
                mirror.source,
                mirror.destination,
                mirror.plan,
                retries=self.options.retries,
                retry_delay=self.options.retry_delay,
                retry_jitter=self.options.retry_jitter,
            )
        except Exception as error:
            outcome.fail(error)
        else:
            for blob in mirror.plan.blobs:
                self.donors.setdefault(blob.digest, mirror.destination)
        outcome.seconds += time.perf_counter() - started

    def _run(self, jobs: list[_Job], placed: set[tuple[str, str]]) -> None:
        options = self.options
        copy_task = {
            single: _copy_task(
                options.retries, options.retry_delay, options.retry_jitter, single
            )
            for single in (True, False)
        }

        def submit(job: _Job):
            common = {"destination": job.mirror.destination, "blobs": list(job.blobs)}
            if job.how == LINK:
                return self._submit(
                    tree_tasks.link_blobs,
                    donor=job.origin,
                    verify_donor=job.verify_origin,
                    fallback_source=job.mirror.source,
                    **common,
                )
            if job.how == LOCAL_COPY:
                return self._submit(
                    tree_tasks.copy_blobs_locally,
                    holder=job.origin,
                    fallback_source=job.mirror.source,
                    **common,
                )
            if len(job.blobs) == 1:
                blob = job.blobs[0]
                return self._submit(
                    copy_task[True],
                    source=job.origin,
                    destination=job.mirror.destination,
                    digest=blob.digest,
                    size=blob.size,
                    optional=blob.optional,
                )
            return self._submit(copy_task[False], source=job.origin, **common)

        def record(job: _Job, result) -> None:
            done = [result] if isinstance(result, BlobTransfer) else list(result)
            outcome = self.outcomes[job.mirror.relative]
            for transfer in done:
                outcome.add(transfer)
                placed.add((job.mirror.relative, transfer.digest))
            self.tracker.advance(len(done), sum(transfer.size for transfer in done))

        def fail(job: _Job, error: Exception) -> None:
            self.outcomes[job.mirror.relative].fail(error)

        run_bounded(jobs, submit, options.parallel, record, fail)

    def share(self, shares: list[tuple[MirrorPlan, list[BlobRef]]]) -> None:
        """Link blob files of unchanged images to the donors' files."""
        logger = get_run_logger()
        jobs = []
        for mirror, blobs in shares:
            by_donor: dict[str, list[BlobRef]] = defaultdict(list)
            for blob in blobs:
                by_donor[self.donors[blob.digest]].append(blob)
            for donor, donor_blobs in by_donor.items():
                jobs += [
                    _Job(mirror, donor, tuple(unit), LINK, verify_origin=True)
                    for unit in batch_blobs(donor_blobs, self.options.parallel)
                ]

        def submit(job: _Job):
            return self._submit(
                tree_tasks.share_blobs,
                donor=job.origin,
                destination=job.mirror.destination,
                blobs=list(job.blobs),
            )

        def record(job: _Job, result: list[BlobTransfer]) -> None:
            outcome = self.outcomes[job.mirror.relative]
            for transfer in result:
                if transfer.action == LINKED:
                    outcome.add(transfer)
                elif transfer.action == DAMAGED_DONOR:
                    logger.warning(
                        "Not linking blob %s of %s to %s: that file does not hash "
                        "to its digest; dirimage verify tells which images hold it",
                        transfer.digest,
                        job.mirror.destination,
                        job.origin,
                    )
            self.tracker.advance(len(result), sum(b.size or 0 for b in job.blobs))

        def fail(job: _Job, error: Exception) -> None:
            self.outcomes[job.mirror.relative].fail(error)

        run_bounded(jobs, submit, self.options.parallel, record, fail)

    def _submit(self, task, **parameters):
        return runners.submit(self.task_runner, task, **parameters)


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
def verify_images(
    root: FolderPath, parallel: Parallel = 8, runner: Runner = runners.THREAD
) -> list[VerifyReport]:
    """Hash every blob of every image under `root` and report what is damaged.

    The blobs of all images share one bounded pool of tasks.

    Args:
        root: Folder holding images at any depth (`dir:` accepted).
        parallel: How many blob batches may be hashed at once.
        runner: Where the hashing runs, as for `copy_image`.

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
    runners.check_runner(runner)
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

    def record(item, result: list[str | None]) -> None:
        problems[item[0]].extend(problem for problem in result if problem)

    def fail(item, error: Exception) -> None:
        problems[item[0]].append(_one_line(error))

    with runners.opened_runner(runner) as task_runner:

        def submit(item):
            relative, unit = item
            path = _below(root, relative)
            return runners.submit(
                task_runner, tasks.verify_blobs, path=path, blobs=unit
            )

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
