"""An experiment's runs as the analysis reads them: which runs are analysed and which are left out (and why), the
check that they were trained on the same data, and each run's numbers at its tested minibatch. No TensorFlow.
"""
import math
import os

import numpy as np

from deepnet import data, identity, run_folder
from deepnet.names import check_name, check_path, name_problem, shown
from deepnet_util import UserError

BAD_TEST_ACC = (0.0, 0.3)          # the original's bad-run rule: test acc in this open interval -> excluded
VAL_MEAN_WARNING = (0.3, 0.95)     # the original's warning: mean val acc of the run outside this interval


def check_experiment(exp_dir, reference, out, reference_required=True):
    """The experiment's specs that have run folders. UserError if the folder does not exist or its name breaks the
    rule (deepnet/names.py), if it holds no run, or (reference_required) if reference names no spec folder in it. A
    folder whose name breaks the rule is no spec: it is skipped with one line."""
    check_path("experiment folder", exp_dir)
    if not os.path.isdir(exp_dir):
        raise UserError(f"experiment folder {exp_dir} does not exist")
    check_name("experiment folder", os.path.basename(os.path.abspath(exp_dir)))
    folders = spec_names(exp_dir, out)
    specs = [spec for spec in folders if run_folder.run_numbers(exp_dir, spec)]
    if not specs:
        raise UserError(f"experiment folder {exp_dir} holds no runs (no <spec>/run_<n> folders)")
    if reference_required and reference not in folders:
        raise UserError(f"-reference {shown(reference)}: no spec folder of that name in {exp_dir} (its specs: "
                        f"{', '.join(folders)})")
    return specs


def spec_names(exp_dir, out):
    """The experiment's spec folders whose names pass the rule; each other folder is skipped with one line."""
    specs = []
    for name in run_folder.spec_folders(exp_dir):
        problem = name_problem(name)
        if problem:
            out(f"skipped folder {shown(os.path.join(exp_dir, name))}: a spec name {problem}")
        else:
            specs.append(name)
    return specs


def recorder_path(exp_dir, spec, run):
    return run_folder.folder_paths(exp_dir, spec, run)["record"]


def check_run(exp_dir, spec, run):
    """(recorder, None, None) for a complete run that no process is training, else (None, category, reason); its
    settings in today's terms."""
    paths = run_folder.folder_paths(exp_dir, spec, run)
    state = run_folder.run_state(paths, read_recorder=True)
    if state.name == "running":
        return None, "running", f"running ({state.holder}): analyse again once it has ended"
    record = state.record
    if record is None:
        if not os.path.exists(paths["record"]):
            return None, "no_recorder", "no recorder file"
        return None, "unreadable", f"unreadable recorder ({run_folder.read_record(paths['record'])[1]})"
    if not record.get("test_completed") and record.get("diverged"):
        return None, "diverged", (f"diverged at minibatch {record.get('diverged_at_mb')}, not tested (run it "
                                  "again: it retrains to there and tests the best checkpoint before it)")
    if not record.get("test_completed"):
        trained = record.get("mb_count_total")
        total = (record.get("settings") or {}).get("n_minibatches")
        return None, "incomplete", f"incomplete: test not done (trained {trained} of {total} minibatches)"
    if tested_mb(record) is None or record.get("test_top1") is None:
        return None, "incomplete", "recorder has no early_stopping_mb or test_top1"
    record["settings"] = identity.settings_as_started(record.get("settings") or {})
    return record, None, None


def first_settings(exp_dir, spec):
    """The settings of the spec's first run with a complete recorder, bad runs included (None if none)."""
    for run in run_folder.run_numbers(exp_dir, spec):
        record, _, _ = check_run(exp_dir, spec, run)
        if record is not None:
            return record.get("settings") or {}
    return None


def tested_mb(record):
    """The minibatch of the tested model: early_stopping_mb, else the last test_mb_n_hist entry."""
    if record.get("early_stopping_mb") is not None:
        return int(record["early_stopping_mb"])
    history = record.get("test_mb_n_hist") or []
    return int(history[-1]) if history else None


def bad_test_reason(record):
    """The original's bad-run rule (test acc in (0, 0.3)): the reason, or None for a good run."""
    acc = float(record["test_top1"])
    if BAD_TEST_ACC[0] < acc < BAD_TEST_ACC[1]:
        return f"bad run: test accuracy {acc:.6g} lies in ({BAD_TEST_ACC[0]:g}, {BAD_TEST_ACC[1]:g})"
    return None


def validation_history(record):
    """(minibatches, top1, loss) of the run's validations; all empty for a run without a validation set (it
    validated on the test set, for monitoring only: never a val column, never a pick)."""
    if not has_validation_set(record):
        return [], [], []
    return (record.get("val_mb_n_hist") or [], record.get("val_top1_hist") or [],
            record.get("val_loss_hist") or [])


def has_validation_set(record):
    """Whether the run validated on a validation set (settings create_val_set; recorders without it: yes)."""
    return bool((record.get("settings") or {}).get("create_val_set", True))


