"""Safe on a shared cluster, never mixed (issue #21), the runs' part: a finished run's settings are its identity
(deepnet_main.py, the supervisor and --status refuse or show a complete run asked with other settings); inputs
are checked where they enter (predefined AF weights finite, the settings that size memory and disk, ASCII digits,
names that reach file names); one copy of a run (a run whose folder is deleted while it trains stops).
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, write_tiny_data
from test_reliability import (MAIN, RUN_FLAGS, SUPERVISOR, assert_cli_refusal, new_root, record_of, refusal, run_dir,
                              snapshot, start, stop_process, train_here, wait_for_line)
import deepnet_main
import deepnet_supervisor as sv
from deepnet import activations, architectures, commands, disk, identity, local, run_folder, schedule, status
from deepnet_util import UserError, load_pickle

ABU = ["-af_set", "5_blend5_swish", "-blend_trainable", "True", "-swish_beta_trainable", "True"]
SMCN_LAYERS = ("conv1", "conv2", "conv3", "conv4", "dense5", "dense6")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def complete_root(tmp_path_factory, data_dir):
    """A project folder with one complete run (RUN_FLAGS: smcn, 30 minibatches)."""
    root = new_root(tmp_path_factory.mktemp("complete"), data_dir)
    assert train_here(root) == 0
    return root


def status_json(root):
    with open(os.path.join(run_dir(root), "status.json")) as handle:
        return json.load(handle)


# ---------------------------------------------------------------- a finished run's settings are its identity

OTHER_SETTINGS = [  # (flags asked again, each difference the refusal must name)
    (["-lr", "0.01"], ["-lr 0.001 -> 0.01"]),
    (["-lr", "0.01", "-val_every", "5"], ["-lr 0.001 -> 0.01", "-val_every 10 -> 5"]),
    (["-seed", "2"], ["-seed 1 -> 2"]),
    (["-dropout_keep_probs", "0.6"], ["-dropout_keep_probs [0.5] -> [0.6]"]),
]


def test_a_complete_run_asked_with_other_settings_is_refused_naming_each_difference(complete_root, capsys):
    before = snapshot(complete_root)
    for argv, differences in OTHER_SETTINGS:
        with pytest.raises(UserError) as refused:
            train_here(complete_root, argv)
        message = str(refused.value)
        assert message.startswith("spec/run 1: complete, trained with other settings (")
        assert all(text in message for text in differences), message
        assert message.count("->") == len(differences), message
        assert snapshot(complete_root) == before
    result = subprocess.run([sys.executable, MAIN, *RUN_FLAGS, "-lr", "0.01"], cwd=complete_root,
                            capture_output=True, text=True, timeout=300)
    assert_cli_refusal(result, "-lr 0.001 -> 0.01")
    assert snapshot(complete_root) == before                     # its lock file too
    capsys.readouterr()
    # what does not change its numbers is no difference: the result stands
    for argv in (["-walltime", "5"], ["-reference", "other"], ["-path_relative", complete_root],
                 ["-seed", "1"]):                                  # the default seed, given
        assert train_here(complete_root, argv) == 0
        assert "already complete" in capsys.readouterr().out


def test_status_json_records_the_settings_the_run_started_with(complete_root):
    recorded = status_json(complete_root)["settings"]
    assert recorded == json.loads(json.dumps(record_of(complete_root)["settings"]))
    assert recorded["lr"] == 0.001 and recorded["seed"] == 1 and recorded["spec_name"] == "spec"
    assert run_folder.read_status(run_folder.folder_paths(os.path.dirname(os.path.dirname(run_dir(complete_root))),
                                                          "spec", 1))["settings"] == recorded


def test_the_main_disk_warning_is_one_stderr_line(complete_root, capsys, monkeypatch):
    monkeypatch.setattr(disk, "LARGE_SNAPSHOTS_BYTES", 0)
    assert train_here(complete_root) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: -safe_all_ws_n 1: up to 2 snapshots of all weights (7.2 MB each)")
    assert len(err.splitlines()) == 1


def sweep_run(root, spec="relu", run=1, **overrides):
    """The demo sweep's settings of spec/run under root (the supervisor's, seed None)."""
    sweep = sv.SWEEPS["demo"]
    return sv.run_settings({**sv.SETTINGS, **sweep["settings"]}, sweep["specs"][spec],
                           {"path_relative": root, **overrides}, sweep["experiment"], spec, run)


def as_main_records(settings):
    """The settings deepnet_main records for the supervisor's settings of a run."""
    args = commands.command(settings)[2:]
    return deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(args)))


