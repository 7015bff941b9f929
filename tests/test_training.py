"""Training, checkpoints, walltime resume, early stopping and test mode on tiny synthetic data."""
import glob
import os

import numpy as np
import pytest

from deepnet import data, run_folder, schedule, trainer  # noqa: E402
from conftest import assert_same, run_settings
from deepnet_util import load_pickle
import deepnet_main
import deepnet_task_cifar as task


def train(settings, lines=None):
    return task.run_training(settings, out=(lines.append if lines is not None else lambda line: None))


def record_of(settings):
    return load_pickle(run_folder.run_paths(settings)["record"])


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("n, fraction, batch, expected", [
    (50000, 0.05, 256, 2560), (50000, 0.05, 100, 2500), (1000, 0.05, 16, 48), (320, 0.05, 16, 16),
    (320, 0.01, 16, 16), (320, 0.2, 16, 64)])
def test_validation_size_is_nearest_multiple_of_minibatch(n, fraction, batch, expected):
    assert data.validation_size(n, fraction, batch) == expected


def original_validation_samples(n_total_samples, val_set_fraction, minibatch_size):
    """The original's TrainingHandler.__split_training_validation arithmetic."""
    n_validation_samples = np.round(n_total_samples*val_set_fraction)
    offset = n_validation_samples % minibatch_size
    n_validation_samples -= offset
    if offset > 0.5*minibatch_size:
        n_validation_samples += minibatch_size
    return int(n_validation_samples)


@pytest.mark.parametrize("n, fraction, batch", [
    (50000, 0.05, 256), (50000, 0.1, 256), (50000, 0.05, 128), (50000, 0.0256, 256), (50000, 0.00768, 256),
    (5000, 0.02, 40), (50000, 0.05, 200), (1000, 0.13, 20)])
def test_validation_size_is_the_originals(n, fraction, batch):
    assert data.validation_size(n, fraction, batch) == original_validation_samples(n, fraction, batch)


def test_split_is_disjoint_complete_and_seeded(tiny_root):
    s = run_settings(tiny_root)
    train_idx, val_idx = data.make_split(320, s)
    assert len(val_idx) == 16 and len(train_idx) == 304
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(320))
    again = data.make_split(320, s)
    assert np.array_equal(again[1], val_idx)
    other = data.make_split(320, dict(s, seed=s["seed"] + 1))
    assert not np.array_equal(other[1], val_idx)


def test_no_validation_split_when_disabled(tiny_root):
    s = run_settings(tiny_root, create_val_set=False)
    train_idx, val_idx = data.make_split(320, s)
    assert len(val_idx) == 0 and len(train_idx) == 320


def test_epoch_order_reshuffles_every_epoch(tiny_root):
    s = run_settings(tiny_root)
    first, second = data.epoch_order(s, 0, 100), data.epoch_order(s, 1, 100)
    assert sorted(first.tolist()) == list(range(100)) and not np.array_equal(first, second)
    assert np.array_equal(first, data.epoch_order(s, 0, 100))


# ---------------------------------------------------------------- transcriptions of the original's functions
# (leonsuetfeld/activations, deepnet_task_cifar.py), kept as close to its text as a test allows.

class OriginalSettings:
    def __init__(self, s):
        self.lr, self.lr_schedule_type, self.lr_decay = s["lr"], s["lr_schedule_type"], s["lr_decay"]
        self.lr_lin_min, self.lr_lin_steps = s["lr_lin_min"], s["lr_lin_steps"]
        self.lr_step_ep, self.lr_step_multi = s["lr_step_ep"], s["lr_step_multi"]
        self.val_set_fraction, self.minibatch_size = s["val_set_fraction"], s["minibatch_size"]


