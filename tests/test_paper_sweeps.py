"""The paper's seven sweeps against the original experiment scheduler (leonsuetfeld/activations at ac28c20,
2_sched/advanced_scheduler.py and its b_, c_, d_, c100_, m_, p_ variants, which differ only in experiment_name and
spec_list), --list-sweeps, the predefined-initialisation dependency, the dry run's wall-time estimate, and a small
real chain of the main and the predefined-initialisation sweep.
"""
import argparse
import os
import shlex

import numpy as np
import pytest

import deepnet_util  # noqa: E402
from deepnet import commands, estimate  # noqa: E402
from conftest import write_tiny_data
import deepnet_main
import deepnet_supervisor as sv
from deepnet_util import UserError, load_pickle


# ---------------------------------------------------------------- the scheduler, transcribed

def original_default_spec():
    spec = {"path_relative":                  './',
            "experiment_name":                'default_experiment',
            "spec_name":                      'default_spec',
            "run":                            '1',
            "task":                           'cifar10',
            "preprocessing":                  'ztrans',
            "network":                        'smcn',
            "mode":                           'training',
            "n_minibatches":                  '60000',
            "minibatch_size":                 '256',
            "dropout_keep_probs":             '0.5',
            "dropout_keep_probs_inference":   '1.0',
            "optimizer":                      'Adam',
            "lr":                             '0.001',
            "lr_schedule_type":               'constant',
            "lr_decay":                       '0.00004',
            "lr_lin_min":                     '0.0004',
            "lr_lin_steps":                   '60000',
            "lr_step_ep":                     '200 250 300 ',
            "lr_step_multi":                  '0.1 0.01 0.001',
            "use_wd":                         'False',
            "wd_lambda":                      '0.01',
            "create_val_set":                 'True',
            "val_set_fraction":               '0.05',
            "af_set":                         '1_linu',
            "af_weights_init":                'default',
            "load_af_weights_from":           'none',
            "norm_blendw_at_init":            'False',
            "safe_af_ws_n":                   '60',
            "safe_all_ws_n":                  '2',
            "blend_trainable":                'False',
            "blend_mode":                     'unrestricted',
            "swish_beta_trainable":           'False',
            "walltime":                       '89.0',
            "create_checkpoints":             'True',
            "epochs_between_checkpoints":     '8',
            "save_af_weights_at_test_mb":     'True',
            "save_all_weights_at_test_mb":    'True',
            "create_lc_on_the_fly":           'True'}
    return spec


def original_get_spec_dict(dict_of_changes={}):
    spec = original_default_spec()
    if dict_of_changes:
        for key, value in dict_of_changes.items():
            spec[key] = value
    return spec


def original_dict_to_command_str(dict):
    command = 'python3 deepnet_main.py'
    for key, value in dict.items():
        command += ' -'+key+' '+value
    return command


