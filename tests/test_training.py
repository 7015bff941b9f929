"""Training, checkpoints, walltime resume, early stopping and test mode on tiny synthetic data."""
import glob
import os

import numpy as np
import pytest

from conftest import assert_same, run_settings
from deepnet_util import load_pickle
import deepnet_main
import deepnet_task_cifar as task


def train(settings, lines=None):
    return task.run_training(settings, out=(lines.append if lines is not None else lambda line: None))


def record_of(settings):
    return load_pickle(task.run_paths(settings)["record"])


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("n, fraction, batch, expected", [
    (50000, 0.05, 256, 2560), (50000, 0.05, 100, 2500), (1000, 0.05, 16, 48), (320, 0.05, 16, 16),
    (320, 0.01, 16, 16), (320, 0.2, 16, 64)])
def test_validation_size_is_nearest_multiple_of_minibatch(n, fraction, batch, expected):
    assert task.validation_size(n, fraction, batch) == expected


def test_split_is_disjoint_complete_and_seeded(tiny_root):
    s = run_settings(tiny_root)
    train_idx, val_idx = task.make_split(320, s)
    assert len(val_idx) == 16 and len(train_idx) == 304
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(320))
    again = task.make_split(320, s)
    assert np.array_equal(again[1], val_idx)
    other = task.make_split(320, dict(s, seed=s["seed"] + 1))
    assert not np.array_equal(other[1], val_idx)


def test_no_validation_split_when_disabled(tiny_root):
    s = run_settings(tiny_root, create_val_set=False)
    train_idx, val_idx = task.make_split(320, s)
    assert len(val_idx) == 0 and len(train_idx) == 320


def test_epoch_order_reshuffles_every_epoch(tiny_root):
    s = run_settings(tiny_root)
    first, second = task.epoch_order(s, 0, 100), task.epoch_order(s, 1, 100)
    assert sorted(first.tolist()) == list(range(100)) and not np.array_equal(first, second)
    assert np.array_equal(first, task.epoch_order(s, 0, 100))


