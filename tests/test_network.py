"""Tests for deepnet_network: activations, blend modes, architectures, init, loss, training, AF files.

Every numerical check compares against a reference written here (never BASE_FUNCTIONS or
activation_numpy), so a bug shared by the graph and the numpy code of the module is still caught.
"""
import os
import pickle
import sys
from contextlib import contextmanager

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepnet import activations, architectures, outputs, run_folder, schedule  # noqa: E402
import deepnet_network as dn  # noqa: E402
from deepnet_util import UserError, save_pickle  # noqa: E402

tf = dn.tf

# ---------------------------------------------------------------- independent references

REF_SELU_ALPHA = 1.6732632423543772
REF_SELU_SCALE = 1.0507009873554805
REF_BN_EPS, REF_BN_DECAY = 1e-3, 0.99


def ref_relu(x, beta):
    return np.where(x > 0, x, 0.0)


def ref_elu(x, beta):
    return np.where(x > 0, x, np.exp(np.minimum(x, 0.0)) - 1.0)


def ref_tanh(x, beta):
    with np.errstate(over="ignore"):
        return 1.0 - 2.0 / (np.exp(2.0 * x) + 1.0)


def ref_swish(x, beta):
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-beta * x))


def ref_identity(x, beta):
    return x * 1.0


def ref_selu(x, beta):
    return REF_SELU_SCALE * np.where(x > 0, x, REF_SELU_ALPHA * (np.exp(np.minimum(x, 0.0)) - 1.0))


REF_FUNCTIONS = {"relu": ref_relu, "jelu": ref_elu, "tanh": ref_tanh, "jswish": ref_swish,
                 "linu": ref_identity, "selu": ref_selu}
REF_SETS = {
    "1_relu": ["relu"], "1_jelu": ["jelu"], "1_tanh": ["tanh"], "1_jswish": ["jswish"],
    "1_linu": ["linu"], "1_selu": ["selu"],
    "5_blend5_swish": ["relu", "jelu", "tanh", "jswish", "linu"],
    "3_relu+tanh+jswish": ["relu", "tanh", "jswish"],
    "2_selu+linu": ["selu", "linu"],
}
MODES = ["unrestricted", "normalized", "posnormed", "absnormed", "softmaxed", "clipnormed"]
# Raw weights with negative entries and sums well away from zero (for 'normalized').
RAW_WEIGHTS = {1: [-0.3], 2: [-0.6, 1.4], 3: [0.7, -0.5, 1.1], 5: [0.9, -0.4, 0.6, 0.5, -0.2]}


def original_posnormed(blend_weights_raw):
    """The original's posnormed (deepnet_networks.py, Network.__activate), transcribed to numpy:
        blend_weights = tf.divide(tf.clip_by_value(blend_weights_raw, 0.0001, 1000.0),
                                  tf.reduce_sum(tf.clip_by_value(blend_weights_raw, 0.0001, 1000.0), keep_dims=True))
        blend_weights = tf.divide(blend_weights_raw, tf.reduce_sum(blend_weights_raw, keep_dims=True))"""
    blend_weights = np.clip(blend_weights_raw, 0.0001, 1000.0) / np.sum(np.clip(blend_weights_raw, 0.0001, 1000.0),
                                                                       keepdims=True)
    blend_weights = blend_weights_raw / np.sum(blend_weights_raw, keepdims=True)
    return blend_weights


def ref_effective(w, mode):
    w = np.asarray(w, np.float64)
    if mode == "unrestricted":
        return w.copy()
    if mode == "normalized":
        return w / w.sum()
    if mode == "posnormed":
        return original_posnormed(w)
    if mode == "clipnormed":
        clipped = np.minimum(np.maximum(w, 1e-4), 1e3)
        return clipped / clipped.sum()
    if mode == "absnormed":
        return w / np.abs(w).sum()
    if mode == "softmaxed":
        e = np.exp(w - w.max())
        return e / e.sum()
    raise AssertionError(mode)


def ref_blend(x, names, raw, beta, mode):
    eff = ref_effective(raw, mode)
    x = np.asarray(x, np.float64)
    return sum(eff[i] * REF_FUNCTIONS[name](x, beta) for i, name in enumerate(names))


# ---------------------------------------------------------------- helpers

def make_settings(**overrides):
    settings = dict(network="smcn", af_set="1_relu", blend_mode="unrestricted", blend_trainable=True,
                    swish_beta_trainable=True, seed=3, n_classes=10, use_wd=False, wd_lambda=0.0,
                    optimizer="SGD")
    settings.update(overrides)
    return settings


@contextmanager
def session_for(settings, af_init=None):
    """A fresh graph with build_model(settings), and an initialised session on it."""
    with tf.Graph().as_default():
        model = dn.build_model(settings, af_init)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            yield model, sess


def variables_by_name():
    return {v.op.name: v for v in tf.global_variables()}


def images(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


# ---------------------------------------------------------------- registry and parsing

X_POINTS = np.array([-30.0, -5.0, -1.0, -0.25, -1e-3, 0.0, 1e-3, 0.25, 1.0, 5.0, 30.0])


def test_registry_has_the_six_base_functions():
    assert set(activations.BASE_FUNCTIONS) == {"relu", "jelu", "tanh", "jswish", "linu", "selu"}
    assert [n for n, f in activations.BASE_FUNCTIONS.items() if f.uses_beta] == ["jswish"]


@pytest.mark.parametrize("name", sorted(REF_FUNCTIONS))
@pytest.mark.parametrize("beta", [1.0, 0.4, 2.5])
def test_base_function_numpy_values(name, beta):
    got = activations.BASE_FUNCTIONS[name].numpy(X_POINTS, beta)
    np.testing.assert_allclose(got, REF_FUNCTIONS[name](X_POINTS, beta), rtol=1e-12, atol=1e-12)


def test_base_function_landmarks():
    x = np.array([-30.0, 0.0, 30.0])
    expected = {
        "relu": [0.0, 0.0, 30.0],
        "jelu": [np.exp(-30.0) - 1.0, 0.0, 30.0],
        "tanh": [-1.0, 0.0, 1.0],
        "jswish": [-30.0 / (1 + np.exp(30.0)), 0.0, 30.0 / (1 + np.exp(-30.0))],
        "linu": [-30.0, 0.0, 30.0],
        "selu": [-1.0507009873554805 * 1.6732632423543772 * (1 - np.exp(-30.0)), 0.0, 30 * 1.0507009873554805],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(activations.BASE_FUNCTIONS[name].numpy(x, 1.0), values, rtol=1e-12, atol=1e-15,
                                   err_msg=name)


def test_base_function_graph_values_float32_and_float64():
    with tf.Graph().as_default(), tf.Session() as sess:
        for dtype, tol in ((tf.float32, 2e-6), (tf.float64, 1e-12)):
            x = tf.constant(X_POINTS, dtype)
            beta = tf.constant(1.7, dtype)
            got = sess.run({n: f.graph(x, beta) for n, f in activations.BASE_FUNCTIONS.items()})
            for name, values in got.items():
                np.testing.assert_allclose(values, REF_FUNCTIONS[name](X_POINTS, 1.7), rtol=tol, atol=tol,
                                           err_msg=f"{name} {dtype}")


def test_parse_af_set_values():
    for af_set, names in REF_SETS.items():
        assert list(activations.parse_af_set(af_set)) == names
    assert activations.uses_swish_beta("5_blend5_swish") and activations.uses_swish_beta("3_relu+tanh+jswish")
    assert not activations.uses_swish_beta("1_relu") and not activations.uses_swish_beta("2_selu+linu")


@pytest.mark.parametrize("af_set, message", [
    ("4_blend5_swish", "count 4"), ("2_relu", "count 2"), ("1_relu+tanh", "count 1"), ("0_relu", "count 0"),
    ("1_foo", "foo"), ("2_relu+swish", "swish"), ("1_ReLU", "ReLU"), ("relu", "form"), ("", "form"),
    ("1_", "form"), ("x_relu", "form"), ("6_blend5_swish+selu", "blend5_swish"),
])
def test_parse_af_set_rejects(af_set, message):
    with pytest.raises(ValueError, match=message):
        activations.parse_af_set(af_set)


def test_unknown_blend_mode_raises_everywhere():
    with pytest.raises(ValueError, match="blend mode 'foo'"):
        activations.effective_weights_numpy([1.0], "foo")
    with pytest.raises(ValueError, match="blend mode 'foo'"):
        activations.activation_numpy([1.0], "1_relu", [1.0], blend_mode="foo")
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="blend mode 'foo'"):
            dn.activation(tf.zeros([3]), "1_relu", [1.0], blend_mode="foo")
        with pytest.raises(ValueError, match="blend mode 'foo'"):
            dn.inference(dn.make_inputs(), make_settings(blend_mode="foo"))


def test_wrong_number_of_blend_weights_raises():
    with pytest.raises(ValueError, match="blend weights"):
        activations.activation_numpy([1.0], "5_blend5_swish", [0.2] * 4)
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="blend weights"):
            dn.activation(tf.zeros([3]), "1_relu", [0.2, 0.3, 0.5])
        with pytest.raises(ValueError, match="blend weights"):
            dn.activation(tf.zeros([3]), "5_blend5_swish", [0.2] * 6)
        with pytest.raises(ValueError, match="blend weights"):
            dn.activation(tf.zeros([3]), "1_relu", 1.0)
        dn.activation(tf.zeros([3]), "2_relu+tanh", tf.placeholder(tf.float32, [None]))  # unknown length: fine


