"""The SLURM and SGE backends of the supervisor: a job array per submission, whose task i runs task i of a task
list, with -walltime set below the job's time limit so that runs stop at a checkpoint and resume when submitted
again. No TensorFlow, no numpy.

The task list is data: one JSON object per line ({"spec", "run", "log", "argv"}). The job script runs
`python -m deepnet.cluster TASKS_FILE TASK_ID` (main below), which reads task TASK_ID, appends a header line to
its log and executes its argv list with the log as stdout and stderr: no value of a run is ever parsed by a shell.
The few values in the job script itself (the suite's folder, the interpreter, the task list) are shell-quoted, and
those in its scheduler directives are quoted for the scheduler or refused (check_cluster) before anything is
written.
"""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

from deepnet import commands, names, run_folder
from deepnet_util import UserError, run_cli, save_text

WALLTIME_MARGIN = (10, 0.05)        # minutes kept free below the job time: max(10, 5 % of it)
SUBMITTERS = {"slurm": "sbatch", "sge": "qsub"}
TASK_ID_VARIABLE = {"slurm": "SLURM_ARRAY_TASK_ID", "sge": "SGE_TASK_ID"}

# What each CLUSTER setting must be: whole numbers with their minimum, words by the characters the schedulers
# accept there, and lines copied into the job script's header as they are (no control characters).
CLUSTER_COUNTS = {"cpus": 1, "time_minutes": 1, "max_parallel": 0}
CLUSTER_WORDS = {
    "mem": (r"[0-9]+[KMGTkmgt]?", "a size like 16G, 1500M or 4096"),
    "slurm_partition": (r"([A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*)?", "'' or partition names (letters, digits, _ . -) "
                        "separated by commas"),
    "sge_queue": (r"[A-Za-z0-9_.@*,-]*", "'' or a queue list (letters, digits, _ . @ * , -)"),
    "sge_parallel_env": (r"[A-Za-z0-9_.*-]+", "a parallel environment's name (letters, digits, _ . * -)"),
}
CLUSTER_LINES = ("slurm_extra", "sge_extra")
# sbatch reads a backslash in --output as "no %-patterns" (every task would write one file); SGE's '#$ -o' line
# has no quoting, splits at whitespace, expands $VARIABLES and reads ',' and ':' as list and host separators.
OUTPUT_FOLDER_REFUSED = {"slurm": "\\", "sge": " \t\"'\\$,:#"}


def cluster_walltime(cluster):
    """-walltime (minutes) for runs in a job of cluster['time_minutes']."""
    minutes = cluster["time_minutes"]
    return max(1, minutes - max(WALLTIME_MARGIN[0], int(minutes * WALLTIME_MARGIN[1])))


def interpreter(cluster):
    """The python the nodes run: cluster['python'], or this one."""
    return cluster["python"] or sys.executable


# ---------------------------------------------------------------- checks before anything is written

def cluster_problem(key, value):
    """Why CLUSTER[key] cannot be used ('' if it can)."""
    if key in CLUSTER_COUNTS:
        low = CLUSTER_COUNTS[key]
        return "" if type(value) is int and value >= low else f"must be a whole number >= {low}"
    if key in CLUSTER_WORDS:
        pattern, what = CLUSTER_WORDS[key]
        return "" if isinstance(value, str) and re.fullmatch(pattern, value) else f"must be {what}"
    if key in CLUSTER_LINES:
        if not isinstance(value, (list, tuple)) or not all(isinstance(line, str) for line in value):
            return "must be a list of option lines (strings)"
        return "" if not any(names.CONTROL.search(line) for line in value) else \
            "must not contain control characters (a newline would start a new line of the job script)"
    if key == "python":
        return "" if value is None else names.path_problem(value)
    return ""


