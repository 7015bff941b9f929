"""Recovery from damaged run folders and changed surroundings: an unreadable newest checkpoint, changed data or
split, a lost recorder, a full disk, TensorFlow I/O errors, a hand resume with other threads, a clock jump.

Every recovered run is compared bit for bit with an uninterrupted run of the same flags (conftest.assert_same);
every refusal is one line, with the documented exit status, and writes nothing.
"""
import errno
import glob
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from deepnet import commands, data, results, schedule, trainer  # noqa: E402
from conftest import assert_same, state_of, write_tiny_data
import deepnet_analysis
import deepnet_main
import deepnet_supervisor as sv
import deepnet_task_cifar as task
import deepnet_util
from deepnet_util import RunError, UserError, load_pickle, save_pickle
from test_reliability import (MAIN, N, RUN_FLAGS, folder_digest, record_of,
                              run_dir, snapshot, wait_for_line, working_dir)

STOP_MB = 19  # the second checkpoint (0, 19, 30): a run stopped there has two checkpoints with their state


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data(str(tmp_path_factory.mktemp("data")))


def make_root(parent, data_dir, own_data=False):
    """A project folder with the tiny data as ./1_data_cifar10: a link to the shared copy, or its own copy."""
    root = os.path.join(str(parent), "root")
    os.makedirs(root)
    source, target = os.path.join(data_dir, "1_data_cifar10"), os.path.join(root, "1_data_cifar10")
    shutil.copytree(source, target) if own_data else os.symlink(source, target)
    return root


def copy_root(root, parent, own_data=False):
    """A copy of a project folder (its data still linked, or copied)."""
    copy = os.path.join(str(parent), "copy")
    shutil.copytree(root, copy, symlinks=True)
    if own_data:
        link = os.path.join(copy, "1_data_cifar10")
        source = os.readlink(link)
        os.remove(link)
        shutil.copytree(source, link)
    return copy


def train_here(root, extra=(), out=None):
    """deepnet_main.main(RUN_FLAGS + extra) in root; (exit status, the lines it printed)."""
    lines = []
    with working_dir(root):
        s = deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(RUN_FLAGS + list(extra))))
        code = task.run_training(s, out=lines.append)
    return code, lines


def cli_here(root, extra=(), capsys=None):
    """deepnet_main through run_cli in root: (exit status, stderr lines, stdout)."""
    capsys.readouterr()
    with working_dir(root):
        try:
            code = deepnet_util.run_cli(deepnet_main.main, RUN_FLAGS + list(extra))
        except SystemExit as stop:
            code = stop.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def models(root):
    return os.path.join(run_dir(root), "models")


def checkpoint(root, mb):
    return os.path.join(models(root), f"ckpt_mb_{mb}")


def truncate(path, keep=0.5):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def complete_root(tmp_path_factory, data_dir):
    """An uninterrupted run's folder."""
    root = make_root(tmp_path_factory.mktemp("complete"), data_dir)
    assert train_here(root)[0] == 0
    return root


@pytest.fixture(scope="module")
def reference(complete_root):
    return record_of(complete_root)


@pytest.fixture(scope="module")
def stopped_root(tmp_path_factory, data_dir):
    """A run stopped (as by -walltime) at its checkpoint STOP_MB: checkpoints 0 and STOP_MB, both with state."""
    root = make_root(tmp_path_factory.mktemp("stopped"), data_dir)
    real = trainer.Trainer._walltime_exceeded
    trainer.Trainer._walltime_exceeded = lambda self, mb: mb == STOP_MB
    try:
        assert train_here(root)[0] == 0
    finally:
        trainer.Trainer._walltime_exceeded = real
    assert sorted(os.listdir(models(root))) == ["ckpt_mb_0", f"ckpt_mb_{STOP_MB}"]
    assert all(os.path.isfile(os.path.join(checkpoint(root, mb), "state.index")) for mb in (0, STOP_MB))
    return root


def assert_like_reference(root, reference):
    assert_same(record_of(root), reference)
    assert sorted(os.listdir(models(root))) == [f"ckpt_mb_{reference['early_stopping_mb']}"]


# ---------------------------------------------------------------- the run's identity

