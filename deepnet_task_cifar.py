"""CIFAR task: data, training with checkpoints and exact resume, post-hoc early stopping, test.

A run lives in EXP/<spec>/run_<run>/ (EXP = PATH/3_output_cifar/<experiment>/). Its checkpoints are
folders models/ckpt_mb_<mb>/ that appear atomically (written under a temporary name, then renamed):
    state.*        model and optimizer variables (the newest two checkpoints keep it: resume, and fall back
                   to the one before when the newest cannot be read)
    model.*        model variables (kept while the checkpoint can still win post-hoc early stopping)
    recorder.pkl   the recorder as of that minibatch; once the run is tested, the kept folder holds the last
                   checkpoint's, from which a lost run recorder is rebuilt by testing again
Everything random is a pure function of (seed, epoch / step, layer): the data split, each epoch's order
and the dropout masks; the run records its data's fingerprint and its thread counts and resumes only on the
same data, with the same threads. So a run resumed from any checkpoint continues exactly as it would have.
"""
import functools
import glob
import hashlib
import os
import re
import shutil
import signal
import time

import numpy as np
import psutil

import deepnet_network as net
from deepnet_task_cifar_preprocessing import sidecar_path
from deepnet_util import (RunError, RunLock, UserError, atomic_write_bytes, load_json_object, load_pickle,
                          save_json, save_pickle, save_text, tf_error_reason)

tf = net.tf

N_CLASSES = {"cifar10": 10, "cifar100": 100}
PREPROCESSING_SUFFIX = {"none": "", "ztrans": "_ztrans", "gcn_zca": "_gcn_zca"}
EVAL_BATCH = 500
SUMMARY_EVERY = 20  # TensorBoard summaries of the training minibatch, as the original's
SMOOTHING_PASSES = 3


# ---------------------------------------------------------------- paths

def experiment_dir(s):
    return os.path.join(s["path_relative"], "3_output_cifar", s["experiment_name"])


def af_weights_source_dir(s):
    """The experiment folder -af_weights_init predefined reads from: -load_af_weights_experiment, else the run's
    own (the original's only choice)."""
    return experiment_dir(dict(s, experiment_name=s.get("load_af_weights_experiment") or s["experiment_name"]))


def run_paths(s):
    """Every file and folder of one run, derived from the settings."""
    exp = experiment_dir(s)
    spec, run = s["spec_name"], s["run"]
    run_dir = os.path.join(exp, spec, f"run_{run}")
    return dict(
        exp=exp, run_dir=run_dir,
        record=os.path.join(run_dir, f"record_{spec}_run_{run}.pkl"),
        run_info=os.path.join(run_dir, f"run_info_{s['experiment_name']}_{spec}_run_{run}.txt"),
        learning_curves=os.path.join(run_dir, f"learning_curves_{spec}_run_{run}.png"),
        early_stopping=os.path.join(run_dir, "early_stopping_analysis.png"),
        split=os.path.join(run_dir, "datasets", "split.pkl"),
        models=os.path.join(run_dir, "models"),
        lock=os.path.join(run_dir, ".lock"),
        status=os.path.join(run_dir, "status.json"),
        summaries=os.path.join(exp, "0_summaries", f"{spec}_{run}"),
        all_weights=os.path.join(exp, "0_all_weights"),
        weight_temporaries=[net.af_weights_path(exp, spec, run, "*", "*") + ".*",  # of a killed writer
                            os.path.join(exp, "0_all_weights", f"all_weights_{spec}_run_{run}_mb_*.pkl.*")],
    )


def data_files(s):
    """(train pickle, test pickle) written by deepnet_task_cifar_preprocessing.py."""
    task, suffix = s["task"], PREPROCESSING_SUFFIX[s["preprocessing"]]
    root = os.path.join(s["path_relative"], f"1_data_{task}")
    return (os.path.join(root, f"train_set{suffix}", f"{task}_trainset.pkl"),
            os.path.join(root, f"test_set{suffix}", f"{task}_testset.pkl"))


# ---------------------------------------------------------------- data

