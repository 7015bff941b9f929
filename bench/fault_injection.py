"""Fault injection: SIGKILL a small training run at random moments, damage its files, change its data or
its threads, fill its disk; resume it and compare recorders.

    python bench/fault_injection.py [--n 10] [--seed 0] [--keep-dir DIR] [--only TEXT]

Runs a tiny synthetic experiment once without interruption (the reference), then N kill trials and one
trial per fault. Every process runs with one thread (as the supervisor gives each of two workers on two
cores), except where a fault says otherwise.

Kill trials start the same command in their own folder, kill it with SIGKILL at a moment picked by the
trial's plan, and rerun the command until the run completes (a rerun may be killed again). Plans:
  startup     a random moment before training starts (TF import, graph, restore, mb-0 validation)
  training    a random moment between the first status line and the end of training
  checkpoint  while a checkpoint folder is being written (models/.tmp_ckpt_* exists)
  commit      just after a checkpoint folder appears (pruning, recorder, run info, plots)
  test        a random moment after the last status line (early stopping, test, cleanup)
Fault trials (FAULTS) start from a copy of a run stopped by SIGTERM after minibatch 32 (checkpoints
0, 23 and the one SIGTERM wrote) or of the complete reference run, damage it, and rerun the command
until the run completes. Where the damage must stop the run (changed data or split: exit 2, nothing
written; a full disk or a file where a folder belongs: exit 1), the stop is checked first (one `error:`
line, no traceback) and the damage then undone, as a user would. So are the faults of a shared folder: the
complete run asked again with another -lr and a training/test pair from two preprocessing builds (refused: exit
2, nothing written), the run's .lock a symbolic link (exit 1, the file it points to unchanged), the run folder
deleted while it trains (exit 1 at its next minibatch or write; the rerun trains the run from the start).
A trial is identical when its final recorder equals the reference bit for bit (floats exactly, arrays
elementwise, every key) and every stop was as documented; clean when models/ holds only the tested
checkpoint and no temporary file or folder is left anywhere.
Prints one line per trial and then `clean=<k>/<n>` and `identical=<k>/<n>` over all trials.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from deepnet import datasets, run_folder  # noqa: E402
from deepnet_util import load_pickle, save_pickle  # noqa: E402

PLANS = ("checkpoint", "training", "commit", "test", "startup")
THREADS = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
HAND_ENV = {k: v for k, v in os.environ.items() if k not in THREADS}  # a shell without the thread settings
RECOVERY_NOTE = re.compile(r"falling back|rebuilt|resuming from")
SPEC, RUN = "fi", 1
N_MINIBATCHES = 48
FLAGS = ["-experiment_name", "faults", "-spec_name", SPEC, "-run", str(RUN), "-network", "smcn",
         "-minibatch_size", "16", "-n_minibatches", str(N_MINIBATCHES), "-val_every", "8",
         "-epochs_between_checkpoints", "1", "-safe_af_ws_n", "3", "-safe_all_ws_n", "1",
         "-af_set", "2_relu+tanh", "-blend_trainable", "True"]


# ---------------------------------------------------------------- data and folders

def write_data(folder, n_train=400, n_test=100, seed=0):
    """Class templates plus noise, as preprocessed cifar10 pickles under folder/1_data_cifar10/."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(10, 32, 32, 3)).astype(np.float32)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.int64)
        images = (templates[labels] + 1.5 * rng.normal(size=(n, 32, 32, 3))).astype(np.float32)
        save_pickle(os.path.join(folder, "1_data_cifar10", f"{split}_set_ztrans", f"cifar10_{split}set.pkl"),
                    {"images": images, "labels": labels})


def make_run_folder(work, name):
    """A folder that sees the shared data as ./1_data_cifar10 (so every run has -path_relative ./)."""
    folder = os.path.join(work, name)
    os.makedirs(folder)
    os.symlink(os.path.join(work, "data", "1_data_cifar10"), os.path.join(folder, "1_data_cifar10"))
    return folder


def copy_run_folder(template, folder, own_data=False):
    """A copy of a run folder; with own_data its data are a copy too (to be changed)."""
    shutil.copytree(template, folder, symlinks=True)
    if own_data:
        link = os.path.join(folder, "1_data_cifar10")
        source = os.readlink(link)
        os.remove(link)
        shutil.copytree(source, link)
    return folder


