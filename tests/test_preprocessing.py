"""Tests of deepnet_task_cifar_preprocessing: the variants against independent references, train/test separation,
the on-disk layout, safe unpickling, bad input, download and --source handling, keeping existing outputs."""
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
import scipy.linalg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import deepnet_task_cifar_preprocessing as prep  # noqa: E402
from deepnet_util import UserError, load_pickle, run_cli, save_pickle_streamed  # noqa: E402

SCRIPT = os.path.join(REPO, "deepnet_task_cifar_preprocessing.py")
CIFAR10_RAW = ["train_batches/data_batch_%d" % i for i in range(1, 6)] + ["test_batches/test_batch"]


# ---------------------------------------------------------------- helpers

def decode_official(path):
    """Read an official batch with plain pickle, as the CIFAR site shows; images as uint8 (n, 32, 32, 3)."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.array([row.reshape(3, 32, 32).transpose(1, 2, 0) for row in batch[b"data"]], np.uint8)
    return images.reshape(-1, 32, 32, 3), np.array(batch[b"labels"], np.int64)


def files_under(root):
    """{relative path: (size, mtime) for files, None for folders} of everything under root."""
    found = {}
    for folder, subfolders, names in os.walk(root):
        found.update({os.path.relpath(os.path.join(folder, name), root): None for name in subfolders})
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def run_main(argv):
    """Run the CLI in-process; returns its exit code (0 when it returned normally)."""
    try:
        return run_cli(prep.main, argv) or 0
    except SystemExit as stop:
        return stop.code


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_one_error_line(stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr


def write_batch(path, batch, protocol=2):
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=protocol)


def py2_string(raw):
    """A Python 2 str the way cPickle protocol 2 wrote it (SHORT_BINSTRING or BINSTRING)."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<i", len(raw)) + raw


def py2_uint8_matrix(array):
    """Python 2 numpy's pickle of a 2-D uint8 array: _reconstruct + BUILD with the raw bytes as a str."""
    rows, cols = array.shape
    dtype = (b"cnumpy\ndtype\n" + py2_string(b"u1") + b"K\x00K\x01\x87R(K\x03" + py2_string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_string(b"b") + b"\x87R"
            + b"(K\x01M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", cols) + b"\x86" + dtype
            + b"\x89" + py2_string(array.tobytes()) + b"tb")


def py2_batch_pickle(data, labels, batch_label=b"training batch 1 of 5"):
    """Byte-for-byte the structure of an official CIFAR-10 batch written by Python 2."""
    items = (py2_string(b"batch_label") + py2_string(batch_label) + py2_string(b"data") + py2_uint8_matrix(data)
             + py2_string(b"labels") + b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e")
    return b"\x80\x02}(" + items + b"u."


def random_rows(rng, count):
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8)


# ---------------------------------------------------------------- the variants against references

def test_ztrans_matches_a_per_image_loop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    images[3] = 77                    # constant image: std 0, the floor 1/sqrt(3072) applies
    images[4] = 10
    images[4, 0, 0, 0] = 11           # std far below the floor
    expected = []
    for image in images.astype(np.float64):
        values = image.ravel()
        expected.append((values - values.mean()) / max(values.std(), 1 / np.sqrt(3072)))
    out = prep.ztrans(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.reshape(12, -1), np.array(expected), rtol=1e-5, atol=1e-5)
    assert np.all(out[3] == 0)


def reference_gcn_zca(train, test, scale=55.0, eps=0.1):
    """Steps 1-4 of the module docstring, written out in float64 with loops, np.cov and scipy's eigh; null
    directions by the tolerance alone (float64 np.cov resolves them without the suite's projection)."""
    def gcn(images):
        rows = []
        for values in images.reshape(len(images), -1).astype(np.float64):
            centred = values - values.mean()
            rows.append(centred / max(np.linalg.norm(centred) / scale, 1e-8))
        return np.array(rows)
    g_train, g_test = gcn(train), gcn(test)
    sigma = g_train.std(axis=0)
    p_train, p_test = g_train / sigma, g_test / sigma
    mu = p_train.mean(axis=0)
    s, u = scipy.linalg.eigh(np.cov(p_train, rowvar=False, bias=True))
    kept = s > len(s) * np.finfo(np.float64).eps * s.max()
    w = u[:, kept] @ np.diag(1 / np.sqrt(s[kept] + eps)) @ u[:, kept].T
    z_train, z_test = (p_train - mu) @ w, (p_test - mu) @ w
    m, d = z_train.mean(), z_train.std()
    return (z_train - m) / d, (z_test - m) / d


