"""The networks, as data: each architecture is a list of layer tuples (edit here to add one).

Owns the layer lists of smcn, smcnLin, smcnDeep and smcnBN, the original's layer names, which layers are
activated and where dropout goes, and what batch norm normalises with at inference. No TensorFlow
(deepnet_network builds the graphs from these lists).
"""

# ('conv', kernel, channels) | ('dropout',) | ('maxpool', size, stride) | ('avgpool', size, stride)
# | ('dense', units) | ('logits',).  Every conv and dense layer is activated; logits are not.
_SMCN_HEAD = [("conv", 5, 64), ("dropout",), ("conv", 3, 64), ("maxpool", 3, 2)]
_SMCN_BLOCK = [("conv", 1, 64), ("dropout",), ("conv", 5, 64)]
_SMCN_TAIL = [("maxpool", 3, 2), ("dense", 384), ("dropout",), ("dense", 192), ("logits",)]


ARCHITECTURES = {
    "smcn": _SMCN_HEAD + _SMCN_BLOCK + _SMCN_TAIL,
    "smcnLin": [layer if layer[0] != "maxpool" else ("avgpool", 2, 2)
                for layer in _SMCN_HEAD + _SMCN_BLOCK + _SMCN_TAIL if layer[0] != "dropout"],
    "smcnDeep": _SMCN_HEAD + 3 * _SMCN_BLOCK + _SMCN_TAIL,
    "smcnBN": [layer for layer in _SMCN_HEAD + _SMCN_BLOCK + _SMCN_TAIL if layer[0] != "dropout"],
}
BATCH_NORM_NETWORKS = {"smcnBN"}
# What batch norm normalises with at inference: the batch's own statistics, as the original (its layers ran with
# training=True throughout; evaluation then goes in batches of -minibatch_size), or the moving averages.
BN_INFERENCE = ("batch_statistics", "moving_averages")


def bn_inference(settings):
    """settings['bn_inference'], by default the original's batch statistics."""
    return settings.get("bn_inference", BN_INFERENCE[0])


def uses_batch_statistics(settings):
    """Whether inference depends on the batch: batch norm with batch statistics (evaluate in minibatches)."""
    return settings["network"] in BATCH_NORM_NETWORKS and bn_inference(settings) == "batch_statistics"


def layer_names(network):
    """Names of the weighted layers in order, as the original names them: conv1.., dense<k>.., denseout,
    numbered through the whole net (smcn: conv1-conv4, dense5, dense6, denseout)."""
    weighted = [layer[0] for layer in ARCHITECTURES[network] if layer[0] in ("conv", "dense", "logits")]
    return [f"{kind}{i}" if kind != "logits" else "denseout" for i, kind in enumerate(weighted, 1)]


def activated_layers(network):
    """The layers with an activation function: every weighted layer but denseout."""
    return [name for name in layer_names(network) if name != "denseout"]


def n_dropout_layers(network):
    return sum(layer[0] == "dropout" for layer in ARCHITECTURES[network])


def n_trainable_weights(network, n_classes, image_shape=(32, 32, 3)):
    """How many numbers the weighted layers hold (weights and biases, batch norm's scale and offset; not the few
    AF weights): what a snapshot of all weights stores, without TensorFlow ('SAME' pooling: ceil(size / stride))."""
    height, width, channels = image_shape
    total = 0
    for layer in ARCHITECTURES[network]:
        kind = layer[0]
        if kind in ("maxpool", "avgpool"):
            height, width = -(-height // layer[2]), -(-width // layer[2])
            continue
        if kind == "dropout":
            continue
        inputs = channels if kind == "conv" else height * width * channels
        outputs = layer[2] if kind == "conv" else n_classes if kind == "logits" else layer[1]
        total += (layer[1] ** 2 if kind == "conv" else 1) * inputs * outputs + outputs
        total += 2 * outputs if network in BATCH_NORM_NETWORKS and kind != "logits" else 0
        channels = outputs
        if kind != "conv":
            height = width = 1
    return total