def load_dataset(path, n_classes):
    """Images (n,32,32,3) float32 and labels (n,) int64 from a preprocessed pickle, validated.

    Reads this suite's pickles (arrays) and the original preprocessing script's ({'images': list of
    (32, 32, 3) arrays, uint8 / float32 / float64, 'labels': list of int}); images become float32,
    as the original's float32 input placeholder made them.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: preprocessed data not found (run deepnet_task_cifar_preprocessing.py)")
    data = load_pickle(path)
    if not isinstance(data, dict) or "images" not in data or "labels" not in data:
        raise UserError(f"{path}: expected a dict with 'images' and 'labels'")
    images, labels = _image_array(data["images"], path), data["labels"]
    if len(images) == 0:
        raise UserError(f"{path}: holds no images")
    try:
        labels = np.asarray(labels)
    except ValueError:
        raise UserError(f"{path}: labels must be {len(images)} integers, got a ragged sequence") from None
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels must be {len(images)} integers, got shape {labels.shape} "
                        f"dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{path}: labels must lie in 0..{n_classes - 1}")
    if not np.isfinite(images).all():
        raise UserError(f"{path}: images contain NaN or Inf")
    return images, labels.astype(np.int64)


IMAGE_DTYPES = (np.uint8, np.float32, np.float64)


def _image_array(images, path):
    """An (n, 32, 32, 3) float32 array from an array or a list of (32, 32, 3) arrays (UserError if neither)."""
    if isinstance(images, list) and all(isinstance(image, np.ndarray) for image in images):
        shapes = {image.shape for image in images}
        if shapes - {(32, 32, 3)}:
            raise UserError(f"{path}: images must be (32, 32, 3) arrays, found shape(s) "
                            f"{sorted(shapes - {(32, 32, 3)})}")
        dtypes = {image.dtype for image in images}
        if dtypes - set(map(np.dtype, IMAGE_DTYPES)):
            raise UserError(f"{path}: images must be uint8, float32 or float64, got {sorted(map(str, dtypes))}")
        stacked = np.empty((len(images), 32, 32, 3), np.float32)
        for i, image in enumerate(images):
            stacked[i] = image
        return stacked
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise UserError(f"{path}: images must be an array of shape (n, 32, 32, 3) or a list of (32, 32, 3) "
                        f"arrays, got {getattr(images, 'shape', type(images).__name__)}")
    if images.dtype not in map(np.dtype, IMAGE_DTYPES):
        raise UserError(f"{path}: images must be uint8, float32 or float64, got {images.dtype}")
    return images if images.dtype == np.float32 else images.astype(np.float32)


def validation_size(n_images, fraction, minibatch_size):
    """The original's split: round(fraction * n_images) moved to the nearest multiple of the minibatch
    size (half a minibatch rounds down), but at least one minibatch (the original's could be empty)."""
    n_val = int(np.round(n_images * fraction))
    offset = n_val % minibatch_size
    n_val -= offset
    if offset > 0.5 * minibatch_size:
        n_val += minibatch_size
    return max(n_val, minibatch_size)


def make_split(n_images, s):
    """(train indices, validation indices): a permutation keyed on the seed, then cut."""
    order = np.random.default_rng([s["seed"], 0]).permutation(n_images)
    n_val = validation_size(n_images, s["val_set_fraction"], s["minibatch_size"]) if s["create_val_set"] else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(s, epoch, n_train):
    """The shuffled order of training images in one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([s["seed"], 1, epoch]).permutation(n_train)


class Data:
    """Training, validation and test arrays of one run (validation = test when there is no split).

    The training images stay in the loaded array (no copy of the training part): a minibatch gathers
    its rows through the split's indices in each epoch's order.
    """

    def __init__(self, train, test, split, minibatch_size):
        (self.images, self.labels), (self.test_images, self.test_labels) = train, test
        self.train_idx, val_idx = split
        if len(val_idx):
            self.val_images, self.val_labels = self.images[val_idx], self.labels[val_idx]
        else:
            self.val_images, self.val_labels = self.test_images, self.test_labels
        self.mbs_per_epoch = len(self.train_idx) // minibatch_size
        self._epoch, self._order = None, None

    def minibatch(self, step, batch_size, s):
        """Images and labels of training step `step` (1-based); reshuffled every epoch."""
        epoch, position = divmod(step - 1, self.mbs_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = self.train_idx[epoch_order(s, epoch, len(self.train_idx))]
        idx = self._order[position * batch_size:(position + 1) * batch_size]
        return self.images[idx], self.labels[idx]


def check_data_fits(s, n_train_images):
    """UserError when the split leaves no full training minibatch."""
    n_val = validation_size(n_train_images, s["val_set_fraction"], s["minibatch_size"]) \
        if s["create_val_set"] else 0
    if n_train_images - n_val < s["minibatch_size"] or nominal_mbs_per_epoch(s, n_train_images) < 1:
        raise UserError(f"-minibatch_size {s['minibatch_size']}: larger than the {n_train_images - n_val} "
                        f"training images left after a validation split of {n_val}")


# ---------------------------------------------------------------- data identity

def _sha256(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def dataset_fingerprint(path, images, labels, root):
    """What identifies a data file: its path under -path_relative, its image count, a sha256 of the arrays as
    training reads them, and its sidecar's preprocessing parameters (None without a sidecar; for messages)."""
    sidecar = load_json_object(sidecar_path(path)) or {}
    return {"file": os.path.relpath(path, root), "images": len(labels), "sha256": _sha256(images, labels),
            "parameters": sidecar.get("parameters")}


def split_fingerprint(split):
    """The split's sizes and a sha256 of its (training, validation) indices."""
    train_idx, val_idx = split
    return {"train": len(train_idx), "validation": len(val_idx),
            "sha256": _sha256(np.asarray(train_idx, np.int64), np.asarray(val_idx, np.int64))}


def data_change(before, now):
    """How a data file's fingerprint changed ('' if it did not): its preprocessing parameters, its image count
    or its content."""
    if (before["images"], before["sha256"]) == (now["images"], now["sha256"]):
        return ""
    old, new = before.get("parameters"), now.get("parameters")
    if isinstance(old, dict) and isinstance(new, dict) and old != new:
        changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        return "preprocessed with other parameters: " + ", ".join(
            f"{key} {old.get(key)} -> {new.get(key)}" for key in changed)
    if before["images"] != now["images"]:
        return f"{before['images']} -> {now['images']} images"
    return f"same size, other content: sha256 {before['sha256'][:12]}... -> {now['sha256'][:12]}..."


def split_change(before, now):
    """How a split's fingerprint changed ('' if it did not)."""
    if before == now:
        return ""
    if (before["train"], before["validation"]) != (now["train"], now["validation"]):
        return (f"{before['train']} training / {before['validation']} validation images -> "
                f"{now['train']} / {now['validation']}")
    return f"other images in each part: sha256 {before['sha256'][:12]}... -> {now['sha256'][:12]}..."


def check_same_data(s, record, fingerprint, out=print):
    """UserError naming the data file when it differs from the one the run started with (in `fingerprint`:
    'train' and/or 'test'). A run started before fingerprints were recorded is noted and not checked."""
    before = record.get("data_fingerprint")
    tag = f"{s['spec_name']}/run {s['run']}"
    if not before:
        out(f"{tag}: started before data fingerprints were recorded, so its data cannot be checked")
        return
    for key, now in fingerprint.items():
        change = data_change(before[key], now) if key in before else ""
        if change:
            raise UserError(f"{os.path.join(s['path_relative'], now['file'])}: not the data {tag} started with "
                            f"({change}); restore those data, or start another run (-run, -spec_name or "
                            "-experiment_name)")


def read_split(path):
    """The (training, validation) indices in a split file, or None when it is missing or unreadable."""
    try:
        split = load_pickle(path) if os.path.isfile(path) else None
    except UserError:
        return None
    if not (isinstance(split, (tuple, list)) and len(split) == 2 and
            all(isinstance(part, np.ndarray) and part.ndim == 1 and np.issubdtype(part.dtype, np.integer)
                for part in split)):
        return None
    return tuple(split)


def run_split(s, path, n_images, recorded):
    """(the run's split, whether split.pkl must be written): the file's when it holds the split the run started
    with (`recorded`, else the seed's), UserError when it holds another; the seed's when it is missing or
    unreadable."""
    from_seed = make_split(n_images, s)
    expected = recorded or split_fingerprint(from_seed)
    saved = read_split(path)
    if saved is not None:
        change = split_change(expected, split_fingerprint(saved))
        if change:
            raise UserError(f"{path}: not the split {s['spec_name']}/run {s['run']} started with ({change}); "
                            f"delete it to have it rebuilt from -seed {s['seed']}")
        return saved, False
    change = split_change(expected, split_fingerprint(from_seed))
    if change:
        raise UserError(f"{path}: missing or unreadable, and -seed {s['seed']} gives another split than the "
                        f"one the run started with ({change})")
    return from_seed, True


# ---------------------------------------------------------------- threads

def current_threads():
    """The thread counts a new run uses: TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS where set (the
    supervisor sets them), else TensorFlow's default, one per CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def from_env(name):
        text = os.environ.get(name, "")
        return int(text) if text.isdigit() and int(text) > 0 else cpus
    return {"intra_op": from_env("TF_NUM_INTRAOP_THREADS"), "inter_op": from_env("TF_NUM_INTEROP_THREADS")}


def session_config(threads):
    """A Session config with the run's thread counts. The intra-op count changes the low bits of the
    results; TensorFlow would size one pool for the whole process from its first session, so each session
    gets its own (TF_OVERRIDE_GLOBAL_THREADPOOL, read when TensorFlow creates its first device)."""
    os.environ["TF_OVERRIDE_GLOBAL_THREADPOOL"] = "1"
    return tf.ConfigProto(intra_op_parallelism_threads=threads["intra_op"],
                          inter_op_parallelism_threads=threads["inter_op"])


# ---------------------------------------------------------------- schedules

def nominal_mbs_per_epoch(s, n_images):
    """The original's epoch length for schedules: floor(n_images * (1 - val_set_fraction)) // minibatch_size
    (it wrote 50000, CIFAR's training-set size, for n_images)."""
    return int(np.floor(n_images * (1 - s["val_set_fraction"]))) // s["minibatch_size"]


@functools.lru_cache(maxsize=4)
def _linear_rates(lr, lr_min, steps):
    return np.linspace(lr, lr_min, num=steps)


def learning_rate(s, mb, n_images):
    """The original's __lr_scheduler at minibatch mb (1-based, as it counts)."""
    kind, lr = s["lr_schedule_type"], s["lr"]
    if kind == "constant":
        return lr
    if kind == "decay":
        return lr * (1. / (1. + s["lr_decay"] * mb))
    if kind == "linear":
        return float(_linear_rates(lr, s["lr_lin_min"], s["lr_lin_steps"])[mb]) if mb < s["lr_lin_steps"] \
            else s["lr_lin_min"]
    if kind == "step":  # absolute multipliers: lr * lr_step_multi[i-1] from the i-th boundary on
        mbs_per_epoch = n_images * (1 - s["val_set_fraction"]) // s["minibatch_size"]
        for i, epoch in enumerate(s["lr_step_ep"]):
            if epoch * mbs_per_epoch - mb > 0:
                return lr if i == 0 else lr * s["lr_step_multi"][i - 1]
        return lr * s["lr_step_multi"][-1]
    raise ValueError(f"unknown learning-rate schedule '{kind}'")


def checkpoint_mbs(s, n_images):
    """The original's __get_checkpoints: 0, every -epochs_between_checkpoints epochs, and the last minibatch."""
    every = nominal_mbs_per_epoch(s, n_images) * s["epochs_between_checkpoints"]
    checkpoints = [0]
    while checkpoints[-1] < s["n_minibatches"]:
        checkpoints.append(checkpoints[-1] + every)
    checkpoints[-1] = s["n_minibatches"]
    return checkpoints


def weight_save_mbs(n_saves, n_minibatches):
    """The original's save points for AF / all weights: the distinct values of round(linspace(1, N, n_saves))."""
    return set(np.around(np.linspace(1, n_minibatches, num=n_saves)).astype(int).tolist())


def validation_mbs(s):
    """Minibatches with a validation, as the original's: 0, every -val_every, and the last."""
    n = s["n_minibatches"]
    return sorted({0, n} | set(range(s["val_every"], n, s["val_every"])))


# ---------------------------------------------------------------- recorder

RECORD_LISTS = ("train_loss_hist train_xentropy_hist train_top1_hist train_mb_n_hist val_loss_hist "
                "val_xentropy_hist val_top1_hist val_top5_hist val_apc_hist val_af_weights_hist "
                "val_preact_stats_hist val_mb_n_hist checkpoints val_top1_smoothed test_mb_n_hist").split()


def new_recorder(s, mbs_per_epoch, data_fingerprint=None, threads=None):
    record = {key: [] for key in RECORD_LISTS}
    record.update(experiment_name=s["experiment_name"], spec_name=s["spec_name"], run=s["run"],
                  settings=dict(s), mbs_per_epoch=mbs_per_epoch, data_fingerprint=data_fingerprint,
                  threads=threads or current_threads(), mb_count_total=0, ep_count_total=0,
                  early_stopping_mb=None, test_loss=None, test_xentropy=None, test_top1=None, test_top5=None,
                  test_apc=None, test_af_weights=None, training_completed=False, test_completed=False,
                  diverged=False, diverged_at_mb=None, activation_kernel=None, activation_kernel_build="",
                  activation_kernel_history=[])
    return record


# ---------------------------------------------------------------- evaluation (validation and test)

def per_class_accuracy(predictions, labels, n_classes):
    hits = np.bincount(labels, weights=(predictions == labels), minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes)
    return np.divide(hits, counts, out=np.full(n_classes, np.nan), where=counts > 0)


def evaluation_batches(n_images, s):
    """The slices a set is evaluated in: EVAL_BATCH images at a time; where inference depends on the batch
    (smcnBN with batch statistics), the original's full minibatches in order, the remainder left out (a set
    smaller than one minibatch: one batch of all)."""
    if not net.uses_batch_statistics(s):
        return [slice(start, min(start + EVAL_BATCH, n_images)) for start in range(0, n_images, EVAL_BATCH)]
    size = s["minibatch_size"]
    if n_images < size:
        return [slice(0, n_images)]
    return [slice(start, start + size) for start in range(0, n_images - size + 1, size)]


def evaluate(sess, model, images, labels, s):
    """Loss (with weight decay when on, as the original's), cross-entropy, top-1, top-5, per-class accuracy
    and pre-activation statistics over a whole set (see evaluation_batches)."""
    batches = evaluation_batches(len(images), s)
    n, totals = batches[-1].stop, np.zeros(4)
    images, labels = images[:n], labels[:n]
    predictions = np.empty(n, np.int64)
    moments = {name: np.zeros(2) for name in model.preact_stats}
    feed_base = {model.inputs.keep_probs: s["dropout_keep_probs_inference"]}
    for batch in batches:
        feed = {model.inputs.images: images[batch], model.inputs.labels: labels[batch], **feed_base}
        loss, xentropy, top1, top5, pred, stats = sess.run(
            [model.loss, model.cross_entropy, model.top1, model.top5, model.predictions, model.preact_stats], feed)
        size = batch.stop - batch.start
        totals += size * np.array([loss, xentropy, top1, top5])
        predictions[batch] = pred
        for name, (mean, var) in stats.items():
            moments[name] += size * np.array([mean, var + mean ** 2])
    loss, xentropy, top1, top5 = totals / n
    preact = {name: {"mean": float(m / n), "std": float(np.sqrt(max(sq / n - (m / n) ** 2, 0.0)))}
              for name, (m, sq) in moments.items()}
    return dict(n=n, loss=float(loss), xentropy=float(xentropy), top1=float(top1), top5=float(top5),
                apc=per_class_accuracy(predictions, labels, N_CLASSES[s["task"]]), preact=preact)


# ---------------------------------------------------------------- post-hoc early stopping (the original's rule)

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


# ---------------------------------------------------------------- checkpoints

def checkpoint_dirs(models_dir):
    """{mb: folder} of the complete checkpoints (temporary folders are ignored)."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(models_dir), "ckpt_mb_*")):
        match = re.fullmatch(r"ckpt_mb_(\d+)", os.path.basename(path))
        if match and os.path.isfile(os.path.join(path, "recorder.pkl")):
            found[int(match.group(1))] = path
    return found


def remove_temporary_files(paths):
    """Leftovers of an interrupted process: partial checkpoints, half-deleted folders, temp files (in the
    experiment's shared weight folders only those of this run's files)."""
    patterns = [os.path.join(glob.escape(folder), ".tmp_*")
                for folder in (paths["run_dir"], paths["models"], os.path.dirname(paths["split"]))]
    patterns += [os.path.join(glob.escape(os.path.dirname(p)), ".tmp_" + os.path.basename(p))
                 for p in paths["weight_temporaries"]]
    for path in (path for pattern in patterns for path in glob.glob(pattern)):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def remove_folder(path):
    """Delete a folder so that an interruption never leaves it half-deleted under its own name."""
    doomed = os.path.join(os.path.dirname(path), f".tmp_del_{os.path.basename(path)}_{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


STATE_KEPT = 2  # the newest checkpoints that keep the optimizer state: resume, or fall back to the one before


class CheckpointUnreadable(Exception):
    """A checkpoint file that cannot be read (truncated, missing, corrupt)."""


def read_record(path):
    """(the recorder in path, '') or (None, why not): missing, unreadable or not a recorder."""
    if not os.path.isfile(path):
        return None, f"{path}: missing"
    try:
        record = load_pickle(path)
    except UserError as err:
        return None, str(err)
    if not isinstance(record, dict) or "settings" not in record:
        return None, f"{path}: not a recorder"
    return record, ""


def checkpoint_record(folder):
    """The recorder of a checkpoint folder (CheckpointUnreadable if it cannot be read)."""
    record, problem = read_record(os.path.join(folder, "recorder.pkl"))
    if record is None:
        raise CheckpointUnreadable(problem)
    return record


def restore(saver, sess, folder, name):
    """saver.restore from folder/name (CheckpointUnreadable naming the folder if it cannot be read)."""
    if not os.path.isfile(os.path.join(folder, f"{name}.index")):
        raise CheckpointUnreadable(f"{folder}: {name}.index missing")
    try:
        saver.restore(sess, os.path.join(folder, name))
    except (tf.errors.OpError, ValueError) as err:
        reason = tf_error_reason(err) if isinstance(err, tf.errors.OpError) else str(err)
        raise CheckpointUnreadable(f"{folder}: {name}.* unreadable ({reason})") from None


class Checkpointer:
    """Writes checkpoint folders atomically and prunes what can no longer be needed."""

    def __init__(self, model, models_dir):
        self.models_dir = models_dir
        self.state_saver = tf.train.Saver(tf.global_variables(), max_to_keep=None, save_relative_paths=True)
        self.model_saver = tf.train.Saver(model.model_variables, max_to_keep=None, save_relative_paths=True)

    def save(self, sess, record, mb, with_model):
        final = os.path.join(self.models_dir, f"ckpt_mb_{mb}")
        tmp = os.path.join(self.models_dir, f".tmp_ckpt_mb_{mb}_{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        try:
            self.state_saver.save(sess, os.path.join(tmp, "state"), write_meta_graph=False, write_state=False)
            if with_model:
                self.model_saver.save(sess, os.path.join(tmp, "model"), write_meta_graph=False,
                                      write_state=False)
            save_pickle(os.path.join(tmp, "recorder.pkl"), record)
            _fsync_dir(tmp)
            if os.path.exists(final):
                remove_folder(final)
            os.rename(tmp, final)
            _fsync_dir(self.models_dir)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, tf.errors.OpError):
                raise RunError(f"{final}: checkpoint not written ({tf_error_reason(err)}); the checkpoints "
                               "written before are intact: fix the cause and run the same command again to "
                               "resume") from None
            raise

    def restore_state(self, sess, folder):
        restore(self.state_saver, sess, folder, "state")

    def restore_model(self, sess, folder):
        restore(self.model_saver, sess, folder, "model")

    def prune(self, keep_models):
        """Delete state files of all but the newest STATE_KEPT checkpoints, and folders no longer needed."""
        found = checkpoint_dirs(self.models_dir)
        newest = sorted(found)[-STATE_KEPT:]
        for mb, folder in found.items():
            if mb in newest:
                continue
            if mb not in keep_models:
                remove_folder(folder)
                continue
            for path in glob.glob(os.path.join(glob.escape(folder), "state.*")):
                os.remove(path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- saving weights

def save_af_weights(sess, s, mb):
    """The trainable AF variables in the original's format (no file when none is trainable)."""
    content = net.af_weights_file_content(sess, sess.graph)
    if content:
        save_pickle(net.af_weights_path(experiment_dir(s), s["spec_name"], s["run"], mb), content)
        save_json(net.af_weights_path(experiment_dir(s), s["spec_name"], s["run"], mb, "json"), content)


def save_all_weights(sess, s, mb):
    """Every trainable variable of the run's graph, keyed by its TF name (as the original)."""
    variables = sess.graph.get_collection(tf.GraphKeys.TRAINABLE_VARIABLES)
    path = os.path.join(run_paths(s)["all_weights"], f"all_weights_{s['spec_name']}_run_{s['run']}_mb_{mb}.pkl")
    save_pickle(path, dict(zip((v.name for v in variables), sess.run(variables))))


# ---------------------------------------------------------------- reports

def write_run_info(s, record, status):
    lines = [f"experiment: {s['experiment_name']}", f"spec: {s['spec_name']}", f"run: {s['run']}",
             f"status: {status}", f"training completed: {record['training_completed']}",
             f"test completed: {record['test_completed']}", f"diverged: {record['diverged']}",
             f"minibatches done: {record['mb_count_total']} / {s['n_minibatches']}",
             f"early-stopping minibatch: {record['early_stopping_mb']}",
             f"test top-1: {record['test_top1']}", "", "settings:"]
    lines += [f"  {key} = {value}" for key, value in sorted(s.items())]
    save_text(run_paths(s)["run_info"], "\n".join(lines) + "\n")


def _plot_to(path, draw):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(9, 5))
    draw(fig.gca())
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), f".tmp_{os.path.basename(path)}")
    try:
        fig.savefig(tmp, dpi=90)
    except OSError as err:  # e.g. a full disk: name the file, leave no partial one
        if os.path.exists(tmp):
            os.remove(tmp)
        err.filename = err.filename or path
        raise
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def plot_learning_curves(record, path):
    def draw(ax):
        ax.plot(record["train_mb_n_hist"], record["train_top1_hist"], lw=0.5, alpha=0.5, label="train top-1")
        ax.plot(record["val_mb_n_hist"], record["val_top1_hist"], lw=1.5, label="validation top-1")
        ax.set(xlabel="minibatch", ylabel="accuracy", title=f"{record['spec_name']} run {record['run']}")
        ax.legend()
    _plot_to(path, draw)


