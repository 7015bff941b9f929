"""Turn the official CIFAR-10/100 "python version" batches into the pickles the training code reads.

    python deepnet_task_cifar_preprocessing.py                    # every variant of every task with raw data
    python deepnet_task_cifar_preprocessing.py --synthetic        # small learnable stand-in data, no download
    python deepnet_task_cifar_preprocessing.py --source ~/cifar-10-python.tar.gz
    python deepnet_task_cifar_preprocessing.py --download --task cifar100
    python deepnet_task_cifar_preprocessing.py --variant gcn_zca --zca-epsilon 0.1   # damp the weak directions

Layout under ROOT (--root, default ./):
    1_data_<task>/train_batches/    raw training batches: data_batch_1..5 (cifar10) or train (cifar100)
    1_data_<task>/test_batches/     raw test batches: test_batch (cifar10) or test (cifar100)
    1_data_<task>/train_set<sfx>/<task>_trainset.pkl   + <task>_trainset.json sidecar
    1_data_<task>/test_set<sfx>/<task>_testset.pkl     + <task>_testset.json sidecar
    1_data_<task>/train_set_gcn_zca/<task>_gcn_zca_params.npz   fitted gcn_zca parameters
with <sfx> '' for variant none, '_ztrans' or '_gcn_zca'. Each pickle holds
{'images': float32 (n, 32, 32, 3), 'labels': int64 (n,)} in raw order (batches 1..5, images in file order).
A variant changes as a whole: each build writes all of its files into 1_data_<task>/.builds/<variant>-<id>/ (the
sidecars name the build), then points the symlink .builds/<variant> at it in one rename; the paths above are
symlinks through it. A kill at any moment leaves the old set or the new one; the next build removes what is left.
Builds of one task wait for each other (a lock). Tests can stop or kill the script after each step on disk
(DEEPNET_PREPROCESSING_STEP_HOOK, see deepnet/builds.py step).

Variants. x is one image as its D = 32*32*3 = 3072 values in HWC order, n the number of training images.
    none     x as float32, values 0..255.
    ztrans   (x - mean(x)) / max(std(x), 1/sqrt(D)), per image (as tf.image.per_image_standardization).
    gcn_zca  1. global contrast normalisation per image, as pylearn2's global_contrast_normalize with scale=55
                (the maxout paper's CIFAR-10 setting):
                    g = (x - mean(x)) / max(||x - mean(x)||_2 / 55, 1e-8)
             2. per-pixel std scaling: p_j = g_j / max(sigma_j, 1e-8), sigma_j the std (ddof 0) of g_j over the
                training images.
             3. ZCA whitening: mu = mean of p over the training images, C = (1/n) sum (p - mu)(p - mu)^T,
                C = U diag(s) U^T (eigendecomposition, float64, s ascending), W = U diag(w) U^T with
                w_k = 1/sqrt(s_k + E), or w_k = 0 for the null directions (below); z = (p - mu) W.
                E is --zca-epsilon, default 0 (the original's; pylearn2's ZCA filter_bias is 0.1: the features
                have unit variance after step 2, so the mean eigenvalue is 1 and 0.1 would be a tenth of it).
             4. global standardisation: out = (z - m) / d, with m and d the mean and std of all values z of the
                training set. The training z have zero mean in every feature, so m = 0, and total variance
                trace(W C W) = sum_k w_k^2 s_k = sum over the kept k of s_k / (s_k + E) (a null direction adds
                nothing: weight 0), so d = sqrt((1/D) sum_kept s_k / (s_k + E)); with E = 0 that is
                d = sqrt((D - number of null directions) / D). Both are exact without another pass over the data.

Null directions. GCN makes every g sum to 0, so every p, training or test, satisfies sum_j sigma_j p_j = 0: the
data have no extent along v0 = sigma / ||sigma|| and one eigenvalue of C is zero up to rounding. Whitening it
(1/sqrt(~0), as the original's E = 0 does) turns rounding noise into a feature as large as the real ones. So:
  - v0 is removed from C exactly before the eigendecomposition (C <- P C P, P = I - v0 v0^T), which changes C only
    by its rounding error along v0 (of order 1e-9 s_max, from the float32 products that build C) and makes that
    eigenvalue zero to float64 precision;
  - an eigenvalue is null if s_k <= D * eps64 * s_max (eps64 = 2.2e-16, the float64 machine epsilon: 6.8e-13 s_max
    for D = 3072), and the D - min(n - 1, D - 1) smallest are null whatever their computed value (n centred images
    span at most n - 1 dimensions, none of them v0; this only matters when n <= D);
  - null directions get weight 0 (W is the pseudo-inverse square root there): out has no component along them.
For CIFAR (n = 50000 > D) exactly one direction, v0, is null. The params file and the sidecars record zca_eps
and zca_null_directions; outputs made with another --zca-epsilon are rebuilt (and reported), not reused.

Relation to the original research code (GCN(goodfellow=True), ZCA(epsilon=0.0), unify_dataset):
  - its GCN divides by the per-image std, ||x - mean(x)|| / sqrt(D), not ||x - mean(x)|| / 55: a factor sqrt(D)/55,
    the same for every image, which step 2 divides out. For 8-bit images neither floor binds (a non-constant image
    has ||x - mean(x)|| >= 0.99) and a constant image is 0 in both, so the p of step 2 are the same.
  - its ZCA divides the PCA scores by the singular values sqrt(n s_k) and multiplies by sqrt(n)/2, i.e. it is the
    E = 0 whitening times 1/2, a factor step 4 removes; but it keeps v0, whose singular value (zero up to
    rounding) whitens rounding noise to about unit variance, which also shifts its global mean m. With
    the default --zca-epsilon 0 the output here equals the original's, fitted on the same images, once that noise
    component is removed from its ZCA output (tests/test_preprocessing.py checks this).
  - its PCA used svd_solver='randomized', an approximation; the eigendecomposition here is exact.
  - E = 0, the default, is the original's (its numbers are the paper's). E = 0.1 (pylearn2's and the maxout
    paper's, whose GCN this variant reproduces) damps every direction whose variance is well below a tenth of
    the average: E = 0 scales the weakest directions (the finest pixel-scale detail and noise, eigenvalues far
    below 1) up to unit variance like the strongest image structure.

Train/test separation: every statistic above (sigma, mu, W, m, d) is fitted on the training images only and applied
unchanged to the test images. The original research code fitted its ZCA on train and test together, which leaks
test-set statistics into training; results are therefore not bit-comparable with it.
"""
import argparse
import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from deepnet import builds
from deepnet.datasets import (N_CLASSES, TASKS, VARIANTS, output_paths, params_path, sidecar_path, task_dir,
                              variant_files)
