"""Property-based tests (hypothesis) of every public transform in `kt.transforms`.

Inputs: 1 to 4 `(gradient, variable)` pairs, each variable of rank 0 to 3
(dims 1 to 5) in float16, bfloat16, float32 or float64, its gradient None,
dense, or (rank >= 1) an IndexedSlices with random, possibly repeated, row
indices (0 rows included). Values are finite and safe for the dtype: exact
zeros, tiny values (subnormal in float16) and magnitudes up to 1e3 in
float16 (so a sum of squares in float16 would overflow) and 1e6 otherwise.

For every transform, with random valid arguments, the properties are:

- structure: the same variables in the same order (or the documented subset),
  None stays None, IndexedSlices stay IndexedSlices (same indices and
  dense_shape) where docs/transforms.md's table says sparse is kept, dense gradients keep
  shape and dtype;
- finiteness: no NaN or inf from finite input;
- the documented formula (docs/transforms.md's table), with NumPy in float64 as the
  oracle, and the invariant it implies (a clipped norm is at most the bound...).

The eager tests run many examples; the same checks run under
`tf.function(jit_compile=True)` for a few. All are derandomized, so CI sees the
same examples on every run.
"""

import collections
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_trainop as kt

T = kt.transforms

DTYPES = ["float16", "bfloat16", "float32", "float64"]
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
# Smallest normal number: below it TF may flush to zero (denormals-are-zero on CPU).
TINY = {"float16": 2.0**-14, "bfloat16": 2.0**-126, "float32": 2.0**-126, "float64": 2.0**-1022}
# Absolute tolerance: the spacing of float16's subnormals (float16 is not
# flushed); for the others, a flushed subnormal.
ATOL = dict(TINY, float16=2.0**-24)
# Relative tolerance against the float64 oracle: two roundings in half precision
# (norms are computed in float32), sums of up to 125 elements in float32/float64.
RTOL = {"float16": 2 * EPS["float16"], "bfloat16": 2 * EPS["bfloat16"], "float32": 1e-5,
        "float64": 1e-12}
LARGEST = {"float16": 1e3, "bfloat16": 1e6, "float32": 1e6, "float64": 1e6}
SMALLEST = {"float16": 1e-7, "bfloat16": 1e-30, "float32": 1e-30, "float64": 1e-200}

# Variable/gradient pair, in NumPy: `values` are float64 holding `dtype`'s
# values (`.values` for kind "sparse"); `index` is the pair's input position.
Pair = collections.namedtuple("Pair", "index dtype shape weight kind values indices")

# One drawn case: `make(variables)` builds the transform; `oracle(pairs)` gives
# the expected output pairs (values None: not checked, e.g. noise);
# `invariant(pairs, outputs)` asserts the documented bound on the outputs;
# `rtol` multiplies RTOL (`min_rtol` is a floor); `scale(pair)` adds an
# absolute tolerance of RTOL * scale.
Case = collections.namedtuple("Case", "make oracle invariant rtol scale min_rtol",
                              defaults=(None, 1.0, None, 0.0))

# too_slow: drawing up to four arrays per example (plus the transform's
# arguments) can pass hypothesis's generation-time limit on a loaded 2-core CI
# machine; that says nothing about the transforms. No other check is suppressed.
SUPPRESSED = [HealthCheck.too_slow]
EAGER = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                 suppress_health_check=SUPPRESSED)
JIT = settings(max_examples=3, deadline=None, derandomize=True, database=None,
               suppress_health_check=SUPPRESSED)


def np_dtype(dtype):
    return tf.as_dtype(dtype).as_numpy_dtype


def rounded(x, dtype):
    """`x` rounded to `dtype` (one rounding, as `tf.constant(x, dtype)`), as float64."""
    return np.asarray(x, np.float64).astype(np_dtype(dtype)).astype(np.float64)


# -- strategies -------------------------------------------------------------------


