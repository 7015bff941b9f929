"""The fused activation kernels (blend5 ABU, 1_relu) against the plain composition of TF ops and a float64
numpy reference, including gradients through the whole smcn graph."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepnet import activations, architectures  # noqa: E402
import deepnet_network as net  # noqa: E402

tf = net.tf

AF_SET = "5_blend5_swish"
RAW_WEIGHTS = np.array([0.9, -0.4, 0.6, -0.3, 0.5])  # negative raw weights on purpose
BETAS = [1.0, 0.7, 1.8, -0.6]
SPECIAL_X = np.array([0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-3, -1e-3, 0.3, -0.3, 1.0, -1.0, 3.0, -3.0,
                      20.0, -20.0, 50.0, -50.0, 90.0, -90.0])
HUGE_X = np.array([1e3, -1e3, 1e4, -1e4, 3e5, -3e5, 1e30, -1e30])
TOL = 1e-5  # fused vs plain composition
TOL_REFERENCE = {"float32": 2e-6, "float64": 1e-12}  # fused vs the float64 reference


def bulk_x(rng):
    """The special points, random normal data and wide-range data (many kernel blocks)."""
    wide = rng.normal(size=20000) * rng.choice([0.01, 1.0, 5.0, 30.0], size=20000)
    return np.concatenate([SPECIAL_X, rng.normal(size=30000), wide])


# ---------------------------------------------------------------- independent float64 reference

def reference(x, w, beta, dy):
    """Of y = sum_i w_i f_i(x) (w: effective weights), in float64: y, dx, dw, dbeta, each with the
    size of what it sums (the scale that rounding errors are relative to)."""
    x, dy, w = np.asarray(x, np.float64), np.asarray(dy, np.float64), np.asarray(w, np.float64)
    z = beta * x
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))
    u = np.exp(-np.abs(z))
    dsig = u / (1.0 + u) ** 2  # sig (1 - sig), accurate in the tails
    negative_part = np.expm1(np.minimum(x, 0.0))
    funcs = np.stack([np.maximum(x, 0.0), np.where(x > 0, x, negative_part), np.tanh(x), x * sig, x])
    slopes = np.stack([(x > 0).astype(np.float64), np.where(x > 0, 1.0, negative_part + 1.0),
                       1.0 - np.tanh(x) ** 2, sig + z * dsig, np.ones_like(x)])
    beta_terms = w[3] * dy * x * x * dsig
    return {"y": (w @ funcs, np.abs(w) @ np.abs(funcs)),
            "dx": (dy * (w @ slopes), np.abs(dy) * (np.abs(w) @ np.abs(slopes))),
            "dw": (funcs @ dy, np.abs(funcs) @ np.abs(dy)),
            "dbeta": (np.sum(beta_terms), np.sum(np.abs(beta_terms)))}


def blend_jacobian(raw, blend_mode):
    """d effective / d raw of the blend mode (derived by hand, float64)."""
    n = len(raw)
    eye = np.eye(n)
    if blend_mode == "unrestricted":
        return eye
    if blend_mode in ("normalized", "posnormed"):  # the original's posnormed is normalized
        total = np.sum(raw)
        return (eye - np.outer(raw / total, np.ones(n))) / total
    if blend_mode == "absnormed":
        total = np.sum(np.abs(raw))
        return eye / total - np.outer(raw, np.sign(raw)) / total ** 2
    if blend_mode == "clipnormed":
        clipped = np.clip(raw, activations.POSNORM_MIN, activations.POSNORM_MAX)
        inside = (raw > activations.POSNORM_MIN) & (raw < activations.POSNORM_MAX)
        total = np.sum(clipped)
        return (eye - np.outer(clipped / total, np.ones(n))) / total * inside
    if blend_mode == "softmaxed":
        e = np.exp(raw - np.max(raw))
        e /= np.sum(e)
        return np.diag(e) - np.outer(e, e)
    raise AssertionError(f"no Jacobian for blend mode {blend_mode}")


def reference_relu(x, w, beta, dy):
    """Of y = w[0] relu(x), in float64, as reference() (no beta)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    relu, slope = np.maximum(x, 0.0), (x > 0).astype(np.float64)
    return {"y": (w[0] * relu, np.abs(w[0] * relu)), "dx": (w[0] * dy * slope, np.abs(w[0] * dy * slope)),
            "dw": (np.array([np.sum(dy * relu)]), np.array([np.sum(np.abs(dy * relu))]))}


