"""One run of the activation-function suite: train (with resume), test, or analyse an experiment.

    python deepnet_main.py -experiment_name demo -spec_name ABU -run 1 -af_set 5_blend5_swish \
        -blend_trainable True -swish_beta_trainable True -n_minibatches 2000

Flags keep the original suite's single-dash names (a double dash works too). Every flag has a default
(the paper's settings), so a run needs only what differs.
"""
import argparse
import math
import re
import sys

from deepnet import architectures, datasets, identity, names
from deepnet_util import UserError, run_cli

# The flags' choices. Importing this module imports neither TensorFlow nor numpy (the supervisor's --status reads
# the flags): the datasets and networks are named where they are defined, the optimizers, schedules and blend modes
# here (tests check they are exactly those deepnet_network, deepnet/schedule.py and deepnet/activations.py know).
TASKS = datasets.TASKS
PREPROCESSINGS = datasets.VARIANTS
NETWORKS = tuple(architectures.ARCHITECTURES)
BN_INFERENCE = architectures.BN_INFERENCE
MODES = ("training", "test", "analysis")
OPTIMIZERS = ("Adam", "SGD", "Momentum", "Nesterov")
LR_SCHEDULES = ("constant", "decay", "linear", "step")
BLEND_MODES = ("unrestricted", "normalized", "posnormed", "absnormed", "softmaxed", "clipnormed")
AF_INITS = ("default", "predefined")

# Bounds on what sizes a run's memory and disk, checked before anything is written.
MAX_MINIBATCHES = 10 ** 8         # -n_minibatches (and -safe_*_ws_n: more saves than minibatches save each one)
MAX_RUN = 2 ** 32 - 1             # -run: the default seed's range; its digits fit every file name (deepnet/names.py)
MAX_WEIGHT_SAVES = 100_000        # AF-weights / all-weights saves of each kind: min(-safe_*_ws_n, -n_minibatches)
MAX_VALIDATIONS = 20_000          # validations (-n_minibatches / -val_every): the recorder keeps each one's results


def whole_number(text):
    """An int flag's value: ASCII digits, optionally after '-' (int() would also read '١' or '1_0')."""
    if not re.fullmatch(r"-?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number (ASCII digits)")
    return int(text)


def real_number(text):
    """A float flag's value, in ASCII (float() would also read '١.٥' or '1_0')."""
    if not text.isascii() or "_" in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (ASCII digits)")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


PARSERS = {int: whole_number, float: real_number}  # FLAGS names the types; the command line is read with these


def boolean(text):
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not a boolean (True/False/yes/no/1/0)")