def elements(dtype):
    tiny = SMALLEST[dtype]
    return st.one_of(
        st.just(0.0),
        st.floats(-1.0, 1.0),
        st.floats(-LARGEST[dtype], LARGEST[dtype]),
        st.builds(lambda s, x: s * x, st.sampled_from([-1.0, 1.0]), st.floats(tiny, 1e3 * tiny)),
    )


def arrays(dtype, shape):
    return hnp.arrays(np.float64, shape, elements=elements(dtype)).map(lambda a: rounded(a, dtype))


@st.composite
def pairs_st(draw):
    pairs = []
    for index in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
        weight = draw(arrays(dtype, shape))
        kind = draw(st.sampled_from(["dense", "sparse", "none"] if shape else ["dense", "none"]))
        values = indices = None
        if kind == "dense":
            values = draw(arrays(dtype, shape))
        elif kind == "sparse":
            indices = np.array(draw(st.lists(st.integers(0, shape[0] - 1), max_size=6)), np.int64)
            values = draw(arrays(dtype, (len(indices),) + shape[1:]))
        pairs.append(Pair(index, dtype, shape, weight, kind, values, indices))
    return pairs


def name_of(index):
    return f"w{index}"


def pattern_of(indices):
    """Regular expressions matching exactly the variables at `indices`."""
    return [f"^{name_of(i)}$" for i in indices]


# -- NumPy helpers ----------------------------------------------------------------


def dense_of(p):
    if p.kind == "sparse":
        out = np.zeros(p.shape)
        np.add.at(out, p.indices, p.values)
        return out
    return p.values


def norm(x):
    return math.sqrt(np.sum(np.square(x)))


def global_norm(pairs):
    return math.sqrt(sum(norm(p.values) ** 2 for p in pairs if p.kind != "none"))


def with_values(p, values):
    return p if p.kind == "none" else p._replace(values=values)


def densified(p, values):
    return p if p.kind == "none" else p._replace(kind="dense", values=values, indices=None)


def unit_axes(rank):
    """docs/transforms.md: the unit of AGC and centralize is the last axis; rank <= 1 is one unit."""
    return tuple(range(rank)) if rank <= 1 else tuple(range(rank - 1))


def bound(dtype, value, rtol=1.0):
    """`value` plus the tolerance of `dtype`, for an invariant `x <= value`."""
    return value * (1 + RTOL[dtype] * rtol) + 2 * ATOL[dtype]


def widest(pairs):
    """The dtype of the loosest tolerance among the pairs (for global quantities)."""
    return max((p.dtype for p in pairs), key=lambda d: RTOL[d], default="float64")


# -- running and checking ---------------------------------------------------------


def make_variables(pairs):
    return [keras.Variable(p.weight.astype(np_dtype(p.dtype)), dtype=p.dtype, name=name_of(p.index))
            for p in pairs]


def to_tf(p):
    if p.kind == "none":
        return None
    values = tf.constant(p.values.astype(np_dtype(p.dtype)))
    if p.kind == "sparse":
        indices, shape = tf.constant(p.indices, tf.int64), tf.constant(p.shape, tf.int64)
        return tf.IndexedSlices(values, indices, shape)
    return values


def stepper(transform, variables, mode):
    """`step(grads) -> list of pairs`: eager, or traced once with jit_compile=True."""
    kept = []

    def step(grads):
        out = transform(list(zip(grads, variables)))
        assert isinstance(out, list)
        kept[:] = [v for _, v in out]
        return [g for g, _ in out]

    if mode == "jit":
        step = tf.function(step, jit_compile=True)
    return lambda grads: list(zip(step(grads), list(kept)))


def assert_close(actual, expected, dtype, rtol=1.0, scale=0.0, min_rtol=0.0, what=""):
    tol = max(RTOL[dtype] * rtol, min_rtol) * (np.abs(expected) + scale) + ATOL[dtype]
    err = np.abs(actual - expected)
    if np.any(err > tol):
        i = np.unravel_index(np.argmax(err - tol), err.shape) if err.ndim else ()
        raise AssertionError(
            f"{what}: {dtype} value {actual[i]!r} != expected {expected[i]!r} "
            f"(error {err[i]:.3g} > tolerance {tol[i]:.3g})"
        )