def original_get_command(experiment_name, spec_name, run):
    changes_dict = {"experiment_name": experiment_name, "spec_name": spec_name, "run": str(run)}
    if '_c100_' in spec_name:
        changes_dict["task"] = 'cifar100'
    if 'smcnb_' in spec_name:
        changes_dict["network"] = 'smcnLin'
    if 'smcnc_' in spec_name:
        changes_dict["network"] = 'smcnDeep'
    if 'smcnd_' in spec_name:
        changes_dict["network"] = 'smcnBN'
    if '_sgdm_' in spec_name:
        changes_dict["optimizer"] = 'Momentum'
        changes_dict["lr"] = '0.01'
        changes_dict["lr_schedule_type"] = 'linear'
        changes_dict["lr_lin_min"] = '0.0004'
        changes_dict["lr_lin_step"] = '60000'
    if '_I' in spec_name and not '_alpha_I' in spec_name:  # noqa: E713 (as written in the original)
        pass
    elif '_alpha_I' in spec_name:
        changes_dict["blend_trainable"] = 'True'
    elif '_tanh' in spec_name and not '_alpha_tanh' in spec_name:  # noqa: E713
        changes_dict["af_set"] = '1_tanh'
    elif '_alpha_tanh' in spec_name:
        changes_dict["af_set"] = '1_tanh'
        changes_dict["blend_trainable"] = 'True'
    elif '_relu' in spec_name and not '_alpha_relu' in spec_name:  # noqa: E713
        changes_dict["af_set"] = '1_relu'
    elif '_alpha_relu' in spec_name:
        changes_dict["af_set"] = '1_relu'
        changes_dict["blend_trainable"] = 'True'
    elif '_elu' in spec_name and not '_alpha_elu' in spec_name:  # noqa: E713
        changes_dict["af_set"] = '1_jelu'
    elif '_alpha_elu' in spec_name:
        changes_dict["af_set"] = '1_jelu'
        changes_dict["blend_trainable"] = 'True'
    elif '_selu' in spec_name and not '_alpha_selu' in spec_name:  # noqa: E713
        changes_dict["af_set"] = '1_selu'
    elif '_alpha_selu' in spec_name:
        changes_dict["af_set"] = '1_selu'
        changes_dict["blend_trainable"] = 'True'
    elif '_swish' in spec_name and not '_alpha_swish' in spec_name:  # noqa: E713
        changes_dict["af_set"] = '1_jswish'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_alpha_swish' in spec_name:
        changes_dict["af_set"] = '1_jswish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_ABU_TERIS' in spec_name:
        changes_dict["af_set"] = '5_blend5_swish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_ABU_N_TERIS' in spec_name:
        changes_dict["af_set"] = '5_blend5_swish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["blend_mode"] = 'normalized'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_ABU_P_TERIS' in spec_name:
        changes_dict["af_set"] = '5_blend5_swish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["blend_mode"] = 'posnormed'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_ABU_A_TERIS' in spec_name:
        changes_dict["af_set"] = '5_blend5_swish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["blend_mode"] = 'absnormed'
        changes_dict["swish_beta_trainable"] = 'True'
    elif '_ABU_S_TERIS' in spec_name:
        changes_dict["af_set"] = '5_blend5_swish'
        changes_dict["blend_trainable"] = 'True'
        changes_dict["blend_mode"] = 'softmaxed'
        changes_dict["swish_beta_trainable"] = 'True'
    else:
        raise IOError('\n[ERROR] Requested spec not found (%s).' % (spec_name))
    if '_pre' in spec_name:
        changes_dict["af_weights_init"] = 'predefined'
        changes_dict["load_af_weights_from"] = spec_name.split('_pre')[0]
    if '_prenorm' in spec_name:
        changes_dict["af_weights_init"] = 'predefined'
        changes_dict["load_af_weights_from"] = spec_name.split('_pre')[0]
        changes_dict["norm_blendw_at_init"] = 'True'
    if '_notrain' in spec_name:
        changes_dict["blend_trainable"] = 'False'
        changes_dict["swish_beta_trainable"] = 'False'
    return original_dict_to_command_str(original_get_spec_dict(changes_dict))


# get_settings() of each scheduler variant: experiment_name and spec_list (n_runs 30 in every one)
MAIN_ENDINGS = ['I', 'alpha_I', 'relu', 'alpha_relu', 'tanh', 'alpha_tanh', 'elu', 'alpha_elu', 'selu',
                'alpha_selu', 'swish', 'alpha_swish', 'ABU_TERIS', 'ABU_S_TERIS', 'ABU_N_TERIS', 'ABU_A_TERIS',
                'ABU_P_TERIS']
