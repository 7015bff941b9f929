"""The input pipeline (deepnet/pipeline.py and the training loop that uses it): the loop trains on exactly the
minibatches of the rule below, in its order, from step 1 and from a resume point; the Prefetcher yields fetch's
results in step order, works ahead by a bounded amount, stops with the loop however it is left, and its
failures reach the loop.

The minibatch rule, transcribed here independently of deepnet/data.py: the training images are those of the
split's training indices; epoch e (0-based) takes them in the order of numpy's
default_rng([seed, 1, e]).permutation, cut into len(train) // minibatch_size minibatches, the remainder left
out; step s (1-based) is minibatch (s - 1) mod that count of epoch (s - 1) // that count.

That a run interrupted and resumed is bit for bit the uninterrupted run is tested end to end in
test_training.py (test_walltime_stops_at_checkpoints_and_resume_is_exact) and test_recovery.py.
"""
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import run_settings
import deepnet_network as net
from deepnet import data, datasets, pipeline, run_folder, trainer

THREAD = "deepnet-prefetch"


def prefetch_threads():
    return [thread for thread in threading.enumerate() if thread.name == THREAD]


def wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)
    return condition()


def rule_rows(seed, train_idx, batch, n_steps):
    """The training rows of steps 1..n_steps, by the rule in this module's docstring."""
    train_idx = np.asarray(train_idx)
    per_epoch = len(train_idx) // batch
    rows = []
    epoch = 0
    while len(rows) < n_steps:
        shuffled = train_idx[np.random.default_rng([seed, 1, epoch]).permutation(len(train_idx))]
        rows += [shuffled[k * batch:(k + 1) * batch] for k in range(per_epoch)]
        epoch += 1
    return rows[:n_steps]


# ---------------------------------------------------------------- the minibatch rule, through the Prefetcher

SEED, BATCH, N_IMAGES = 3, 16, 110
SPLIT_SETTINGS = {"seed": SEED, "val_set_fraction": 0.1, "minibatch_size": BATCH, "create_val_set": True}


def row_data():
    """A Data whose image i is filled with i and whose label i is 7 * i, split as a run with SPLIT_SETTINGS:
    16 validation images, 94 training images, 5 minibatches of 16 per epoch and 14 images left out of each."""
    images = np.broadcast_to(np.arange(N_IMAGES, dtype=np.float32)[:, None, None, None],
                             (N_IMAGES, 32, 32, 3)).copy()
    labels = np.arange(N_IMAGES, dtype=np.int64) * 7
    split = data.make_split(N_IMAGES, SPLIT_SETTINGS)
    return data.Data((images, labels), (images[:4], labels[:4]), split, BATCH)


def test_the_split_of_the_row_data_is_what_the_tests_assume():
    run_data = row_data()
    assert len(run_data.train_idx) == 94 and run_data.mbs_per_epoch == 5
    assert not np.array_equal(run_data.train_idx, np.arange(94))  # the rows go through the split's indices


@pytest.mark.parametrize("first, last", [(1, 16), (8, 17), (5, 6), (11, 11), (3, 2)])
def test_the_prefetched_minibatches_are_the_rule_s_bit_for_bit(first, last):
    """From step 1 over three epoch boundaries, from resume points in the middle of an epoch (8: epoch 1,
    position 2), at an epoch's last position (5) and first step (11), and with nothing left (3 > 2)."""
    run_data = row_data()
    want = rule_rows(SEED, run_data.train_idx, BATCH, max(last, 1))
    with pipeline.Prefetcher(lambda step: run_data.minibatch(step, BATCH, SPLIT_SETTINGS), first, last) as batches:
        got = list(batches)
    assert [step for step, _, _ in got] == list(range(first, last + 1))
    for step, images, labels in got:
        rows = want[step - 1]
        assert images.dtype == np.float32 and images.shape == (BATCH, 32, 32, 3) and labels.dtype == np.int64
        assert images[:, 0, 0, 0].astype(int).tolist() == rows.tolist(), f"step {step}"
        assert np.array_equal(images, run_data.images[rows]) and np.array_equal(labels, 7 * rows), f"step {step}"
        assert images.tobytes() == run_data.images[rows].tobytes(), f"step {step}"
    assert not prefetch_threads()