def check_outputs(out, expected, variables, case):
    """Structure, finiteness and values of `out` against `expected`; returns `out` in NumPy."""
    assert len(out) == len(expected)
    kept = [id(variables[e.index]) for e in expected]
    assert [id(v) for _, v in out] == kept, "not the expected variables in the expected order"
    result = []
    for (g, _), e in zip(out, expected):
        what = f"gradient of {name_of(e.index)} (shape {e.shape}, {e.kind})"
        if e.kind == "none":
            assert g is None, f"{what}: None became {g!r}"
            result.append(e)
            continue
        if e.kind == "sparse":
            assert isinstance(g, tf.IndexedSlices), f"{what}: densified"
            np.testing.assert_array_equal(g.indices.numpy(), e.indices)
            assert tuple(g.dense_shape.numpy()) == e.shape
            values = g.values
        else:
            assert isinstance(g, tf.Tensor), f"{what}: {type(g).__name__}, not a dense tensor"
            values = g
        assert values.dtype == e.dtype, f"{what}: dtype {values.dtype.name}"
        actual = values.numpy().astype(np.float64)
        want = e.values.shape if e.values is not None else e.shape
        assert actual.shape == want, f"{what}: shape {actual.shape} != {want}"
        assert np.all(np.isfinite(actual)), f"{what}: non-finite output from finite input: {actual}"
        if e.values is not None:
            scale = case.scale(e) if case.scale else 0.0
            assert_close(actual, e.values, e.dtype, case.rtol, scale, case.min_rtol, what)
        result.append(e._replace(values=actual))
    return result


def check_case(case, pairs, mode):
    variables = make_variables(pairs)
    transform = case.make(variables)
    note(f"transform: {transform!r}")
    out = stepper(transform, variables, mode)([to_tf(p) for p in pairs])
    result = check_outputs(out, case.oracle(pairs), variables, case)
    if case.invariant is not None:
        case.invariant(pairs, result)


# -- the deterministic transforms: (make, oracle, invariant) per drawn arguments ----


# A bound that is subnormal in float32 acts as 0 on CPU (denormals are flushed).
BOUNDS = st.floats(-1e3, 1e3).map(lambda x: x if abs(x) >= 1e-30 else 0.0)


@st.composite
def clip_by_value_case(draw, pairs):
    if draw(st.booleans()):
        c = draw(st.floats(1e-3, 1e3))
        make, lo, hi = (lambda v: T.clip_by_value(c)), -c, c
    else:
        lo, hi = sorted(draw(st.lists(BOUNDS, min_size=2, max_size=2, unique=True)))
        make = lambda v: T.clip_by_value(lo, hi)  # noqa: E731

    def limits(p):  # a Python bound reaches a half-precision dtype through float32 (tf.cast)
        via = "float64" if p.dtype == "float64" else "float32"
        return rounded(rounded(lo, via), p.dtype), rounded(rounded(hi, via), p.dtype)

    def oracle(pairs):
        return [p if p.kind == "none" else with_values(p, np.clip(p.values, *limits(p)))
                for p in pairs]

    def invariant(pairs, out):
        for p in out:
            if p.kind != "none":  # exact: the bounds rounded to the gradient's dtype
                low, high = limits(p)
                assert np.all((low <= p.values) & (p.values <= high)), (low, high, p.values)

    return Case(make, oracle, invariant, rtol=0.0)


@st.composite
def clip_by_norm_case(draw, pairs):
    c = draw(st.floats(1e-3, 1e3))

    def oracle(pairs):
        return [with_values(p, None if p.kind == "none" else p.values * c / max(norm(p.values), c))
                for p in pairs]

    def invariant(pairs, out):
        for p in out:
            if p.kind != "none":
                assert norm(p.values) <= bound(p.dtype, c), (norm(p.values), c)

    return Case(lambda v: T.clip_by_norm(c), oracle, invariant)