# (flag, type, default, help[, nargs]) — the whole command line, as data.
FLAGS = [
    ("path_relative", str, "./", "root folder holding 1_data_<task>/ and 3_output_cifar/"),
    ("task", str, "cifar10", f"dataset: {', '.join(TASKS)}"),
    ("preprocessing", str, "ztrans", f"preprocessed variant: {', '.join(PREPROCESSINGS)}"),
    ("network", str, "smcn", f"architecture: {', '.join(NETWORKS)}"),
    ("mode", str, "training", f"{', '.join(MODES)}"),
    ("n_minibatches", int, 60000, "training minibatches"),
    ("experiment_name", str, "default_experiment", "experiment folder under 3_output_cifar/"),
    ("spec_name", str, "default_spec", "spec (setting) name: the run folder is <experiment>/<spec>/run_<run>"),
    ("run", int, 1, "run number"),
    ("minibatch_size", int, 256, "training minibatch size"),
    ("optimizer", str, "Adam", f"{', '.join(OPTIMIZERS)} (momentum 0.9)"),
    ("dropout_keep_probs", float, [0.5], "keep probabilities in training: one for all dropout layers or one each", "+"),
    ("dropout_keep_probs_inference", float, [1.0], "keep probabilities at validation/test", "+"),
    ("lr", float, 0.001, "learning rate"),
    ("lr_schedule_type", str, "constant", f"{', '.join(LR_SCHEDULES)}"),
    ("lr_decay", float, 0.00004, "decay: lr / (1 + lr_decay * minibatch)"),
    ("lr_lin_min", float, 0.0004, "linear: final learning rate"),
    ("lr_lin_steps", int, 60000, "linear: minibatches to reach lr_lin_min"),
    ("lr_step_ep", int, [200, 250, 300], "step: epochs from which the rate is multiplied", "+"),
    ("lr_step_multi", float, [0.1, 0.01, 0.001], "step: lr times the i-th multiplier from the i-th boundary on "
     "(absolute)", "+"),
    ("use_wd", boolean, False, "L2 weight decay on conv and dense weights"),
    ("wd_lambda", float, 0.01, "weight-decay factor (times sum of w^2 / 2)"),
    ("create_val_set", boolean, True, "hold out a validation set (else: validate on test, no early stopping)"),
    ("val_set_fraction", float, 0.05, "validation fraction (rounded to whole minibatches)"),
    ("af_set", str, "1_relu", "activation set: 1_<fn>, 5_blend5_swish or <n>_<f1>+...+<fn>"),
    ("af_weights_init", str, "default", "default (1/n each) or predefined (from -load_af_weights_from)"),
    ("safe_af_ws_n", int, 10, "save the trainable AF weights at round(linspace(1, N, this)) (distinct minibatches)"),
    ("safe_all_ws_n", int, 2, "save all weights at round(linspace(1, N, this)) (distinct minibatches)"),
    ("load_af_weights_from", str, "", "spec whose newest AF-weights file (same run) initialises the blend"),
    ("load_af_weights_experiment", str, "", "experiment holding -load_af_weights_from's files (default: this run's)"),
    ("norm_blendw_at_init", boolean, False, "rescale predefined blend weights to sum 1"),
    ("blend_trainable", boolean, False, "train the blend weights (one function: adaptive scaling)"),
    ("blend_mode", str, "unrestricted", f"{', '.join(BLEND_MODES)} (posnormed is the original's: the same as "
     "normalized; clipnormed clips to [1e-4, 1e3], then normalises)"),
    ("swish_beta_trainable", boolean, False, "train swish's beta"),
    ("walltime", float, 0.0, "minutes this process may run (0: no limit); stops at a checkpoint in time"),
    ("create_checkpoints", boolean, True, "allow stopping at a checkpoint for -walltime (as the original; "
     "checkpoints for early stopping are always written)"),
    ("epochs_between_checkpoints", int, 3, "epochs between checkpoints"),
    ("save_af_weights_at_test_mb", boolean, True, "save AF weights of the tested model"),
    ("save_all_weights_at_test_mb", boolean, True, "save all weights of the tested model"),
    ("create_lc_on_the_fly", boolean, True, "plot learning curves at each checkpoint"),
    ("bn_inference", str, "batch_statistics", f"{', '.join(BN_INFERENCE)}: what batch norm (smcnBN) normalises "
     "with at validation and test (batch statistics: in batches of -minibatch_size, as the original)"),
    ("seed", int, None, "random seed, 0 .. 2**32 - 1 (default: the run number, pairing runs across specs)"),
    ("val_every", int, 20, "validate every this many minibatches"),
    ("reference", str, "relu", "analysis: the spec every other spec is compared with"),
]


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [-h] [-FLAG VALUE ...]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for name, kind, default, text, *nargs in FLAGS:
        p.add_argument(f"-{name}", f"--{name}", dest=name, type=PARSERS.get(kind, kind), default=default, help=text,
                       nargs=nargs[0] if nargs else None, metavar=name.upper())
    return p


def _require(condition, flag, problem):
    if not condition:
        raise UserError(f"-{flag}: {problem}")


def _choice(settings, flag, choices):
    _require(settings[flag] in choices, flag, f"'{settings[flag]}' is not one of {', '.join(choices)}")


