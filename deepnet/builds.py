"""A preprocessed variant's builds: each one written complete beside the old set, then switched in one step.

A variant's files live in two folders (train_set<sfx>/, test_set<sfx>/), so no single rename could replace them
all. Instead each build is written, complete and fsynced, into its own folder 1_data_<task>/.builds/<variant>-<id>/;
the switch .builds/<variant>, a symlink, is then pointed at it in one step (a new symlink renamed over the old),
and each documented path is a symlink through the switch. A kill at any moment leaves the old set or the new one:
before the switch the new build is an unused folder (removed by the next build), after it the old one is.

The preprocessing script builds through this module; deepnet/datasets.py says where the builds live.
"""
import contextlib
import fcntl
import itertools
import os
import secrets
import shutil
import signal
import sys
import time

from deepnet.datasets import builds_dir, switch_path, task_dir, variant_files
from deepnet_util import atomic_open, fsync_folder

STEP_HOOK = "DEEPNET_PREPROCESSING_STEP_HOOK"
_step_numbers = itertools.count(1)


def step(name):
    """Mark one change on disk of a build. A test hook: with ${STEP_HOOK}=stop this process prints the step on
    stderr and stops itself (SIGSTOP: a test looks at the folder, then continues it); with =N it kills itself
    (SIGKILL) right after its N-th step."""
    hook, number = os.environ.get(STEP_HOOK), next(_step_numbers)
    if hook == "stop":
        print(f"step {number}: {name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif hook == str(number):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def task_lock(root, task):
    """Hold the task's preprocessing lock (an flock on .builds/.lock, released by the OS when the process dies),
    waiting for another process that holds it: builds of one task never overlap. The lock file is never opened
    through a symbolic link (OSError naming it)."""
    path = os.path.join(builds_dir(root, task), ".lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            print(f"waiting for {handle.read().strip() or 'another process'}, which is preprocessing "
                  f"{task_dir(root, task)}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield


def new_build_folder(root, task, variant):
    """A new, empty build folder .builds/<variant>-<time>-<random>/; its name is the build's id."""
    name = f"{variant}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    folder = os.path.join(builds_dir(root, task), name)
    os.makedirs(folder)
    return folder


def _point(link, target):
    """Make link a symlink to target in one step: a new symlink renamed over it."""
    temporary = os.path.join(os.path.dirname(link), f".tmp_{os.path.basename(link)}.{secrets.token_hex(4)}")
    os.symlink(target, temporary)
    os.replace(temporary, link)
    fsync_folder(os.path.dirname(link))


def switch(root, task, variant, folder):
    """Point the variant's switch at a complete build folder: from here on every documented path shows it."""
    switch = switch_path(root, task, variant)
    if os.path.lexists(switch) and not os.path.islink(switch):  # a copy of the folder that followed the links
        os.rename(switch, new_build_folder(root, task, variant))  # an old build now: removed after the switch
    _point(switch, os.path.basename(folder))
    step(f"switched {variant} to {os.path.basename(folder)}")


def _link_target(root, task, variant, path):
    """What a documented path's symlink holds: the relative path to the same name through the switch."""
    through_switch = os.path.join(os.path.realpath(builds_dir(root, task)), variant, os.path.basename(path))
    return os.path.relpath(through_switch, os.path.realpath(os.path.dirname(path)))


def _links_through_switch(root, task, variant):
    """Whether the switch and every documented path of the variant are this layout's symlinks."""
    return os.path.islink(switch_path(root, task, variant)) and all(
        os.path.islink(path) and os.readlink(path) == _link_target(root, task, variant, path)
        for path in variant_files(root, task, variant))


def adopt_layout(root, task, variant):
    """Make every documented path of the variant a symlink through its switch, keeping what it shows now.

    The files found (this suite's older layout, the original's pickles, or a layout whose adoption was killed) are
    hard-linked (else copied) into a build folder, the switch is pointed at it, then each path is replaced by a
    symlink to the same file: a kill at any moment leaves every path showing the files it showed before, and the
    next build adopts again what is left.
    """
    if _links_through_switch(root, task, variant):
        return
    kept = new_build_folder(root, task, variant)
    for path in variant_files(root, task, variant):
        if os.path.exists(path):
            _keep(path, os.path.join(kept, os.path.basename(path)))
    fsync_folder(kept)
    step(f"kept the current {variant} files in {kept}")
    switch(root, task, variant, kept)
    for path in variant_files(root, task, variant):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        target = _link_target(root, task, variant, path)
        if not (os.path.islink(path) and os.readlink(path) == target):
            _point(path, target)
            step(f"linked {path}")


def _keep(path, destination):
    """The file at path (a symlink followed) also at destination: a hard link, else a copy (another file system)."""
    try:
        os.link(os.path.realpath(path), destination)
    except OSError:
        with open(path, "rb") as handle, atomic_open(destination) as out:
            shutil.copyfileobj(handle, out)


def leftovers(root, task, variant):
    """The variant's build folders other than the current one and its leftover temporary names: what a finished
    or killed build leaves behind. Removed only under the task's lock: another process's build in progress looks
    the same."""
    builds, switch = builds_dir(root, task), switch_path(root, task, variant)
    current = os.path.basename(os.readlink(switch)) if os.path.islink(switch) else None
    found = [os.path.join(builds, name) for name in (os.listdir(builds) if os.path.isdir(builds) else [])
             if name.startswith(f"{variant}-") and name != current or name.startswith(f".tmp_{variant}.")]
    temporary = tuple(f".tmp_{os.path.basename(path)}." for path in variant_files(root, task, variant))
    for folder in {os.path.dirname(path) for path in variant_files(root, task, variant)}:
        found += [os.path.join(folder, name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                  if name.startswith(temporary)]
    return found


def remove_leftovers(root, task, variant):
    """Remove what leftovers lists (under the task's lock)."""
    for path in leftovers(root, task, variant):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        step(f"removed {path}")
