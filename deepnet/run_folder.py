"""The one definition of an experiment's and a run's files, and of a run's state. No TensorFlow.

    <path_relative>/3_output_cifar/<experiment>/        an experiment folder (experiment_dir)
        <spec>/run_<run>/                               a run folder (run_paths: every file in it)
            record_<spec>_run_<run>.pkl                 the recorder (docs/recorder.md; read_record)
            status.json                                 state, minibatches, accuracies (RunStatus, read_status)
            .lock                                       held by the process that trains the run (lock_holder)
            models/ckpt_mb_<mb>/                        checkpoints (checkpoint_dirs)
            log_*.txt, run_info_*.txt, *.png, datasets/split.pkl, run_incomplete_mb_<mb>.txt
        0_af_weights/, 0_all_weights/, 0_summaries/<spec>_<run>/, 0_analysis/, 0_jobs/

run_state() says where a run stands, in one vocabulary (STATES); training, the supervisor, --status and the
analysis all ask it.
"""
import glob
import os
import re
import shutil
import time
from collections import namedtuple

from deepnet_util import (RunLock, UserError, atomic_write_bytes, load_json_object, load_pickle, remove_path,
                          save_json)

OUTPUT_DIR = "3_output_cifar"
STATES = ("complete", "damaged", "running", "incomplete", "failed", "not started")


# ---------------------------------------------------------------- where the files are

def project_root(settings, base=None):
    """-path_relative, the folder holding 1_data_<task>/ and 3_output_cifar/; a relative one is taken relative to
    base (None: the working directory, as deepnet_main.py sees it)."""
    root = settings["path_relative"]
    return os.path.normpath(os.path.join(base, root)) if base is not None and not os.path.isabs(root) else root


def experiment_dir(settings, base=None):
    """<path_relative>/3_output_cifar/<experiment_name> (see project_root)."""
    return os.path.join(project_root(settings, base), OUTPUT_DIR, settings["experiment_name"])


def af_weights_source_dir(settings, base=None):
    """The experiment folder -af_weights_init predefined reads from: -load_af_weights_experiment, else the run's
    own (the original's only choice)."""
    source = settings.get("load_af_weights_experiment") or settings["experiment_name"]
    return experiment_dir(dict(settings, experiment_name=source), base)


def run_paths(settings, base=None):
    """Every file and folder of the run the settings name (see folder_paths)."""
    return folder_paths(experiment_dir(settings, base), settings["spec_name"], settings["run"])


def folder_paths(exp, spec, run):
    """Every file and folder of run `run` of spec `spec` in the experiment folder exp."""
    run_dir = os.path.join(exp, spec, f"run_{run}")
    return dict(
        exp=exp, run_dir=run_dir,
        record=os.path.join(run_dir, f"record_{spec}_run_{run}.pkl"),
        status=os.path.join(run_dir, "status.json"),
        lock=os.path.join(run_dir, ".lock"),
        log=os.path.join(run_dir, f"log_{spec}_run_{run}.txt"),
        run_info=os.path.join(run_dir, f"run_info_{os.path.basename(exp)}_{spec}_run_{run}.txt"),
        learning_curves=os.path.join(run_dir, f"learning_curves_{spec}_run_{run}.png"),
        early_stopping=os.path.join(run_dir, "early_stopping_analysis.png"),
        split=os.path.join(run_dir, "datasets", "split.pkl"),
        models=os.path.join(run_dir, "models"),
        summaries=os.path.join(summaries_dir(exp), f"{spec}_{run}"),
        all_weights=os.path.join(exp, "0_all_weights"),
        weight_temporaries=[af_weights_path(exp, spec, run, "*", "*") + ".*",  # of a killed writer
                            all_weights_path(exp, spec, run, "*") + ".*"],
    )


def analysis_dir(exp):
    return os.path.join(exp, "0_analysis")


def jobs_dir(exp):
    return os.path.join(exp, "0_jobs")


def summaries_dir(exp):
    """TensorBoard's folder of the experiment: one sub-folder per run and the HParams config."""
    return os.path.join(exp, "0_summaries")


def af_weights_dir(exp):
    return os.path.join(exp, "0_af_weights")


def af_weights_path(exp, spec, run, mb, ext="pkl"):
    return os.path.join(af_weights_dir(exp), f"af_weights_{spec}_run_{run}_mb_{mb}.{ext}")


def all_weights_path(exp, spec, run, mb):
    return os.path.join(exp, "0_all_weights", f"all_weights_{spec}_run_{run}_mb_{mb}.pkl")