@pytest.mark.parametrize("n_train", [60, 500])  # fewer and more images than the 192 features
def test_gcn_zca_matches_an_explicit_reference(n_train):
    rng = np.random.default_rng(n_train)
    base = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float64)
    train = np.clip(base + rng.normal(0, 40, (n_train, 8, 8, 3)), 0, 255).astype(np.uint8)
    test = np.clip(base + rng.normal(0, 40, (30, 8, 8, 3)), 0, 255).astype(np.uint8)
    params = prep.fit_gcn_zca(train, zca_eps=0.1)
    out_train, out_test = prep.apply_gcn_zca(train, params), prep.apply_gcn_zca(test, params)
    ref_train, ref_test = reference_gcn_zca(train, test, eps=0.1)
    assert params["zca_null_directions"] == 192 - min(n_train - 1, 191)  # rank of the centred, GCN'd images
    assert out_train.dtype == np.float32 and out_train.shape == train.shape
    np.testing.assert_allclose(out_train.reshape(n_train, -1), ref_train, atol=1e-4)
    np.testing.assert_allclose(out_test.reshape(30, -1), ref_test, atol=1e-4)
    assert abs(out_train.mean()) < 1e-5 and abs(out_train.std() - 1) < 1e-4


def test_fitted_params_depend_on_training_images_only():
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8)
    params = prep.fit_gcn_zca(train)
    kept = {k: np.copy(v) for k, v in params.items()}
    prep.apply_gcn_zca(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), params)
    again = prep.fit_gcn_zca(train.copy())
    for key in kept:
        np.testing.assert_array_equal(params[key], kept[key])
        np.testing.assert_allclose(again[key], kept[key], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- gcn_zca against the original research code

def original_gcn(dataset, s=1., lmda=0., epsilon=1.0e-8, goodfellow=False):
    """The original's GCN, transcribed (its per-pixel loop over a hard-coded (32, 32, 3) written as one std over
    axis 0, so that it takes any image shape)."""
    out_set = []
    for i in range(dataset.shape[0]):
        X = np.squeeze(dataset[i, :, :, :])
        X = X - np.mean(X)
        contrast = np.sqrt(lmda + np.mean(X ** 2))
        out_set.append(X / max(contrast, epsilon))
    out_set = np.array(out_set)
    if goodfellow:
        out_set = out_set * np.expand_dims(1. / np.std(out_set, axis=0), 0)
    return out_set


def original_zca(dataset, epsilon=0.0):
    """The original's ZCA, transcribed; also returns the fitted PCA. Two changes: n_components is the number of
    values per image (3072 there), and svd_solver='full' (exact) where the original used 'randomized' (an
    approximation), so that both sides are exact fits of the same images."""
    from sklearn.decomposition import PCA
    pca = PCA(n_components=np.prod(dataset.shape[1:]), random_state=0, svd_solver='full')
    dataset_flattened = np.reshape(dataset, (np.shape(dataset)[0], -1))
    pca.fit(dataset_flattened)
    out_set = []
    for i in range(dataset.shape[0]):
        vec = dataset_flattened[i]
        dot = np.dot(vec - pca.mean_, pca.components_.T)
        whitened = np.dot(dot / (pca.singular_values_ + epsilon), pca.components_) * np.sqrt(dataset.shape[0]) * 0.5
        out_set.append(whitened.reshape(dataset.shape[1:]))
    return np.array(out_set), pca


def original_unify(dataset):
    """The original's unify_dataset, transcribed."""
    return (dataset - np.mean(dataset)) / np.std(dataset)


@pytest.fixture(scope="module")
def original_vs_suite():
    """400 random 8x8x3 images (one constant), run through the transcribed original (GCN goodfellow, ZCA with
    epsilon 0) and through the suite with its default zca_eps (0), both fitted on these images only (the original
    fitted on train+test together; here both sides see the same set)."""
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float64)
    train = np.clip(base + rng.normal(0, 40, (400, 8, 8, 3)), 0, 255).astype(np.uint8)
    train[7] = 128  # constant image: 0 after GCN in both codes
    params = prep.fit_gcn_zca(train)  # the default epsilon: the original's 0
    assert params["zca_eps"] == 0.0
    p_original = original_gcn(train.astype(np.float64), goodfellow=True)
    whitened, pca = original_zca(p_original, epsilon=0.0)
    return {"train": train, "params": params, "p_original": p_original, "whitened": whitened.reshape(400, -1),
            "pca": pca, "out": prep.apply_gcn_zca(train, params).reshape(400, -1).astype(np.float64),
            "null": params["pixel_std"] / np.linalg.norm(params["pixel_std"])}


def test_original_gcn_and_the_suite_agree_after_pixel_std_scaling(original_vs_suite):
    train, params, p_original = (original_vs_suite[k] for k in ("train", "params", "p_original"))
    flat = train.reshape(len(train), -1)
    g_suite = prep._gcn(flat, prep.GCN_SCALE, prep.GCN_MIN_DIVISOR).astype(np.float64)
    g_original = original_gcn(train.astype(np.float64)).reshape(len(train), -1)
    # step 1 differs by the factor sqrt(D)/55, the same for every image (the constant image is 0 in both) ...
    np.testing.assert_allclose(g_original, g_suite * np.sqrt(flat.shape[1]) / 55, rtol=1e-6, atol=1e-6)
    assert not np.allclose(g_original, g_suite, rtol=1e-3)
    # ... which the per-pixel std of step 2 divides out: the p are the same numbers (float32 rounding here)
    np.testing.assert_allclose(g_suite / params["pixel_std"], p_original.reshape(len(train), -1), rtol=0, atol=2e-5)