from deepnet_util import (UserError, atomic_open, atomic_write_bytes, fsync_folder, load_json_object, load_pickle,
                          progress, run_cli, save_json, save_pickle_streamed)

LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
RAW_FILES = {  # (training batch files, test batch files), in the order their images are concatenated
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
ARCHIVES = {  # official archive name, its top-level folder, its md5
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "eb9058c3a382ffc7106e4002c42a8d85"),
}
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/"
DOWNLOAD_TIMEOUT_S = 30
IMAGE_SHAPE = (32, 32, 3)
RAW_ROW_LENGTH = 3072  # 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32
MAX_ARCHIVE_MEMBER_BYTES = 1 << 30

GCN_SCALE = 55.0
GCN_MIN_DIVISOR = 1e-8
PIXEL_STD_FLOOR = 1e-8
ZCA_EPS = 0.0  # default of --zca-epsilon: the original's
NULL_RTOL_PER_DIMENSION = float(np.finfo(np.float64).eps)  # null: s_k <= D * this * s_max
CHUNK_IMAGES = 5000  # images per chunk in the array functions: bounds the float temporaries


# ---------------------------------------------------------------- paths

def raw_dirs(root, task):
    """Default raw locations: (train_batches folder, test_batches folder)."""
    return os.path.join(task_dir(root, task), "train_batches"), os.path.join(task_dir(root, task), "test_batches")


def raw_paths(root, task):
    """Default raw batch files: ([training files], [test files])."""
    train_dir, test_dir = raw_dirs(root, task)
    train_names, test_names = RAW_FILES[task]
    return [os.path.join(train_dir, n) for n in train_names], [os.path.join(test_dir, n) for n in test_names]


def raw_present(root, task):
    return any(os.path.isdir(folder) for folder in raw_dirs(root, task))


# ---------------------------------------------------------------- reading and validating raw batches

def _field(batch, name):
    """batch[b'name'] (Python-2 pickles loaded with encoding='bytes') or batch['name']; None if absent."""
    return batch.get(name.encode(), batch.get(name))


