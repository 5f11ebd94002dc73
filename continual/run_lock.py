"""One run per step folder: a lock file holding the owner's pid and host.

``train_continual.py`` takes the lock of ``OUTPUT_DIR`` before it writes anything there and
releases it when it ends. A second run into the same folder stops with :class:`RunLockedError`
naming the running process. A lock left by a process that no longer exists (same host) is
reported and taken over; a lock of another host cannot be checked and stops with how to remove it.
"""
import json
import logging
import os
import socket
import time
from typing import Optional

__all__ = ["LOCK_NAME", "RunLockedError", "RunLock"]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the step folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(folder): ...`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # released in between
                    continue
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    logger.warning("%s: stale lock of process %d (started %s on %s), which no longer runs; "
                                   "taking it over", self.path, pid, owner.get("started", "?"), host)
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                if host == me["host"] and pid is not None:
                    raise RunLockedError(
                        f"{self.folder} is in use by process {pid} on {host} (started "
                        f"{owner.get('started', '?')}; lock file {self.path}). Two runs into one step folder "
                        f"would overwrite each other's weights and results: wait for it to end, stop it, or "
                        f"use another NAME or OUTPUT_DIR."
                    )
                raise RunLockedError(
                    f"{self.folder} is locked by {self.path} (process {pid} on host {host!r}), which cannot be "
                    f"checked from here. If no run uses this folder any more, delete {self.path}; otherwise "
                    f"use another NAME or OUTPUT_DIR."
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: it keeps changing; another run starts there")

    def release(self) -> None:
        if not self.held:
            return
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