def run_paths(folder):
    return run_folder.folder_paths(os.path.join(folder, run_folder.OUTPUT_DIR, "faults"), SPEC, RUN)


def run_dir(folder):
    return run_paths(folder)["run_dir"]


def record_path(folder):
    return run_paths(folder)["record"]


# ---------------------------------------------------------------- one process

class Process:
    """deepnet_main.py in a folder, its stdout lines time-stamped by a reader thread."""

    def __init__(self, folder, env=None, flags=()):
        env = dict(env or dict(os.environ, **THREADS), PYTHONUNBUFFERED="1")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "deepnet_main.py")] + FLAGS + list(flags),
                                     cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first_line_time(self, text):
        return next((t for t, line in list(self.lines) if text in line), None)

    def last_status(self):
        """'mb <k>' of the last status line, or '-' before the first."""
        found = [re.search(r"\| (mb \d+)/", line) for _, line in self.lines]
        found = [m.group(1) for m in found if m]
        return found[-1] if found else "-"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self):
        code = self.proc.wait()
        self.reader.join()
        return code


def wait_until(condition, proc, poll=0.0005):
    """Poll condition() until it is true (True) or the process has ended (False)."""
    while proc.proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def temporary_checkpoints(folder, pid):
    """Checkpoint folders that process pid is writing now."""
    models = os.path.join(run_dir(folder), "models")
    try:
        return {name for name in os.listdir(models) if name.startswith(".tmp_ckpt_") and name.endswith(f"_{pid}")}
    except FileNotFoundError:
        return set()


def checkpoints(folder):
    return {os.path.basename(path) for path in run_folder.checkpoint_dirs(run_paths(folder)["models"]).values()}


# ---------------------------------------------------------------- kill plans

def kill_at_startup(proc, folder, rng, timing):
    time.sleep(rng.uniform(0, timing["first_status"]))
    proc.kill()
    return "startup"


def kill_in_training(proc, folder, rng, timing):
    if not wait_until(lambda: proc.first_line_time(f"| mb 0/{N_MINIBATCHES}") or
                      proc.first_line_time("resuming from"), proc):
        return "ended before training"
    time.sleep(rng.uniform(0, timing["training"]))
    proc.kill()
    return "training"


def kill_in_checkpoint(proc, folder, rng, timing):
    """Kill while the k-th checkpoint folder written by this process is still temporary."""
    target, seen, pid = rng.randint(1, timing["n_checkpoints"]), set(), proc.proc.pid

    def writing():
        now = temporary_checkpoints(folder, pid)
        seen.update(now)
        return len(seen) >= target and bool(now)

    if not wait_until(writing, proc):
        return "ended before checkpoint"
    time.sleep(rng.uniform(0, 0.02))
    proc.kill()
    return f"checkpoint write ({sorted(seen)[-1]})"


def kill_after_commit(proc, folder, rng, timing):
    """Kill just after a new checkpoint folder appears: pruning, recorder, run info, plots."""
    before = checkpoints(folder)
    target = rng.randint(1, timing["n_checkpoints"])
    appeared = []

    def committed():
        new = checkpoints(folder) - before - set(appeared)
        appeared.extend(sorted(new))
        return len(appeared) >= target

    if not wait_until(committed, proc):
        return "ended before commit"
    time.sleep(rng.uniform(0, 0.3))
    proc.kill()
    return f"after commit ({appeared[-1]})"


def kill_in_test(proc, folder, rng, timing):
    if not wait_until(lambda: proc.first_line_time(f"| mb {N_MINIBATCHES}/{N_MINIBATCHES}"), proc):
        return "ended before test"
    time.sleep(rng.uniform(0, timing["test"]))
    proc.kill()
    return "test"


KILLERS = {"startup": kill_at_startup, "training": kill_in_training, "checkpoint": kill_in_checkpoint,
           "commit": kill_after_commit, "test": kill_in_test}


# ---------------------------------------------------------------- reference and trials

