"""Run a sweep of deepnet_main.py runs (specs x runs) locally or on a SLURM / SGE cluster, then analyse it.

    python deepnet_supervisor.py --list-sweeps                     # the paper's seven sweeps and the demo
    python deepnet_supervisor.py --sweep demo --workers 2          # 2 specs x 2 short runs, then the analysis
    python deepnet_supervisor.py --specs smcn_adam_c10_relu,smcn_adam_c10_ABU_TERIS --runs 1-10 --workers 4
    python deepnet_supervisor.py --sweep paper_smcnBN --backend slurm   # write + submit a job array
    python deepnet_supervisor.py --dry-run --workers 2             # every command, then runs and wall-time estimate
    python deepnet_supervisor.py --status --workers 4              # where is the sweep? (reads, writes nothing)

Edit the settings, specs and sweeps below; the command line picks a sweep, a subset and overrides.
Every run's command carries every setting, so a run folder is reproducible from its log alone.
Complete runs (a diverged run is complete once tested from its best checkpoint before the divergence) are
skipped; unfinished ones are started again and resume from their newest checkpoint. So running the same
command again after an interruption, a failure or a cluster time limit continues the sweep, and once every
run is complete it only (re)writes the analysis.
A run whose lock another live process holds (an earlier supervisor's orphan, a cluster job) is not started:
the sweep waits for it (or, with --no-wait, leaves it) and analyses only once every run has ended.
Local runs get SIGTERM when their supervisor dies, so they checkpoint instead of training on unnoticed.
The predefined-initialisation sweep starts from the AF weights the paper sweep learned: it refuses to start
(one line, nothing written) until those runs are complete.
"""
import argparse
import ctypes
import heapq
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

from deepnet_util import RunLock, UserError, load_json_object, load_pickle, run_cli, save_text

# ---------------------------------------------------------------- settings (every deepnet_main.py flag)

DATA = {
    "path_relative": "./",          # holds 1_data_<task>/ and 3_output_cifar/ (relative: to this folder)
    "task": "cifar10",
    "preprocessing": "ztrans",
    "create_val_set": True,
    "val_set_fraction": 0.05,
}
NETWORK_AND_ACTIVATION = {
    "network": "smcn",
    "bn_inference": "batch_statistics",   # smcnBN at validation and test: the batch's statistics or moving_averages
    "af_set": "1_relu",
    "af_weights_init": "default",
    "load_af_weights_from": "",
    "load_af_weights_experiment": "",     # "": the run's own experiment
    "norm_blendw_at_init": False,
    "blend_trainable": False,
    "blend_mode": "unrestricted",
    "swish_beta_trainable": False,
}
OPTIMISATION = {
    "optimizer": "Adam",
    "minibatch_size": 256,
    "dropout_keep_probs": [0.5],
    "dropout_keep_probs_inference": [1.0],
    "use_wd": False,
    "wd_lambda": 0.01,
    "seed": None,                   # None: the run number (pairs runs across specs)
}
SCHEDULE = {
    "n_minibatches": 60000,
    "lr": 0.001,
    "lr_schedule_type": "constant",
    "lr_decay": 0.00004,
    "lr_lin_min": 0.0004,
    "lr_lin_steps": 60000,
    "lr_step_ep": [200, 250, 300],
    "lr_step_multi": [0.1, 0.01, 0.001],
    "walltime": 0,                  # minutes per process, 0 = none (cluster backends set it from the job time)
}
VALIDATION_AND_CHECKPOINTS = {
    "val_every": 20,
    "create_checkpoints": True,
    "epochs_between_checkpoints": 3,
}
SAVING = {
    "safe_af_ws_n": 10,
    "safe_all_ws_n": 2,
    "save_af_weights_at_test_mb": True,
    "save_all_weights_at_test_mb": True,
    "create_lc_on_the_fly": True,
}
ANALYSIS = {
    "reference": "relu",            # the spec every other spec is compared with
}
SETTINGS = {**DATA, **NETWORK_AND_ACTIVATION, **OPTIMISATION, **SCHEDULE, **VALIDATION_AND_CHECKPOINTS,
            **SAVING, **ANALYSIS}

# ---------------------------------------------------------------- specs: name -> the settings it overrides

def activation(af_set, trainable=False, beta_trainable=False, blend_mode="unrestricted"):
    """A spec's activation settings: the function set, whether its blend weights and Swish's beta train, and
    the blend mode."""
    return {"af_set": af_set, "blend_trainable": trainable, "swish_beta_trainable": beta_trainable,
            "blend_mode": blend_mode}


# The paper's 17 activation specs, as the original scheduler's get_command maps a spec name's ending to settings
# (ac28c20:2_sched/advanced_scheduler.py); its spec names are '<network>_<optimizer>_<task>_<ending>'.
PAPER_ACTIVATIONS = {
    "I": activation("1_linu"),
    "alpha_I": activation("1_linu", trainable=True),
    "relu": activation("1_relu"),
    "alpha_relu": activation("1_relu", trainable=True),
    "tanh": activation("1_tanh"),
    "alpha_tanh": activation("1_tanh", trainable=True),
    "elu": activation("1_jelu"),
    "alpha_elu": activation("1_jelu", trainable=True),
    "selu": activation("1_selu"),
    "alpha_selu": activation("1_selu", trainable=True),
    "swish": activation("1_jswish", beta_trainable=True),
    "alpha_swish": activation("1_jswish", trainable=True, beta_trainable=True),
    "ABU_TERIS": activation("5_blend5_swish", True, True, "unrestricted"),
    "ABU_S_TERIS": activation("5_blend5_swish", True, True, "softmaxed"),
    "ABU_N_TERIS": activation("5_blend5_swish", True, True, "normalized"),
    "ABU_A_TERIS": activation("5_blend5_swish", True, True, "absnormed"),
    "ABU_P_TERIS": activation("5_blend5_swish", True, True, "posnormed"),   # the original's: = normalized
}

# The predefined-initialisation study (the scheduler's p_ variant): a spec '<base>_<variant>' starts from the AF
# weights that the main sweep's spec <base> learned in the run of the same number (its newest AF-weights file).
PREDEFINED_VARIANTS = {
    "pre": {"af_weights_init": "predefined"},
    "pre_notrain": {"af_weights_init": "predefined", "blend_trainable": False, "swish_beta_trainable": False},
    "prenorm": {"af_weights_init": "predefined", "norm_blendw_at_init": True},
    "prenorm_notrain": {"af_weights_init": "predefined", "norm_blendw_at_init": True, "blend_trainable": False,
                        "swish_beta_trainable": False},
}
PREDEFINED_SPECS = (  # (base, variant) in the scheduler's order
    ("alpha_relu", "pre_notrain"), ("alpha_tanh", "pre_notrain"), ("alpha_elu", "pre_notrain"),
    ("ABU_TERIS", "pre_notrain"), ("alpha_relu", "pre"), ("alpha_tanh", "pre"), ("alpha_elu", "pre"),
    ("ABU_TERIS", "pre"), ("ABU_TERIS", "prenorm_notrain"), ("ABU_TERIS", "prenorm"),
    ("ABU_S_TERIS", "pre_notrain"), ("ABU_S_TERIS", "pre"), ("ABU_N_TERIS", "pre_notrain"), ("ABU_N_TERIS", "pre"),
    ("ABU_A_TERIS", "pre_notrain"), ("ABU_A_TERIS", "pre"), ("ABU_P_TERIS", "pre_notrain"), ("ABU_P_TERIS", "pre"),
)


