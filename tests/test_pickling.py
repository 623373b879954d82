"""Every value that crosses a task boundary survives pickling.

On a Dask cluster each task's arguments travel to a worker and its result (or
the error it raised) travels back, pickled by Dask (cloudpickle) or by plain
pickle. The values here come from real calls on real images, and a check over
every task's type hints makes sure no task takes or returns a type left out.
"""

import importlib
import inspect
import pickle
import pkgutil
import shutil
import types
import typing
from pathlib import Path

import cloudpickle
import pytest

import imagekit
import storage
import tasks
from storage.transfer import BlobTransfer

SERIALIZERS = {"pickle": pickle, "cloudpickle": cloudpickle}
PLAIN_TYPES = {str, int, float, bool, bytes, type(None)}
HELLO_IMAGE = Path(__file__).parent / "data" / "hello"


def round_trip(value, serializer: str):
    return pickle.loads(SERIALIZERS[serializer].dumps(value))


def all_tasks() -> dict[str, object]:
    """Every Prefect task defined in the `tasks` package, by qualified name."""
    from prefect import Task

    found = {}
    for module_info in pkgutil.iter_modules(tasks.__path__, "tasks."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, Task) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def leaf_types(hint) -> set[type]:
    """The classes a type hint is made of: `list[BlobRef] | None` gives both."""
    arguments = typing.get_args(hint)
    if arguments:
        origin = typing.get_origin(hint)
        leaves = set().union(*(leaf_types(argument) for argument in arguments))
        if isinstance(origin, type) and origin is not types.UnionType:
            leaves.add(origin)
        return leaves
    if hint is None:
        return {type(None)}
    return {hint} if isinstance(hint, type) else {type(hint)}


@pytest.fixture(scope="module")
def samples(dir_images, tmp_path_factory) -> dict[type, list]:
    """Real values of every type a task takes or returns, from real calls."""
    from storage.delete import delete_image
    from storage.tree import plan_mirror

    scratch = tmp_path_factory.mktemp("pickling")
    plans = [storage.plan_image(str(HELLO_IMAGE))] + [
        storage.plan_image(str(dir_images[kind])) for kind in ("index", "signed")
    ]
    blobs = [blob for plan in plans for blob in plan.blobs]
    instances = [instance for plan in plans for instance in plan.instances]

    destination = scratch / "copy"
    transfers = [
        storage.transfer_blob(str(HELLO_IMAGE), str(destination), b.digest, b.size)
        for b in plans[0].blobs
    ]
    transfers.append(
        storage.transfer_blob(
            str(HELLO_IMAGE), str(destination), blobs[0].digest, blobs[0].size
        )
    )
    mirror = plan_mirror(str(dir_images["index"]), str(scratch / "mirror"), "index")
    doomed = shutil.copytree(dir_images["oci"], scratch / "doomed")
    (doomed / "notes.txt").write_text("not part of the layout\n")
    deleted = [delete_image(str(doomed)), delete_image(str(scratch / "absent"))]

    assert {t.action for t in transfers} == {"copied", "reused"}
    assert instances, "the index image has instance manifests"
    assert deleted[0].left == ("notes.txt",) and not deleted[1].existed
    return {
        storage.ImagePlan: plans,
        storage.BlobRef: blobs,
        storage.InstanceManifest: instances,
        BlobTransfer: transfers,
        type(mirror): [mirror],
        type(deleted[0]): deleted,
    }


def test_every_task_type_has_samples(samples):
    """A task taking or returning a new type must add it to `samples`."""
    task_types = set()
    for name, task in all_tasks().items():
        hints = typing.get_type_hints(task.fn)
        for parameter in inspect.signature(task.fn).parameters:
            assert parameter in hints, f"{name} argument {parameter} has no type hint"
        assert "return" in hints, f"{name} has no return type hint"
        for hint in hints.values():
            task_types |= leaf_types(hint)

    containers = {list, tuple, dict, set, frozenset}
    missing = task_types - PLAIN_TYPES - containers - set(samples)
    assert not missing, f"no pickling samples for {sorted(map(str, missing))}"
    assert storage.ImagePlan in task_types and BlobTransfer in task_types


