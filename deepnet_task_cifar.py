"""The CIFAR task of one run: train it (starting, resuming or finishing it), or test its kept model.

    run_training(settings)   -mode training: what to do with the run folder, then the Trainer (deepnet/trainer.py)
    run_test(settings)       -mode test: evaluate the kept model again

A run lives in EXP/<spec>/run_<run>/ (deepnet/run_folder.py). Its checkpoints are folders models/ckpt_mb_<mb>/ that
appear atomically (written under a temporary name, then renamed):
    state.*        model and optimizer variables (the newest two checkpoints keep it: resume, and fall back
                   to the one before when the newest cannot be read)
    model.*        model variables (kept while the checkpoint can still win post-hoc early stopping)
    recorder.pkl   the recorder as of that minibatch; once the run is tested, the kept folder holds the last
                   checkpoint's, from which a lost run recorder is rebuilt by testing again
Everything random is a pure function of (seed, epoch / step, layer): the data split, each epoch's order and the
dropout masks; the run records its data's fingerprint and its thread counts and resumes only on the same data,
with the same flags and the same threads. So a run resumed from any checkpoint continues exactly as it would have.
"""
import os

import deepnet_network as net
from deepnet import activations, data, datasets, identity, run_folder, trainer
from deepnet_util import RunError, RunningElsewhere, UserError, save_pickle

tf = net.tf


def prepare(settings):
    """What can be checked before anything is written: the data are there, the predefined AF weights can be read
    and are fit and finite (UserError if not). Returns the initial AF weights (None: the default)."""
    for path in datasets.data_files(settings):
        if not os.path.isfile(path):
            raise UserError(f"{path}: preprocessed data not found (run deepnet_task_cifar_preprocessing.py --task "
                            f"{settings['task']} --variant {settings['preprocessing']} --root "
                            f"{settings['path_relative']})")
    return activations.initial_af_weights(settings)


def next_step(paths, state):
    """What training does with a run in this state (run_folder.run_state): 'finish' a complete run, 'resume' from a
    checkpoint (a damaged run, too: its recorder is rebuilt; a diverged run that is not tested retrains to its
    divergence, exactly, and is tested), 'refuse' a folder with run info but no checkpoint, or 'start'."""
    if state.name == "complete":
        return "finish"
    if run_folder.checkpoint_dirs(paths["models"]):
        return "resume"
    if os.path.exists(paths["run_info"]):
        return "refuse"
    return "start"


def run_training(settings, out=print):
    """-mode training: train (or resume), then early-stop and test. Returns the process exit status."""
    af_init = prepare(settings)
    paths = run_folder.run_paths(settings)
    trainer.enable_determinism()
    state = run_folder.run_state(paths, read_recorder=True)
    if state.name == "running":
        raise RunningElsewhere(f"{paths['run_dir']}: this run is already running ({state.holder})")
    step = next_step(paths, state)
    if step == "finish":  # a complete run's result stands for the settings it was trained with
        identity.check_same_settings(settings, state.record, complete=True)
    if step == "refuse":  # nothing to do and nothing to write
        return _finished(settings, paths, step, state.record, out)
    if step != "finish":
        n_classes = datasets.N_CLASSES[settings["task"]]
        train_path, test_path = datasets.data_files(settings)
        train, test, fingerprint = data.load_pair(train_path, test_path, n_classes, settings["path_relative"])
        data.check_data_fits(settings, len(train[1]))
        _resume_point(settings, paths, step, fingerprint, len(train[1]), out=lambda line: None)  # refusal: no writes
    with run_folder.run_lock(paths) as lock, trainer.StopRequest() as stop:
        state = run_folder.run_state(paths, read_recorder=True, locked_here=True)  # again, now that it is ours
        step = next_step(paths, state)
        if step in ("finish", "refuse"):
            return _finished(settings, paths, step, state.record, out)
        start, (split, write_split) = _resume_point(settings, paths, step, fingerprint, len(train[1]), out)
        if start is not None:
            _say_record_rebuilt(settings, paths, state, start, out)
        if write_split:
            save_pickle(paths["split"], split)
        run_folder.remove_temporary_files(paths)
        fingerprint["split"] = data.split_fingerprint(split)
        run_data = data.Data(train, test, split, settings["minibatch_size"])
        del train
        return trainer.Trainer(settings, paths, run_data, af_init, out, stop, fingerprint,
                               (start or {}).get("threads"), lock).run()


