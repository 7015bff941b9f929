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
import os
import re
import shlex
import sys

from deepnet import cluster, commands, identity, local, names, run_folder, status
from deepnet_util import UserError, run_cli

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


# ---------------------------------------------------------------- settings from the command line

MAX_RUNS = 10000                    # runs in one selection (specs x run numbers); the paper's sweeps hold 510-540


def parse_overrides(pairs):
    """['key=value', ...] -> {key: typed value}; unknown keys, and names or paths that break deepnet/names.py's
    rule, are a UserError."""
    flags, overrides = commands.flag_table(), {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise UserError(f"--set {commands.echoed(pair)}: expected key=value")
        if key not in SETTINGS:
            raise UserError(f"--set {commands.echoed(key)}: unknown setting (known: {', '.join(SETTINGS)})")
        overrides[key] = commands.convert(key, text, flags)
        problem = commands.setting_problem(key, overrides[key])
        if problem:
            raise UserError(f"--set {key}={commands.echoed(text)}: {problem}")
    return overrides


def run_ranges(text):
    """'1-3,7' -> [(1, 3), (7, 7)]: each part's first and last run number (UserError naming a bad part)."""
    ranges = []
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise UserError(f"--runs {commands.echoed(text)}: {names.shown(part)} is not a run number or a range "
                            "like 1-30") from None
        if first < 0 or last < first:
            raise UserError(f"--runs {commands.echoed(text)}: {names.shown(part)} is not a range of run numbers "
                            ">= 0")
        ranges.append((first, last))
    return ranges


def parse_runs(text):
    """'1-3,7' -> [1, 2, 3, 7] (sorted, unique); more than MAX_RUNS run numbers are refused before any list is
    built."""
    ranges = run_ranges(text)
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_RUNS:
        raise UserError(f"--runs {commands.echoed(text)}: {count:,} run numbers, more than the {MAX_RUNS:,} one "
                        "sweep may hold")
    return sorted({run for first, last in ranges for run in range(first, last + 1)})


def select_specs(sweep, text):
    """The sweep's specs, or the comma-separated subset (unknown names are a UserError)."""
    specs = SWEEPS[sweep]["specs"]
    if not text:
        return dict(specs)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in specs]
    if unknown or not chosen:
        shown = ", ".join(map(commands.echoed, unknown)) or commands.echoed(text)
        raise UserError(f"--specs: unknown spec(s) {shown} in sweep '{sweep}' (known: {', '.join(specs)})")
    return {name: specs[name] for name in dict.fromkeys(chosen)}


# ---------------------------------------------------------------- the runs of a selection and their state

def run_settings(base, spec_settings, overrides, experiment, spec, run):
    """Settings of one run: base < sweep < spec < --set, plus the per-run flags."""
    settings = {**base, **spec_settings, **overrides}
    settings.update(mode="training", experiment_name=experiment, spec_name=spec, run=run)
    return settings


def plan(args):
    """Every run of the selection: a list of settings dicts (UserError on bad input, such as a name or path that
    breaks deepnet/names.py's rule, typed or in the sweep)."""
    sweep = SWEEPS[args.sweep]
    if args.experiment is not None:
        names.check_name("--experiment", args.experiment)
    specs = select_specs(args.sweep, args.specs)
    runs = parse_runs(args.runs or sweep["runs"])
    if len(specs) * len(runs) > MAX_RUNS:
        raise UserError(f"--runs {commands.echoed(args.runs or sweep['runs'])}: {len(specs)} specs x {len(runs):,} "
                        f"run numbers = {len(specs) * len(runs):,} runs, more than the {MAX_RUNS:,} one sweep may hold")
    overrides = parse_overrides(args.set or [])
    experiment = args.experiment or sweep["experiment"]
    base = {**SETTINGS, **sweep["settings"]}
    for spec, spec_settings in specs.items():
        commands.check_names(run_settings(base, spec_settings, overrides, experiment, spec, 0), f"--sweep {args.sweep}")
    return [run_settings(base, spec_settings, overrides, experiment, spec, run)
            for spec, spec_settings in specs.items() for run in runs]