def test_original_zca_is_the_epsilon_0_whitening_times_a_half(original_vs_suite):
    params, pca, whitened, out, null = (original_vs_suite[k] for k in ("params", "pca", "whitened", "out", "null"))
    singular, components = pca.singular_values_, pca.components_
    # its singular values are sqrt(n s_k): 1/(singular value + 0) = 1/sqrt(s_k) / sqrt(n), and it multiplies by
    # sqrt(n)/2; its last component is GCN's null direction, singular value zero up to rounding
    np.testing.assert_allclose(singular[:-1] ** 2 / 400, params["eigenvalues"][:0:-1], rtol=1e-5)
    assert singular[-1] < 1e-12 * singular[0] and abs(components[-1] @ null) > 1 - 1e-9
    # so on the other 191 directions its ZCA output is half the suite's z = out * d (m = 0) ...
    kept_part = whitened - np.outer(whitened @ components[-1], components[-1])
    np.testing.assert_allclose(kept_part, 0.5 * out * params["global_std"], rtol=0, atol=1e-5)
    # ... and along the null direction it carries rounding noise whitened to about unit variance
    assert (2 * whitened @ components[-1]).std() > 0.1 and np.abs(out @ null).max() < 1e-5


def test_zca_epsilon_0_matches_the_original_without_its_null_component(original_vs_suite):
    """Compared: the suite's output (fit_gcn_zca + apply_gcn_zca with the default zca_eps 0, what a plain
    --variant gcn_zca runs) against
    the original's unify_dataset applied to its ZCA output with the component along its null direction (the PCA
    component of singular value ~0) removed, value by value, to 2e-5 absolute (unit-variance values up to ~6;
    the suite works in float32)."""
    pca, whitened, out = (original_vs_suite[k] for k in ("pca", "whitened", "out"))
    null = pca.components_[-1]
    expected = original_unify(whitened - np.outer(whitened @ null, null))
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
    assert np.abs(out - original_unify(whitened)).max() > 1e-2  # the original as is: its noise shifts and scales


@pytest.mark.parametrize("n_train", [300, 100])  # more and fewer images than the 192 features
def test_null_directions_get_weight_zero(n_train):
    rng = np.random.default_rng(n_train)
    base = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float64)
    train = np.clip(base + rng.normal(0, 40, (n_train, 8, 8, 3)), 0, 255).astype(np.uint8)
    test = np.clip(base + rng.normal(0, 40, (50, 8, 8, 3)), 0, 255).astype(np.uint8)
    params = prep.fit_gcn_zca(train, zca_eps=0.0)
    null_count = 192 - min(n_train - 1, 191)  # GCN's direction, plus the rank deficit when n_train <= 192
    assert params["zca_null_directions"] == null_count
    assert params["global_std"] == pytest.approx(np.sqrt((192 - null_count) / 192), rel=1e-12)
    out_train = prep.apply_gcn_zca(train, params).reshape(n_train, -1).astype(np.float64)
    assert abs(out_train.mean()) < 1e-6 and abs(out_train.std() - 1) < 1e-5  # m and d are exact
    z = out_train * params["global_std"]
    spectrum = np.linalg.eigvalsh(z.T @ z / n_train)  # whitened training covariance: 0 on the null directions
    # (the kernel of W), identity on the rest
    np.testing.assert_allclose(spectrum[:null_count], 0, atol=1e-5)
    np.testing.assert_allclose(spectrum[null_count:], 1, atol=1e-4)
    gcn_null = params["pixel_std"] / np.linalg.norm(params["pixel_std"])
    assert np.abs(params["zca_matrix"] @ gcn_null).max() < 1e-9
    assert np.abs(prep.apply_gcn_zca(test, params).reshape(50, -1) @ gcn_null).max() < 1e-5


# ---------------------------------------------------------------- layout round trip through the CLI

@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    """Synthetic CIFAR-10 raw data (cifar100 absent) preprocessed by a plain CLI run; yields (root, stdout)."""
    root = str(tmp_path_factory.mktemp("cifar10"))
    prep.write_synthetic_raw(root, "cifar10", n_train=120, n_test=40, seed=1)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_main(["--root", root])
    assert code == 0
    return root, stdout.getvalue()