def fake_run(settings, state="complete", in_status=True, **changes):
    """A run folder as a finished session leaves it: status.json (with the recorded settings when in_status) and a
    recorder holding them; the recorded settings are deepnet_main's for these settings, with changes."""
    recorded = dict(as_main_records(settings), **changes)
    paths = commands.run_paths(settings)
    os.makedirs(paths["run_dir"], exist_ok=True)
    with open(paths["record"], "wb") as handle:
        pickle.dump({"spec_name": settings["spec_name"], "run": settings["run"], "settings": recorded,
                     "test_completed": state == "complete", "diverged": False}, handle)
    fields = {"state": state, "mb": 250, "n_minibatches": 250, "test_top1": 0.5, "val_top1": 0.5,
              "last_checkpoint_mb": 250, "train_seconds": 10.0, "record_bytes": None}
    with open(paths["status"], "w") as handle:
        json.dump(dict(fields, settings=recorded) if in_status else fields, handle)
    return paths


def tree(root):
    """Every path under root with its size and modification time."""
    return {os.path.join(folder, name): (os.stat(os.path.join(folder, name)).st_size,
                                         os.stat(os.path.join(folder, name)).st_mtime_ns)
            for folder, dirs, files in os.walk(root) for name in dirs + files}


@pytest.fixture
def nothing_launched(monkeypatch):
    """The supervisor must not prepare data, check the kernel or start a run."""
    def launched(*args, **kwargs):
        raise AssertionError("the supervisor went on to launch runs")
    for name in ("ensure_data", "check_activation_kernel", "launch"):
        monkeypatch.setattr(local, name, launched)


def test_the_supervisor_refuses_complete_runs_asked_with_other_settings_before_launching(tmp_path, nothing_launched):
    root = str(tmp_path)
    fake_run(sweep_run(root, "relu", 1))
    fake_run(sweep_run(root, "relu", 2), in_status=False)        # an older run: its recorder says
    fake_run(sweep_run(root, "ABU", 1), state="incomplete")      # unfinished: would refuse to resume
    args = ["--sweep", "demo", "--set", f"path_relative={root}", "--no-analysis"]
    before = tree(root)
    with pytest.raises(UserError) as refused:
        sv.main([*args, "--set", "lr=0.01", "--set", "val_every=50"])
    assert str(refused.value) == (
        "3 of the 4 selected runs were started with other settings (-lr 0.001 -> 0.01, -val_every 25 -> 50 in relu "
        "run 1, relu run 2, ABU run 1): their results stand for those; select the settings they were started with, "
        "or another --experiment")
    assert tree(root) == before
    # the same settings (a seed given as the run number is the default): the complete runs are skipped as before
    lines = []
    fake_run(sweep_run(root, "ABU", 1), state="complete")
    fake_run(sweep_run(root, "ABU", 2), state="complete")
    assert sv.main([*args, "--set", "seed=None"], out=lines.append) == 0
    assert "4 of 4 runs already complete: skipped" in lines


def test_status_shows_runs_started_with_other_settings_as_differing(tmp_path):
    root = str(tmp_path)
    fake_run(sweep_run(root, "relu", 1))
    fake_run(sweep_run(root, "relu", 2), in_status=False)   # --status reads no recorder: shown as complete
    fake_run(sweep_run(root, "ABU", 1), state="incomplete", lr=0.002)
    lines = []
    args = sv.parse_args(["--status", "--sweep", "demo", "--set", f"path_relative={root}", "--set", "lr=0.01"])
    assert status.print_status(sv.plan(args), 1, lines.append) == 0
    rows = {tuple(line.split()[:2]): line for line in lines[1:5]}
    assert rows["relu", "1"].split()[2] == "differing"
    assert rows["relu", "1"].endswith("complete, with other settings: -lr 0.001 -> 0.01")
    assert rows["relu", "2"].split()[2] == "complete"
    assert rows["ABU", "1"].endswith("incomplete, with other settings: -lr 0.002 -> 0.01")
    assert lines[5] == "4 runs: 1 complete, 0 running, 0 incomplete, 0 failed, 1 not started, 2 differing"
    lines = []
    args = sv.parse_args(["--status", "--sweep", "demo", "--set", f"path_relative={root}"])
    status.print_status(sv.plan(args), 1, lines.append)
    assert lines[5] == "4 runs: 2 complete, 0 running, 0 incomplete, 0 failed, 1 not started, 1 differing"