def split_by_state(runs, out):
    """(runs to start, [(settings, holder)] of runs another live process trains), by run_folder.run_state: complete
    runs are skipped (one line counts them), damaged ones started again to rebuild their recorder."""
    states = [run_folder.run_state(commands.run_paths(settings)) for settings in runs]
    for settings, state in zip(runs, states):
        if state.name == "damaged":
            out(f"{commands.run_name(settings)}: complete, but its recorder {commands.run_paths(settings)['record']} "
                "is missing or damaged: rerunning it rebuilds the recorder from its last checkpoint")
    complete = sum(state.name == "complete" for state in states)
    if complete:
        out(f"{complete} of {len(runs)} runs already complete: skipped")
    elsewhere = [(settings, state.holder) for settings, state in zip(runs, states) if state.name == "running"]
    for settings, holder in elsewhere:
        out(f"{commands.run_name(settings)}: running elsewhere ({holder})")
    todo = [settings for settings, state in zip(runs, states) if state.name not in ("complete", "running")]
    return todo, elsewhere


def differing_runs_problem(runs, shown=3):
    """None, or one line naming each difference (flag, recorded value -> selected value) between the selection's
    settings and those its runs were started with, with the runs that have it: a complete run would be skipped and
    show its old result under the new settings, an unfinished one would refuse to resume. Reads each run's
    status.json (runs of older suites: their recorder)."""
    found = {}
    for settings in runs:
        paths = commands.run_paths(settings)
        differences = identity.differences_from_start(settings, paths, run_folder.read_status(paths),
                                                      read_recorder=True)
        if differences:
            found.setdefault(identity.describe(differences), []).append(commands.run_name(settings))
    if not found:
        return None
    more = lambda items: f" and {len(items) - shown} more" if len(items) > shown else ""  # noqa: E731
    groups = [f"{text} in {', '.join(names[:shown])}{more(names)}" for text, names in found.items()]
    return (f"{sum(map(len, found.values()))} of the {len(runs)} selected runs were started with other settings "
            f"({'; '.join(groups[:shown])}{more(groups)}): their results stand for those; select the settings they "
            "were started with, or another --experiment")


# ---------------------------------------------------------------- predefined AF weights: the sweep they come from

def af_weight_source(settings):
    """The run whose AF weights a predefined-init run starts from (its settings), or None."""
    if settings["af_weights_init"] != "predefined":
        return None
    return dict(settings, experiment_name=settings["load_af_weights_experiment"] or settings["experiment_name"],
                spec_name=settings["load_af_weights_from"])


def missing_af_weights(runs):
    """(sources needed, sources missing) of the runs' predefined AF weights, each (experiment folder, spec, run):
    a source counts once its run is complete and has an AF-weights file."""
    sources = {(commands.experiment_dir(source), source["spec_name"], source["run"]): source
               for source in filter(None, map(af_weight_source, runs))}
    missing = {key for key, source in sources.items()
               if not is_complete(source) or run_folder.newest_af_weights_file(*key) is None}
    return set(sources), missing


def is_complete(settings):
    return run_folder.run_state(commands.run_paths(settings)).name == "complete"


def af_weights_problem(runs):
    """None, or one line naming the sweep to run first and how many AF-weights files are missing, or the first
    file that cannot be used (unfit, or values that are not finite)."""
    todo = [s for s in runs if not is_complete(s)]
    needed, missing = missing_af_weights(todo)
    if needed and not missing:
        from deepnet import activations  # imports numpy: only for runs that start from predefined AF weights
        return activations.af_weights_problem(todo, commands.REPO_DIR) or None
    if not missing:
        return None
    folders = sorted({folder for folder, _, _ in missing})
    first = [f"--sweep {name}" for name, sweep in SWEEPS.items()
             if any(os.path.basename(folder) == sweep["experiment"] for folder in folders)]
    return (f"{len(missing)} of the {len(needed)} AF-weights files these runs start from are missing (or their run "
            f"is not complete) in {', '.join(run_folder.af_weights_dir(f) for f in folders)}: run "
            f"{' and '.join(first) or 'those runs'} first")


def reference_problem(args, runs):
    """None, or why the sweep's analysis could not know the reference spec (--set reference=...): a name that is
    neither a spec of the sweep nor a spec folder of the experiment. (A spec of the sweep that is not selected and
    has no runs yet only leaves the comparisons out of the analysis.)"""
    reference = runs[0]["reference"]
    if reference in SWEEPS[args.sweep]["specs"] or os.path.isdir(os.path.join(commands.experiment_dir(runs[0]),
                                                                              reference)):
        return None
    return (f"--set reference={commands.echoed(reference)}: neither a spec of sweep {args.sweep} nor a spec folder "
            f"in {commands.experiment_dir(runs[0])}, so the analysis could compare nothing with it")


