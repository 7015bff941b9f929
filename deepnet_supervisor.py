"""Run a sweep of deepnet_main.py runs (specs x runs) locally or on a SLURM / SGE cluster, then analyse it.

    python deepnet_supervisor.py --sweep demo --workers 2          # 2 specs x 2 short runs, then the analysis
    python deepnet_supervisor.py --specs relu,ABU --runs 1-10 --workers 4
    python deepnet_supervisor.py --backend slurm                   # write + submit a job array
    python deepnet_supervisor.py --dry-run --set n_minibatches=1000

Edit the settings, specs and sweeps below; the command line picks a sweep, a subset and overrides.
Every run's command carries every setting, so a run folder is reproducible from its log alone.
Runs that are complete (recorder test_completed) or diverged are skipped; unfinished ones are started
again and resume from their newest checkpoint. So running the same command again after an
interruption, a failure or a cluster time limit continues the sweep, and once every run is complete
it only (re)writes the analysis.
"""
import argparse
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from deepnet_util import UserError, load_pickle, run_cli, save_text

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
    "af_set": "1_relu",
    "af_weights_init": "default",
    "load_af_weights_from": "",
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

PAPER_SPECS = {
    # fixed activation functions
    "relu": {"af_set": "1_relu", "blend_trainable": False},
    "jelu": {"af_set": "1_jelu", "blend_trainable": False},
    "tanh": {"af_set": "1_tanh", "blend_trainable": False},
    "jswish": {"af_set": "1_jswish", "blend_trainable": False},
    "linu": {"af_set": "1_linu", "blend_trainable": False},
    "selu": {"af_set": "1_selu", "blend_trainable": False},
    # adaptive scaling: the same function times a trainable weight
    "alpha_relu": {"af_set": "1_relu", "blend_trainable": True},
    "alpha_jelu": {"af_set": "1_jelu", "blend_trainable": True},
    "alpha_tanh": {"af_set": "1_tanh", "blend_trainable": True},
    "alpha_jswish": {"af_set": "1_jswish", "blend_trainable": True, "swish_beta_trainable": True},
    "alpha_linu": {"af_set": "1_linu", "blend_trainable": True},
    "alpha_selu": {"af_set": "1_selu", "blend_trainable": True},
    # adaptive blending units (relu, elu, tanh, swish, identity) in each blend mode
    "ABU": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
            "blend_mode": "unrestricted"},
    "ABU_N": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
              "blend_mode": "normalized"},
    "ABU_P": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
              "blend_mode": "posnormed"},
    "ABU_A": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
              "blend_mode": "absnormed"},
    "ABU_S": {"af_set": "5_blend5_swish", "blend_trainable": True, "swish_beta_trainable": True,
              "blend_mode": "softmaxed"},
}

# ---------------------------------------------------------------- sweeps: experiment, specs, runs, settings