def reference_run(work):
    """The uninterrupted run: its recorder and the timing of its phases (seconds)."""
    folder = make_run_folder(work, "reference")
    proc = Process(folder)
    code = proc.wait()
    if code != 0:
        sys.exit("reference run failed:\n" + "\n".join(line for _, line in proc.lines[-20:]))
    first = proc.first_line_time(f"| mb 0/{N_MINIBATCHES}")
    last = proc.first_line_time(f"| mb {N_MINIBATCHES}/{N_MINIBATCHES}")
    tested = proc.first_line_time("test of the model of minibatch")
    record = load_pickle(record_path(folder))
    timing = dict(first_status=first - proc.started, training=last - first, test=tested - last,
                  total=time.time() - proc.started, n_checkpoints=len(record["checkpoints"]))
    return record, timing


def differences(a, b, where="record"):
    """Paths at which a and b differ (exact: floats bitwise, arrays elementwise and by dtype)."""
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}[{key!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and \
            a.tobytes() == b.tobytes()
        return [] if same else [f"{where}: arrays differ"]
    if isinstance(a, float):
        return [] if np.float64(a).tobytes() == np.float64(b).tobytes() else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def trial(work, index, plan, rng, timing, max_attempts=8, folder=None, env=None):
    """Kill according to plan (None: no kill), then rerun (maybe killing once more at random) until complete."""
    folder = folder or make_run_folder(work, f"trial_{index:02d}")
    events, code = [], None
    for attempt in range(max_attempts):
        proc = Process(folder, env)
        event = None
        if attempt == 0 and plan is not None:
            event = KILLERS[plan](proc, folder, rng, timing)
        elif attempt == 1 and plan is not None and rng.random() < 0.3:
            event = "again: " + KILLERS[rng.choice(PLANS)](proc, folder, rng, timing)
        code = proc.wait()
        if event is not None and code == -signal.SIGKILL:
            events.append(f"{event} (killed; last status {proc.last_status()})")
        elif event is not None:
            events.append(event if "ended before" in event else f"{event}: ended before the kill")
        if plan is None:  # a fault trial: what the run said about it
            events += [line.split(": ", 1)[1] for _, line in proc.lines if RECOVERY_NOTE.search(line)][:2]
        if code == 0 and os.path.exists(record_path(folder)) and load_pickle(record_path(folder))["test_completed"]:
            break
        if code not in (0, -signal.SIGKILL):
            events.append(f"exit {code}: {proc.lines[-1][1] if proc.lines else ''}")
    return folder, events, attempt + 1, code


# ---------------------------------------------------------------- faults beside the kills

STOP_AFTER_MB = 32


def stopped_template(work):
    """A run stopped by SIGTERM after minibatch STOP_AFTER_MB: checkpoints 0, 23 and the one SIGTERM wrote."""
    folder = make_run_folder(work, "template_stopped")
    proc = Process(folder)
    wait_until(lambda: proc.first_line_time(f"| mb {STOP_AFTER_MB}/"), proc)
    proc.proc.send_signal(signal.SIGTERM)
    if proc.wait() != 128 + signal.SIGTERM:
        sys.exit("the stopped template run did not stop on SIGTERM:\n" + "\n".join(l for _, l in proc.lines[-5:]))
    return folder


def newest_checkpoint(folder):
    return os.path.join(run_dir(folder), "models", max(checkpoints(folder), key=lambda n: int(n.split("_")[-1])))


def truncate(path, keep=0.5):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:int(len(data) * keep)])


def snapshot(folder):
    """{path: (size, mtime)} of every file and folder under folder (links not followed)."""
    return {os.path.join(d, name): (os.lstat(os.path.join(d, name)).st_size,
                                    os.lstat(os.path.join(d, name)).st_mtime_ns)
            for d, dirs, files in os.walk(folder) for name in dirs + files}


def stops_in_one_line(folder, status, watch_nothing_written, flags=()):
    """Run the command (with flags added) once; (ok, event): it must exit with status after one `error:` line and
    no traceback (and, for refusals, write nothing)."""
    before = snapshot(folder)
    proc = Process(folder, flags=flags)
    code = proc.wait()
    lines = [line for _, line in proc.lines]
    last = lines[-1] if lines else ""
    ok = code == status and last.startswith("error: ") and not any("Traceback" in line for line in lines)
    if watch_nothing_written:
        ok = ok and len(lines) == 1 and snapshot(folder) == before
    return ok, f"exit {code}: {last[:160]}"


def data_file(folder, which):
    return os.path.join(folder, "1_data_cifar10", f"{which}_set_ztrans", f"cifar10_{which}set.pkl")