SCHEDULER_EXPERIMENTS = {
    "paper": ('ASC_main', ['smcn_adam_c10_' + e for e in MAIN_ENDINGS]),
    "paper_smcnLin": ('b_ASC_main', ['smcnb_adam_c10_' + e for e in MAIN_ENDINGS]),
    "paper_smcnDeep": ('c_ASC_main', ['smcnc_adam_c10_' + e for e in MAIN_ENDINGS]),
    "paper_smcnBN": ('d_ASC_main', ['smcnd_adam_c10_' + e for e in MAIN_ENDINGS]),
    "paper_cifar100": ('c100_ASC_main', ['smcn_adam_c100_' + e for e in MAIN_ENDINGS]),
    "paper_momentum": ('m_ASC_main', ['smcn_sgdm_c10_' + e for e in MAIN_ENDINGS]),
    "paper_predefined": ('p_ASC_main', [
        'smcn_adam_c10_alpha_relu_pre_notrain', 'smcn_adam_c10_alpha_tanh_pre_notrain',
        'smcn_adam_c10_alpha_elu_pre_notrain', 'smcn_adam_c10_ABU_TERIS_pre_notrain', 'smcn_adam_c10_alpha_relu_pre',
        'smcn_adam_c10_alpha_tanh_pre', 'smcn_adam_c10_alpha_elu_pre', 'smcn_adam_c10_ABU_TERIS_pre',
        'smcn_adam_c10_ABU_TERIS_prenorm_notrain', 'smcn_adam_c10_ABU_TERIS_prenorm',
        'smcn_adam_c10_ABU_S_TERIS_pre_notrain', 'smcn_adam_c10_ABU_S_TERIS_pre',
        'smcn_adam_c10_ABU_N_TERIS_pre_notrain', 'smcn_adam_c10_ABU_N_TERIS_pre',
        'smcn_adam_c10_ABU_A_TERIS_pre_notrain', 'smcn_adam_c10_ABU_A_TERIS_pre',
        'smcn_adam_c10_ABU_P_TERIS_pre_notrain', 'smcn_adam_c10_ABU_P_TERIS_pre']),
}
# the original deepnet_main's flags (its argparse, allow_abbrev on: '-lr_lin_step' is read as -lr_lin_steps)
ORIGINAL_FLAGS = ("path_relative task preprocessing network mode n_minibatches experiment_name spec_name run "
                  "minibatch_size optimizer dropout_keep_probs dropout_keep_probs_inference lr lr_schedule_type "
                  "lr_decay lr_lin_min lr_lin_steps lr_step_ep lr_step_multi use_wd wd_lambda create_val_set "
                  "val_set_fraction af_set af_weights_init safe_af_ws_n safe_all_ws_n load_af_weights_from "
                  "norm_blendw_at_init blend_trainable blend_mode swish_beta_trainable walltime create_checkpoints "
                  "epochs_between_checkpoints save_af_weights_at_test_mb save_all_weights_at_test_mb "
                  "create_lc_on_the_fly").split()
LISTS = ("dropout_keep_probs", "dropout_keep_probs_inference", "lr_step_ep", "lr_step_multi")


def original_run_flags(command):
    """The flags the original deepnet_main read from a scheduler command, typed as the suite types them."""
    parser = argparse.ArgumentParser()
    for flag in ORIGINAL_FLAGS:
        parser.add_argument(f"-{flag}", type=str, nargs="*" if flag in LISTS else None)
    parsed = vars(parser.parse_args(shlex.split(command)[2:]))
    types = {name: kind for name, kind, *_ in deepnet_main.FLAGS}
    types["walltime"] = float
    return {flag: [types[flag](v) for v in value] if flag in LISTS else types[flag](value)
            for flag, value in parsed.items()}


# Flags the suite has and the original did not, with the value that computes what the original computed.
SUITE_ONLY = {"val_every": 20,                          # the original's val_to_val_mbs, fixed
              "seed": None,                             # the run number (the original: unseeded)
              "bn_inference": "batch_statistics"}       # the original's batch norm at inference