def paper_specs(prefix):
    """The 17 activation specs named as the scheduler names them, e.g. smcn_adam_c10_relu."""
    return {prefix + ending: dict(settings) for ending, settings in PAPER_ACTIVATIONS.items()}


def predefined_specs(prefix):
    """The 18 predefined-initialisation specs, e.g. smcn_adam_c10_ABU_TERIS_prenorm_notrain."""
    return {f"{prefix}{base}_{variant}": {**PAPER_ACTIVATIONS[base], "load_af_weights_from": prefix + base,
                                          **PREDEFINED_VARIANTS[variant]}
            for base, variant in PREDEFINED_SPECS}


DEMO_SPECS = {"relu": activation("1_relu"), "ABU": activation("5_blend5_swish", True, True)}

# ---------------------------------------------------------------- sweeps: experiment, specs, runs, settings

# The scheduler's default_spec: the base of every paper sweep. Its walltime (89 minutes, for its 90-minute grid
# jobs) is left to the backend (local runs: none; cluster jobs: CLUSTER's time limit): a run resumes exactly, so
# where its sessions end does not change its numbers.
SCHEDULER_DEFAULTS = {
    "task": "cifar10", "preprocessing": "ztrans", "network": "smcn", "n_minibatches": 60000,
    "minibatch_size": 256, "dropout_keep_probs": [0.5], "dropout_keep_probs_inference": [1.0], "optimizer": "Adam",
    "lr": 0.001, "lr_schedule_type": "constant", "lr_decay": 0.00004, "lr_lin_min": 0.0004, "lr_lin_steps": 60000,
    "lr_step_ep": [200, 250, 300], "lr_step_multi": [0.1, 0.01, 0.001], "use_wd": False, "wd_lambda": 0.01,
    "create_val_set": True, "val_set_fraction": 0.05, "af_set": "1_linu", "af_weights_init": "default",
    "load_af_weights_from": "none", "norm_blendw_at_init": False, "safe_af_ws_n": 60, "safe_all_ws_n": 2,
    "blend_trainable": False, "blend_mode": "unrestricted", "swish_beta_trainable": False,
    "create_checkpoints": True, "epochs_between_checkpoints": 8, "save_af_weights_at_test_mb": True,
    "save_all_weights_at_test_mb": True, "create_lc_on_the_fly": True,
}
# The scheduler's '_sgdm_' specs (its "lr_lin_step" is argparse's abbreviation of -lr_lin_steps).
MOMENTUM = {"optimizer": "Momentum", "lr": 0.01, "lr_schedule_type": "linear", "lr_lin_min": 0.0004,
            "lr_lin_steps": 60000}


def paper_sweep(experiment, prefix, reproduces, changes=(), specs=None, reference="relu"):
    """One of the paper's sweeps: the scheduler's experiment and specs, runs 1-30, its defaults plus changes."""
    return {"experiment": experiment, "specs": specs or paper_specs(prefix), "runs": "1-30",
            "settings": {**SCHEDULER_DEFAULTS, **dict(changes), "reference": prefix + reference},
            "reproduces": reproduces, "synthetic_fallback": False}   # real CIFAR or nothing


SWEEPS = {
    "paper": paper_sweep("ASC_main", "smcn_adam_c10_", "the paper's main experiment: smcn, Adam, CIFAR-10"),
    "paper_smcnLin": paper_sweep("b_ASC_main", "smcnb_adam_c10_", "smcnLin (no dropout, average pooling), Adam, "
                                 "CIFAR-10", {"network": "smcnLin"}),
    "paper_smcnDeep": paper_sweep("c_ASC_main", "smcnc_adam_c10_", "smcnDeep (10 activated layers), Adam, CIFAR-10",
                                  {"network": "smcnDeep"}),
    "paper_smcnBN": paper_sweep("d_ASC_main", "smcnd_adam_c10_", "smcnBN (batch norm, no dropout), Adam, "
                                "CIFAR-10", {"network": "smcnBN"}),
    "paper_cifar100": paper_sweep("c100_ASC_main", "smcn_adam_c100_", "smcn, Adam, CIFAR-100",
                                  {"task": "cifar100"}),
    "paper_momentum": paper_sweep("m_ASC_main", "smcn_sgdm_c10_", "smcn, Momentum (lr 0.01 linear to 4e-4 over "
                                  "60,000 minibatches), CIFAR-10", MOMENTUM),
    "paper_predefined": paper_sweep("p_ASC_main", "smcn_adam_c10_", "the predefined-initialisation study: smcn, "
                                    "Adam, CIFAR-10, starting from the AF weights that sweep paper learned (run "
                                    "paper first)", {"load_af_weights_experiment": "ASC_main"},
                                    predefined_specs("smcn_adam_c10_"), reference="alpha_relu_pre_notrain"),
    "demo": {                          # 2 x 2 short runs: a few minutes with 2 workers on 2 CPU cores
        "experiment": "demo_smcn_cifar10",
        "specs": DEMO_SPECS,
        "runs": "1-2",
        "settings": {"n_minibatches": 250, "minibatch_size": 40, "val_every": 25, "val_set_fraction": 0.02,
                     "epochs_between_checkpoints": 1, "dropout_keep_probs": [0.5], "safe_af_ws_n": 4},
        "reproduces": "a few minutes' demo: relu against ABU, 250 short minibatches (synthetic data without a "
                      "network)",
        "synthetic_fallback": True,    # no network: a synthetic CIFAR-format dataset instead
    },
}

# ---------------------------------------------------------------- cluster resources (slurm / sge backends)

CLUSTER = {
    "python": None,                 # the interpreter on the nodes; None: this one (sys.executable)
    "cpus": 4,                      # cores per run
    "mem": "16G",                   # slurm: per job; sge: per slot (h_vmem)
    "time_minutes": 24 * 60,        # job time limit; runs get -walltime a bit below it
    "max_parallel": 0,              # tasks running at once (0: no limit)
    "slurm_partition": "",
    "slurm_extra": [],              # more '#SBATCH' option lines, e.g. ["--gres=gpu:1"]
    "sge_queue": "",
    "sge_parallel_env": "smp",
    "sge_extra": [],                # more '#$' option lines, e.g. ["-l gpu=1"]
}
WALLTIME_MARGIN = (10, 0.05)        # minutes kept free below the job time: max(10, 5 % of it)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
PER_RUN_FLAGS = ("mode", "experiment_name", "spec_name", "run")
NOT_PASSED = ("reference",)         # analysis-only settings, not given to training runs
POLL_S = 0.5
STOP_TIMEOUT_S = 180                # a stopped run gets this long to write its checkpoint
ELSEWHERE_POLL_S = 5                # how often the locks of runs running elsewhere are checked
WAIT_REPORT_S = 600                 # a line about the runs still running elsewhere this often
PR_SET_PDEATHSIG = 1                # linux/prctl.h