def reference_for_raw(x, raw, beta, dy, blend_mode, af_set=AF_SET):
    """reference() with the weight gradient taken back through the blend mode to the raw weights."""
    raw = np.asarray(raw, np.float64)
    of = reference_relu if af_set == "1_relu" else reference
    ref = of(x, activations.effective_weights_numpy(raw, blend_mode), beta, dy)
    jacobian = blend_jacobian(raw, blend_mode)
    ref["dw"] = (jacobian.T @ ref["dw"][0], np.abs(jacobian).T @ ref["dw"][1])
    return ref


# ---------------------------------------------------------------- graphs

OUTPUTS = ("y", "dx", "dw", "dbeta")


class AbuGraph:
    """Fused and plain activation on one input, with gradients w.r.t. x, raw weights and beta."""

    def __init__(self, dtype, blend_mode, af_set=AF_SET):
        self.af_set, self.blend_mode, self.dtype = af_set, blend_mode, dtype
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.x = tf.placeholder(dtype, [None])
            self.dy = tf.placeholder(dtype, [None])
            self.raw = tf.placeholder(dtype, [len(activations.parse_af_set(af_set))])
            self.beta = tf.placeholder(dtype, [])
            self.outputs = {}
            for fused in (True, False):
                y = net.activation(self.x, af_set, self.raw, self.beta, blend_mode, fused=fused)
                grads = tf.gradients(y, [self.x, self.raw, self.beta], grad_ys=self.dy)
                self.outputs[fused] = {name: t for name, t in zip(OUTPUTS, [y] + grads) if t is not None}
            self.fused_ops = sorted(op.type for op in self.graph.get_operations()
                                    if op.type.startswith("Deepnet"))
        self.sess = tf.Session(graph=self.graph)

    def run(self, x, raw, beta, dy):
        feed = {self.x: x, self.dy: dy, self.raw: raw, self.beta: beta}
        return self.sess.run(self.outputs, feed)


@pytest.fixture(scope="module")
def graphs():
    built = {(dtype, mode): AbuGraph(getattr(tf, dtype), mode)
             for dtype in ("float32", "float64") for mode in activations.BLEND_MODES}
    yield built
    for g in built.values():
        g.sess.close()