def val_mean_warning(spec, run, record):
    """The original's warning for a mean validation accuracy outside [0.3, 0.95] (the run is kept), or None."""
    mbs, values, _ = validation_history(record)
    if not mbs or not values:
        return None
    mean = float(np.mean(values))
    if VAL_MEAN_WARNING[0] <= mean <= VAL_MEAN_WARNING[1]:
        return None
    side = f"below {VAL_MEAN_WARNING[0]:g}" if mean < VAL_MEAN_WARNING[0] else f"above {VAL_MEAN_WARNING[1]:g}"
    return (f"warning: {spec} run {run}: mean validation accuracy over the whole run is {mean:.6g}, {side} "
            "(kept: the original only warns)")


def load_spec(exp_dir, spec, out):
    """(runs, records, excluded rows, warnings) of a spec; exclusions and warnings are also sent to out."""
    runs, records, excluded, notes = [], [], [], []

    def exclude(run, category, reason):
        out(f"excluded: {spec} run {run}: {reason}")
        excluded.append({"spec_name": spec, "run": run, "category": category, "reason": reason,
                         "recorder": recorder_path(exp_dir, spec, run)})

    for run in run_folder.run_numbers(exp_dir, spec):
        record, category, reason = check_run(exp_dir, spec, run)
        if record is None:
            exclude(run, category, reason)
            continue
        warning = val_mean_warning(spec, run, record)
        if warning:
            out(warning)
            notes.append(warning)
        reason = bad_test_reason(record)
        if reason:
            exclude(run, "bad_test_acc", reason)
            continue
        runs.append(run)
        records.append(record)
    return runs, records, excluded, notes


def check_same_data(exp_dir, specs):
    """UserError naming the recorder of a complete run trained on other data than an earlier run of the same task
    and preprocessing, or on another split than an earlier run with the same seed and split settings (runs that
    recorded no data fingerprint are not compared). Reads each recorder once more, one at a time, so that a
    refusal comes before anything is written."""
    first = {}
    for spec in specs:
        for run in run_folder.run_numbers(exp_dir, spec):
            record, _, _ = check_run(exp_dir, spec, run)
            fingerprint, settings = (record or {}).get("data_fingerprint"), (record or {}).get("settings") or {}
            if not fingerprint:
                continue
            path = recorder_path(exp_dir, spec, run)
            check_one_build(path, fingerprint)
            dataset = (settings.get("task"), settings.get("preprocessing"))
            split_keys = ("seed", "create_val_set", "val_set_fraction", "minibatch_size")
            split = (*dataset, *(settings.get(key) for key in split_keys))
            other_data, before = first.setdefault(dataset, (path, fingerprint))
            for key in ("train", "test"):
                change = data.data_change(before[key], fingerprint[key])
                if change:
                    raise UserError(f"{path}: trained on other data than {other_data} ({fingerprint[key]['file']}: "
                                    f"{change}); analyse runs of one dataset together")
            other_split, before = first.setdefault(split, (path, fingerprint))
            change = data.split_change(before["split"], fingerprint["split"])
            if change:
                raise UserError(f"{path}: trained on another split than {other_split} ({change})")


def check_one_build(path, fingerprint):
    """UserError naming a recorder and its training and test files when their fingerprints name different
    preprocessing builds (fingerprints without builds are not compared)."""
    builds = [fingerprint[key].get("build") for key in ("train", "test")]
    if builds[0] != builds[1]:
        named = [shown(build) if build else "no build" for build in builds]
        raise UserError(f"{path}: trained on {fingerprint['train']['file']} and {fingerprint['test']['file']}, which "
                        f"are not from one preprocessing build ({named[0]} and {named[1]}); move the run out of the "
                        "experiment or train it again")


def val_every(record):
    """settings['val_every'], else the spacing of val_mb_n_hist (None if unknown)."""
    value = (record.get("settings") or {}).get("val_every")
    if value:
        return int(value)
    mbs = record.get("val_mb_n_hist") or []
    return int(mbs[1] - mbs[0]) if len(mbs) > 1 else None


def val_acc_at(record, mb):
    """Raw val_top1 at minibatch mb (or at the last validation before it); NaN if none."""
    best = None
    mbs, top1, _ = validation_history(record)
    for i, val_mb in enumerate(mbs):
        if val_mb <= mb and i < len(top1):
            best = i
    return float(top1[best]) if best is not None else math.nan


def train_acc_at(record, mb, window):
    """Mean train_top1 over the training minibatches mb-window+1 .. mb; NaN if there are none."""
    if not window:
        return math.nan
    values = [acc for n, acc in zip(record.get("train_mb_n_hist") or [], record.get("train_top1_hist") or [])
              if mb - window < n <= mb]
    return float(np.mean(values)) if values else math.nan


def run_metrics(record):
    """A run's numbers at its tested minibatch: the minibatch, test, validation and training accuracy."""
    mb = tested_mb(record)
    return {"early_stopping_mb": mb, "test_acc": float(record["test_top1"]),
            "val_acc": val_acc_at(record, mb), "train_acc": train_acc_at(record, mb, val_every(record))}