def test_a_run_records_its_data_split_and_threads(reference, complete_root, data_dir):
    fingerprint = reference["data_fingerprint"]
    assert fingerprint["train"]["file"] == os.path.join("1_data_cifar10", "train_set_ztrans", "cifar10_trainset.pkl")
    assert (fingerprint["train"]["images"], fingerprint["test"]["images"]) == (320, 80)
    train = load_pickle(os.path.join(data_dir, fingerprint["train"]["file"]))
    import hashlib  # the fingerprint's hash, computed independently
    assert fingerprint["train"]["sha256"] == hashlib.sha256(train["images"].tobytes() + train["labels"].tobytes()
                                                            ).hexdigest()
    train_idx, val_idx = data.make_split(320, reference["settings"])
    assert fingerprint["split"] == {"train": 304, "validation": 16, "sha256": hashlib.sha256(
        train_idx.astype(np.int64).tobytes() + val_idx.astype(np.int64).tobytes()).hexdigest()}
    assert reference["threads"] == trainer.current_threads() and reference["threads"]["intra_op"] >= 1
    status = deepnet_util.load_json_object(os.path.join(run_dir(complete_root), "status.json"))
    assert status["record_bytes"] == os.path.getsize(os.path.join(run_dir(complete_root), "record_spec_run_1.pkl"))


# ---------------------------------------------------------------- checkpoints to fall back to

FALLBACKS = {  # damage to the newest checkpoint, and whether the run says so (a missing folder leaves no trace)
    "truncated state.data": (lambda folder: truncate(glob.glob(os.path.join(folder, "state.data-*"))[0]), True),
    "missing state.index": (lambda folder: os.remove(os.path.join(folder, "state.index")), True),
    "truncated recorder": (lambda folder: truncate(os.path.join(folder, "recorder.pkl")), True),
    "missing folder": (shutil.rmtree, False),
}


@pytest.mark.parametrize("damage", list(FALLBACKS))
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(stopped_root, reference, tmp_path, damage):
    root = copy_root(stopped_root, tmp_path)
    harm, reported = FALLBACKS[damage]
    harm(checkpoint(root, STOP_MB))
    code, lines = train_here(root)
    assert code == 0
    notes = [line for line in lines if f"ckpt_mb_{STOP_MB}" in line]
    assert len(notes) == reported and all("falling back to the checkpoint before it" in line for line in notes)
    assert "spec/run 1: resuming from minibatch 0" in lines
    assert_like_reference(root, reference)


def test_no_readable_checkpoint_says_how_to_start_again_and_deletes_nothing(stopped_root, tmp_path, capsys):
    root = copy_root(stopped_root, tmp_path)
    for mb in (0, STOP_MB):
        truncate(glob.glob(os.path.join(checkpoint(root, mb), "state.data-*"))[0])
    before = {name: folder_digest(os.path.join(models(root), name)) for name in os.listdir(models(root))}
    code, errors, _ = cli_here(root, capsys=capsys)
    assert code == 1 and len(errors) == 1, errors
    assert "no checkpoint can be read" in errors[0] and f"move {run_dir('.')} away" in errors[0]
    assert {name: folder_digest(os.path.join(models(root), name)) for name in os.listdir(models(root))} == before


def test_the_newest_two_checkpoints_keep_their_state(stopped_root):
    record = load_pickle(os.path.join(checkpoint(stopped_root, STOP_MB), "recorder.pkl"))
    assert record["checkpoints"] == [0, STOP_MB] and not record["training_completed"]
    assert {"state.index", "model.index"} <= set(os.listdir(checkpoint(stopped_root, 0)))


# ---------------------------------------------------------------- changed data or split

def rewrite_pickle(path, change):
    data = load_pickle(path)
    save_pickle(path, change(data))


DATA_CHANGES = [  # (file under the root, change, text the refusal must contain)
    ("1_data_cifar10/train_set_ztrans/cifar10_trainset.pkl",
     lambda d: dict(d, images=d["images"][::-1].copy()), "same size, other content"),
    ("1_data_cifar10/train_set_ztrans/cifar10_trainset.pkl",
     lambda d: {"images": d["images"][:300], "labels": d["labels"][:300]}, "320 -> 300 images"),
    ("1_data_cifar10/test_set_ztrans/cifar10_testset.pkl",
     lambda d: dict(d, labels=(d["labels"] + 1) % 10), "same size, other content"),
    ("3_output_cifar/rel/spec/run_1/datasets/split.pkl",
     lambda split: (split[0][1:], np.sort(np.append(split[1], split[0][0]))), "303 / 17"),
]


