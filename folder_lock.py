"""The lock that gives a checkpoint folder to one training run for the run's whole life: an flock on
`<folder>/.run.lock`, kept by a watcher thread that puts the file back when it is removed and stops
the run when another run has taken the folder."""

import contextlib
import errno
import os
import socket
import threading
import time

from runtime import InputError

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock, as before
    fcntl = None

LOCK_NAME = ".run.lock"
WATCH_SECONDS = 1.0  # how often the watcher compares the held file with the path
_HELD_LOCKS = set()  # the lock files this process holds


def _drop_inherited_locks():
    """In a forked child (a DataLoader worker), close the parent's lock files: an flock belongs to the
    open file, which a fork shares, so a worker would otherwise hold the folder after its run died."""
    for file in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            file.close()
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _flock(file):
    """An exclusive lock on `file` without waiting; False when another open file holds it."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


class FolderLock:
    """An exclusive OS lock on `<folder>/.run.lock`, held for the life of a training run. The OS drops it
    when the process ends, however it ends (kill -9 included): no stale lock. The file keeps the holder's
    PID, host and start time for a second run's message. flock locks are per open file, so two runs in
    one process exclude each other too. A lock file removed under the run leaves the lock on a file no
    path names, so a watcher thread checks every WATCH_SECONDS that the path names the held file: a
    removed one is put back (locked before it appears); one another run holds is `lost`, `on_lost(err)`
    is called once, and `check` (before each save) raises it."""

    def __init__(self, folder, watch=WATCH_SECONDS):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.file, self.holder, self.what = None, None, "training.checkpoint_dir"
        self.lost = None  # InputError: another run took the folder while this one held it
        self.on_lost = None  # called with that error by the watcher (run.py: stop the run)
        self.watch = watch
        self._mutex, self._done = threading.Lock(), threading.Event()

    def acquire(self, what="training.checkpoint_dir"):
        """Take the lock or raise InputError naming the folder and the run that holds it."""
        if fcntl is None:
            return self
        self.what = what
        file = self._take()
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self._hold(file, rewrite=True)
        if self.watch:
            self._done = threading.Event()
            threading.Thread(target=self._watch, args=(self._done,), name="folder-lock", daemon=True).start()
        return self

    def _take(self):
        """The lock file at the path, opened (created if missing) and locked; InputError naming the holder."""
        try:
            file = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise InputError(f"{self.what} {self.folder!r}: cannot create the lock file {LOCK_NAME} "
                             f"({e.strerror or e})") from None
        try:
            locked = _flock(file)
        except OSError as e:
            file.close()
            raise InputError(f"{self.what} {self.folder!r}: cannot lock {LOCK_NAME} ({e.strerror or e})") from None
        if locked and not self.names(file):  # removed or replaced between open and flock: lock the file there now
            file.close()
            return self._take()
        if not locked:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise InputError(f"{self.what} {self.folder!r} is in use by another training run ({holder}); one folder "
                             "holds one run: wait for it to finish, stop it, or choose another one")
        return file

    def _hold(self, file, rewrite):
        """Make `file` (locked) the held one, with this run's holder line; the previous one is closed."""
        if rewrite:
            file.seek(0)
            file.truncate()
            file.write(self.holder + "\n")
            file.flush()
        if self.file is not None:
            _HELD_LOCKS.discard(self.file)
            self.file.close()
        self.file = file
        _HELD_LOCKS.add(file)

    def names(self, file):
        """Whether the lock file's path still names `file` (rm or a copy over it makes another file)."""
        try:
            return os.path.samestat(os.fstat(file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _restore(self):
        """Put a removed lock file back: a new file, locked and holding the holder line before a link
        gives it the path, so a second run never finds it empty or free. False when the path was
        taken meanwhile."""
        tmp = os.path.join(self.folder, f"{LOCK_NAME}.{os.getpid()}.tmp")  # atomic_write's orphan pattern
        file = open(tmp, "w+", encoding="utf-8")
        try:
            _flock(file)
            file.write(self.holder + "\n")
            file.flush()
            os.link(tmp, self.path)
        except FileExistsError:
            file.close()
            return False
        except OSError:
            file.close()
            raise
        finally:
            os.remove(tmp)
        self._hold(file, rewrite=False)
        return True

    def _keep(self):
        """One look (under the mutex): the path names the held file, or is made to, or `lost` is set."""
        if self.file is None or self.lost is not None or self.names(self.file):
            return
        if not os.path.lexists(self.path) and self._restore():
            return
        try:  # another file at the path: take it when no run holds it
            self._hold(self._take(), rewrite=True)
        except InputError as err:
            self.lost = InputError(f"{LOCK_NAME} was removed while this run held it: {err}; this run stops "
                                   "without writing, so as not to overwrite that run's checkpoints")

    def _watch(self, done):
        while not done.wait(self.watch):
            with self._mutex:
                with contextlib.suppress(OSError):  # a vanished or read-only folder: the next save says so
                    self._keep()
                lost = self.lost
            if lost is not None:
                if self.on_lost is not None:
                    self.on_lost(lost)
                return

    def check(self):
        """Before each save: the path names the held file (locked again if needed), or InputError naming who took it."""
        with self._mutex, contextlib.suppress(OSError):  # a vanished or read-only folder: the save says so
            self._keep()
        if self.lost is not None:
            raise self.lost

    def release(self, remove=False):
        """Drop the lock (closing the file drops it); `remove`: the file too, when the path still names it."""
        self._done.set()
        with self._mutex:
            if self.file is not None:
                if remove and self.names(self.file):
                    with contextlib.suppress(OSError):
                        os.remove(self.path)
                _HELD_LOCKS.discard(self.file)
                self.file.close()
                self.file = None

    def __enter__(self):
        return self if self.file is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()