@st.composite
def clip_by_global_norm_case(draw, pairs):
    c = draw(st.floats(1e-3, 1e3))

    def oracle(pairs):
        factor = c / max(global_norm(pairs), c)
        return [with_values(p, None if p.kind == "none" else p.values * factor) for p in pairs]

    def invariant(pairs, out):
        assert global_norm(out) <= bound(widest(out), c), (global_norm(out), c)

    return Case(lambda v: T.clip_by_global_norm(c), oracle, invariant)


@st.composite
def multiply_case(draw, pairs, none_keys=True):
    """Keys by variable, exact path or pattern; a key for a None gradient is an error."""
    keyed = {}
    for p in pairs:
        if (none_keys or p.kind != "none") and draw(st.booleans()):
            keyed[p.index] = (draw(st.sampled_from(["variable", "path", "pattern"])),
                              draw(st.floats(-10.0, 10.0)))
    if not keyed:  # at least one key: one that matches nothing, ignored as in TF1
        keyed[None] = ("pattern", draw(st.floats(-10.0, 10.0)))

    def make(variables):
        keys = {"path": name_of, "pattern": lambda i: pattern_of([i])[0]}
        def key(i, how):
            if i is None:
                return "^nothing$"
            return variables[i] if how == "variable" else keys[how](i)

        return T.multiply([(key(i, how), m) for i, (how, m) in keyed.items()])

    def oracle(pairs):  # half precision is multiplied in float32
        via = {"float64": "float64"}
        return [with_values(p, p.values * rounded(keyed[p.index][1], via.get(p.dtype, "float32")))
                if p.index in keyed and p.kind != "none" else p for p in pairs]

    errors = [p.index for p in pairs if p.kind == "none" and p.index in keyed]
    return Case(make, oracle), errors


def centralize_case(pairs):
    def oracle(pairs):
        out = []
        for p in pairs:
            if p.kind != "none" and len(p.shape) > 1:
                d = dense_of(p)
                p = densified(p, d - d.mean(axis=unit_axes(len(p.shape)), keepdims=True))
            out.append(p)
        return out

    def invariant(pairs, out):
        for p, q in zip(pairs, out):
            if q.kind != "none" and len(q.shape) > 1:
                mean = q.values.mean(axis=unit_axes(len(q.shape)))
                assert np.all(np.abs(mean) <= bound(q.dtype, np.max(np.abs(dense_of(p))))), mean

    return st.just(Case(lambda v: T.centralize(), oracle, invariant,
                        scale=lambda p: float(np.max(np.abs(p.values), initial=0.0)) * 2))


def zero_nans_case(pairs):
    return st.just(Case(lambda v: T.zero_nans(), lambda pairs: list(pairs), rtol=0.0))  # identity


def unit_norms(x, dtype):
    """Per-unit L2 norms as TF computes them: squares in float32 (float64 for
    float64), where a square below the smallest normal number flushes to 0."""
    squares = np.square(np.asarray(x, np.float64))
    squares = np.where(squares < TINY["float64" if dtype == "float64" else "float32"], 0.0, squares)
    return np.sqrt(np.sum(squares, axis=unit_axes(np.ndim(x)), keepdims=True))


def agc_max_norm(p, clipping, eps):
    # eps as TF computes with it: in float32 (float64 for float64), where a
    # value below the smallest normal number is 0 (2.2e-311 was drawn).
    eps = 0.0 if eps < TINY["float64" if p.dtype == "float64" else "float32"] else eps
    return np.maximum(unit_norms(p.weight, p.dtype), eps) * clipping


@st.composite
def adaptive_grad_clip_case(draw, pairs):
    clipping = draw(st.floats(1e-3, 10.0))
    eps = draw(st.one_of(st.just(0.0), st.just(1e-3), st.floats(0.0, 1.0)))

    def oracle(pairs):
        out = []
        for p in pairs:
            if p.kind != "none":
                g_norm = unit_norms(dense_of(p), p.dtype)  # duplicate rows summed
                max_norm = agc_max_norm(p, clipping, eps)
                factor = np.where(g_norm < max_norm, 1.0, max_norm / np.maximum(g_norm, 1e-6))
                p = with_values(p, p.values * factor)
            out.append(p)
        return out

    def invariant(pairs, out):
        for p in out:
            if p.kind != "none":
                g_norm = unit_norms(dense_of(p), p.dtype)
                assert np.all(g_norm <= bound(p.dtype, agc_max_norm(p, clipping, eps))), g_norm

    return Case(lambda v: T.adaptive_grad_clip(clipping, eps), oracle, invariant)


