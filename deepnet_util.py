"""Small shared pieces: exit statuses and one-line errors, quiet TensorFlow import, the run lock, safe pickles,
atomic writes, a clock and a progress bar."""
import contextlib
import ctypes
import errno
import fcntl
import functools
import io
import json
import os
import pickle
import secrets
import shutil
import sys
import tempfile
import threading

# The exit statuses of the suite's scripts, one meaning each (a run stopped by a signal: 128 + its number).
EXIT_FAILED = 1             # a run cannot go on: a file it needs is unreadable, a write failed
EXIT_BAD_INPUT = 2          # bad input: nothing was written
EXIT_RUNNING_ELSEWHERE = 75  # the run is trained by another live process (its lock is held); sysexits' EX_TEMPFAIL


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class RunError(Exception):
    """A run cannot go on (a file it needs is unreadable, a write failed): one line on stderr, exit status 1."""


class RunningElsewhere(Exception):
    """The run's lock is held by another live process: one line on stderr, exit status 75."""


def fail(message, status=EXIT_BAD_INPUT):
    """Print one error line and exit with status (default 2, bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def run_cli(main, argv=None):
    """Call main(argv) with one-line errors: bad input exits 2; a run another process is training 75; a failed write
    (e.g. a full disk), an unreadable file or a TensorFlow I/O error 1; Ctrl-C outside the training loop 130."""
    try:
        return main(argv)
    except UserError as err:
        fail(str(err))
    except RunningElsewhere as err:
        fail(str(err), EXIT_RUNNING_ELSEWHERE)
    except RunError as err:
        fail(str(err), EXIT_FAILED)
    except OSError as err:
        fail(f"{err.filename or '(unknown file)'}: {err.strerror or err}", EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if not is_tf_error(err):
            raise
        fail(tf_error_reason(err), EXIT_FAILED)


def is_tf_error(err):
    """Whether err is one of TensorFlow's OpErrors (tested by module, so that nothing imports TensorFlow)."""
    return type(err).__module__ == "tensorflow.python.framework.errors_impl"


def tf_error_reason(err):
    """The informative line of a TensorFlow error, whose message is a multi-line trace of the graph: the line
    before its '[[node ...]]' marker (e.g. '<file>; No space left on device'), else its first line."""
    lines = [line.strip() for line in str(getattr(err, "message", err)).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if line.startswith("[["):
            return before
    return lines[0] if lines else type(err).__name__


SUMMARY_THREAD = "EventLoggerThread"          # tf.summary.FileWriter's writing thread
SUMMARY_THREAD_ERROR = "EventFileWriter writer thread error"   # the log line it writes when it fails


def _quiet_summary_thread(hook):
    """threading.excepthook without the summary writer thread's tracebacks (its writer raises them again)."""
    def quiet(args):
        if args.thread is None or args.thread.name != SUMMARY_THREAD:
            hook(args)
    return quiet


@functools.lru_cache(maxsize=None)
def import_tf():
    """Import the TF1 graph-mode API with TensorFlow's log spam switched off.

    TensorFlow's C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL in recent releases, so stderr is
    parked in a temporary file during the import and replayed only if the import fails. The summary writer's own
    thread reports its failure (e.g. a full disk) in a log line and a traceback; both are dropped, since the writer
    raises the same error at its next call, which the trainer reports in one line.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as parked:
        os.dup2(parked.fileno(), 2)
        try:
            import tensorflow.compat.v1 as tf
            tf.get_logger().setLevel(logging.ERROR)
            tf.get_logger().addFilter(lambda record: not str(record.msg).startswith(SUMMARY_THREAD_ERROR))
            threading.excepthook = _quiet_summary_thread(threading.excepthook)
            if tf.executing_eagerly():
                tf.disable_v2_behavior()
        except BaseException:
            os.dup2(saved_fd, 2)
            parked.seek(0)
            sys.stderr.write(parked.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
    return tf


# ---------------------------------------------------------------- run lock

class RunLock:
    """An exclusive flock on the run folder: released by the OS when the process dies. The lock file is never
    opened through a symbolic link (nothing the suite did not make is truncated or written)."""

    def __init__(self, path):
        self.path, self.handle = path, None

    @staticmethod
    def holder(path):
        """Who holds the lock at path ('' if nobody; OSError if it cannot be read, e.g. it is a symbolic link)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return ""
        with os.fdopen(fd) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return ""

    def acquire(self, waiting=None):
        """Take the lock, or raise RunningElsewhere naming its holder; with waiting (a function of the holder's
        text, e.g. one that prints a line), call it and wait for the lock instead."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.handle = open_lock_file(self.path)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = self.handle.read().strip() or "another process"
            if waiting is None:
                self.handle.close()
                folder = os.path.dirname(self.path)
                raise RunningElsewhere(f"{folder}: this run is already running ({other})") from None
            waiting(other)
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        self.handle.flush()

    def release(self):
        self.handle.close()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def open_lock_file(path):
    """The lock file at path opened for reading and writing, created with the umask's permissions; a symbolic
    link there is refused (RunError): the suite writes no file through a link it did not make."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise RunError(f"{path}: is a symbolic link, not a lock file the suite made; remove it (what it points "
                       "to is not needed) and run again") from None
    return os.fdopen(fd, "r+")


# ---------------------------------------------------------------- restricted unpickling

_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "slice"),
    ("builtins", "bytearray"), ("builtins", "range"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)
        from deepnet.names import shown  # here: deepnet.names imports this module
        raise pickle.UnpicklingError(f"refused global {shown(f'{module}.{name}')} (only numpy arrays and "
                                     "builtin containers are allowed)")