def test_settings_differences_follow_the_resume_rule():
    recorded = {"network": "smcn", "lr": 0.001, "seed": 3, "run": 3, "walltime": 0.0, "bn_inference": "x",
                "dropout_keep_probs": [0.5], "reference": "relu", "path_relative": "./", "mode": "training"}
    same = dict(recorded, seed=None, walltime=5, bn_inference="y", dropout_keep_probs=(0.5,), reference="a",
                path_relative="/elsewhere", mode="test")
    assert identity.settings_differences(same, recorded) == []
    assert identity.settings_differences(dict(same, network="smcnBN"), dict(recorded, network="smcnBN")) == [
        ("bn_inference", "x", "y")]                                 # counts with batch norm only
    assert identity.settings_differences(dict(same, lr=0.01, run=4), recorded) == [
        ("lr", 0.001, 0.01), ("run", 3, 4), ("seed", 3, 4)]


# ---------------------------------------------------------------- predefined AF weights must be finite

def af_weights_file(exp, spec, layers_values, network="smcn", mb=5, beta=None):
    """An AF-weights file in the original's format (lists, protocol 3) for the layers of network."""
    folder = run_folder.af_weights_dir(exp)
    os.makedirs(folder, exist_ok=True)
    content = {f"{network}/{layer}/blend_weights_raw:0": list(layers_values(layer)) for layer in SMCN_LAYERS}
    if beta is not None:
        content.update({f"{network}/{layer}/swish_beta:0": [beta] for layer in SMCN_LAYERS})
    path = run_folder.af_weights_path(exp, spec, 1, mb)
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=3)
    return path


UNFIT_AF_WEIGHTS = {  # spec: (blend weights of a layer, swish_beta, what the refusal names)
    "nan": (lambda layer: [np.nan] if layer == "dense5" else [1.0], None, "the blend weights of smcn/dense5 must "
            "be finite, got [nan]"),
    "inf": (lambda layer: [float("inf")], None, "the blend weights of smcn/conv1 must be finite, got [inf]"),
    "huge": (lambda layer: [1e39], None, "the blend weights of smcn/conv1 must be finite, got [inf]"),  # > float32
    "text": (lambda layer: ["x"] if layer == "conv2" else [1.0], None, "the blend weights of smcn/conv2 must be "
             "numbers"),
    "nanbeta": (lambda layer: [0.2] * 5, float("nan"), "the swish_beta of smcn/conv1 must be finite, got [nan]"),
}


@pytest.mark.parametrize("spec", list(UNFIT_AF_WEIGHTS))
def test_non_finite_predefined_af_weights_are_refused_before_anything_is_written(tmp_path, data_dir, capsys, spec):
    root = new_root(tmp_path, data_dir)
    values, beta, names = UNFIT_AF_WEIGHTS[spec]
    path = af_weights_file(os.path.join(root, "3_output_cifar", "rel"), spec, values, beta=beta)
    argv = ["-af_weights_init", "predefined", "-load_af_weights_from", spec] + (ABU if beta is not None else [])
    message = refusal(root, argv, capsys)
    assert message.startswith("error: ./") and message.endswith(f"/{os.path.basename(path)}: {names}"), message


def test_normalising_predefined_af_weights_that_overflow_is_refused(tmp_path, capsys):
    exp = str(tmp_path)
    af_weights_file(exp, "big", lambda layer: [3e38, 3e38], mb=1)
    af_weights_file(exp, "tiny", lambda layer: [3e38, -3e38, 1e-30], mb=1)
    with pytest.raises(UserError, match="-norm_blendw_at_init: the blend weights of conv1 sum to inf$"):
        activations.predefined_af_init(exp, "big", 1, "smcn", "2_relu+tanh", normalize=True)
    with pytest.raises(UserError, match="the normalised blend weights of smcn/conv1 must be finite, got "):
        activations.predefined_af_init(exp, "tiny", 1, "smcn", "3_relu+tanh+linu", normalize=True)
    init = activations.predefined_af_init(exp, "big", 1, "smcn", "2_relu+tanh")   # not normalised: fit
    assert init["conv1"]["blend_weights"].dtype == np.float32
    assert capsys.readouterr().err == ""                                         # no numpy warnings