# ---------------------------------------------------------------- settings from the command line

def flag_table():
    """deepnet_main's flags: name -> (type, nargs); deepnet_main imports nothing heavy."""
    import deepnet_main
    return {name: (kind, rest[0] if rest else None) for name, kind, _, _, *rest in deepnet_main.FLAGS}


def convert(key, text, flags):
    """A --set value in the type deepnet_main expects for key."""
    kind, nargs = flags[key]
    parts = text.replace(",", " ").split() if nargs else [text]
    try:
        values = [None if kind is int and part == "None" else kind(part) for part in parts]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise UserError(f"--set {key}={text}: {err}") from None
    if nargs and not values:
        raise UserError(f"--set {key}={text}: needs at least one value")
    return values if nargs else values[0]


def parse_overrides(pairs):
    """['key=value', ...] -> {key: typed value}; unknown keys are a UserError."""
    flags, overrides = flag_table(), {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise UserError(f"--set {pair}: expected key=value")
        if key not in SETTINGS:
            raise UserError(f"--set {key}: unknown setting (known: {', '.join(SETTINGS)})")
        overrides[key] = convert(key, text, flags)
    return overrides


def parse_runs(text):
    """'1-3,7' -> [1, 2, 3, 7] (sorted, unique)."""
    runs = set()
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise UserError(f"--runs {text}: '{part}' is not a run number or a range like 1-30") from None
        if first < 0 or last < first:
            raise UserError(f"--runs {text}: '{part}' is not a range of run numbers >= 0")
        runs.update(range(first, last + 1))
    return sorted(runs)


def select_specs(sweep, text):
    """The sweep's specs, or the comma-separated subset (unknown names are a UserError)."""
    specs = SWEEPS[sweep]["specs"]
    if not text:
        return dict(specs)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in specs]
    if unknown or not names:
        raise UserError(f"--specs: unknown spec(s) {', '.join(unknown) or repr(text)} in sweep '{sweep}' "
                        f"(known: {', '.join(specs)})")
    return {name: specs[name] for name in dict.fromkeys(names)}


# ---------------------------------------------------------------- runs and their commands

def run_settings(base, spec_settings, overrides, experiment, spec, run):
    """Settings of one run: base < sweep < spec < --set, plus the per-run flags."""
    settings = {**base, **spec_settings, **overrides}
    settings.update(mode="training", experiment_name=experiment, spec_name=spec, run=run)
    return settings


def flag_value(value):
    if isinstance(value, bool):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def command(settings, python=None):
    """The deepnet_main.py command line (a list) of one run; seed None is left to deepnet_main."""
    args = [python or sys.executable, "deepnet_main.py"]
    for key in (*PER_RUN_FLAGS, *SETTINGS):
        if key in NOT_PASSED or settings.get(key) is None:
            continue
        args += [f"-{key}", *flag_value(settings[key])]
    return args


def check_with_main(args):
    """Parse and validate a command with deepnet_main's own parser (UserError if it would refuse it)."""
    import deepnet_main
    parser = deepnet_main.parser()
    parser.error = lambda message: (_ for _ in ()).throw(UserError(message))
    deepnet_main.validate(vars(parser.parse_args(args[2:])))


def resolve(path):
    """A -path_relative as the runs see it: relative paths are relative to this folder."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_DIR, path))


def experiment_dir(settings):
    return os.path.join(resolve(settings["path_relative"]), "3_output_cifar", settings["experiment_name"])


def run_dir(settings):
    return os.path.join(experiment_dir(settings), settings["spec_name"], f"run_{settings['run']}")


def log_path(settings):
    spec, run = settings["spec_name"], settings["run"]
    return os.path.join(run_dir(settings), f"log_{spec}_run_{run}.txt")


def record_path(settings):
    spec, run = settings["spec_name"], settings["run"]
    return os.path.join(run_dir(settings), f"record_{spec}_run_{run}.pkl")


def status_path(settings):
    return os.path.join(run_dir(settings), "status.json")


def lock_path(settings):
    return os.path.join(run_dir(settings), ".lock")


def run_name(settings):
    return f"{settings['spec_name']} run {settings['run']}"


def lock_holder(settings):
    """Who holds the run's lock, e.g. 'process 12 on node3' ('' if nobody, None if the lock cannot be read)."""
    try:
        return RunLock.holder(lock_path(settings))
    except OSError:
        return None


def run_state(settings):
    """'complete', 'damaged' (complete, but its recorder is missing or not the size written) or 'todo', from the
    run's status.json (older runs: its recorder). A run that diverged is tested from its best checkpoint before
    the divergence, so it ends complete; one that diverged untested (an older suite) is 'todo': run again, it
    retrains to the divergence and is tested."""
    status = load_json_object(status_path(settings))
    if status is not None and status.get("state") == "complete" and not record_intact(settings, status):
        return "damaged"
    if status is not None:
        return "complete" if status.get("state") == "complete" else "todo"
    path = record_path(settings)
    if not os.path.isfile(path):
        return "todo"
    try:
        record = load_pickle(path)
    except UserError:
        return "todo"
    return "complete" if isinstance(record, dict) and record.get("test_completed") else "todo"


def diverged_at(settings):
    """The minibatch at which a complete run diverged (status.json), else None."""
    return number((load_json_object(status_path(settings)) or {}).get("diverged_at_mb"))


def record_intact(settings, status):
    """Whether a complete run's recorder exists with the size its status.json gives (a stat, no reading)."""
    try:
        size = os.path.getsize(record_path(settings))
    except OSError:
        return False
    return status.get("record_bytes") in (None, size)


def plan(args):
    """Every run of the selection: a list of settings dicts (UserError on bad input)."""
    sweep = SWEEPS[args.sweep]
    specs = select_specs(args.sweep, args.specs)
    runs = parse_runs(args.runs or sweep["runs"])
    overrides = parse_overrides(args.set or [])
    experiment = args.experiment or sweep["experiment"]
    base = {**SETTINGS, **sweep["settings"]}
    return [run_settings(base, spec_settings, overrides, experiment, spec, run)
            for spec, spec_settings in specs.items() for run in runs]


def split_by_state(runs, out):
    """(runs to start, number complete); complete runs are reported, not started."""
    states = [run_state(s) for s in runs]
    todo = [s for s, state in zip(runs, states) if state in ("todo", "damaged")]
    complete = states.count("complete")
    for settings in (s for s, state in zip(runs, states) if state == "damaged"):
        out(f"{run_name(settings)}: complete, but its recorder {record_path(settings)} is missing or damaged: "
            "rerunning it rebuilds the recorder from its last checkpoint")
    if complete:
        out(f"{complete} of {len(runs)} runs already complete: skipped")
    return todo, complete


