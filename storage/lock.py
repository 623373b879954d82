"""An exclusive lock on an image folder, so two writers never mix their images."""

import errno
import fcntl
import os
import stat
import time

from storage.errors import ImageBusy, UnsafePath
from storage.layout import lock_path


class ImageLock:
    """Hold an exclusive `flock` on the folder's lock file while in use.

    `wait` is how many seconds to wait for another holder to finish; 0 fails at
    once with `ImageBusy`. The lock belongs to the open file, so it is released
    when the holder exits, however it exits: a killed copy never leaves a stale
    lock. The lock file stays in the folder; it is part of the layout as far as
    this package is concerned and is removed with the image.
    """

    def __init__(self, folder: str, wait: float = 0.0):
        self.folder = folder
        self.wait = wait
        self._descriptor: int | None = None

    def acquire(self) -> "ImageLock":
        path = lock_path(self.folder)
        # Never follow a link: the holder's PID is written into the file, and a
        # planted link would have it overwrite a file outside the image.
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise UnsafePath(f"lock file {path} is a symbolic link") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise UnsafePath(f"lock file {path} is not a regular file")
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(descriptor, 64, 0).decode(errors="replace")
                    os.close(descriptor)
                    holder = f" (held by process {holder.strip()})" if holder else ""
                    raise ImageBusy(
                        f"{self.folder} is being written by another dirimage "
                        f"process{holder}; try again when it has finished"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> "ImageLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