def test_plain_run_processes_present_tasks_and_explains_skips(cifar10_root):
    root, stdout = cifar10_root
    assert f"skip cifar100: no raw data in {os.path.join(root, '1_data_cifar100', 'train_batches')}" in stdout
    for variant in prep.VARIANTS:
        assert f"wrote cifar10 {variant}" in stdout
    assert not os.path.exists(os.path.join(root, "1_data_cifar100"))


@pytest.mark.parametrize("variant,folder", [("none", ""), ("ztrans", "_ztrans"), ("gcn_zca", "_gcn_zca")])
def test_output_pickles_round_trip_the_raw_order(cifar10_root, variant, folder):
    root, _ = cifar10_root
    task = os.path.join(root, "1_data_cifar10")
    raw = [decode_official(os.path.join(task, name)) for name in CIFAR10_RAW]
    raw_train = np.concatenate([r[0] for r in raw[:5]]), np.concatenate([r[1] for r in raw[:5]])
    for split, (raw_images, raw_labels) in (("train", raw_train), ("test", raw[5])):
        path = os.path.join(task, f"{split}_set{folder}", f"cifar10_{split}set.pkl")
        data = load_pickle(path)
        assert sorted(data) == ["images", "labels"]
        assert data["images"].dtype == np.float32 and data["images"].shape == (len(raw_labels), 32, 32, 3)
        assert data["labels"].dtype == np.int64 and isinstance(data["labels"], np.ndarray)
        np.testing.assert_array_equal(data["labels"], raw_labels)
        assert np.isfinite(data["images"]).all()
        if variant == "none":
            np.testing.assert_array_equal(data["images"], raw_images.astype(np.float32))
        if variant == "ztrans":  # a positive per-image affine map of the raw pixels, image by image
            for out, src in zip(data["images"], raw_images):
                assert np.corrcoef(out.ravel(), src.ravel().astype(np.float64))[0, 1] > 0.99999
        with open(os.path.splitext(path)[0] + ".json") as handle:
            sidecar = json.load(handle)
        assert sidecar["variant"] == variant and sidecar["images_shape"] == [len(raw_labels), 32, 32, 3]
        assert sidecar["source_md5"] == {name: hashlib.md5(read_bytes(os.path.join(task, name))).hexdigest()
                                         for name in CIFAR10_RAW}


def test_gcn_zca_params_are_saved_and_reproduce_the_outputs(cifar10_root):
    root, _ = cifar10_root
    task = os.path.join(root, "1_data_cifar10")
    with np.load(os.path.join(task, "train_set_gcn_zca", "cifar10_gcn_zca_params.npz")) as saved:
        params = dict(saved)
    assert params["zca_matrix"].shape == (3072, 3072)
    raw = [decode_official(os.path.join(task, name))[0] for name in CIFAR10_RAW]
    for split, raw_images in (("train", np.concatenate(raw[:5])), ("test", raw[5])):
        stored = load_pickle(os.path.join(task, f"{split}_set_gcn_zca", f"cifar10_{split}set.pkl"))["images"]
        np.testing.assert_allclose(prep.apply_gcn_zca(raw_images, params), stored, atol=1e-5)


def test_load_raw_matches_plain_decoding(cifar10_root):
    root, _ = cifar10_root
    train_images, train_labels, test_images, test_labels = prep.load_raw(root, "cifar10")
    task = os.path.join(root, "1_data_cifar10")
    first_images, first_labels = decode_official(os.path.join(task, CIFAR10_RAW[0]))
    assert train_images.dtype == np.uint8 and train_images.shape == (120, 32, 32, 3)
    assert train_labels.dtype == np.int64 and test_images.shape == (40, 32, 32, 3) and len(test_labels) == 40
    np.testing.assert_array_equal(train_images[:len(first_images)], first_images)
    np.testing.assert_array_equal(train_labels[:len(first_labels)], first_labels)


def test_train_outputs_ignore_a_changed_test_set(cifar10_root, tmp_path):
    original = os.path.join(cifar10_root[0], "1_data_cifar10")
    copy = tmp_path / "1_data_cifar10"
    shutil.copytree(original, copy)
    rng = np.random.default_rng(9)
    write_batch(copy / "test_batches" / "test_batch", {b"data": random_rows(rng, 40), b"labels": [3] * 40})
    written = prep.preprocess_task(str(tmp_path), "cifar10", ["gcn_zca"])
    assert written  # the raw files changed, so the stale outputs were rebuilt
    for name in ("train_set_gcn_zca/cifar10_trainset.pkl",):
        before, after = load_pickle(os.path.join(original, name)), load_pickle(str(copy / name))
        np.testing.assert_allclose(after["images"], before["images"], rtol=0, atol=1e-6)
    with np.load(os.path.join(original, "train_set_gcn_zca/cifar10_gcn_zca_params.npz")) as before, \
            np.load(copy / "train_set_gcn_zca/cifar10_gcn_zca_params.npz") as after:
        for key in before.files:
            np.testing.assert_allclose(after[key], before[key], rtol=0, atol=1e-9)
    old_test = load_pickle(os.path.join(original, "test_set_gcn_zca/cifar10_testset.pkl"))["images"]
    new_test = load_pickle(str(copy / "test_set_gcn_zca/cifar10_testset.pkl"))["images"]
    assert np.abs(new_test - old_test).mean() > 0.1


