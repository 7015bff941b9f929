"""What a run writes besides its recorder and checkpoints: AF-weights and all-weights files, run info, its plots
(learning curves, early stopping) and TensorBoard HParams (the run's settings and final metrics, and the
experiment's config). Imports no TensorFlow: it works on the session it is given, and writes TensorBoard's protocol
buffers with TensorBoard's own classes.
"""
import glob
import os
import re
import time

from deepnet import run_folder
from deepnet_util import RunError, atomic_open, make_folders, save_json, save_pickle, save_text

AF_VARIABLE = re.compile(r".+/(blend_weights_raw|swish_beta):0")
TRAINABLE_VARIABLES = "trainable_variables"   # TF's graph collection (tf.GraphKeys.TRAINABLE_VARIABLES)


def af_weights_file_content(sess, graph):
    """The original's AF-weights dict: TF variable name -> list of floats, trainable AF variables only."""
    variables = [v for v in graph.get_collection(TRAINABLE_VARIABLES) if AF_VARIABLE.fullmatch(v.name)]
    return {v.name: [float(x) for x in value.ravel()] for v, value in zip(variables, sess.run(variables))}


def save_af_weights(sess, paths, settings, mb):
    """The trainable AF variables in the original's format (no file when none is trainable)."""
    content = af_weights_file_content(sess, sess.graph)
    if content:
        for ext, save in (("pkl", save_pickle), ("json", save_json)):
            save(run_folder.af_weights_path(paths["exp"], settings["spec_name"], settings["run"], mb, ext), content)


def save_all_weights(sess, paths, settings, mb):
    """Every trainable variable of the run's graph, keyed by its TF name (as the original)."""
    variables = sess.graph.get_collection(TRAINABLE_VARIABLES)
    path = run_folder.all_weights_path(paths["exp"], settings["spec_name"], settings["run"], mb)
    save_pickle(path, dict(zip((v.name for v in variables), sess.run(variables))))


def write_run_info(paths, settings, record, status):
    lines = [f"experiment: {settings['experiment_name']}", f"spec: {settings['spec_name']}", f"run: {settings['run']}",
             f"status: {status}", f"training completed: {record['training_completed']}",
             f"test completed: {record['test_completed']}", f"diverged: {record['diverged']}",
             f"minibatches done: {record['mb_count_total']} / {settings['n_minibatches']}",
             f"early-stopping minibatch: {record['early_stopping_mb']}",
             f"test top-1: {record['test_top1']}", "", "settings:"]
    lines += [f"  {key} = {value}" for key, value in sorted(settings.items())]
    save_text(paths["run_info"], "\n".join(lines) + "\n")


def _plot_to(path, draw):
    """Draw a figure and write it to path atomically (a temporary file with a unique name: no link is followed);
    every text is drawn as written, never as math text (a '$' in a name must not break the plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    fig = plt.figure(figsize=(9, 5))
    try:
        draw(fig.gca())
        for text in fig.findobj(Text):
            text.set_parse_math(False)
        fig.tight_layout()
        with atomic_open(path) as handle:
            fig.savefig(handle, format="png", dpi=90)
    finally:
        plt.close(fig)


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
        ax.set(xlabel="minibatch", ylabel="accuracy",
               title=f"early stopping: {record['spec_name']} run {record['run']}")
        ax.legend()
    _plot_to(path, draw)


NOT_HPARAMS = ("path_relative", "experiment_name", "mode", "walltime", "reference")
ALWAYS_SHOWN_HPARAMS = ("af_set", "blend_mode", "network", "optimizer", "lr", "minibatch_size", "seed")
HPARAM_METRICS = {"hparams/test_top1": "test top-1", "hparams/test_top5": "test top-5",
                  "hparams/best_val_top1": "best validation top-1",
                  "hparams/early_stopping_mb": "early-stopping minibatch"}
HPARAMS_CONFIG_SUFFIX = ".hparams_config"


def hparam_values(settings):
    """A run's settings as HParams values: every flag but the bookkeeping ones, lists as text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else
            " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in settings.items() if key not in NOT_HPARAMS}


def log_hparams(writer, settings):
    """The run's HParams session start (once per run: at its first minibatch), on its tf.summary.FileWriter."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    summary = hp.hparams_pb(hparam_values(settings), trial_id=f"{settings['spec_name']}/run_{settings['run']}")
    writer.add_summary(summary.SerializeToString())
    writer.flush()


def log_final_metrics(writer, record):
    """The HParams metrics of a tested run, as scalars at its last minibatch."""
    values = {"hparams/test_top1": record["test_top1"], "hparams/test_top5": record["test_top5"],
              "hparams/early_stopping_mb": record["early_stopping_mb"]}
    if record["settings"]["create_val_set"]:  # without one, the validations ran on the test set
        values["hparams/best_val_top1"] = max(record["val_top1_hist"])
    from tensorboard.compat.proto.summary_pb2 import Summary
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
    writer.add_summary(summary.SerializeToString(), record["mb_count_total"])
    writer.flush()


def write_hparams_config(exp_dir, settings_by_spec):
    """The experiment's HParams config in EXP/0_summaries/: spec_name, the settings that differ between
    the specs, the always-shown ones, and the metrics. Replaces the config written before (the new one is written
    first). OSError naming 0_summaries when it is a symbolic link or a file (nothing is written or deleted there)."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    values = [hparam_values(settings) for settings in settings_by_spec.values()]
    keys = sorted({key for v in values for key in v})
    differ = [key for key in keys if key not in ("spec_name", "run", "seed")
              and len({repr(v.get(key)) for v in values}) > 1]
    shown = list(dict.fromkeys(["spec_name", *differ, *ALWAYS_SHOWN_HPARAMS, "run"]))
    config = hp.hparams_config_pb([hp.HParam(key) for key in shown],
                                  [hp.Metric(tag, display_name=name) for tag, name in HPARAM_METRICS.items()])
    folder = run_folder.summaries_dir(exp_dir)
    make_folders(exp_dir, folder)
    path = os.path.join(folder, f"events.out.tfevents.{int(time.time())}.{os.uname().nodename}"
                                f"{HPARAMS_CONFIG_SUFFIX}")
    write_events(path, [config])
    for before in glob.glob(os.path.join(glob.escape(folder), f"*{HPARAMS_CONFIG_SUFFIX}")):
        if before != path and not os.path.isdir(before):
            os.remove(before)  # a link is removed, not followed
    return shown


def make_tensorboard_folder(paths):
    """Create the run's TensorBoard folder EXP/0_summaries/<spec>_<run>/ with the umask's permissions (TensorFlow
    makes its folders 0755 whatever the umask, which locks the rest of a group out of 0_summaries). A symbolic
    link or a file on the way stops the run in one line (RunError), before TensorFlow writes through it."""
    try:
        make_folders(paths["exp"], paths["summaries"])
    except OSError as err:
        raise RunError(f"{paths['summaries']}: cannot write the TensorBoard summaries there "
                       f"({err.filename}: {err.strerror})") from None


def write_events(path, summaries):
    """An event file of summaries (TensorBoard's protocol buffers) in TensorFlow's record format, written with
    TensorBoard's own record writer (importing no TensorFlow), atomically."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    with atomic_open(path) as handle:
        records = RecordWriter(handle)
        records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        for summary in summaries:
            records.write(Event(wall_time=time.time(), summary=summary).SerializeToString())
