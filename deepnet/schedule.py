"""When things happen in a run, as the original computes it: the learning rate at each minibatch, the epoch length,
the validation, checkpoint and weight-saving minibatches, and post-hoc early stopping (smoothing the validation
accuracies, scoring the checkpoints, which ones can still win). No TensorFlow.
"""
import functools

import numpy as np


def nominal_mbs_per_epoch(settings, n_images):
    """The original's epoch length for schedules: floor(n_images * (1 - val_set_fraction)) // minibatch_size
    (it wrote 50000, CIFAR's training-set size, for n_images)."""
    return int(np.floor(n_images * (1 - settings["val_set_fraction"]))) // settings["minibatch_size"]


@functools.lru_cache(maxsize=4)
def _linear_rates(lr, lr_min, steps):
    return np.linspace(lr, lr_min, num=steps)


def learning_rate(settings, mb, n_images):
    """The original's __lr_scheduler at minibatch mb (1-based, as it counts)."""
    kind, lr = settings["lr_schedule_type"], settings["lr"]
    if kind == "constant":
        return lr
    if kind == "decay":
        return lr * (1. / (1. + settings["lr_decay"] * mb))
    if kind == "linear":
        if mb >= settings["lr_lin_steps"]:
            return settings["lr_lin_min"]
        return float(_linear_rates(lr, settings["lr_lin_min"], settings["lr_lin_steps"])[mb])
    if kind == "step":  # absolute multipliers: lr * lr_step_multi[i-1] from the i-th boundary on
        mbs_per_epoch = nominal_mbs_per_epoch(settings, n_images)
        for i, epoch in enumerate(settings["lr_step_ep"]):
            if epoch * mbs_per_epoch - mb > 0:
                return lr if i == 0 else lr * settings["lr_step_multi"][i - 1]
        return lr * settings["lr_step_multi"][-1]
    raise ValueError(f"unknown learning-rate schedule '{kind}'")


def checkpoint_mbs(settings, n_images):
    """The original's __get_checkpoints: 0, every -epochs_between_checkpoints epochs, and the last minibatch."""
    every = nominal_mbs_per_epoch(settings, n_images) * settings["epochs_between_checkpoints"]
    checkpoints = [0]
    while checkpoints[-1] < settings["n_minibatches"]:
        checkpoints.append(checkpoints[-1] + every)
    checkpoints[-1] = settings["n_minibatches"]
    return checkpoints


def weight_save_mbs(n_saves, n_minibatches):
    """The original's save points for AF / all weights: the distinct values of round(linspace(1, N, n_saves)), so
    at most N of them: with n_saves >= N every minibatch 1..N (the points are at most 1 apart), computed without
    the n_saves points."""
    if n_saves >= n_minibatches:
        return set(range(1, n_minibatches + 1))
    return set(np.around(np.linspace(1, n_minibatches, num=n_saves)).astype(int).tolist())


def n_weight_saves(n_saves, n_minibatches):
    """How many minibatches weight_save_mbs gives: round(linspace(1, N, n)) are distinct for n < N."""
    return min(n_saves, n_minibatches)


def n_validations(settings):
    """How many validations a run does (len(validation_mbs(settings))), without listing them."""
    n, every = settings["n_minibatches"], settings["val_every"]
    return 1 + (n - 1) // every + (n > 0)


def validation_mbs(settings):
    """Minibatches with a validation, as the original's: 0, every -val_every, and the last."""
    n = settings["n_minibatches"]
    return sorted({0, n} | set(range(settings["val_every"], n, settings["val_every"])))


SMOOTHING_PASSES = 3  # the original smooths the validation accuracies three times


def smoothing_window(val_mbs):
    """The original's window in validation points: min(2000, max(N // 10, 500)) minibatches over
    N // (number of validations) minibatches per validation (its integer arithmetic; N the last one)."""
    mbs_per_val = val_mbs[-1] // len(val_mbs)
    return min(2000, max(val_mbs[-1] // 10, 500)) // max(mbs_per_val, 1)


def smooth(values, window, passes=SMOOTHING_PASSES):
    """The original's __smooth: the mean over [i - window//2, i + window//2) clipped at the ends,
    `passes` times (a window under 2 points counts as 2: the original's would be empty)."""
    half = max(window // 2, 1)
    y = np.asarray(values, np.float64)
    for _ in range(passes):
        y = np.array([np.mean(y[max(i - half, 0):i + half]) for i in range(len(y))])
    return y


def checkpoint_scores(record, val_mbs):
    """(smoothed validation accuracy at each checkpoint whose score is final, smoothed curve so far).

    A checkpoint is scored at the validation nearest to it (the earlier of two equally near). With
    K of the len(val_mbs) validations done, the smoothed value at index j no longer changes once
    j + 3 * (window // 2) - 2 <= K: every window it depends on then lies inside the K values.
    """
    window = smoothing_window(val_mbs)
    done = len(record["val_top1_hist"])
    smoothed = smooth(record["val_top1_hist"], window)
    reach = SMOOTHING_PASSES * max(window // 2, 1) - 2
    schedule, scores = np.asarray(val_mbs), {}
    for c in record["checkpoints"]:
        j = int(np.argmin(np.abs(schedule - c)))
        if done == len(val_mbs) or j + reach <= done:
            scores[c] = float(smoothed[j])
    return scores, smoothed


def _best(scores):
    """Highest score; on an exact tie the later checkpoint (the original's argmax took the first)."""
    return max(scores, key=lambda c: (scores[c], c))


def checkpoints_to_keep(record, val_mbs):
    """Checkpoints that can still win post-hoc early stopping: those not yet scored for good, and the
    best of the scored ones."""
    scores, _ = checkpoint_scores(record, val_mbs)
    pending = {c for c in record["checkpoints"] if c not in scores}
    return pending | ({_best(scores)} if scores else set())


def early_stopping_mb(record, val_mbs):
    """(tested checkpoint, smoothed curve): the best smoothed validation accuracy; the last
    checkpoint when there is no validation split."""
    if not record["settings"]["create_val_set"]:
        return record["checkpoints"][-1], []
    assert len(record["val_top1_hist"]) == len(val_mbs), "early stopping needs every validation"
    scores, smoothed = checkpoint_scores(record, val_mbs)
    return _best(scores), smoothed.tolist()