# ---------------------------------------------------------------- blend modes

BLEND_CASES = [
    [0.9, -0.4, 0.6, 0.5, -0.2],
    [-0.6, 1.4],
    [2000.0, 0.5, -3.0],  # clipnormed clips both ends
    [-2.0, -1.0, -0.5],   # all negative
    [0.3],
]


@pytest.mark.parametrize("mode", MODES)
def test_effective_weights_numpy_and_graph(mode):
    with tf.Graph().as_default(), tf.Session() as sess:
        for raw in BLEND_CASES:
            want = ref_effective(raw, mode)
            np.testing.assert_allclose(activations.effective_weights_numpy(raw, mode), want, rtol=1e-12)
            got = sess.run(activations.effective_weights(tf.constant(raw, tf.float64), mode))
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=str(raw))


def test_effective_weights_hand_values():
    np.testing.assert_allclose(activations.effective_weights_numpy([-1.0, 1.0], "clipnormed"),
                               [1e-4 / (1 + 1e-4), 1 / (1 + 1e-4)])
    np.testing.assert_allclose(activations.effective_weights_numpy([5000.0, 1000.0], "clipnormed"), [0.5, 0.5])
    np.testing.assert_allclose(activations.effective_weights_numpy([-1.0, 3.0], "posnormed"), [-0.5, 1.5])  # = normalized
    np.testing.assert_allclose(activations.effective_weights_numpy([-1.0, 3.0], "absnormed"), [-0.25, 0.75])
    np.testing.assert_allclose(activations.effective_weights_numpy([-1.0, 3.0], "normalized"), [-0.5, 1.5])
    np.testing.assert_allclose(activations.effective_weights_numpy([0.0, np.log(3.0)], "softmaxed"), [0.25, 0.75])
    np.testing.assert_allclose(activations.effective_weights_numpy([-1.0, 3.0], "unrestricted"), [-1.0, 3.0])


# ---------------------------------------------------------------- blended activation values

X_ACT = np.concatenate([X_POINTS, np.linspace(-4, 4, 17)])


def test_activation_graph_equals_numpy_and_reference():
    beta = 1.6
    fetches = {}
    with tf.Graph().as_default(), tf.Session() as sess:
        x = tf.constant(X_ACT, tf.float32)
        for af_set, names in REF_SETS.items():
            for mode in MODES:
                raw = RAW_WEIGHTS[len(names)]
                fetches[af_set, mode] = dn.activation(x, af_set, tf.constant(raw, tf.float32),
                                                      tf.constant(beta, tf.float32), mode)
        got = sess.run(fetches)
    for (af_set, mode), values in got.items():
        raw = RAW_WEIGHTS[len(REF_SETS[af_set])]
        want = ref_blend(X_ACT, REF_SETS[af_set], raw, beta, mode)
        numpy_values = activations.activation_numpy(X_ACT, af_set, raw, beta, mode)
        np.testing.assert_allclose(numpy_values, want, rtol=1e-12, atol=1e-12, err_msg=f"{af_set} {mode}")
        np.testing.assert_allclose(values, want, rtol=2e-5, atol=2e-5, err_msg=f"{af_set} {mode}")
        assert values.dtype == np.float32


def test_abu_component_order():
    """One-hot weights pick relu, elu, tanh, swish, identity in that order."""
    x = np.linspace(-3, 3, 13)
    order = [ref_relu, ref_elu, ref_tanh, ref_swish, ref_identity]
    with tf.Graph().as_default(), tf.Session() as sess:
        outs = [dn.activation(tf.constant(x), "5_blend5_swish", np.eye(5)[i], 0.7) for i in range(5)]
        got = sess.run(outs)
    for i, ref in enumerate(order):
        np.testing.assert_allclose(got[i], ref(x, 0.7), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(activations.activation_numpy(x, "5_blend5_swish", np.eye(5)[i], 0.7), ref(x, 0.7),
                                   rtol=1e-12, atol=1e-12)


def test_activation_defaults_beta_one_and_unrestricted():
    x = np.linspace(-3, 3, 7)
    raw = [0.5, 2.0, -1.0]
    with tf.Graph().as_default(), tf.Session() as sess:
        got = sess.run(dn.activation(tf.constant(x), "3_relu+tanh+jswish", raw))
    np.testing.assert_allclose(got, ref_blend(x, ["relu", "tanh", "jswish"], raw, 1.0, "unrestricted"),
                               rtol=1e-12)


def test_activation_accepts_float32_variables_and_gradients_reach_them():
    with tf.Graph().as_default(), tf.Session() as sess:
        w = tf.Variable([0.2] * 5, dtype=tf.float32)
        b = tf.Variable(1.0, dtype=tf.float32)
        out = dn.activation(tf.constant([-1.0, 0.5, 2.0]), "5_blend5_swish", w, b, "softmaxed")
        grads = tf.gradients(tf.reduce_sum(out), [w, b])
        sess.run(tf.global_variables_initializer())
        gw, gb = sess.run(grads)
    assert np.all(np.isfinite(gw)) and np.any(gw != 0) and gb != 0


# ---------------------------------------------------------------- gradients (float64, finite differences)

GRAD_SETS = ["5_blend5_swish", "3_relu+tanh+jswish", "1_jswish", "2_selu+linu", "1_jelu"]
X_GRAD = np.array([-3.1, -1.2, -0.4, 0.35, 0.9, 2.7])
H = 1e-6


def central_difference(f, value, h=H):
    value = np.array(value, np.float64)
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        up, down = value.copy(), value.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


def test_activation_gradients_match_finite_differences():
    beta = 1.3
    coef = np.random.default_rng(1).normal(size=X_GRAD.shape)
    graphs = {}
    with tf.Graph().as_default(), tf.Session() as sess:
        for af_set in GRAD_SETS:
            for mode in MODES:
                x = tf.constant(X_GRAD, tf.float64)
                w = tf.constant(RAW_WEIGHTS[len(REF_SETS[af_set])], tf.float64)
                b = tf.constant(beta, tf.float64)
                out = dn.activation(x, af_set, w, b, mode)
                assert out.dtype == tf.float64
                grads = tf.gradients(tf.reduce_sum(coef * out), [x, w, b])
                graphs[af_set, mode] = [g if g is not None else tf.constant(0.0, tf.float64) for g in grads]
        got = sess.run(graphs)
    for (af_set, mode), (gx, gw, gb) in got.items():
        names, raw = REF_SETS[af_set], RAW_WEIGHTS[len(REF_SETS[af_set])]

        def objective(x=X_GRAD, w=raw, b=beta):
            return float(np.sum(coef * ref_blend(x, names, w, b, mode)))

        label = f"{af_set} {mode}"
        np.testing.assert_allclose(gx, central_difference(lambda v: objective(x=v), X_GRAD),
                                   rtol=1e-6, atol=1e-8, err_msg=label + " d/dx")
        np.testing.assert_allclose(gw, central_difference(lambda v: objective(w=v), raw),
                                   rtol=1e-6, atol=1e-8, err_msg=label + " d/dw")
        np.testing.assert_allclose(gb, central_difference(lambda v: objective(b=float(v)), beta),
                                   rtol=1e-6, atol=1e-8, err_msg=label + " d/dbeta")


def test_swish_beta_gradient_is_nonzero_only_with_swish():
    with tf.Graph().as_default():
        b = tf.constant(1.0, tf.float64)
        x = tf.constant(X_GRAD, tf.float64)
        assert tf.gradients(dn.activation(x, "2_selu+linu", [0.5, 0.5], b), b) == [None]
        assert tf.gradients(dn.activation(x, "1_jswish", [1.0], b), b)[0] is not None


# ---------------------------------------------------------------- architectures

EXPECTED_ARCHITECTURES = {
    "smcn": [("conv", 5, 64), ("dropout",), ("conv", 3, 64), ("maxpool", 3, 2), ("conv", 1, 64), ("dropout",),
             ("conv", 5, 64), ("maxpool", 3, 2), ("dense", 384), ("dropout",), ("dense", 192), ("logits",)],
    "smcnLin": [("conv", 5, 64), ("conv", 3, 64), ("avgpool", 2, 2), ("conv", 1, 64), ("conv", 5, 64),
                ("avgpool", 2, 2), ("dense", 384), ("dense", 192), ("logits",)],
    "smcnDeep": [("conv", 5, 64), ("dropout",), ("conv", 3, 64), ("maxpool", 3, 2)]
                + 3 * [("conv", 1, 64), ("dropout",), ("conv", 5, 64)]
                + [("maxpool", 3, 2), ("dense", 384), ("dropout",), ("dense", 192), ("logits",)],
    "smcnBN": [("conv", 5, 64), ("conv", 3, 64), ("maxpool", 3, 2), ("conv", 1, 64), ("conv", 5, 64),
               ("maxpool", 3, 2), ("dense", 384), ("dense", 192), ("logits",)],
}
# The weighted layers as the original (leonsuetfeld/activations, deepnet_networks.py) names them: the
# varscope '<namescope>/<layer>' of each __conv2d_layer / __dense_layer call, numbered through the net.
ORIGINAL_LAYERS = {
    "smcn": ["conv1", "conv2", "conv3", "conv4", "dense5", "dense6", "denseout"],
    "smcnLin": ["conv1", "conv2", "conv3", "conv4", "dense5", "dense6", "denseout"],
    "smcnBN": ["conv1", "conv2", "conv3", "conv4", "dense5", "dense6", "denseout"],
    "smcnDeep": ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "conv8", "dense9", "dense10",
                 "denseout"],
}
EXPECTED_WEIGHT_SHAPES = {
    "smcn": {"conv1": (5, 5, 3, 64), "conv2": (3, 3, 64, 64), "conv3": (1, 1, 64, 64), "conv4": (5, 5, 64, 64),
             "dense5": (8 * 8 * 64, 384), "dense6": (384, 192), "denseout": (192, 10)},
}
EXPECTED_WEIGHT_SHAPES["smcnLin"] = EXPECTED_WEIGHT_SHAPES["smcn"]
EXPECTED_WEIGHT_SHAPES["smcnBN"] = EXPECTED_WEIGHT_SHAPES["smcn"]
EXPECTED_WEIGHT_SHAPES["smcnDeep"] = {
    "conv1": (5, 5, 3, 64), "conv2": (3, 3, 64, 64), "conv3": (1, 1, 64, 64), "conv4": (5, 5, 64, 64),
    "conv5": (1, 1, 64, 64), "conv6": (5, 5, 64, 64), "conv7": (1, 1, 64, 64), "conv8": (5, 5, 64, 64),
    "dense9": (8 * 8 * 64, 384), "dense10": (384, 192), "denseout": (192, 10)}


