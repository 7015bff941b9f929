"""The activation functions, as data: one registry serves the graph, the numpy reference and the plots.

Owns the base functions (each with its plot label, its TF graph builder and its float64 numpy reference), the
named blends, the blend modes (raw -> effective weights, TF and numpy), activation-set names
(``-af_set``), the numpy reference of a whole blended activation, and the initial AF weights of a run (default or
predefined from a saved AF-weights file). Imports no TensorFlow: the graph builders import it when first called
(deepnet_network builds the graphs).

An activation set (``-af_set``) names the base functions an activated layer blends:

    <n>_<function>              one function, e.g. 1_relu (with -blend_trainable: adaptive scaling)
    <n>_<f1>+<f2>+...+<fn>      a blend of any base functions, e.g. 3_relu+tanh+jswish
    5_blend5_swish              the paper's ABU: relu, jelu, tanh, jswish, linu, in that order

The leading count must equal the number of functions.
"""
import functools
import re
from collections import namedtuple

import numpy as np

from deepnet_util import UserError, import_tf, load_pickle
from deepnet import architectures, run_folder


@functools.lru_cache(maxsize=None)
def _tf():
    """TensorFlow's TF1 API, imported when a graph builder is first called."""
    return import_tf()


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _np_sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _np_elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


BaseFunction = namedtuple("BaseFunction", "label graph numpy uses_beta")

# One registry serves the graph (TF ops of x and beta), the numpy reference and the plots.
BASE_FUNCTIONS = {
    "relu": BaseFunction("ReLU", lambda x, b: _tf().nn.relu(x), lambda x, b: np.maximum(x, 0), False),
    "jelu": BaseFunction("ELU", lambda x, b: _tf().nn.elu(x), lambda x, b: _np_elu(x), False),
    "tanh": BaseFunction("tanh", lambda x, b: _tf().tanh(x), lambda x, b: np.tanh(x), False),
    "jswish": BaseFunction("Swish", lambda x, b: x * _tf().sigmoid(b * x),
                           lambda x, b: x * _np_sigmoid(b * x), True),
    "linu": BaseFunction("identity", lambda x, b: _tf().identity(x), lambda x, b: np.array(x, copy=True),
                         False),
    "selu": BaseFunction("SELU", lambda x, b: _tf().nn.selu(x),
                         lambda x, b: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
                         False),
}


NAMED_BLENDS = {"blend5_swish": ("relu", "jelu", "tanh", "jswish", "linu")}

POSNORM_MIN, POSNORM_MAX = 1e-4, 1e3

# 'posnormed' is the original's: it computed the clipped weights, then overwrote them with the 'normalized'
# ones, so it IS 'normalized' (every ABU_P number of the paper is an ABU_N number). 'clipnormed' is what
# posnormed was meant to be: clip to [POSNORM_MIN, POSNORM_MAX], then normalise.
BLEND_MODES = {  # name: (TF, numpy)
    "unrestricted": (lambda w: w, lambda w: w),
    "normalized": (lambda w: w / _tf().reduce_sum(w), lambda w: w / np.sum(w)),
    "posnormed": (lambda w: w / _tf().reduce_sum(w), lambda w: w / np.sum(w)),
    "absnormed": (lambda w: w / _tf().reduce_sum(_tf().abs(w)), lambda w: w / np.sum(np.abs(w))),
    "softmaxed": (lambda w: _tf().nn.softmax(w), lambda w: np.exp(w - np.max(w)) / np.sum(np.exp(w - np.max(w)))),
    "clipnormed": (lambda w: _clipnorm(w, _tf().clip_by_value, _tf().reduce_sum),
                   lambda w: _clipnorm(w, np.clip, np.sum)),
}


def _clipnorm(w, clip, total):
    clipped = clip(w, POSNORM_MIN, POSNORM_MAX)
    return clipped / total(clipped)


def parse_af_set(af_set):
    """'5_blend5_swish' -> ('relu', 'jelu', 'tanh', 'jswish', 'linu'); ValueError if malformed."""
    match = re.fullmatch(r"([0-9]+)_(.+)", str(af_set))  # ASCII digits only: int() would read '١' as 1
    if not match:
        raise ValueError(f"activation set '{af_set}' is not of the form <count>_<functions>, "
                         "e.g. 1_relu, 5_blend5_swish or 3_relu+tanh+jswish")
    count, body = int(match.group(1)), match.group(2)
    names = NAMED_BLENDS.get(body) or tuple(body.split("+"))
    unknown = [repr(name) for name in names if name not in BASE_FUNCTIONS]
    if unknown:
        raise ValueError(f"activation set '{af_set}': unknown function(s) {', '.join(unknown)} "
                         f"(known: {', '.join(BASE_FUNCTIONS)}; blends: {', '.join(NAMED_BLENDS)})")
    if count != len(names):
        raise ValueError(f"activation set '{af_set}': the count {count} does not match its "
                         f"{len(names)} function(s)")
    return names


def uses_swish_beta(af_set):
    return any(BASE_FUNCTIONS[name].uses_beta for name in parse_af_set(af_set))


def _check_blend_mode(blend_mode):
    if blend_mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode '{blend_mode}' (known: {', '.join(BLEND_MODES)})")