def plot_early_stopping(record, smoothed, path):
    def draw(ax):
        ax.plot(record["val_mb_n_hist"], record["val_top1_hist"], lw=0.8, alpha=0.6, label="validation top-1")
        if len(smoothed):
            ax.plot(record["val_mb_n_hist"], smoothed, lw=2, label="smoothed")
        for c in record["checkpoints"]:
            ax.axvline(c, color="grey", lw=0.5, alpha=0.5)
        ax.axvline(record["early_stopping_mb"], color="red", lw=1.5,
                   label=f"tested: mb {record['early_stopping_mb']} (test top-1 {record['test_top1']:.4f})")
        ax.set(xlabel="minibatch", ylabel="accuracy", title=f"early stopping: {record['spec_name']} run {record['run']}")
        ax.legend()
    _plot_to(path, draw)


def _clock(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- TensorBoard HParams

NOT_HPARAMS = ("path_relative", "experiment_name", "mode", "walltime", "reference")
ALWAYS_SHOWN_HPARAMS = ("af_set", "blend_mode", "network", "optimizer", "lr", "minibatch_size", "seed")
HPARAM_METRICS = {"hparams/test_top1": "test top-1", "hparams/test_top5": "test top-5",
                  "hparams/best_val_top1": "best validation top-1",
                  "hparams/early_stopping_mb": "early-stopping minibatch"}
HPARAMS_CONFIG_SUFFIX = ".hparams_config"


def hparam_values(s):
    """A run's settings as HParams values: every flag but the bookkeeping ones, lists as text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else
            " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in s.items() if key not in NOT_HPARAMS}


def _as_tf_summary(proto):
    return tf.Summary.FromString(proto.SerializeToString())


def log_hparams(writer, s):
    """The run's HParams session start (once per run: at its first minibatch)."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    writer.add_summary(_as_tf_summary(hp.hparams_pb(hparam_values(s), trial_id=f"{s['spec_name']}/run_{s['run']}")))
    writer.flush()


def log_final_metrics(writer, record):
    """The HParams metrics of a tested run, as scalars at its last minibatch."""
    values = {"hparams/test_top1": record["test_top1"], "hparams/test_top5": record["test_top5"],
              "hparams/early_stopping_mb": record["early_stopping_mb"]}
    if record["settings"]["create_val_set"]:  # without one, the validations ran on the test set
        values["hparams/best_val_top1"] = max(record["val_top1_hist"])
    writer.add_summary(tf.Summary(value=[tf.Summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in values.items()]), record["mb_count_total"])
    writer.flush()


def write_hparams_config(exp_dir, settings_by_spec):
    """The experiment's HParams config in EXP/0_summaries/: spec_name, the settings that differ between
    the specs, the always-shown ones, and the metrics. Replaces the config written before."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    values = [hparam_values(s) for s in settings_by_spec.values()]
    keys = sorted({key for v in values for key in v})
    differ = [key for key in keys if key not in ("spec_name", "run", "seed")
              and len({repr(v.get(key)) for v in values}) > 1]
    shown = list(dict.fromkeys(["spec_name", *differ, *ALWAYS_SHOWN_HPARAMS, "run"]))
    config = hp.hparams_config_pb([hp.HParam(key) for key in shown],
                                  [hp.Metric(tag, display_name=name) for tag, name in HPARAM_METRICS.items()])
    folder = os.path.join(exp_dir, "0_summaries")
    for path in glob.glob(os.path.join(glob.escape(folder), f"*{HPARAMS_CONFIG_SUFFIX}")):
        os.remove(path)
    writer = tf.summary.FileWriter(folder, filename_suffix=HPARAMS_CONFIG_SUFFIX)
    writer.add_summary(_as_tf_summary(config))
    writer.close()
    return shown


# ---------------------------------------------------------------- signals

class StopRequest:
    """While active, SIGTERM / Ctrl-C only set a flag: the loop finishes its step, checkpoints, exits."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum


# ---------------------------------------------------------------- the run

def prepare(s):
    """Check everything that can be checked before anything is written (UserError on problems)."""
    for path in data_files(s):
        if not os.path.isfile(path):
            raise UserError(f"{path}: preprocessed data not found (run deepnet_task_cifar_preprocessing.py "
                            f"--task {s['task']} --variant {s['preprocessing']} --root {s['path_relative']})")
    paths = run_paths(s)
    holder = RunLock.holder(paths["lock"])
    if holder:
        raise UserError(f"{paths['run_dir']}: this run is already running ({holder})")
    af_init = None
    if s["af_weights_init"] == "predefined":
        af_init = net.predefined_af_init(af_weights_source_dir(s), s["load_af_weights_from"], s["run"],
                                         s["network"], s["af_set"], s["norm_blendw_at_init"])
    return paths, af_init


def read_state(paths):
    """('complete'|'resume'|'fresh'|'orphan', record or None). A diverged run that is not tested yet resumes:
    it retrains to its divergence, exactly, and is tested. An unreadable recorder counts as missing (a run with
    a checkpoint rebuilds it)."""
    record, _ = read_record(paths["record"])
    if record is not None and record.get("test_completed"):
        return "complete", record
    if checkpoint_dirs(paths["models"]):
        return "resume", record
    if os.path.exists(paths["run_info"]):
        return "orphan", record
    return "fresh", None


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
            for path in glob.glob(os.path.join(glob.escape(folder), "state.*")):
                os.remove(path)
    remove_temporary_files(paths)
    if os.path.exists(paths["split"]):
        os.remove(paths["split"])
    if os.path.isdir(os.path.dirname(paths["split"])) and not os.listdir(os.path.dirname(paths["split"])):
        os.rmdir(os.path.dirname(paths["split"]))
    for path in glob.glob(os.path.join(glob.escape(paths["run_dir"]), "run_incomplete_mb_*.txt")):
        os.remove(path)


def enable_determinism():
    """Same flags and seed give the same numbers: deterministic kernels (seeds are set per graph)."""
    import tensorflow
    tensorflow.config.experimental.enable_op_determinism()


def run_training(s, out=print):
    """-mode training: train (or resume), then early-stop and test. Returns the process exit status."""
    paths, af_init = prepare(s)
    enable_determinism()
    state, record = read_state(paths)
    if state == "orphan":  # nothing to do and nothing to write
        return _finished(s, paths, state, record, out)
    if state != "complete":
        n_classes = N_CLASSES[s["task"]]
        train_path, test_path = data_files(s)
        train, test = load_dataset(train_path, n_classes), load_dataset(test_path, n_classes)
        check_data_fits(s, len(train[1]))
        fingerprint = {"train": dataset_fingerprint(train_path, *train, s["path_relative"]),
                       "test": dataset_fingerprint(test_path, *test, s["path_relative"])}
        _resume_point(s, paths, state, fingerprint, len(train[1]), out=lambda line: None)  # a refusal writes nothing
    with RunLock(paths["lock"]), StopRequest() as stop:
        state, record = read_state(paths)  # again, now that no other process can change it
        if state in ("complete", "orphan"):
            return _finished(s, paths, state, record, out)
        start, (split, write_split) = _resume_point(s, paths, state, fingerprint, len(train[1]), out)
        if start is not None:
            _say_record_rebuilt(s, paths, record, start, out)
        if write_split:
            save_pickle(paths["split"], split)
        remove_temporary_files(paths)
        fingerprint["split"] = split_fingerprint(split)
        data = Data(train, test, split, s["minibatch_size"])
        del train
        return Trainer(s, paths, data, af_init, out, stop, fingerprint, (start or {}).get("threads")).run()


def _resume_point(s, paths, state, fingerprint, n_images, out):
    """(the recorder to resume from or None, (split, whether to write it)), checked: the same flags, data and
    split as the run started with (UserError if not), and a readable checkpoint (RunError if none)."""
    start = newest_readable_record(paths) if state == "resume" else None
    if state == "resume" and start is None:
        raise no_readable_checkpoint(paths, "no recorder.pkl can be read")
    if start is not None:
        check_same_settings(s, start)
        check_same_data(s, start, fingerprint, out)
    recorded = ((start or {}).get("data_fingerprint") or {}).get("split")
    split, write = run_split(s, paths["split"], n_images, recorded)
    if write and recorded and os.path.exists(paths["split"]):
        out(f"{s['spec_name']}/run {s['run']}: {paths['split']} is unreadable; rebuilt from -seed {s['seed']}")
    return start, (split, write)


def _say_record_rebuilt(s, paths, record, start, out):
    """A line when the run's recorder is missing or unreadable although the run has a checkpoint."""
    problem = read_record(paths["record"])[1] if record is None else ""
    if not problem:
        return
    tested = start["training_completed"] or (load_json_object(paths["status"]) or {}).get("state") == "complete"
    if tested or os.path.exists(paths["record"]):  # tested: also a diverged run, tested before it trained to the end
        out(f"{s['spec_name']}/run {s['run']}: {problem}; it is rebuilt from the newest checkpoint"
            + (", testing the run again" if tested else ""))


def _finished(s, paths, state, record, out):
    tag = f"{s['spec_name']}/run {s['run']}"
    if state == "orphan":
        raise UserError(f"{paths['run_dir']}: has run info but no checkpoint; refusing to overwrite it "
                        "(move it away or choose another -experiment_name/-run)")
    finish_cleanup(paths, record)
    status = RunStatus(paths["status"], s)
    if status.previous.get("state") != "complete":  # the test finished, its status line did not
        status.write(record, "complete", "complete" + diverged_note(record))
    out(f"{tag}: already complete (test top-1 {record['test_top1']:.4f} at mb "
        f"{record['early_stopping_mb']}{diverged_note(record)}); nothing to do")
    return 0


# Flags that may change between the sessions of one run.
RESUMABLE_CHANGES = {"walltime", "path_relative", "mode", "reference"}


def settings_as_started(settings):
    """A recorder's settings in today's terms. Runs started before the suite took the original's defaults (their
    settings have no 'bn_inference') clipped and then normalised for 'posnormed' (now 'clipnormed'), evaluated
    smcnBN with moving averages and read predefined AF weights from their own experiment."""
    if not isinstance(settings, dict) or "bn_inference" in settings:
        return settings
    mode = settings.get("blend_mode")
    return dict(settings, bn_inference="moving_averages", load_af_weights_experiment="",
                blend_mode="clipnormed" if mode == "posnormed" else mode)


def check_same_settings(s, record):
    """UserError if the flags differ from those the run was started with (-bn_inference only matters with batch
    norm); record['settings'] is put in today's terms (settings_as_started)."""
    before = record["settings"] = settings_as_started(record["settings"])
    ignored = RESUMABLE_CHANGES | ({"bn_inference"} if s["network"] not in net.BATCH_NORM_NETWORKS else set())
    differ = sorted(k for k in set(s) | set(before) if k not in ignored and s.get(k) != before.get(k))
    if differ:
        changes = ", ".join(f"-{k} {before.get(k)} -> {s.get(k)}" for k in differ)
        raise UserError(f"{record['spec_name']}/run {record['run']}: cannot resume with other settings ({changes}); "
                        "use the original flags or another -run/-spec_name")


def newest_readable_record(paths):
    """The recorder of the newest checkpoint whose recorder can be read, or None."""
    for _, folder in sorted(checkpoint_dirs(paths["models"]).items(), reverse=True):
        record, _ = read_record(os.path.join(folder, "recorder.pkl"))
        if record is not None:
            return record
    return None


def no_readable_checkpoint(paths, unreadable):
    return RunError(f"{paths['models']}: no checkpoint can be read ({unreadable}); nothing was deleted. To train the "
                    f"run again from the start, move {paths['run_dir']} away and run the same command")


class Trainer:
    """One run's training loop, validation, checkpoints and final test.

    data_fingerprint and threads identify a new run's data and threads (a resumed run has its own)."""

    def __init__(self, s, paths, data, af_init, out, stop, data_fingerprint=None, threads=None):
        self.s, self.paths, self.data, self.out, self.stop = s, paths, data, out, stop
        self.data_fingerprint, self.threads = data_fingerprint, threads or current_threads()
        self.n_images = len(data.labels)
        self.val_schedule = validation_mbs(s)
        self.val_mbs = set(self.val_schedule)
        self.ckpt_mbs = set(checkpoint_mbs(s, self.n_images))
        self.af_mbs = weight_save_mbs(s["safe_af_ws_n"], s["n_minibatches"])
        self.all_mbs = weight_save_mbs(s["safe_all_ws_n"], s["n_minibatches"])
        self.graph = tf.Graph()
        with self.graph.as_default():
            settings = dict(s, n_classes=N_CLASSES[s["task"]])
            self.model = net.build_model(settings, af_init)
            self.checkpointer = Checkpointer(self.model, paths["models"])
            self.init_op = tf.global_variables_initializer()
        self.graph.finalize()
        self.sess = tf.Session(graph=self.graph, config=session_config(self.threads))
        try:
            self.writer = tf.summary.FileWriter(paths["summaries"])
        except tf.errors.OpError as err:
            self.sess.close()
            raise RunError(f"{paths['summaries']}: cannot write the TensorBoard summaries there "
                           f"({tf_error_reason(err)})") from None
        self.started = time.monotonic()
        self.timing = {"mb": [], "val": []}
        self.status = RunStatus(paths["status"], s)

    def run(self):
        try:
            return self._run()
        except BaseException as err:
            try:
                self.status.write(self.record, "failed", f"{type(err).__name__}: {err}")
            except OSError:  # e.g. the full disk that stopped the run: its own error is the one to report
                pass
            raise
        finally:
            self.writer.close()
            self.sess.close()

    def _run(self):
        s, paths = self.s, self.paths
        found = checkpoint_dirs(paths["models"])
        self.record = None
        if found:
            self.record = self._restore(found)
            self.record["settings"] = settings_as_started(self.record["settings"])
            latest = self.record["mb_count_total"]
            self.record.setdefault("data_fingerprint", self.data_fingerprint)  # runs started before both were
            self.record.setdefault("threads", self.threads)                    # recorded (check_same_data says so)
            self.writer.add_session_log(tf.SessionLog(status=tf.SessionLog.START), global_step=latest)
            self.status.last_checkpoint_mb = latest
            self._note_activation_kernel()
            self.status.write(self.record, "running", f"resumed from minibatch {latest}")
            self.out(f"{s['spec_name']}/run {s['run']}: resuming from minibatch {latest}")
        else:
            self.record = new_recorder(s, self.data.mbs_per_epoch, self.data_fingerprint, self.threads)
            self._note_activation_kernel()
            self.status.write(self.record, "running", "started")
            log_hparams(self.writer, s)
            self.sess.run(self.init_op)
            self._validate(0)
            self._checkpoint(0)
        for path in glob.glob(os.path.join(glob.escape(paths["run_dir"]), "run_incomplete_mb_*.txt")):
            os.remove(path)
        if not self.record["training_completed"]:
            status = self._train()
            if status is not None:
                return status
        return self._test()

    def _note_activation_kernel(self):
        """Record what this session's activations run on ('fused' or 'plain: <why>'); a change from the
        earlier sessions of the run (another machine, DEEPNET_FUSED_ABU) is said and kept in the history."""
        record, kernel = self.record, self.model.activation_kernel
        history = record.setdefault("activation_kernel_history", [])
        if not history or history[-1][1] != kernel:
            if history:
                self.out(f"{self.s['spec_name']}/run {self.s['run']}: note: activations now run on '{kernel}', "
                         f"before minibatch {record['mb_count_total']} on '{history[-1][1]}' (equal to ~1e-5, "
                         "not bit for bit)")
            history.append([record["mb_count_total"], kernel])
        record["activation_kernel"] = kernel
        record["activation_kernel_build"] = net.kernel_build() if kernel == "fused" else ""

    def _restore(self, found):
        """The recorder of the newest checkpoint that can be read, its state restored; newer ones that cannot be
        read are reported (a line each) and removed: training from the one before rewrites them exactly. Once
        training is complete only the tested model is needed (the test restores it; when it is this checkpoint's
        it must be readable here)."""
        for mb, folder in sorted(found.items(), reverse=True):
            try:
                record = checkpoint_record(folder)
                if not record["training_completed"]:
                    self.checkpointer.restore_state(self.sess, folder)
                else:
                    self.sess.run(self.init_op)
                    if early_stopping_mb(record, self.val_schedule)[0] == mb:
                        self.checkpointer.restore_model(self.sess, folder)
            except CheckpointUnreadable as err:
                earlier = "falling back to the checkpoint before it" if mb > min(found) else "it is the oldest"
                self.out(f"{self.s['spec_name']}/run {self.s['run']}: {err}; {earlier}")
                continue
            for newer in (m for m in found if m > mb):
                remove_folder(found[newer])
            return record
        raise no_readable_checkpoint(self.paths, "each one's problem is printed above")

    def _train(self):
        s, model, record = self.s, self.model, self.record
        stop = self.stop
        inputs = model.inputs
        keep_probs = s["dropout_keep_probs"]
        fetch = [model.train_op, model.loss, model.cross_entropy, model.top1]
        session_start_mb = record["mb_count_total"]
        if stop.signal is not None:  # arrived while starting up: the latest checkpoint is current
            return self._interrupted(session_start_mb, stop.signal)
        interval_start = time.monotonic()
        for step in range(record["mb_count_total"] + 1, s["n_minibatches"] + 1):
            images, labels = self.data.minibatch(step, s["minibatch_size"], s)
            feed = {inputs.images: images, inputs.labels: labels, inputs.keep_probs: keep_probs,
                    inputs.training: True, inputs.step: step, inputs.lr: learning_rate(s, step, self.n_images)}
            summarise = step % SUMMARY_EVERY == 0
            results = self.sess.run(fetch + [model.summaries] if summarise else fetch, feed)
            loss, xentropy, top1 = (float(value) for value in results[1:4])
            if summarise:
                self.writer.add_summary(results[4], step)
            if not np.isfinite(loss):
                self._diverged(step, loss)
                return None
            record["train_mb_n_hist"].append(step)
            record["train_loss_hist"].append(loss)
            record["train_xentropy_hist"].append(xentropy)
            record["train_top1_hist"].append(top1)
            record["mb_count_total"] = step
            record["ep_count_total"] = 1 + (step - 1) // self.data.mbs_per_epoch
            if step in self.val_mbs:
                self.timing["mb"].append((time.monotonic() - interval_start) / max(step - session_start_mb, 1))
                self._validate(step)
                session_start_mb, interval_start = step, time.monotonic()
            self._save_weights(step)
            if step in self.ckpt_mbs:
                record["training_completed"] = step == s["n_minibatches"]
                self._checkpoint(step)
                if not record["training_completed"] and self._walltime_exceeded(step):
                    return self._leave_incomplete(step)
            if stop.signal is not None:
                return self._interrupted(step, stop.signal)
        return None

    def _validate(self, mb):
        s, record = self.s, self.record
        began = time.monotonic()
        result = evaluate(self.sess, self.model, self.data.val_images, self.data.val_labels, s)
        record["val_mb_n_hist"].append(mb)
        for key in ("loss", "xentropy", "top1", "top5", "apc"):
            record[f"val_{key}_hist"].append(result[key])
        record["val_preact_stats_hist"].append(result["preact"])
        record["val_af_weights_hist"].append(net.read_af_weights(self.sess, self.model.endpoints))
        self.writer.add_summary(tf.Summary(value=[
            tf.Summary.Value(tag=f"validation/{key}", simple_value=result[key]) for key in ("loss", "top1", "top5")
        ]), mb)
        self.timing["val"].append(time.monotonic() - began)
        self.status.write(record, "running", "training")
        self.out(self._status_line(mb))

    def _status_line(self, mb):
        s, record = self.s, self.record
        n = s["n_minibatches"]
        train = record["train_top1_hist"][-s["val_every"]:]
        val = record["val_top1_hist"]
        per_mb = np.mean(self.timing["mb"][-5:]) if self.timing["mb"] else float("nan")
        per_val = np.mean(self.timing["val"][-5:])
        left = (n - mb) * (per_mb if np.isfinite(per_mb) else 0) + \
            len([m for m in self.val_mbs if m > mb]) * per_val
        elapsed = time.monotonic() - self.started
        walltime = _clock(s["walltime"] * 60 - elapsed) if s["walltime"] else "-"
        rss = psutil.Process().memory_info().rss / 2 ** 30
        train_text = f"{train[-1]:.3f} (mean {np.mean(train):.3f})" if train else "-"
        return (f"{s['spec_name']}/run {s['run']} | mb {mb}/{n} | lr {learning_rate(s, max(mb, 1), self.n_images):.2e}"
                f" | train {train_text} | val {val[-1]:.3f} (mean {np.mean(val[-5:]):.3f})"
                f" | {per_mb * 1000:.0f} ms/mb, val {per_val:.1f} s | total {_clock(elapsed)}, left {_clock(left)}"
                f" | walltime left {walltime} | mem {rss:.2f} GB")

    def _save_weights(self, mb):
        if mb in self.af_mbs:
            save_af_weights(self.sess, self.s, mb)
        if mb in self.all_mbs:
            save_all_weights(self.sess, self.s, mb)

    def _checkpoint(self, mb, scheduled=True):
        record = self.record
        if scheduled:
            record["checkpoints"].append(mb)
        self.checkpointer.save(self.sess, record, mb, with_model=scheduled)
        keep = checkpoints_to_keep(record, self.val_schedule) if record["settings"]["create_val_set"] \
            else set(record["checkpoints"][-1:])
        self.checkpointer.prune(keep)
        save_pickle(self.paths["record"], record)
        self.writer.flush()
        write_run_info(self.s, record, "training" if not record["training_completed"] else "testing")
        self.status.last_checkpoint_mb = mb
        self.status.write(record, "running", "training" if not record["training_completed"] else "testing")
        if self.s["create_lc_on_the_fly"]:
            plot_learning_curves(record, self.paths["learning_curves"])

    def _walltime_exceeded(self, mb):
        """Whether the next checkpoint would not fit in -walltime (never with -create_checkpoints False,
        as in the original)."""
        if not self.s["walltime"] or not self.s["create_checkpoints"]:
            return False
        upcoming = [m for m in self.ckpt_mbs if m > mb]
        per_mb = np.mean(self.timing["mb"]) if self.timing["mb"] else 0.0
        n_val = len([m for m in self.val_mbs if mb < m <= min(upcoming)])
        per_val = np.mean(self.timing["val"]) if self.timing["val"] else 0.0
        needed = (min(upcoming) - mb) * per_mb + n_val * per_val + 60
        return time.monotonic() - self.started + needed > self.s["walltime"] * 60

    def _leave_incomplete(self, mb):
        path = os.path.join(self.paths["run_dir"], f"run_incomplete_mb_{mb}.txt")
        save_text(path, f"walltime of {self.s['walltime']} min reached at minibatch {mb}; run the same "
                        "command again to resume from the latest checkpoint\n")
        self.status.write(self.record, "incomplete", "walltime reached")
        self.out(f"{self.s['spec_name']}/run {self.s['run']}: stopping at minibatch {mb} before the walltime "
                 "runs out; run the same command again to resume")
        return 0

    def _interrupted(self, mb, signum):
        if mb not in self.ckpt_mbs:
            self._checkpoint(mb, scheduled=False)
        name = signal.Signals(signum).name
        self.status.write(self.record, "incomplete", name)
        self.out(f"{self.s['spec_name']}/run {self.s['run']}: {name} received; checkpoint written at minibatch "
                 f"{mb}; run the same command again to resume")
        return 128 + signum

    def _diverged(self, mb, loss):
        """The loss of minibatch mb is not finite: training stops, and every validation from mb on counts as
        0, what the original's non-finite model scored there, so early stopping picks among the checkpoints
        before mb and the run is tested from there. A restart before the test ends retrains to mb (exactly)."""
        record = self.record
        record.update(diverged=True, diverged_at_mb=mb)
        n_classes = N_CLASSES[self.s["task"]]
        for val_mb in self.val_schedule[len(record["val_mb_n_hist"]):]:
            record["val_mb_n_hist"].append(val_mb)
            for key, value in (("loss", np.nan), ("xentropy", np.nan), ("top1", 0.0), ("top5", 0.0),
                               ("apc", np.zeros(n_classes)), ("preact_stats", {}), ("af_weights", {})):
                record[f"val_{key}_hist"].append(value)
        self.status.write(record, "running", f"diverged at minibatch {mb} (loss {loss}); testing the best "
                                             "checkpoint before it")
        self.out(f"{self.s['spec_name']}/run {self.s['run']}: training diverged at minibatch {mb} (loss {loss}); "
                 "stopped, later validations count as 0, testing the best checkpoint before it")

    def _test(self):
        s, record, paths = self.s, self.record, self.paths
        best, smoothed = early_stopping_mb(record, self.val_schedule)
        folder = checkpoint_dirs(paths["models"]).get(best, os.path.join(paths["models"], f"ckpt_mb_{best}"))
        try:
            self.checkpointer.restore_model(self.sess, folder)
        except CheckpointUnreadable as err:
            raise RunError(f"{err}: the model that early stopping picked cannot be tested; nothing was deleted. To "
                           f"train the run again from the start, move {paths['run_dir']} away") from None
        result = evaluate(self.sess, self.model, self.data.test_images, self.data.test_labels, s)
        record.update(early_stopping_mb=best, val_top1_smoothed=smoothed, test_mb_n_hist=[best],
                      test_loss=result["loss"], test_xentropy=result["xentropy"], test_top1=result["top1"],
                      test_top5=result["top5"], test_apc=result["apc"],
                      test_af_weights=net.read_af_weights(self.sess, self.model.endpoints), test_completed=True)
        if s["save_af_weights_at_test_mb"]:
            save_af_weights(self.sess, s, best)
        if s["save_all_weights_at_test_mb"]:
            save_all_weights(self.sess, s, best)
        plot_early_stopping(record, smoothed, paths["early_stopping"])
        if s["create_lc_on_the_fly"]:
            plot_learning_curves(record, paths["learning_curves"])
        log_final_metrics(self.writer, record)  # before the recorder: a kill in between repeats, never loses it
        save_pickle(paths["record"], record)
        write_run_info(s, record, "complete" + diverged_note(record))
        finish_cleanup(paths, record)
        self.status.write(record, "complete", "complete" + diverged_note(record))
        self.out(test_report(s, best, result, diverged_note(record)))
        return 0


def diverged_note(record):
    """'' or '; diverged at mb N' for a run whose training diverged."""
    return f"; diverged at mb {record['diverged_at_mb']}" if record.get("diverged") else ""


def test_report(s, mb, result, note=""):
    """The test's result line (note appended); for cifar10 also the accuracy per class, as the original printed it."""
    line = (f"{s['spec_name']}/run {s['run']}: test of the model of minibatch {mb} on {result['n']} test images: "
            f"loss {result['loss']:.4f}, top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}{note}")
    if s["task"] == "cifar10":
        line += "\n  accuracy per class: " + " | ".join(f"{i}: {acc:.3f}" for i, acc in enumerate(result["apc"], 1))
    return line


class RunStatus:
    """The run's small status.json, beside the recorder, for `deepnet_supervisor.py --status`."""

    def __init__(self, path, s):
        self.path, self.s, self.started = path, s, time.monotonic()
        self.previous = load_json_object(path) or {}
        self.seconds_before = float(self.previous.get("train_seconds") or 0.0)
        self.last_checkpoint_mb = self.previous.get("last_checkpoint_mb")

    def write(self, record, state, message=""):
        record = record or {}
        save_json(self.path, {
            "state": state, "pid": os.getpid(), "host": os.uname().nodename,
            "mb": record.get("mb_count_total", 0), "n_minibatches": self.s["n_minibatches"],
            "val_top1": (record.get("val_top1_hist") or [None])[-1], "test_top1": record.get("test_top1"),
            "last_checkpoint_mb": self.last_checkpoint_mb, "diverged_at_mb": record.get("diverged_at_mb"),
            "activation_kernel": record.get("activation_kernel"),
            "train_seconds": self.seconds_before + time.monotonic() - self.started,
            "updated": time.time(), "message": message, "record_bytes": _file_size(run_paths(self.s)["record"])})


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def run_test(s, out=print):
    """-mode test: evaluate the kept model (or the newest checkpoint) of spec/run on the test set, with the
    run's threads; UserError if the test set is not the one the run started with."""
    paths = run_paths(s)
    found = checkpoint_dirs(paths["models"])
    with_model = {mb: f for mb, f in found.items() if os.path.isfile(os.path.join(f, "model.index"))}
    if not with_model:
        raise UserError(f"{paths['models']}: no saved model for {s['spec_name']} run {s['run']}")
    record = read_record(paths["record"])[0] or newest_readable_record(paths) or {}
    mb = record["early_stopping_mb"] if record.get("early_stopping_mb") in with_model else max(with_model)
    test_path = data_files(s)[1]
    test_images, test_labels = load_dataset(test_path, N_CLASSES[s["task"]])
    if record:
        check_same_data(s, record, {"test": dataset_fingerprint(test_path, test_images, test_labels,
                                                                s["path_relative"])}, out)
    graph = tf.Graph()
    with graph.as_default():
        model = net.build_model(dict(s, n_classes=N_CLASSES[s["task"]]))
        saver = tf.train.Saver(model.model_variables)
    with tf.Session(graph=graph, config=session_config(record.get("threads") or current_threads())) as sess:
        try:
            restore(saver, sess, with_model[mb], "model")
        except CheckpointUnreadable as err:
            raise RunError(str(err)) from None
        result = evaluate(sess, model, test_images, test_labels, s)
    out(test_report(s, mb, result))
    return 0