def check_flags(settings):
    """Check every setting; returns the settings with derived defaults filled in (UserError if bad)."""
    for flag, choices in (("task", TASKS), ("preprocessing", PREPROCESSINGS), ("network", NETWORKS),
                          ("mode", MODES), ("optimizer", OPTIMIZERS), ("lr_schedule_type", LR_SCHEDULES),
                          ("blend_mode", BLEND_MODES), ("af_weights_init", AF_INITS), ("bn_inference", BN_INFERENCE)):
        _choice(settings, flag, choices)
    for flag in ("experiment_name", "spec_name", "load_af_weights_experiment", "load_af_weights_from", "reference"):
        if flag.startswith("load_af_weights") and not settings[flag]:
            continue  # empty: this run's own experiment / no predefined AF weights
        names.check_name(f"-{flag}", settings[flag])
    names.check_path("-path_relative", settings["path_relative"])
    for flag, low in (("n_minibatches", 1), ("run", 0), ("minibatch_size", 1), ("lr_lin_steps", 1),
                      ("safe_af_ws_n", 0), ("safe_all_ws_n", 0), ("epochs_between_checkpoints", 1),
                      ("val_every", 1)):
        _require(settings[flag] >= low, flag, f"must be at least {low}, got {settings[flag]}")
    _require(settings["n_minibatches"] <= MAX_MINIBATCHES, "n_minibatches",
             f"{settings['n_minibatches']} is beyond any sensible run")
    check_sizes(settings)
    for flag in ("lr", "lr_decay", "lr_lin_min", "wd_lambda", "walltime"):
        _require(math.isfinite(settings[flag]) and settings[flag] >= 0, flag,
                 f"must be a finite number >= 0, got {settings[flag]}")
    _require(settings["lr"] > 0, "lr", "must be positive")
    _require(0 < settings["val_set_fraction"] < 1, "val_set_fraction",
             f"must lie in (0, 1), got {settings['val_set_fraction']}")
    _require(len(settings["lr_step_ep"]) == len(settings["lr_step_multi"]), "lr_step_multi",
             f"{len(settings['lr_step_multi'])} multipliers for {len(settings['lr_step_ep'])} -lr_step_ep epochs")
    _require(all(e >= 0 for e in settings["lr_step_ep"]), "lr_step_ep", "epochs must be >= 0")
    _require(all(math.isfinite(m) and m > 0 for m in settings["lr_step_multi"]), "lr_step_multi", "must be positive")
    settings["seed"] = identity.with_default_seed(settings)["seed"]
    _require(0 <= settings["seed"] < 2 ** 32, "seed",
             f"must lie in 0 .. 2**32 - 1 (default: the -run number), got {settings['seed']}")
    _require(settings["run"] <= MAX_RUN, "run", f"must lie in 0 .. 2**32 - 1, got {settings['run']}")
    from deepnet import activations  # after the cheap checks (it imports numpy)
    try:
        activations.parse_af_set(settings["af_set"])
    except ValueError as err:
        raise UserError(f"-af_set: {err}") from None
    n_dropout = architectures.n_dropout_layers(settings["network"])
    for flag in ("dropout_keep_probs", "dropout_keep_probs_inference"):
        probs = settings[flag]
        _require(all(0 < p <= 1 for p in probs), flag, f"keep probabilities must lie in (0, 1], got {probs}")
        _require(len(probs) in (1, max(n_dropout, 1)), flag,
                 f"give one value or one per dropout layer ({n_dropout} in {settings['network']}), got {len(probs)}")
    if settings["af_weights_init"] == "predefined":
        _require(settings["load_af_weights_from"], "load_af_weights_from", "needed with -af_weights_init predefined")
    return settings


def check_sizes(settings):
    """The settings that size a run's memory and disk are within bounds (UserError if not): each kind of weight
    save (at most one per minibatch) and the validations."""
    from deepnet import schedule  # imports numpy: after the cheap checks
    for flag in ("safe_af_ws_n", "safe_all_ws_n"):
        _require(settings[flag] <= MAX_MINIBATCHES, flag, f"{settings[flag]} is beyond any sensible run")
        saves = schedule.n_weight_saves(settings[flag], settings["n_minibatches"])
        _require(saves <= MAX_WEIGHT_SAVES, flag, f"{saves} saves (one per minibatch at most) are more than "
                 f"{MAX_WEIGHT_SAVES}")
    validations = schedule.n_validations(settings)
    _require(validations <= MAX_VALIDATIONS, "val_every",
             f"{validations} validations of {settings['n_minibatches']} minibatches are more than {MAX_VALIDATIONS}: "
             f"use -val_every {math.ceil(settings['n_minibatches'] / (MAX_VALIDATIONS - 2))} or more")


def main(argv=None):
    settings = check_flags(vars(parser().parse_args(argv)))
    from deepnet import disk  # after the checks (it imports numpy)
    warning = disk.snapshots_warning(settings) if settings["mode"] == "training" else ""
    if warning:
        print(warning, file=sys.stderr)
    if settings["mode"] == "analysis":
        import deepnet_analysis
        from deepnet.run_folder import experiment_dir
        deepnet_analysis.analyse_experiment(experiment_dir(settings), reference=settings["reference"])
        return 0
    import deepnet_task_cifar as task
    if settings["mode"] == "test":
        return task.run_test(settings)
    return task.run_training(settings)


if __name__ == "__main__":
    sys.exit(run_cli(main))