def test_each_epoch_takes_distinct_training_rows_reshuffled_and_leaves_the_remainder_out():
    run_data = row_data()
    with pipeline.Prefetcher(lambda step: run_data.minibatch(step, BATCH, SPLIT_SETTINGS), 1, 15) as batches:
        rows = [images[:, 0, 0, 0].astype(int) for _, images, _ in batches]
    val = set(range(N_IMAGES)) - set(run_data.train_idx.tolist())
    epochs = [np.concatenate(rows[k:k + 5]) for k in (0, 5, 10)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 5 * BATCH and not set(epoch.tolist()) & val
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


# ---------------------------------------------------------------- the Prefetcher itself

class Fetch:
    """fetch(step) -> (images, labels) of a step, recording which steps were asked for and from which thread;
    raises `fail` at step `fail_at`."""

    def __init__(self, fail_at=None, fail=None):
        self.calls, self.threads, self.fail_at, self.fail = [], set(), fail_at, fail

    def __call__(self, step):
        self.calls.append(step)
        self.threads.add(threading.current_thread().name)
        if step == self.fail_at:
            raise self.fail
        return np.full((2, 3), step, np.float32), np.array([step, -step], np.int64)


@pytest.mark.parametrize("first, last", [(1, 1), (1, 50), (17, 23)])
def test_prefetcher_yields_fetch_of_first_to_last_in_order_from_its_own_thread(first, last):
    fetch = Fetch()
    with pipeline.Prefetcher(fetch, first, last) as batches:
        got = list(batches)
        with pytest.raises(StopIteration):  # the end stays the end
            next(batches)
    assert [step for step, _, _ in got] == list(range(first, last + 1)) == fetch.calls
    for step, images, labels in got:
        assert np.array_equal(images, np.full((2, 3), step, np.float32)) and labels.tolist() == [step, -step]
    assert fetch.threads == {THREAD}
    assert not prefetch_threads()


def test_prefetcher_with_nothing_to_fetch_yields_nothing():
    fetch = Fetch()
    with pipeline.Prefetcher(fetch, 8, 7) as batches:
        assert list(batches) == []
    assert fetch.calls == [] and not prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_prefetcher_works_ahead_of_the_loop_by_at_most_depth_plus_one(depth):
    """While the loop holds step 1 (its step running), the next minibatches are fetched: `depth` queued and one
    more waiting for room, no further."""
    fetch = Fetch()
    with pipeline.Prefetcher(fetch, 1, 100, depth=depth) as batches:
        assert next(batches)[0] == 1
        assert wait_for(lambda: len(fetch.calls) == depth + 2)
        time.sleep(0.2)
        assert fetch.calls == list(range(1, depth + 3))
        assert [next(batches)[0] for _ in range(3)] == [2, 3, 4]
        assert wait_for(lambda: len(fetch.calls) == depth + 5)
    assert not prefetch_threads()


@pytest.mark.parametrize("taken", [1, 7])
def test_a_break_stops_the_thread_without_fetching_far_ahead(taken):
    fetch = Fetch()
    with pipeline.Prefetcher(fetch, 1, 10 ** 6) as batches:
        for step, _, _ in batches:
            if step == taken:
                break
        assert wait_for(lambda: batches.queue.full())  # the thread waits to put a minibatch
    assert not prefetch_threads()
    assert fetch.calls == list(range(1, len(fetch.calls) + 1))
    assert taken < len(fetch.calls) <= taken + pipeline.DEPTH + 1


def test_an_exception_in_the_loop_stops_the_thread_and_is_the_one_raised():
    fetch = Fetch()
    with pytest.raises(KeyError, match="the loop failed"):
        with pipeline.Prefetcher(fetch, 1, 10 ** 6) as batches:
            for step, _, _ in batches:
                if step == 3:
                    raise KeyError("the loop failed")
    assert not prefetch_threads()
    assert 3 <= len(fetch.calls) <= 3 + pipeline.DEPTH + 1


def test_leaving_while_fetch_is_slow_waits_for_it_and_stops():
    """close() while the thread is inside fetch: it returns once that fetch ends, with no thread left."""
    started, release = threading.Event(), threading.Event()

    def slow(step):
        if step == 2:
            started.set()
            release.wait(5)
        return np.zeros(1), np.zeros(1)

    prefetcher = pipeline.Prefetcher(slow, 1, 10 ** 6)
    assert next(prefetcher)[0] == 1 and started.wait(5)
    threading.Timer(0.2, release.set).start()
    prefetcher.close()
    assert not prefetcher.thread.is_alive() and not prefetch_threads()


@pytest.mark.parametrize("fail_at", [1, 6])
def test_a_failure_in_fetch_reaches_the_loop_after_the_steps_before_it(fail_at):
    fetch = Fetch(fail_at=fail_at, fail=ValueError(f"no minibatch {fail_at}"))
    delivered = []
    with pipeline.Prefetcher(fetch, 1, 20) as batches:
        with pytest.raises(ValueError, match=f"no minibatch {fail_at}"):
            for step, _, _ in batches:
                delivered.append(step)
        with pytest.raises(ValueError):  # again, instead of waiting for ever
            next(batches)
    assert delivered == list(range(1, fail_at))
    assert fetch.calls == list(range(1, fail_at + 1))  # nothing fetched after the failure
    assert not prefetch_threads()


# ---------------------------------------------------------------- in the training loop

class FeedSpy:
    """Wraps a session's run to keep a copy of the step, images and labels each training step trains on, and to
    ask for a stop (as SIGTERM would) after step `stop_at`. Where the model stages its input, a step trains on the
    oldest minibatch staged and not yet taken (the staging area is first in, first out; its clear op empties it)."""

    def __init__(self, sess, inputs, stop):
        self.real_run, self.inputs, self.stop, self.stop_at, self.fed = sess.run, inputs, stop, None, []
        self.staged = []
        sess.run = self.run

    def run(self, fetches, feed_dict=None, **kwargs):
        feed, inputs, staging = feed_dict or {}, self.inputs, self.inputs.staging
        if staging is not None and fetches is staging.clear:
            self.staged.clear()
        if inputs.step in feed:
            step = feed[inputs.step]
            minibatch = self.staged.pop(0) if staging is not None else (feed[inputs.images], feed[inputs.labels])
            self.fed.append((step, *map(np.array, minibatch)))
            if step == self.stop_at:
                self.stop.signal = signal.SIGTERM
        if staging is not None and staging.images in feed:
            self.staged.append((np.array(feed[staging.images]), np.array(feed[staging.labels])))
        return self.real_run(fetches, feed_dict, **kwargs)


@pytest.fixture(params=["fed", "staged"])
def loop(tiny_root, request, monkeypatch):
    """A Trainer on the tiny data (304 training images: 19 minibatches of 16 per epoch, 45 steps), with
    validation, checkpoints and weight saves off, its training feeds spied on; 'staged': its input staged on a
    device (the CPU here) as on a GPU, the minibatch fed during the step before its own."""
    if request.param == "staged":
        monkeypatch.setattr(net, "staging_device", lambda: "/device:CPU:0")
    s = run_settings(tiny_root, n_minibatches=45)
    train, test, _ = data.load_pair(*datasets.data_files(s), 10, s["path_relative"])
    run_data = data.Data(train, test, data.make_split(len(train[1]), s), s["minibatch_size"])
    paths = run_folder.run_paths(s)
    os.makedirs(paths["run_dir"])  # as the run's lock makes it
    with trainer.StopRequest() as stop:
        loop = trainer.Trainer(s, paths, run_data, None, lambda line: None, stop)
        try:
            assert (loop.model.inputs.images.op.type == "Unstage") == (request.param == "staged")
            loop.val_mbs = loop.ckpt_mbs = loop.af_mbs = loop.all_mbs = set()
            loop.sess.run(loop.init_op)
            loop.record = trainer.new_recorder(s, run_data.mbs_per_epoch)
            loop.spy = FeedSpy(loop.sess, loop.model.inputs, stop)
            yield loop
        finally:
            loop._close()


def assert_fed_by_the_rule(loop, steps):
    """The loop fed exactly `steps`, each with the rule's rows of the loaded training set, bit for bit."""
    run_data, s = loop.data, loop.settings
    assert run_data.mbs_per_epoch == 19
    want = rule_rows(s["seed"], run_data.train_idx, s["minibatch_size"], max(steps))
    row_of = {image.tobytes(): row for row, image in enumerate(run_data.images)}
    assert len(row_of) == len(run_data.images)  # every image tells its row
    assert [step for step, _, _ in loop.spy.fed] == steps
    for step, images, labels in loop.spy.fed:
        rows = want[step - 1]
        assert [row_of.get(image.tobytes()) for image in images] == rows.tolist(), f"step {step}"
        assert images.tobytes() == run_data.images[rows].tobytes(), f"step {step}"
        assert labels.dtype == np.int64 and labels.tobytes() == run_data.labels[rows].tobytes(), f"step {step}"


def test_the_training_loop_trains_on_the_rule_s_minibatches_fresh_and_resumed(loop):
    """45 steps over three epochs from the start, then again from a resume point in the middle of the second
    epoch (step 28: epoch 1, position 8)."""
    assert loop._train() is None
    assert_fed_by_the_rule(loop, list(range(1, 46)))
    assert loop.record["train_mb_n_hist"] == list(range(1, 46)) and loop.record["ep_count_total"] == 3
    assert not prefetch_threads()
    loop.spy.fed.clear()
    loop.record["mb_count_total"] = 27
    assert loop._train() is None
    assert_fed_by_the_rule(loop, list(range(28, 46)))
    assert not prefetch_threads()


def test_a_stop_request_ends_the_loop_after_its_step_and_the_thread_with_it(loop):
    """...and the loop goes on from the next step when it is run again in the same session (a staged minibatch
    the stopped loop left is not trained on)."""
    loop.spy.stop_at = 7
    assert loop._train() == 128 + signal.SIGTERM
    assert_fed_by_the_rule(loop, list(range(1, 8)))
    assert loop.record["mb_count_total"] == 7
    assert not prefetch_threads()
    loop.stop.signal = None
    assert loop._train() is None
    assert_fed_by_the_rule(loop, list(range(1, 46)))


def test_minibatches_are_assembled_in_the_pipeline_s_thread_and_a_failing_one_fails_the_loop_at_its_step(
        loop, monkeypatch):
    real, threads = loop.data.minibatch, set()

    def minibatch(step, batch_size, settings):
        threads.add(threading.current_thread().name)
        if step == 10:
            raise MemoryError("no room for minibatch 10")
        return real(step, batch_size, settings)

    monkeypatch.setattr(loop.data, "minibatch", minibatch)
    with pytest.raises(MemoryError, match="no room for minibatch 10"):
        loop._train()
    assert_fed_by_the_rule(loop, list(range(1, 10)))
    assert loop.record["mb_count_total"] == 9
    assert threads == {THREAD}  # assembled in the pipeline's thread, not the loop's
    assert not prefetch_threads()