def _batch_images(data, path):
    """Validate a raw b'data' array (n, 3072) and return it as uint8 images (n, 32, 32, 3)."""
    if not isinstance(data, np.ndarray):
        raise UserError(f"{path}: b'data' must be a numpy array, got {type(data).__name__}")
    if data.ndim != 2 or data.shape[1] != RAW_ROW_LENGTH:
        raise UserError(f"{path}: b'data' has shape {data.shape}, expected (n, {RAW_ROW_LENGTH})")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iuf":
            raise UserError(f"{path}: b'data' has dtype {data.dtype}, expected uint8")
        if not np.isfinite(data).all():
            raise UserError(f"{path}: b'data' has non-finite values (NaN or inf)")
        if data.size and (data.min() < 0 or data.max() > 255 or (data != np.round(data)).any()):
            raise UserError(f"{path}: b'data' has values that are not whole numbers in 0..255")
        data = data.astype(np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _batch_labels(labels, count, path, task):
    """Validate a raw label list against the image count and class range; return int64 labels."""
    key, classes = LABEL_KEY[task], N_CLASSES[task]
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        raise UserError(f"{path}: b'{key}' is not a flat list of integers") from None
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or len(labels) != count:
        raise UserError(f"{path}: b'{key}' holds {labels.size} labels for {count} images")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{path}: b'{key}' must be integers, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise UserError(f"{path}: label {bad[0]} out of range 0..{classes - 1} ({task} has {classes} classes)")
    return labels.astype(np.int64)


def _read_batch(path, task):
    """One official batch file -> (uint8 images (n, 32, 32, 3), int64 labels, batch label text)."""
    batch = load_pickle(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise UserError(f"{path}: expected a dict of a CIFAR python batch, got {type(batch).__name__}")
    for name in ("data", LABEL_KEY[task]):
        if _field(batch, name) is None:
            raise UserError(f"{path}: missing key b'{name}' (is this a {task} batch?)")
    images = _batch_images(_field(batch, "data"), path)
    labels = _batch_labels(_field(batch, LABEL_KEY[task]), len(images), path, task)
    batch_label = _field(batch, "batch_label")
    text = batch_label.decode("latin1") if isinstance(batch_label, bytes) else str(batch_label or "")
    return images, labels, text


def _read_split(paths, task):
    """Concatenate validated batches in order -> (images, labels, batch label texts)."""
    images, labels, texts = zip(*(_read_batch(path, task) for path in paths))
    if sum(len(batch) for batch in images) == 0:
        raise UserError(f"{os.path.dirname(paths[0])}: the batches {[os.path.basename(p) for p in paths]} "
                        "hold no images")
    return np.concatenate(images), np.concatenate(labels), list(texts)


def _read_raw_files(train_paths, test_paths, task):
    """Read and validate every raw file of a task; returns a dict of arrays and batch label texts."""
    train_images, train_labels, train_texts = _read_split(train_paths, task)
    test_images, test_labels, test_texts = _read_split(test_paths, task)
    return {"train_images": train_images, "train_labels": train_labels, "test_images": test_images,
            "test_labels": test_labels, "batch_labels": train_texts + test_texts}


def load_raw(root, task):
    """Raw data from ROOT's default location: (train_images uint8 (n,32,32,3), train_labels int64, test_images,
    test_labels)."""
    _check_task(task)
    raw = _read_raw_files(*raw_paths(root, task), task)
    return raw["train_images"], raw["train_labels"], raw["test_images"], raw["test_labels"]


def file_md5(path):
    digest = hashlib.md5()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def raw_md5s(root, task):
    """{'train_batches/data_batch_1': md5, ...} for every raw file; UserError naming the first missing one."""
    train_paths, test_paths = raw_paths(root, task)
    for path in train_paths + test_paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: missing (expected the official {task} python batches "
                            f"{RAW_FILES[task][0] + RAW_FILES[task][1]})")
    return {os.path.relpath(p, task_dir(root, task)): file_md5(p) for p in train_paths + test_paths}


# ---------------------------------------------------------------- the variants (pure array functions)

def _flat(images):
    images = np.asarray(images)
    return images.reshape(len(images), -1)


def _chunks(count, label=None, size=CHUNK_IMAGES):
    """(start, stop) bounds covering count images; with a label, shown as a progress bar on stderr."""
    bounds = [(start, min(start + size, count)) for start in range(0, count, size)]
    return progress(bounds, len(bounds), label) if label else bounds


def as_float(images):
    """Variant none: the images as float32, values unchanged."""
    return np.asarray(images, dtype=np.float32)


def ztrans(images, progress_label=None):
    """Per-image standardisation: (x - mean(x)) / max(std(x), 1/sqrt(values per image)); float32, same shape."""
    flat = _flat(images)
    out = np.empty(flat.shape, np.float32)
    std_floor = 1.0 / np.sqrt(flat.shape[1])
    for start, stop in _chunks(len(flat), progress_label):
        x = out[start:stop]
        x[...] = flat[start:stop]
        np.subtract(x, x.mean(axis=1, dtype=np.float64, keepdims=True), out=x, casting="same_kind")  # in float64
        std = np.sqrt(np.square(x).mean(axis=1, dtype=np.float64, keepdims=True))
        x /= np.maximum(std, std_floor).astype(np.float32)
    return out.reshape(np.shape(images))


def _gcn(flat, scale, min_divisor):
    """Global contrast normalisation of each row: subtract its mean, rescale its L2 norm to `scale` (float32)."""
    x = flat.astype(np.float32)
    np.subtract(x, x.mean(axis=1, dtype=np.float64, keepdims=True), out=x, casting="same_kind")  # in float64
    norm = np.sqrt(np.square(x).sum(axis=1, dtype=np.float64, keepdims=True))
    x /= np.maximum(norm / scale, min_divisor).astype(np.float32)
    return x


def _gcn_mean_and_covariance(flat, scale, label):
    """Mean (D,) and covariance (D, D), float64, of the GCN'd rows: two chunked passes, float32 products."""
    count, dim = flat.shape
    total = np.zeros(dim)
    for start, stop in _chunks(count, label and f"{label}: mean"):
        total += _gcn(flat[start:stop], scale, GCN_MIN_DIVISOR).sum(axis=0, dtype=np.float64)
    mean = total / count
    covariance = np.zeros((dim, dim))
    for start, stop in _chunks(count, label and f"{label}: covariance"):
        centred = _gcn(flat[start:stop], scale, GCN_MIN_DIVISOR)
        centred -= mean.astype(np.float32)
        covariance += centred.T @ centred
    return mean, covariance / count


def _remove_direction(covariance, direction):
    """P C P with P = I - v v^T for a unit vector v, in place, as the rank-2 update C - v u^T - u v^T with
    u = C v - (v.C v / 2) v."""
    product = covariance @ direction
    update = product - 0.5 * (direction @ product) * direction
    covariance -= np.outer(direction, update)
    covariance -= np.outer(update, direction)
    return covariance


def _null_direction_count(eigenvalues, image_count):
    """How many of the ascending eigenvalues are null: those <= D * eps64 * s_max, and at least the
    D - min(n - 1, D - 1) smallest (the rank bound; module docstring, "Null directions")."""
    dim = len(eigenvalues)
    tolerance = NULL_RTOL_PER_DIMENSION * dim * max(eigenvalues[-1], 0.0)
    return max(int(np.count_nonzero(eigenvalues <= tolerance)), dim - min(image_count - 1, dim - 1))


def fit_gcn_zca(train_images, zca_eps=ZCA_EPS, gcn_scale=GCN_SCALE, progress_label=None):
    """Fit the gcn_zca statistics (module docstring, steps 1-4) on training images only.

    Returns the params apply_gcn_zca takes: pixel_mean and pixel_std (mean and std of each GCN'd pixel, so that
    mu = pixel_mean / pixel_std), zca_matrix W, eigenvalues s (ascending), zca_null_directions (how many got
    weight 0), global_mean m, global_std d and the constants.
    """
    flat = _flat(train_images)
    pixel_mean, covariance_g = _gcn_mean_and_covariance(flat, gcn_scale, progress_label)
    pixel_std = np.maximum(np.sqrt(np.diag(covariance_g)), PIXEL_STD_FLOOR)
    covariance_p = covariance_g / np.outer(pixel_std, pixel_std)  # covariance of p = g / pixel_std
    del covariance_g
    _remove_direction(covariance_p, pixel_std / np.linalg.norm(pixel_std))  # GCN's null direction, exactly
    if progress_label:
        print(f"{progress_label}: eigendecomposition of the {len(pixel_std)}x{len(pixel_std)} covariance",
              file=sys.stderr)
    with threadpool_limits(limits=1, user_api="blas"):  # threaded LAPACK eigh gains little on 2 idle cores but
        eigenvalues, eigenvectors = np.linalg.eigh(covariance_p)  # was 4x slower when other processes are busy
    null_count = _null_direction_count(eigenvalues, len(flat))
    kept = eigenvalues[null_count:]
    weights = np.zeros_like(eigenvalues)
    weights[null_count:] = 1.0 / np.sqrt(kept + zca_eps)
    zca_matrix = (eigenvectors * weights) @ eigenvectors.T
    global_std = np.sqrt(np.sum(kept / (kept + zca_eps)) / len(eigenvalues))
    return {"gcn_scale": float(gcn_scale), "gcn_min_divisor": GCN_MIN_DIVISOR, "pixel_std_floor": PIXEL_STD_FLOOR,
            "zca_eps": float(zca_eps), "zca_null_rtol": NULL_RTOL_PER_DIMENSION * len(eigenvalues),
            "zca_null_directions": null_count, "pixel_mean": pixel_mean, "pixel_std": pixel_std,
            "zca_matrix": zca_matrix, "eigenvalues": eigenvalues, "global_mean": 0.0,
            "global_std": float(max(global_std, PIXEL_STD_FLOOR))}


def apply_gcn_zca(images, params, progress_label=None):
    """Apply fitted gcn_zca params to images (n, 32, 32, 3): ((gcn(x)/sigma - mu) W - m) / d as float32."""
    flat = _flat(images)
    scale, min_divisor = float(params["gcn_scale"]), float(params["gcn_min_divisor"])
    global_std = float(params["global_std"])
    # (g / sigma - mu) W  ==  (g - pixel_mean) A * d   with   A = diag(1/sigma) W / d
    transform = (params["zca_matrix"] / params["pixel_std"][:, None] / global_std).astype(np.float32)
    pixel_mean = params["pixel_mean"].astype(np.float32)
    shift = np.float32(float(params["global_mean"]) / global_std)
    out = np.empty(flat.shape, np.float32)
    for start, stop in _chunks(len(flat), progress_label):
        centred = _gcn(flat[start:stop], scale, min_divisor)
        centred -= pixel_mean
        np.matmul(centred, transform, out=out[start:stop])
        out[start:stop] -= shift
    return out.reshape(np.shape(images))


# ---------------------------------------------------------------- writing the variants

def _output_state(root, task, variant, md5s, zca_eps):
    """(state, why): 'current', 'missing' (some file absent or unreadable) or 'stale' (made from other raw files,
    for gcn_zca with another --zca-epsilon, or a training and a test file of different builds), and why it is
    stale."""
    files = variant_files(root, task, variant)
    if not all(os.path.isfile(path) for path in files):
        return "missing", ""
    sidecars = [load_json_object(path) for path in files if path.endswith(".json")]
    if None in sidecars:
        return "missing", ""
    if len({repr(sidecar.get("build")) for sidecar in sidecars}) > 1:
        return "stale", "its training and test files come from different builds"
    for sidecar in sidecars:
        if sidecar.get("source_md5") != md5s:
            return "stale", "its outputs were made from other raw files"
        parameters = sidecar.get("parameters")
        made_with = parameters.get("zca_eps") if isinstance(parameters, dict) else None
        if variant == "gcn_zca" and made_with is None:
            return "stale", f"its outputs do not record their --zca-epsilon (this run uses {zca_eps})"
        if variant == "gcn_zca" and made_with != zca_eps:
            return "stale", f"its outputs were made with --zca-epsilon {made_with}, not {zca_eps}"
    return "current", ""


def _plan_task(root, task, variants, force, zca_eps=ZCA_EPS):
    """Decide which variants to (re)build, report the kept ones, and read+validate the raw data if needed."""
    md5s = raw_md5s(root, task)
    todo = []
    for variant in variants:
        state, why = ("missing", "") if force else _output_state(root, task, variant, md5s, zca_eps)
        if state == "current":
            print(f"kept {task} {variant}: {os.path.dirname(output_paths(root, task, variant)[0])} and its test set "
                  "exist (--force rebuilds)")
            continue
        if state == "stale":
            print(f"rebuilding {task} {variant}: {why}")
        todo.append(variant)
    raw = _read_raw_files(*raw_paths(root, task), task) if todo else None
    return {"root": root, "task": task, "variants": todo, "raw": raw, "md5s": md5s, "zca_eps": zca_eps,
            "force": force, "requested": variants}


def _save_split(path, images, labels):
    """Write one {'images', 'labels'} pickle atomically (streamed, protocol 5); returns the path."""
    save_pickle_streamed(path, {"images": images, "labels": labels})
    return path


def _sidecar(task, variant, split, count, md5s, batch_labels, parameters, build):
    return {"task": task, "variant": variant, "split": split, "images_shape": [count, *IMAGE_SHAPE],
            "images_dtype": "float32", "labels_shape": [count], "labels_dtype": "int64",
            "num_classes": N_CLASSES[task], "source_md5": md5s, "raw_batch_labels": batch_labels,
            "parameters": parameters, "build": build, "written_by": os.path.basename(__file__)}


def _variant_parameters(variant, params, root, task):
    """The JSON-friendly parameters of a variant for its sidecars."""
    if variant == "ztrans":
        return {"std_floor": 1.0 / np.sqrt(np.prod(IMAGE_SHAPE))}
    if variant == "gcn_zca":
        scalars = {k: v for k, v in params.items() if np.ndim(v) == 0}
        return {**scalars, "params_file": os.path.basename(params_path(root, task)),
                "fitted_on": "training images only"}
    return {}


def _transform(variant, images, params, label):
    if variant == "none":
        return as_float(images)
    if variant == "ztrans":
        return ztrans(images, progress_label=label)
    return apply_gcn_zca(images, params, progress_label=label)


def _build_variant(plan, variant):
    """Compute one variant and write all of its files (train pickle, test pickle, params, sidecars naming the
    build) into a new build folder; returns that folder."""
    root, task, raw = plan["root"], plan["task"], plan["raw"]
    label = f"{task} {variant}"
    params = (fit_gcn_zca(raw["train_images"], zca_eps=plan["zca_eps"], progress_label=f"{label} fit")
              if variant == "gcn_zca" else None)
    build = builds.new_build_folder(root, task, variant)
    train_pkl, test_pkl = (os.path.join(build, os.path.basename(path)) for path in output_paths(root, task, variant))
    _save_split(train_pkl, _transform(variant, raw["train_images"], params, f"{label} train"), raw["train_labels"])
    builds.step(f"wrote {train_pkl}")
    _save_split(test_pkl, _transform(variant, raw["test_images"], params, f"{label} test"), raw["test_labels"])
    builds.step(f"wrote {test_pkl}")
    if params is not None:
        with atomic_open(os.path.join(build, os.path.basename(params_path(root, task)))) as handle:
            np.savez(handle, **params)
        builds.step("wrote the gcn_zca parameters")
    parameters = _variant_parameters(variant, params, root, task)
    for path, split, labels in ((train_pkl, "train", raw["train_labels"]), (test_pkl, "test", raw["test_labels"])):
        save_json(sidecar_path(path), _sidecar(task, variant, split, len(labels), plan["md5s"],
                                               raw["batch_labels"], parameters, os.path.basename(build)))
        builds.step(f"wrote {sidecar_path(path)}")
    fsync_folder(build)
    return build


def _write_plan(plan):
    """Build every variant a plan lists under the task's lock, then remove old builds and what killed ones left;
    returns the written paths (the variants' documented paths)."""
    root, task = plan["root"], plan["task"]
    if not plan["variants"] and not any(builds.leftovers(root, task, variant) for variant in plan["requested"]):
        return []
    with builds.task_lock(root, task):
        written = [path for variant in plan["variants"] for path in _write_variant(plan, variant)]
        for variant in plan["requested"]:
            builds.remove_leftovers(root, task, variant)
    return written


def _write_variant(plan, variant):
    """Build one variant and switch to it, unless another process built it meanwhile; returns its documented paths
    (none when kept)."""
    root, task = plan["root"], plan["task"]
    if not plan["force"] and _output_state(root, task, variant, plan["md5s"], plan["zca_eps"])[0] == "current":
        print(f"kept {task} {variant}: built meanwhile by another process")
        return []
    start = time.perf_counter()
    builds.adopt_layout(root, task, variant)
    builds.switch(root, task, variant, _build_variant(plan, variant))
    train_pkl, test_pkl = output_paths(root, task, variant)
    print(f"wrote {task} {variant} in {time.perf_counter() - start:.1f} s: {train_pkl} "
          f"({len(plan['raw']['train_labels'])} images), {test_pkl} ({len(plan['raw']['test_labels'])} images)")
    return variant_files(root, task, variant)


def _variant_list(variants):
    variants = [variants] if isinstance(variants, str) else list(variants)
    if "all" in variants:
        return list(VARIANTS)
    for variant in variants:
        if variant not in VARIANTS:
            raise UserError(f"--variant {variant}: unknown (choose from {', '.join(VARIANTS)}, all)")
    return variants


def _check_task(task):
    if task not in TASKS:
        raise UserError(f"--task {task}: unknown (choose from {', '.join(TASKS)}, all)")


def preprocess_task(root, task, variants, force=False, zca_eps=ZCA_EPS):
    """Write the given variants ('all', a name or a list) of one task from its raw batches; returns written paths.

    Existing complete outputs made from the same raw files (and, for gcn_zca, with the same zca_eps) are kept
    unless force. All raw files are validated before anything is written.
    """
    _check_task(task)
    return _write_plan(_plan_task(root, task, _variant_list(variants), force, zca_eps))


# ---------------------------------------------------------------- synthetic raw data

def _synthetic_images(rng, templates, labels):
    """Class pattern, circularly shifted by up to 8 pixels, at a random contrast + random brightness shift
    + pixel noise, as uint8 (n, 32, 32, 3). Hard enough that a small convnet needs a few hundred
    minibatches (a nearest-centroid classifier gets about 70 %)."""
    images = np.empty((len(labels), *IMAGE_SHAPE), np.uint8)
    side = IMAGE_SHAPE[0]
    for start, stop in _chunks(len(labels)):
        count = stop - start
        rows = (np.arange(side) - rng.integers(-8, 9, (count, 1))) % side
        cols = (np.arange(side) - rng.integers(-8, 9, (count, 1))) % side
        shifted = templates[labels[start:stop, None, None], rows[:, :, None], cols[:, None, :]]
        contrast = rng.uniform(10, 40, (count, 1, 1, 1)).astype(np.float32)
        brightness = rng.uniform(-40, 40, (count, 1, 1, 1)).astype(np.float32)
        noise = 60 * rng.standard_normal((count, *IMAGE_SHAPE), dtype=np.float32)
        pixels = 128 + contrast * shifted + brightness + noise
        images[start:stop] = np.clip(np.rint(pixels), 0, 255)
    return images


def _official_batch(task, images, labels, batch_label, first_index):
    """A batch dict as in the official python version: bytes keys, channel-major uint8 rows, label lists."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), RAW_ROW_LENGTH))
    batch = {b"batch_label": batch_label.encode(), b"data": data,
             b"filenames": [f"synthetic_{first_index + i:06d}.png".encode() for i in range(len(images))]}
    if task == "cifar10":
        batch[b"labels"] = labels.tolist()
    else:
        batch[b"fine_labels"] = labels.tolist()
        batch[b"coarse_labels"] = (labels // 5).tolist()
    return batch


def write_synthetic_raw(root, task="cifar10", n_train=5000, n_test=1000, seed=0):
    """Write a learnable synthetic dataset as official-format raw batches (protocol-2 pickles) into ROOT's default
    location; returns the written paths.

    Each class has its own smooth colour pattern (a random 4x4 grid of colours blown up to 32x32); an image is its
    class pattern, circularly shifted by up to 8 pixels, at a random contrast, shifted in brightness, plus pixel
    noise. Labels are balanced and shuffled.
    CIFAR-10 training images are split over data_batch_1..5.
    """
    _check_task(task)
    if n_train < 1 or n_test < 1:
        raise UserError(f"synthetic data needs at least 1 training and 1 test image (got {n_train}, {n_test})")
    rng = np.random.default_rng(seed)
    classes = N_CLASSES[task]
    templates = rng.uniform(-1, 1, (classes, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2).astype(np.float32)
    written = []
    for split, count, paths in (("training", n_train, raw_paths(root, task)[0]),
                                ("testing", n_test, raw_paths(root, task)[1])):
        labels = rng.permutation(np.arange(count) % classes)
        images = _synthetic_images(rng, templates, labels)
        first = 0
        for number, (path, part) in enumerate(zip(paths, np.array_split(np.arange(count), len(paths))), 1):
            batch = _official_batch(task, images[part], labels[part],
                                    f"synthetic {split} batch {number} of {len(paths)}", first)
            atomic_write_bytes(path, pickle.dumps(batch, protocol=2))
            written.append(path)
            first += len(part)
    return written


# ---------------------------------------------------------------- --source and --download

def _single_task(found, requested, source):
    """The one task found in a --source (checked against an explicit --task)."""
    if len(found) != 1:
        raise UserError(f"--source {source}: no CIFAR python batches found (expected the extracted "
                        "cifar-10-batches-py or cifar-100-python folder, or its .tar.gz)")
    if requested and found[0] != requested:
        raise UserError(f"--source {source}: holds {found[0]} batches but --task is {requested}")
    return found[0]


def _extract_archive(archive, staging, requested):
    """Copy only the expected batch files out of a CIFAR tar archive into staging/<name>; returns the task.

    Members are looked up by their exact expected names and must be regular files; nothing is extracted by a
    name taken from the archive, so paths like '../x' or links cannot write outside staging.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {member.name: member for member in tar.getmembers()}
            tops = {name.split("/")[0] for name in members}
            task = _single_task([t for t in TASKS if ARCHIVES[t][1] in tops], requested, archive)
            for name in RAW_FILES[task][0] + RAW_FILES[task][1]:
                _copy_member(tar, members, f"{ARCHIVES[task][1]}/{name}", os.path.join(staging, name), archive)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(f"--source {archive}: not a readable CIFAR tar archive ({err})") from None
    return task


def _copy_member(tar, members, member_name, destination, archive):
    member = members.get(member_name)
    if member is None:
        raise UserError(f"--source {archive}: member {member_name} is missing")
    if not member.isfile() or member.size > MAX_ARCHIVE_MEMBER_BYTES:
        raise UserError(f"--source {archive}: member {member_name} is not a regular file of sane size")
    with tar.extractfile(member) as handle, open(destination, "wb") as out:
        shutil.copyfileobj(handle, out)


def install_source(root, source, requested=None):
    """Validate the raw batches in a folder or tar archive, then copy them into ROOT's default location.

    Returns the task they belong to.
    """
    if not os.path.exists(source):
        raise UserError(f"--source {source}: no such file or folder")
    with tempfile.TemporaryDirectory(prefix="cifar_source_") as staging:
        if os.path.isdir(source):
            names = set(os.listdir(source))
            found = [t for t in TASKS if names & set(RAW_FILES[t][0] + RAW_FILES[t][1])]
            folder, task = source, _single_task(found, requested, source)
        else:
            folder, task = staging, _extract_archive(source, staging, requested)
        train_names, test_names = RAW_FILES[task]
        _read_raw_files([os.path.join(folder, n) for n in train_names],
                        [os.path.join(folder, n) for n in test_names], task)
        train_paths, test_paths = raw_paths(root, task)
        for name, destination in zip(train_names + test_names, train_paths + test_paths):
            source_file = os.path.join(folder, name)
            if not (os.path.exists(destination) and os.path.samefile(source_file, destination)):
                with open(source_file, "rb") as handle, atomic_open(destination) as out:
                    shutil.copyfileobj(handle, out)
    print(f"installed {task} raw batches from {source} into {task_dir(root, task)}")
    return task


def _fetch(url, label):
    """GET url into memory with a progress bar (urllib, with a timeout)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = int(response.headers.get("Content-Length") or 0)
        blocks = iter(lambda: response.read(1 << 20), b"")
        if length:
            blocks = progress(blocks, -(-length // (1 << 20)), label)
        return b"".join(blocks)


def download_archive(root, task):
    """Fetch the official archive into ROOT/1_data_<task>/ (kept there) and check its md5; returns its path."""
    name, _, md5 = ARCHIVES[task]
    destination = os.path.join(task_dir(root, task), name)
    if os.path.isfile(destination) and file_md5(destination) == md5:
        print(f"using {destination} (already downloaded, md5 ok)")
        return destination
    url = DOWNLOAD_URL + name
    try:
        data = _fetch(url, f"downloading {name}")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"--download: cannot fetch {url} ({reason}); download it by other means, put it at "
                        f"{destination} and run again with --download (or pass --source FILE)") from None
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise UserError(f"--download: {url} has md5 {got}, expected {md5} (corrupt or changed download; "
                        "nothing was written)")
    atomic_write_bytes(destination, data)
    return destination


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def parse_args(argv):
    parser = _Parser(description="Preprocess CIFAR-10/100 python batches into the training pickles "
                                 "(variants none, ztrans, gcn_zca; see the module docstring for the formulas).")
    parser.add_argument("--task", choices=TASKS + ("all",), default="all", help="dataset(s) to process")
    parser.add_argument("--variant", choices=VARIANTS + ("all",), default="all", help="preprocessing variant(s)")
    parser.add_argument("--root", default="./", help="project root holding 1_data_<task>/ (default ./)")
    parser.add_argument("--source", metavar="PATH", help="extracted cifar-10-batches-py / cifar-100-python folder "
                        "or the official .tar.gz; its batches are validated and copied to the default location")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official archive(s) from the CIFAR site (md5-checked) and install them")
    parser.add_argument("--synthetic", action="store_true",
                        help="write a synthetic learnable dataset in the official raw format (for demos and tests)")
    parser.add_argument("--synthetic-train", type=int, default=None, metavar="N",
                        help="training images of --synthetic (default 5000)")
    parser.add_argument("--synthetic-test", type=int, default=None, metavar="N",
                        help="test images of --synthetic (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of --synthetic")
    parser.add_argument("--zca-epsilon", type=float, default=None, metavar="E",
                        help=f"gcn_zca: E added to the covariance eigenvalues before whitening (default {ZCA_EPS:g}: "
                        "as the original code did, without its noise along GCN's null direction; 0.1 damps the "
                        "weak directions, as pylearn2)")
    parser.add_argument("--force", action="store_true", help="rebuild existing outputs; with --synthetic or "
                        "--download also replace existing raw data")
    return parser.parse_args(argv)


def _check_flags(args):
    if sum(map(bool, (args.source, args.download, args.synthetic))) > 1:
        raise UserError("--source, --download and --synthetic exclude each other; use one")
    for flag, value in (("--synthetic-train", args.synthetic_train), ("--synthetic-test", args.synthetic_test)):
        if value is not None and not args.synthetic:
            raise UserError(f"{flag} needs --synthetic")
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.zca_epsilon is not None:
        if not (np.isfinite(args.zca_epsilon) and args.zca_epsilon >= 0):
            raise UserError(f"--zca-epsilon {args.zca_epsilon}: must be a finite number >= 0")
        if "gcn_zca" not in _variant_list(args.variant):
            raise UserError(f"--zca-epsilon applies to the gcn_zca variant only (--variant is {args.variant})")
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: not a folder")


def _acquire(args, tasks):
    """Run --source / --download / --synthetic; returns the tasks to process."""
    explicit = None if args.task == "all" else args.task
    if args.source:
        return [install_source(args.root, args.source, explicit)]
    if not (args.download or args.synthetic):
        return tasks
    for task in tasks:
        if raw_present(args.root, task) and not args.force:
            print(f"{task}: raw data already in {task_dir(args.root, task)}; left as is (--force replaces it)")
        elif args.download:
            install_source(args.root, download_archive(args.root, task), task)
        else:
            write_synthetic_raw(args.root, task, args.synthetic_train or 5000, args.synthetic_test or 1000,
                                args.seed)
            print(f"wrote synthetic {task} raw batches into {task_dir(args.root, task)}")
    return tasks


def main(argv=None):
    """The command line; bad input raises UserError (run_cli: one line, exit 2), failed writes OSError (exit 1)."""
    args = parse_args(argv)
    _check_flags(args)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    variants = _variant_list(args.variant)
    plans = []
    for task in _acquire(args, tasks):
        if not raw_present(args.root, task):
            hint = "use --source PATH, --download or --synthetic"
            if args.task != "all":
                raise UserError(f"--task {task}: no raw data in {raw_dirs(args.root, task)[0]} ({hint})")
            print(f"skip {task}: no raw data in {raw_dirs(args.root, task)[0]} ({hint})")
            continue
        zca_eps = ZCA_EPS if args.zca_epsilon is None else args.zca_epsilon
        plans.append(_plan_task(args.root, task, variants, args.force, zca_eps))
    if not plans:
        raise UserError(f"--root {args.root}: no raw CIFAR data found (use --source PATH, --download or --synthetic)")
    for plan in plans:
        _write_plan(plan)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