def changed(path, change):
    """Apply change to the pickle at path; returns the undo (put the old bytes back)."""
    with open(path, "rb") as handle:
        saved = handle.read()
    save_pickle(path, change(load_pickle(path)))

    def undo():
        with open(path, "wb") as handle:
            handle.write(saved)
    return undo


def refused_until_undone(change_of):
    """A fault that must be refused (exit 2, nothing written) until it is undone."""
    def fault(folder, rng, timing, events):
        undo = change_of(folder)
        ok, event = stops_in_one_line(folder, 2, True)
        events.append(f"refused: {event}")
        undo()
        return ok
    return fault


def damaged(harm):
    """A fault the next run recovers from by itself."""
    def fault(folder, rng, timing, events):
        harm(folder)
        return True
    return fault


def summaries_file(folder, rng, timing, events):
    summaries = os.path.join(os.path.dirname(os.path.dirname(run_dir(folder))), "0_summaries")
    shutil.rmtree(summaries)
    open(summaries, "w").close()
    ok, event = stops_in_one_line(folder, 1, False)
    events.append(f"stopped: {event}")
    os.remove(summaries)
    return ok


def other_split(split):
    train, val = split
    return np.sort(np.append(train[1:], val[0])), np.sort(np.append(val[1:], train[0]))


def split_path(folder):
    return os.path.join(run_dir(folder), "datasets", "split.pkl")


def lost_recorder_and_af_weights(folder, rng, timing, events):
    """Delete a complete run's recorder and the AF-weights files of its tested minibatch; the rerun must write
    them again, the same bytes (checked after the reruns)."""
    tested = load_pickle(record_path(folder))["early_stopping_mb"]
    files = glob.glob(os.path.join(folder, "3_output_cifar", "faults", "0_af_weights", f"*_mb_{tested}.*"))
    saved = {}
    for path in files:
        with open(path, "rb") as handle:
            saved[path] = handle.read()
        os.remove(path)
    os.remove(record_path(folder))
    events.append(f"deleted the recorder and {len(files)} AF-weights files")

    def rewritten():
        return bool(files) and all(os.path.isfile(p) and open(p, "rb").read() == data for p, data in saved.items())
    return rewritten


def other_settings(folder, rng, timing, events):
    """The complete run asked again with another learning rate: refused (exit 2, one line, nothing written)."""
    ok, event = stops_in_one_line(folder, 2, True, flags=["-lr", "0.01"])
    events.append(f"refused: {event}")
    return ok and "-lr 0.001 -> 0.01" in event


def two_builds(folder):
    """Sidecars that name two preprocessing builds for the training and the test pickle; returns the undo."""
    sidecars = [datasets.sidecar_path(data_file(folder, which)) for which in ("train", "test")]
    for path, build in zip(sidecars, ("build-a", "build-b")):
        with open(path, "w") as handle:
            json.dump({"build": build}, handle)
    return lambda: [os.remove(path) for path in sidecars]


def lock_through_link(folder, rng, timing, events):
    """The run's .lock replaced by a symbolic link to a file outside: the run stops in one line (exit 1) and the
    file the link points to is unchanged; the link is then removed, as a user would."""
    victim, lock = os.path.join(folder, "precious.txt"), run_paths(folder)["lock"]
    with open(victim, "w") as handle:
        handle.write("not the suite's\n")
    if os.path.lexists(lock):
        os.remove(lock)
    os.symlink(victim, lock)
    ok, event = stops_in_one_line(folder, 1, False)
    with open(victim) as handle:
        untouched = handle.read() == "not the suite's\n"
    events.append(f"stopped: {event}" + ("" if untouched else "; THE LINKED FILE CHANGED"))
    os.remove(lock)
    os.remove(victim)
    return ok and untouched


def folder_deleted_in_training(folder, rng, timing, events):
    """The run's folder deleted at a random moment of training: the process stops in one line (exit 1) at its
    next minibatch or write; the user then starts the command again, which trains the run from the start."""
    proc = Process(folder)
    if not wait_until(lambda: proc.first_line_time("resuming from"), proc):
        events.append("ended before training")
        return False
    time.sleep(rng.uniform(0, timing["training"] / 3))
    while os.path.exists(run_dir(folder)):  # the process may write while it is removed
        shutil.rmtree(run_dir(folder), ignore_errors=True)
    code = proc.wait()
    lines = [line for _, line in proc.lines]
    last = lines[-1] if lines else ""
    events.append(f"folder deleted after {proc.last_status()}: exit {code}: {last[:160]}")
    shutil.rmtree(run_dir(folder), ignore_errors=True)  # what the stopped process may have left
    return code == 1 and last.startswith("error: ") and not any("Traceback" in line for line in lines)