def effective_weights(blend_weights_raw, blend_mode):
    """TF: the weights that multiply the functions, after the blend mode."""
    _check_blend_mode(blend_mode)
    return BLEND_MODES[blend_mode][0](blend_weights_raw)


def effective_weights_numpy(blend_weights_raw, blend_mode):
    _check_blend_mode(blend_mode)
    return BLEND_MODES[blend_mode][1](np.asarray(blend_weights_raw, dtype=np.float64))


def activation_numpy(x, af_set, blend_weights_raw, swish_beta=1.0, blend_mode="unrestricted"):
    """The blended activation sum_i w_i f_i(x) (deepnet_network.activation), in numpy (float64)."""
    names = parse_af_set(af_set)
    weights = effective_weights_numpy(blend_weights_raw, blend_mode)
    if weights.shape != (len(names),):
        raise ValueError(f"activation set '{af_set}' needs {len(names)} blend weights, got {weights.shape}")
    x = np.asarray(x, dtype=np.float64)
    return sum(w * BASE_FUNCTIONS[name].numpy(x, float(swish_beta)) for w, name in zip(weights, names))


def default_af_init(network, af_set):
    n = len(parse_af_set(af_set))
    return {name: {"blend_weights": np.full(n, 1.0 / n, np.float32), "swish_beta": 1.0}
            for name in architectures.activated_layers(network)}


def initial_af_weights(settings, base=None):
    """The run's initial AF weights: None (the default, 1/n each) or, with -af_weights_init predefined, those of
    predefined_af_init (UserError if they cannot be used); base as for run_folder.project_root."""
    if settings["af_weights_init"] != "predefined":
        return None
    return predefined_af_init(run_folder.af_weights_source_dir(settings, base), settings["load_af_weights_from"],
                              settings["run"], settings["network"], settings["af_set"],
                              settings["norm_blendw_at_init"])


def af_weights_problem(runs, base=None):
    """'' or one line: the first refusal of initial_af_weights among runs (settings dicts), naming the run; each
    source file is read once per network and activation set."""
    seen = set()
    for settings in runs:
        key = tuple(settings[flag] for flag in ("af_weights_init", "load_af_weights_experiment", "experiment_name",
                                                "load_af_weights_from", "run", "network", "af_set",
                                                "norm_blendw_at_init"))
        if settings["af_weights_init"] != "predefined" or key in seen:
            continue
        seen.add(key)
        try:
            initial_af_weights(settings, base)
        except UserError as err:
            return f"{settings['spec_name']} run {settings['run']}: {err}"
    return ""


def _finite_floats(values, path, what):
    """values as a float32 array (UserError naming the file and what it holds unless they are finite numbers)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: inf, refused below
            array = np.asarray(values, np.float32)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {what} must be numbers") from None
    if not np.all(np.isfinite(array)):
        values = np.ravel(array)
        shown = "[" + ", ".join(f"{value:g}" for value in values) + "]" if len(values) <= 8 else "non-finite values"
        raise UserError(f"{path}: {what} must be finite, got {shown}")
    return array


def predefined_af_init(exp_dir, spec, run, network, af_set, normalize=False):
    """Initial AF weights from the newest AF-weights file of spec/run, written by this suite or the
    original (both: '<network>/<layer>/blend_weights_raw:0' -> list; the original's older
    '.../blend_weights:0' too). UserError if absent or unfit: the wrong number of blend weights, or values that
    are not finite float32 numbers (a NaN would make the run diverge at once)."""
    path = run_folder.newest_af_weights_file(exp_dir, spec, run)
    if path is None:
        raise UserError(f"-load_af_weights_from {spec}: no AF-weights file for run {run} in "
                        f"{run_folder.af_weights_dir(exp_dir)}")
    saved = load_pickle(path)
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not an AF-weights dict")
    n, needs_beta = len(parse_af_set(af_set)), uses_swish_beta(af_set)
    init = {}
    for layer in architectures.activated_layers(network):
        scope = f"{network}/{layer}"
        weights = saved.get(f"{scope}/blend_weights_raw:0", saved.get(f"{scope}/blend_weights:0"))
        if weights is not None:
            weights = _finite_floats(weights, path, f"the blend weights of {scope}")
        if weights is None or weights.shape != (n,):
            raise UserError(f"{path}: has no {n} blend weights for {scope} (activation set {af_set})")
        if normalize:
            with np.errstate(over="ignore"):
                total = np.sum(weights)
            if total == 0 or not np.isfinite(total):
                raise UserError(f"{path}: -norm_blendw_at_init: the blend weights of {layer} sum to {total:g}")
            with np.errstate(over="ignore"):
                weights = _finite_floats(weights / total, path, f"the normalised blend weights of {scope}")
        beta = 1.0
        if needs_beta:
            value = saved.get(f"{scope}/swish_beta:0")
            if value is not None:
                value = _finite_floats(value, path, f"the swish_beta of {scope}")
            if value is None or value.size != 1:
                raise UserError(f"{path}: has no swish_beta for {scope} (saved only when it was trainable)")
            beta = float(value.ravel()[0])
        init[layer] = {"blend_weights": weights, "swish_beta": beta}
    return init