@pytest.mark.parametrize("serializer", sorted(SERIALIZERS))
def test_task_values_round_trip(samples, serializer):
    for kind, values in samples.items():
        for value in values:
            copy = round_trip(value, serializer)
            assert type(copy) is kind
            assert copy == value, f"{kind.__name__} changed in a {serializer} trip"
    # Lists as tasks take and return them, with shared members.
    batch = samples[storage.BlobRef][:3] * 2
    assert round_trip(batch, serializer) == batch


def real_task_errors(dir_images, scratch: Path) -> list[BaseException]:
    """Errors the storage calls inside tasks raise, caught from real calls."""
    errors = []

    def catch(call, *arguments):
        with pytest.raises(storage.ImageError) as caught:
            call(*arguments)
        errors.append(caught.value)

    source = shutil.copytree(HELLO_IMAGE, scratch / "source")
    plan = storage.plan_image(str(source))
    blob = max(plan.blobs, key=lambda b: b.size or 0)
    catch(storage.parse_digest, "sha256:../etc/passwd")
    catch(storage.plan_image, str(scratch))
    catch(storage.transfer_blob, str(source), str(scratch / "d1"), "sha256:" + "0" * 64)
    catch(storage.transfer_blob, str(source), str(scratch / "d2"), blob.digest, 1)
    blob_path = source / blob.digest.split(":")[1]
    data = bytearray(blob_path.read_bytes())
    data[-1] ^= 0xFF
    blob_path.write_bytes(bytes(data))
    catch(storage.transfer_blob, str(source), str(scratch / "d3"), blob.digest)
    (source / "manifest.json").write_text("{not json")
    catch(storage.plan_image, str(source))
    with storage.ImageLock(str(source)):
        catch(storage.ImageLock(str(source)).acquire)
    foreign = scratch / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    catch(storage.DirImageDestination, str(foreign))
    return errors


@pytest.mark.parametrize("serializer", sorted(SERIALIZERS))
def test_task_errors_round_trip(dir_images, tmp_path, serializer):
    errors = real_task_errors(dir_images, tmp_path)

    kinds = {type(error) for error in errors}
    expected = {
        storage.InvalidDigest,
        storage.NotAnImage,
        storage.BlobNotFound,
        storage.SizeMismatch,
        storage.DigestMismatch,
        storage.InvalidManifest,
        storage.ImageBusy,
        storage.FolderNotEmpty,
    }
    assert expected <= kinds, f"missing {expected - kinds}"
    for error in errors:
        copy = round_trip(error, serializer)
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.args == error.args
        if isinstance(error, OSError):
            assert (copy.errno, copy.filename) == (error.errno, error.filename)


@pytest.mark.parametrize("serializer", sorted(SERIALIZERS))
def test_flow_results_round_trip(prefect_api, dir_images, tmp_path, serializer):
    """Flow results too: a deployment's flow runs in another process."""
    from flows.copy import CopySummary, ImageCorrupt, copy_image, verify_image
    from flows.runners import RunnerUnavailable

    summary = copy_image(str(dir_images["index"]), str(tmp_path / "copy"))
    report = verify_image(str(tmp_path / "copy"))
    assert isinstance(summary, CopySummary) and summary.transfers
    assert round_trip(summary, serializer) == summary
    assert round_trip(report, serializer) == report

    blob = next(path for path in imagekit.blob_files(tmp_path / "copy"))
    blob.write_bytes(b"damaged")
    with pytest.raises(ImageCorrupt) as caught:
        verify_image(str(tmp_path / "copy"))
    for error in (caught.value, RunnerUnavailable("dask")):
        copy = round_trip(error, serializer)
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy) == vars(error)