def newest_af_weights_file(exp, spec, run):
    """The AF-weights file of spec/run with the highest minibatch number, or None."""
    found = []
    for path in glob.glob(af_weights_path(exp, glob.escape(spec), run, "*")):
        match = re.search(r"_mb_([0-9]+)\.pkl$", path)
        if match and path == af_weights_path(exp, spec, run, match.group(1)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def spec_folders(exp):
    """Spec names of an experiment: its sub-folders except the 0_* ones, sorted."""
    return sorted(name for name in os.listdir(exp)
                  if os.path.isdir(os.path.join(exp, name)) and not name.startswith("0_"))


def run_numbers(exp, spec):
    """Run numbers of the run_<n> folders of a spec, sorted."""
    found = []
    for name in os.listdir(os.path.join(exp, spec)):
        match = re.fullmatch(r"run_([0-9]+)", name)
        if match and os.path.isdir(os.path.join(exp, spec, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def incomplete_marker(paths, mb):
    """The note a run leaves when it stops for its -walltime at checkpoint mb."""
    return os.path.join(paths["run_dir"], f"run_incomplete_mb_{mb}.txt")


def remove_incomplete_markers(paths):
    for path in glob.glob(incomplete_marker(dict(paths, run_dir=glob.escape(paths["run_dir"])), "*")):
        os.remove(path)


# ---------------------------------------------------------------- checkpoint folders

def checkpoint_dir(models_dir, mb):
    return os.path.join(models_dir, f"ckpt_mb_{mb}")


def checkpoint_dirs(models_dir):
    """{mb: folder} of the complete checkpoints (temporary folders are ignored)."""
    found = {}
    for path in glob.glob(checkpoint_dir(glob.escape(models_dir), "*")):
        match = re.fullmatch(r"ckpt_mb_([0-9]+)", os.path.basename(path))
        if match and os.path.isfile(os.path.join(path, "recorder.pkl")):
            found[int(match.group(1))] = path
    return found


def drop_state(folder):
    """Delete a checkpoint's optimizer state (state.*), keeping its model and recorder."""
    for path in glob.glob(os.path.join(glob.escape(folder), "state.*")):
        os.remove(path)


def remove_folder(path):
    """Delete a folder so that an interruption never leaves it half-deleted under its own name."""
    doomed = os.path.join(os.path.dirname(path), f".tmp_del_{os.path.basename(path)}_{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temporary_files(paths):
    """Leftovers of an interrupted process: partial checkpoints, half-deleted folders, temp files (in the
    experiment's shared weight folders only those of this run's files)."""
    patterns = [os.path.join(glob.escape(folder), ".tmp_*")
                for folder in (paths["run_dir"], paths["models"], os.path.dirname(paths["split"]))]
    patterns += [os.path.join(glob.escape(os.path.dirname(p)), ".tmp_" + os.path.basename(p))
                 for p in paths["weight_temporaries"]]
    for path in (path for pattern in patterns for path in glob.glob(pattern)):
        remove_path(path, ignore_errors=True)  # a link is removed itself, never followed


def finish_cleanup(paths, record):
    """Keep only the tested model, with the last checkpoint's recorder (a lost run recorder is rebuilt from it by
    testing again); a diverged run also keeps its newest checkpoint whole (a lost recorder is rebuilt by training
    from there to the divergence again, exactly, and testing). Drop the split (idempotent)."""
    keep, found = record["early_stopping_mb"], checkpoint_dirs(paths["models"])
    resume = max(found) if record.get("diverged") and found else None
    if keep in found and max(found) != keep and resume is None:
        with open(os.path.join(found[max(found)], "recorder.pkl"), "rb") as handle:
            atomic_write_bytes(os.path.join(found[keep], "recorder.pkl"), handle.read())
    for mb, folder in checkpoint_dirs(paths["models"]).items():
        if mb not in (keep, resume):
            remove_folder(folder)
        elif mb != resume:
            drop_state(folder)
    remove_temporary_files(paths)
    if os.path.exists(paths["split"]):
        os.remove(paths["split"])
    if os.path.isdir(os.path.dirname(paths["split"])) and not os.listdir(os.path.dirname(paths["split"])):
        os.rmdir(os.path.dirname(paths["split"]))
    remove_incomplete_markers(paths)


# ---------------------------------------------------------------- recorder and status.json

def read_record(path, strict=True):
    """(the recorder in path, '') or (None, why not): missing, unreadable or not a recorder (a dict, with its
    settings unless not strict)."""
    if not os.path.isfile(path):
        return None, f"{path}: missing"
    try:
        record = load_pickle(path)
    except UserError as err:
        return None, str(err)
    if not isinstance(record, dict) or (strict and "settings" not in record):
        return None, f"{path}: not a recorder"
    return record, ""


def newest_readable_record(paths):
    """The recorder of the newest checkpoint whose recorder can be read, or None."""
    for _, folder in sorted(checkpoint_dirs(paths["models"]).items(), reverse=True):
        record, _ = read_record(os.path.join(folder, "recorder.pkl"))
        if record is not None:
            return record
    return None


STATUS_NUMBERS = ("pid", "mb", "n_minibatches", "val_top1", "test_top1", "last_checkpoint_mb", "diverged_at_mb",
                  "train_seconds", "updated", "record_bytes")


def number(value):
    """value if it is a number (files are read as they are), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_status(paths):
    """status.json's fields (numbers that are not numbers read as None, the settings as a dict or None, the rest
    as text), or None when it is missing or unreadable."""
    status = load_json_object(paths["status"])
    if status is None:
        return None
    return {key: _status_field(key, value) for key, value in status.items()}


def _status_field(key, value):
    """One field of status.json as read_status gives it."""
    if key in STATUS_NUMBERS:
        return number(value)
    if key == "settings":
        return value if isinstance(value, dict) else None
    return None if value is None else str(value)


class RunStatus:
    """Writes the run's small status.json, beside the recorder, for --status and the supervisor; it holds the
    settings the run was started with (the recorder's), so that they check a run's identity without reading it."""

    def __init__(self, paths, settings):
        self.paths, self.settings, self.started = paths, settings, time.monotonic()
        self.previous = read_status(paths) or {}
        self.seconds_before = self.previous.get("train_seconds") or 0.0
        self.last_checkpoint_mb = self.previous.get("last_checkpoint_mb")

    def write(self, record, state, message=""):
        record = record or {}
        save_json(self.paths["status"], {
            "state": state, "pid": os.getpid(), "host": os.uname().nodename,
            "mb": record.get("mb_count_total", 0), "n_minibatches": self.settings["n_minibatches"],
            "val_top1": (record.get("val_top1_hist") or [None])[-1], "test_top1": record.get("test_top1"),
            "last_checkpoint_mb": self.last_checkpoint_mb, "diverged_at_mb": record.get("diverged_at_mb"),
            "activation_kernel": record.get("activation_kernel"),
            "train_seconds": self.seconds_before + time.monotonic() - self.started,
            "updated": time.time(), "message": message, "record_bytes": _file_size(self.paths["record"]),
            "settings": record.get("settings")})


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def status_from_recorder(record):
    """status.json's fields from the recorder of a run that has no status.json (older runs).

    The run folder's recorder is saved at every checkpoint: its mb_count_total is the newest checkpoint."""
    state = "complete" if record.get("test_completed") else "diverged" if record.get("diverged") else "incomplete"
    return {"state": state, "mb": number(record.get("mb_count_total")),
            "diverged_at_mb": number(record.get("diverged_at_mb")),
            "n_minibatches": number((record.get("settings") or {}).get("n_minibatches")),
            "val_top1": number((record.get("val_top1_hist") or [None])[-1]),
            "test_top1": number(record.get("test_top1")), "last_checkpoint_mb": number(record.get("mb_count_total")),
            "message": f"diverged at minibatch {record.get('diverged_at_mb')}" if state == "diverged" else ""}


# ---------------------------------------------------------------- lock and state

def lock_holder(paths):
    """Who holds the run's lock, e.g. 'process 12 on node3' ('' if nobody, None if the lock cannot be read)."""
    try:
        return RunLock.holder(paths["lock"])
    except OSError:
        return None


def run_lock(paths):
    """The run's lock, to hold while training it (deepnet_util.RunLock)."""
    return RunLock(paths["lock"])


def lock_lost(lock):
    """'' while the file at the held lock's path is the one this process locked (same file: device and inode of
    the path and of the open handle), else why not: deleted with the run folder, or replaced. Then another
    process may lock the run's new lock file, so the holder must stop writing."""
    try:
        on_disk = os.stat(lock.path)
    except OSError as err:  # deleted (with its folder), or its folder replaced
        return f"its lock {lock.path} is gone ({err.strerror})"
    held = os.fstat(lock.handle.fileno())
    if (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
        return f"its lock {lock.path} was replaced by another file"
    return ""


RunState = namedtuple("RunState", "name status holder record problem")


def run_state(paths, read_recorder=False, locked_here=False):
    """Where a run stands: RunState(name, status, holder, record, problem) with name one of STATES:

        running       another live process holds its lock (holder says which)
        complete      tested: its recorder says so (when read), else status.json says so and the recorder is the
                      size status.json gives (a stat, no reading)
        damaged       status.json says complete, but the recorder is missing, unreadable or of another size: running
                      it again rebuilds the recorder from the kept checkpoint
        failed        its last session failed (status.json's message says why); running it again resumes it
        incomplete    started, not complete, not running: running it again resumes it (a diverged run that is not
                      tested retrains to its divergence, exactly, and is tested)
        not started   it has no status.json, recorder or checkpoint

    status: status.json's fields (read_status; for older runs without one, the recorder's); record: the recorder,
    read when read_recorder or when there is no status.json (None if missing or unreadable, problem says why);
    holder: the lock's holder ('' nobody, None unreadable; not asked when locked_here: this process holds it).
    """
    holder = "" if locked_here else lock_holder(paths)
    status = read_status(paths)
    record, problem = read_record(paths["record"], strict=False) if read_recorder or status is None else (None, "")
    if status is None and record is not None:
        status = status_from_recorder(record)
    elif status is None and os.path.exists(paths["record"]):
        status = {"state": "incomplete", "message": "unreadable recorder"}
    if holder:
        name = "running"
    elif record is not None and record.get("test_completed"):
        name = "complete"
    elif (status or {}).get("state") == "complete":
        size = _file_size(paths["record"])
        intact = not read_recorder and size is not None and status.get("record_bytes") in (None, size)
        name = "complete" if intact else "damaged"
    elif (status or {}).get("state") == "failed":
        name = "failed"
    elif status or record or checkpoint_dirs(paths["models"]):
        name = "incomplete"
    else:
        name = "not started"
    return RunState(name, status or {}, holder, record, problem)
