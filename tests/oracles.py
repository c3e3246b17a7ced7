"""The built-in transforms' NumPy oracles and cases, shared by every backend's tests.

No TensorFlow here: `tests/test_backends.py` runs them on JAX too.
"""

import collections
import math

import keras
import numpy as np

import keras_trainop as kt

T = kt.transforms
Sparse = collections.namedtuple("Sparse", "values indices shape")

RNG = np.random.RandomState(0)
PARAMS = {
    "dense/kernel": RNG.randn(3, 4),
    "dense/bias": RNG.randn(4),
    "dense/unused": RNG.randn(2),
    "embedding/embeddings": RNG.randn(6, 3),
}
NAMES = list(PARAMS)
GRADS = {
    "dense/kernel": 2.0 * RNG.randn(3, 4),
    "dense/bias": RNG.randn(4),
    "dense/unused": None,
    "embedding/embeddings": 1.5 * RNG.randn(6, 3),
}
INDICES = np.array([1, 4, 1, 0])  # a duplicate: row 1 twice
SPARSE_VALUES = 1.5 * RNG.randn(4, 3)
DTYPES = ["float32", "float16"]
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float16": dict(rtol=2e-3, atol=2e-3)}


def make_variables(dtype):
    variables = {}
    for name, value in PARAMS.items():
        scope, short = name.split("/")
        with keras.name_scope(scope):
            variables[name] = keras.Variable(value.astype(dtype), name=short)
    return variables


def make_grads(dtype, sparse, nan=False):
    """The NumPy gradients (float64 holding `dtype`'s values), by variable name."""
    grads = {k: None if g is None else g.astype(dtype).astype(np.float64) for k, g in GRADS.items()}
    if sparse:
        values = SPARSE_VALUES.astype(dtype).astype(np.float64)
        grads["embedding/embeddings"] = Sparse(values, INDICES, (6, 3))
    if nan:
        grads["dense/kernel"][0, 1] = np.nan
        values_of(grads["embedding/embeddings"])[1, 2] = np.nan
    return [grads[n] for n in NAMES]


# -- NumPy oracles -------------------------------------------------------------


def values_of(g):
    return g.values if isinstance(g, Sparse) else g


def on_values(fn, g):
    if g is None:
        return None
    if isinstance(g, Sparse):
        return Sparse(fn(g.values), g.indices, g.shape)
    return fn(g)


def dense(g):
    if isinstance(g, Sparse):
        out = np.zeros(g.shape)
        np.add.at(out, g.indices, g.values)
        return out
    return g


def np_global_norm(grads):
    return math.sqrt(sum(np.sum(values_of(g) ** 2) for g in grads if g is not None))


def np_clip_by_norm(t, c):
    return t * c / max(np.linalg.norm(t), c)


def np_clip_by_global_norm(grads, c):
    n = np_global_norm(grads)
    return [on_values(lambda t: t * c / max(n, c), g) for g in grads]


def np_agc(grads, params, clipping, eps=1e-3):
    out = []
    for g, w in zip(grads, params):
        if g is None:
            out.append(None)
            continue
        axes = tuple(range(w.ndim)) if w.ndim <= 1 else tuple(range(w.ndim - 1))
        w_norm = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
        g_norm = np.sqrt(np.sum(dense(g) ** 2, axis=axes, keepdims=True))  # duplicates summed
        max_norm = np.maximum(w_norm, eps) * clipping
        factor = np.where(g_norm < max_norm, 1.0, max_norm / np.maximum(g_norm, 1e-6))
        out.append(on_values(lambda t, f=factor: t * f, g))
    return out


def np_tf1_adaptive(grads, mean, sq_mean, decay=0.95, std_factor=2.0, static_max_norm=None,
                    epsilon=1e-8):
    """One step of TF1's adaptive_clipping_fn: (new grads, new mean, new sq_mean)."""
    n = np_global_norm(grads)
    log_norm = math.log(n + epsilon)
    mean = mean - (mean - log_norm) * (1 - decay)
    sq_mean = sq_mean - (sq_mean - log_norm**2) * (1 - decay)
    std = math.sqrt(max(epsilon, sq_mean - mean**2))
    factor = 1.0 if n < math.exp(mean + std_factor * std) else math.exp(mean) / n
    if static_max_norm is not None:
        factor = min(static_max_norm / n, factor)
    return [on_values(lambda t: t * factor, g) for g in grads], mean, sq_mean