def test_changed_data_or_split_is_refused_until_restored(stopped_root, reference, tmp_path, capsys):
    root = copy_root(stopped_root, tmp_path, own_data=True)
    for name, change, text in DATA_CHANGES:
        path = os.path.join(root, name)
        saved = open(path, "rb").read()
        rewrite_pickle(path, change)
        before = snapshot(root)
        code, errors, _ = cli_here(root, capsys=capsys)
        assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
        assert os.path.basename(name) in errors[0] and text in errors[0], errors
        assert snapshot(root) == before
        with open(path, "wb") as handle:
            handle.write(saved)
    split = os.path.join(run_dir(root), "datasets", "split.pkl")
    truncate(split)  # unreadable: rebuilt from the seed, which gives the recorded split
    code, lines = train_here(root)
    assert code == 0 and f"spec/run 1: {run_dir('.')}/datasets/split.pkl is unreadable; rebuilt from -seed 1" in lines
    assert_like_reference(root, reference)


def test_a_missing_split_is_rebuilt_and_a_run_without_fingerprints_resumes(stopped_root, reference, tmp_path):
    root = copy_root(stopped_root, tmp_path)
    os.remove(os.path.join(run_dir(root), "datasets", "split.pkl"))
    for folder in glob.glob(os.path.join(models(root), "ckpt_mb_*")):  # as written before fingerprints existed
        record = load_pickle(os.path.join(folder, "recorder.pkl"))
        del record["data_fingerprint"], record["threads"]
        save_pickle(os.path.join(folder, "recorder.pkl"), record)
    code, lines = train_here(root)
    assert code == 0
    assert "spec/run 1: started before data fingerprints were recorded, so its data cannot be checked" in lines
    assert_like_reference(root, reference)


def test_a_resume_removes_its_own_leftover_weight_files_only(stopped_root, reference, tmp_path):
    root = copy_root(stopped_root, tmp_path)
    exp = os.path.join(root, "3_output_cifar", "rel")
    with pytest.raises(KeyboardInterrupt):  # the name of the temporary file a writer killed here would leave
        with deepnet_util.atomic_open(os.path.join(exp, "0_all_weights", "all_weights_spec_run_1_mb_1.pkl")):
            leftovers = {"own": glob.glob(os.path.join(exp, "0_all_weights", ".tmp_*"))}
            raise KeyboardInterrupt
    assert len(leftovers["own"]) == 1
    for name in ("af_weights_spec_run_1_mb_30.json.k2x", "all_weights_spec_run_1_mb_30.pkl.k3x"):
        leftovers["own"].append(os.path.join(exp, "0_af_weights" if name.startswith("af") else "0_all_weights",
                                             f".tmp_{name}"))
    leftovers["others"] = [os.path.join(exp, "0_af_weights", ".tmp_af_weights_spec_run_2_mb_30.pkl.k4x"),
                           os.path.join(exp, "0_all_weights", ".tmp_all_weights_other_run_1_mb_1.pkl.k5x")]
    for path in leftovers["own"] + leftovers["others"]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    assert train_here(root)[0] == 0
    assert not any(os.path.exists(path) for path in leftovers["own"])
    assert all(os.path.exists(path) for path in leftovers["others"])
    assert_like_reference(root, reference)


def test_mode_test_checks_the_test_data_and_reads_the_model_in_one_line(complete_root, reference, tmp_path, capsys):
    root = copy_root(complete_root, tmp_path, own_data=True)
    code, _, out = cli_here(root, ["-mode", "test"], capsys)
    assert code == 0 and f"test of the model of minibatch {reference['early_stopping_mb']} on 80 test images: " \
        f"loss {reference['test_loss']:.4f}, top-1 {reference['test_top1']:.4f}" in out
    test_set = os.path.join(root, "1_data_cifar10", "test_set_ztrans", "cifar10_testset.pkl")
    saved = open(test_set, "rb").read()
    rewrite_pickle(test_set, lambda d: {"images": d["images"][:40], "labels": d["labels"][:40]})
    before = snapshot(root)
    code, errors, _ = cli_here(root, ["-mode", "test"], capsys)
    assert code == 2 and len(errors) == 1 and "cifar10_testset.pkl" in errors[0] and "80 -> 40 images" in errors[0]
    assert snapshot(root) == before
    with open(test_set, "wb") as handle:
        handle.write(saved)
    folder = checkpoint(root, reference["early_stopping_mb"])
    truncate(glob.glob(os.path.join(folder, "model.data-*"))[0])
    code, errors, _ = cli_here(root, ["-mode", "test"], capsys)
    assert code == 1 and len(errors) == 1 and folder[len(root):] in errors[0] and "model.* unreadable" in errors[0]


