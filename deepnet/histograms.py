"""TensorBoard histograms made off the training step: the trainer fetches the tensors with the step and buckets them
here, in a thread of its summary writer, as TensorFlow's HistogramSummary op does. No TensorFlow.

Owns TensorFlow's default bucket limits and its rule: a value goes to the first bucket whose limit is greater than
it, and a run of empty buckets is written as one bucket ending at the run's last limit.
"""
import sys

import numpy as np


def _default_limits():
    """0, +-1e-12 * 1.1^k below 1e20, and +-DBL_MAX, ascending (each limit computed as TensorFlow computes it)."""
    positive, limit = [], 1.0e-12
    while limit < 1.0e20:
        positive.append(limit)
        limit *= 1.1
    positive.append(sys.float_info.max)
    return np.array([-limit for limit in reversed(positive)] + [0.0] + positive)


LIMITS = _default_limits()


def histogram(values):
    """The fields of the HistogramProto TensorFlow's HistogramSummary op makes of values (all finite): min, max,
    num, sum, sum_squares, bucket_limit, bucket. Subnormal values count as 0, as in TensorFlow's threads (they
    flush them); sums are in float64, added pairwise (the op adds in order)."""
    values = np.asarray(values)
    ordered = np.sort(values.ravel()).astype(np.float64)
    if np.issubdtype(values.dtype, np.floating):
        tiny = float(np.finfo(values.dtype).tiny)
        ordered[np.searchsorted(ordered, -tiny, side="right"):np.searchsorted(ordered, tiny, side="left")] = 0.0
    below = np.searchsorted(ordered, LIMITS, side="left")  # values below each limit
    counts = np.diff(below, prepend=0).astype(np.float64)
    empty = counts == 0
    run_ends = np.append(~empty[1:], True)  # an empty bucket is written only as the end of its run
    keep = ~empty | run_ends
    with np.errstate(over="ignore"):  # an infinite sum of squares, as the op's
        sum_squares = float(np.sum(ordered * ordered))
    return {"min": float(ordered[0]) if ordered.size else LIMITS[-1],
            "max": float(ordered[-1]) if ordered.size else -LIMITS[-1],
            "num": float(ordered.size), "sum": float(np.sum(ordered)), "sum_squares": sum_squares,
            "bucket_limit": LIMITS[keep].tolist(), "bucket": counts[keep].tolist()}