def test_cifar100_layout_and_fine_labels(tmp_path):
    root = str(tmp_path)
    prep.write_synthetic_raw(root, "cifar100", n_train=150, n_test=50)
    written = prep.preprocess_task(root, "cifar100", ["none", "ztrans"])
    assert all(os.path.isfile(path) for path in written) and len(written) == 8
    with open(tmp_path / "1_data_cifar100" / "train_batches" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    assert raw[b"data"].shape == (150, 3072) and raw[b"data"].dtype == np.uint8 and b"coarse_labels" in raw
    data = load_pickle(os.path.join(root, "1_data_cifar100", "train_set_ztrans", "cifar100_trainset.pkl"))
    np.testing.assert_array_equal(data["labels"], raw[b"fine_labels"])
    assert data["images"].shape == (150, 32, 32, 3)


def test_synthetic_classes_are_separable_after_preprocessing(tmp_path):
    prep.write_synthetic_raw(str(tmp_path), "cifar10", n_train=500, n_test=200, seed=3)
    train_images, train_labels, test_images, test_labels = prep.load_raw(str(tmp_path), "cifar10")
    assert np.bincount(train_labels).tolist() == [50] * 10
    train, test = prep.ztrans(train_images).reshape(500, -1), prep.ztrans(test_images).reshape(200, -1)
    centroids = np.array([train[train_labels == c].mean(axis=0) for c in range(10)])
    predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert 0.4 < (predicted == test_labels).mean() < 0.95  # learnable, far above chance, not trivial


# ---------------------------------------------------------------- unpickling

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pkl"
    write_batch(path, {b"data": RunsCode(marker)})
    with pytest.raises(UserError, match="refused global"):
        load_pickle(str(path), encoding="bytes")
    assert not marker.exists()


def test_cli_refuses_a_batch_that_would_run_code(tmp_path):
    root = str(tmp_path / "root")
    prep.write_synthetic_raw(root, "cifar10", n_train=20, n_test=10)
    marker = tmp_path / "ran"
    write_batch(os.path.join(root, "1_data_cifar10", "train_batches", "data_batch_2"),
                {b"data": RunsCode(marker), b"labels": [0]})
    before = files_under(root)
    result = run_script("--root", root)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "data_batch_2", "refused global")
    assert not marker.exists() and files_under(root) == before


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_reads_python3_protocols(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    obj = {b"data": random_rows(rng, 4), "images": rng.random((2, 3), dtype=np.float32), "labels": [1, 2]}
    write_batch(tmp_path / "p.pkl", obj, protocol=protocol)
    loaded = load_pickle(str(tmp_path / "p.pkl"), encoding="bytes")
    np.testing.assert_array_equal(loaded[b"data"], obj[b"data"])
    np.testing.assert_array_equal(loaded["images"], obj["images"])
    assert loaded["images"].dtype == np.float32 and loaded["labels"] == [1, 2]


def test_python2_style_batches_load(tmp_path):
    rng = np.random.default_rng(2)
    rows = {name: random_rows(rng, 3) for name in CIFAR10_RAW}
    labels = {name: rng.integers(0, 10, 3) for name in CIFAR10_RAW}
    for name in CIFAR10_RAW:
        path = tmp_path / "1_data_cifar10" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(py2_batch_pickle(rows[name], labels[name]))
    assert pickle.loads(path.read_bytes(), encoding="bytes")[b"labels"] == labels[name].tolist()  # well formed
    train_images, train_labels, test_images, test_labels = prep.load_raw(str(tmp_path), "cifar10")
    expected = np.concatenate([rows[n] for n in CIFAR10_RAW[:5]]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(train_images, expected)
    np.testing.assert_array_equal(train_labels, np.concatenate([labels[n] for n in CIFAR10_RAW[:5]]))
    np.testing.assert_array_equal(test_labels, labels["test_batches/test_batch"])


def test_streamed_pickle_is_atomic_and_loads(tmp_path):
    path = str(tmp_path / "out.pkl")
    value = {"images": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3), "labels": np.array([4, 5])}
    save_pickle_streamed(path, value)
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded["images"], value["images"])
    assert loaded["images"].dtype == np.float32 and loaded["labels"].tolist() == [4, 5]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("interrupted mid-write")
    with pytest.raises(RuntimeError):
        save_pickle_streamed(path, {"images": np.zeros(10**6), "late": Unpicklable()})
    assert os.listdir(tmp_path) == ["out.pkl"]  # no temporary left behind, the old file untouched
    np.testing.assert_array_equal(load_pickle(path)["images"], value["images"])


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written