def test_the_supervisor_refuses_a_predefined_sweep_whose_af_weights_are_not_finite(tmp_path, nothing_launched):
    root = str(tmp_path)
    [source] = sv.plan(sv.parse_args(["--sweep", "paper", "--specs", "smcn_adam_c10_ABU_TERIS", "--runs", "1",
                                      "--set", f"path_relative={root}"]))
    fake_run(source)
    path = af_weights_file(commands.experiment_dir(source), "smcn_adam_c10_ABU_TERIS",
                           lambda layer: [0.2, 0.2, np.nan, 0.2, 0.2], mb=60000, beta=1.0)
    args = ["--sweep", "paper_predefined", "--specs", "smcn_adam_c10_ABU_TERIS_pre", "--runs", "1",
            "--set", f"path_relative={root}", "--no-analysis"]
    runs = sv.plan(sv.parse_args(args))
    expected = (f"smcn_adam_c10_ABU_TERIS_pre run 1: {path}: the blend weights of smcn/conv1 must be finite, got "
                "[0.2, 0.2, nan, 0.2, 0.2]")
    assert sv.af_weights_problem(runs) == expected
    before = tree(root)
    with pytest.raises(UserError, match="^--sweep paper_predefined: " + expected.replace("[", r"\[")):
        sv.main(args)
    assert tree(root) == before


# ---------------------------------------------------------------- one copy of a run

def test_a_run_whose_folder_is_deleted_while_it_trains_stops_at_its_next_minibatch(tmp_path, data_dir):
    root = new_root(tmp_path, data_dir)
    proc = start(root)
    try:
        wait_for_line(proc, "| mb 10/30")
        stop_process(proc)
        shutil.rmtree(run_dir(root))
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    assert err.startswith(f"error: spec/run 1: its lock {os.path.join('.', '3_output_cifar', 'rel', 'spec')}")
    assert "is gone (No such file or directory) while the run trained: stopped, writing nothing more" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(run_dir(root))                     # nothing written there again


def test_two_copies_never_train_one_run_when_its_folder_is_deleted(tmp_path, data_dir):
    root = new_root(tmp_path, data_dir)
    first = start(root)
    exp = os.path.join(root, "3_output_cifar", "rel")
    try:
        wait_for_line(first, "| mb 10/30")
        stop_process(first)                                       # between two minibatches' bookkeeping
        shutil.rmtree(run_dir(root))
        second = subprocess.run([sys.executable, MAIN] + RUN_FLAGS, cwd=root, capture_output=True, text=True,
                                timeout=600)
        assert second.returncode == 0, second.stderr
        written = snapshot(run_dir(root), run_folder.af_weights_dir(exp), os.path.join(exp, "0_all_weights"))
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 1, err
    assert "was replaced by another file while the run trained: stopped, writing nothing more" in err
    assert len(err.splitlines()) == 1
    assert snapshot(run_dir(root), run_folder.af_weights_dir(exp), os.path.join(exp, "0_all_weights")) == written
    assert load_pickle(os.path.join(run_dir(root), "record_spec_run_1.pkl"))["test_completed"]


def test_lock_lost_tells_the_held_lock_file_from_another(tmp_path):
    paths = run_folder.folder_paths(str(tmp_path), "spec", 1)
    with run_folder.run_lock(paths) as lock:
        assert run_folder.lock_lost(lock) == ""
        os.remove(paths["lock"])
        assert run_folder.lock_lost(lock).startswith(f"its lock {paths['lock']} is gone (")
        with open(paths["lock"], "w") as handle:
            handle.write("process 1 on elsewhere\n")
        assert run_folder.lock_lost(lock) == f"its lock {paths['lock']} was replaced by another file"


# ---------------------------------------------------------------- sizes: memory and disk

SIZES = [  # (flags, the flag the refusal names)
    (["-safe_all_ws_n", "10000000000000"], "-safe_all_ws_n: 10000000000000 is beyond any sensible run"),
    (["-safe_af_ws_n", "1000000000"], "-safe_af_ws_n: 1000000000 is beyond any sensible run"),
    (["-n_minibatches", "1000000", "-safe_all_ws_n", "1000000"], "-safe_all_ws_n: 1000000 saves"),
    (["-n_minibatches", "100000000", "-val_every", "1"], "-val_every: 100000001 validations of 100000000 minibatches"
     " are more than 20000: use -val_every 5001 or more"),
]


@pytest.mark.parametrize("argv, names", SIZES, ids=[" ".join(argv) for argv, _ in SIZES])
def test_settings_that_size_memory_or_disk_are_bounded(argv, names):
    with pytest.raises(UserError, match="^" + names.replace("(", r"\(")):
        deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(RUN_FLAGS + argv)))


