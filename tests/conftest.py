"""Shared test helpers: tiny learnable CIFAR-shaped data and run settings."""
import os
import signal
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from deepnet_util import save_pickle  # noqa: E402


def write_tiny_data(root, n_train=320, n_test=80, preprocessing="ztrans", task="cifar10", seed=0):
    """Preprocessed pickles of class templates plus noise, where 1_data_<task>/ expects them."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if task == "cifar10" else 100
    templates = rng.normal(size=(n_classes, 32, 32, 3)).astype(np.float32)
    suffix = "" if preprocessing == "none" else f"_{preprocessing}"
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, n_classes, n).astype(np.int64)
        images = (templates[labels] + 0.8 * rng.normal(size=(n, 32, 32, 3))).astype(np.float32)
        save_pickle(os.path.join(root, f"1_data_{task}", f"{split}_set{suffix}", f"{task}_{split}set.pkl"),
                    {"images": images, "labels": labels})
    return root


def run_settings(root, **overrides):
    """Validated deepnet_main settings for a tiny, fast run under root."""
    import deepnet_main
    argv = ["-path_relative", str(root), "-experiment_name", "exp", "-spec_name", "spec", "-run", "1",
            "-network", "smcnLin", "-minibatch_size", "16", "-n_minibatches", "24", "-val_every", "4",
            "-epochs_between_checkpoints", "1", "-safe_af_ws_n", "3", "-safe_all_ws_n", "1",
            "-create_lc_on_the_fly", "False"]
    for key, value in overrides.items():
        argv += [f"-{key}"] + ([str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)])
    return deepnet_main.check_flags(vars(deepnet_main.parser().parse_args(argv)))


def state_of(settings):
    """The run's state name (run_folder.run_state) as the supervisor sees it."""
    from deepnet import commands, run_folder
    return run_folder.run_state(commands.run_paths(settings)).name


def assert_same(a, b, where="record"):
    """Deep, exact equality of recorder-like structures (floats bitwise, arrays elementwise)."""
    assert type(a) is type(b) or (np.isscalar(a) and np.isscalar(b)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f"{where}: arrays differ"
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), f"{where}: nan vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Every test: in-process runs install SIGTERM/SIGINT handlers; give pytest its own back after each test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def tiny_root(tmp_path):
    return write_tiny_data(str(tmp_path))