FAULTS = {  # name: (what it starts from, its own copy of the data, the fault)
    "newest state.data truncated": ("stopped", False, damaged(
        lambda f: truncate(glob.glob(os.path.join(newest_checkpoint(f), "state.data-*"))[0]))),
    "newest state.index deleted": ("stopped", False, damaged(
        lambda f: os.remove(os.path.join(newest_checkpoint(f), "state.index")))),
    "newest checkpoint deleted": ("stopped", False, damaged(lambda f: shutil.rmtree(newest_checkpoint(f)))),
    "newest recorder.pkl truncated": ("stopped", False, damaged(
        lambda f: truncate(os.path.join(newest_checkpoint(f), "recorder.pkl")))),
    "split.pkl truncated": ("stopped", False, damaged(lambda f: truncate(split_path(f)))),
    "split.pkl deleted": ("stopped", False, damaged(lambda f: os.remove(split_path(f)))),
    "complete run: recorder truncated": ("complete", False, damaged(lambda f: truncate(record_path(f)))),
    "complete run: recorder and AF weights deleted": ("complete", False, lost_recorder_and_af_weights),
    "training data changed, same size": ("stopped", True, refused_until_undone(lambda f: changed(
        data_file(f, "train"), lambda d: dict(d, images=d["images"][::-1].copy())))),
    "training data smaller": ("stopped", True, refused_until_undone(lambda f: changed(
        data_file(f, "train"), lambda d: {"images": d["images"][:384], "labels": d["labels"][:384]}))),
    "test data changed": ("stopped", True, refused_until_undone(lambda f: changed(
        data_file(f, "test"), lambda d: dict(d, labels=(d["labels"] + 1) % 10)))),
    "split.pkl of another split": ("stopped", False, refused_until_undone(
        lambda f: changed(split_path(f), other_split))),
    "0_summaries is a file": ("stopped", False, summaries_file),
    "hand resume without the thread settings": ("stopped", False, damaged(lambda f: None)),
    "complete run asked with other settings": ("complete", False, other_settings),
    "training and test pickle from two builds": ("stopped", True, refused_until_undone(two_builds)),
    "run's .lock a symbolic link": ("stopped", False, lock_through_link),
    "run folder deleted while training": ("stopped", False, folder_deleted_in_training),
    "disk full at a random moment": ("fresh", False, None),
}


def disk_full_trial(folder, rng, timing, events):
    """On a small tmpfs: fill it at a random moment of training; the run must stop in one line (exit 1)."""
    proc = Process(folder)
    if not wait_until(lambda: proc.first_line_time(f"| mb 0/{N_MINIBATCHES}"), proc):
        events.append("ended before training")
        return False
    time.sleep(rng.uniform(0, timing["training"]))
    filler = os.path.join(folder, "filler")
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    code = proc.wait()
    lines = [line for _, line in proc.lines]
    last = lines[-1] if lines else ""
    ok = code == 1 and last.startswith("error: ") and "No space left on device" in last and \
        not any("Traceback" in line for line in lines)
    events.append(f"disk full after {proc.last_status()}: exit {code}: {last[:160]}")
    os.remove(filler)
    return ok


def fault_trial(work, index, name, rng, timing, templates):
    """(folder, events, processes, exit status, stops as documented) of one fault trial; None when the fault
    cannot be made here (a tmpfs needs root)."""
    start, own_data, fault = FAULTS[name]
    folder = os.path.join(work, f"fault_{index:02d}")
    events, env = [], (HAND_ENV if name.startswith("hand resume") else None)
    if start == "fresh":
        if os.geteuid() != 0:
            return None
        os.makedirs(folder)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", folder], check=True)
        os.symlink(os.path.join(work, "data", "1_data_cifar10"), os.path.join(folder, "1_data_cifar10"))
        fault = disk_full_trial
    else:
        copy_run_folder(templates[start], folder, own_data)
    try:
        stops_ok = fault(folder, rng, timing, events)
        _, more, attempts, code = trial(work, index, None, rng, timing, folder=folder, env=env)
        stops_ok = stops_ok() if callable(stops_ok) else stops_ok
        if start == "fresh":  # judge a copy: the tmpfs goes away
            copy_run_folder(folder, folder + "_result")
    finally:
        if start == "fresh":
            subprocess.run(["umount", folder], check=True)
            os.rmdir(folder)
            os.rename(folder + "_result", folder)
    return folder, events + more, attempts, code, stops_ok


