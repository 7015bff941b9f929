"""One run's training loop (Trainer), its checkpoints (Checkpointer) and the evaluation that serves validation and
test alike, with the session settings (thread counts, determinism) and the signals that stop a run cleanly.

Everything random is a pure function of (seed, epoch / step, layer), and a run keeps the thread counts it started
with, so a run resumed from any checkpoint continues exactly as it would have.
"""
import os
import shutil
import signal
import threading
import time

import numpy as np
import psutil

import deepnet_network as net
from deepnet import architectures, datasets, histograms, identity, outputs, pipeline, run_folder, schedule
from deepnet_util import RunError, clock, fsync_folder, remove_path, save_pickle, save_text, tf_error_reason

tf = net.tf

SUMMARY_EVERY = 20  # TensorBoard summaries of the training minibatch, as the original's
EVAL_BATCH = 500   # images per evaluation batch (where the batch does not change the numbers)
STATE_KEPT = 2     # the newest checkpoints that keep the optimizer state: resume, or fall back to the one before


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


def enable_determinism():
    """Same flags and seed give the same numbers: deterministic kernels (seeds are set per graph)."""
    import tensorflow
    tensorflow.config.experimental.enable_op_determinism()


RECORD_LISTS = ("train_loss_hist train_xentropy_hist train_top1_hist train_mb_n_hist val_loss_hist "
                "val_xentropy_hist val_top1_hist val_top5_hist val_apc_hist val_af_weights_hist "
                "val_preact_stats_hist val_mb_n_hist checkpoints val_top1_smoothed test_mb_n_hist").split()


def new_recorder(settings, mbs_per_epoch, data_fingerprint=None, threads=None):
    """A new run's recorder (docs/recorder.md): its settings, data fingerprint and threads, and empty histories."""
    record = {key: [] for key in RECORD_LISTS}
    record.update(experiment_name=settings["experiment_name"], spec_name=settings["spec_name"], run=settings["run"],
                  settings=dict(settings), mbs_per_epoch=mbs_per_epoch, data_fingerprint=data_fingerprint,
                  threads=threads or current_threads(), mb_count_total=0, ep_count_total=0,
                  early_stopping_mb=None, test_loss=None, test_xentropy=None, test_top1=None, test_top5=None,
                  test_apc=None, test_af_weights=None, training_completed=False, test_completed=False,
                  diverged=False, diverged_at_mb=None, activation_kernel=None, activation_kernel_build="",
                  activation_kernel_history=[])
    return record


def per_class_accuracy(predictions, labels, n_classes):
    hits = np.bincount(labels, weights=(predictions == labels), minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes)
    return np.divide(hits, counts, out=np.full(n_classes, np.nan), where=counts > 0)


def evaluation_batches(n_images, settings):
    """The slices a set is evaluated in: EVAL_BATCH images at a time; where inference depends on the batch
    (smcnBN with batch statistics), the original's full minibatches in order, the remainder left out (a set
    smaller than one minibatch: one batch of all)."""
    if not architectures.uses_batch_statistics(settings):
        return [slice(start, min(start + EVAL_BATCH, n_images)) for start in range(0, n_images, EVAL_BATCH)]
    size = settings["minibatch_size"]
    if n_images < size:
        return [slice(0, n_images)]
    return [slice(start, start + size) for start in range(0, n_images - size + 1, size)]


def evaluate(sess, model, images, labels, settings):
    """Loss (with weight decay when on, as the original's), cross-entropy, top-1, top-5, per-class accuracy
    and pre-activation statistics over a whole set (see evaluation_batches)."""
    batches = evaluation_batches(len(images), settings)
    n, totals = batches[-1].stop, np.zeros(4)
    images, labels = images[:n], labels[:n]
    predictions = np.empty(n, np.int64)
    moments = {name: np.zeros(2) for name in model.preact_stats}
    feed_base = {model.inputs.keep_probs: settings["dropout_keep_probs_inference"]}
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
                apc=per_class_accuracy(predictions, labels, datasets.N_CLASSES[settings["task"]]), preact=preact)


class CheckpointUnreadable(Exception):
    """A checkpoint file that cannot be read (truncated, missing, corrupt)."""