def cifar10_file(root, name):
    return os.path.join(root, "1_data_cifar10", name)


def corrupt_truncate(root):
    path = cifar10_file(root, "train_batches/data_batch_3")
    data = read_bytes(path)
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    return "data_batch_3"


def corrupt_label_range(root):
    write_batch(cifar10_file(root, "test_batches/test_batch"),
                {b"data": random_rows(np.random.default_rng(0), 2), b"labels": [3, 10]})
    return "test_batch: label 10 out of range 0..9"


def corrupt_shape(root):
    write_batch(cifar10_file(root, "train_batches/data_batch_1"),
                {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]})
    return "data_batch_1: b'data' has shape (2, 3071)"


def corrupt_non_finite(root):
    data = np.zeros((2, 3072), np.float32)
    data[1, 5] = np.nan
    write_batch(cifar10_file(root, "train_batches/data_batch_4"), {b"data": data, b"labels": [0, 1]})
    return "data_batch_4: b'data' has non-finite values"


def corrupt_label_count(root):
    write_batch(cifar10_file(root, "train_batches/data_batch_2"),
                {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]})
    return "data_batch_2: b'labels' holds 2 labels for 3 images"


def corrupt_not_a_dict(root):
    write_batch(cifar10_file(root, "train_batches/data_batch_5"), [1, 2, 3])
    return "data_batch_5: expected a dict"


def corrupt_missing_file(root):
    os.unlink(cifar10_file(root, "train_batches/data_batch_5"))
    return "data_batch_5: missing"


def corrupt_cifar100_only(root):  # cifar10 is valid and comes first: its outputs must not be written either
    write_batch(os.path.join(root, "1_data_cifar100", "test_batches", "test"),
                {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]})
    return "test: label 100 out of range 0..99"


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_label_range, corrupt_shape, corrupt_non_finite,
                                     corrupt_label_count, corrupt_not_a_dict, corrupt_missing_file,
                                     corrupt_cifar100_only])
def test_bad_raw_input_fails_cleanly_and_writes_nothing(tmp_path, capsys, corrupt):
    root = str(tmp_path)
    prep.write_synthetic_raw(root, "cifar10", n_train=20, n_test=10)
    prep.write_synthetic_raw(root, "cifar100", n_train=20, n_test=10)  # valid, but must not be written either
    expected = corrupt(root)
    before = files_under(root)
    capsys.readouterr()
    assert run_main(["--root", root]) == 2
    assert_one_error_line(capsys.readouterr().err, expected)
    assert files_under(root) == before


@pytest.mark.parametrize("args,fragment", [(["--variant", "foo"], "--variant"),
                                           (["--task", "cifar100"], "no raw data"),
                                           (["--synthetic-train", "5"], "--synthetic-train needs --synthetic"),
                                           (["--source", "/nonexistent/cifar"], "no such file")])
def test_bad_flags_fail_with_one_line(tmp_path, args, fragment):
    result = run_script("--root", str(tmp_path), *args)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, fragment)
    assert files_under(str(tmp_path)) == {}


def test_cli_synthetic_writes_raw_once_and_processes_it(tmp_path, capsys):
    args = ["--synthetic", "--task", "cifar10", "--variant", "none", "--synthetic-train", "30",
            "--synthetic-test", "10", "--root", str(tmp_path)]
    assert run_main(args) == 0
    data = load_pickle(str(tmp_path / "1_data_cifar10" / "train_set" / "cifar10_trainset.pkl"))
    assert data["images"].shape == (30, 32, 32, 3) and data["labels"].dtype == np.int64
    raw_before = files_under(str(tmp_path / "1_data_cifar10" / "train_batches"))
    capsys.readouterr()
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert "raw data already in" in out and "kept cifar10 none" in out
    assert files_under(str(tmp_path / "1_data_cifar10" / "train_batches")) == raw_before