def test_architectures_match_the_issue():
    assert set(architectures.ARCHITECTURES) == set(EXPECTED_ARCHITECTURES)
    for network, layers in EXPECTED_ARCHITECTURES.items():
        assert [tuple(layer) for layer in architectures.ARCHITECTURES[network]] == layers, network
    assert architectures.n_dropout_layers("smcn") == 3 and architectures.n_dropout_layers("smcnDeep") == 5
    assert architectures.n_dropout_layers("smcnLin") == 0 and architectures.n_dropout_layers("smcnBN") == 0
    for network, layers in ORIGINAL_LAYERS.items():
        assert architectures.layer_names(network) == layers, network
        assert architectures.activated_layers(network) == layers[:-1], network
    assert architectures.activated_layers("smcn") == ["conv1", "conv2", "conv3", "conv4", "dense5", "dense6"]
    assert architectures.layer_names("smcnDeep")[-3:] == ["dense9", "dense10", "denseout"]


@pytest.mark.parametrize("network", sorted(EXPECTED_ARCHITECTURES))
@pytest.mark.parametrize("af_set", ["1_relu", "5_blend5_swish"])
def test_variables_per_architecture(network, af_set):
    with tf.Graph().as_default():
        inputs = dn.make_inputs()
        logits, endpoints = dn.inference(inputs, make_settings(network=network, af_set=af_set))
        assert logits.shape.as_list() == [None, 10]
        variables = variables_by_name()
        shapes = EXPECTED_WEIGHT_SHAPES[network]
        for layer, shape in shapes.items():
            assert tuple(variables[f"{network}/{layer}/weights"].shape.as_list()) == shape, layer
            assert variables[f"{network}/{layer}/biases"].shape.as_list() == [shape[-1]], layer
        weight_names = {n for n in variables if n.endswith("/weights")}
        assert weight_names == {f"{network}/{layer}/weights" for layer in shapes}
        activated = [layer for layer in shapes if layer != "denseout"]
        n = len(REF_SETS[af_set])
        blend = sorted(n for n in variables if "blend_weights" in n)
        assert blend == sorted(f"{network}/{layer}/blend_weights_raw" for layer in activated)
        assert all(variables[name].shape.as_list() == [n] for name in blend)
        betas = sorted(n for n in variables if "swish_beta" in n)
        assert betas == (sorted(f"{network}/{layer}/swish_beta" for layer in activated)
                         if "jswish" in REF_SETS[af_set] else [])
        assert all(variables[name].shape.as_list() == [1] for name in betas)
        assert sorted(endpoints.af_vars) == sorted(activated) == sorted(endpoints.activations)
        ops = {op.type for op in tf.get_default_graph().get_operations()}
        assert ("StatelessRandomUniformV2" in ops or "StatelessRandomUniform" in ops) == (
            architectures.n_dropout_layers(network) > 0)
        assert ("AvgPool" in ops) == (network == "smcnLin")
        assert ("MaxPool" in ops or "MaxPoolV2" in ops) == (network != "smcnLin")


# The TF variable names of the original's graphs (deepnet_networks.py: variable_scope(namescope + '/<layer>')
# with get_variable('weights'), ('biases') and, in __activate, ('blend_weights_raw') and, when 'swish' is in
# the set, ('swish_beta') of shape [1]), in the order it creates them; global_step aside.
ORIGINAL_VARIABLE_NAMES = {
    "smcn": [
        "smcn/conv1/weights:0", "smcn/conv1/biases:0", "smcn/conv1/blend_weights_raw:0", "smcn/conv1/swish_beta:0",
        "smcn/conv2/weights:0", "smcn/conv2/biases:0", "smcn/conv2/blend_weights_raw:0", "smcn/conv2/swish_beta:0",
        "smcn/conv3/weights:0", "smcn/conv3/biases:0", "smcn/conv3/blend_weights_raw:0", "smcn/conv3/swish_beta:0",
        "smcn/conv4/weights:0", "smcn/conv4/biases:0", "smcn/conv4/blend_weights_raw:0", "smcn/conv4/swish_beta:0",
        "smcn/dense5/weights:0", "smcn/dense5/biases:0", "smcn/dense5/blend_weights_raw:0",
        "smcn/dense5/swish_beta:0",
        "smcn/dense6/weights:0", "smcn/dense6/biases:0", "smcn/dense6/blend_weights_raw:0",
        "smcn/dense6/swish_beta:0",
        "smcn/denseout/weights:0", "smcn/denseout/biases:0"],
    "smcnDeep": [
        "smcnDeep/conv1/weights:0", "smcnDeep/conv1/biases:0", "smcnDeep/conv1/blend_weights_raw:0",
        "smcnDeep/conv1/swish_beta:0",
        "smcnDeep/conv2/weights:0", "smcnDeep/conv2/biases:0", "smcnDeep/conv2/blend_weights_raw:0",
        "smcnDeep/conv2/swish_beta:0",
        "smcnDeep/conv3/weights:0", "smcnDeep/conv3/biases:0", "smcnDeep/conv3/blend_weights_raw:0",
        "smcnDeep/conv3/swish_beta:0",
        "smcnDeep/conv4/weights:0", "smcnDeep/conv4/biases:0", "smcnDeep/conv4/blend_weights_raw:0",
        "smcnDeep/conv4/swish_beta:0",
        "smcnDeep/conv5/weights:0", "smcnDeep/conv5/biases:0", "smcnDeep/conv5/blend_weights_raw:0",
        "smcnDeep/conv5/swish_beta:0",
        "smcnDeep/conv6/weights:0", "smcnDeep/conv6/biases:0", "smcnDeep/conv6/blend_weights_raw:0",
        "smcnDeep/conv6/swish_beta:0",
        "smcnDeep/conv7/weights:0", "smcnDeep/conv7/biases:0", "smcnDeep/conv7/blend_weights_raw:0",
        "smcnDeep/conv7/swish_beta:0",
        "smcnDeep/conv8/weights:0", "smcnDeep/conv8/biases:0", "smcnDeep/conv8/blend_weights_raw:0",
        "smcnDeep/conv8/swish_beta:0",
        "smcnDeep/dense9/weights:0", "smcnDeep/dense9/biases:0", "smcnDeep/dense9/blend_weights_raw:0",
        "smcnDeep/dense9/swish_beta:0",
        "smcnDeep/dense10/weights:0", "smcnDeep/dense10/biases:0", "smcnDeep/dense10/blend_weights_raw:0",
        "smcnDeep/dense10/swish_beta:0",
        "smcnDeep/denseout/weights:0", "smcnDeep/denseout/biases:0"],
}
# __smcnS (namescope 'smcnLin') and __smcnBN (namescope 'smcnBN') use smcn's layer names.
ORIGINAL_VARIABLE_NAMES["smcnLin"] = [name.replace("smcn/", "smcnLin/") for name in ORIGINAL_VARIABLE_NAMES["smcn"]]
ORIGINAL_VARIABLE_NAMES["smcnBN"] = [name.replace("smcn/", "smcnBN/") for name in ORIGINAL_VARIABLE_NAMES["smcn"]]
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


