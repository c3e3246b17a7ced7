"""The built-in gradient transforms called directly, against NumPy.

Every transform runs on dense and IndexedSlices gradients (duplicate indices
included), in float32 and float16, eagerly, in a `tf.function` and under XLA,
and its output is compared with a NumPy implementation of its documented
formula. Noise is checked by its statistics and its reproducibility.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES
from oracles import (
    CASES,
    DTYPES,
    NAMES,
    PARAMS,
    TOLERANCE,
    Sparse,
    T,
    dense,
    make_grads,
    make_variables,
    np_agc,
    np_global_norm,
    np_tf1_adaptive,
    on_values,
    values_of,
)


def to_tf(g, dtype):
    if g is None:
        return None
    if isinstance(g, Sparse):
        return tf.IndexedSlices(
            tf.constant(g.values, dtype), tf.constant(g.indices, tf.int64), tf.constant(g.shape, tf.int64)
        )
    return tf.constant(g, dtype)


def compiled(transform, variables, mode):
    """`step(tf_grads) -> (gradients, paths of the variables kept)`, traced once."""
    kept = []

    def step(grads):
        out = transform(list(zip(grads, variables)))
        kept[:] = [v.path for _, v in out]
        return [g for g, _ in out]

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "jit")
    return lambda grads: (step(grads), list(kept))


def run(transform, grads, variables, mode, dtype):
    """Calls the transform once in `mode`; returns (gradients, paths of the variables kept)."""
    return compiled(transform, variables, mode)([to_tf(g, dtype) for g in grads])


def assert_gradients_match(result, expected, dtype):
    assert len(result) == len(expected)
    for r, e in zip(result, expected):
        if e is None:
            assert r is None
        elif isinstance(e, Sparse):
            assert isinstance(r, tf.IndexedSlices), "an IndexedSlices gradient was densified"
            np.testing.assert_array_equal(r.indices.numpy(), e.indices)
            assert r.values.dtype == dtype
            np.testing.assert_allclose(r.values.numpy().astype(np.float64), e.values, **TOLERANCE[dtype])
        else:
            assert isinstance(r, tf.Tensor) and r.dtype == dtype
            np.testing.assert_allclose(r.numpy().astype(np.float64), e, **TOLERANCE[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "indexed_slices"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_transform_matches_numpy(case, dtype, sparse, mode):
    _, make, oracle, nan = case
    variables = make_variables(dtype)
    grads = make_grads(dtype, sparse, nan=nan)
    params = [PARAMS[n].astype(dtype).astype(np.float64) for n in NAMES]
    expected, expected_kept = oracle(grads, params)
    result, kept = run(make(variables), grads, list(variables.values()), mode, dtype)
    assert kept == expected_kept
    assert_gradients_match(result, expected, dtype)


def test_cases_exercise_both_branches_of_the_clips():
    # Guards the oracle cases above: each clip must bind for some gradients
    # and not for others, or the comparison would not test the clipping.
    grads = make_grads("float32", sparse=True)
    params = [PARAMS[n] for n in NAMES]
    agc = np_agc(grads, params, clipping=0.8)
    changed = [not np.allclose(values_of(a), values_of(g)) for a, g in zip(agc, grads) if g is not None]
    assert any(changed) and not all(changed)
    assert np_global_norm(grads) > 2.0
    n = [np.linalg.norm(values_of(g)) for g in grads if g is not None]
    assert min(n) < 3.0 < max(n)
    # Duplicate indices: the norm of .values differs from the dense norm.
    emb = grads[NAMES.index("embedding/embeddings")]
    assert not np.isclose(np.linalg.norm(emb.values), np.linalg.norm(dense(emb)))


# -- the TF1 adaptive rule over several steps ------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("static_max_norm", [None, 3.0])
@pytest.mark.parametrize("warmup", [False, True])
def test_adaptive_clip_by_global_norm_over_steps_matches_numpy(warmup, static_max_norm, mode):
    variables = make_variables("float32")
    transform = T.adaptive_clip_by_global_norm(static_max_norm=static_max_norm, warmup=warmup)
    step = compiled(transform, list(variables.values()), mode)
    mean = sq_mean = 0.0
    for k, factor in enumerate([1.0, 20.0, 0.05, 1.0, 300.0]):
        grads = [on_values(lambda t: t * factor, g) for g in make_grads("float32", sparse=True)]
        decay = min(0.95, k / (k + 1)) if warmup else 0.95
        expected, mean, sq_mean = np_tf1_adaptive(grads, mean, sq_mean, decay=decay,
                                                  static_max_norm=static_max_norm)
        result, _ = step([to_tf(g, "float32") for g in grads])
        assert_gradients_match(result, expected, "float32")
    state = [v.numpy() for v in transform.variables]
    np.testing.assert_allclose(state[:2], [mean, sq_mean], rtol=1e-5)
    assert state[2:] == ([5] if warmup else [])


# -- noise ---------------------------------------------------------------------------

TRUNCATED_STD = 0.8796256610342398  # std of N(0, 1) truncated to [-2, 2]
NOISE_SHAPE = (100, 100)


def noise_of(transform, mode, dtype, sparse, calls=1):
    """The noise the transform adds at each of `calls` calls, as float64 arrays."""
    with keras.name_scope("big"):
        var = keras.Variable(np.zeros(NOISE_SHAPE, dtype), name="kernel")
    grad = Sparse(np.ones((3, 100)), np.array([5, 7, 5]), NOISE_SHAPE) if sparse else np.ones(NOISE_SHAPE)
    step = compiled(transform, [var], mode)
    noises = []
    for _ in range(calls):
        (out,), _ = step([to_tf(grad, dtype)])
        assert isinstance(out, tf.Tensor) and out.dtype == dtype  # dense, also from IndexedSlices
        noises.append(out.numpy().astype(np.float64) - dense(grad))
    return noises


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "indexed_slices"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_noise_is_truncated_normal_times_scale(dtype, sparse, mode):
    (noise,) = noise_of(T.add_scaled_noise(0.5, seed=3), mode, dtype, sparse)
    assert np.max(np.abs(noise)) <= 2 * 0.5 * (1 + 1e-3)  # truncated at 2 sigma
    assert abs(noise.mean()) < 4 * 0.5 / math.sqrt(noise.size)
    np.testing.assert_allclose(noise.std(), 0.5 * TRUNCATED_STD, rtol=0.03)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "indexed_slices"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_annealed_noise_variance_is_eta_over_one_plus_t_to_the_gamma(dtype, sparse, mode):
    eta, gamma = 4.0, 0.55
    noises = noise_of(T.add_noise(eta, gamma, seed=5), mode, dtype, sparse, calls=4)
    for t, noise in enumerate(noises):
        std = math.sqrt(eta / (1 + t) ** gamma)
        np.testing.assert_allclose(noise.std(), std, rtol=0.03)
        assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
    assert np.max(np.abs(noises[0])) > 3 * math.sqrt(eta)  # a normal, not truncated


@pytest.mark.parametrize("mode", MODES)
def test_noise_is_reproducible_from_seed_and_step(mode):
    def three(seed):
        transform = T.add_noise(1.0, seed=seed)
        noises = noise_of(transform, mode, "float32", sparse=False, calls=3)
        assert int(transform.step.numpy()) == 3  # one per call
        return noises

    a, b, c = three(11), three(11), three(12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0], a[1])  # a new draw each step
    assert not np.allclose(a[0], c[0])  # another seed, other noise


def test_noise_with_no_seed_draws_one_and_saves_it():
    transform = T.add_scaled_noise(0.1)
    assert isinstance(transform.seed, int)
    again = T.AddScaledNoise.from_config(transform.get_config())
    a, b = noise_of(transform, "eager", "float32", False), noise_of(again, "eager", "float32", False)
    np.testing.assert_array_equal(a[0], b[0])


# -- multiply ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_variable_multiplier_is_read_at_every_step(mode):
    variables = make_variables("float32")
    multiplier = keras.Variable(2.0)
    transform = T.multiply({r"kernel$": multiplier})
    grads = make_grads("float32", sparse=False)
    step = compiled(transform, list(variables.values()), mode)
    for value in (2.0, -0.5):
        multiplier.assign(value)
        (kernel_grad, *_), _ = step([to_tf(g, "float32") for g in grads])
        np.testing.assert_allclose(kernel_grad.numpy(), grads[0] * value, rtol=1e-6)


def test_a_ref_key_and_a_tensor_multiplier_work():
    variables = make_variables("float32")
    kernel = variables["dense/kernel"]
    transform = T.multiply({kernel.value.ref(): tf.constant(4.0)})
    grads = make_grads("float32", sparse=False)
    (out, *_), _ = run(transform, grads, list(variables.values()), "eager", "float32")
    np.testing.assert_allclose(out.numpy(), grads[0] * 4.0, rtol=1e-6)


def test_a_multiplier_for_a_none_gradient_is_an_error():
    variables = make_variables("float32")
    with pytest.raises(ValueError, match="multiple of `None` gradient for variable 'dense/unused'"):
        run(T.multiply({"unused": 2.0}), make_grads("float32", False), list(variables.values()),
            "eager", "float32")


def test_a_variable_matched_by_two_multiplier_patterns_is_an_error():
    variables = make_variables("float32")
    with pytest.raises(ValueError, match="'dense/kernel' is matched by more than one"):
        run(T.multiply({"dense": 2.0, "kernel": 3.0}), make_grads("float32", False),
            list(variables.values()), "eager", "float32")


# -- partition errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, default_label, match",
    [({"a": "dense", "b": "kernel"}, "a", "'dense/kernel' matches the patterns of more than one"),
     ({"a": "dense"}, None, "'embedding/embeddings' matches no label")],
    ids=["two_labels", "no_label"],
)
def test_partition_needs_exactly_one_label_per_variable(labels, default_label, match):
    variables = make_variables("float32")
    transform = T.partition({"a": T.clip_by_norm(1.0), "b": None}, labels, default_label)
    with pytest.raises(ValueError, match=match):
        run(transform, make_grads("float32", False), list(variables.values()), "eager", "float32")


def swap_for_tf_variable(grads_and_vars):
    """A faulty child: returns the tf.Variable under each Keras variable."""
    return [(g, v.value) for g, v in grads_and_vars]


@pytest.mark.parametrize("combinator", [
    lambda child: T.masked(child, "kernel"),
    lambda child: T.partition({"a": child}, {}, default_label="a"),
], ids=["masked", "partition"])
def test_a_combinator_refuses_a_child_that_returns_a_foreign_variable(combinator):
    # Before: the pair was silently dropped and the variable stopped training.
    variables = make_variables("float32")
    with pytest.raises(ValueError, match="which it was not given"):
        run(combinator(swap_for_tf_variable), make_grads("float32", False),
            list(variables.values()), "eager", "float32")


# -- construction-time validation ------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: T.clip_by_value(0.0), "`clip_value` must be a finite number > 0. Received: clip_value=0.0"),
        (lambda: T.clip_by_value(1.0, -1.0), "`clip_value_min` must be < `clip_value_max`"),
        (lambda: T.clip_by_value("1", 2.0), "`clip_value_min` must be a finite number. Received"),
        (lambda: T.clip_by_norm(-1.0), "`clip_norm` must be a finite number > 0 or a scalar tensor. Received: clip_norm=-1.0"),
        (lambda: T.clip_by_global_norm(float("inf")), "`clip_norm` must be a finite number > 0"),
        (lambda: T.clip_by_global_norm(True), "`clip_norm` must be a finite number > 0"),
        (lambda: T.multiply({}), "`multipliers` must be a non-empty dict"),
        (lambda: T.multiply({"(": 1.0}), "Each key of `multipliers` must be"),
        (lambda: T.multiply({"a": "b"}), "Each multiplier must be a number"),
        (lambda: T.multiply({"a": tf.ones(2)}), "Each multiplier must be a scalar"),
        (lambda: T.add_scaled_noise(0.0), "`scale` must be a finite number > 0"),
        (lambda: T.add_noise(1.0, -1.0), "`gamma` must be a finite number >= 0"),
        (lambda: T.add_noise(1.0, seed=-3), r"`seed` must be None or an integer in \[0, 2\*\*63\)"),
        (lambda: T.adaptive_grad_clip(0.0), "`clipping` must be a finite number > 0"),
        (lambda: T.adaptive_grad_clip(0.1, eps=-1.0), "`eps` must be a finite number >= 0"),
        (lambda: T.adaptive_clip_by_global_norm(decay=1.0), r"`decay` must be in \[0, 1\)"),
        (lambda: T.adaptive_clip_by_global_norm(static_max_norm=0.0), "`static_max_norm` must be"),
        (lambda: T.adaptive_clip_by_global_norm(warmup=1), "`warmup` must be a bool"),
        (lambda: T.chain(T.zero_nans(), 3), r"`transforms\[1\]` must be a callable"),
        (lambda: T.masked(T.zero_nans(), []), "`mask` must be a regular expression"),
        (lambda: T.masked(T.zero_nans(), "["), "`mask` must be a regular expression"),
        (lambda: T.partition({}, {}), "`transforms` must be a non-empty dict"),
        (lambda: T.partition({"a": None}, {"b": "x"}), "`labels` must be a dict from labels of"),
        (lambda: T.partition({"a": None}, {}, default_label="z"), "`default_label` must be None or"),
    ],
)
def test_arguments_are_validated_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()
