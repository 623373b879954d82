"""Benchmark `dirimage copy` against `skopeo copy dir: dir:` and `cp -r`.

Generates images of random, incompressible bytes straight into the dir: layout,
then runs every copier as a whole process, interleaved round by round, so that
all ratios come from the same run on the same machine:

- `cp -r SRC DST`, and the same followed by `sync` on every copied file: cp
  leaves its bytes in the page cache, while skopeo and dirimage wait for each
  blob to reach the disk (fsync) before they rename it into place;
- `skopeo --insecure-policy copy dir:SRC dir:DST`
- `dirimage copy --json SRC DST` against a `prefect server start` that this
  script starts on 127.0.0.1 with a temporary PREFECT_HOME (and stops by PID),
  warmed up first with a few untimed copies of the smallest image;
- the same command again over the complete destination (a rerun), which must
  rewrite nothing;
- `dirimage copy` on the embedded default (no PREFECT_API_URL), first with a new
  PREFECT_HOME, which starts the local server that commands share, and then a
  second time with the same home, which finds that server running.

Every destination is checked after each copy (file names, manifest bytes, each
blob hashed against its name) outside the timings. Caches are not dropped, so
every copier starts from a warm page cache: its source (and, for a rerun, the
destination) is read once just before it is timed, since a kernel that pages
out idle file pages (DAMON does on the project's machines) would otherwise
leave some copiers reading from disk; and `sync` runs before every timed copy,
so that one copy's write-back does not land in the next one's time.

    python tests/benchmarks/bench_copy.py [--quick] [--rounds N] [--workdir DIR]

Exits non-zero when a copy fails or a destination does not verify; targets that
are missed are reported in the table, not in the exit status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY))

from storage import layout  # noqa: E402

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
PROCESS_TIMEOUT = 900
SERVER_START_TIMEOUT = 180
SERVER_WARM_UP_COPIES = 5
WRITE_CHUNK = 4 * MIB

CP = "cp"
CP_SYNC = "cp + sync"
SKOPEO = "skopeo"
SERVER = "dirimage (server)"
RERUN = "dirimage rerun (server)"
EMBEDDED_FIRST = "dirimage (embedded, 1st)"
EMBEDDED = "dirimage (embedded, 2nd)"
DIRIMAGE_RUNS = (SERVER, RERUN, EMBEDDED_FIRST, EMBEDDED)


@dataclass(frozen=True)
class ImageSpec:
    """One generated image: its layer sizes and the part it plays in the targets."""

    name: str
    layer_sizes: tuple[int, ...]
    role: str
    embedded: bool = False

    @property
    def total(self) -> int:
        return sum(self.layer_sizes)


FULL_IMAGES = (
    ImageSpec("1GiB-16-layers", (64 * MIB,) * 16, "throughput", embedded=True),
    ImageSpec("200-layers-64KiB", (64 * KIB,) * 200, "many-small"),
    ImageSpec("2GiB-1-layer", (2 * GIB,), "big-layer"),
    ImageSpec("1MiB-1-layer", (MIB,), "small-layer"),
)
QUICK_IMAGES = (
    ImageSpec("16MiB-4-layers", (4 * MIB,) * 4, "throughput", embedded=True),
    ImageSpec("20-layers-64KiB", (64 * KIB,) * 20, "many-small"),
    ImageSpec("64MiB-1-layer", (64 * MIB,), "big-layer"),
    ImageSpec("1MiB-1-layer", (MIB,), "small-layer"),
)


@dataclass
class Run:
    """One timed process: wall seconds, peak RSS and, for dirimage, its summary."""

    seconds: float
    cpu_seconds: float
    max_rss: int
    summary: dict | None = None


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)

    def add(self, image: str, copier: str, run: Run) -> None:
        self.runs.setdefault((image, copier), []).append(run)

    def get(self, image: str, copier: str) -> list[Run]:
        return self.runs.get((image, copier), [])


class BenchmarkFailure(RuntimeError):
    """A copy failed or produced a destination that does not match its source."""


# Generating images


def _keystream(seed: str):
    """An AES-CTR keystream: random-looking bytes at gigabytes per second."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = hashlib.sha256(seed.encode()).digest()
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def _write_blob(folder: Path, data_source, size: int) -> tuple[str, int]:
    """Write `size` bytes into a new blob file in `folder`; returns (digest, size)."""
    hasher = hashlib.sha256()
    temporary = folder / ".generating"
    zeros = bytes(WRITE_CHUNK)
    with open(temporary, "wb") as file:
        left = size
        while left:
            chunk = data_source.update(zeros[: min(left, WRITE_CHUNK)])
            hasher.update(chunk)
            file.write(chunk)
            left -= len(chunk)
    hex_digest = hasher.hexdigest()
    os.replace(temporary, folder / hex_digest)
    return f"sha256:{hex_digest}", size