def np_centralize(grads):
    out = []
    for g in grads:
        if g is not None and dense(g).ndim > 1:
            d = dense(g)
            g = d - d.mean(axis=tuple(range(d.ndim - 1)), keepdims=True)
        out.append(g)
    return out


def by_name(grads):
    return dict(zip(NAMES, grads))


# Each case: (id, transform factory taking the variables, oracle(grads, params) ->
# (expected gradients, names kept), whether the input holds NaNs).
def _multiply(variables):
    return T.multiply([
        (variables["embedding/embeddings"], 0.5),  # by variable: beats the regex "embed"
        ("embed", 7.0),
        ("dense/kernel", 3.0),  # exact path: beats the regex "kernel"
        ("kernel", 100.0),
        ("bias$", keras.Variable(-2.0)),  # a variable multiplier
    ])


def _multiply_oracle(grads, params):
    factors = {"dense/kernel": 3.0, "dense/bias": -2.0, "embedding/embeddings": 0.5}
    return [on_values(lambda t, n=n: t * factors.get(n, 1.0), g) for n, g in zip(NAMES, grads)], NAMES


def _adaptive_oracle(grads, params):
    return np_tf1_adaptive(grads, 0.0, 0.0)[0], NAMES


def _agc_oracle(grads, params):
    return np_agc(grads, params, clipping=0.8), NAMES


def _chain_oracle(grads, params):
    clipped = [on_values(lambda t: np_clip_by_norm(t, 3.0), g) for g in grads]
    return [on_values(lambda t, n=n: t * (3.0 if n == "dense/kernel" else 1.0), g)
            for n, g in zip(NAMES, clipped)], NAMES


def _masked_oracle(grads, params):
    chosen = ["dense/kernel", "embedding/embeddings"]
    named = by_name(grads)
    clipped = dict(zip(chosen, np_clip_by_global_norm([named[n] for n in chosen], 0.5)))
    return [clipped.get(n, named[n]) for n in NAMES], NAMES


def _partition_oracle(grads, params):
    named = by_name(grads)
    emb = np_clip_by_global_norm([named["embedding/embeddings"]], 0.3)[0]
    kept = ["dense/kernel", "dense/unused", "embedding/embeddings"]  # the bias is frozen
    out = {n: on_values(lambda t: np.clip(t, -0.2, 0.2), named[n]) for n in kept}
    out["embedding/embeddings"] = emb
    return [out[n] for n in kept], kept


CASES = [
    ("clip_by_value_symmetric", lambda v: T.clip_by_value(0.4),
     lambda g, p: ([on_values(lambda t: np.clip(t, -0.4, 0.4), x) for x in g], NAMES), False),
    ("clip_by_value_range", lambda v: T.clip_by_value(-0.3, 0.5),
     lambda g, p: ([on_values(lambda t: np.clip(t, -0.3, 0.5), x) for x in g], NAMES), False),
    ("clip_by_norm", lambda v: T.clip_by_norm(3.0),
     lambda g, p: ([on_values(lambda t: np_clip_by_norm(t, 3.0), x) for x in g], NAMES), False),
    ("clip_by_global_norm", lambda v: T.clip_by_global_norm(2.0),
     lambda g, p: (np_clip_by_global_norm(g, 2.0), NAMES), False),
    ("multiply", _multiply, _multiply_oracle, False),
    ("adaptive_grad_clip", lambda v: T.adaptive_grad_clip(0.8), _agc_oracle, False),
    ("adaptive_clip_by_global_norm", lambda v: T.adaptive_clip_by_global_norm(), _adaptive_oracle, False),
    ("centralize", lambda v: T.centralize(), lambda g, p: (np_centralize(g), NAMES), False),
    ("zero_nans", lambda v: T.zero_nans(),
     lambda g, p: ([on_values(lambda t: np.where(np.isnan(t), 0.0, t), x) for x in g], NAMES), True),
    ("chain", lambda v: T.chain(T.clip_by_norm(3.0), T.multiply({"dense/kernel": 3.0})),
     _chain_oracle, False),
    ("masked", lambda v: T.masked(T.clip_by_global_norm(0.5), ["kernel", "embeddings"]),
     _masked_oracle, False),
    ("partition", lambda v: T.partition(
        {"emb": T.clip_by_global_norm(0.3), "rest": T.clip_by_value(0.2), "frozen": None},
        labels={"emb": "embeddings", "frozen": r"bias$"}, default_label="rest"),
     _partition_oracle, False),
]