def judge(folder, reference):
    """(identical, clean, first difference)."""
    if not os.path.exists(record_path(folder)):
        return False, False, "no recorder"
    record = load_pickle(record_path(folder))
    diffs = differences(reference, record)
    models = os.path.join(run_dir(folder), "models")
    left = sorted(os.listdir(models)) if os.path.isdir(models) else []
    temporary = [os.path.relpath(os.path.join(d, name), folder) for d, dirs, files in os.walk(folder)
                 for name in dirs + files if name.startswith(".tmp") or name.endswith(".tmp.png")]
    clean = left == [os.path.basename(run_folder.checkpoint_dir(models, record['early_stopping_mb']))] and not temporary
    return not diffs, clean, (diffs[0] if diffs else f"models/: {left}, temporary files: {temporary}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10, help="number of killed-and-resumed trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plans and moments")
    p.add_argument("--keep-dir", default=None, help="work in this (new) folder and keep it")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="only the faults whose names contain TEXT, each --n times (no kill trials)")
    args = p.parse_args()
    if args.n < 1:
        p.error("--n must be at least 1")
    chosen = [name for name in FAULTS for _ in range(args.n) if args.only in name] if args.only else list(FAULTS)
    if not chosen:
        p.error(f"--only {args.only}: no fault of that name (faults: {', '.join(FAULTS)})")
    if args.keep_dir and os.path.exists(args.keep_dir):
        p.error(f"--keep-dir {args.keep_dir}: exists already")
    work = os.path.abspath(args.keep_dir) if args.keep_dir else tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    began = time.time()
    try:
        write_data(os.path.join(work, "data"))
        reference, timing = reference_run(work)
        print(f"reference: {timing['total']:.1f} s (first status {timing['first_status']:.1f} s, training "
              f"{timing['training']:.1f} s, test {timing['test']:.1f} s), checkpoints {reference['checkpoints']}, "
              f"early stopping mb {reference['early_stopping_mb']}, test top-1 {reference['test_top1']:.4f}",
              flush=True)
        identical = clean = 0
        for i in range(0 if args.only else args.n):
            plan = PLANS[i % len(PLANS)]
            folder, events, attempts, code = trial(work, i + 1, plan, rng, timing)
            same, tidy, note = judge(folder, reference)
            identical, clean = identical + same, clean + tidy
            print(f"trial {i + 1:2d} plan {plan:10s} kills: {'; '.join(events) or '-'} | processes {attempts} "
                  f"| exit {code} | {'identical' if same else 'DIFFERENT'} | {'clean' if tidy else 'NOT CLEAN'}"
                  + ("" if same and tidy else f" | {note}"), flush=True)
        templates = {"stopped": stopped_template(work), "complete": os.path.join(work, "reference")}
        total = 0 if args.only else args.n
        for i, name in enumerate(chosen, args.n + 1):
            result = fault_trial(work, i, name, rng, timing, templates)
            if result is None:
                print(f"fault {name}: skipped (mounting a small tmpfs needs root)", flush=True)
                continue
            folder, events, attempts, code, stops_ok = result
            same, tidy, note = judge(folder, reference)
            same = same and stops_ok
            identical, clean, total = identical + same, clean + tidy, total + 1
            print(f"fault {name} | {'; '.join(events) or '-'} | processes {attempts} | exit {code} | "
                  f"{'identical' if same else 'DIFFERENT'} | {'clean' if tidy else 'NOT CLEAN'}"
                  + ("" if stops_ok else " | STOP NOT AS DOCUMENTED") + ("" if same and tidy else f" | {note}"),
                  flush=True)
        print(f"clean={clean}/{total}")
        print(f"identical={identical}/{total}  ({time.time() - began:.0f} s)")
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == total else 1


if __name__ == "__main__":
    sys.exit(main())