def output_folder_problem(backend, folder):
    """Why the job's output folder cannot go into the backend's directive ('' if it can)."""
    problem = names.path_problem(folder)
    if problem:
        return problem
    refused = sorted(set(OUTPUT_FOLDER_REFUSED[backend]) & set(folder))
    if not refused:
        return ""
    if backend == "slurm":
        return "sbatch reads a backslash in --output as 'no %-patterns': use a -path_relative without one"
    return (f"SGE's '#$ -o' line cannot carry {' '.join(map(repr, refused))} (no whitespace, quotes, backslash, "
            "$ , : #): use a -path_relative without them, or --backend slurm")


def check_cluster(backend, cluster, exp_dir):
    """UserError naming the CLUSTER setting, or the job's output folder, that the job script cannot carry."""
    for key, value in cluster.items():
        problem = cluster_problem(key, value)
        if problem:
            raise UserError(f"CLUSTER['{key}'] {names.shown(value)} in deepnet_supervisor.py: {problem}")
    folder = run_folder.jobs_dir(exp_dir)
    problem = output_folder_problem(backend, folder)
    if problem:
        raise UserError(f"--backend {backend}: the jobs' output folder {names.shown(folder)}: {problem}")


# ---------------------------------------------------------------- the task list and the job script

def task_records(todo, cluster):
    """One task per run: spec, run, log file and the argv list of its deepnet_main.py command."""
    records = []
    for settings in todo:
        settings = dict(settings, walltime=cluster_walltime(cluster))
        records.append({"spec": settings["spec_name"], "run": settings["run"],
                        "log": commands.run_paths(settings)["log"],
                        "argv": commands.command(settings, interpreter(cluster))})
    return records