def checkpoint_record(folder):
    """The recorder of a checkpoint folder (CheckpointUnreadable if it cannot be read)."""
    record, problem = run_folder.read_record(os.path.join(folder, "recorder.pkl"))
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
        final = run_folder.checkpoint_dir(self.models_dir, mb)
        tmp = os.path.join(self.models_dir, f".tmp_{os.path.basename(final)}_{os.getpid()}")
        os.makedirs(self.models_dir, exist_ok=True)
        remove_path(tmp)  # a leftover of an earlier process with this pid, or a link: never written through
        os.mkdir(tmp)
        try:
            self.state_saver.save(sess, os.path.join(tmp, "state"), write_meta_graph=False, write_state=False)
            if with_model:
                self.model_saver.save(sess, os.path.join(tmp, "model"), write_meta_graph=False,
                                      write_state=False)
            save_pickle(os.path.join(tmp, "recorder.pkl"), record)
            fsync_folder(tmp)
            if os.path.exists(final):
                run_folder.remove_folder(final)
            os.rename(tmp, final)
            fsync_folder(self.models_dir)
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
        found = run_folder.checkpoint_dirs(self.models_dir)
        newest = sorted(found)[-STATE_KEPT:]
        for mb, folder in found.items():
            if mb in newest:
                continue
            if mb not in keep_models:
                run_folder.remove_folder(folder)
            else:
                run_folder.drop_state(folder)


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


class LockLost(RunError):
    """The run's lock file is no longer the one this process holds (deleted with the run folder, or replaced):
    another process may be training the run now, so this one stops and writes nothing more."""


class SummaryWriter:
    """The run's tf.summary.FileWriter, whose events its own thread writes. When that thread fails (a full disk,
    the folder gone), the writer's next call raises its error: here a RunError naming the folder, one line.
    add_histograms makes a step's histograms in a thread of its own while training goes on."""

    def __init__(self, folder):
        self.folder = folder
        self._histograms, self._histogram_error = None, None  # the thread making the last histograms, its error
        try:
            self.writer = tf.summary.FileWriter(folder)
        except tf.errors.OpError as err:
            raise RunError(f"{folder}: cannot write the TensorBoard summaries there ({tf_error_reason(err)})") from None

    def __getattr__(self, name):  # add_summary, add_session_log
        if name.startswith("_") or name == "writer":  # copy/pickle probes, or a writer never made
            raise AttributeError(name)
        return self._guarded(getattr(self.writer, name))

    def _guarded(self, method):
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except (RuntimeError, tf.errors.OpError) as err:
                raise self._not_written(err) from None
        return call

    def _not_written(self, err):
        return RunError(f"{self.folder}: TensorBoard summaries not written ({tf_error_reason(err)}); the checkpoints "
                        "written before are intact: fix the cause and run the same command again to resume")

    def add_histograms(self, arrays, step):
        """The histograms of arrays ({tag: array}) at step, bucketed as TensorFlow's op does (deepnet.histograms) in
        a thread while training goes on; the step's before are finished first. An array with non-finite values
        gets none (the op would stop the run; the loss tells of a divergence)."""
        self._finish_histograms()
        self._histograms = threading.Thread(target=self._write_histograms, args=(arrays, step), name="histograms",
                                            daemon=True)
        self._histograms.start()

    def _write_histograms(self, arrays, step):
        try:
            self._guarded(self._add_histogram_summary)(arrays, step)
        except BaseException as err:  # raised in the training thread, at the writer's next call
            self._histogram_error = err

    def _add_histogram_summary(self, arrays, step):
        values = [tf.Summary.Value(tag=tag, histo=tf.HistogramProto(**histograms.histogram(array)))
                  for tag, array in arrays.items() if np.all(np.isfinite(array))]
        self.writer.add_summary(tf.Summary(value=values), step)

    def _finish_histograms(self):
        if self._histograms is not None:
            self._histograms.join()
            self._histograms = None
        err, self._histogram_error = self._histogram_error, None
        if err is not None:
            raise err

    def flush(self):
        self._finish_histograms()
        self._guarded(self.writer.flush)()

    def close(self):
        try:
            self._finish_histograms()
        finally:
            self._guarded(self.writer.close)()