def load_pickle(path, encoding="ASCII"):
    """Load a pickle that may hold only numpy arrays/dtypes and builtin containers.

    Any problem (missing, truncated, malformed, forbidden content, and any exception while unpickling, such as an
    unknown codec for _codecs.encode) raises UserError naming the file, in one line. Python-2 pickles (the official
    CIFAR batches) need encoding='bytes'.
    """
    from deepnet.names import shown  # here: deepnet.names imports this module
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: {err}") from None
    except Exception as err:  # whatever the file makes the unpickler or an allowed global raise
        raise UserError(f"{path}: not a valid pickle ({type(err).__name__}: {shown(err)})") from None


# ---------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_open(path):
    """Yield a binary file handle on a temporary file beside path; it replaces path only if the block completes.
    The temporary file has a new, unique name (it never opens an existing file or link) and the umask's
    permissions, so a group that shares the experiment shares its files; a link at path is replaced, not followed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_unique(folder, f".tmp_{os.path.basename(path)}.")  # named: its owner cleans up
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = path  # a failed write() names no file: name the one being written
        raise


def create_unique(folder, prefix):
    """(fd, path) of a new file prefix<8 random characters> in folder, opened for writing, with the umask's
    permissions (0666 minus the umask, or the folder's default ACL)."""
    while True:
        path = os.path.join(folder, prefix + secrets.token_hex(4))
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


def append_to(path):
    """path opened for appending (binary), created with the umask's permissions and never through a symbolic link:
    a link there is replaced by an empty file first (what it points to is not touched)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        with atomic_open(path):
            pass
        fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "ab")


def make_folders(base, path):
    """Create the folders from base (which exists; it may be a link the user chose) down to path, each with the
    umask's permissions (and the group of a setgid parent). A symbolic link or a file on the way raises OSError
    naming it: the suite writes only into folders it made."""
    current = base
    for part in os.path.relpath(path, base).split(os.sep):
        current = os.path.join(current, part)
        try:
            os.mkdir(current)
        except FileExistsError:
            pass
        if os.path.islink(current):
            raise OSError(errno.ELOOP, "is a symbolic link, not a folder the suite made", current)
        if not os.path.isdir(current):
            raise NotADirectoryError(errno.ENOTDIR, "is not a directory", current)


def remove_path(path, ignore_errors=False):
    """Delete a file or a folder tree; a symbolic link is removed itself, never followed. ignore_errors: a tree is
    removed as far as it can be (shutil.rmtree's)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    elif os.path.lexists(path):
        os.unlink(path)


RENAME_EXCHANGE = 2     # linux/fs.h: renameat2 swaps the two names
AT_FDCWD = -100         # fcntl.h: paths relative to the working directory


def exchange(a, b):
    """Swap the names a and b in one step (Linux renameat2 RENAME_EXCHANGE, on ext4, xfs, btrfs, tmpfs, ...).
    False where the system or the file system cannot (no renameat2, or NFS and others: EINVAL); OSError else."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def replace_folder(new, final):
    """Put the complete folder new in final's place (both in one folder); returns (old, note): old is where the
    previous final (a folder, file or link) now is, for the caller to delete, or None; note is '' when the swap was
    one step, else the one line saying that this file system needed two renames (a kill between them leaves no
    final, and both sets under temporary names)."""
    if not os.path.lexists(final):
        os.rename(new, final)
        return None, ""
    if exchange(new, final):
        return new, ""
    old = new + ".old"
    os.rename(final, old)
    os.rename(new, final)
    return old, (f"note: this file system cannot swap two folders in one step (renameat2 RENAME_EXCHANGE), "
                 f"so {final} was replaced by two renames")


def fsync_folder(path):
    """Make the names in a folder durable (after renames)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write data to path through a temporary file and a rename: readers see old or new, never half."""
    with atomic_open(path) as handle:
        handle.write(data)


def save_pickle(path, obj):
    atomic_write_bytes(path, pickle.dumps(obj, protocol=4))


def save_pickle_streamed(path, obj):
    """Atomic like save_pickle, but pickles (protocol 5) straight into the file: large numpy arrays are written
    from their own memory, with no in-memory copy of the pickle (load_pickle reads it)."""
    with atomic_open(path) as handle:
        pickle.dump(obj, handle, protocol=5)


MAX_JSON_DEPTH = 32  # the suite's JSON files nest a few levels; deeper ones would break what reads them


def load_json_object(path):
    """The JSON object (dict) in path, or None when it is missing, unreadable, not an object or nested deeper than
    MAX_JSON_DEPTH."""
    try:
        with open(path) as handle:
            value = json.load(handle)
    except Exception:  # OSError, ValueError, RecursionError (nesting beyond the interpreter's limit), MemoryError
        return None
    return value if isinstance(value, dict) and not nested_deeper(value, MAX_JSON_DEPTH) else None


def nested_deeper(value, depth):
    """Whether the lists and dicts in value nest more than depth levels (counted level by level, no recursion)."""
    level = [value]
    for _ in range(depth + 1):
        containers = [item for item in level if isinstance(item, (list, dict))]
        if not containers:
            return False
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return True


def save_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
                       .encode())


def save_text(path, text):
    atomic_write_bytes(path, text.encode())


def _json_default(value):
    import numpy as np
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clock(seconds):
    """Seconds as H:MM:SS (rounded; negative as 0)."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress(iterable, total, label, stream=sys.stderr, width=30):
    """A minimal progress bar for long data work (no extra dependency)."""
    for i, item in enumerate(iterable, 1):
        yield item
        done = int(width * i / max(total, 1))
        end = "\n" if i == total else ""
        stream.write(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{total}{end}")
        stream.flush()
