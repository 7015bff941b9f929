"""Fault injection: SIGKILL a small training run at random moments, resume it, compare recorders.

    python bench/fault_injection.py [--n 10] [--seed 0] [--keep-dir DIR]

Runs a tiny synthetic experiment once without interruption (the reference), then N trials. Each
trial starts the same command in its own folder, kills it with SIGKILL at a moment picked by the
trial's plan, and reruns the command until the run completes (a rerun may be killed again). Plans:
  startup     a random moment before training starts (TF import, graph, restore, mb-0 validation)
  training    a random moment between the first status line and the end of training
  checkpoint  while a checkpoint folder is being written (models/.tmp_ckpt_* exists)
  commit      just after a checkpoint folder appears (pruning, recorder, run info, plots)
  test        a random moment after the last status line (early stopping, test, cleanup)
A trial is identical when its final recorder equals the reference bit for bit (floats exactly,
arrays elementwise, every key); clean when models/ holds only the tested checkpoint and no
temporary file or folder is left anywhere.
Prints one line per trial and then `identical=<k>/<n>`.
"""
import argparse
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

from deepnet_util import load_pickle, save_pickle  # noqa: E402

PLANS = ("checkpoint", "training", "commit", "test", "startup")
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


def run_dir(folder):
    return os.path.join(folder, "3_output_cifar", "faults", SPEC, f"run_{RUN}")


def record_path(folder):
    return os.path.join(run_dir(folder), f"record_{SPEC}_run_{RUN}.pkl")


# ---------------------------------------------------------------- one process

class Process:
    """deepnet_main.py in a folder, its stdout lines time-stamped by a reader thread."""

    def __init__(self, folder):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "deepnet_main.py")] + FLAGS,
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
    models = os.path.join(run_dir(folder), "models")
    try:
        return {name for name in os.listdir(models) if name.startswith("ckpt_mb_")}
    except FileNotFoundError:
        return set()


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


def trial(work, index, plan, rng, timing, max_attempts=8):
    """Kill according to plan, then rerun (maybe killing once more at random) until complete."""
    folder = make_run_folder(work, f"trial_{index:02d}")
    events, code = [], None
    for attempt in range(max_attempts):
        proc = Process(folder)
        event = None
        if attempt == 0:
            event = KILLERS[plan](proc, folder, rng, timing)
        elif attempt == 1 and rng.random() < 0.3:
            event = "again: " + KILLERS[rng.choice(PLANS)](proc, folder, rng, timing)
        code = proc.wait()
        if event is not None and code == -signal.SIGKILL:
            events.append(f"{event} (killed; last status {proc.last_status()})")
        elif event is not None:
            events.append(event if "ended before" in event else f"{event}: ended before the kill")
        if code == 0 and os.path.exists(record_path(folder)) and load_pickle(record_path(folder))["test_completed"]:
            break
        if code not in (0, -signal.SIGKILL):
            events.append(f"exit {code}: {proc.lines[-1][1] if proc.lines else ''}")
    return folder, events, attempt + 1, code


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
    clean = left == [f"ckpt_mb_{record['early_stopping_mb']}"] and not temporary
    return not diffs, clean, (diffs[0] if diffs else f"models/: {left}, temporary files: {temporary}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10, help="number of killed-and-resumed trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plans and moments")
    p.add_argument("--keep-dir", default=None, help="work in this (new) folder and keep it")
    args = p.parse_args()
    if args.n < 1:
        p.error("--n must be at least 1")
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
        for i in range(args.n):
            plan = PLANS[i % len(PLANS)]
            folder, events, attempts, code = trial(work, i + 1, plan, rng, timing)
            same, tidy, note = judge(folder, reference)
            identical, clean = identical + same, clean + tidy
            print(f"trial {i + 1:2d} plan {plan:10s} kills: {'; '.join(events) or '-'} | processes {attempts} "
                  f"| exit {code} | {'identical' if same else 'DIFFERENT'} | {'clean' if tidy else 'NOT CLEAN'}"
                  + ("" if same and tidy else f" | {note}"), flush=True)
        print(f"clean={clean}/{args.n}")
        print(f"identical={identical}/{args.n}  ({time.time() - began:.0f} s)")
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