def slurm_time(minutes):
    """SLURM's D-HH:MM:SS of a time limit in minutes."""
    days, rest = divmod(int(minutes), 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def slurm_quoted(text):
    """text as one #SBATCH option argument: in double quotes, with '"' and '#' backslash-escaped (sbatch reads
    quotes, backslashes and an unquoted '#' on these lines as a shell would; old versions also a quoted '#')."""
    return '"' + re.sub(r'(["#])', r"\\\1", text) + '"'


def slurm_header(name, n_tasks, jobs_dir, cluster):
    limit = f"%{cluster['max_parallel']}" if cluster["max_parallel"] else ""
    output = os.path.join(jobs_dir.replace("%", "%%"), "slurm_%A_%a.out")   # %% is sbatch's literal %
    lines = [f"#SBATCH --job-name={name}", f"#SBATCH --array=1-{n_tasks}{limit}",
             f"#SBATCH --cpus-per-task={cluster['cpus']}", f"#SBATCH --mem={cluster['mem']}",
             f"#SBATCH --time={slurm_time(cluster['time_minutes'])}",
             f"#SBATCH --output={slurm_quoted(output)}"]
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
    """A bash job-array script: task i runs task i of tasks_file (python -m deepnet.cluster), appending to that
    run's log."""
    header = (slurm_header if backend == "slurm" else sge_header)(name, n_tasks, jobs_dir, cluster)
    threads = cluster["cpus"]
    body = [
        "set -u",
        f"export OMP_NUM_THREADS={threads} TF_NUM_INTRAOP_THREADS={threads} PYTHONUNBUFFERED=1",
        f"cd {shlex.quote(commands.REPO_DIR)}",
        f"exec {shlex.quote(interpreter(cluster))} -m deepnet.cluster {shlex.quote(tasks_file)} "
        f"\"${{{TASK_ID_VARIABLE[backend]}}}\"",
    ]
    return "\n".join(["#!/bin/bash", *header, "", "# Runs stop at a checkpoint before the job's time limit "
                      "(-walltime) and resume when started again:", "# re-run the same deepnet_supervisor.py "
                      "command to submit the unfinished runs (complete ones are skipped).", *body]) + "\n"


def executable_mode():
    """rwx for everyone the umask lets in (0o755 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_jobs(backend, todo, exp_dir, cluster):
    """Write EXP/0_jobs/<experiment>_<backend>_<time>_tasks.jsonl and its job script; returns the script path.

    Each submission gets its own pair of files, so a queued array never reads a newer task list.
    """
    experiment, jobs_dir = os.path.basename(exp_dir), run_folder.jobs_dir(exp_dir)
    stem = os.path.join(jobs_dir, f"{experiment}_{backend}_{time.strftime('%Y%m%d-%H%M%S')}")
    tasks_file = f"{stem}_tasks.jsonl"
    save_text(tasks_file, "".join(json.dumps(task) + "\n" for task in task_records(todo, cluster)))
    script = f"{stem}.sh"
    save_text(script, job_script(backend, experiment, tasks_file, len(todo), jobs_dir, cluster))
    os.chmod(script, executable_mode())
    return script


# ---------------------------------------------------------------- submission

def submit(backend, script, out=print):
    """Submit the job script (UserError naming the submitter's last line if it refuses)."""
    result = subprocess.run([SUBMITTERS[backend], script], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"{SUBMITTERS[backend]} {shlex.quote(script)} failed: "
                        f"{message[-1] if message else result.returncode}")
    out(result.stdout.strip())


def check_submitter(backend, dry_run):
    """UserError when the backend's submitter is not on PATH (a dry run submits nothing)."""
    submitter = SUBMITTERS.get(backend)
    if submitter and not dry_run and shutil.which(submitter) is None:
        raise UserError(f"--backend {backend}: '{submitter}' not found on PATH (is this a {backend} "
                        "login node?); --dry-run writes the job script without submitting")


def run_cluster(backend, dry_run, todo, exp_dir, cluster, out=print):
    """Write the job array of the runs todo (and unless dry_run, submit it); returns 0."""
    submitter = SUBMITTERS[backend]
    script = write_jobs(backend, todo, exp_dir, cluster)
    if dry_run:
        out(f"wrote {script} ({len(todo)} tasks); submit it with: {submitter} {shlex.quote(script)}")
        return 0
    submit(backend, script, out)
    out(f"submitted {len(todo)} tasks ({script}); once they have all ended, run this command again: it "
        "resubmits unfinished runs (they resume from their checkpoints) or, when all are complete, writes "
        "the analysis")
    return 0


# ---------------------------------------------------------------- a task on a node: python -m deepnet.cluster

def read_task(tasks_file, task_id):
    """Task number task_id (text, counted from 1) of a task list (UserError naming the file when it has none)."""
    if not re.fullmatch(r"[0-9]+", task_id) or int(task_id) < 1:
        raise UserError(f"task id {names.shown(task_id)}: must be a whole number >= 1")
    try:
        with open(tasks_file, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{tasks_file}: cannot read the task list ({getattr(err, 'strerror', None) or err})") \
            from None
    if int(task_id) > len(lines):
        raise UserError(f"{tasks_file}: holds {len(lines)} task(s), not task {task_id}")
    try:
        task = json.loads(lines[int(task_id) - 1])
    except ValueError:
        task = None
    if not (isinstance(task, dict) and isinstance(task.get("log"), str) and task["log"]
            and isinstance(task.get("argv"), list) and task["argv"]
            and all(isinstance(arg, str) for arg in task["argv"])):
        raise UserError(f"{tasks_file}: line {task_id} is not a task (a JSON object with a 'log' path and an "
                        "'argv' list of strings)")
    return task


def run_task(tasks_file, task_id):
    """Become task task_id: append a header line to its log, then execute its argv in the suite's folder with
    the log as stdout and stderr (the exit status is the run's)."""
    task = read_task(tasks_file, task_id)
    log = task["log"]
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    header = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} task {task_id} on {socket.gethostname()}: "
              f"{shlex.join(task['argv'])}\n")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.write(fd, header.encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(commands.REPO_DIR)
    os.execvp(task["argv"][0], task["argv"])


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise UserError("usage: python -m deepnet.cluster TASKS_FILE TASK_ID")
    run_task(*args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
