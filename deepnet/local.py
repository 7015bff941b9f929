"""The local backend of the supervisor: its preflight (the data are there, the minibatch fits the training set, the
disk has room, the fused kernel is built; the cluster backends share the first three) and the worker pool that runs
a sweep's runs, a few at a time, each in its own process and log, stops them cleanly on Ctrl-C or SIGTERM, and waits
for runs that another process is training.
"""
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

from deepnet import commands, datasets, run_folder, status
from deepnet_util import EXIT_RUNNING_ELSEWHERE, UserError, append_to, clock, load_json_object

POLL_S = 0.5
STOP_TIMEOUT_S = 180                # a stopped run gets this long to write its checkpoint
ELSEWHERE_POLL_S = 5                # how often the locks of runs running elsewhere are checked
WAIT_REPORT_S = 600                 # a line about the runs still running elsewhere this often
PR_SET_PDEATHSIG = 1                # linux/prctl.h


def ensure_data(settings, synthetic_fallback, out=print):
    """Make sure the preprocessed data of the runs exist: download if not; for demos fall back to synthetic."""
    root, task, variant = commands.project_root(settings), settings["task"], settings["preprocessing"]
    train, test = datasets.output_paths(root, task, variant)
    if os.path.isfile(train) and os.path.isfile(test):
        if "synthetic" in read_text(datasets.sidecar_path(train)):
            out(f"note: {datasets.task_dir(root, task)} holds synthetic data; results say nothing about real {task}")
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


def training_images(settings):
    """The number of images in the runs' preprocessed training file: from its JSON sidecar ('images_shape'), else
    (the original's pickles have none) by loading it once; None when the file is not there."""
    train, _ = datasets.output_paths(commands.project_root(settings), settings["task"], settings["preprocessing"])
    if not os.path.isfile(train):
        return None
    shape = (load_json_object(datasets.sidecar_path(train)) or {}).get("images_shape")
    if isinstance(shape, list) and shape and type(shape[0]) is int and shape[0] > 0:
        return shape[0]
    from deepnet import data  # imports numpy: only without a sidecar
    return len(data.load_dataset(train, datasets.N_CLASSES[settings["task"]])[1])


def check_minibatch_sizes(runs, out=print):
    """UserError (-minibatch_size, nothing written) when a run's minibatch is larger than the training images
    left after its validation split; says in one line to out (None: says nothing) which data are not there yet to
    be checked."""
    from deepnet import data  # imports numpy: only when runs are about to be started or submitted
    sizes = {}
    for settings in runs:
        key = (commands.project_root(settings), settings["task"], settings["preprocessing"])
        if key not in sizes:
            sizes[key] = training_images(settings)
            if sizes[key] is None and out:
                out(f"note: no preprocessed {settings['task']} ({settings['preprocessing']}) under {key[0]} yet: "
                    "-minibatch_size is checked against it once it is there")
        if sizes[key] is not None:
            data.check_data_fits(settings, sizes[key])


def disk_warnings(runs):
    """'warning:' lines, one per file system the runs may write more to than it has free (deepnet/disk.py)."""
    from deepnet import disk  # imports numpy: only when runs are about to be started or submitted
    return disk.free_space_warnings((commands.experiment_dir(settings), settings) for settings in runs)


def read_text(path):
    """The text in path ('' if it cannot be read)."""
    try:
        with open(path, errors="replace") as handle:  # a sidecar that is not UTF-8 is no traceback
            return handle.read()
    except OSError:
        return ""