@pytest.mark.parametrize("kind, overrides, expected", [
    ("constant", {}, lambda step: 0.01),
    ("decay", {"lr_decay": 0.5}, lambda step: 0.01 / (1 + 0.5 * (step - 1))),
    ("linear", {"lr_lin_min": 0.001, "lr_lin_steps": 10},
     lambda step: 0.01 + (0.001 - 0.01) * min((step - 1) / 10, 1)),
    ("step", {"lr_step_ep": [1, 3], "lr_step_multi": [0.5, 0.1]},
     lambda step: 0.01 * (0.5 if (step - 1) // 5 >= 1 else 1) * (0.1 if (step - 1) // 5 >= 3 else 1)),
])
def test_learning_rate_schedules(tiny_root, kind, overrides, expected):
    s = run_settings(tiny_root, lr=0.01, lr_schedule_type=kind, **overrides)
    for step in (1, 2, 5, 6, 11, 15, 16, 30, 100):
        assert task.learning_rate(s, step, mbs_per_epoch=5) == pytest.approx(expected(step), rel=1e-12)


def test_smoothing_matches_a_naive_moving_average():
    rng = np.random.default_rng(1)
    mbs = np.arange(0, 400, 10)
    values = rng.random(len(mbs))
    expected = values.copy()
    for _ in range(3):
        expected = np.array([np.mean([expected[j] for j in range(len(mbs)) if abs(mbs[j] - mbs[i]) <= 25])
                             for i in range(len(mbs))])
    np.testing.assert_allclose(task.smooth(mbs, values, 50), expected, rtol=1e-12)


def test_smoothing_window_formula():
    assert task.smoothing_window(1000) == 500
    assert task.smoothing_window(8000) == 800
    assert task.smoothing_window(60000) == 2000


def _record(checkpoints, val_mbs, val_top1):
    return {"checkpoints": checkpoints, "val_mb_n_hist": val_mbs, "val_top1_hist": val_top1,
            "settings": {"create_val_set": True}}


def test_early_stopping_picks_best_smoothed_checkpoint():
    val_mbs = list(range(0, 101, 5))
    curve = [0.1 + 0.8 * np.exp(-((m - 40) / 15) ** 2) for m in val_mbs]  # peak at 40
    record = _record([0, 20, 40, 60, 80, 100], val_mbs, curve)
    best, smoothed = task.early_stopping_mb(record, window=10)
    assert best == 40 and len(smoothed) == len(val_mbs)


def test_checkpoints_to_keep_drops_only_losers_that_are_final():
    val_mbs = list(range(0, 101, 5))
    curve = [0.1 + 0.8 * np.exp(-((m - 40) / 15) ** 2) for m in val_mbs]
    record = _record([0, 20, 40, 60, 80, 100], val_mbs, curve)
    keep = task.checkpoints_to_keep(record, window=10)  # horizon 15 minibatches
    assert keep == {40, 100}
    # whatever is pruned can never win: the final choice is among the kept ones
    assert task.early_stopping_mb(record, 10)[0] in keep


def test_early_stopping_without_validation_split_takes_last_checkpoint():
    record = _record([0, 10, 20], [0, 10, 20], [0.9, 0.1, 0.2])
    record["settings"]["create_val_set"] = False
    assert task.early_stopping_mb(record, 10)[0] == 20


# ---------------------------------------------------------------- whole runs

def test_end_to_end_run_writes_everything_and_keeps_only_the_tested_model(tiny_root):
    s = run_settings(tiny_root, create_lc_on_the_fly=True)
    lines = []
    assert train(s, lines) == 0
    paths = task.run_paths(s)
    record = record_of(s)
    assert record["training_completed"] and record["test_completed"] and not record["diverged"]
    assert record["train_mb_n_hist"] == list(range(1, 25))
    assert record["val_mb_n_hist"][0] == 0 and record["val_mb_n_hist"][-1] == 24
    assert set(record["checkpoints"]) == {0, 19, 24}  # 19 minibatches per epoch, plus the last
    assert record["early_stopping_mb"] in record["checkpoints"]
    assert 0.0 <= record["test_top1"] <= 1.0 and record["test_apc"].shape == (10,)
    assert len(record["val_apc_hist"]) == len(record["val_mb_n_hist"])
    assert set(record["val_preact_stats_hist"][-1]) == {"conv1", "conv2", "conv3", "conv4", "dense1", "dense2"}
    # one status line per validation, then the test line
    status = [line for line in lines if " | mb " in line]
    assert len(status) == len(record["val_mb_n_hist"]) and "test at mb" in lines[-1]
    assert list(task.checkpoint_dirs(paths["models"])) == [record["early_stopping_mb"]]
    assert not glob.glob(os.path.join(paths["models"], "*", "state.*"))
    assert not os.path.exists(paths["split"])
    for key in ("run_info", "learning_curves", "early_stopping"):
        assert os.path.getsize(paths[key]) > 0
    with open(paths["early_stopping"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test completed: True" in open(paths["run_info"]).read()
    es = record["early_stopping_mb"]
    assert os.path.exists(os.path.join(paths["exp"], "0_af_weights", f"af_weights_spec_run_1_mb_{es}.pkl"))
    assert os.path.exists(os.path.join(paths["all_weights"], f"all_weights_spec_run_1_mb_{es}.pkl"))
    af = load_pickle(os.path.join(paths["exp"], "0_af_weights", "af_weights_spec_run_1_mb_24.pkl"))
    assert af["layers"]["conv1"]["blend_weights_raw"].shape == (1,)


def test_runs_are_deterministic_and_seeded(tmp_path):
    from conftest import write_tiny_data
    write_tiny_data(str(tmp_path))
    a = run_settings(tmp_path, spec_name="a", af_set="5_blend5_swish", blend_trainable=True,
                     swish_beta_trainable=True, n_minibatches=12)
    b = dict(a, spec_name="b")
    c = dict(a, spec_name="c", seed=7)
    for s in (a, b, c):
        assert train(s) == 0
    ra, rb, rc = record_of(a), record_of(b), record_of(c)
    for r in (ra, rb, rc):
        r.pop("spec_name"), r["settings"].pop("spec_name")
    rc["settings"]["seed"] = ra["settings"]["seed"]
    assert_same(ra, rb)
    assert ra["train_loss_hist"] != rc["train_loss_hist"]


def test_walltime_stops_at_checkpoints_and_resume_is_exact(tmp_path):
    from conftest import write_tiny_data
    write_tiny_data(str(tmp_path))
    reference = run_settings(tmp_path, spec_name="ref", n_minibatches=40, create_lc_on_the_fly=True)
    assert train(reference) == 0
    limited = dict(reference, spec_name="wall", walltime=1e-4)
    paths = task.run_paths(limited)
    stops = 0
    while True:
        lines = []
        assert train(limited, lines) == 0
        if record_of(limited)["test_completed"]:
            break
        stops += 1
        assert glob.glob(os.path.join(paths["run_dir"], "run_incomplete_mb_*.txt"))
        assert "walltime" in lines[-1]
    assert stops >= 2  # checkpoints at 19 and 38 each ended a process
    assert not glob.glob(os.path.join(paths["run_dir"], "run_incomplete_mb_*.txt"))
    got, want = record_of(limited), record_of(reference)
    for r in (got, want):
        r.pop("spec_name"), r["settings"].pop("spec_name"), r["settings"].pop("walltime")
    assert_same(got, want)


def test_rerun_of_complete_run_does_nothing(tiny_root):
    s = run_settings(tiny_root, n_minibatches=8)
    assert train(s) == 0
    paths = task.run_paths(s)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(paths["exp"], "**"), recursive=True)
              if os.path.isfile(p) and not p.endswith(".lock")}
    lines = []
    assert train(s, lines) == 0
    assert "already complete" in lines[-1]
    after = {p: os.path.getmtime(p) for p in before}
    assert before == after


def test_folder_with_run_info_but_no_checkpoint_is_not_overwritten(tiny_root):
    s = run_settings(tiny_root)
    paths = task.run_paths(s)
    os.makedirs(paths["run_dir"])
    with open(paths["run_info"], "w") as handle:
        handle.write("from an earlier run\n")
    with pytest.raises(task.UserError, match="no checkpoint"):
        train(s)
    assert open(paths["run_info"]).read() == "from an earlier run\n"
    assert sorted(os.listdir(paths["run_dir"])) == [os.path.basename(paths["run_info"])]


def test_test_mode_evaluates_the_kept_model(tiny_root, capsys):
    s = run_settings(tiny_root, n_minibatches=8)
    assert train(s) == 0
    record = record_of(s)
    assert deepnet_main.main(["-mode", "test", "-path_relative", str(tiny_root), "-experiment_name", "exp",
                              "-spec_name", "spec", "-run", "1", "-network", "smcnLin"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"minibatch {record['early_stopping_mb']}" in line
    assert f"top-1 {record['test_top1']:.4f}" in line and f"loss {record['test_loss']:.4f}" in line


def test_no_validation_split_tests_last_checkpoint(tiny_root):
    s = run_settings(tiny_root, create_val_set=False, n_minibatches=10)
    assert train(s) == 0
    record = record_of(s)
    assert record["early_stopping_mb"] == 10 and record["test_completed"]


@pytest.mark.parametrize("kind", ["decay", "linear", "step"])
def test_each_schedule_trains(tiny_root, kind):
    s = run_settings(tiny_root, lr_schedule_type=kind, n_minibatches=6, lr_decay=0.1, lr_lin_steps=4,
                     lr_step_ep=[0], lr_step_multi=[0.5], spec_name=f"lr_{kind}")
    assert train(s) == 0
    assert record_of(s)["test_completed"]