def _write_small_blob(folder: Path, data: bytes) -> tuple[str, int]:
    hex_digest = hashlib.sha256(data).hexdigest()
    (folder / hex_digest).write_bytes(data)
    return f"sha256:{hex_digest}", len(data)


def generate_image(folder: Path, spec: ImageSpec) -> None:
    """Write an OCI image of random uncompressed layers in dir: layout 1.1."""
    folder.mkdir(parents=True)
    (folder / layout.VERSION_FILE).write_bytes(layout.version_text("1.1"))
    layers = [
        _write_blob(folder, _keystream(f"{spec.name}/{index}"), size)
        for index, size in enumerate(spec.layer_sizes)
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest for digest, _ in layers]},
    }
    config_digest, config_size = _write_small_blob(
        folder, json.dumps(config, separators=(",", ":")).encode()
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": size,
            }
            for digest, size in layers
        ],
    }
    (folder / layout.MANIFEST_FILE).write_bytes(json.dumps(manifest).encode())


def warm_page_cache(folder: Path) -> None:
    """Read every file once so that all copiers start from a warm page cache."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as file:
            while file.read(WRITE_CHUNK):
                pass


# Checking copies


def _blob_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if layout.layout_kind(p.name) == "blob"}


def verify_copy(source: Path, destination: Path) -> None:
    """Raise BenchmarkFailure unless `destination` holds exactly `source`'s image.

    Manifest and version must be byte-identical and every blob must hash to its
    name; the only extra file allowed is dirimage's lock file.
    """
    source_names = {p.name for p in source.iterdir()}
    found_names = {p.name for p in destination.iterdir()}
    missing = source_names - found_names
    extra = found_names - source_names - {layout.LOCK_FILE}
    if missing or extra:
        raise BenchmarkFailure(
            f"{destination}: expected the files of {source}, "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for name in (layout.MANIFEST_FILE, layout.VERSION_FILE):
        if (source / name).read_bytes() != (destination / name).read_bytes():
            raise BenchmarkFailure(f"{destination / name} differs from the source's")
    for name in _blob_names(source):
        with open(destination / name, "rb") as file:
            found = hashlib.file_digest(file, "sha256").hexdigest()
        if found != name:
            raise BenchmarkFailure(
                f"{destination / name}: content hashes to sha256:{found}"
            )


def file_identities(folder: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of each blob: a rewrite changes one of them."""
    identities = {}
    for name in _blob_names(folder):
        info = os.stat(folder / name)
        identities[name] = (info.st_ino, info.st_mtime_ns)
    return identities


# Running processes