def assert_within(actual, expected, bound, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: NaN/Inf"
    excess = np.abs(actual - expected) - bound
    worst = int(np.argmax(excess))
    assert np.max(excess) <= 0, (f"{what}: off by {np.ravel(np.abs(actual - expected))[worst]:.3g}, "
                                 f"allowed {np.ravel(np.broadcast_to(bound, np.shape(actual)))[worst]:.3g}")


def check(graph, x, raw, beta, dy):
    """Fused vs the float64 reference (tight) and vs the plain composition (TOL), each relative to the
    size of the terms where that exceeds 1."""
    outputs = graph.run(x, raw, beta, dy)
    ref = reference_for_raw(x, raw, beta, dy, graph.blend_mode, graph.af_set)
    assert sorted(outputs[True]) == sorted(outputs[False]) == sorted(ref)
    # With one function every blend mode but unrestricted makes the weight the constant 1: the exact
    # d/d raw is 0, and both paths return TF's rounding residue of w/w's gradient times a large sum.
    degenerate = len(raw) == 1 and graph.blend_mode != "unrestricted"
    if degenerate:  # the residue is a few roundings of d/d effective (summed in whatever order the CPU's packs give)
        of = reference_relu if graph.af_set == "1_relu" else reference
        weight = activations.effective_weights_numpy(raw, graph.blend_mode)
        residue = 4 * np.finfo(graph.dtype.as_numpy_dtype).eps * of(x, weight, beta, dy)["dw"][1] / np.abs(raw)
    for name in ref:
        exact, scale = ref[name]
        fused, plain = outputs[True][name], outputs[False][name]
        what = f"{graph.af_set} {graph.dtype.name} {graph.blend_mode} beta={beta} {name}"
        bound = TOL * np.maximum(1.0, scale)
        if degenerate and name == "dw":
            bound = bound + np.abs(np.asarray(plain, np.float64)) + residue
        else:
            assert_within(fused, exact, TOL_REFERENCE[graph.dtype.name] * np.maximum(1.0, scale),
                          what + " vs reference")
        assert_within(fused, plain, bound, what + " vs plain")


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("blend_mode", list(activations.BLEND_MODES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_matches_plain_and_reference(graphs, blend_mode, dtype):
    graph = graphs[(dtype, blend_mode)]
    assert graph.fused_ops == ["DeepnetAbuBackward", "DeepnetAbuForward"]
    rng = np.random.default_rng(1)
    x = bulk_x(rng).astype(dtype)
    for beta in BETAS:
        dy = rng.normal(0.5, 1.0, size=x.shape).astype(dtype)  # biased: sums do not cancel out
        raw = (RAW_WEIGHTS * rng.uniform(0.5, 1.5, size=5)).astype(dtype)
        check(graph, x, raw, beta, dy)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_each_point_alone(graphs, dtype):
    """Every special and huge point on its own (dy = 1 and -2.5), so no sum hides it."""
    graph = graphs[(dtype, "unrestricted")]
    for beta in BETAS:
        for point in np.concatenate([SPECIAL_X, HUGE_X]):
            for dy in (1.0, -2.5):
                check(graph, np.array([point], dtype), RAW_WEIGHTS.astype(dtype), beta,
                      np.array([dy], dtype))


@pytest.mark.parametrize("blend_mode", ["unrestricted", "softmaxed"])
def test_huge_inputs(graphs, blend_mode):
    """Only large |x|: finite everywhere, sums relative to their size."""
    rng = np.random.default_rng(5)
    x = (np.sign(rng.normal(size=5000)) * 10 ** rng.uniform(1, 30, size=5000)).astype(np.float32)
    check(graphs[("float32", blend_mode)], x, RAW_WEIGHTS.astype(np.float32), 1.8,
          rng.normal(size=x.shape).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_scaled_relu(dtype):
    """1_relu: values and dx bit for bit as the plain w * relu(x), dw to TOL, in every blend mode."""
    rng = np.random.default_rng(6)
    for blend_mode in activations.BLEND_MODES:
        x = bulk_x(rng) if blend_mode != "unrestricted" else np.concatenate([bulk_x(rng), HUGE_X])
        x = x.astype(dtype)
        graph = AbuGraph(getattr(tf, dtype), blend_mode, "1_relu")
        assert graph.fused_ops == ["DeepnetScaledRelu", "DeepnetScaledReluGrad"]
        for raw in (0.8, -0.7, 1.0):
            raw = np.array([raw], dtype)
            dy = rng.normal(0.5, 1.0, size=x.shape).astype(dtype)  # biased: sums do not cancel out
            outputs = graph.run(x, raw, 1.0, dy)
            np.testing.assert_array_equal(outputs[True]["y"], outputs[False]["y"])
            np.testing.assert_array_equal(outputs[True]["dx"], outputs[False]["dx"])
            check(graph, x, raw, 1.0, dy)
        graph.sess.close()


def output_buffers(sess, fetches, feed):
    """Run fetches with a full trace; {op name: address of its first output's buffer}, and the values."""
    metadata = tf.RunMetadata()
    values = sess.run(fetches, feed, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
                      run_metadata=metadata)
    buffers = {node.node_name: node.output[0].tensor_description.allocation_description.ptr
               for device in metadata.step_stats.dev_stats for node in device.node_stats
               if node.output and node.output[0].slot == 0}
    return buffers, values


@pytest.mark.parametrize("af_set", [AF_SET, "1_relu"])
def test_outputs_reuse_input_buffers(af_set):
    """y is written into x's buffer and dx into dy's when nothing else reads them (no fresh memory to fault in),
    with the reference's values; x read by another fetch keeps its buffer and its values."""
    rng = np.random.default_rng(7)
    x = np.concatenate([bulk_x(rng), np.full(15, 3.0)]).astype(np.float32)  # ends in a block's tail: no full pack
    dy = np.concatenate([rng.normal(0.5, 1.0, size=x.size - 15), np.ones(15)]).astype(np.float32)
    raw = RAW_WEIGHTS[:len(activations.parse_af_set(af_set))].astype(np.float32)
    ref = reference_for_raw(2 * x, raw, 1.3, 2 * dy, "unrestricted", af_set)

    def assert_reference(value, name):
        assert_within(value, ref[name][0], TOL_REFERENCE["float32"] * np.maximum(1.0, ref[name][1]), name)

    with tf.Graph().as_default():
        x_in, dy_in = tf.placeholder(tf.float32, [None]), tf.placeholder(tf.float32, [None])
        doubled_x, doubled_dy = tf.multiply(x_in, 2.0, name="doubled_x"), tf.multiply(dy_in, 2.0, name="doubled_dy")
        weights = tf.constant(raw)
        y = net.activation(doubled_x, af_set, weights, 1.3, fused=True)
        dx, dw = tf.gradients(y, [doubled_x, weights], grad_ys=doubled_dy)
        feed = {x_in: x, dy_in: dy}
        with tf.Session() as sess:
            buffers, y_value = output_buffers(sess, y, feed)
            assert buffers[y.op.name] == buffers["doubled_x"]
            assert_reference(y_value, "y")
            buffers, (dx_value, dw_value) = output_buffers(sess, [dx, dw], feed)
            assert buffers[dx.op.name] == buffers["doubled_dy"]
            assert_reference(dx_value, "dx")
            assert_reference(dw_value, "dw")  # its sums read dy where dx is written
            buffers, (y_value, x_value) = output_buffers(sess, [y, doubled_x], feed)
            assert buffers[y.op.name] != buffers["doubled_x"]
            np.testing.assert_array_equal(x_value, 2 * x)
            assert_reference(y_value, "y")


def test_module_flag_and_explicit_choice():
    with tf.Graph().as_default() as graph:
        x = tf.zeros([4])
        net.activation(x, AF_SET, RAW_WEIGHTS, 1.0, fused=False)
        assert not [op for op in graph.get_operations() if op.type.startswith("DeepnetAbu")]
        saved, net.FUSED_ABU = net.FUSED_ABU, False
        try:
            net.activation(x, AF_SET, RAW_WEIGHTS, 1.0)
            assert not [op for op in graph.get_operations() if op.type.startswith("DeepnetAbu")]
        finally:
            net.FUSED_ABU = saved
        net.activation(x, AF_SET, RAW_WEIGHTS, 1.0)
        assert [op.type for op in graph.get_operations()].count("DeepnetAbuForward") == 1
        with pytest.raises(ValueError, match="blend5"):
            net.activation(x, "3_relu+tanh+jswish", [1.0, 1.0, 1.0], 1.0, fused=True)


def test_empty_input(graphs):
    outputs = graphs[("float32", "unrestricted")].run(np.zeros(0, np.float32), RAW_WEIGHTS.astype(np.float32),
                                                      1.3, np.zeros(0, np.float32))
    assert outputs[True]["y"].shape == (0,)
    np.testing.assert_array_equal(outputs[True]["dw"], np.zeros(5))
    assert outputs[True]["dbeta"] == 0


def test_build_failure_falls_back_to_plain(tmp_path, monkeypatch, capsys):
    """A kernel that does not compile: one warning line, the plain composition, fused=True refused."""
    broken = tmp_path / "broken.cc"
    broken.write_text("int main( { return 0; }\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(net, "_ABU_SOURCE", str(broken))
    monkeypatch.setattr(net, "_abu_state", {})
    with tf.Graph().as_default() as graph:
        net.activation(tf.zeros([4]), AF_SET, RAW_WEIGHTS, 1.0)
        assert not [op for op in graph.get_operations() if op.type.startswith("Deepnet")]
        with pytest.raises(RuntimeError, match="could not be built"):
            net.activation(tf.zeros([4]), "1_relu", [1.0], 1.0, fused=True)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: fused activation kernels unavailable")
    assert "broken.cc" in warning[0] and "error" in warning[0]


def test_component_transform_keeps_plain_path():
    with tf.Graph().as_default() as graph:
        net.activation(tf.zeros([4]), AF_SET, RAW_WEIGHTS, 1.0, component_transform=lambda c, i: c * 1.0)
        assert not [op for op in graph.get_operations() if op.type.startswith("DeepnetAbu")]


SMCN_CASES = [(AF_SET, "unrestricted", True), (AF_SET, "softmaxed", True), ("1_relu", "unrestricted", True),
              ("1_relu", "unrestricted", False)]


SMCN_WEIGHTS = {AF_SET: [0.5, -0.2, 0.4, 0.3, 0.2], "1_relu": [0.8]}


def smcn_gradients(fused, af_set, blend_mode, trainable, images, labels, weights=None):
    """Loss and gradients of all trainable variables of smcn for one minibatch (dropout on)."""
    settings = dict(network="smcn", af_set=af_set, blend_mode=blend_mode, blend_trainable=trainable,
                    swish_beta_trainable=trainable, seed=3, n_classes=10, use_wd=True, wd_lambda=0.004,
                    optimizer="Adam")
    weights = SMCN_WEIGHTS[af_set] if weights is None else weights
    af_init = {name: {"blend_weights": np.array(weights, np.float32), "swish_beta": 1.4}
               for name in architectures.activated_layers("smcn")}
    saved, net.FUSED_ABU = net.FUSED_ABU, fused
    try:
        with tf.Graph().as_default() as graph:
            model = net.build_model(settings, af_init)
            variables = tf.trainable_variables()
            grads = tf.gradients(model.loss, variables)
            used = any(op.type in ("DeepnetAbuForward", "DeepnetScaledRelu") for op in graph.get_operations())
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                feed = {model.inputs.images: images, model.inputs.labels: labels,
                        model.inputs.keep_probs: [0.5], model.inputs.training: True}
                loss, values = sess.run([model.loss, grads], feed)
    finally:
        net.FUSED_ABU = saved
    assert used == fused
    return loss, {v.op.name: g for v, g in zip(variables, values)}


@pytest.mark.parametrize("af_set,blend_mode,trainable", SMCN_CASES)
def test_whole_smcn_gradients_agree(af_set, blend_mode, trainable):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 6).astype(np.int64)
    loss_f, grads_f = smcn_gradients(True, af_set, blend_mode, trainable, images, labels)
    loss_p, grads_p = smcn_gradients(False, af_set, blend_mode, trainable, images, labels)
    # A blend mode's raw-weight gradient is a sum over the gradients w.r.t. the effective weights that can cancel:
    # its rounding is relative to those, the unrestricted gradients at the same effective weights.
    effective = activations.effective_weights_numpy(SMCN_WEIGHTS[af_set], blend_mode).astype(np.float32)
    per_effective = smcn_gradients(False, af_set, "unrestricted", trainable, images, labels, effective)[1] \
        if trainable and blend_mode != "unrestricted" else {}
    assert abs(loss_f - loss_p) <= TOL * max(1.0, abs(loss_p))
    assert grads_f.keys() == grads_p.keys()
    assert any(name.endswith("/blend_weights_raw") for name in grads_f) == trainable
    assert any(name.endswith("/swish_beta") for name in grads_f) == (trainable and af_set == AF_SET)
    assert all(name.startswith("smcn/") for name in grads_f)  # the original's '<network>/<layer>/...' names
    for name in grads_p:
        g_f, g_p = np.asarray(grads_f[name], np.float64), np.asarray(grads_p[name], np.float64)
        assert np.all(np.isfinite(g_f)), name
        scale = np.max(np.abs(g_p))
        if name.endswith("swish_beta"):  # a sum that cancels: relative to its layer's weight gradients
            assert np.shape(g_p) == (1,), name  # swish_beta has shape [1], as the original's
            scale = max(scale, np.max(np.abs(grads_p[name.replace("swish_beta", "blend_weights_raw")])))
        if name.endswith("blend_weights_raw") and name in per_effective:
            scale = max(scale, np.max(np.abs(per_effective[name])))
        assert scale > 0, name
        assert np.max(np.abs(g_f - g_p)) <= TOL * scale, (name, np.max(np.abs(g_f - g_p)), scale)