LEAVES = {
    "clip_by_value": clip_by_value_case,
    "clip_by_norm": clip_by_norm_case,
    "clip_by_global_norm": clip_by_global_norm_case,
    "multiply": lambda pairs: multiply_case(pairs, none_keys=False).map(lambda c: c[0]),
    "centralize": centralize_case,
    "zero_nans": zero_nans_case,
    "adaptive_grad_clip": adaptive_grad_clip_case,
}


def leaf_st(pairs):
    return st.sampled_from(sorted(LEAVES)).flatmap(lambda name: LEAVES[name](pairs))


# -- combinators --------------------------------------------------------------------


def input_scale(p):
    return float(np.max(np.abs(p.values), initial=0.0))


@st.composite
def chain_case(draw, pairs):
    leaves = draw(st.lists(leaf_st(pairs), min_size=1, max_size=3))

    def oracle(pairs):
        for leaf in leaves:  # each stage rounds to the dtype, as TF does
            pairs = [p if p.kind == "none" else with_values(p, rounded(p.values, p.dtype))
                     for p in leaf.oracle(pairs)]
        return pairs

    def invariant(pairs, out):  # the last transform's, on what it was given
        last = leaves[-1]
        if last.invariant is not None:
            before = pairs
            for leaf in leaves[:-1]:
                before = leaf.oracle(before)
            last.invariant(before, out)

    # Each stage rounds once more; the oracle's rounding can fall on the other
    # side of a clip bound, hence an absolute tolerance relative to the input.
    scales = {p.index: 4 * input_scale(p) if p.kind != "none" else 0.0 for p in pairs}
    return Case(lambda v: T.chain(*[leaf.make(v) for leaf in leaves]), oracle, invariant,
                rtol=2.0 * len(leaves), scale=lambda p: scales[p.index])


@st.composite
def masked_case(draw, pairs):
    leaf = draw(leaf_st(pairs))
    chosen = [p.index for p in pairs if draw(st.booleans())]
    mask = pattern_of(chosen) or ["^nothing$"]

    def oracle(pairs):
        done = {p.index: p for p in leaf.oracle([p for p in pairs if p.index in chosen])}
        return [done.get(p.index, p) for p in pairs]

    def invariant(pairs, out):
        if leaf.invariant is not None:
            leaf.invariant([p for p in pairs if p.index in chosen],
                           [p for p in out if p.index in chosen])

    return Case(lambda v: T.masked(leaf.make(v), mask), oracle, invariant, leaf.rtol, leaf.scale)


@st.composite
def partition_case(draw, pairs):
    """Labels a, b, c, each with a leaf transform or None (frozen); maybe a default label."""
    labels = {p.index: draw(st.sampled_from("abc")) for p in pairs}
    leaves = {label: draw(st.none() | leaf_st(pairs)) for label in "abc"}
    default = draw(st.sampled_from([None, "a", "b", "c"]))
    # A variable of the default label may be left to the default (no pattern).
    explicit = {i: lb for i, lb in labels.items() if lb != default or draw(st.booleans())}
    patterns = {lb: pattern_of([i for i in explicit if explicit[i] == lb]) for lb in "abc"}
    patterns = {lb: pats for lb, pats in patterns.items() if pats}

    def make(variables):
        return T.partition({lb: leaf and leaf.make(variables) for lb, leaf in leaves.items()},
                           patterns, default_label=default)

    def oracle(pairs):
        done = {}
        for lb, leaf in leaves.items():
            if leaf is not None:  # None: frozen, the pairs are dropped
                group = [p for p in pairs if labels[p.index] == lb]
                done.update((p.index, p) for p in leaf.oracle(group))
        return [done[p.index] for p in pairs if p.index in done]

    def invariant(pairs, out):
        for lb, leaf in leaves.items():
            if leaf is not None and leaf.invariant is not None:
                leaf.invariant([p for p in pairs if labels[p.index] == lb],
                               [p for p in out if labels[p.index] == lb])

    def scale(p):
        leaf = leaves[labels[p.index]]
        return leaf.scale(p) if leaf.scale else 0.0

    rtol = max((leaf.rtol for leaf in leaves.values() if leaf is not None), default=1.0)
    return Case(make, oracle, invariant, rtol, scale)


