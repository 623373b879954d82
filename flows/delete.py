"""The delete_image flow."""

from prefect import flow, get_run_logger

from flows.copy import image_path
from flows.parameters import FolderPath, Seconds
from storage.delete import DeleteResult
from tasks import tree as tree_tasks


@flow(name="delete-image", persist_result=False)
def delete_image(path: FolderPath, wait: Seconds = 0.0) -> DeleteResult:
    """Delete the image in a dir: folder: its layout files, then the empty folder.

    Files that are not part of the layout stay where they are, with a warning, and
    so does the folder holding them. Deleting a folder that is already gone
    succeeds and does nothing.

    Args:
        path: Folder of the image (a `dir:` prefix is accepted).
        wait: Seconds to wait for a copy into the same folder to finish.

    Raises:
        storage.NotAnImage: The folder holds no image; nothing was touched.
        storage.ImageBusy: A copy into the folder is still running.
    """
    logger = get_run_logger()
    result = tree_tasks.delete_image(image_path(path), wait)
    if not result.existed:
        logger.info("%s does not exist; nothing to delete", result.path)
    elif result.left:
        message = (
            f"{result.path}: left {len(result.left)} entries that are not part of "
            f"the image: {', '.join(result.left)}"
        )
        logger.warning("%s", message)
    else:
        logger.info("Deleted %s (%d files)", result.path, len(result.removed))
    return result