def original_lr_scheduler(TaskSettings, current_mb):
    if TaskSettings.lr_schedule_type == 'constant':
        return TaskSettings.lr
    if TaskSettings.lr_schedule_type == 'decay':
        lr = TaskSettings.lr * (1. / (1. + TaskSettings.lr_decay * current_mb))
        return lr
    if TaskSettings.lr_schedule_type == 'linear':
        if current_mb < TaskSettings.lr_lin_steps:
            return np.linspace(TaskSettings.lr, TaskSettings.lr_lin_min, num=TaskSettings.lr_lin_steps)[current_mb]
        else:
            return TaskSettings.lr_lin_min
    if TaskSettings.lr_schedule_type == 'step':
        mb_per_ep = 50000*(1-TaskSettings.val_set_fraction)//TaskSettings.minibatch_size
        lr_step_mb = np.array(TaskSettings.lr_step_ep) * mb_per_ep
        step_mbs_relative = lr_step_mb - current_mb
        for i in range(len(step_mbs_relative)):
            if step_mbs_relative[i] > 0:
                if i == 0: return TaskSettings.lr
                else: return TaskSettings.lr * TaskSettings.lr_step_multi[i-1]
        return TaskSettings.lr * TaskSettings.lr_step_multi[-1]


def original_get_checkpoints(dataset_size, val_set_fraction, mb_size, training_duration_in_mbs,
                             epochs_between_checkpoints):
    trainingset_size = int(np.floor(dataset_size*(1-val_set_fraction)))
    mbs_per_epoch = trainingset_size // mb_size
    mbs_per_checkpoint = mbs_per_epoch * epochs_between_checkpoints
    checkpoints = [0]
    while checkpoints[-1] < training_duration_in_mbs:
        checkpoints.append(checkpoints[-1]+mbs_per_checkpoint)
    checkpoints[-1] = training_duration_in_mbs
    return checkpoints