@pytest.mark.parametrize("network", sorted(ORIGINAL_VARIABLE_NAMES))
@pytest.mark.parametrize("af_set", ["5_blend5_swish", "1_relu"])
def test_variable_names_are_the_originals(network, af_set):
    with tf.Graph().as_default():
        dn.inference(dn.make_inputs(), make_settings(network=network, af_set=af_set))
        variables = tf.global_variables()
        names = [v.name for v in variables]
        shapes = {v.name: v.shape.as_list() for v in variables}
        trainable = [v.name for v in tf.trainable_variables()]
        assert {v.op.type for v in variables} == {"VarHandleOp"}  # resource variables
    expected = [name for name in ORIGINAL_VARIABLE_NAMES[network]
                if "swish" in af_set or not name.endswith("/swish_beta:0")]
    # batch norm (smcnBN only) is this suite's: '<network>/<layer>/bn/...' on the pre-activation and
    # '<network>/<layer>/bn_component<i>/...' on each component of a blend
    bn = [name for name in names if "/bn" in name]
    assert [name for name in names if "/bn" not in name] == expected
    assert [name for name in trainable if "/bn" not in name] == expected  # blend_trainable, swish_beta_trainable
    n = len(REF_SETS[af_set])
    for name in expected:
        if name.endswith("/swish_beta:0"):
            assert shapes[name] == [1], name
        if name.endswith("/blend_weights_raw:0"):
            assert shapes[name] == [n], name
    if network != "smcnBN":
        assert bn == []
        return
    scopes = ["bn"] + ([f"bn_component{i}" for i in range(1, n + 1)] if n > 1 else [])
    assert sorted(bn) == sorted(f"smcnBN/{layer}/{scope}/{variable}:0"
                                for layer in ORIGINAL_LAYERS["smcnBN"][:-1] for scope in scopes
                                for variable in BN_VARIABLES)


def test_swish_beta_only_for_swish_sets_and_default_init():
    for af_set in ("1_jswish", "3_relu+tanh+jswish"):
        with session_for(make_settings(af_set=af_set, network="smcnLin")) as (model, sess):
            variables = variables_by_name()
            n = len(REF_SETS[af_set])
            for layer in architectures.activated_layers("smcnLin"):
                np.testing.assert_array_equal(sess.run(variables[f"smcnLin/{layer}/blend_weights_raw"]),
                                              np.full(n, 1.0 / n, np.float32))
                beta = sess.run(variables[f"smcnLin/{layer}/swish_beta"])
                assert beta.shape == (1,) and beta[0] == 1.0
    init = activations.default_af_init("smcnDeep", "5_blend5_swish")
    assert sorted(init) == sorted(architectures.activated_layers("smcnDeep")) and len(init) == 10
    for layer in init.values():
        np.testing.assert_allclose(layer["blend_weights"], [0.2] * 5)
        assert layer["swish_beta"] == 1.0


# ---------------------------------------------------------------- whole-network forward pass in numpy

def np_conv_same(x, w):
    k = w.shape[0]
    pad = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (w.shape[-1],))
    for i in range(k):
        for j in range(k):
            out += xp[:, i:i + height, j:j + width, :] @ w[i, j]
    return out


def np_pool_same(x, size, stride, kind):
    height = x.shape[1]
    out_size = -(-height // stride)
    pad_total = max((out_size - 1) * stride + size - height, 0)
    before, after = pad_total // 2, pad_total - pad_total // 2
    if kind == "avgpool":
        assert pad_total == 0
    xp = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), constant_values=-np.inf)
    out = np.zeros((x.shape[0], out_size, out_size, x.shape[3]))
    for i in range(out_size):
        for j in range(out_size):
            window = xp[:, i * stride:i * stride + size, j * stride:j * stride + size, :]
            out[:, i, j, :] = window.max(axis=(1, 2)) if kind == "maxpool" else window.mean(axis=(1, 2))
    return out


def original_batch_norm(x):
    """The original's batch norm, tf.layers.batch_normalization(x, training=True) (deepnet_networks.py: on the
    pre-activation of every smcnBN layer and on each blend component), in training AND at inference, fresh:
    gamma 1, beta 0; the mean and the biased variance over every axis but the channels, epsilon 0.001."""
    axes = tuple(range(x.ndim - 1))
    return (x - x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + 0.001)


def np_batch_norm(x, batch_statistics):
    """Fresh BN (gamma 1, beta 0, moving mean 0, moving variance 1): the batch's statistics, or the moving
    averages."""
    if not batch_statistics:
        return x / np.sqrt(1.0 + REF_BN_EPS)
    return original_batch_norm(x)


def np_forward(network, params, x, names, blend, bn=None):
    """Reference forward pass (dropout off). params: layer -> (W, b); blend: layer -> (effective w, beta)."""
    layer_names, acts = iter(ORIGINAL_LAYERS[network]), {}
    x = x.astype(np.float64)
    for layer in EXPECTED_ARCHITECTURES[network]:
        kind = layer[0]
        if kind == "dropout":
            continue
        if kind in ("maxpool", "avgpool"):
            x = np_pool_same(x, layer[1], layer[2], kind)
            continue
        name = next(layer_names)
        w, b = params[name]
        x = np_conv_same(x, w) + b if kind == "conv" else x.reshape(len(x), -1) @ w + b
        if kind == "logits":
            return x, acts
        if bn is not None:
            x = np_batch_norm(x, bn)
        eff, beta = blend[name]
        components = [REF_FUNCTIONS[f](x, beta) for f in names]
        if bn is not None and len(names) > 1:
            components = [np_batch_norm(c, bn) for c in components]
        x = sum(e * c for e, c in zip(eff, components))
        acts[name] = x
    raise AssertionError("no logits layer")


def custom_af_init(network, n, seed):
    rng = np.random.default_rng(seed)
    return {layer: {"blend_weights": rng.uniform(-0.5, 1.0, n).astype(np.float32),
                    "swish_beta": float(rng.uniform(0.5, 2.0))}
            for layer in architectures.activated_layers(network)}


def fetch_params(sess, network):
    variables = variables_by_name()
    return {layer: tuple(sess.run([variables[f"{network}/{layer}/weights"], variables[f"{network}/{layer}/biases"]]))
            for layer in EXPECTED_WEIGHT_SHAPES[network]}


def fetch_blend(sess, endpoints, mode):
    values = {}
    for layer, v in endpoints.af_vars.items():
        raw = sess.run(v.raw)
        beta = 1.0
        if v.beta is not None:
            beta_value = sess.run(v.beta)
            assert beta_value.shape == (1,)
            beta = float(beta_value[0])
        values[layer] = (ref_effective(raw, mode), beta)
    return values


def assert_forward_matches(network, af_set, mode, training_feeds, bn_inference="batch_statistics"):
    names = REF_SETS[af_set]
    settings = make_settings(network=network, af_set=af_set, blend_mode=mode, bn_inference=bn_inference)
    x = images(3)
    with session_for(settings, custom_af_init(network, len(names), 5)) as (model, sess):
        params = fetch_params(sess, network)
        blend = fetch_blend(sess, model.endpoints, mode)
        for training in training_feeds:
            feed = {model.inputs.images: x}
            bn = None
            if network in architectures.BATCH_NORM_NETWORKS:
                feed[model.inputs.training] = training
                bn = training or bn_inference == "batch_statistics"
            logits, acts = sess.run([model.logits, model.endpoints.activations], feed)
            want_logits, want_acts = np_forward(network, params, x, names, blend, bn)
            for layer, want in want_acts.items():
                scale = np.abs(want).max()
                np.testing.assert_allclose(acts[layer], want, rtol=1e-3, atol=5e-4 * scale,
                                           err_msg=f"{network} {layer} training={training}")
            np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{network} training={training}")


@pytest.mark.parametrize("network, af_set, mode", [
    ("smcn", "5_blend5_swish", "softmaxed"),
    ("smcnLin", "3_relu+tanh+jswish", "unrestricted"),
    ("smcnDeep", "1_selu", "unrestricted"),
])
def test_forward_pass_matches_numpy(network, af_set, mode):
    assert_forward_matches(network, af_set, mode, [False])