def test_every_spec_of_every_sweep_has_the_schedulers_settings():
    """All 120 specs: the suite's run settings equal those the original deepnet_main got from the scheduler's
    command for the same experiment, spec and run, but for -walltime (the scheduler's 89 minutes were its grid
    jobs' limit: the suite leaves it to the backend) and the predefined sweep's source experiment (the original
    read from its own experiment's folder, where the main sweep's files had to be copied)."""
    checked = 0
    for sweep, (experiment, spec_list) in SCHEDULER_EXPERIMENTS.items():
        assert sv.SWEEPS[sweep]["experiment"] == experiment and list(sv.SWEEPS[sweep]["specs"]) == spec_list
        assert sv.SWEEPS[sweep]["runs"] == "1-30"
        for run in (1, 30):
            runs = sv.plan(sv.parse_args(["--sweep", sweep, "--runs", str(run)]))
            for spec, settings in zip(spec_list, runs):
                original = original_run_flags(original_get_command(experiment, spec, run))
                assert original.pop("walltime") == 89.0 and settings["walltime"] == 0
                for flag, value in original.items():
                    assert settings[flag] == value, (sweep, spec, flag)
                for flag, value in SUITE_ONLY.items():
                    assert settings[flag] == value, (sweep, spec, flag)
                source = "ASC_main" if sweep == "paper_predefined" else ""
                assert settings["load_af_weights_experiment"] == source
                checked += run == 1
    assert checked == 120


def test_the_scheduler_transcription_reads_lr_lin_step_as_lr_lin_steps():
    """The Momentum specs pass "-lr_lin_step 60000" (a typo): the original's argparse took it for -lr_lin_steps."""
    command = original_get_command("m_ASC_main", "smcn_sgdm_c10_relu", 1)
    assert " -lr_lin_step 60000" in command
    flags = original_run_flags(command.replace("-lr_lin_steps 60000", "-lr_lin_steps 1"))
    assert flags["lr_lin_steps"] == 60000 and flags["optimizer"] == "Momentum" and flags["lr"] == 0.01


def test_each_sweep_names_its_reference_and_the_demo_stays_small():
    for sweep, (_, spec_list) in SCHEDULER_EXPERIMENTS.items():
        assert sv.SWEEPS[sweep]["settings"]["reference"] in spec_list
    assert sv.SWEEPS["paper_momentum"]["settings"]["reference"] == "smcn_sgdm_c10_relu"
    demo = sv.SWEEPS["demo"]
    assert len(demo["specs"]) * len(sv.parse_runs(demo["runs"])) * demo["settings"]["n_minibatches"] == 1000