def no_readable_checkpoint(paths, unreadable):
    return RunError(f"{paths['models']}: no checkpoint can be read ({unreadable}); nothing was deleted. To train the "
                    f"run again from the start, move {paths['run_dir']} away and run the same command")


class Trainer:
    """One run's training loop, validation, checkpoints and final test.

    data_fingerprint and threads identify a new run's data and threads (a resumed run has its own). lock: the
    run's held lock (run_folder.run_lock); before each minibatch's bookkeeping and each write the trainer checks
    that it still holds the run's lock file, else it stops (LockLost) writing nothing more."""

    def __init__(self, settings, paths, run_data, af_init, out, stop, data_fingerprint=None, threads=None,
                 lock=None):
        self.settings, self.paths, self.data, self.out, self.stop = settings, paths, run_data, out, stop
        self.lock = lock
        self.tag = f"{settings['spec_name']}/run {settings['run']}"
        self.data_fingerprint, self.threads = data_fingerprint, threads or current_threads()
        self.n_images = len(run_data.labels)
        self.val_schedule = schedule.validation_mbs(settings)
        self.val_mbs = set(self.val_schedule)
        self.ckpt_mbs = set(schedule.checkpoint_mbs(settings, self.n_images))
        self.af_mbs = schedule.weight_save_mbs(settings["safe_af_ws_n"], settings["n_minibatches"])
        self.all_mbs = schedule.weight_save_mbs(settings["safe_all_ws_n"], settings["n_minibatches"])
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.model = net.build_model(dict(settings, n_classes=datasets.N_CLASSES[settings["task"]]), af_init)
            self.checkpointer = Checkpointer(self.model, paths["models"])
            self.init_op = tf.global_variables_initializer()
        self.graph.finalize()
        outputs.make_tensorboard_folder(paths)  # with the umask's permissions: TensorFlow's would be 0755
        self.sess = tf.Session(graph=self.graph, config=session_config(self.threads))
        try:
            self.writer = SummaryWriter(paths["summaries"])
        except RunError:
            self.sess.close()
            raise
        self.started = time.monotonic()
        self.timing = {"mb": [], "val": []}
        self.status = run_folder.RunStatus(paths, settings)

    def run(self):
        try:
            result = self._run()
        except BaseException as err:
            if not self._lock_problem():  # else the run may be another process's now: its status is not ours
                try:
                    self.status.write(self.record, "failed", f"{type(err).__name__}: {err}")
                except OSError:  # e.g. the full disk that stopped the run: its own error is the one to report
                    pass
            self._close(quietly=True)  # the error that stopped the run is the one to report
            raise
        self._close()
        return result

    def _close(self, quietly=False):
        """Close the summary writer (its last events written) and the session."""
        try:
            self.writer.close()
        except RunError:
            if not quietly:
                raise
        finally:
            self.sess.close()

    def _run(self):
        settings, paths = self.settings, self.paths
        found = run_folder.checkpoint_dirs(paths["models"])
        self.record = None
        if found:
            self.record = self._restore(found)
            self.record["settings"] = identity.settings_as_started(self.record["settings"])
            latest = self.record["mb_count_total"]
            self.record.setdefault("data_fingerprint", self.data_fingerprint)  # runs started before both were
            self.record.setdefault("threads", self.threads)                    # recorded (check_same_data says so)
            self.writer.add_session_log(tf.SessionLog(status=tf.SessionLog.START), global_step=latest)
            self.status.last_checkpoint_mb = latest
            self._note_activation_kernel()
            self.status.write(self.record, "running", f"resumed from minibatch {latest}")
            self.out(f"{self.tag}: resuming from minibatch {latest}")
        else:
            self.record = new_recorder(settings, self.data.mbs_per_epoch, self.data_fingerprint, self.threads)
            self._note_activation_kernel()
            self.status.write(self.record, "running", "started")
            outputs.log_hparams(self.writer, settings)
            self.sess.run(self.init_op)
            self._validate(0)
            self._checkpoint(0)
        run_folder.remove_incomplete_markers(paths)
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
                self.out(f"{self.tag}: note: activations now run on '{kernel}', "
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
                    if schedule.early_stopping_mb(record, self.val_schedule)[0] == mb:
                        self.checkpointer.restore_model(self.sess, folder)
            except CheckpointUnreadable as err:
                earlier = "falling back to the checkpoint before it" if mb > min(found) else "it is the oldest"
                self.out(f"{self.tag}: {err}; {earlier}")
                continue
            for newer in (m for m in found if m > mb):
                run_folder.remove_folder(found[newer])
            return record
        raise no_readable_checkpoint(self.paths, "each one's problem is printed above")

    def _train(self):
        settings, record, stop = self.settings, self.record, self.stop
        session_start_mb = record["mb_count_total"]
        if stop.signal is not None:  # arrived while starting up: the latest checkpoint is current
            return self._interrupted(session_start_mb, stop.signal)
        interval_start = time.monotonic()
        first, batch = record["mb_count_total"] + 1, settings["minibatch_size"]
        with pipeline.Prefetcher(lambda step: self.data.minibatch(step, batch, settings), first,
                                 settings["n_minibatches"]) as minibatches:
            for step, feed, ops in self._feeds(minibatches):
                loss, xentropy, top1 = self._step(step, feed, ops)
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
                    record["training_completed"] = step == settings["n_minibatches"]
                    self._checkpoint(step)
                    if not record["training_completed"] and self._walltime_exceeded(step):
                        return self._leave_incomplete(step)
                if stop.signal is not None:
                    return self._interrupted(step, stop.signal)
        return None

    def _feeds(self, minibatches):
        """(step, feed, ops) for each (step, images, labels) of minibatches: the feed of the step's minibatch or,
        where the model stages its input (on a GPU), the feed and op that stage the next one during this step
        (the first is staged before its step). A minibatch that fails to assemble fails the loop at its step."""
        inputs, staging = self.model.inputs, self.model.inputs.staging
        if staging is None:
            for step, images, labels in minibatches:
                yield step, {inputs.images: images, inputs.labels: labels}, []
            return
        self.sess.run(staging.clear)  # what an earlier loop in this session left staged
        upcoming, failure = next(minibatches, None), None
        if upcoming is not None:
            self.sess.run(staging.put, {staging.images: upcoming[1], staging.labels: upcoming[2]})
        while upcoming is not None:
            step = upcoming[0]
            try:
                upcoming = next(minibatches, None)
            except Exception as err:  # raised once this step has run
                upcoming, failure = None, err
            if upcoming is None:
                yield step, {}, []
            else:
                yield step, {staging.images: upcoming[1], staging.labels: upcoming[2]}, [staging.put]
            if failure is not None:
                raise failure

    def _step(self, step, feed, ops=()):
        """One training step with feed, running ops with it (see _feeds), and with the TensorBoard summaries every
        SUMMARY_EVERY steps (fetched in the same run, histograms made and events written off the step); returns
        its loss, cross-entropy and top-1."""
        model, inputs = self.model, self.model.inputs
        feed = {**feed, inputs.keep_probs: self.settings["dropout_keep_probs"], inputs.training: True,
                inputs.step: step, inputs.lr: schedule.learning_rate(self.settings, step, self.n_images)}
        fetch = [[model.train_op, *ops], model.loss, model.cross_entropy, model.top1]
        summarise = step % SUMMARY_EVERY == 0
        if summarise:
            fetch += [model.summaries, model.histograms]
        results = self.sess.run(fetch, feed)
        self._check_lock()
        if summarise:
            self.writer.add_summary(results[4], step)
            self.writer.add_histograms(results[5], step)
        return tuple(float(value) for value in results[1:4])

    def _lock_problem(self):
        """'' while this process holds the run's lock file (or holds no lock object), else why not."""
        return run_folder.lock_lost(self.lock) if self.lock is not None else ""

    def _check_lock(self):
        """LockLost unless this process still holds the run's lock file (run_folder.lock_lost)."""
        problem = self._lock_problem()
        if problem:
            raise LockLost(f"{self.tag}: {problem} while the run trained: stopped, writing nothing more (another "
                           f"process may train the run now); {self.paths['run_dir']} holds what that process writes")

    def _validate(self, mb):
        settings, record = self.settings, self.record
        began = time.monotonic()
        result = evaluate(self.sess, self.model, self.data.val_images, self.data.val_labels, settings)
        self._check_lock()
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
        settings, record = self.settings, self.record
        n = settings["n_minibatches"]
        train = record["train_top1_hist"][-settings["val_every"]:]
        val = record["val_top1_hist"]
        per_mb = np.mean(self.timing["mb"][-5:]) if self.timing["mb"] else float("nan")
        per_val = np.mean(self.timing["val"][-5:])
        left = (n - mb) * (per_mb if np.isfinite(per_mb) else 0) + \
            len([m for m in self.val_mbs if m > mb]) * per_val
        elapsed = time.monotonic() - self.started
        walltime = clock(settings["walltime"] * 60 - elapsed) if settings["walltime"] else "-"
        rss = psutil.Process().memory_info().rss / 2 ** 30
        train_text = f"{train[-1]:.3f} (mean {np.mean(train):.3f})" if train else "-"
        lr = schedule.learning_rate(settings, max(mb, 1), self.n_images)
        return (f"{self.tag} | mb {mb}/{n} | lr {lr:.2e}"
                f" | train {train_text} | val {val[-1]:.3f} (mean {np.mean(val[-5:]):.3f})"
                f" | {per_mb * 1000:.0f} ms/mb, val {per_val:.1f} s | total {clock(elapsed)}, left {clock(left)}"
                f" | walltime left {walltime} | mem {rss:.2f} GB")

    def _save_weights(self, mb):
        if mb in self.af_mbs:
            outputs.save_af_weights(self.sess, self.paths, self.settings, mb)
        if mb in self.all_mbs:
            outputs.save_all_weights(self.sess, self.paths, self.settings, mb)

    def _checkpoint(self, mb, scheduled=True):
        self._check_lock()
        record = self.record
        if scheduled:
            record["checkpoints"].append(mb)
        self.checkpointer.save(self.sess, record, mb, with_model=scheduled)
        keep = schedule.checkpoints_to_keep(record, self.val_schedule) if record["settings"]["create_val_set"] \
            else set(record["checkpoints"][-1:])
        self.checkpointer.prune(keep)
        save_pickle(self.paths["record"], record)
        self.writer.flush()
        stage = "training" if not record["training_completed"] else "testing"
        outputs.write_run_info(self.paths, self.settings, record, stage)
        self.status.last_checkpoint_mb = mb
        self.status.write(record, "running", stage)
        if self.settings["create_lc_on_the_fly"]:
            outputs.plot_learning_curves(record, self.paths["learning_curves"])

    def _walltime_exceeded(self, mb):
        """Whether the next checkpoint would not fit in -walltime (never with -create_checkpoints False,
        as in the original)."""
        if not self.settings["walltime"] or not self.settings["create_checkpoints"]:
            return False
        upcoming = [m for m in self.ckpt_mbs if m > mb]
        per_mb = np.mean(self.timing["mb"]) if self.timing["mb"] else 0.0
        n_val = len([m for m in self.val_mbs if mb < m <= min(upcoming)])
        per_val = np.mean(self.timing["val"]) if self.timing["val"] else 0.0
        needed = (min(upcoming) - mb) * per_mb + n_val * per_val + 60
        return time.monotonic() - self.started + needed > self.settings["walltime"] * 60

    def _leave_incomplete(self, mb):
        self._check_lock()
        path = run_folder.incomplete_marker(self.paths, mb)
        save_text(path, f"walltime of {self.settings['walltime']} min reached at minibatch {mb}; run the same "
                        "command again to resume from the latest checkpoint\n")
        self.status.write(self.record, "incomplete", "walltime reached")
        self.out(f"{self.tag}: stopping at minibatch {mb} before the walltime "
                 "runs out; run the same command again to resume")
        return 0

    def _interrupted(self, mb, signum):
        self._check_lock()
        if mb not in self.ckpt_mbs:
            self._checkpoint(mb, scheduled=False)
        name = signal.Signals(signum).name
        self.status.write(self.record, "incomplete", name)
        self.out(f"{self.tag}: {name} received; checkpoint written at minibatch "
                 f"{mb}; run the same command again to resume")
        return 128 + signum

    def _diverged(self, mb, loss):
        """The loss of minibatch mb is not finite: training stops, and every validation from mb on counts as
        0, what the original's non-finite model scored there, so early stopping picks among the checkpoints
        before mb and the run is tested from there. A restart before the test ends retrains to mb (exactly)."""
        record = self.record
        record.update(diverged=True, diverged_at_mb=mb)
        n_classes = datasets.N_CLASSES[self.settings["task"]]
        for val_mb in self.val_schedule[len(record["val_mb_n_hist"]):]:
            record["val_mb_n_hist"].append(val_mb)
            for key, value in (("loss", np.nan), ("xentropy", np.nan), ("top1", 0.0), ("top5", 0.0),
                               ("apc", np.zeros(n_classes)), ("preact_stats", {}), ("af_weights", {})):
                record[f"val_{key}_hist"].append(value)
        self.status.write(record, "running", f"diverged at minibatch {mb} (loss {loss}); testing the best "
                                             "checkpoint before it")
        self.out(f"{self.tag}: training diverged at minibatch {mb} (loss {loss}); "
                 "stopped, later validations count as 0, testing the best checkpoint before it")

    def _test(self):
        settings, record, paths = self.settings, self.record, self.paths
        best, smoothed = schedule.early_stopping_mb(record, self.val_schedule)
        folder = run_folder.checkpoint_dirs(paths["models"]).get(best, run_folder.checkpoint_dir(paths["models"], best))
        try:
            self.checkpointer.restore_model(self.sess, folder)
        except CheckpointUnreadable as err:
            raise RunError(f"{err}: the model that early stopping picked cannot be tested; nothing was deleted. To "
                           f"train the run again from the start, move {paths['run_dir']} away") from None
        result = evaluate(self.sess, self.model, self.data.test_images, self.data.test_labels, settings)
        self._check_lock()
        record.update(early_stopping_mb=best, val_top1_smoothed=smoothed, test_mb_n_hist=[best],
                      test_loss=result["loss"], test_xentropy=result["xentropy"], test_top1=result["top1"],
                      test_top5=result["top5"], test_apc=result["apc"],
                      test_af_weights=net.read_af_weights(self.sess, self.model.endpoints), test_completed=True)
        if settings["save_af_weights_at_test_mb"]:
            outputs.save_af_weights(self.sess, paths, settings, best)
        if settings["save_all_weights_at_test_mb"]:
            outputs.save_all_weights(self.sess, paths, settings, best)
        outputs.plot_early_stopping(record, smoothed, paths["early_stopping"])
        if settings["create_lc_on_the_fly"]:
            outputs.plot_learning_curves(record, paths["learning_curves"])
        outputs.log_final_metrics(self.writer, record)  # before the recorder: a kill in between repeats, never loses it
        save_pickle(paths["record"], record)
        outputs.write_run_info(paths, settings, record, "complete" + diverged_note(record))
        run_folder.finish_cleanup(paths, record)
        self.status.write(record, "complete", "complete" + diverged_note(record))
        self.out(test_report(settings, best, result, diverged_note(record)))
        return 0


def diverged_note(record):
    """'' or '; diverged at mb N' for a run whose training diverged."""
    return f"; diverged at mb {record['diverged_at_mb']}" if record.get("diverged") else ""


def test_report(settings, mb, result, note=""):
    """The test's result line (note appended); for cifar10 also the accuracy per class, as the original printed it."""
    line = (f"{settings['spec_name']}/run {settings['run']}: test of the model of minibatch {mb} on {result['n']} test "
            f"images: loss {result['loss']:.4f}, top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}{note}")
    if settings["task"] == "cifar10":
        line += "\n  accuracy per class: " + " | ".join(f"{i}: {acc:.3f}" for i, acc in enumerate(result["apc"], 1))
    return line