def test_the_analysis_refuses_runs_trained_on_other_data(reference, tmp_path):
    exp = os.path.join(str(tmp_path), "3_output_cifar", "mixed")

    def put(spec, run, record):
        path = results.recorder_path(exp, spec, run)
        os.makedirs(os.path.dirname(path))
        save_pickle(path, dict(record, spec_name=spec, run=run))
        return path

    other_split = {"train": 304, "validation": 16, "sha256": "0" * 64}
    put("relu", 1, reference)
    put("relu", 2, dict(reference, settings=dict(reference["settings"], seed=2),  # its own seed: its own split
                        data_fingerprint=dict(reference["data_fingerprint"], split=other_split)))
    other = dict(reference["data_fingerprint"]["train"], sha256="f" * 64)
    odd = put("tanh", 1, dict(reference, data_fingerprint=dict(reference["data_fingerprint"], train=other)))
    with pytest.raises(UserError, match=f"{odd}: trained on other data than .*relu/run_1.*cifar10_trainset.pkl: "
                                        "same size, other content"):
        deepnet_analysis.analyse_experiment(exp, out=lambda line: None)
    assert not os.path.exists(os.path.join(exp, "0_analysis"))
    shutil.rmtree(os.path.dirname(odd))
    put("tanh", 1, dict(reference, data_fingerprint=dict(reference["data_fingerprint"], split=other_split)))
    with pytest.raises(UserError, match=f"{odd}: trained on another split than .*relu/run_1"):
        deepnet_analysis.analyse_experiment(exp, out=lambda line: None)
    assert not os.path.exists(os.path.join(exp, "0_analysis"))


# ---------------------------------------------------------------- a complete run's recorder

@pytest.fixture
def earliest_checkpoint_wins(monkeypatch):
    """Early stopping picks the earliest final checkpoint: the tested model is not the last checkpoint."""
    monkeypatch.setattr(schedule, "_best", lambda scores: min(scores))


def test_a_lost_recorder_of_a_complete_run_is_rebuilt_by_testing_again(data_dir, tmp_path, earliest_checkpoint_wins):
    flags = ["-af_set", "2_relu+tanh", "-blend_trainable", "True"]
    reference_root = make_root(tmp_path / "reference", data_dir)
    assert train_here(reference_root, flags)[0] == 0
    expected = record_of(reference_root)
    assert expected["early_stopping_mb"] == 0 and expected["checkpoints"][-1] == N
    root = make_root(tmp_path / "run", data_dir)
    assert train_here(root, flags)[0] == 0
    kept = load_pickle(os.path.join(checkpoint(root, 0), "recorder.pkl"))
    assert kept["training_completed"] and kept["mb_count_total"] == N  # the last checkpoint's recorder
    record = os.path.join(run_dir(root), "record_spec_run_1.pkl")
    af_weights = os.path.join(root, "3_output_cifar", "rel", "0_af_weights", "af_weights_spec_run_1_mb_0.pkl")
    weights = open(af_weights, "rb").read()
    for damage in (truncate, os.remove):
        damage(record)
        os.remove(af_weights)
        code, lines = train_here(root, flags)
        assert code == 0 and lines[0].startswith(f"spec/run 1: {run_dir('.')}/record_spec_run_1.pkl: ")
        assert lines[0].endswith("it is rebuilt from the newest checkpoint, testing the run again"), lines[0]
        assert_same(record_of(root), expected)
        assert open(af_weights, "rb").read() == weights
        assert sorted(os.listdir(models(root))) == ["ckpt_mb_0"]
    assert train_here(root, flags)[1][-1].endswith("nothing to do")


def test_the_supervisor_sends_a_complete_run_with_a_damaged_recorder_to_be_rebuilt(complete_root, reference,
                                                                                     tmp_path):
    root = copy_root(complete_root, tmp_path)
    settings = sv.run_settings(sv.SETTINGS, {}, {"path_relative": root}, "rel", "spec", 1)
    assert state_of(settings) == "complete"
    truncate(commands.run_paths(settings)['record'], 0.9)
    assert state_of(settings) == "damaged"
    lines = []
    todo, elsewhere = sv.split_by_state([settings], lines.append)
    assert todo == [settings] and elsewhere == []
    assert lines == [f"spec run 1: complete, but its recorder {commands.run_paths(settings)['record']} is missing or damaged: "
                     "rerunning it rebuilds the recorder from its last checkpoint"]
    assert train_here(root)[0] == 0 and state_of(settings) == "complete"
    assert_same(record_of(root), reference)