def run_measured(command: list[str], env: dict, log: Path) -> tuple[Run, str]:
    """Run `command` to completion; returns its timing, peak RSS and stdout.

    Peak RSS and CPU seconds come from wait4 on this child: the largest resident
    set among the child and the descendants it waited for, and their CPU time
    summed. The local server an embedded run starts is not waited for: it
    outlives the command.
    """
    with open(log, "wb") as stderr, tempfile.TemporaryFile() as stdout:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        watchdog = threading.Timer(PROCESS_TIMEOUT, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        output = stdout.read().decode(errors="replace")
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchmarkFailure(
            f"{' '.join(command)} exited with {process.returncode}:\n{tail}"
        )
    # Linux reports ru_maxrss in KiB.
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return Run(seconds, cpu_seconds, max_rss=usage.ru_maxrss * KIB), output


def parse_summary(output: str) -> dict:
    """The JSON summary `dirimage copy --json` prints last on stdout."""
    start = output.rfind("\n{")
    text = output[start + 1 :] if start >= 0 else output
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        message = f"no JSON summary in dirimage output: {output!r}"
        raise BenchmarkFailure(message) from None


def base_environment() -> dict:
    """The caller's environment without Prefect settings, which would skew runs."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrefectServer:
    """A `prefect server start` on 127.0.0.1 with its own PREFECT_HOME."""

    def __init__(self, home: Path, log: Path):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = base_environment()
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
        )
        prefect = str(Path(sys.executable).with_name("prefect"))
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_healthy(self) -> float:
        started = time.perf_counter()
        deadline = started + SERVER_START_TIMEOUT
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkFailure(f"prefect server exited, see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.25)
        raise BenchmarkFailure(f"prefect server not healthy after {deadline} s")

    def stop(self) -> None:
        """Stop the server and the processes it started (its session), by PID."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.log.close()


# The benchmark


class Bench:
    def __init__(self, workdir: Path, server: PrefectServer, dirimage: str):
        self.workdir = workdir
        self.server = server
        self.dirimage = dirimage
        self.results = Results()
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.copies = 0
        self.client_home = workdir / "client-home"
        self.client_home.mkdir(exist_ok=True)

    def _log(self, label: str) -> Path:
        safe = "".join(c if c.isalnum() else "-" for c in label)
        return self.logs / f"{safe}-{len(list(self.logs.iterdir()))}.log"

    def _fresh(self, name: str) -> Path:
        destination = self.workdir / "copies" / name
        if destination.exists():
            shutil.rmtree(destination)
        destination.parent.mkdir(exist_ok=True)
        return destination

    def _time(self, spec, copier, command, env, source, destination) -> Run:
        warm_page_cache(source)
        if destination.exists():
            warm_page_cache(destination)
        os.sync()
        run, output = run_measured(command, env, self._log(f"{spec.name}-{copier}"))
        if copier in DIRIMAGE_RUNS:
            run.summary = parse_summary(output)
        verify_copy(source, destination)
        transfer = ""
        if run.summary is not None:
            transfer = f" (blob phase {run.summary['transfer_seconds']:.2f} s)"
        print(
            f"  {spec.name} {copier}: {run.seconds:.2f} s{transfer}, "
            f"{run.max_rss / MIB:.0f} MiB max RSS",
            file=sys.stderr,
            flush=True,
        )
        self.copies += 1
        self.results.add(spec.name, copier, run)
        return run

    def round(self, spec: ImageSpec, source: Path, number: int) -> None:
        """Run every copier once on `spec`'s image.

        The order rotates from round to round, so that no copier always runs
        first (after the previous image's clean-up) or always after dirimage.
        """
        steps = [self._cp, self._cp_sync, self._skopeo, self._dirimage_server]
        if spec.embedded:
            steps.append(self._dirimage_embedded)
        shift = number % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step(spec, source, number)

    def warm_up_server(self, source: Path, copies: int) -> None:
        """Run untimed copies of `source` against the server.

        A new server answers its first flow runs slowly (on the project's
        machine the blob phase of a 1 GiB copy took 2.0 s on the first run
        and 1.0 to 1.1 s from the fourth on); a server people keep running has
        long left that behind.
        """
        env = dict(base_environment(), PREFECT_HOME=str(self.client_home))
        env["PREFECT_API_URL"] = self.server.api_url
        for _ in range(copies):
            destination = self._fresh("warm-up")
            command = [self.dirimage, "copy", str(source), str(destination)]
            run_measured(command, env, self._log("warm-up"))
            shutil.rmtree(destination)

    def _cp(self, spec: ImageSpec, source: Path, number: int) -> None:
        destination = self._fresh("cp")
        command = [CP, "-r", str(source), str(destination)]
        self._time(spec, CP, command, base_environment(), source, destination)
        shutil.rmtree(destination)

    def _cp_sync(self, spec: ImageSpec, source: Path, number: int) -> None:
        # coreutils sync with file arguments fsyncs each of them.
        destination = self._fresh("cp-sync")
        script = 'cp -r "$1" "$2" && sync "$2"/*'
        command = ["sh", "-c", script, "sh", str(source), str(destination)]
        self._time(spec, CP_SYNC, command, base_environment(), source, destination)
        shutil.rmtree(destination)

    def _skopeo(self, spec: ImageSpec, source: Path, number: int) -> None:
        destination = self._fresh("skopeo")
        command = [SKOPEO, "--insecure-policy", "copy"]
        command += [f"dir:{source}", f"dir:{destination}"]
        self._time(spec, SKOPEO, command, base_environment(), source, destination)
        shutil.rmtree(destination)

    def _dirimage_server(self, spec: ImageSpec, source: Path, number: int) -> None:
        env = dict(base_environment(), PREFECT_HOME=str(self.client_home))
        env["PREFECT_API_URL"] = self.server.api_url
        destination = self._fresh("dirimage")
        command = [self.dirimage, "copy", "--json", str(source), str(destination)]
        self._time(spec, SERVER, command, env, source, destination)
        before = file_identities(destination)
        rerun = self._time(spec, RERUN, command, env, source, destination)
        if rerun.summary["blobs_copied"] or file_identities(destination) != before:
            raise BenchmarkFailure(f"the rerun over {destination} rewrote blobs")
        shutil.rmtree(destination)

    def _dirimage_embedded(self, spec: ImageSpec, source: Path, number: int) -> None:
        home = self.workdir / f"embedded-home-{spec.name}-{number}"
        home.mkdir()
        env = dict(base_environment(), PREFECT_HOME=str(home))
        for copier in (EMBEDDED_FIRST, EMBEDDED):
            destination = self._fresh("dirimage")
            command = [self.dirimage, "copy", "--json", str(source), str(destination)]
            self._time(spec, copier, command, env, source, destination)
            shutil.rmtree(destination)
        # The first copy's server waits, idle, for more commands: not for this
        # benchmark's.
        subprocess.run(
            [self.dirimage, "stop-server"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(home)


# Reporting


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def format_table(images: tuple[ImageSpec, ...], results: Results) -> list[str]:
    header = (
        f"{'image':<18} {'copier':<26} {'n':>2} {'median s':>9} {'min s':>7} "
        f"{'max s':>7} {'cpu s':>6} {'MiB/s':>7} {'flow s':>7} {'xfer s':>7} "
        f"{'xfer MiB/s':>10} "
        f"{'max RSS MiB':>11}"
    )
    lines = [header, "-" * len(header)]
    copiers = (CP, CP_SYNC, SKOPEO, SERVER, RERUN, EMBEDDED_FIRST, EMBEDDED)
    for spec in images:
        for copier in copiers:
            runs = results.get(spec.name, copier)
            if not runs:
                continue
            seconds = [run.seconds for run in runs]
            median = _median(seconds)
            flow = transfer = rate = "-"
            if runs[0].summary is not None:
                flow = f"{_median([r.summary['seconds'] for r in runs]):.2f}"
                transfer_seconds = _median(
                    [r.summary["transfer_seconds"] for r in runs]
                )
                transfer = f"{transfer_seconds:.2f}"
                if copier != RERUN:
                    rate = f"{spec.total / MIB / max(transfer_seconds, 1e-9):.0f}"
            lines.append(
                f"{spec.name:<18} {copier:<26} {len(runs):>2} {median:>9.2f} "
                f"{min(seconds):>7.2f} {max(seconds):>7.2f} "
                f"{_median([run.cpu_seconds for run in runs]):>6.2f} "
                f"{spec.total / MIB / median:>7.0f} {flow:>7} {transfer:>7} "
                f"{rate:>10} {_mib(max(run.max_rss for run in runs)):>11}"
            )
    return lines


def _by_role(images, role: str) -> ImageSpec | None:
    return next((spec for spec in images if spec.role == role), None)


def format_targets(images: tuple[ImageSpec, ...], results: Results) -> list[str]:
    """One line per target: the measured ratio, the bound, and whether it holds."""
    checks = []

    def check(label: str, value: float, bound: float, at_most: bool, unit: str = ""):
        holds = value <= bound if at_most else value >= bound
        relation = "<=" if at_most else ">="
        checks.append(
            f"{'met' if holds else 'MISSED':<7} {label}: {value:.2f}{unit} "
            f"(target {relation} {bound:g}{unit})"
        )

    def median_of(spec, copier, key=None) -> float:
        runs = results.get(spec.name, copier)
        if key is None:
            return _median([run.seconds for run in runs])
        return _median([run.summary[key] for run in runs])

    throughput = _by_role(images, "throughput")
    if throughput is not None:
        cp = median_of(throughput, CP)
        transfer = median_of(throughput, SERVER, "transfer_seconds")
        name = throughput.name
        check(
            f"{name}: transfer throughput / cp -r throughput",
            cp / transfer,
            0.8,
            at_most=False,
        )
        checks.append(
            f"{'info':<7} {name}: transfer throughput / (cp -r + sync) throughput: "
            f"{median_of(throughput, CP_SYNC) / transfer:.2f}"
        )
        skopeo = median_of(throughput, SKOPEO)
        check(
            f"{name}: dirimage (server) / skopeo time",
            median_of(throughput, SERVER) / skopeo,
            0.5,
            at_most=True,
        )
        if results.get(name, EMBEDDED):
            check(
                f"{name}: dirimage (embedded, 2nd) / skopeo time",
                median_of(throughput, EMBEDDED) / skopeo,
                1.0,
                at_most=True,
            )
        check(
            f"{name}: rerun transfer / first transfer",
            median_of(throughput, RERUN, "transfer_seconds") / transfer,
            0.5,
            at_most=True,
        )

    many = _by_role(images, "many-small")
    if many is not None:
        check(
            f"{many.name}: flow seconds (server)",
            median_of(many, SERVER, "seconds"),
            5.0,
            at_most=True,
            unit=" s",
        )

    big, small = _by_role(images, "big-layer"), _by_role(images, "small-layer")
    if big is not None and small is not None:
        peak_big = max(run.max_rss for run in results.get(big.name, SERVER))
        peak_small = max(run.max_rss for run in results.get(small.name, SERVER))
        check(
            f"peak RSS {big.name} - {small.name} (server)",
            (peak_big - peak_small) / MIB,
            64,
            at_most=True,
            unit=" MiB",
        )
    return checks


def describe_machine() -> str:
    skopeo = subprocess.run(
        [SKOPEO, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs, load average {load}, "
        f"Python {sys.version.split()[0]}, {skopeo}, "
        f"page cache warm (sources read before every copy, then sync)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny images, 1 round")
    parser.add_argument("--rounds", type=int, help="rounds per image (default 3)")
    parser.add_argument("--workdir", type=Path, help="where images and copies go")
    parser.add_argument(
        "--image", action="append", help="run only the image(s) with this name"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args(argv)

    images = QUICK_IMAGES if args.quick else FULL_IMAGES
    if args.image:
        images = tuple(spec for spec in images if spec.name in args.image)
    rounds = args.rounds or (1 if args.quick else 3)
    dirimage = str(Path(sys.executable).with_name("dirimage"))
    if not os.path.exists(dirimage):
        dirimage = shutil.which("dirimage") or "dirimage"
    for tool in (SKOPEO, CP):
        if shutil.which(tool) is None:
            print(f"bench_copy: {tool} is not installed", file=sys.stderr)
            return 2

    parent = args.workdir or REPOSITORY.parent
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dirimage-bench-", dir=parent))
    server = None
    started = time.perf_counter()
    try:
        print(f"workdir {workdir}; {describe_machine()}", flush=True)
        sources = {}
        for spec in images:
            clock = time.perf_counter()
            sources[spec.name] = workdir / "images" / spec.name
            generate_image(sources[spec.name], spec)
            warm_page_cache(sources[spec.name])
            print(
                f"generated {spec.name}: {len(spec.layer_sizes)} layers, "
                f"{spec.total / MIB:.1f} MiB in {time.perf_counter() - clock:.1f} s",
                flush=True,
            )

        (workdir / "server-home").mkdir()
        server = PrefectServer(workdir / "server-home", workdir / "server.log")
        print(
            f"prefect server healthy after {server.wait_until_healthy():.1f} s",
            flush=True,
        )
        bench = Bench(workdir, server, dirimage)
        clock = time.perf_counter()
        smallest = min(images, key=lambda spec: spec.total)
        bench.warm_up_server(sources[smallest.name], SERVER_WARM_UP_COPIES)
        print(
            f"server warmed up with {SERVER_WARM_UP_COPIES} untimed copies in "
            f"{time.perf_counter() - clock:.1f} s",
            flush=True,
        )
        for number in range(rounds):
            for spec in images:
                bench.round(spec, sources[spec.name], number)
            print(f"round {number + 1}/{rounds} done", flush=True)

        load = " ".join(f"{value:.1f}" for value in os.getloadavg())
        print(f"load average at the end {load}")
        print()
        print("\n".join(format_table(images, bench.results)))
        print()
        if args.quick:
            print("targets (quick mode: images are smaller than the targets assume)")
        else:
            print("targets")
        print("\n".join(format_targets(images, bench.results)))
        print()
        print(
            f"all {bench.copies} copies verified (every blob hashed against its "
            f"name); benchmark took {time.perf_counter() - started:.0f} s"
        )
        return 0
    except BenchmarkFailure as failure:
        print(f"bench_copy: {failure}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
