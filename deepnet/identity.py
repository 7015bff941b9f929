"""A run's settings as its recorder keeps them: which flags may change between the sessions of one run, how the
settings of runs started under older suites read in today's terms, and the check that a run is resumed with the
settings it started with. No TensorFlow.
"""
from deepnet import architectures
from deepnet_util import UserError

# Flags that may change between the sessions of one run.
RESUMABLE_CHANGES = {"walltime", "path_relative", "mode", "reference"}


def settings_as_started(settings):
    """A recorder's settings in today's terms. Runs started before the suite took the original's defaults (their
    settings have no 'bn_inference') clipped and then normalised for 'posnormed' (now 'clipnormed'), evaluated
    smcnBN with moving averages and read predefined AF weights from their own experiment."""
    if not isinstance(settings, dict) or "bn_inference" in settings:
        return settings
    mode = settings.get("blend_mode")
    return dict(settings, bn_inference="moving_averages", load_af_weights_experiment="",
                blend_mode="clipnormed" if mode == "posnormed" else mode)


def check_same_settings(settings, record):
    """UserError if the flags differ from those the run was started with (-bn_inference only matters with batch
    norm); record['settings'] is put in today's terms (settings_as_started)."""
    before = record["settings"] = settings_as_started(record["settings"])
    batch_norm = settings["network"] in architectures.BATCH_NORM_NETWORKS
    ignored = RESUMABLE_CHANGES | (set() if batch_norm else {"bn_inference"})
    differ = sorted(k for k in set(settings) | set(before) if k not in ignored and settings.get(k) != before.get(k))
    if differ:
        changes = ", ".join(f"-{k} {before.get(k)} -> {settings.get(k)}" for k in differ)
        raise UserError(f"{record['spec_name']}/run {record['run']}: cannot resume with other settings ({changes}); "
                        "use the original flags or another -run/-spec_name")