def test_list_sweeps_prints_one_tab_separated_line_per_sweep(capsys):
    assert sv.main(["--list-sweeps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(sv.SWEEPS)
    described = dict(line.split("\t") for line in lines)
    assert described["paper"] == ("17 specs × 30 runs: the paper's main experiment: smcn, Adam, CIFAR-10 "
                                  "(experiment ASC_main)")
    assert described["paper_predefined"].startswith("18 specs × 30 runs: the predefined-initialisation study")
    assert described["demo"].startswith("2 specs × 2 runs: ")


# ---------------------------------------------------------------- the predefined-initialisation dependency

def test_predefined_sweep_dry_runs_with_a_warning_and_refuses_to_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(estimate, "time_steps", lambda settings, threads, deadline, **kw: (0.5, 0.001))
    root = str(tmp_path)
    args = ["--sweep", "paper_predefined", "--runs", "1-2", "--set", f"path_relative={root}"]
    assert sv.main(["--dry-run", *args]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 18 * 2 + 1 and lines[-1].startswith("36 runs, 2,160,000 minibatches in all")
    first = shlex.split(lines[0])
    assert first[first.index("-load_af_weights_from") + 1] == "smcn_adam_c10_alpha_relu"
    assert first[first.index("-load_af_weights_experiment") + 1] == "ASC_main"
    folder = os.path.join(root, "3_output_cifar", "ASC_main", "0_af_weights")
    assert captured.err == (f"warning: 16 of the 16 AF-weights files these runs start from are missing (or their run "
                            f"is not complete) in {folder}: run --sweep paper first\n")
    with pytest.raises(UserError, match=r"^--sweep paper_predefined: 16 of the 16 AF-weights files .* run --sweep "
                                        r"paper first$"):
        sv.main(args)
    assert not os.listdir(root)


# ---------------------------------------------------------------- the dry run's wall-time estimate

class FakeTimer:
    """A clock that advances `step` seconds at every reading."""

    def __init__(self, step, start=1000.0):
        self.now, self.step, self.readings = start, step, 0

    def __call__(self):
        self.now += self.step
        self.readings += 1
        return self.now


def tiny_run(root, **changes):
    settings = sv.plan(sv.parse_args(["--sweep", "demo", "--runs", "1", "--set", f"path_relative={root}"]))[0]
    return {**settings, "network": "smcnLin", "minibatch_size": 4, **changes}


def test_timed_steps_do_not_depend_on_the_machine(tmp_path):
    timer = FakeTimer(0.25)
    step, per_image = estimate.step_timing(tiny_run(tmp_path), 1, deadline=float("inf"), steps=3, timer=timer)
    # three timed steps and one timed inference, two readings each, 0.25 s apart; a deadline check before the
    # second and the third step
    assert timer.readings == 2 * 3 + 2 * 1 + 2
    assert step == 0.25 and per_image == 0.25 / 4
    late = FakeTimer(0.25)
    estimate.step_timing(tiny_run(tmp_path), 1, deadline=0.0, steps=3, timer=late)
    assert late.readings == 2 + 1 + 2            # past the deadline: one timed step, then the inference


def test_measure_times_each_network_and_kind_once_within_the_budget(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(estimate, "time_steps", lambda settings, threads, deadline, timer: calls.append(
        (estimate.timing_key(settings), threads, deadline)) or (0.5, 0.001))
    runs = [tiny_run(tmp_path, af_set="1_relu"), tiny_run(tmp_path, af_set="1_tanh"),
            tiny_run(tmp_path, af_set="5_blend5_swish"), tiny_run(tmp_path, network="smcnBN")]
    timings = estimate.measure(runs, workers=1, budget_s=60, timer=FakeTimer(0.0, start=100.0))
    assert list(timings) == [("smcnLin", "cifar10", "1 function"), ("smcnLin", "cifar10", "blend"),
                             ("smcnBN", "cifar10", "1 function")]
    threads = max(1, os.cpu_count() // 1)
    assert calls == [(key, threads, 100.0 + 60 * (i + 1) / 3) for i, key in enumerate(timings)]


def test_estimate_line_from_given_timings(tmp_path):
    root = str(tmp_path)
    plain = dict(sv.plan(sv.parse_args(["--sweep", "paper", "--runs", "1", "--specs", "smcn_adam_c10_relu",
                                        "--set", f"path_relative={root}", "--set", "n_minibatches=100"]))[0])
    blend = dict(plain, spec_name="abu", af_set="5_blend5_swish")
    resumed = dict(plain, run=2)
    status_file = commands.run_paths(resumed)['status']
    os.makedirs(os.path.dirname(status_file))
    with open(status_file, "w") as handle:
        handle.write('{"state": "incomplete", "last_checkpoint_mb": 40}')
    timings = {("smcn", "cifar10", "1 function"): (0.5, 0.002), ("smcn", "cifar10", "blend"): (0.6, 0.003)}
    # validations at 0, 20, ..., 100 on the 2,560-image split, then the 10,000-image test
    fresh = 100 * 0.5 + (6 * 2560 + 10000) * 0.002                   # 50 + 50.72 = 100.72 s
    abu = 100 * 0.6 + (6 * 2560 + 10000) * 0.003                     # 60 + 76.08 = 136.08 s
    rest = 60 * 0.5 + (3 * 2560 + 10000) * 0.002                     # from mb 40: 30 + 35.36 = 65.36 s
    assert estimate.run_seconds(plain, 0.5, 0.002, 100) == pytest.approx(fresh)
    assert estimate.run_seconds(resumed, 0.5, 0.002, 60) == pytest.approx(rest)
    line = estimate.estimate_line([plain, blend, resumed], timings, workers=2)
    # two workers: abu (136 s) on one, plain then resumed (100.72 + 65.36 = 166.08 s) on the other
    assert line == ("3 runs, 260 minibatches in all; estimated wall time 0:02:46 with --workers 2 on this machine "
                    "(per training step: smcn cifar10 1 function 500 ms, smcn cifar10 blend 600 ms)")
    assert estimate.estimate_line([plain, blend, resumed], timings, workers=1).split("wall time ")[1].startswith(
        f"{deepnet_util.clock(fresh + abu + rest)} with --workers 1")


# ---------------------------------------------------------------- a small real chain: paper, then predefined

TINY = ["--set", "n_minibatches=24", "--set", "minibatch_size=16", "--set", "val_every=4",
        "--set", "epochs_between_checkpoints=1", "--set", "safe_af_ws_n=3", "--set", "safe_all_ws_n=1",
        "--set", "create_lc_on_the_fly=False", "--runs", "2", "--workers", "2"]


def test_the_predefined_sweep_starts_from_what_the_paper_sweep_learned(tmp_path):
    root = write_tiny_data(str(tmp_path))
    main_specs = "smcn_adam_c10_alpha_relu,smcn_adam_c10_ABU_TERIS"
    lines = []
    assert sv.main(["--sweep", "paper", "--specs", main_specs, "--set", f"path_relative={root}", "--no-analysis",
                    *TINY], out=lines.append) == 0
    assert "finished: 2 complete, 0 failed, 0 incomplete, 0 diverged" in lines
    pre = "smcn_adam_c10_alpha_relu_pre,smcn_adam_c10_ABU_TERIS_prenorm_notrain"
    lines = []
    assert sv.main(["--sweep", "paper_predefined", "--specs", pre, "--set", f"path_relative={root}", *TINY],
                   out=lines.append) == 0
    assert "finished: 2 complete, 0 failed, 0 incomplete, 0 diverged" in lines
    assert any(line.startswith("report: ") for line in lines)
    output = os.path.join(root, "3_output_cifar")
    for run in (2,):
        for spec, source, normalised in (("smcn_adam_c10_alpha_relu_pre", "smcn_adam_c10_alpha_relu", False),
                                         ("smcn_adam_c10_ABU_TERIS_prenorm_notrain", "smcn_adam_c10_ABU_TERIS",
                                          True)):
            # the newest AF-weights file of the same run of the main sweep: minibatch 24
            saved = load_pickle(os.path.join(output, "ASC_main", "0_af_weights",
                                             f"af_weights_{source}_run_{run}_mb_24.pkl"))
            record = load_pickle(os.path.join(output, "p_ASC_main", spec, f"run_{run}",
                                              f"record_{spec}_run_{run}.pkl"))
            at_start = record["val_af_weights_hist"][0]
            for layer, weights in at_start.items():
                want = np.asarray(saved[f"smcn/{layer}/blend_weights_raw:0"], np.float32)
                want = want / np.sum(want) if normalised else want
                np.testing.assert_allclose(weights["blend_weights_raw"], want, rtol=1e-6)
                if source.endswith("ABU_TERIS"):
                    assert weights["swish_beta"] == pytest.approx(saved[f"smcn/{layer}/swish_beta:0"][0])
            if spec.endswith("notrain"):   # fixed: the same at the end
                np.testing.assert_array_equal(record["test_af_weights"]["conv1"]["blend_weights_raw"],
                                              at_start["conv1"]["blend_weights_raw"])
    assert os.path.isfile(os.path.join(output, "p_ASC_main", "0_analysis", "report.html"))