@pytest.mark.parametrize("af_set,bn_inference", [("5_blend5_swish", "batch_statistics"), ("1_jelu", "batch_statistics"),
                                                  ("5_blend5_swish", "moving_averages")])
def test_batch_norm_forward_matches_numpy_training_and_inference(af_set, bn_inference):
    assert_forward_matches("smcnBN", af_set, "absnormed", [True, False], bn_inference)


# ---------------------------------------------------------------- initialisation

def test_weight_init_std_and_bias_init():
    truncation_factor = 0.8796  # std of a normal truncated at 2 sigma, in sigmas
    with session_for(make_settings(network="smcn")) as (model, sess):
        params = fetch_params(sess, "smcn")
    for layer, fan in (("conv4", 5 * 5 * 64), ("conv2", 3 * 3 * 64)):
        sigma = np.sqrt(2.0 / fan)
        w = params[layer][0]
        assert abs(w.std() / (truncation_factor * sigma) - 1) < 0.02, layer
        assert np.abs(w).max() <= 2 * sigma * 1.0001 and abs(w.mean()) < 0.02 * sigma
    for layer, (n_in, n_out) in (("dense5", (4096, 384)), ("dense6", (384, 192))):
        sigma = np.sqrt(2.0 / (n_in * n_out))
        w = params[layer][0]
        assert abs(w.std() / (truncation_factor * sigma) - 1) < 0.02, layer
        assert np.abs(w).max() <= 2 * sigma * 1.0001
    np.testing.assert_array_equal(params["conv1"][1], np.zeros(64, np.float32))
    for layer in ("conv2", "conv3", "conv4", "dense5", "dense6", "denseout"):
        np.testing.assert_array_equal(params[layer][1], np.full(params[layer][1].shape, 0.1, np.float32))


def test_init_is_deterministic_for_a_seed():
    runs = []
    for seed in (3, 3, 4):
        with session_for(make_settings(network="smcnLin", seed=seed)) as (model, sess):
            runs.append(sess.run(variables_by_name()["smcnLin/conv2/weights"]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


# ---------------------------------------------------------------- trainable flags

@pytest.mark.parametrize("blend_trainable, beta_trainable", [(True, False), (False, True)])
def test_trainable_flags(blend_trainable, beta_trainable):
    settings = make_settings(network="smcnLin", af_set="5_blend5_swish", blend_trainable=blend_trainable,
                             swish_beta_trainable=beta_trainable, optimizer="SGD")
    with session_for(settings) as (model, sess):
        trainable = {v.op.name for v in tf.trainable_variables()}
        variables = variables_by_name()
        blend = [variables[f"smcnLin/{layer}/blend_weights_raw"] for layer in architectures.activated_layers("smcnLin")]
        betas = [variables[f"smcnLin/{layer}/swish_beta"] for layer in architectures.activated_layers("smcnLin")]
        assert all((v.op.name in trainable) == blend_trainable for v in blend)
        assert all((v.op.name in trainable) == beta_trainable for v in betas)
        assert "smcnLin/conv1/weights" in trainable
        before = sess.run(blend + betas + [variables["smcnLin/conv1/weights"]])
        sess.run(model.train_op, {model.inputs.images: images(2), model.inputs.labels: [1, 7],
                                  model.inputs.lr: 0.1})
        after = sess.run(blend + betas + [variables["smcnLin/conv1/weights"]])
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    n = len(blend)
    assert changed[:n] == [blend_trainable] * n
    assert changed[n:2 * n] == [beta_trainable] * n
    assert changed[-1]


# ---------------------------------------------------------------- loss, metrics, weight decay

def np_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))


def test_loss_and_weight_decay_over_conv_and_dense_weights_only():
    wd = 0.003
    settings = make_settings(network="smcnBN", af_set="2_tanh+jswish", use_wd=True, wd_lambda=wd)
    labels = np.array([0, 3, 9, 4])
    with session_for(settings) as (model, sess):
        feed = {model.inputs.images: images(4), model.inputs.labels: labels, model.inputs.training: True}
        total, ce, logits = sess.run([model.loss, model.cross_entropy, model.logits], feed)
        values = sess.run({n: v for n, v in variables_by_name().items()})
    weights = {n: v for n, v in values.items() if n.endswith("/weights")}
    assert len(weights) == 7
    assert any("blend_weights" in n for n in values) and any("gamma" in n for n in values)
    decay = sum(np.sum(w.astype(np.float64) ** 2) / 2 for w in weights.values())
    np.testing.assert_allclose(ce, np_cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(total - ce, wd * decay, rtol=1e-4)
    everything = sum(np.sum(v.astype(np.float64) ** 2) / 2 for v in values.values())
    assert abs(wd * everything - wd * decay) > 1e-2 * wd * decay  # the check can tell them apart


@pytest.mark.parametrize("use_wd, wd_lambda", [(False, 0.5), (True, 0.0)])
def test_no_weight_decay_when_off(use_wd, wd_lambda):
    settings = make_settings(network="smcnLin", use_wd=use_wd, wd_lambda=wd_lambda)
    with session_for(settings) as (model, sess):
        total, ce = sess.run([model.loss, model.cross_entropy],
                             {model.inputs.images: images(2), model.inputs.labels: [2, 5]})
    assert total == ce


def test_top1_top5_and_predictions():
    with session_for(make_settings(network="smcnLin", af_set="1_tanh")) as (model, sess):
        # Make the logits spread so that the ranks are well defined.
        variables = variables_by_name()
        rng = np.random.default_rng(2)
        sess.run(variables["smcnLin/denseout/weights"].assign(rng.normal(size=(192, 10)).astype(np.float32)))
        sess.run(variables["smcnLin/denseout/biases"].assign(rng.normal(size=10).astype(np.float32)))
        x = images(4)
        logits = sess.run(model.logits, {model.inputs.images: x})
        ranking = np.argsort(-logits, axis=1)
        labels = np.array([ranking[0, 0], ranking[1, 3], ranking[2, 7], ranking[3, 4]])
        top1, top5, pred = sess.run([model.top1, model.top5, model.predictions],
                                    {model.inputs.images: x, model.inputs.labels: labels})
    assert top1 == pytest.approx(0.25) and top5 == pytest.approx(0.75)
    np.testing.assert_array_equal(pred, ranking[:, 0])


# ---------------------------------------------------------------- optimizers and update ops

@pytest.mark.parametrize("optimizer, expected_steps", [
    ("SGD", [1.0, 2.0]),
    ("Momentum", [1.0, 1.0 + 1.9]),      # accumulator a = 0.9 a + g; w -= lr a
    ("Nesterov", [1.9, 1.9 + 2.71]),     # w -= lr (g + 0.9 a)
    ("Adam", None),                      # constant gradient: each step moves lr * sign(g)
])
def test_optimizers_and_update_ops(optimizer, expected_steps):
    start = np.array([1.0, -2.0, 0.5], np.float32)
    grad = np.array([0.3, -1.2, 2.0], np.float32)
    lr = 0.1
    with tf.Graph().as_default(), tf.Session() as sess:
        v = tf.Variable(start)
        counter = tf.Variable(0, dtype=tf.int32)
        tf.add_to_collection(tf.GraphKeys.UPDATE_OPS, tf.assign_add(counter, 1))
        train_op = dn.train(tf.reduce_sum(grad * v), optimizer, tf.constant(lr))
        sess.run(tf.global_variables_initializer())
        values = []
        for _ in range(2):
            sess.run(train_op)
            values.append(sess.run(v))
        assert sess.run(counter) == 2
    for step, value in enumerate(values):
        if expected_steps is None:
            want = start - (step + 1) * lr * np.sign(grad)
        else:
            want = start - expected_steps[step] * lr * grad
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=f"{optimizer} step {step + 1}")


def test_unknown_network_and_optimizer():
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="network 'foo'"):
            dn.build_model(make_settings(network="foo"))
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="optimizer 'Adagrad'"):
            dn.build_model(make_settings(network="smcnLin", optimizer="Adagrad"))
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="count 4"):
            dn.build_model(make_settings(af_set="4_blend5_swish"))


# ---------------------------------------------------------------- TensorBoard summaries