def test_no_raw_data_at_all_explains_each_skip(tmp_path, capsys):
    assert run_main(["--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("skip cifar") == 2
    assert_one_error_line(captured.err, "no raw CIFAR data")


# ---------------------------------------------------------------- --download and --source

class FakeResponse(io.BytesIO):
    headers = {}


def make_archive(path, top, members, extra=()):
    """A .tar.gz holding top/<name> for each (name, bytes) and any extra (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def official_members(tmp_path, n_train=20, n_test=10):
    raw_root = str(tmp_path / "raw")
    prep.write_synthetic_raw(raw_root, "cifar10", n_train=n_train, n_test=n_test)
    return [(os.path.basename(name), read_bytes(os.path.join(raw_root, "1_data_cifar10", name)))
            for name in CIFAR10_RAW]


def test_download_without_network_fails_cleanly(tmp_path, capsys, monkeypatch):
    def no_network(url, timeout=None):
        assert timeout is not None
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(prep.urllib.request, "urlopen", no_network)
    root = str(tmp_path / "root")
    assert run_main(["--download", "--task", "cifar10", "--root", root]) == 2
    destination = os.path.join(root, "1_data_cifar10", "cifar-10-python.tar.gz")
    assert_one_error_line(capsys.readouterr().err, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          destination)
    assert not os.path.exists(root) or files_under(root) == {}


def test_download_detects_md5_mismatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(b"not cifar"))
    root = str(tmp_path / "root")
    assert run_main(["--download", "--task", "cifar100", "--root", root]) == 2
    assert_one_error_line(capsys.readouterr().err, "md5", "eb9058c3a382ffc7106e4002c42a8d85")
    assert not os.path.exists(root) or files_under(root) == {}


def test_download_installs_the_checked_archive(tmp_path, monkeypatch):
    archive = tmp_path / "served.tar.gz"
    make_archive(archive, "cifar-10-batches-py", official_members(tmp_path))
    data = archive.read_bytes()
    monkeypatch.setitem(prep.ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                                                   hashlib.md5(data).hexdigest()))
    monkeypatch.setattr(prep.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(data))
    root = str(tmp_path / "root")
    assert run_main(["--download", "--task", "cifar10", "--variant", "none", "--root", root]) == 0
    task = os.path.join(root, "1_data_cifar10")
    assert read_bytes(os.path.join(task, "cifar-10-python.tar.gz")) == data
    assert load_pickle(os.path.join(task, "train_set", "cifar10_trainset.pkl"))["images"].shape == (20, 32, 32, 3)

    def no_network(url, timeout=None):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(prep.urllib.request, "urlopen", no_network)  # the kept archive (md5 ok) is used again
    assert run_main(["--download", "--force", "--task", "cifar10", "--variant", "none", "--root", root]) == 0


def test_source_archive_extracts_only_expected_members(tmp_path):
    escape_dot = tarfile.TarInfo("../escaped.txt")
    escape_dot.size = 4
    escape_abs = tarfile.TarInfo(str(tmp_path / "absolute.txt"))
    escape_abs.size = 4
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_archive(archive, "cifar-10-batches-py", official_members(tmp_path),
                 extra=[(escape_dot, b"evil"), (escape_abs, b"evil")])
    root = tmp_path / "work" / "root"
    result = run_script("--source", str(archive), "--variant", "none", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "work" / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()
    assert sorted(files_under(str(root / "1_data_cifar10" / "train_batches"))) == [f"data_batch_{i}"
                                                                                  for i in range(1, 6)]
    assert (root / "1_data_cifar10" / "train_set" / "cifar10_trainset.pkl").exists()


def test_source_archive_with_a_linked_batch_is_refused(tmp_path, capsys):
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members = [m for m in official_members(tmp_path) if m[0] != "data_batch_1"]
    archive = tmp_path / "linked.tar.gz"
    make_archive(archive, "cifar-10-batches-py", members, extra=[(link, None)])
    root = str(tmp_path / "root")
    assert run_main(["--source", str(archive), "--root", root]) == 2
    assert_one_error_line(capsys.readouterr().err, "cifar-10-batches-py/data_batch_1", "not a regular file")
    assert not os.path.exists(root)


def test_source_truncated_archive_is_refused(tmp_path, capsys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_archive(archive, "cifar-10-batches-py", official_members(tmp_path))
    archive.write_bytes(archive.read_bytes()[:2000])
    root = str(tmp_path / "root")
    assert run_main(["--source", str(archive), "--root", root]) == 2
    assert_one_error_line(capsys.readouterr().err, str(archive))
    assert not os.path.exists(root)


def test_source_folder_is_validated_then_copied(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in official_members(tmp_path):
        (folder / name).write_bytes(data)
    root = tmp_path / "root"
    assert run_main(["--source", str(folder), "--task", "cifar100", "--root", str(root)]) == 2
    assert_one_error_line(capsys.readouterr().err, "holds cifar10 batches but --task is cifar100")
    assert run_main(["--source", str(folder), "--variant", "ztrans", "--root", str(root)]) == 0
    installed = root / "1_data_cifar10" / "test_batches" / "test_batch"
    assert installed.read_bytes() == (folder / "test_batch").read_bytes()
    assert (root / "1_data_cifar10" / "test_set_ztrans" / "cifar10_testset.pkl").exists()


# ---------------------------------------------------------------- existing outputs

def test_existing_outputs_are_kept_unless_forced_or_stale(tmp_path, capsys):
    root = str(tmp_path)
    prep.write_synthetic_raw(root, "cifar10", n_train=20, n_test=10)
    first = prep.preprocess_task(root, "cifar10", "none")
    assert len(first) == 4
    stamps = {path: os.stat(path).st_mtime_ns for path in first}
    capsys.readouterr()
    assert prep.preprocess_task(root, "cifar10", "none") == []
    assert "kept cifar10 none" in capsys.readouterr().out
    assert {path: os.stat(path).st_mtime_ns for path in first} == stamps
    assert sorted(prep.preprocess_task(root, "cifar10", "none", force=True)) == sorted(first)
    prep.write_synthetic_raw(root, "cifar10", n_train=20, n_test=10, seed=7)  # different raw data
    capsys.readouterr()
    assert sorted(prep.preprocess_task(root, "cifar10", ["none"])) == sorted(first)
    assert "rebuilding cifar10 none" in capsys.readouterr().out


# ---------------------------------------------------------------- --zca-epsilon

@pytest.mark.parametrize("value,fragment", [("-0.1", "must be a finite number >= 0"), ("nan", "finite"),
                                            ("inf", "finite"), ("1e999", "finite"), ("abc", "invalid float"),
                                            ("0 --variant ztrans", "gcn_zca variant only")])
def test_bad_zca_epsilon_fails_with_one_line_and_writes_nothing(tmp_path, capsys, value, fragment):
    args = ["--synthetic", "--synthetic-train", "5", "--synthetic-test", "2", "--root", str(tmp_path)]
    assert run_main(args + ["--zca-epsilon"] + value.split()) == 2
    assert_one_error_line(capsys.readouterr().err, "--zca-epsilon", fragment)
    assert files_under(str(tmp_path)) == {}


@pytest.fixture(scope="module")
def zca_half_root(tmp_path_factory):
    """Synthetic CIFAR-10 (40 training images) preprocessed by `--variant gcn_zca --zca-epsilon 0.5`."""
    root = str(tmp_path_factory.mktemp("zca_half"))
    prep.write_synthetic_raw(root, "cifar10", n_train=40, n_test=10, seed=2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_main(["--root", root, "--variant", "gcn_zca", "--zca-epsilon", "0.5"]) == 0
    return root


def test_sidecars_and_params_record_the_zca_epsilon(zca_half_root):
    folder = os.path.join(zca_half_root, "1_data_cifar10")
    for split in ("train", "test"):
        with open(os.path.join(folder, f"{split}_set_gcn_zca", f"cifar10_{split}set.json")) as handle:
            parameters = json.load(handle)["parameters"]
        assert parameters["zca_eps"] == 0.5
        assert parameters["zca_null_directions"] == 3072 - 39  # 40 centred images span 39 dimensions
        assert parameters["zca_null_rtol"] == 3072 * np.finfo(np.float64).eps
    with np.load(os.path.join(folder, "train_set_gcn_zca", "cifar10_gcn_zca_params.npz")) as saved:
        params = dict(saved)
    assert params["zca_eps"] == 0.5 and params["zca_null_directions"] == 3033
    # W = U diag(w) U^T with w = 0 on the 3033 null directions and 1/sqrt(s + 0.5) on the others
    weights = 1 / np.sqrt(params["eigenvalues"][3033:] + 0.5)
    assert np.trace(params["zca_matrix"]) == pytest.approx(weights.sum(), rel=1e-9)
    assert np.sum(params["zca_matrix"] ** 2) == pytest.approx(np.sum(weights ** 2), rel=1e-9)


def test_outputs_made_with_another_zca_epsilon_are_rebuilt(zca_half_root, tmp_path, capsys):
    shutil.copytree(os.path.join(zca_half_root, "1_data_cifar10"), tmp_path / "1_data_cifar10")
    sidecar = tmp_path / "1_data_cifar10" / "train_set_gcn_zca" / "cifar10_trainset.json"
    capsys.readouterr()
    assert run_main(["--root", str(tmp_path), "--variant", "gcn_zca"]) == 0  # the default: 0, the original's
    out = capsys.readouterr().out
    assert "rebuilding cifar10 gcn_zca: its outputs were made with --zca-epsilon 0.5, not 0.0" in out
    assert "wrote cifar10 gcn_zca" in out and json.loads(sidecar.read_text())["parameters"]["zca_eps"] == 0.0
    assert run_main(["--root", str(tmp_path), "--variant", "gcn_zca", "--zca-epsilon", "0.1"]) == 0
    assert "rebuilding cifar10 gcn_zca: its outputs were made with --zca-epsilon 0.0, not 0.1" in \
        capsys.readouterr().out
    assert run_main(["--root", str(tmp_path), "--variant", "gcn_zca", "--zca-epsilon", "0.1"]) == 0
    assert "kept cifar10 gcn_zca" in capsys.readouterr().out
    recorded = json.loads(sidecar.read_text())
    del recorded["parameters"]["zca_eps"]  # as if written without it: not taken as current either
    sidecar.write_text(json.dumps(recorded))
    md5s = prep.raw_md5s(str(tmp_path), "cifar10")
    assert prep._output_state(str(tmp_path), "cifar10", "gcn_zca", md5s, 0.1) == (
        "stale", "its outputs do not record their --zca-epsilon (this run uses 0.1)")
