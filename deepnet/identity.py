"""A run's recorded settings are its identity: which flags may change between the sessions of one run, how the
settings of runs started under older suites read in today's terms, and the check that a run is resumed, or a
complete run asked again, with the settings it started with. No TensorFlow, no numpy.

Where a run's settings are recorded: its recorder (every checkpoint's too) and, for the supervisor and --status,
which read only small files, its status.json (run_folder.RunStatus); runs of older suites have them only in the
recorder (started_settings).
"""
import os

from deepnet import architectures, run_folder
from deepnet_util import UserError

# Flags that may change between the sessions of one run, and with which a complete run may be asked again: they
# do not change its numbers.
RESUMABLE_CHANGES = {"walltime", "path_relative", "mode", "reference"}


def with_default_seed(settings):
    """settings with -seed as a run uses it: when not given (None), the run number (pairing runs across specs)."""
    return settings if settings.get("seed") is not None else dict(settings, seed=settings["run"])


def settings_as_started(settings):
    """A recorder's settings in today's terms. Runs started before the suite took the original's defaults (their
    settings have no 'bn_inference') clipped and then normalised for 'posnormed' (now 'clipnormed'), evaluated
    smcnBN with moving averages and read predefined AF weights from their own experiment."""
    if not isinstance(settings, dict) or "bn_inference" in settings:
        return settings
    mode = settings.get("blend_mode")
    return dict(settings, bn_inference="moving_averages", load_af_weights_experiment="",
                blend_mode="clipnormed" if mode == "posnormed" else mode)


def _comparable(value):
    """A setting's value as status.json gives it back (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value


def settings_differences(requested, recorded):
    """[(flag, recorded value, requested value)] of the flags that change a run's numbers and differ, sorted by
    flag (recorded: in today's terms; -bn_inference only counts with batch norm; -seed None is the run number)."""
    requested, recorded = with_default_seed(requested), settings_as_started(recorded)
    batch_norm = requested.get("network") in architectures.BATCH_NORM_NETWORKS
    ignored = RESUMABLE_CHANGES | (set() if batch_norm else {"bn_inference"})
    return [(flag, recorded.get(flag), requested.get(flag)) for flag in sorted(set(requested) | set(recorded))
            if flag not in ignored and _comparable(requested.get(flag)) != _comparable(recorded.get(flag))]


def describe(differences):
    """'-lr 0.001 -> 0.01, -run ...': each difference as flag, recorded value -> requested value."""
    return ", ".join(f"-{flag} {before} -> {after}" for flag, before, after in differences)


def check_same_settings(settings, record, complete=False):
    """UserError naming each difference if the flags differ from those the run was started with (see
    settings_differences); record['settings'] is put in today's terms (settings_as_started). complete: the run is
    complete, and asking it again with other settings would show its old result under them."""
    record["settings"] = settings_as_started(record["settings"])
    differ = settings_differences(settings, record["settings"])
    if not differ:
        return
    name = f"{record['spec_name']}/run {record['run']}"
    if complete:
        raise UserError(f"{name}: complete, trained with other settings ({describe(differ)}); its files are kept "
                        "as they are: use its original flags, or another -run/-spec_name/-experiment_name")
    raise UserError(f"{name}: cannot resume with other settings ({describe(differ)}); use the original flags or "
                    "another -run/-spec_name")


def differences_from_start(settings, paths, status, read_recorder=False):
    """settings_differences between settings and those the run at paths was started with (started_settings); []
    where neither its status.json nor (read_recorder) its recorder says."""
    started = started_settings(paths, status, read_recorder)
    return settings_differences(settings, started) if started is not None else []


def started_settings(paths, status, read_recorder=False):
    """The settings the run at paths was started with: those its status.json records (status: read_status's
    fields), else, with read_recorder, its recorder's (runs of older suites); None where neither says."""
    recorded = (status or {}).get("settings")
    if isinstance(recorded, dict):
        return recorded
    if not read_recorder or not os.path.exists(paths["record"]):
        return None
    record, _ = run_folder.read_record(paths["record"], strict=False)
    recorded = (record or {}).get("settings")
    return recorded if isinstance(recorded, dict) else None