SWEEPS = {
    "paper": {
        "experiment": "ABU_paper_smcn_cifar10",
        "specs": PAPER_SPECS,
        "runs": "1-30",
        "settings": {},
        "synthetic_fallback": False,   # real CIFAR or nothing
    },
    "demo": {                          # 2 x 2 short runs: a few minutes with 2 workers on 2 CPU cores
        "experiment": "demo_smcn_cifar10",
        "specs": {name: PAPER_SPECS[name] for name in ("relu", "ABU")},
        "runs": "1-2",
        "settings": {"n_minibatches": 250, "minibatch_size": 40, "val_every": 25, "val_set_fraction": 0.02,
                     "epochs_between_checkpoints": 1, "dropout_keep_probs": [0.5], "safe_af_ws_n": 4},
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


def run_state(settings):
    """'complete', 'diverged' or 'todo', from the run's recorder."""
    spec, run = settings["spec_name"], settings["run"]
    path = os.path.join(run_dir(settings), f"record_{spec}_run_{run}.pkl")
    if not os.path.isfile(path):
        return "todo"
    try:
        record = load_pickle(path)
    except UserError:
        return "todo"
    if not isinstance(record, dict):
        return "todo"
    if record.get("test_completed"):
        return "complete"
    return "diverged" if record.get("diverged") else "todo"


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
    """(runs to start, number complete); complete and diverged runs are reported, not started."""
    states = [run_state(s) for s in runs]
    todo = [s for s, state in zip(runs, states) if state == "todo"]
    complete = states.count("complete")
    diverged = [f"{s['spec_name']} run {s['run']}" for s, state in zip(runs, states) if state == "diverged"]
    if complete:
        out(f"{complete} of {len(runs)} runs already complete: skipped")
    if diverged:
        out(f"{len(diverged)} diverged runs skipped (not restarted): {', '.join(diverged)}")
    return todo, complete


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
    """Start one run; its stdout and stderr are appended to its log file."""
    path = log_path(settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "ab")
    args = command(settings)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} deepnet_supervisor: {shlex.join(args)}\n".encode())
    log.flush()
    proc = subprocess.Popen(args, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    return proc, log


def clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def outcome(settings, returncode):
    """('complete' | 'incomplete' | 'diverged' | 'failed', text) after a run's process ended."""
    state = run_state(settings)
    if state == "complete":
        return "complete", "complete"
    if state == "diverged":
        return "diverged", "diverged"
    if returncode == 0:
        return "incomplete", "stopped before the end (walltime?); run the sweep again to resume"
    return "failed", f"FAILED (exit status {returncode}), log: {log_path(settings)}"


class LocalPool:
    """Runs the given runs with at most `workers` processes at once."""

    def __init__(self, runs, workers, out=print):
        self.pending, self.workers, self.out = list(runs), workers, out
        self.total, self.done, self.running = len(runs), 0, {}
        self.counts = {"complete": 0, "incomplete": 0, "diverged": 0, "failed": 0}
        self.durations = []
        self.env = child_environment(workers)

    def run(self):
        """Returns the outcome counts; Ctrl-C / SIGTERM stop the children (they checkpoint) and re-raise."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while self.pending or self.running:
                self._fill()
                if not self._reap():
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
            proc, log = launch(settings, self.env)
            self.running[proc] = (settings, log, time.time())

    def _reap(self):
        finished = [proc for proc in self.running if proc.poll() is not None]
        for proc in finished:
            settings, log, began = self.running.pop(proc)
            log.close()
            kind, text = outcome(settings, proc.returncode)
            self.counts[kind] += 1
            self.done += 1
            self._report(settings, text, time.time() - began)
        return finished

    def _report(self, settings, text, seconds):
        self.durations.append(seconds)
        self.out(f"[{self.done}/{self.total}] {settings['spec_name']} run {settings['run']}: {text} "
                 f"in {clock(seconds)} | failures {self.counts['failed']} | ETA {clock(self._eta())}")

    def _eta(self):
        """Mean run time: what the running runs still need plus the waiting runs, `workers` at a time."""
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        running = max((max(mean - (now - began), 0) for _, _, began in self.running.values()), default=0)
        return running + mean * math.ceil(len(self.pending) / self.workers)

    def _stop_all(self):
        self.out(f"interrupted: stopping {len(self.running)} running run(s); they write a checkpoint "
                 "and resume when the sweep is started again")
        for proc in self.running:
            proc.terminate()
        deadline = time.time() + STOP_TIMEOUT_S
        try:
            for proc in self.running:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            for proc in self.running:
                if proc.poll() is None:
                    proc.kill()
        for proc, (_, log, _) in self.running.items():
            proc.wait()
            log.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_local(todo, workers, out=print):
    """Run the runs; returns the outcome counts."""
    if not todo:
        return {"complete": 0, "incomplete": 0, "diverged": 0, "failed": 0}
    out(f"running {len(todo)} run(s) with {workers} worker(s); logs: <run folder>/log_<spec>_run_<run>.txt")
    counts = LocalPool(todo, workers, out).run()
    out(f"finished: {counts['complete']} complete, {counts['failed']} failed, {counts['incomplete']} "
        f"incomplete, {counts['diverged']} diverged")
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


def main(argv=None, out=print):
    args = parse_args(argv)
    check_submitter(args)
    runs = plan(args)
    for settings in runs:
        check_with_main(command(settings))
    if args.dry_run and args.backend == "local":
        todo, _ = split_by_state(runs, lambda line: print(line, file=sys.stderr))
        for settings in todo:
            out(shlex.join(command(settings)))
        return 0
    try:
        return sweep(args, runs, out)
    except KeyboardInterrupt:
        out("sweep interrupted; run the same command again to continue")
        return 130


def sweep(args, runs, out=print):
    """Prepare the data, run or submit the unfinished runs, analyse; returns the exit status."""
    todo, _ = split_by_state(runs, out)
    if todo and not args.dry_run:
        for settings in {(s["path_relative"], s["task"], s["preprocessing"]): s for s in todo}.values():
            ensure_data(settings, SWEEPS[args.sweep]["synthetic_fallback"], out)
    if args.backend != "local":
        if not todo:
            out("every run is complete")
            return 0 if args.no_analysis or args.dry_run or analyse(runs[0], out) else 1
        return run_cluster(args, runs, todo, out)
    counts = run_local(todo, args.workers, out)
    analysed = args.no_analysis or analyse(runs[0], out)
    return 0 if analysed and not (counts["failed"] or counts["incomplete"]) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