def test_a_huge_weight_save_count_is_refused_before_anything_is_written(tmp_path, data_dir, capsys):
    root = new_root(tmp_path, data_dir)
    assert "-safe_all_ws_n" in refusal(root, ["-safe_all_ws_n", "10000000000000"], capsys)


def test_more_saves_than_minibatches_save_every_minibatch_without_listing_the_points():
    assert schedule.weight_save_mbs(10 ** 13, 5) == {1, 2, 3, 4, 5}
    assert schedule.weight_save_mbs(7, 5) == {1, 2, 3, 4, 5} and schedule.weight_save_mbs(1, 1) == {1}
    assert schedule.n_weight_saves(10 ** 13, 5) == 5 and schedule.n_weight_saves(3, 60000) == 3
    assert schedule.n_validations({"n_minibatches": 60000, "val_every": 20}) == 3001


def test_the_disk_warning_counts_all_weights_snapshots_of_the_network():
    settings = deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(
        ["-n_minibatches", "60000", "-safe_all_ws_n", "60000"])))
    assert disk.snapshots_warning(settings) == (
        "warning: -safe_all_ws_n 60000: up to 60001 snapshots of all weights (7.2 MB each) take about 431.4 GB in "
        "0_all_weights/ for this run")
    assert disk.snapshots_warning(dict(settings, safe_all_ws_n=2)) == ""        # the paper's: 3 x 7.2 MB


@pytest.mark.parametrize("network", list(architectures.ARCHITECTURES))
def test_the_weight_count_from_the_layer_lists_is_the_graphs(network):
    import deepnet_network as net
    tf = net.tf
    graph = tf.Graph()
    settings = deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(
        ["-network", network, "-dropout_keep_probs", "0.5"])))
    with graph.as_default():
        net.build_model(dict(settings, n_classes=100))
        counted = sum(int(np.prod(v.shape)) for v in graph.get_collection(tf.GraphKeys.TRAINABLE_VARIABLES))
    assert architectures.n_trainable_weights(network, 100) == counted


# ---------------------------------------------------------------- numbers and names where they enter

ASCII_ONLY = [  # (flags, the flag the refusal names)
    (["-run", "\u0661"], "-run"),
    (["-seed", "\u0663"], "-seed"),
    (["-n_minibatches", "\u0662"], "-n_minibatches"),
    (["-lr_step_ep", "1_0", "20", "30"], "-lr_step_ep"),
    (["-af_set", "\u0661_relu"], "-af_set"),
    (["-lr", "\u0660.\u0660\u0661"], "-lr"),
    (["-seed", "1", "-run", "1" + "0" * 30], "-run: must lie in 0 .. 2**32 - 1"),   # its digits in file names
    (["-reference", "../x"], "-reference"),
]


@pytest.mark.parametrize("argv, names", ASCII_ONLY, ids=[" ".join(argv) for argv, _ in ASCII_ONLY])
def test_numbers_are_ascii_and_names_are_checked_where_they_enter(tmp_path, data_dir, capsys, argv, names):
    root = new_root(tmp_path, data_dir)
    assert names in refusal(root, argv, capsys)


def test_a_long_name_is_refused_end_to_end_and_the_longest_names_fit(tmp_path, data_dir):
    root = new_root(tmp_path, data_dir)
    before = snapshot(root, data_dir)
    result = subprocess.run([sys.executable, MAIN, *RUN_FLAGS, "-spec_name", "s" * 245], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert_cli_refusal(result, "-spec_name 'sss")
    result = subprocess.run([sys.executable, SUPERVISOR, "--sweep", "demo", "--experiment", "e" * 245,
                             "--set", f"path_relative={root}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert_cli_refusal(result, "--experiment 'eee")
    assert snapshot(root, data_dir) == before
    longest = ["-experiment_name", "e" * 100, "-spec_name", "s" * 100, "-run", str(2 ** 32 - 1),
               "-n_minibatches", "4", "-val_every", "2", "-safe_af_ws_n", "2"] + ABU
    result = subprocess.run([sys.executable, MAIN, *RUN_FLAGS, *longest], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    exp = os.path.join(root, "3_output_cifar", "e" * 100)
    paths = run_folder.folder_paths(exp, "s" * 100, 2 ** 32 - 1)
    assert load_pickle(paths["record"])["test_completed"] and os.path.isfile(paths["run_info"])
    assert run_folder.newest_af_weights_file(exp, "s" * 100, 2 ** 32 - 1).endswith("_mb_4.pkl")
