"""What a run writes to disk, estimated from its settings without TensorFlow, and the warnings when that is much
(a run's all-weights snapshots) or more than the file system has free (a sweep's runs).

Measured with ABU runs of smcn and smcnDeep: TensorBoard summaries take about SUMMARY_BYTES_PER_MB_AND_LAYER per
minibatch and weighted layer; the recorder, its copies in the checkpoints and the log about RECORD_BYTES_PER_MB per
minibatch; the weights are float32 numbers (architectures.n_trainable_weights), at the peak CHECKPOINT_WEIGHT_COPIES
copies of them (the newest two checkpoints with Adam's two moments: 6; two more kept models: 2) besides one per
all-weights snapshot.
"""
import os
import shutil

from deepnet import architectures, datasets, schedule

SUMMARY_BYTES_PER_MB_AND_LAYER = 900
RECORD_BYTES_PER_MB = 500
CHECKPOINT_WEIGHT_COPIES = 8
LARGE_SNAPSHOTS_BYTES = 2 ** 30   # a run whose all-weights snapshots take more gets a warning line


def weights_bytes(settings):
    """The bytes of one copy of the network's weights (float32)."""
    return 4 * architectures.n_trainable_weights(settings["network"], datasets.N_CLASSES[settings["task"]])


def all_weights_snapshots(settings):
    """How many snapshots of all weights the run writes at most: -safe_all_ws_n's and the tested model's."""
    return (schedule.n_weight_saves(settings["safe_all_ws_n"], settings["n_minibatches"])
            + bool(settings["save_all_weights_at_test_mb"]))


def expected_bytes(settings):
    """What one run writes at most, roughly: checkpoints, all-weights snapshots, summaries, recorder and log."""
    layers = len(architectures.layer_names(settings["network"]))
    per_mb = SUMMARY_BYTES_PER_MB_AND_LAYER * layers + RECORD_BYTES_PER_MB
    copies = CHECKPOINT_WEIGHT_COPIES + all_weights_snapshots(settings)
    return weights_bytes(settings) * copies + per_mb * settings["n_minibatches"]


def snapshots_warning(settings):
    """'' or a warning line when the run's all-weights snapshots take more than LARGE_SNAPSHOTS_BYTES."""
    snapshots, size = all_weights_snapshots(settings), weights_bytes(settings)
    if snapshots * size <= LARGE_SNAPSHOTS_BYTES:
        return ""
    return (f"warning: -safe_all_ws_n {settings['safe_all_ws_n']}: up to {snapshots} snapshots of all weights "
            f"({size / 1e6:.1f} MB each) take about {snapshots * size / 1e9:.1f} GB in 0_all_weights/ for this run")


def existing_parent(path):
    """path, or its nearest parent folder that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_space_warnings(folders_and_runs):
    """'warning:' lines, one per file system that the runs ((experiment folder, settings) pairs) may write more to
    than it has free (none when they fit)."""
    needs = {}
    for folder, settings in folders_and_runs:
        folder = existing_parent(folder)
        count, total = needs.get(folder, (0, 0))
        needs[folder] = (count + 1, total + expected_bytes(settings))
    lines = []
    for folder, (count, needed) in needs.items():
        free = shutil.disk_usage(folder).free
        if free < needed:
            lines.append(f"warning: {folder}: {free / 1e9:,.1f} GB free, but the {count} run(s) to start may write "
                         f"about {needed / 1e9:,.1f} GB (checkpoints, weight files, TensorBoard summaries, logs); "
                         "free some space or set -path_relative elsewhere")
    return lines