def _resume_point(settings, paths, step, fingerprint, n_images, out):
    """(the recorder to resume from or None, (split, whether to write it)), checked: the same flags, data and
    split as the run started with (UserError if not), and a readable checkpoint (RunError if none)."""
    start = run_folder.newest_readable_record(paths) if step == "resume" else None
    if step == "resume" and start is None:
        raise trainer.no_readable_checkpoint(paths, "no recorder.pkl can be read")
    if start is not None:
        identity.check_same_settings(settings, start)
        data.check_same_data(settings, start, fingerprint, out)
    recorded = ((start or {}).get("data_fingerprint") or {}).get("split")
    split, write = data.run_split(settings, paths["split"], n_images, recorded)
    if write and recorded and os.path.exists(paths["split"]):
        out(f"{settings['spec_name']}/run {settings['run']}: {paths['split']} is unreadable; rebuilt from -seed "
            f"{settings['seed']}")
    return start, (split, write)


def _say_record_rebuilt(settings, paths, state, start, out):
    """A line when the run's recorder is missing or unreadable although the run has a checkpoint."""
    if state.record is not None:
        return
    tested = start["training_completed"] or state.status.get("state") == "complete"
    if tested or os.path.exists(paths["record"]):  # tested: also a diverged run, tested before it trained to the end
        out(f"{settings['spec_name']}/run {settings['run']}: {state.problem}; it is rebuilt from the newest "
            "checkpoint" + (", testing the run again" if tested else ""))


def _finished(settings, paths, step, record, out):
    """A complete run: its files tidied, its status.json complete, one line; a folder to refuse: UserError."""
    if step == "refuse":
        raise UserError(f"{paths['run_dir']}: has run info but no checkpoint; refusing to overwrite it "
                        "(move it away or choose another -experiment_name/-run)")
    run_folder.finish_cleanup(paths, record)
    status = run_folder.RunStatus(paths, settings)
    if status.previous.get("state") != "complete":  # the test finished, its status line did not
        status.write(record, "complete", "complete" + trainer.diverged_note(record))
    out(f"{settings['spec_name']}/run {settings['run']}: already complete (test top-1 {record['test_top1']:.4f} at "
        f"mb {record['early_stopping_mb']}{trainer.diverged_note(record)}); nothing to do")
    return 0


def run_test(settings, out=print):
    """-mode test: evaluate the kept model (or the newest checkpoint) of spec/run on the test set, with the
    run's threads; UserError if the test set is not the one the run started with."""
    paths = run_folder.run_paths(settings)
    found = run_folder.checkpoint_dirs(paths["models"])
    with_model = {mb: f for mb, f in found.items() if os.path.isfile(os.path.join(f, "model.index"))}
    if not with_model:
        raise UserError(f"{paths['models']}: no saved model for {settings['spec_name']} run {settings['run']}")
    record = run_folder.read_record(paths["record"])[0] or run_folder.newest_readable_record(paths) or {}
    mb = record["early_stopping_mb"] if record.get("early_stopping_mb") in with_model else max(with_model)
    data.check_one_build(*datasets.data_files(settings))
    test_path = datasets.data_files(settings)[1]
    test_images, test_labels = data.load_dataset(test_path, datasets.N_CLASSES[settings["task"]])
    if record:
        fingerprint = data.dataset_fingerprint(test_path, test_images, test_labels, settings["path_relative"])
        data.check_same_data(settings, record, {"test": fingerprint}, out)
    graph = tf.Graph()
    with graph.as_default():
        model = net.build_model(dict(settings, n_classes=datasets.N_CLASSES[settings["task"]]))
        saver = tf.train.Saver(model.model_variables)
    threads = record.get("threads") or trainer.current_threads()
    with tf.Session(graph=graph, config=trainer.session_config(threads)) as sess:
        try:
            trainer.restore(saver, sess, with_model[mb], "model")
        except trainer.CheckpointUnreadable as err:
            raise RunError(str(err)) from None
        result = trainer.evaluate(sess, model, test_images, test_labels, settings)
    out(trainer.test_report(settings, mb, result))
    return 0