# ---------------------------------------------------------------- failures are one line

def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_the_run_resumes(data_dir, reference, tmp_path,
                                                                               monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = str(tmp_path / "disk")
    os.makedirs(disk)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", disk], check=True)
    try:
        root = make_root(disk, data_dir)
        filler = os.path.join(disk, "filler")
        real_save = trainer.Checkpointer.save

        def save_on_a_full_disk(self, sess, record, mb, with_model):
            if mb == STOP_MB:  # fill the disk just before this checkpoint's files are written
                with open(filler, "wb", buffering=0) as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 65536)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
                intact["ckpt_mb_0"] = folder_digest(checkpoint(root, 0))
            return real_save(self, sess, record, mb, with_model)

        intact = {}
        monkeypatch.setattr(trainer.Checkpointer, "save", save_on_a_full_disk)
        code, errors, _ = cli_here(root, capsys=capsys)
        assert code == 1 and len(errors) == 1, errors
        assert f"ckpt_mb_{STOP_MB}: checkpoint not written (" in errors[0] and "No space left on device" in errors[0]
        assert sorted(os.listdir(models(root))) == ["ckpt_mb_0"]
        assert folder_digest(checkpoint(root, 0)) == intact["ckpt_mb_0"]
        os.remove(filler)
        monkeypatch.undo()
        code, lines = train_here(root)
        assert code == 0 and "spec/run 1: resuming from minibatch 0" in lines
        assert_like_reference(root, reference)
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_full_disk_under_the_summary_writer_is_one_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    tf = trainer.tf
    disk = str(tmp_path / "disk")
    os.makedirs(disk)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], check=True)
    try:
        folder = os.path.join(disk, "summaries")
        writer = trainer.SummaryWriter(folder)
        with open(os.path.join(disk, "filler"), "wb", buffering=0) as handle:
            with pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        summary = tf.Summary(value=[tf.Summary.Value(tag="x", simple_value=1.0)])
        with pytest.raises(RunError) as stop:
            for step in range(3):
                writer.add_summary(summary, step)
            writer.flush()
        message = str(stop.value)
        assert "\n" not in message and message.startswith(f"{folder}: TensorBoard summaries not written (")
        assert "No space left on device" in message
        writer.close()  # the failure closed the writer: closing it again says nothing more
    finally:
        subprocess.run(["umount", disk], check=True)


def test_the_summary_writer_threads_own_reports_are_dropped_and_its_error_raised_in_one_line(tmp_path):
    seen = []
    hook = deepnet_util._quiet_summary_thread(seen.append)
    for name in (deepnet_util.SUMMARY_THREAD, "other"):
        hook(type("Args", (), {"thread": threading.Thread(name=name)})())
    hook(type("Args", (), {"thread": None})())
    assert [args.thread and args.thread.name for args in seen] == ["other", None]
    logged = []
    handler = type("Handler", (logging.Handler,), {"emit": lambda self, record: logged.append(record.getMessage())})()
    logger = trainer.tf.get_logger()
    logger.addHandler(handler)
    try:
        logger.error("EventFileWriter writer thread error: %s", "x; No space left on device")
        logger.error("another error")
    finally:
        logger.removeHandler(handler)
    assert logged == ["another error"]
    writer = trainer.SummaryWriter(str(tmp_path / "summaries"))
    failure = RuntimeError("/s/events; No space left on device\n\tFailed to flush 2 events to /s/events")
    writer.writer.close()
    writer.writer = type("Failing", (), {"add_summary": lambda self, *args: (_ for _ in ()).throw(failure)})()
    with pytest.raises(RunError) as stop:
        writer.add_summary(b"", 1)
    assert str(stop.value).startswith(f"{tmp_path / 'summaries'}: TensorBoard summaries not written (/s/events; No "
                                      "space left on device); the checkpoints written before are intact")
    assert "\n" not in str(stop.value)


