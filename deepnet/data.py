"""A run's data: loading and checking the preprocessed files (deepnet/datasets.py says where they are), the
validation split, each epoch's order, minibatches, and the fingerprints that tie a run to its data. No TensorFlow.
"""
import hashlib
import os

import numpy as np

from deepnet import schedule
from deepnet.datasets import sidecar_path
from deepnet.names import shown
from deepnet_util import UserError, load_json_object, load_pickle


def build_of(path):
    """The preprocessing build a data file comes from, as its sidecar names it (None without a sidecar, or with one
    written before builds were recorded)."""
    return _build_named(load_json_object(sidecar_path(path)) or {})


def _build_named(sidecar):
    build = sidecar.get("build")
    return None if build is None else str(build)


def check_one_build(train_path, test_path):
    """The build a training and a test file both come from (None when neither sidecar names one); UserError naming
    both files when their sidecars name different builds. Files not there are left to load_dataset to report."""
    if not (os.path.isfile(train_path) and os.path.isfile(test_path)):
        return None
    train, test = build_of(train_path), build_of(test_path)
    if train != test:
        named = [shown(build) if build else "no build" for build in (train, test)]
        raise UserError(f"{train_path} and {test_path}: not from one preprocessing build (their sidecars name "
                        f"{named[0]} and {named[1]}); preprocess this variant again with "
                        "deepnet_task_cifar_preprocessing.py --force")
    return train


def load_pair(train_path, test_path, n_classes, root):
    """(training images and labels, test images and labels, their fingerprints {'train', 'test'}) of one
    preprocessing build (load_dataset, dataset_fingerprint); UserError naming both files when they are not from
    one build, or were switched to another build while being read."""
    build = check_one_build(train_path, test_path)
    train, test = load_dataset(train_path, n_classes), load_dataset(test_path, n_classes)
    fingerprint = {"train": dataset_fingerprint(train_path, *train, root),
                   "test": dataset_fingerprint(test_path, *test, root)}
    if fingerprint["train"]["build"] != build or fingerprint["test"]["build"] != build:
        raise UserError(f"{train_path} and {test_path}: replaced by another preprocessing build while being read; "
                        "run the command again")
    return train, test, fingerprint


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


def make_split(n_images, settings):
    """(train indices, validation indices): a permutation keyed on the seed, then cut."""
    order = np.random.default_rng([settings["seed"], 0]).permutation(n_images)
    n_val = validation_size(n_images, settings["val_set_fraction"], settings["minibatch_size"]) \
        if settings["create_val_set"] else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(settings, epoch, n_train):
    """The shuffled order of training images in one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([settings["seed"], 1, epoch]).permutation(n_train)


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
        self._epoch_order = None

    def minibatch(self, step, batch_size, settings):
        """Images and labels of training step `step` (1-based); reshuffled every epoch."""
        epoch, position = divmod(step - 1, self.mbs_per_epoch)
        cached = self._epoch_order  # (epoch, training rows in its order), replaced as a whole: thread-safe
        if cached is None or cached[0] != epoch:
            cached = self._epoch_order = (epoch, self.train_idx[epoch_order(settings, epoch, len(self.train_idx))])
        idx = cached[1][position * batch_size:(position + 1) * batch_size]
        return self.images[idx], self.labels[idx]


def check_data_fits(settings, n_train_images):
    """UserError when the split leaves no full training minibatch."""
    n_val = validation_size(n_train_images, settings["val_set_fraction"], settings["minibatch_size"]) \
        if settings["create_val_set"] else 0
    too_few = n_train_images - n_val < settings["minibatch_size"]
    if too_few or schedule.nominal_mbs_per_epoch(settings, n_train_images) < 1:
        left = max(n_train_images - n_val, 0)
        raise UserError(f"-minibatch_size {settings['minibatch_size']}: larger than the {left} training images left "
                        f"of {n_train_images} after a validation split of {n_val} (at least one minibatch)")


def _sha256(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def dataset_fingerprint(path, images, labels, root):
    """What identifies a data file: its path under -path_relative, its image count, a sha256 of the arrays as
    training reads them, and its sidecar's preprocessing parameters and build (None without a sidecar; for messages
    and the analysis's check that a run's training and test files come from one build)."""
    sidecar = load_json_object(sidecar_path(path)) or {}
    return {"file": os.path.relpath(path, root), "images": len(labels), "sha256": _sha256(images, labels),
            "parameters": sidecar.get("parameters"), "build": _build_named(sidecar)}


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


def check_same_data(settings, record, fingerprint, out=print):
    """UserError naming the data file when it differs from the one the run started with (in `fingerprint`:
    'train' and/or 'test'). A run started before fingerprints were recorded is noted and not checked."""
    before = record.get("data_fingerprint")
    tag = f"{settings['spec_name']}/run {settings['run']}"
    if not before:
        out(f"{tag}: started before data fingerprints were recorded, so its data cannot be checked")
        return
    for key, now in fingerprint.items():
        change = data_change(before[key], now) if key in before else ""
        if change:
            raise UserError(f"{os.path.join(settings['path_relative'], now['file'])}: not the data {tag} started with "
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


def run_split(settings, path, n_images, recorded):
    """(the run's split, whether split.pkl must be written): the file's when it holds the split the run started
    with (`recorded`, else the seed's), UserError when it holds another; the seed's when it is missing or
    unreadable."""
    from_seed = make_split(n_images, settings)
    expected = recorded or split_fingerprint(from_seed)
    saved = read_split(path)
    if saved is not None:
        change = split_change(expected, split_fingerprint(saved))
        if change:
            raise UserError(f"{path}: not the split {settings['spec_name']}/run {settings['run']} started with "
                            f"({change}); delete it to have it rebuilt from -seed {settings['seed']}")
        return saved, False
    change = split_change(expected, split_fingerprint(from_seed))
    if change:
        raise UserError(f"{path}: missing or unreadable, and -seed {settings['seed']} gives another split than the "
                        f"one the run started with ({change})")
    return from_seed, True