def original_smooth(y, smoothing_window, times):
    for t in range(times):
        smooth = []
        for i in range(len(y)):
            window_start = np.clip(i-(smoothing_window//2), 0, i)
            window_end = np.clip(i+(smoothing_window//2), 0, len(y))
            smooth.append(np.mean(y[window_start:window_end]))
        y = smooth
    return smooth


def original_early_stopping_minibatch(val_data, val_mb, checkpoints):
    val_steps_total = len(val_data)
    mb_per_val = val_mb[-1] // val_steps_total
    smoothing_window_mb = np.minimum(2000, np.maximum(val_mb[-1]//10, 500))
    smoothing_window = smoothing_window_mb // mb_per_val
    smooth_val_data = original_smooth(val_data, smoothing_window, 3)
    available_val_data = []
    for i in range(len(checkpoints)):
        val_data_idx_closest_to_save_spot = np.argmin(np.abs(np.array(val_mb)-checkpoints[i]))
        available_val_data.append(smooth_val_data[val_data_idx_closest_to_save_spot])
    minibatch_max_available_val_data = checkpoints[np.argmax(available_val_data)]
    return minibatch_max_available_val_data


def original_validation_mbs(n_minibatches, val_to_val_mbs=20):
    """Where the original's train() validates: mb 0, then mb % 20 == 0 or the last."""
    return [0] + [mb for mb in range(1, n_minibatches + 1) if mb % val_to_val_mbs == 0 or mb == n_minibatches]


CIFAR = dict(lr=0.001, val_set_fraction=0.05, minibatch_size=256, lr_decay=0.00004, lr_lin_min=0.0004,
             lr_lin_steps=60000, lr_step_ep=[200, 250, 300], lr_step_multi=[0.1, 0.01, 0.001])


@pytest.mark.parametrize("kind, overrides", [
    ("constant", {}), ("decay", {}), ("decay", {"lr_decay": 0.5}), ("linear", {}),
    ("linear", {"lr_lin_steps": 1000, "lr_lin_min": 0.00001}), ("step", {}),
    ("step", {"lr_step_ep": [1, 3], "lr_step_multi": [0.5, 0.1], "minibatch_size": 100}),
    ("step", {"lr_step_ep": [2, 4, 6], "lr_step_multi": [0.3, 0.2, 0.1], "val_set_fraction": 0.1})])
def test_learning_rate_is_the_originals_at_and_around_every_boundary(kind, overrides):
    s = dict(CIFAR, lr_schedule_type=kind, **overrides)
    mbs_per_epoch = 50000 * (1 - s["val_set_fraction"]) // s["minibatch_size"]
    boundaries = [int(e * mbs_per_epoch) for e in s["lr_step_ep"]] + [s["lr_lin_steps"], 1]
    mbs = sorted({mb for b in boundaries for mb in range(max(b - 3, 1), b + 4)} | {1, 2, 100, 59999, 60000, 70000})
    original = OriginalSettings(s)
    for mb in mbs:
        assert schedule.learning_rate(s, mb, 50000) == original_lr_scheduler(original, mb), f"mb {mb}"


def test_step_multipliers_are_absolute():
    s = dict(CIFAR, lr_schedule_type="step")  # boundaries at 200, 250, 300 epochs of 185 minibatches
    rates = [schedule.learning_rate(s, mb, 50000) for mb in (37000 - 1, 37000, 46250, 55500, 80000)]
    assert rates == [0.001, 0.001 * 0.1, 0.001 * 0.01, 0.001 * 0.001, 0.001 * 0.001]


@pytest.mark.parametrize("n_images, fraction, batch, n, epochs", [
    (50000, 0.05, 256, 60000, 3), (50000, 0.05, 256, 555, 3), (50000, 0.1, 128, 3000, 1),
    (320, 0.05, 16, 24, 1), (320, 0.05, 16, 38, 1), (5000, 0.02, 40, 250, 1)])
def test_checkpoints_are_the_originals(n_images, fraction, batch, n, epochs):
    s = dict(val_set_fraction=fraction, minibatch_size=batch, n_minibatches=n, epochs_between_checkpoints=epochs,
             create_checkpoints=False)  # as in the original, the flag does not change the checkpoints
    assert schedule.checkpoint_mbs(s, n_images) == original_get_checkpoints(n_images, fraction, batch, n, epochs)


@pytest.mark.parametrize("n_saves, n", [(10, 60000), (10, 5), (2, 24), (1, 7), (3, 2), (0, 10), (7, 1)])
def test_weight_saves_are_the_originals_distinct_rounded_points(n_saves, n):
    original = np.around(np.linspace(1, n, num=n_saves, endpoint=True)).tolist()
    assert schedule.weight_save_mbs(n_saves, n) == {int(mb) for mb in original}


@pytest.mark.parametrize("n", [60000, 3000, 20, 21, 7])
def test_validations_are_where_the_original_validates(n):
    assert schedule.validation_mbs({"n_minibatches": n, "val_every": 20}) == original_validation_mbs(n)


def test_smoothing_is_the_originals():
    rng = np.random.default_rng(1)
    values = rng.random(301).tolist()
    for window in (2, 3, 10, 11, 105, 400):
        np.testing.assert_array_equal(schedule.smooth(values, window), original_smooth(values, window, 3))


@pytest.mark.parametrize("n", [60000, 30000, 5000, 3000])
def test_smoothing_window_is_the_originals_integer_arithmetic(n):
    val_mbs = original_validation_mbs(n)
    mb_per_val = val_mbs[-1] // len(val_mbs)
    assert schedule.smoothing_window(val_mbs) == min(2000, max(n // 10, 500)) // mb_per_val


def _curve(val_mbs, seed, peak):
    rng = np.random.default_rng(seed)
    n = val_mbs[-1]
    return [0.3 + 0.5 * np.exp(-((m - peak * n) / (0.3 * n)) ** 2) + 0.03 * rng.normal() for m in val_mbs]


def _record(checkpoints, val_mbs, val_top1):
    return {"checkpoints": checkpoints, "val_mb_n_hist": val_mbs, "val_top1_hist": val_top1,
            "settings": {"create_val_set": True}}


@pytest.mark.parametrize("n, epochs, seed, peak", [
    (60000, 3, 0, 0.5), (60000, 3, 1, 0.8), (60000, 8, 2, 0.3), (6000, 1, 3, 0.6), (3000, 1, 4, 0.9)])
def test_early_stopping_is_the_originals(n, epochs, seed, peak):
    val_mbs = original_validation_mbs(n)
    checkpoints = original_get_checkpoints(50000, 0.05, 256, n, epochs)
    curve = _curve(val_mbs, seed, peak)
    best, smoothed = schedule.early_stopping_mb(_record(checkpoints, val_mbs, curve), val_mbs)
    assert best == original_early_stopping_minibatch(curve, val_mbs, checkpoints)
    mb_per_val = val_mbs[-1] // len(val_mbs)
    window = min(2000, max(n // 10, 500)) // mb_per_val
    np.testing.assert_array_equal(smoothed, original_smooth(curve, window, 3))


def test_exact_tie_goes_to_the_later_checkpoint():
    """A run shorter than half the window smooths to a flat curve: the original's argmax took mb 0."""
    val_mbs = original_validation_mbs(200)
    curve = _curve(val_mbs, 5, 0.5)
    checkpoints = [0, 100, 200]
    assert original_early_stopping_minibatch(curve, val_mbs, checkpoints) == 0
    assert schedule.early_stopping_mb(_record(checkpoints, val_mbs, curve), val_mbs)[0] == 200


@pytest.mark.parametrize("n, seed", [(6000, 0), (60000, 1), (3000, 2)])
def test_scores_called_final_never_change_and_pruning_never_drops_the_winner(n, seed):
    val_mbs = original_validation_mbs(n)
    checkpoints = original_get_checkpoints(50000, 0.05, 256, n, 1)
    curve = _curve(val_mbs, seed, 0.4)
    final_scores, _ = schedule.checkpoint_scores(_record(checkpoints, val_mbs, curve), val_mbs)
    winner = schedule.early_stopping_mb(_record(checkpoints, val_mbs, curve), val_mbs)[0]
    for k, c in enumerate(checkpoints):  # the state right after checkpoint c was written
        done = len([m for m in val_mbs if m <= c])
        partial = _record(checkpoints[:k + 1], val_mbs[:done], curve[:done])
        scores, _ = schedule.checkpoint_scores(partial, val_mbs)
        assert all(scores[mb] == final_scores[mb] for mb in scores)
        assert winner not in checkpoints[:k + 1] or winner in schedule.checkpoints_to_keep(partial, val_mbs)
    assert schedule.checkpoints_to_keep(_record(checkpoints, val_mbs, curve), val_mbs) == {winner}


def test_early_stopping_without_validation_split_takes_last_checkpoint():
    record = _record([0, 10, 20], [0, 10, 20], [0.9, 0.1, 0.2])
    record["settings"]["create_val_set"] = False
    assert schedule.early_stopping_mb(record, [0, 10, 20])[0] == 20


# ---------------------------------------------------------------- whole runs

def test_end_to_end_run_writes_everything_and_keeps_only_the_tested_model(tiny_root):
    s = run_settings(tiny_root, create_lc_on_the_fly=True)
    lines = []
    assert train(s, lines) == 0
    paths = run_folder.run_paths(s)
    record = record_of(s)
    assert record["training_completed"] and record["test_completed"] and not record["diverged"]
    assert record["train_mb_n_hist"] == list(range(1, 25))
    assert record["val_mb_n_hist"][0] == 0 and record["val_mb_n_hist"][-1] == 24
    assert set(record["checkpoints"]) == {0, 19, 24}  # 19 minibatches per epoch, plus the last
    assert record["early_stopping_mb"] in record["checkpoints"]
    assert 0.0 <= record["test_top1"] <= 1.0 and record["test_apc"].shape == (10,)
    assert len(record["val_apc_hist"]) == len(record["val_mb_n_hist"])
    assert set(record["val_preact_stats_hist"][-1]) == {"conv1", "conv2", "conv3", "conv4", "dense5", "dense6"}
    # one status line per validation, then the test line with the accuracy per class
    status = [line for line in lines if " | mb " in line]
    assert len(status) == len(record["val_mb_n_hist"]) and "test of the model of minibatch" in lines[-1]
    assert "accuracy per class: 1: " in lines[-1] and " | 10: " in lines[-1]
    assert list(run_folder.checkpoint_dirs(paths["models"])) == [record["early_stopping_mb"]]
    assert not glob.glob(os.path.join(paths["models"], "*", "state.*"))
    assert not os.path.exists(paths["split"])
    for key in ("run_info", "learning_curves", "early_stopping"):
        assert os.path.getsize(paths[key]) > 0
    with open(paths["early_stopping"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test completed: True" in open(paths["run_info"]).read()
    es = record["early_stopping_mb"]
    assert not os.path.exists(os.path.join(paths["exp"], "0_af_weights"))  # nothing trainable: no AF file
    assert os.path.exists(os.path.join(paths["all_weights"], f"all_weights_spec_run_1_mb_{es}.pkl"))


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


@pytest.mark.parametrize("inputs", ["fed", "staged"])
def test_walltime_stops_at_checkpoints_and_resume_is_exact(tmp_path, monkeypatch, inputs):
    """'staged': the limited run's input is staged on a device (the CPU here) as on a GPU, each minibatch during
    the step before its own (deepnet_network.make_inputs), validations and the test fed beside the staging area;
    it still records exactly what the fed reference records."""
    import deepnet_network as net
    from conftest import write_tiny_data
    write_tiny_data(str(tmp_path))
    reference = run_settings(tmp_path, spec_name="ref", n_minibatches=40, create_lc_on_the_fly=True)
    assert train(reference) == 0
    built, real_build = [], net.build_model

    def build_model(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(net, "build_model", build_model)
    if inputs == "staged":
        monkeypatch.setattr(net, "staging_device", lambda: "/device:CPU:0")
    limited = dict(reference, spec_name="wall", walltime=1e-4)
    paths = run_folder.run_paths(limited)
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
    assert len(built) == stops + 1
    assert all((model.inputs.images.op.type == "Unstage") == (inputs == "staged") for model in built)
    assert not glob.glob(os.path.join(paths["run_dir"], "run_incomplete_mb_*.txt"))
    got, want = record_of(limited), record_of(reference)
    for r in (got, want):
        r.pop("spec_name"), r["settings"].pop("spec_name"), r["settings"].pop("walltime")
    assert_same(got, want)


def test_rerun_of_complete_run_does_nothing(tiny_root):
    s = run_settings(tiny_root, n_minibatches=8)
    assert train(s) == 0
    paths = run_folder.run_paths(s)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(paths["exp"], "**"), recursive=True)
              if os.path.isfile(p) and not p.endswith(".lock")}
    lines = []
    assert train(s, lines) == 0
    assert "already complete" in lines[-1]
    after = {p: os.path.getmtime(p) for p in before}
    assert before == after


def test_folder_with_run_info_but_no_checkpoint_is_not_overwritten(tiny_root):
    s = run_settings(tiny_root)
    paths = run_folder.run_paths(s)
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
    line = [line for line in capsys.readouterr().out.splitlines() if "test of the model" in line][-1]
    assert f"minibatch {record['early_stopping_mb']}" in line
    assert f"top-1 {record['test_top1']:.4f}" in line and f"loss {record['test_loss']:.4f}" in line


def original_test_in_session(run_batch, images, labels, minibatch_size):
    """The original's __test_in_session (and validate): floor(n / minibatch_size) full minibatches in order, the
    mean of their losses and top-1 accuracies; run_batch(images, labels) -> (loss, top1) is its sess.run."""
    loss_store, top1_store = [], []
    n_test_minibatches = int(np.floor(len(images) / minibatch_size))
    for test_mb_counter in range(n_test_minibatches):
        idx = list(range(minibatch_size * test_mb_counter, minibatch_size * (test_mb_counter + 1)))
        loss, top1 = run_batch(images[idx], labels[idx])
        loss_store.append(loss)
        top1_store.append(top1)
    return np.mean(loss_store), np.mean(top1_store)


def test_batch_norm_with_batch_statistics_evaluates_the_originals_minibatches(tiny_root):
    s = run_settings(tiny_root, network="smcnBN")
    assert trainer.evaluation_batches(40, s) == [slice(0, 16), slice(16, 32)]         # the 8 left over: left out
    assert trainer.evaluation_batches(10, s) == [slice(0, 10)]
    assert trainer.evaluation_batches(40, dict(s, bn_inference="moving_averages")) == [slice(0, 40)]
    assert trainer.evaluation_batches(1200, dict(s, network="smcnLin")) == [slice(0, 500), slice(500, 1000),
                                                                          slice(1000, 1200)]
    rng = np.random.default_rng(4)
    images, labels = rng.normal(size=(40, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 40)
    graph = task.tf.Graph()
    with graph.as_default():
        model = task.net.build_model(dict(s, n_classes=10))
        init = task.tf.global_variables_initializer()
    with task.tf.Session(graph=graph) as sess:
        sess.run(init)
        result = trainer.evaluate(sess, model, images, labels, s)

        def run_batch(batch_images, batch_labels):
            return sess.run([model.loss, model.top1], {model.inputs.images: batch_images,
                                                       model.inputs.labels: batch_labels})
        loss, top1 = original_test_in_session(run_batch, images, labels, 16)
        one_batch, _ = run_batch(images[:32], labels[:32])
    assert result["n"] == 32
    assert result["loss"] == pytest.approx(loss, rel=1e-6) and result["top1"] == pytest.approx(top1, abs=1e-7)
    assert abs(one_batch - loss) > 1e-4            # the batch an image is normalised in changes the numbers


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


# ---------------------------------------------------------------- files as the original writes them

def _abu_settings(root, **overrides):
    return run_settings(root, af_set="5_blend5_swish", blend_trainable=True, swish_beta_trainable=True,
                        **overrides)


def test_all_weights_file_holds_every_trainable_variable_of_the_saved_model(tiny_root):
    import tensorflow as tf
    s = _abu_settings(tiny_root, safe_all_ws_n=2)
    assert train(s) == 0
    record, paths = record_of(s), run_folder.run_paths(s)
    es = record["early_stopping_mb"]
    saved = load_pickle(os.path.join(paths["all_weights"], f"all_weights_spec_run_1_mb_{es}.pkl"))
    reader = tf.train.load_checkpoint(os.path.join(run_folder.checkpoint_dirs(paths["models"])[es], "model"))
    shapes = reader.get_variable_to_shape_map()
    expected = {f"{name}:0" for name in shapes if "/bn" not in name}
    assert set(saved) == expected and len(saved) == 4 * 7 - 2  # weights, biases (7 layers), blend, beta (6)
    for name, value in saved.items():
        assert value.shape == tuple(shapes[name[:-2]])
        np.testing.assert_array_equal(value, reader.get_tensor(name[:-2]))
    assert saved["smcnLin/conv1/swish_beta:0"].shape == (1,) and "smcnLin/denseout/weights:0" in saved
    # the saves during training: round(linspace(1, 24, 2)) = minibatches 1 and 24
    assert sorted(os.listdir(paths["all_weights"])) == ["all_weights_spec_run_1_mb_1.pkl",
                                                         "all_weights_spec_run_1_mb_24.pkl"]


def test_af_weights_files_are_the_originals_format(tiny_root):
    s = _abu_settings(tiny_root, safe_af_ws_n=3)
    assert train(s) == 0
    folder = os.path.join(run_folder.run_paths(s)["exp"], "0_af_weights")
    es = record_of(s)["early_stopping_mb"]
    assert sorted(f for f in os.listdir(folder) if f.endswith(".pkl")) == sorted(
        f"af_weights_spec_run_1_mb_{mb}.pkl" for mb in {1, 12, 24, es})  # round(linspace(1, 24, 3)), test mb
    saved = load_pickle(os.path.join(folder, "af_weights_spec_run_1_mb_24.pkl"))
    layers = ("conv1", "conv2", "conv3", "conv4", "dense5", "dense6")
    assert set(saved) == {f"smcnLin/{layer}/{var}:0" for layer in layers for var in ("blend_weights_raw", "swish_beta")}
    assert all(isinstance(v, list) and len(v) == (1 if "beta" in k else 5) for k, v in saved.items())
    tested = record_of(s)["test_af_weights"]  # the tested model's, as in the file saved at its minibatch
    at_test = load_pickle(os.path.join(folder, f"af_weights_spec_run_1_mb_{es}.pkl"))
    for layer in layers:
        np.testing.assert_array_equal(tested[layer]["blend_weights_raw"],
                                      np.float32(at_test[f"smcnLin/{layer}/blend_weights_raw:0"]))
        assert tested[layer]["swish_beta"] == at_test[f"smcnLin/{layer}/swish_beta:0"][0]
    assert tested["conv1"]["blend_weights"].shape == (5,)


def test_short_runs_work_with_every_other_flag_at_its_default(tiny_root):
    s = run_settings(tiny_root, n_minibatches=5, safe_af_ws_n=10, safe_all_ws_n=2, blend_trainable=True)
    assert train(s) == 0
    folder = os.path.join(run_folder.run_paths(s)["exp"], "0_af_weights")
    assert sorted(int(f.split("_mb_")[1][:-4]) for f in os.listdir(folder) if f.endswith(".pkl")) \
        == sorted({1, 2, 3, 4, 5} | {record_of(s)["early_stopping_mb"]})


def test_recorded_losses_are_the_optimised_loss_with_the_cross_entropy_beside(tiny_root):
    plain = run_settings(tiny_root, spec_name="plain", n_minibatches=8)
    decayed = dict(plain, spec_name="decayed", use_wd=True, wd_lambda=0.01)
    for s in (plain, decayed):
        assert train(s) == 0
    p, d = record_of(plain), record_of(decayed)
    assert p["train_loss_hist"] == p["train_xentropy_hist"] and p["val_loss_hist"] == p["val_xentropy_hist"]
    # the first minibatch sees the initial weights: its decay term is wd * sum(w^2)/2 of the initial model
    gaps = np.array(d["train_loss_hist"]) - np.array(d["train_xentropy_hist"])
    assert np.all(gaps > 0) and np.all(np.array(d["val_loss_hist"]) > np.array(d["val_xentropy_hist"]))
    assert d["test_loss"] > d["test_xentropy"]
    assert d["train_xentropy_hist"][0] == pytest.approx(p["train_xentropy_hist"][0], rel=1e-6)


def _original_array_to_list(a):
    if len(a.shape) == 4:
        b = []
        for i in range(a.shape[0]):
            b.append(a[i, :, :, :])
    if len(a.shape) == 1:
        b = a.tolist()
    return b


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_pickles_of_the_original_preprocessing_are_accepted(tmp_path, dtype):
    """{'labels': list of int, 'images': list of (32, 32, 3) arrays}, pickled as the original's save_dataset."""
    import pickle
    rng = np.random.default_rng(0)
    for split, n in (("train", 320), ("test", 80)):
        raw = rng.integers(0, 256, (n, 3, 32, 32)).transpose(0, 2, 3, 1)  # reshape_cifar's transposed view
        images = raw.astype(dtype) if dtype == np.uint8 else (raw / 255.0).astype(dtype)
        labels = rng.integers(0, 10, n)
        path = tmp_path / "1_data_cifar10" / f"{split}_set" / f"cifar10_{split}set.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump({'labels': _original_array_to_list(labels), 'images': _original_array_to_list(images)}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        loaded, loaded_labels = data.load_dataset(str(path), 10)
        assert loaded.dtype == np.float32 and loaded.shape == (n, 32, 32, 3)
        np.testing.assert_array_equal(loaded, images.astype(np.float32))
        np.testing.assert_array_equal(loaded_labels, labels)
    s = run_settings(tmp_path, preprocessing="none", n_minibatches=4)
    assert train(s) == 0 and record_of(s)["test_completed"]


def test_status_file_follows_the_run(tiny_root):
    import json
    s = run_settings(tiny_root, n_minibatches=40, walltime=1e-4)
    paths = run_folder.run_paths(s)
    assert train(s) == 0
    status = json.load(open(paths["status"]))
    assert status["state"] == "incomplete" and status["message"] == "walltime reached"
    assert status["mb"] == status["last_checkpoint_mb"] == 19 and status["n_minibatches"] == 40
    first_seconds = status["train_seconds"]
    while not record_of(s)["test_completed"]:
        assert train(s) == 0
    status = json.load(open(paths["status"]))
    record = record_of(s)
    assert status["state"] == "complete" and status["test_top1"] == record["test_top1"]
    assert status["val_top1"] == record["val_top1_hist"][-1] and status["pid"] == os.getpid()
    assert status["train_seconds"] > first_seconds


def test_tensorboard_summaries_every_20_minibatches_and_a_start_marker_on_resume(tiny_root):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    s = run_settings(tiny_root, n_minibatches=45, walltime=1e-4, af_set="5_blend5_swish",
                     blend_trainable=True, swish_beta_trainable=True)
    while not os.path.exists(run_folder.run_paths(s)["record"]) or not record_of(s)["test_completed"]:
        assert train(s) == 0
    steps, tags, starts = {}, set(), []
    for path in glob.glob(os.path.join(run_folder.run_paths(s)["summaries"], "events.*")):
        for event in EventFileLoader(path).Load():
            if event.HasField("session_log"):
                starts.append(event.step)
            for value in event.summary.value:
                tags.add(value.tag)
                steps.setdefault(value.tag, set()).add(event.step)
    assert steps["objective/loss"] == {20, 40} and steps["validation/top1"] == {0, 4, 8, 12, 16, 20, 24, 28, 32,
                                                                                 36, 40, 44, 45}
    for layer in ("conv1", "dense6"):
        for what in ("weights", "biases", "preact", "activation", "blend_weights", "swish_beta"):
            assert {f"smcnLin/{layer}/{what}/{stat}" for stat in ("mean", "stddev", "max", "min", "histogram")} <= tags
    assert {f"smcnLin/conv1/weights/gradient/{stat}" for stat in ("mean", "histogram")} <= tags
    assert {"objective/top1", "objective/top5"} <= tags
    assert sorted(starts) == [19, 38]  # one marker per resumed session, at the minibatch it resumed from


def test_create_checkpoints_false_keeps_the_checkpoints_and_ignores_the_walltime(tiny_root):
    """As in the original: the flag only stops a run from ending early for -walltime."""
    s = run_settings(tiny_root, n_minibatches=40, walltime=1e-4, create_checkpoints=False)
    lines = []
    assert train(s, lines) == 0
    record = record_of(s)
    assert record["test_completed"] and record["checkpoints"] == [0, 19, 38, 40]
    assert not any("stopping at minibatch" in line for line in lines)


def expected_activation_kernel(af_set):
    """What a run of af_set must use here: the fused kernel wherever a C++ compiler exists (so a silent
    fallback to the plain composition fails this test), else the plain composition with the reason."""
    import shutil
    import deepnet_network as net
    if not net.FUSED_ABU:
        return "plain: DEEPNET_FUSED_ABU=0"
    if af_set not in net.FUSED_SETS.values():
        return f"plain: no fused kernel for {af_set.split('_', 1)[1]} (only 5_blend5_swish and 1_relu have one)"
    return "fused" if shutil.which(os.environ.get("CXX", "g++")) else None


@pytest.mark.parametrize("af_set", ["5_blend5_swish", "1_relu", "1_tanh"])
def test_a_training_run_uses_and_records_the_kernel_built_here(tiny_root, af_set):
    import json
    import deepnet_network as net
    s = run_settings(tiny_root, af_set=af_set, blend_trainable=True, n_minibatches=8)
    assert train(s) == 0
    record, status = record_of(s), json.load(open(run_folder.run_paths(s)["status"]))
    expected = expected_activation_kernel(af_set)
    if expected is None:                                          # no compiler: the reason is recorded
        assert record["activation_kernel"].startswith("plain: compiling deepnet_abu_op.cc failed: no C++ compiler")
    else:
        assert record["activation_kernel"] == expected
    assert status["activation_kernel"] == record["activation_kernel"]
    assert record["activation_kernel_history"] == [[0, record["activation_kernel"]]]
    assert record["activation_kernel_build"] == (net.kernel_build() if record["activation_kernel"] == "fused" else "")
    if record["activation_kernel"] == "fused":
        assert "-march=native" in record["activation_kernel_build"]   # built for this CPU, not the fallback target