def test_summaries_are_the_originals_statistics_of_the_values_before_the_update():
    settings = make_settings(network="smcnLin", af_set="5_blend5_swish", optimizer="SGD")
    labels = np.array([1, 7, 3])
    with session_for(settings, custom_af_init("smcnLin", 5, seed=2)) as (model, sess):
        variables = variables_by_name()
        names = {"weights": "smcnLin/conv2/weights", "biases": "smcnLin/dense6/biases",
                 "blend_weights": "smcnLin/conv3/blend_weights_raw", "swish_beta": "smcnLin/dense5/swish_beta"}
        before = sess.run({key: variables[name] for key, name in names.items()})
        feed = {model.inputs.images: images(3), model.inputs.labels: labels, model.inputs.lr: 0.5}
        loss = sess.run(model.loss, feed)
        _, serialized, arrays = sess.run([model.train_op, model.summaries, model.histograms], feed)
        after = sess.run({key: variables[name] for key, name in names.items()})
    summary = tf.Summary.FromString(serialized)
    scalars = {v.tag: v.simple_value for v in summary.value if v.WhichOneof("value") == "simple_value"}
    histograms = set(arrays)
    assert not {v.tag for v in summary.value if v.WhichOneof("value") != "simple_value"}  # histograms: the trainer's
    assert all(not np.array_equal(before[key], after[key]) for key in before)  # the step did update them
    for key, name in names.items():
        tag = name.rsplit("/", 1)[0] + "/" + key
        value = before[key].astype(np.float64)
        want = {"mean": value.mean(), "stddev": np.sqrt(np.mean((value - value.mean()) ** 2)),
                "max": value.max(), "min": value.min()}
        for stat, expected in want.items():
            assert scalars[f"{tag}/{stat}"] == pytest.approx(expected, rel=1e-5, abs=1e-7), f"{tag}/{stat}"
        np.testing.assert_array_equal(arrays[f"{tag}/histogram"], before[key])
    assert scalars["objective/loss"] == pytest.approx(float(loss), rel=1e-6)
    for layer in ORIGINAL_LAYERS["smcnLin"][:-1]:
        for what in ("weights", "biases", "preact", "activation", "blend_weights", "swish_beta"):
            assert {f"smcnLin/{layer}/{what}/{stat}" for stat in ("mean", "stddev", "max", "min")} <= set(scalars)
            assert f"smcnLin/{layer}/{what}/histogram" in histograms
        assert f"smcnLin/{layer}/weights/gradient/mean" in scalars
    assert {"objective/top1", "objective/top5"} <= set(scalars)


def test_activation_summaries_sample_the_first_images_and_variables_are_whole():
    n = dn.SUMMARY_IMAGES + 8
    settings = make_settings(network="smcnLin", af_set="1_relu", blend_trainable=False)
    with session_for(settings) as (model, sess):
        feed = {model.inputs.images: images(n), model.inputs.labels: np.arange(n) % 10}
        activation = sess.run(model.endpoints.activations["conv1"], feed)
        serialized, arrays = sess.run([model.summaries, model.histograms], feed)
    values = {v.tag: v for v in tf.Summary.FromString(serialized).value}
    sample = activation[:dn.SUMMARY_IMAGES].astype(np.float64)
    np.testing.assert_array_equal(arrays["smcnLin/conv1/activation/histogram"], sample)
    assert values["smcnLin/conv1/activation/mean"].simple_value == pytest.approx(sample.mean(), rel=1e-5)
    assert values["smcnLin/conv1/activation/stddev"].simple_value == pytest.approx(sample.std(), rel=1e-5)
    assert values["smcnLin/conv1/activation/max"].simple_value == pytest.approx(sample.max(), rel=1e-6)
    assert sample.mean() != pytest.approx(activation.astype(np.float64).mean(), rel=1e-5)  # a real sample
    assert arrays["smcnLin/conv2/weights/histogram"].shape == (3, 3, 64, 64)  # variables: whole


def test_variable_summaries_show_the_values_before_the_update_however_large():
    """A read of a (ref) variable shares the buffer the update writes into; the summaries show a copy taken
    before the update, however long the update takes."""
    with tf.Graph().as_default():
        with tf.variable_scope("net"):
            variable = tf.get_variable("big", initializer=tf.zeros([2_000_000]))
            dn._summarise_variable(variable, "big")
        with tf.control_dependencies(tf.get_collection(dn.PRE_UPDATE_READS)):
            update = tf.assign_add(variable, tf.ones([2_000_000]))
        summaries = tf.summary.merge_all(dn.SUMMARIES)
        arrays = dict(zip(tf.get_collection(dn.HISTOGRAM_TAGS), tf.get_collection(dn.HISTOGRAMS)))
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            for step in range(3):
                _, serialized, values = sess.run([update, summaries, arrays])
                scalars = {v.tag: v.simple_value for v in tf.Summary.FromString(serialized).value}
                assert scalars["net/big/mean"] == scalars["net/big/max"] == scalars["net/big/min"] == step
                np.testing.assert_array_equal(values["net/big/histogram"], np.full(2_000_000, step, np.float32))


def test_summaries_of_non_finite_values_do_not_stop_the_step():
    """A diverging step (NaN activations and loss) still runs with its summaries (TensorFlow's histogram op
    refused non-finite values; the trainer's writer leaves their histograms out)."""
    settings = make_settings(network="smcnLin", af_set="5_blend5_swish")
    with session_for(settings) as (model, sess):
        feed = {model.inputs.images: np.full((2, 32, 32, 3), np.nan, np.float32), model.inputs.labels: [1, 2]}
        loss, serialized, arrays = sess.run([model.loss, model.summaries, model.histograms], feed)
    assert np.isnan(loss) and np.isnan(arrays["smcnLin/conv1/activation/histogram"]).all()
    scalars = {v.tag: v.simple_value for v in tf.Summary.FromString(serialized).value}
    assert np.isnan(scalars["smcnLin/conv1/activation/mean"])


# ---------------------------------------------------------------- batch norm state