# -- noise ------------------------------------------------------------------------------


def noise_oracle(pairs):
    """docs/transforms.md: noise on every element, so IndexedSlices become dense; values random."""
    return [densified(p, None) for p in pairs]


@st.composite
def add_noise_case(draw, pairs):
    eta, gamma = draw(st.floats(1e-4, 10.0)), draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 2**63 - 1))
    return Case(lambda v: T.add_noise(eta, gamma, seed=seed), noise_oracle)


@st.composite
def add_scaled_noise_case(draw, pairs):
    scale = draw(st.floats(1e-4, 10.0))
    seed = draw(st.integers(0, 2**63 - 1))

    def invariant(pairs, out):
        for p, q in zip(pairs, out):
            if q.kind != "none":  # truncated at 2 standard deviations
                g = dense_of(p)
                tol = bound(q.dtype, 2 * scale) + RTOL[q.dtype] * np.abs(g)
                assert np.all(np.abs(q.values - g) <= tol), (q.values, g)

    return Case(lambda v: T.add_scaled_noise(scale, seed=seed), noise_oracle, invariant)


# -- the test per transform --------------------------------------------------------------

DETERMINISTIC = {
    "clip_by_value": clip_by_value_case,
    "clip_by_norm": clip_by_norm_case,
    "clip_by_global_norm": clip_by_global_norm_case,
    "centralize": centralize_case,
    "zero_nans": zero_nans_case,
    "adaptive_grad_clip": adaptive_grad_clip_case,
    "add_noise": add_noise_case,
    "add_scaled_noise": add_scaled_noise_case,
    "chain": chain_case,
    "masked": masked_case,
    "partition": partition_case,
}
COVERED = sorted(DETERMINISTIC) + ["adaptive_clip_by_global_norm", "multiply"]


def test_every_public_transform_is_covered():
    factories = {name for name in T.__all__ if name[0].islower()}
    assert factories == set(COVERED)


def property_test(name, pairs, data, mode):
    check_case(data.draw(DETERMINISTIC[name](pairs), label=name), pairs, mode)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@EAGER
@given(pairs=pairs_st(), data=st.data())
def test_transform_properties(name, pairs, data):
    property_test(name, pairs, data, "eager")


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@JIT
@given(pairs=pairs_st(), data=st.data())
def test_transform_properties_under_xla(name, pairs, data):
    property_test(name, pairs, data, "jit")


def multiply_test(pairs, data, mode):
    case, errors = data.draw(multiply_case(pairs), label="multiply")
    if errors:  # docs/transforms.md: a multiplier for a None gradient is an error, as in TF1
        match = f"multiple of `None` gradient for variable '{name_of(errors[0])}'"
        with pytest.raises(ValueError, match=match):
            check_case(case, pairs, mode)
    else:
        check_case(case, pairs, mode)


@EAGER
@given(pairs=pairs_st(), data=st.data())
def test_multiply_properties(pairs, data):
    multiply_test(pairs, data, "eager")


@JIT
@given(pairs=pairs_st(), data=st.data())
def test_multiply_properties_under_xla(pairs, data):
    multiply_test(pairs, data, "jit")


# -- adaptive_clip_by_global_norm: several steps, against its state ---------------------


