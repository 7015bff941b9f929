"""The SLURM and SGE backends of the supervisor: a job array per submission, whose task i runs line i of a task
list (spec, run, log, command), with -walltime set below the job's time limit so that runs stop at a checkpoint
and resume when submitted again.
"""
import os
import shlex
import shutil
import subprocess
import sys
import time

from deepnet import commands, run_folder
from deepnet_util import UserError, save_text

WALLTIME_MARGIN = (10, 0.05)        # minutes kept free below the job time: max(10, 5 % of it)
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
        fields = [settings["spec_name"], str(settings["run"]), commands.run_paths(settings)["log"],
                  shlex.join(commands.command(settings, python))]
        lines.append("\t".join(fields))
    return lines


def slurm_time(minutes):
    """SLURM's D-HH:MM:SS of a time limit in minutes."""
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
        f"cd {shlex.quote(commands.REPO_DIR)}",
        "echo \"=== $(date '+%Y-%m-%d %H:%M:%S') task ${" + task_id + "} on $(hostname): $cmd\" >> \"$log\"",
        "eval \"$cmd\" >> \"$log\" 2>&1",
    ]
    return "\n".join(["#!/bin/bash", *header, "", "# Runs stop at a checkpoint before the job's time limit "
                      "(-walltime) and resume when started again:", "# re-run the same deepnet_supervisor.py "
                      "command to submit the unfinished runs (complete ones are skipped).", *body]) + "\n"


def write_jobs(backend, todo, exp_dir, cluster):
    """Write EXP/0_jobs/<experiment>_<backend>_<time>_tasks.tsv and its job script; returns the script path.

    Each submission gets its own pair of files, so a queued array never reads a newer task list.
    """
    experiment, jobs_dir = os.path.basename(exp_dir), run_folder.jobs_dir(exp_dir)
    stem = os.path.join(jobs_dir, f"{experiment}_{backend}_{time.strftime('%Y%m%d-%H%M%S')}")
    tasks_file = f"{stem}_tasks.tsv"
    save_text(tasks_file, "\n".join(task_lines(todo, cluster)) + "\n")
    script = f"{stem}.sh"
    save_text(script, job_script(backend, experiment, tasks_file, len(todo), jobs_dir, cluster))
    os.chmod(script, 0o755)
    return script


def submit(backend, script, out=print):
    """Submit the job script (UserError naming the submitter's last line if it refuses)."""
    result = subprocess.run([SUBMITTERS[backend], script], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"{SUBMITTERS[backend]} {script} failed: {message[-1] if message else result.returncode}")
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
        out(f"wrote {script} ({len(todo)} tasks); submit it with: {submitter} {script}")
        return 0
    submit(backend, script, out)
    out(f"submitted {len(todo)} tasks ({script}); once they have all ended, run this command again: it "
        "resubmits unfinished runs (they resume from their checkpoints) or, when all are complete, writes "
        "the analysis")
    return 0