def split_running_elsewhere(todo, out):
    """(runs free to start, [(settings, holder)] of runs whose lock another live process holds)."""
    free, elsewhere = [], []
    for settings in todo:
        holder = lock_holder(settings)
        if holder:
            out(f"{run_name(settings)}: running elsewhere ({holder})")
            elsewhere.append((settings, holder))
        else:
            free.append(settings)
    return free, elsewhere


# ---------------------------------------------------------------- predefined AF weights: the sweep they come from

def af_weight_source(settings):
    """The run whose AF weights a predefined-init run starts from (its settings), or None."""
    if settings["af_weights_init"] != "predefined":
        return None
    return dict(settings, experiment_name=settings["load_af_weights_experiment"] or settings["experiment_name"],
                spec_name=settings["load_af_weights_from"])


def missing_af_weights(runs):
    """(sources needed, sources missing) of the runs' predefined AF weights, each (experiment folder, spec, run):
    a source counts once its run is complete and has an AF-weights file. TensorFlow is imported only when some
    run has such a source."""
    sources = {(experiment_dir(source), source["spec_name"], source["run"]): source
               for source in filter(None, map(af_weight_source, runs))}
    if not sources:
        return set(), set()
    import deepnet_network as net
    missing = {key for key, source in sources.items()
               if run_state(source) != "complete" or net.newest_af_weights_file(*key) is None}
    return set(sources), missing


def af_weights_problem(runs):
    """None, or one line naming the sweep to run first and how many AF-weights files are missing."""
    needed, missing = missing_af_weights([s for s in runs if run_state(s) != "complete"])
    if not missing:
        return None
    folders = sorted({folder for folder, _, _ in missing})
    first = [f"--sweep {name}" for name, sweep in SWEEPS.items()
             if any(os.path.basename(folder) == sweep["experiment"] for folder in folders)]
    return (f"{len(missing)} of the {len(needed)} AF-weights files these runs start from are missing (or their run "
            f"is not complete) in {', '.join(os.path.join(f, '0_af_weights') for f in folders)}: run "
            f"{' and '.join(first) or 'those runs'} first")


# ---------------------------------------------------------------- --dry-run: the wall-time estimate

ESTIMATE_BUDGET_S = 60          # --dry-run times training steps for at most about this long in all
ESTIMATE_STEPS = 5              # timed training steps per network and activation kind (after an untimed one)
CIFAR_IMAGES = (50000, 10000)   # training and test images of CIFAR-10 and CIFAR-100


def timing_key(settings):
    """What sets a run's step time: network, classes and whether its activation blends several functions."""
    blend = int(settings["af_set"].split("_", 1)[0]) > 1
    return settings["network"], settings["task"], "blend" if blend else "1 function"


def time_steps(settings, threads, deadline, steps=ESTIMATE_STEPS, timer=time.perf_counter):
    """(seconds per training step, seconds per inference image) of the run's graph on random images, with
    `threads` threads: `steps` timed steps, or fewer (at least one) once timer() passes deadline."""
    import numpy as np
    import deepnet_network as net
    from deepnet_task_cifar import N_CLASSES
    tf, size, n_classes = net.tf, settings["minibatch_size"], N_CLASSES[settings["task"]]
    graph = tf.Graph()
    with graph.as_default():
        seed = settings["run"] if settings["seed"] is None else settings["seed"]
        model = net.build_model(dict(settings, n_classes=n_classes, seed=seed))
        init = tf.global_variables_initializer()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(size, 32, 32, 3)).astype(np.float32)
    data = {model.inputs.images: images, model.inputs.labels: rng.integers(0, n_classes, size)}
    train = {**data, model.inputs.keep_probs: settings["dropout_keep_probs"], model.inputs.training: True,
             model.inputs.step: 1, model.inputs.lr: settings["lr"]}
    infer = {**data, model.inputs.keep_probs: settings["dropout_keep_probs_inference"]}
    config = tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=2)
    with tf.Session(graph=graph, config=config) as sess:
        sess.run(init)
        sess.run(model.train_op, train)  # the first runs of a graph pay for its set-up: untimed
        sess.run(model.top1, infer)
        seconds = []
        while not seconds or (len(seconds) < steps and timer() < deadline):
            began = timer()
            sess.run(model.train_op, train)
            seconds.append(timer() - began)
        began = timer()
        sess.run(model.top1, infer)
        inference = timer() - began
    return float(np.median(seconds)), inference / size