def test_batch_norm_training_vs_inference_and_moving_averages():
    settings = make_settings(network="smcnBN", af_set="2_tanh+jswish", optimizer="Adam", bn_inference="moving_averages")
    x = images(4)
    with session_for(settings) as (model, sess):
        variables = variables_by_name()
        moving = {n: v for n, v in variables.items() if "moving_" in n}
        # one BN per activated layer on the pre-activation, plus one per blend component
        assert len(moving) == 2 * 6 * (1 + 2)
        assert not any("moving_" in v.op.name for v in tf.trainable_variables())
        feed = {model.inputs.images: x, model.inputs.labels: [0, 1, 2, 3]}
        train_logits = sess.run(model.logits, {**feed, model.inputs.training: True})
        infer_logits = sess.run(model.logits, {**feed, model.inputs.training: False})
        assert np.abs(train_logits - infer_logits).max() > 1e-3
        before = sess.run(moving)
        w1, b1 = sess.run([variables["smcnBN/conv1/weights"], variables["smcnBN/conv1/biases"]])
        unchanged = sess.run(moving)  # forward passes alone do not update the moving averages
        assert all(np.array_equal(before[n], unchanged[n]) for n in moving)
        sess.run(model.train_op, {**feed, model.inputs.training: True})
        after = sess.run(moving)
    assert all(not np.array_equal(before[n], after[n]) for n in moving)
    preact = np_conv_same(x.astype(np.float64), w1) + b1
    mean_name = [n for n in moving if n.startswith("smcnBN/conv1/") and "component" not in n and "mean" in n]
    var_name = [n for n in moving if n.startswith("smcnBN/conv1/") and "component" not in n and "variance" in n]
    assert len(mean_name) == 1 and len(var_name) == 1
    np.testing.assert_allclose(after[mean_name[0]], (1 - REF_BN_DECAY) * preact.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(after[var_name[0]],
                               REF_BN_DECAY + (1 - REF_BN_DECAY) * preact.var(axis=(0, 1, 2)), rtol=1e-4)


def test_batch_norm_inference_uses_the_batch_statistics_by_default():
    """The original normalised with the batch's statistics at inference too: an image's logits depend on the
    batch it is evaluated in, and inference equals the training-mode forward pass on the same batch."""
    settings = make_settings(network="smcnBN", af_set="5_blend5_swish")
    x = images(6)
    with session_for(settings) as (model, sess):
        logits = lambda batch, training: sess.run(model.logits, {model.inputs.images: batch,  # noqa: E731
                                                                 model.inputs.training: training})
        infer = logits(x, False)
        np.testing.assert_array_equal(infer, logits(x, True))
        assert np.abs(infer[:3] - logits(x[:3], False)).max() > 1e-3
        params = fetch_params(sess, "smcnBN")
        blend = fetch_blend(sess, model.endpoints, "unrestricted")
    want, _ = np_forward("smcnBN", params, x, REF_SETS["5_blend5_swish"], blend, bn=True)
    np.testing.assert_allclose(infer, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- dropout

def test_dropout_mask_is_keyed_on_seed_step_and_layer():
    with tf.Graph().as_default(), tf.Session() as sess:
        x = tf.ones([400, 50])
        keep = tf.placeholder(tf.float32, [None])
        step = tf.placeholder(tf.int64, [])
        outs = {(seed, index): dn._dropout(x, keep, index, step, seed) for seed in (1, 2) for index in (0, 1)}

        def run(key, s, k=(0.7,)):
            return sess.run(outs[key], {keep: list(k), step: s})

        a = run((1, 0), 5)
        assert set(np.unique(a)) == {0.0, np.float32(1 / 0.7)}
        assert abs((a > 0).mean() - 0.7) < 0.02
        np.testing.assert_array_equal(a, run((1, 0), 5))
        assert not np.array_equal(a, run((1, 0), 6))
        assert not np.array_equal(a, run((1, 1), 5))
        assert not np.array_equal(a, run((2, 0), 5))
        np.testing.assert_array_equal(run((1, 1), 5, (1.0,)), np.ones((400, 50)))
        np.testing.assert_array_equal(run((1, 1), 5, (0.7, 1.0)), np.ones((400, 50)))  # per-layer keep
        assert (run((1, 0), 5, (0.7, 1.0)) == 0).any()


def test_network_dropout_by_step_and_keep_probs():
    with session_for(make_settings(network="smcn", af_set="1_relu")) as (model, sess):
        inputs = model.inputs
        base = {inputs.images: images(2)}

        def logits(keep, step):
            return sess.run(model.logits, {**base, inputs.keep_probs: keep, inputs.step: step})

        plain = sess.run(model.logits, base)
        np.testing.assert_array_equal(logits([1.0], 3), plain)
        np.testing.assert_array_equal(logits([1.0, 1.0, 1.0], 3), plain)
        dropped = logits([0.5], 3)
        assert not np.allclose(dropped, plain)
        np.testing.assert_array_equal(logits([0.5], 3), dropped)
        np.testing.assert_array_equal(logits([0.5, 0.5, 0.5], 3), dropped)
        assert not np.allclose(logits([0.5], 4), dropped)
        assert not np.allclose(logits([1.0, 1.0, 0.5], 3), plain)


# ---------------------------------------------------------------- AF-weight files (the original's format)

def write_af_file(exp_dir, spec, run, mb, n, value, beta=1.25, network="smcnLin"):
    """An AF-weights file as the original writes it: '<network>/<layer>/blend_weights_raw:0' -> list of
    floats and '<network>/<layer>/swish_beta:0' -> [beta] (left out when beta is None)."""
    content = {}
    for layer in ORIGINAL_LAYERS[network][:-1]:
        weights = np.full(n, value, np.float32) + np.arange(n, dtype=np.float32)
        content[f"{network}/{layer}/blend_weights_raw:0"] = [float(w) for w in weights]
        if beta is not None:
            content[f"{network}/{layer}/swish_beta:0"] = [beta]
    path = run_folder.af_weights_path(str(exp_dir), spec, run, mb)
    save_pickle(path, content)
    return path


def test_predefined_af_init_picks_newest_and_normalizes(tmp_path):
    for mb, value in ((5, 0.1), (300, 0.3), (40, 0.2)):  # 40 > 300 as text: the order must be numeric
        write_af_file(tmp_path, "specA", 1, mb, 5, value)
    write_af_file(tmp_path, "specA", 2, 9000, 5, 9.0)      # another run
    write_af_file(tmp_path, "specA_b", 1, 9000, 5, 9.0)    # another spec sharing the prefix
    write_af_file(tmp_path, "specA", 11, 9000, 5, 9.0)     # run 11 is not run 1
    newest = run_folder.newest_af_weights_file(str(tmp_path), "specA", 1)
    assert os.path.basename(newest) == "af_weights_specA_run_1_mb_300.pkl"
    assert os.path.exists(run_folder.af_weights_path(str(tmp_path), "specA", 1, 300))
    init = activations.predefined_af_init(str(tmp_path), "specA", 1, "smcnLin", "5_blend5_swish")
    assert sorted(init) == sorted(architectures.activated_layers("smcnLin"))
    for layer in init.values():
        np.testing.assert_allclose(layer["blend_weights"], 0.3 + np.arange(5), rtol=1e-6)
        assert layer["swish_beta"] == 1.25
    normed = activations.predefined_af_init(str(tmp_path), "specA", 1, "smcnLin", "5_blend5_swish", normalize=True)
    for layer in normed.values():
        np.testing.assert_allclose(layer["blend_weights"], (0.3 + np.arange(5)) / np.sum(0.3 + np.arange(5)),
                                   rtol=1e-6)
        assert layer["blend_weights"].sum() == pytest.approx(1.0, abs=1e-6)
    # the loaded weights become the variables' initial values
    settings = make_settings(network="smcnLin", af_set="5_blend5_swish", blend_mode="softmaxed")
    with session_for(settings, normed) as (model, sess):
        read = dn.read_af_weights(sess, model.endpoints)
    for layer, values in read.items():
        np.testing.assert_allclose(values["blend_weights_raw"], normed[layer]["blend_weights"], rtol=1e-6)
        np.testing.assert_allclose(values["blend_weights"], ref_effective(normed[layer]["blend_weights"],
                                                                          "softmaxed"), rtol=1e-5)
        assert values["swish_beta"] == 1.25


def test_predefined_af_init_errors(tmp_path):
    assert run_folder.newest_af_weights_file(str(tmp_path), "specA", 1) is None
    with pytest.raises(UserError, match="specA.*run 1"):
        activations.predefined_af_init(str(tmp_path), "specA", 1, "smcnLin", "1_relu")
    write_af_file(tmp_path, "specA", 1, 10, 3, 0.5)
    with pytest.raises(UserError, match="3 blend weights|1 blend weights"):
        activations.predefined_af_init(str(tmp_path), "specA", 1, "smcnLin", "1_relu")
    init = activations.predefined_af_init(str(tmp_path), "specA", 1, "smcnLin", "3_relu+tanh+jswish")
    assert len(init) == 6
    # the keys carry the network, as the original's variable names: another network's file does not fit
    with pytest.raises(UserError, match="blend weights for smcn/conv1"):
        activations.predefined_af_init(str(tmp_path), "specA", 1, "smcn", "3_relu+tanh+jswish")
    # a pickle that is no dict (e.g. the old {'layers': ...} format is a dict, but lacks every key)
    save_pickle(run_folder.af_weights_path(str(tmp_path), "specB", 1, 3), [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="af_weights_specB_run_1_mb_3.pkl"):
        activations.predefined_af_init(str(tmp_path), "specB", 1, "smcnLin", "3_relu+tanh+jswish")
    old = {"layers": {layer: {"blend_weights_raw": np.ones(3, np.float32), "swish_beta": 1.0}
                      for layer in ORIGINAL_LAYERS["smcnLin"][:-1]}}
    save_pickle(run_folder.af_weights_path(str(tmp_path), "specC", 1, 3), old)
    with pytest.raises(UserError, match="af_weights_specC_run_1_mb_3.pkl.*blend weights for smcnLin/conv1"):
        activations.predefined_af_init(str(tmp_path), "specC", 1, "smcnLin", "3_relu+tanh+jswish")


# ---------------------------------------------------------------- transcriptions of the original's AF-weight I/O
# (leonsuetfeld/activations, deepnet_networks.py, Network.save_af_weights and get_af_weights_dict), on
# (TF variable name, value as sess.run returns it) pairs of tf.trainable_variables() in their order.

def original_save_af_weights(path, trainable):
    af_weights_dict_pkl = {}
    # if trainable blend weights available put in dicts
    if len([name for name, _ in trainable if 'blend_weights' in name]) > 0:
        for name, value in [(name, value) for name, value in trainable if 'blend_weights' in name]:
            af_weights_dict_pkl[name] = list(value)
    # if trainable swish betas available put in dicts
    if len([name for name, _ in trainable if 'swish_beta' in name]) > 0:
        for name, value in [(name, value) for name, value in trainable if 'swish_beta' in name]:
            af_weights_dict_pkl[name] = list(value)
    # save dicts in files
    if len(af_weights_dict_pkl.keys()) > 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pickle.dump(af_weights_dict_pkl, open(path, 'wb'), protocol=3)
    return af_weights_dict_pkl


def original_af_values(network, n, seed, with_beta=True):
    """float32 blend weights [n] and beta [1] per activated layer, as the original's variables hold them."""
    rng = np.random.default_rng(seed)
    values = []
    for layer in ORIGINAL_LAYERS[network][:-1]:
        values.append((f"{network}/{layer}/weights:0", rng.normal(size=(2, 2)).astype(np.float32)))  # not saved
        values.append((f"{network}/{layer}/blend_weights_raw:0", rng.uniform(-0.5, 1.5, n).astype(np.float32)))
        if with_beta:
            values.append((f"{network}/{layer}/swish_beta:0", rng.uniform(0.5, 2.0, 1).astype(np.float32)))
    return values


def graph_af_variables(sess, network):
    variables = variables_by_name()
    return {layer: (sess.run(variables[f"{network}/{layer}/blend_weights_raw"]),
                    sess.run(variables[f"{network}/{layer}/swish_beta"]))
            for layer in ORIGINAL_LAYERS[network][:-1]}


def test_predefined_af_init_reads_the_file_the_original_writes(tmp_path):
    values = original_af_values("smcn", 5, seed=11)
    path = run_folder.af_weights_path(str(tmp_path), "orig", 2, 4000)
    saved = original_save_af_weights(path, values)
    with open(path, "rb") as handle:
        assert handle.read(2) == b"\x80\x03"  # pickle protocol 3
    assert all(type(x) is np.float32 for value in saved.values() for x in value)
    blend = {name.split("/")[1]: value for name, value in values if name.endswith("/blend_weights_raw:0")}
    beta = {name.split("/")[1]: value for name, value in values if name.endswith("/swish_beta:0")}
    assert sorted(blend) == sorted(beta) == sorted(ORIGINAL_LAYERS["smcn"][:-1])
    settings = make_settings(network="smcn", af_set="5_blend5_swish", blend_mode="unrestricted")

    init = activations.predefined_af_init(str(tmp_path), "orig", 2, "smcn", "5_blend5_swish")
    assert sorted(init) == sorted(blend)
    for layer in blend:
        np.testing.assert_array_equal(init[layer]["blend_weights"], blend[layer])
        assert init[layer]["swish_beta"] == beta[layer][0]
    with session_for(settings, init) as (model, sess):
        got = graph_af_variables(sess, "smcn")
    for layer in blend:  # the graph starts from exactly the saved float32 values
        np.testing.assert_array_equal(got[layer][0], blend[layer])
        assert got[layer][0].dtype == np.float32
        np.testing.assert_array_equal(got[layer][1], beta[layer])
        assert got[layer][1].shape == (1,)

    # -norm_blendw_at_init: divided by their sum (the original: layer_blend_weights /= reduce_sum(...))
    normed = activations.predefined_af_init(str(tmp_path), "orig", 2, "smcn", "5_blend5_swish", normalize=True)
    with session_for(settings, normed) as (model, sess):
        got = graph_af_variables(sess, "smcn")
    for layer in blend:
        w = blend[layer].astype(np.float64)
        np.testing.assert_allclose(got[layer][0], w / w.sum(), rtol=1e-6, atol=1e-7)
        assert got[layer][0].sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_array_equal(got[layer][1], beta[layer])  # beta is not normalised

    # the original's loader also accepted its older key '<scope>/blend_weights:0'
    older = [(name.replace("/blend_weights_raw:0", "/blend_weights:0"), value) for name, value in values]
    original_save_af_weights(run_folder.af_weights_path(str(tmp_path), "older", 2, 10), older)
    init = activations.predefined_af_init(str(tmp_path), "older", 2, "smcn", "5_blend5_swish")
    for layer in blend:
        np.testing.assert_array_equal(init[layer]["blend_weights"], blend[layer])
        assert init[layer]["swish_beta"] == beta[layer][0]


def test_af_file_without_swish_beta_for_a_swish_set_is_a_one_line_user_error(tmp_path):
    # the original saves swish_beta only when it is trainable: such a file cannot start a swish set
    path = run_folder.af_weights_path(str(tmp_path), "nobeta", 1, 50)
    values = original_af_values("smcnLin", 5, seed=3, with_beta=False)
    saved = original_save_af_weights(path, values)
    assert not any("swish_beta" in name for name in saved)
    for af_set in ("5_blend5_swish", "5_relu+jelu+tanh+jswish+linu"):
        with pytest.raises(UserError) as failure:
            activations.predefined_af_init(str(tmp_path), "nobeta", 1, "smcnLin", af_set)
        message = str(failure.value)
        assert len(message.splitlines()) == 1, message
        assert path in message and "swish_beta" in message and "smcnLin/conv1" in message
    # a beta of the wrong size is refused the same way
    wrong = values + [(f"smcnLin/{layer}/swish_beta:0", np.array([1.0, 2.0], np.float32))
                      for layer in ORIGINAL_LAYERS["smcnLin"][:-1]]
    path = run_folder.af_weights_path(str(tmp_path), "twobetas", 1, 50)
    original_save_af_weights(path, wrong)
    with pytest.raises(UserError) as failure:
        activations.predefined_af_init(str(tmp_path), "twobetas", 1, "smcnLin", "5_blend5_swish")
    assert len(str(failure.value).splitlines()) == 1 and path in str(failure.value)
    assert "swish_beta" in str(failure.value)
    # a set without swish needs no beta (the original read it only when 'swish' was in the set)
    init = activations.predefined_af_init(str(tmp_path), "nobeta", 1, "smcnLin", "5_relu+jelu+tanh+linu+selu")
    blend = {name.split("/")[1]: value for name, value in values if name.endswith("/blend_weights_raw:0")}
    for layer, value in blend.items():
        np.testing.assert_array_equal(init[layer]["blend_weights"], value)
        assert init[layer]["swish_beta"] == 1.0


def original_get_af_weights_dict(sess):
    """The original's Network.get_af_weights_dict, on the default graph. Its sess.run(name) read a ref
    variable's value; here the name is a resource variable's handle, so the variable of that name is run."""
    value_of = {v.name: v for v in tf.trainable_variables()}
    af_weights_dict = {}
    # if trainable blend weights available put in list
    if len([v for v in tf.trainable_variables() if 'blend_weights' in v.name]) > 0:
        for name in [v.name for v in tf.trainable_variables() if 'blend_weights' in v.name]:
            af_weights_dict[name] = list(sess.run(value_of[name]))
    # if trainable swish betas available put in list
    if len([v for v in tf.trainable_variables() if 'swish_beta' in v.name]) > 0:
        for name in [v.name for v in tf.trainable_variables() if 'swish_beta' in v.name]:
            af_weights_dict[name] = list(sess.run(value_of[name]))
    return af_weights_dict


@pytest.mark.parametrize("blend_trainable, beta_trainable", [(True, True), (True, False), (False, True),
                                                             (False, False)])
def test_af_weights_file_content_is_the_originals_dict_and_reads_back(tmp_path, blend_trainable, beta_trainable):
    settings = make_settings(network="smcnLin", af_set="5_blend5_swish", blend_trainable=blend_trainable,
                             swish_beta_trainable=beta_trainable)
    start = custom_af_init("smcnLin", 5, seed=8)
    with session_for(settings, start) as (model, sess):
        content = outputs.af_weights_file_content(sess, tf.get_default_graph())
        original = original_get_af_weights_dict(sess)
    assert set(content) == set(original)  # (a dict: the order of its keys is no part of the format)
    for name, value in original.items():
        assert isinstance(content[name], list) and len(content[name]) == len(value)
        assert content[name] == [float(x) for x in value]
    layers = ORIGINAL_LAYERS["smcnLin"][:-1]
    expected = ({f"smcnLin/{layer}/blend_weights_raw:0" for layer in layers} if blend_trainable else set()) | \
               ({f"smcnLin/{layer}/swish_beta:0" for layer in layers} if beta_trainable else set())
    assert set(content) == expected
    for layer in layers:
        if blend_trainable:
            np.testing.assert_array_equal(np.float32(content[f"smcnLin/{layer}/blend_weights_raw:0"]),
                                          start[layer]["blend_weights"])
        if beta_trainable:
            assert content[f"smcnLin/{layer}/swish_beta:0"] == [np.float32(start[layer]["swish_beta"])]
    if blend_trainable and beta_trainable:  # what this suite writes, it reads back exactly
        save_pickle(run_folder.af_weights_path(str(tmp_path), "back", 1, 7), content)
        init = activations.predefined_af_init(str(tmp_path), "back", 1, "smcnLin", "5_blend5_swish")
        for layer in layers:
            np.testing.assert_array_equal(init[layer]["blend_weights"], start[layer]["blend_weights"])
            assert init[layer]["swish_beta"] == np.float32(start[layer]["swish_beta"])


def test_the_flag_choices_are_what_the_network_implements():
    """deepnet_main keeps its choices TensorFlow-free; they must name exactly what deepnet_network builds."""
    import deepnet_main
    assert set(deepnet_main.NETWORKS) == set(architectures.ARCHITECTURES)
    assert set(deepnet_main.BLEND_MODES) == set(activations.BLEND_MODES)
    assert deepnet_main.BN_INFERENCE == architectures.BN_INFERENCE
    assert set(deepnet_main.OPTIMIZERS) == set(dn.OPTIMIZERS)
    settings = {"lr": 0.1, "lr_decay": 0.01, "lr_lin_min": 0.01, "lr_lin_steps": 10, "lr_step_ep": [1],
                "lr_step_multi": [0.1], "val_set_fraction": 0.5, "minibatch_size": 1}
    for kind in deepnet_main.LR_SCHEDULES:   # each one the schedule knows
        assert schedule.learning_rate(dict(settings, lr_schedule_type=kind), 5, 4) > 0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        schedule.learning_rate(dict(settings, lr_schedule_type="cyclic"), 5, 4)