def adaptive_test(pairs, data, mode):
    """Each step: the state follows docs/transforms.md's moving averages, and the output is
    `g` when `N < exp(mean + std_factor * std)`, else `g * exp(mean) / N`, then at
    most `static_max_norm`. The state is float32, so a norm within float32
    rounding of the threshold may take either branch."""
    std_factor = data.draw(st.floats(0.0, 4.0) | st.floats(-40.0, 0.0), label="std_factor")
    decay = data.draw(st.one_of(st.just(0.95), st.floats(0.0, 0.999)), label="decay")
    static_max_norm = data.draw(st.none() | st.floats(1e-3, 1e3), label="static_max_norm")
    epsilon = data.draw(st.one_of(st.just(1e-8), st.floats(1e-10, 1e-2)), label="epsilon")
    warmup = data.draw(st.booleans(), label="warmup")
    # Per-step gradient scales (the gradients rounded again); 0 gives all-zero gradients.
    scales = data.draw(st.lists(st.sampled_from([0.0, 1e-3, 1.0, 10.0]), min_size=1, max_size=3),
                       label="scales")
    transform = T.adaptive_clip_by_global_norm(std_factor, decay, static_max_norm, epsilon, warmup)
    note(f"transform: {transform!r}")
    variables = make_variables(pairs)
    step = stepper(transform, variables, mode)
    mean = sq_mean = 0.0
    for k, s in enumerate(scales):
        grads = [p if p.kind == "none" else with_values(p, rounded(p.values * s, p.dtype))
                 for p in pairs]
        out = step([to_tf(p) for p in grads])
        # The moving averages, from the previous float32 state.
        n = global_norm(grads)
        log_norm = math.log(n + epsilon)
        d = min(decay, k / (k + 1)) if warmup else decay
        want = (mean - (mean - log_norm) * (1 - d), sq_mean - (sq_mean - log_norm**2) * (1 - d))
        mean, sq_mean = (float(v.numpy()) for v in transform.variables[:2])
        np.testing.assert_allclose([mean, sq_mean], want, rtol=1e-5, atol=1e-5)
        # The factor, from the float32 state.
        std = math.sqrt(max(epsilon, sq_mean - mean**2))
        log_max = mean + std_factor * std
        # A norm whose squares underflow float32 counts as 0 (then g is ~0 too).
        tiny = n < 1e-18
        clipped = math.exp(mean) / n if n > 0 else 0.0
        factors = {1.0, 0.0, clipped} if tiny else set()
        margin = abs(std_factor) * math.sqrt(4 * EPS["float32"] * (abs(sq_mean) + mean**2)) + 1e-5
        if not tiny and math.log(n) < log_max + margin:
            factors.add(1.0)
        if not tiny and math.log(n) >= log_max - margin:
            factors.add(clipped)
        if static_max_norm is not None:
            factors = {min(static_max_norm / n, f) if n > 0 else f for f in factors}
        errors = []
        for f in factors:
            expected = [p if p.kind == "none" else with_values(p, p.values * f) for p in grads]
            try:  # the factor is float32 (the state is): at least float32's tolerance
                result = check_outputs(out, expected, variables, Case(None, None, min_rtol=1e-5))
            except AssertionError as e:
                errors.append(e)
                continue
            break
        else:
            raise AssertionError(f"step {k}: no factor in {factors} matches: {errors}")
        out_norm, rtol = global_norm(result), max(RTOL[widest(grads)], 1e-5)
        if std_factor >= 0:  # docs/transforms.md: clipped to exp(mean) <= max_norm
            assert out_norm <= math.exp(log_max + margin) * (1 + rtol) + 1e-18, (out_norm, log_max)
        if static_max_norm is not None:
            assert out_norm <= static_max_norm * (1 + rtol), out_norm


@EAGER
@given(pairs=pairs_st(), data=st.data())
def test_adaptive_clip_by_global_norm_properties(pairs, data):
    adaptive_test(pairs, data, "eager")


@JIT
@given(pairs=pairs_st(), data=st.data())
def test_adaptive_clip_by_global_norm_properties_under_xla(pairs, data):
    adaptive_test(pairs, data, "jit")