def analyse(settings, out=print):
    """The experiment's analysis, in this process; False if it could not run."""
    import deepnet_analysis
    try:
        deepnet_analysis.analyse_experiment(commands.experiment_dir(settings), reference=settings["reference"],
                                            out=out, reference_required=False)
    except UserError as err:
        out(f"analysis: {err}")
        return False
    return True


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default="paper", help=f"one of {', '.join(SWEEPS)} (default paper)")
    p.add_argument("--experiment", help="experiment name (default: the sweep's)")
    p.add_argument("--specs", help="comma-separated subset of the sweep's specs")
    p.add_argument("--runs", help="run numbers: ranges and lists, e.g. 1-30 or 1,4,7-9 (default: the sweep's); at "
                   f"most {MAX_RUNS} runs in all (specs x run numbers)")
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
        raise UserError(f"--sweep {commands.echoed(args.sweep)}: unknown sweep (known: {', '.join(SWEEPS)})")
    if args.backend not in ("local", *cluster.SUBMITTERS):
        raise UserError(f"--backend {commands.echoed(args.backend)}: must be local, slurm or sge")
    if not re.fullmatch(r"[0-9]+", args.workers) or int(args.workers) < 1:
        raise UserError(f"--workers {commands.echoed(args.workers)}: must be a whole number >= 1")
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
        return status.print_status(plan(args), args.workers, out)
    cluster.check_submitter(args.backend, args.dry_run)
    runs = plan(args)
    for settings in runs:
        commands.check_with_main(commands.command(settings))
    if args.backend != "local":
        cluster.check_cluster(args.backend, CLUSTER, commands.experiment_dir(runs[0]))
    to_stderr = lambda line: print(line, file=sys.stderr)  # noqa: E731
    differing = differing_runs_problem(runs)
    if differing and not args.dry_run:
        raise UserError(differing)
    if differing:
        to_stderr(f"warning: {differing}")
    problem = reference_problem(args, runs)
    if problem and not (args.dry_run or args.no_analysis):
        raise UserError(problem)
    problem = af_weights_problem(runs)
    if problem and not args.dry_run:
        raise UserError(f"--sweep {args.sweep}: {problem}")
    if problem:
        to_stderr(f"warning: {problem}")
    if args.dry_run and args.backend == "local":
        todo, _ = split_by_state(runs, to_stderr)
        local.check_minibatch_sizes(todo, None)     # refused now; the sweep fetches missing data, checks the disk
        for settings in todo:
            out(shlex.join(commands.command(settings)))
        from deepnet import estimate  # imports numpy: only for a dry run
        out(estimate.estimate_line(todo, estimate.measure(todo, args.workers), args.workers))
        return 0
    try:
        return sweep(args, runs, out)
    except KeyboardInterrupt:
        out("sweep interrupted; run the same command again to continue")
        return 130


def preflight(todo, out=print):
    """Before any run starts or any job script is written: refuse a minibatch larger than the training set after
    the validation split (UserError; a note when the data are not there yet), warn when the disk may not hold what
    the runs write."""
    if todo:
        local.check_minibatch_sizes(todo, out)
        for line in local.disk_warnings(todo):
            out(line)


def sweep(args, runs, out=print):
    """Prepare the data, run or submit the unfinished runs, analyse once every run has ended; returns the
    exit status."""
    todo, elsewhere = split_by_state(runs, out)
    may_run_here = todo + [settings for settings, _ in elsewhere]
    if may_run_here and not args.dry_run:
        for settings in {(s["path_relative"], s["task"], s["preprocessing"]): s for s in may_run_here}.values():
            local.ensure_data(settings, SWEEPS[args.sweep]["synthetic_fallback"], out)
    preflight(todo, out)
    if args.backend != "local":
        if not todo and elsewhere:
            out(f"nothing to submit: {len(elsewhere)} run(s) still running elsewhere; run this command again "
                "once they have ended")
            return 0
        if not todo:
            out("every run is complete")
            return 0 if args.no_analysis or args.dry_run or analyse(runs[0], out) else 1
        return cluster.run_cluster(args.backend, args.dry_run, todo, commands.experiment_dir(runs[0]), CLUSTER, out)
    if todo:
        local.check_activation_kernel(out)
    counts = local.run_local(todo, args.workers, out, elsewhere, wait=not args.no_wait)
    still_running = [commands.run_name(settings) for settings in runs
                     if run_folder.lock_holder(commands.run_paths(settings))]
    if still_running:
        out(f"analysis skipped: {len(still_running)} run(s) still running elsewhere ({', '.join(still_running)});"
            " run this command again once they have ended")
        return 1
    analysed = args.no_analysis or analyse(runs[0], out)
    return 0 if analysed and not (counts["failed"] or counts["incomplete"]) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