def test_summaries_folder_being_a_file_is_one_line_exit_1(stopped_root, reference, tmp_path, capsys):
    root = copy_root(stopped_root, tmp_path)
    summaries = os.path.join(root, "3_output_cifar", "rel", "0_summaries")
    shutil.rmtree(summaries)
    open(summaries, "w").close()
    before = {name: folder_digest(os.path.join(models(root), name)) for name in os.listdir(models(root))}
    code, errors, _ = cli_here(root, capsys=capsys)
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {os.path.join('.', '3_output_cifar', 'rel', '0_summaries', 'spec_1')}: ")
    assert "is not a directory" in errors[0]
    assert {name: folder_digest(os.path.join(models(root), name)) for name in os.listdir(models(root))} == before
    os.remove(summaries)
    assert train_here(root)[0] == 0
    assert_like_reference(root, reference)


def test_one_line_errors_from_tensorflow_and_from_failed_writes(tmp_path, monkeypatch, capsys):
    tf = task.tf
    message = ("Graph execution error:\n\nDetected at node 'save/SaveV2' defined at (most recent call last):\n"
               "  File \"x.py\", line 1\nNode: 'save/SaveV2'\n/d/state.data-00000-of-00001.tempstate1; No space "
               "left on device\n\t [[{{node save/SaveV2}}]]\nHint: If you want to see a list of allocated tensors")
    err = tf.errors.ResourceExhaustedError(None, None, message)
    assert deepnet_util.tf_error_reason(err) == "/d/state.data-00000-of-00001.tempstate1; No space left on device"
    assert deepnet_util.tf_error_reason(tf.errors.FailedPreconditionError(None, None, "/x is not a directory")) == \
        "/x is not a directory"

    def raise_(error):
        def main(argv):
            raise error
        return main

    for error, line in ((err, "error: /d/state.data-00000-of-00001.tempstate1; No space left on device"),
                        (RunError("/r: unreadable"), "error: /r: unreadable")):
        with pytest.raises(SystemExit) as stop:
            deepnet_util.run_cli(raise_(error))
        assert stop.value.code == 1 and capsys.readouterr().err == line + "\n"
    path = str(tmp_path / "full.pkl")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write reports it: no file name

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SystemExit) as stop:
        deepnet_util.run_cli(lambda argv: save_pickle(path, {"a": 1}))
    assert stop.value.code == 1 and capsys.readouterr().err == f"error: {path}: No space left on device\n"
    assert os.listdir(str(tmp_path)) == []


# ---------------------------------------------------------------- threads and clocks

def run_to_end(root, env, extra=()):
    result = subprocess.run([sys.executable, MAIN] + RUN_FLAGS + list(extra), cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return record_of(root)


def test_a_hand_resume_uses_the_threads_the_run_started_with(data_dir, tmp_path):
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "TF_NUM_"))}
    one, two = ({**bare, "OMP_NUM_THREADS": n, "TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": n,
                 "PYTHONUNBUFFERED": "1"} for n in ("1", "2"))
    expected = run_to_end(make_root(tmp_path / "one", data_dir), one)
    assert expected["threads"] == {"intra_op": 1, "inter_op": 1}
    other = run_to_end(make_root(tmp_path / "two", data_dir), two)  # the thread count does change the numbers
    assert other["threads"]["intra_op"] == 2 and other["train_loss_hist"] != expected["train_loss_hist"]
    root = make_root(tmp_path / "resumed", data_dir)
    proc = subprocess.Popen([sys.executable, MAIN] + RUN_FLAGS, cwd=root, env=one, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, f"| mb 10/{N}")
    proc.terminate()
    proc.communicate(timeout=300)
    assert proc.returncode == 143
    hand = dict(bare, TF_NUM_INTRAOP_THREADS="2")  # a shell with other settings: the run's own are used
    assert_same(run_to_end(root, hand), expected)


def test_a_clock_jumping_back_gives_no_negative_durations(data_dir, tmp_path, monkeypatch):
    real_time, calls = time.time, [0]

    def jumping_back():
        calls[0] += 1
        return real_time() - 3600 * calls[0]  # an hour back at every reading

    monkeypatch.setattr(time, "time", jumping_back)
    root = make_root(tmp_path, data_dir)
    code, lines = train_here(root)
    monkeypatch.undo()
    assert code == 0 and calls[0] > 0
    per_mb = [float(line.split(" ms/mb")[0].rsplit("| ", 1)[1]) for line in lines if " ms/mb" in line]
    assert len(per_mb) == 4 and all(value >= 0 for value in per_mb[1:])
    status = deepnet_util.load_json_object(os.path.join(run_dir(root), "status.json"))
    assert 0 <= status["train_seconds"] < 600