def run_quietly(args):
    """Run a helper script; None if it succeeded, else its last output line."""
    result = subprocess.run(args, cwd=commands.REPO_DIR, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = (result.stderr + result.stdout).strip().splitlines()
    return lines[-1].removeprefix("error: ") if lines else f"exit status {result.returncode}"


def check_activation_kernel(out=print):
    """Build (or find in the cache) the fused activation kernel once, before the runs start, and say in one line
    when the runs cannot use it. Returns 'fused' or 'plain: <why>' (deepnet_network.kernel_state())."""
    result = subprocess.run([sys.executable, "deepnet_network.py"], cwd=commands.REPO_DIR, capture_output=True,
                            text=True)
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


def child_environment(workers):
    """Each run gets an equal share of the cores (unless the caller set the thread counts)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env.setdefault(name, threads)
    env.setdefault("TF_NUM_INTEROP_THREADS", "1" if threads == "1" else "2")
    return env


def launch(settings, env):
    """Start one run; its stdout and stderr are appended to its log file (never through a symbolic link: one there
    is replaced by a new log). Returns (process, log)."""
    path = commands.run_paths(settings)["log"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = append_to(path)
    args = commands.command(settings)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} deepnet_supervisor: {shlex.join(args)}\n".encode())
    log.flush()
    return start_process(args, log, env), log


def start_process(args, log, env):
    """Popen a worker in its own session (the terminal's Ctrl-C reaches only the supervisor, which stops the
    workers) that gets SIGTERM when the supervisor dies, so it checkpoints instead of training on unnoticed."""
    return subprocess.Popen(args, cwd=commands.REPO_DIR, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=die_with_parent())


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


def locked_elsewhere(settings, returncode):
    """The holder ('process P on HOST') when a run exited because another process trains it (deepnet_main's exit
    status 75), else ''. The lock may be free again by the time the exit is seen: then 'another process'."""
    if returncode != EXIT_RUNNING_ELSEWHERE:
        return ""
    return run_folder.lock_holder(commands.run_paths(settings)) or "another process"


def outcome(settings, returncode):
    """('complete' | 'incomplete' | 'diverged' | 'failed', text) after a run's process ended."""
    state = run_folder.run_state(commands.run_paths(settings))
    if state.name == "complete":
        mb = state.status.get("diverged_at_mb")
        return ("complete", "complete") if mb is None else ("diverged", f"complete, diverged at mb {mb}")
    if returncode == 0:
        return "incomplete", "stopped before the end (walltime?); run the sweep again to resume"
    if returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        return "incomplete", (f"stopped by {signal.Signals(returncode - 128).name} after writing a checkpoint; "
                              "run the sweep again to resume")
    return "failed", f"FAILED (exit status {returncode}), log: {commands.run_paths(settings)['log']}"


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
            proc, log = launch(settings, self.env)
            self.running[proc] = (settings, log, time.monotonic())

    def _reap(self):
        finished = [proc for proc in self.running if proc.poll() is not None]
        for proc in finished:
            settings, log, began = self.running.pop(proc)
            log.close()
            holder = locked_elsewhere(settings, proc.returncode)
            if holder:                  # it lost the race for the lock: not a failure
                self.out(f"{commands.run_name(settings)}: running elsewhere ({holder})")
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
        ended = [item for item in self.elsewhere if not run_folder.lock_holder(commands.run_paths(item[0]))]
        for item in ended:
            self.elsewhere.remove(item)
            settings = item[0]
            if run_folder.run_state(commands.run_paths(settings)).name != "complete":
                self.out(f"{commands.run_name(settings)}: ended elsewhere unfinished; resuming it here")
                self.pending.append(settings)
            else:
                kind, text = outcome(settings, 0)
                self._count(settings, kind, f"{text} (ran elsewhere)")
        if self.elsewhere and now - self.wait_reported >= WAIT_REPORT_S:
            self.wait_reported = now
            self.out(f"waiting for {len(self.elsewhere)} run(s) running elsewhere: "
                     + ", ".join(f"{commands.run_name(s)} ({holder})" for s, holder in self.elsewhere))
        return ended

    def _count(self, settings, kind, text, seconds=None):
        self.counts[kind] += 1
        self.done += 1
        if seconds is not None:
            self.durations.append(seconds)
        eta = clock(self._eta()) if self.durations else "unknown"
        also = f" (+ {len(self.elsewhere)} running elsewhere)" if self.elsewhere else ""
        self.out(f"[{self.done}/{self.total}] {commands.run_name(settings)}: {text} | failures {self.counts['failed']} "
                 f"| ETA {eta}{also}")

    def _eta(self):
        """Mean run time: running runs need the rest of it, waiting runs take the first free worker."""
        mean = sum(self.durations) / len(self.durations)
        now = time.monotonic()
        busy = [max(mean - (now - began), 0) for _, _, began in self.running.values()]
        return status.finish_time(busy, [mean] * len(self.pending), self.workers)

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
        for proc, (_, log, _) in self.running.items():
            proc.wait()
            log.close()


def _raise_interrupt(signum, frame):
    """SIGTERM to the supervisor: stop like Ctrl-C."""
    raise KeyboardInterrupt


def run_local(todo, workers, out=print, elsewhere=(), wait=True):
    """Run the runs (and with wait, wait for those running elsewhere); returns the outcome counts."""
    if not todo and not (wait and elsewhere):
        return {"complete": 0, "incomplete": 0, "diverged": 0, "failed": 0}
    if todo:
        out(f"running {len(todo)} run(s) with {workers} worker(s); each run's log is the log_*.txt in its folder")
    if wait and elsewhere:
        out(f"waiting for {len(elsewhere)} run(s) running elsewhere to end (--no-wait leaves them)")
    pool = LocalPool(todo, workers, out, elsewhere, wait)
    counts = pool.run()
    left = f", {len(pool.elsewhere)} still running elsewhere" if pool.elsewhere else ""
    out(f"finished: {counts['complete']} complete, {counts['failed']} failed, {counts['incomplete']} "
        f"incomplete, {counts['diverged']} diverged{left}")
    return counts