def measure(todo, workers, budget_s=ESTIMATE_BUDGET_S, timer=time.perf_counter):
    """{timing_key: (step s, inference s per image)} for the runs, each timed with a worker's share of the cores,
    within about budget_s in all."""
    groups = {}
    for settings in todo:
        groups.setdefault(timing_key(settings), settings)
    threads = max(1, (os.cpu_count() or 1) // workers)
    timings, began = {}, timer()
    for i, (key, settings) in enumerate(groups.items()):
        deadline = began + budget_s * (i + 1) / len(groups)
        timings[key] = time_steps(settings, threads, deadline, timer=timer)
    return timings


def minibatches_left(settings):
    """Minibatches a run still has to train: all, less those up to its newest checkpoint."""
    status = load_json_object(status_path(settings)) or {}
    return settings["n_minibatches"] - min(number(status.get("last_checkpoint_mb")) or 0, settings["n_minibatches"])


def run_seconds(settings, step_s, image_s, left):
    """Expected seconds of a run with `left` minibatches to go: its steps, its validations still to come (the
    validation split of CIFAR's 50,000 training images, or the test set without one) and its test."""
    from deepnet_task_cifar import validation_mbs, validation_size
    n_train, n_test = CIFAR_IMAGES
    val_images = validation_size(n_train, settings["val_set_fraction"], settings["minibatch_size"]) \
        if settings["create_val_set"] else n_test
    done = settings["n_minibatches"] - left
    n_validations = sum(mb > done for mb in validation_mbs(settings)) + (done == 0)
    return left * step_s + (n_validations * val_images + n_test) * image_s


def estimate_line(todo, timings, workers):
    """The dry run's last line: runs, minibatches in all and the wall time with `workers` workers."""
    left = [minibatches_left(settings) for settings in todo]
    seconds = [run_seconds(settings, *timings[timing_key(settings)], mbs) for settings, mbs in zip(todo, left)]
    per_step = ", ".join(f"{network} {task} {kind} {1000 * step:.0f} ms" for (network, task, kind), (step, _)
                         in timings.items())
    return (f"{len(todo)} runs, {sum(left):,} minibatches in all; estimated wall time "
            f"{clock(finish_time([], seconds, workers))} with --workers {workers} on this machine "
            f"(per training step: {per_step or 'nothing timed'})")


# ---------------------------------------------------------------- data

def ensure_data(settings, synthetic_fallback, out=print):
    """Make sure the preprocessed data of the runs exist: download if not; for demos fall back to synthetic."""
    import deepnet_task_cifar_preprocessing as prep
    root, task, variant = resolve(settings["path_relative"]), settings["task"], settings["preprocessing"]
    train, test = prep.output_paths(root, task, variant)
    if os.path.isfile(train) and os.path.isfile(test):
        if "synthetic" in read_text(prep.sidecar_path(train)):
            out(f"note: {prep.task_dir(root, task)} holds synthetic data; results say nothing about real {task}")
        return
    base = [sys.executable, "deepnet_task_cifar_preprocessing.py", "--task", task, "--variant", variant,
            "--root", root]
    out(f"preprocessed {task} ({variant}) not found under {root}: downloading and preprocessing it")
    failure = run_quietly(base + ["--download"])
    if failure is None:
        return
    if not synthetic_fallback:
        raise UserError(f"{task} download or preprocessing failed ({failure}); get the data with "
                        f"{shlex.join(base[1:] + ['--source', 'PATH'])}")
    out(f"download of {task} failed, so a synthetic {task}-format dataset is used instead: these results "
        f"say nothing about real {task} ({failure})")
    failure = run_quietly(base + ["--synthetic"])
    if failure is not None:
        raise UserError(f"writing the synthetic dataset failed: {failure}")


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def run_quietly(args):
    """Run a helper script; None if it succeeded, else its last output line."""
    result = subprocess.run(args, cwd=REPO_DIR, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = (result.stderr + result.stdout).strip().splitlines()
    return lines[-1].removeprefix("error: ") if lines else f"exit status {result.returncode}"


# ---------------------------------------------------------------- the activation kernel

def check_activation_kernel(out=print):
    """Build (or find in the cache) the fused activation kernel once, before the runs start, and say in one line
    when the runs cannot use it. Returns 'fused' or 'plain: <why>' (deepnet_network.kernel_state())."""
    result = subprocess.run([sys.executable, "deepnet_network.py"], cwd=REPO_DIR, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode not in (0, 1) or not lines or not lines[-1].startswith("activation kernel: "):
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        out(f"warning: could not check the fused activation kernel ({why}); each run records what it used")
        return f"plain: unknown ({why})"
    state = lines[-1].removeprefix("activation kernel: ").split("; ")[0] if result.returncode == 0 \
        else lines[-1].removeprefix("activation kernel: ")
    if state.startswith("plain: a GPU"):
        out(f"note: activation kernel {state}")
    elif state != "fused":
        out(f"warning: activation kernel {state}; ABU runs will take about 2x as long (the plain composition of "
            "TensorFlow ops, same results to ~1e-5)")
    return state


# ---------------------------------------------------------------- local backend

def child_environment(workers):
    """Each run gets an equal share of the cores (unless the caller set the thread counts)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env.setdefault(name, threads)
    env.setdefault("TF_NUM_INTEROP_THREADS", "1" if threads == "1" else "2")
    return env


def launch(settings, env):
    """Start one run; its stdout and stderr are appended to its log file. Returns (process, log, the log's
    size before this launch wrote to it)."""
    path = log_path(settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "ab")
    offset = log.seek(0, os.SEEK_END)
    args = command(settings)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} deepnet_supervisor: {shlex.join(args)}\n".encode())
    log.flush()
    return start_process(args, log, env), log, offset


def start_process(args, log, env):
    """Popen a worker in its own session (the terminal's Ctrl-C reaches only the supervisor, which stops the
    workers) that gets SIGTERM when the supervisor dies, so it checkpoints instead of training on unnoticed."""
    return subprocess.Popen(args, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, preexec_fn=die_with_parent())


def die_with_parent(signum=signal.SIGTERM):
    """A preexec_fn: the child gets signum when this process dies (Linux prctl; None where there is none).

    Linux sends it when the thread that started the child ends: start workers from the main thread.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm():
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(int(signum)))
        if os.getppid() != parent:      # the supervisor died before prctl took effect
            os.kill(os.getpid(), signum)
    return arm


def clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def finish_time(busy, pending, workers):
    """Seconds until every run has ended: each busy run holds a worker for its remaining seconds; pending
    runs (their expected seconds, in launch order) each take the worker that frees first."""
    free_at = list(busy) + [0.0] * max(workers - len(busy), 0)
    heapq.heapify(free_at)
    for seconds in pending:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return max(free_at, default=0.0)


def log_since(path, offset):
    """The log's text from byte offset on ('' if it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def locked_elsewhere(settings, returncode, offset=0):
    """The holder ('process P on HOST') when a run exited because another process runs it, else ''.

    deepnet_main exits 2 with '...: this run is already running (HOLDER)' then; the lock may be free again by
    the time the exit is seen, and the other process may have written to the same log since, so the lines
    this launch added to the log (from offset on) are searched for that refusal."""
    if returncode != 2:
        return ""
    holder = lock_holder(settings)
    if holder:
        return holder
    found = re.findall(r"this run is already running \((.*)\)$", log_since(log_path(settings), offset), re.M)
    return found[-1] if found else ""


def outcome(settings, returncode):
    """('complete' | 'incomplete' | 'diverged' | 'failed', text) after a run's process ended."""
    if run_state(settings) == "complete":
        mb = diverged_at(settings)
        return ("complete", "complete") if mb is None else ("diverged", f"complete, diverged at mb {mb}")
    if returncode == 0:
        return "incomplete", "stopped before the end (walltime?); run the sweep again to resume"
    if returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        return "incomplete", (f"stopped by {signal.Signals(returncode - 128).name} after writing a checkpoint; "
                              "run the sweep again to resume")
    return "failed", f"FAILED (exit status {returncode}), log: {log_path(settings)}"


class LocalPool:
    """Runs the given runs with at most `workers` processes at once.

    Runs another process holds (elsewhere: [(settings, holder)]) are not started; with wait they are
    watched until they end, then counted (complete, diverged) or queued to resume here.
    """

    def __init__(self, runs, workers, out=print, elsewhere=(), wait=True):
        self.pending, self.workers, self.out = list(runs), workers, out
        self.elsewhere, self.wait = list(elsewhere), wait
        self.total, self.done, self.running = len(runs) + len(self.elsewhere), 0, {}
        self.counts = {"complete": 0, "incomplete": 0, "diverged": 0, "failed": 0}
        self.durations = []
        self.env = child_environment(workers)
        self.elsewhere_checked = self.wait_reported = time.monotonic()

    def run(self):
        """Returns the outcome counts; Ctrl-C / SIGTERM stop the children (they checkpoint) and re-raise."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while self.pending or self.running or (self.wait and self.elsewhere):
                self._fill()
                reaped = self._reap()
                if not (reaped or self._check_elsewhere()):
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop_all()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.counts

    def _fill(self):
        while self.pending and len(self.running) < self.workers:
            settings = self.pending.pop(0)
            proc, log, offset = launch(settings, self.env)
            self.running[proc] = (settings, log, time.monotonic(), offset)

    def _reap(self):
        finished = [proc for proc in self.running if proc.poll() is not None]
        for proc in finished:
            settings, log, began, offset = self.running.pop(proc)
            log.close()
            holder = locked_elsewhere(settings, proc.returncode, offset)
            if holder:                  # it lost the race for the lock: not a failure
                self.out(f"{run_name(settings)}: running elsewhere ({holder})")
                self.elsewhere.append((settings, holder))
                continue
            kind, text = outcome(settings, proc.returncode)
            seconds = time.monotonic() - began
            self._count(settings, kind, f"{text} in {clock(seconds)}", seconds)
        return finished

    def _check_elsewhere(self):
        """Count or queue the runs running elsewhere that have ended; now and then a line about the others."""
        now = time.monotonic()
        if not self.elsewhere or now - self.elsewhere_checked < ELSEWHERE_POLL_S:
            return []
        self.elsewhere_checked = now
        ended = [item for item in self.elsewhere if not lock_holder(item[0])]
        for item in ended:
            self.elsewhere.remove(item)
            settings = item[0]
            state = run_state(settings)
            if state in ("todo", "damaged"):
                self.out(f"{run_name(settings)}: ended elsewhere unfinished; resuming it here")
                self.pending.append(settings)
            else:
                kind, text = outcome(settings, 0)
                self._count(settings, kind, f"{text} (ran elsewhere)")
        if self.elsewhere and now - self.wait_reported >= WAIT_REPORT_S:
            self.wait_reported = now
            self.out(f"waiting for {len(self.elsewhere)} run(s) running elsewhere: "
                     + ", ".join(f"{run_name(s)} ({holder})" for s, holder in self.elsewhere))
        return ended

    def _count(self, settings, kind, text, seconds=None):
        self.counts[kind] += 1
        self.done += 1
        if seconds is not None:
            self.durations.append(seconds)
        eta = clock(self._eta()) if self.durations else "unknown"
        also = f" (+ {len(self.elsewhere)} running elsewhere)" if self.elsewhere else ""
        self.out(f"[{self.done}/{self.total}] {run_name(settings)}: {text} | failures {self.counts['failed']} "
                 f"| ETA {eta}{also}")

    def _eta(self):
        """Mean run time: running runs need the rest of it, waiting runs take the first free worker."""
        mean = sum(self.durations) / len(self.durations)
        now = time.monotonic()
        busy = [max(mean - (now - began), 0) for _, _, began, _ in self.running.values()]
        return finish_time(busy, [mean] * len(self.pending), self.workers)

    def _stop_all(self):
        self.out(f"interrupted: stopping {len(self.running)} running run(s); they write a checkpoint "
                 "and resume when the sweep is started again")
        for proc in self.running:
            proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        try:
            for proc in self.running:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            for proc in self.running:
                if proc.poll() is None:
                    proc.kill()
        for proc, (_, log, _, _) in self.running.items():
            proc.wait()
            log.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_local(todo, workers, out=print, elsewhere=(), wait=True):
    """Run the runs (and with wait, wait for those running elsewhere); returns the outcome counts."""
    if not todo and not (wait and elsewhere):
        return {"complete": 0, "incomplete": 0, "diverged": 0, "failed": 0}
    if todo:
        out(f"running {len(todo)} run(s) with {workers} worker(s); logs: <run folder>/log_<spec>_run_<run>.txt")
    if wait and elsewhere:
        out(f"waiting for {len(elsewhere)} run(s) running elsewhere to end (--no-wait leaves them)")
    pool = LocalPool(todo, workers, out, elsewhere, wait)
    counts = pool.run()
    left = f", {len(pool.elsewhere)} still running elsewhere" if pool.elsewhere else ""
    out(f"finished: {counts['complete']} complete, {counts['failed']} failed, {counts['incomplete']} "
        f"incomplete, {counts['diverged']} diverged{left}")
    return counts


def analyse(settings, out=print):
    """The experiment's analysis, in this process; False if it could not run."""
    import deepnet_analysis
    try:
        deepnet_analysis.analyse_experiment(experiment_dir(settings), reference=settings["reference"], out=out)
    except UserError as err:
        out(f"analysis: {err}")
        return False
    return True


# ---------------------------------------------------------------- --status (reads the run folders, writes nothing)

STATES = ("complete", "running", "incomplete", "failed", "not started")
LEFT_TO_RUN = ("running", "incomplete", "failed", "not started")


def status_from_recorder(settings):
    """status.json's fields from the recorder of a run that has no status.json (older runs), or None.

    The run folder's recorder is saved at every checkpoint: its mb_count_total is the newest checkpoint."""
    path = record_path(settings)
    if not os.path.isfile(path):
        return None
    try:
        record = load_pickle(path)
    except UserError:
        record = None
    if not isinstance(record, dict):
        return {"state": "incomplete", "message": "unreadable recorder"}
    state = "complete" if record.get("test_completed") else "diverged" if record.get("diverged") else "incomplete"
    return {"state": state, "mb": record.get("mb_count_total"), "diverged_at_mb": record.get("diverged_at_mb"),
            "n_minibatches": (record.get("settings") or {}).get("n_minibatches"),
            "val_top1": (record.get("val_top1_hist") or [None])[-1], "test_top1": record.get("test_top1"),
            "last_checkpoint_mb": record.get("mb_count_total"),
            "message": f"diverged at minibatch {record.get('diverged_at_mb')}" if state == "diverged" else ""}


def on_which_machine(holder, host):
    """'process 12 on node3' -> 'process 12 on node3 (this machine)' or '... (another machine)'."""
    where = "this machine" if holder.rpartition(" on ")[2] == host else "another machine"
    return f"{holder} ({where})"


def number(value):
    """value if it is a number (status files are read as they are), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_status(settings, host):
    """One row of --status: spec, run, state, mb, n, val, test, seconds, resume_mb, detail."""
    status = load_json_object(status_path(settings)) or status_from_recorder(settings) or {}
    holder = lock_holder(settings)
    checkpoint_mb = number(status.get("last_checkpoint_mb"))
    row = {"spec": settings["spec_name"], "run": settings["run"], "mb": number(status.get("mb")) or 0,
           "n": number(status.get("n_minibatches")) or settings["n_minibatches"],
           "val": number(status.get("val_top1")), "test": None, "seconds": number(status.get("train_seconds")),
           "resume_mb": checkpoint_mb or 0, "detail": "", "kernel": status.get("activation_kernel")}
    state, message = status.get("state"), str(status.get("message") or "")
    checkpoint = "no checkpoint" if checkpoint_mb is None else f"last checkpoint mb {checkpoint_mb}"
    writer = f"process {status.get('pid')} on {status.get('host')}"
    if holder:
        row.update(state="running", detail=on_which_machine(holder, host))
    elif not status:
        log = log_path(settings)
        row.update(state="not started", detail=f"no status file; its log may say why: {log}"
                   if os.path.isfile(log) else "")
    elif state == "running" and holder is None:
        row.update(state="running", detail=f"{writer}, says status.json (the lock is not readable here)")
    elif state == "running":
        row.update(state="incomplete", detail=f"{writer} ended without a word; {checkpoint}")
    elif state == "complete":
        diverged = number(status.get("diverged_at_mb"))
        row.update(state="complete", test=number(status.get("test_top1")),
                   detail="" if diverged is None else f"diverged at mb {diverged}")
    elif state == "failed":
        row.update(state=state, detail=message or state)
    elif state == "diverged":  # under an older suite, untested: a sweep resumes it, and it is tested
        row.update(state="incomplete", detail=f"{message or 'diverged'}, not tested; the sweep retrains it to there "
                                              "and tests the best checkpoint before it")
    else:
        unknown = "" if state == "incomplete" else f"; unknown state {state!r} in status.json"
        row.update(state="incomplete", detail=checkpoint + (f"; {message}" if message else "") + unknown)
    return row


def accuracy(value):
    return "-" if value is None else f"{value:.4f}"


def status_table(rows):
    """The rows as aligned text lines, one per run."""
    header = ("spec", "run", "state", "minibatches", "val top-1", "test top-1", "kernel", "details")
    cells = [(r["spec"], str(r["run"]), r["state"], f"{r['mb']}/{r['n']}", accuracy(r["val"]), accuracy(r["test"]),
              str(r["kernel"] or "-").split(":")[0], r["detail"]) for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]
    return [("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1]).rstrip()
            for line in [header, *cells]]


def status_eta(rows, workers):
    """The ETA line: the measured seconds per minibatch times each unfinished run's minibatches left; running
    runs hold a worker until they end, the others take the first free worker (see finish_time)."""
    left = [r for r in rows if r["state"] in LEFT_TO_RUN]
    if not left:
        return "nothing left to run"
    timed = [r for r in rows if r["state"] == "complete" and r["seconds"] and r["mb"]]
    source = f"{len(timed)} complete run(s)"
    if not timed:
        timed = [r for r in rows if r["seconds"] and r["mb"]]
        source = f"{len(timed)} unfinished run(s) so far"
    if not timed:
        return "ETA unknown: no run has recorded its training time yet"
    per_mb = sum(r["seconds"] for r in timed) / sum(r["mb"] for r in timed)
    busy = [max(r["n"] - r["mb"], 0) for r in left if r["state"] == "running"]
    waiting = [max(r["n"] - r["resume_mb"], 0) for r in left if r["state"] != "running"]
    slots = max(workers, len(busy))
    seconds = finish_time([mb * per_mb for mb in busy], [mb * per_mb for mb in waiting], slots)
    more = f" (one per running run; --workers {workers})" if slots > workers else ""
    return (f"ETA {clock(seconds)} with {slots} workers{more}: {per_mb * 1000:.1f} ms per minibatch measured on "
            f"{source}, {sum(busy) + sum(waiting)} minibatches left, running runs keep their worker and the others "
            "take the first free one")


def kernel_counts(rows):
    """{'fused' or 'plain: <why>': number of runs} over the runs that recorded their activation kernel."""
    return Counter(row["kernel"] for row in rows if row["kernel"])


def print_status(runs, workers, out=print):
    """The --status report: a row per run, counts per state, the ETA; returns 0."""
    host = os.uname().nodename
    rows = [run_status(settings, host) for settings in runs]
    for line in status_table(rows):
        out(line)
    counts = {state: 0 for state in STATES}
    for row in rows:
        counts[row["state"]] += 1
    texts = {state: f"{counts[state]} {state}" for state in STATES}
    diverged = sum(row["state"] == "complete" and row["detail"].startswith("diverged") for row in rows)
    if diverged:
        texts["complete"] += f" ({diverged} diverged)"
    out(f"{len(rows)} runs: " + ", ".join(texts.values()))
    kernels = kernel_counts(rows)
    if kernels:
        out("activation kernel: " + "; ".join(f"{kernel} in {n} run(s)" for kernel, n in kernels.items()))
    out(status_eta(rows, workers))
    return 0


# ---------------------------------------------------------------- cluster backends

SUBMITTERS = {"slurm": "sbatch", "sge": "qsub"}
TASK_ID_VARIABLE = {"slurm": "SLURM_ARRAY_TASK_ID", "sge": "SGE_TASK_ID"}


def cluster_walltime(cluster):
    """-walltime (minutes) for runs in a job of cluster['time_minutes']."""
    minutes = cluster["time_minutes"]
    return max(1, minutes - max(WALLTIME_MARGIN[0], int(minutes * WALLTIME_MARGIN[1])))


def task_lines(todo, cluster):
    """One tab-separated line per task: spec, run, log file, the shell-quoted command."""
    python = cluster["python"] or sys.executable
    lines = []
    for settings in todo:
        settings = dict(settings, walltime=cluster_walltime(cluster))
        fields = [settings["spec_name"], str(settings["run"]), log_path(settings),
                  shlex.join(command(settings, python))]
        lines.append("\t".join(fields))
    return lines


def slurm_time(minutes):
    days, rest = divmod(int(minutes), 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def slurm_header(name, n_tasks, jobs_dir, cluster):
    limit = f"%{cluster['max_parallel']}" if cluster["max_parallel"] else ""
    lines = [f"#SBATCH --job-name={name}", f"#SBATCH --array=1-{n_tasks}{limit}",
             f"#SBATCH --cpus-per-task={cluster['cpus']}", f"#SBATCH --mem={cluster['mem']}",
             f"#SBATCH --time={slurm_time(cluster['time_minutes'])}",
             f"#SBATCH --output={os.path.join(jobs_dir, 'slurm_%A_%a.out')}"]
    if cluster["slurm_partition"]:
        lines.append(f"#SBATCH --partition={cluster['slurm_partition']}")
    return lines + [f"#SBATCH {extra}" for extra in cluster["slurm_extra"]]


def sge_header(name, n_tasks, jobs_dir, cluster):
    minutes = int(cluster["time_minutes"])
    lines = [f"#$ -N {name}", f"#$ -t 1-{n_tasks}", "#$ -S /bin/bash", "#$ -j y", f"#$ -o {jobs_dir}/",
             f"#$ -pe {cluster['sge_parallel_env']} {cluster['cpus']}",
             f"#$ -l h_rt={minutes // 60:02d}:{minutes % 60:02d}:00,h_vmem={cluster['mem']}"]
    if cluster["max_parallel"]:
        lines.append(f"#$ -tc {cluster['max_parallel']}")
    if cluster["sge_queue"]:
        lines.append(f"#$ -q {cluster['sge_queue']}")
    return lines + [f"#$ {extra}" for extra in cluster["sge_extra"]]


def job_script(backend, name, tasks_file, n_tasks, jobs_dir, cluster):
    """A bash job-array script: task i runs line i of tasks_file, appending to that run's log."""
    header = (slurm_header if backend == "slurm" else sge_header)(name, n_tasks, jobs_dir, cluster)
    task_id = TASK_ID_VARIABLE[backend]
    body = [
        "set -u",
        f"export OMP_NUM_THREADS={cluster['cpus']} TF_NUM_INTRAOP_THREADS={cluster['cpus']} PYTHONUNBUFFERED=1",
        f"line=$(sed -n \"${{{task_id}}}p\" {shlex.quote(tasks_file)})",
        "IFS=$'\\t' read -r spec run log cmd <<< \"$line\"",
        "mkdir -p \"$(dirname \"$log\")\"",
        f"cd {shlex.quote(REPO_DIR)}",
        "echo \"=== $(date '+%Y-%m-%d %H:%M:%S') task ${" + task_id + "} on $(hostname): $cmd\" >> \"$log\"",
        "eval \"$cmd\" >> \"$log\" 2>&1",
    ]
    return "\n".join(["#!/bin/bash", *header, "", "# Runs stop at a checkpoint before the job's time limit "
                      "(-walltime) and resume when started again:", "# re-run the same deepnet_supervisor.py "
                      "command to submit the unfinished runs (complete ones are skipped).", *body]) + "\n"


def write_jobs(backend, todo, experiment, exp_dir, cluster):
    """Write EXP/0_jobs/<experiment>_<backend>_<time>_tasks.tsv and its job script; returns the script path.

    Each submission gets its own pair of files, so a queued array never reads a newer task list.
    """
    jobs_dir = os.path.join(exp_dir, "0_jobs")
    stem = os.path.join(jobs_dir, f"{experiment}_{backend}_{time.strftime('%Y%m%d-%H%M%S')}")
    tasks_file = f"{stem}_tasks.tsv"
    save_text(tasks_file, "\n".join(task_lines(todo, cluster)) + "\n")
    script = f"{stem}.sh"
    save_text(script, job_script(backend, experiment, tasks_file, len(todo), jobs_dir, cluster))
    os.chmod(script, 0o755)
    return script


def submit(backend, script, out=print):
    result = subprocess.run([SUBMITTERS[backend], script], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"{SUBMITTERS[backend]} {script} failed: {message[-1] if message else result.returncode}")
    out(result.stdout.strip())


def check_submitter(args):
    submitter = SUBMITTERS.get(args.backend)
    if submitter and not args.dry_run and shutil.which(submitter) is None:
        raise UserError(f"--backend {args.backend}: '{submitter}' not found on PATH (is this a {args.backend} "
                        "login node?); --dry-run writes the job script without submitting")


def run_cluster(args, runs, todo, out=print):
    submitter = SUBMITTERS[args.backend]
    script = write_jobs(args.backend, todo, runs[0]["experiment_name"], experiment_dir(runs[0]), CLUSTER)
    if args.dry_run:
        out(f"wrote {script} ({len(todo)} tasks); submit it with: {submitter} {script}")
        return 0
    submit(args.backend, script, out)
    out(f"submitted {len(todo)} tasks ({script}); once they have all ended, run this command again: it "
        "resubmits unfinished runs (they resume from their checkpoints) or, when all are complete, writes "
        "the analysis")
    return 0


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default="paper", help=f"one of {', '.join(SWEEPS)} (default paper)")
    p.add_argument("--experiment", help="experiment name (default: the sweep's)")
    p.add_argument("--specs", help="comma-separated subset of the sweep's specs")
    p.add_argument("--runs", help="run numbers: ranges and lists, e.g. 1-30 or 1,4,7-9 (default: the sweep's)")
    p.add_argument("--workers", default="1", help="local backend: runs at once (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting for every run (repeatable), e.g. --set n_minibatches=1000")
    p.add_argument("--backend", default="local", help="local, slurm or sge (default local)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands (local) or write the job script (slurm/sge); run nothing")
    p.add_argument("--no-analysis", action="store_true", help="do not analyse the experiment at the end")
    p.add_argument("--no-wait", action="store_true",
                   help="local backend: leave runs that another process is running (default: wait for them, "
                        "resume those that end unfinished, then analyse)")
    p.add_argument("--status", action="store_true",
                   help="print the state of every run of the selection, counts and an ETA for --workers "
                        "(reads the run folders, writes nothing)")
    p.add_argument("--list-sweeps", action="store_true", help="print one line per sweep: name, tab, description")
    p.error = lambda message: (_ for _ in ()).throw(UserError(message))
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.sweep not in SWEEPS:
        raise UserError(f"--sweep {args.sweep}: unknown sweep (known: {', '.join(SWEEPS)})")
    if args.backend not in ("local", *SUBMITTERS):
        raise UserError(f"--backend {args.backend}: must be local, slurm or sge")
    if not args.workers.isdigit() or int(args.workers) < 1:
        raise UserError(f"--workers {args.workers}: must be a whole number >= 1")
    args.workers = int(args.workers)


def sweep_line(name):
    """NAME<TAB>specs x runs: what the sweep reproduces (its experiment)."""
    sweep = SWEEPS[name]
    return (f"{name}\t{len(sweep['specs'])} specs × {len(parse_runs(sweep['runs']))} runs: {sweep['reproduces']} "
            f"(experiment {sweep['experiment']})")


def main(argv=None, out=print):
    args = parse_args(argv)
    if args.list_sweeps:
        for name in SWEEPS:
            out(sweep_line(name))
        return 0
    if args.status:
        return print_status(plan(args), args.workers, out)
    check_submitter(args)
    runs = plan(args)
    for settings in runs:
        check_with_main(command(settings))
    to_stderr = lambda line: print(line, file=sys.stderr)  # noqa: E731
    problem = af_weights_problem(runs)
    if problem and not args.dry_run:
        raise UserError(f"--sweep {args.sweep}: {problem}")
    if problem:
        to_stderr(f"warning: {problem}")
    if args.dry_run and args.backend == "local":
        todo, _ = split_by_state(runs, to_stderr)
        todo, _ = split_running_elsewhere(todo, to_stderr)
        for settings in todo:
            out(shlex.join(command(settings)))
        out(estimate_line(todo, measure(todo, args.workers), args.workers))
        return 0
    try:
        return sweep(args, runs, out)
    except KeyboardInterrupt:
        out("sweep interrupted; run the same command again to continue")
        return 130


def sweep(args, runs, out=print):
    """Prepare the data, run or submit the unfinished runs, analyse once every run has ended; returns the
    exit status."""
    todo, _ = split_by_state(runs, out)
    todo, elsewhere = split_running_elsewhere(todo, out)
    may_run_here = todo + [settings for settings, _ in elsewhere]
    if may_run_here and not args.dry_run:
        for settings in {(s["path_relative"], s["task"], s["preprocessing"]): s for s in may_run_here}.values():
            ensure_data(settings, SWEEPS[args.sweep]["synthetic_fallback"], out)
    if args.backend != "local":
        if not todo and elsewhere:
            out(f"nothing to submit: {len(elsewhere)} run(s) still running elsewhere; run this command again "
                "once they have ended")
            return 0
        if not todo:
            out("every run is complete")
            return 0 if args.no_analysis or args.dry_run or analyse(runs[0], out) else 1
        return run_cluster(args, runs, todo, out)
    if todo:
        check_activation_kernel(out)
    counts = run_local(todo, args.workers, out, elsewhere, wait=not args.no_wait)
    still_running = [run_name(settings) for settings in runs if lock_holder(settings)]
    if still_running:
        out(f"analysis skipped: {len(still_running)} run(s) still running elsewhere ({', '.join(still_running)});"
            " run this command again once they have ended")
        return 1
    analysed = args.no_analysis or analyse(runs[0], out)
    return 0 if analysed and not (counts["failed"] or counts["incomplete"]) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
