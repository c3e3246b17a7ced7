"""keras_trainop's step on every backend it runs on, against the same oracles.

This file runs in one pytest process per backend (Keras picks its backend at
import): `python -m pytest` runs it on TensorFlow with the rest of the suite,
`KERAS_BACKEND=jax python -m pytest` runs only it (tests/conftest.py). It
imports TensorFlow only to write and read event files. The oracles are NumPy (tests/oracles.py) and plain
Keras on the same backend: its own clipping arguments, a frozen layer, and
training on the batches a skipped step leaves out.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    MODES,
    SubclassedMLP,
    max_abs_diff,
    mlp,
    mode_kwargs,
    regression_data,
    sequential_mlp,
)
from oracles import CASES, NAMES, PARAMS, TOLERANCE, Sparse, make_grads, make_variables

import keras_trainop as kt
from keras_trainop import _keras_private as private

T = kt.transforms
ON_JAX = BACKEND == "jax"
BATCH = 16  # 64 samples: 4 steps an epoch
jax_only = pytest.mark.skipif(not ON_JAX, reason="what the JAX backend refuses or avoids")
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="what the PyTorch backend does its own way")
not_tensorflow = pytest.mark.skipif(BACKEND == "tensorflow", reason="what other backends refuse")


def state_of(model):
    """Every variable a step may change: weights (BatchNormalization's too) and the optimizer's."""
    return [keras.ops.convert_to_numpy(v) for v in model.weights + model.optimizer.variables]


def nan_data(*bad_batches):
    x, y = regression_data()
    for b in bad_batches:
        x[b * BATCH + 3, 1] = np.nan
    return x, y


def without(data, *batches):
    keep = [i for i in range(len(data[0])) if i // BATCH not in batches]
    return data[0][keep], data[1][keep]


def plain_twin(model_kwargs=None, **compile_kwargs):
    model = mlp(keras.Model, **(model_kwargs or {}))
    model.compile(**compile_kwargs)
    return model


# -- the transforms, called directly ----------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_transform_matches_numpy(case, dtype):
    _, make, oracle, nan = case
    variables = make_variables(dtype)
    grads = make_grads(dtype, sparse=False, nan=nan)
    transform = make(variables)
    pairs = [
        (None if g is None else keras.ops.convert_to_tensor(g, dtype), variables[n])
        for g, n in zip(grads, NAMES)
    ]
    result = transform(pairs)
    expected, kept = oracle(grads, [PARAMS[n] for n in NAMES])
    assert [v.path for _, v in result] == kept
    assert len(expected) == len(result)
    for (g, _), e in zip(result, expected):
        assert not isinstance(e, Sparse)
        if e is None:
            assert g is None
            continue
        assert keras.backend.standardize_dtype(g.dtype) == dtype
        np.testing.assert_allclose(keras.ops.convert_to_numpy(g).astype(np.float64), e, **TOLERANCE[dtype])


NOISES = {
    "add_noise": (lambda: T.add_noise(0.3, 0.55, seed=5), lambda t: np.sqrt(0.3 / (1.0 + t) ** 0.55)),
    # The std of a standard normal truncated to [-2, 2] is 0.8796.
    "add_scaled_noise": (lambda: T.add_scaled_noise(0.5, seed=5), lambda t: 0.5 * 0.8796256610342398),
}


@pytest.mark.parametrize("noise", sorted(NOISES))
def test_noise_is_seeded_and_has_its_variance(noise):
    """docs/transforms.md: a fresh draw each step, the same for the same seed, of the stated std."""
    make, std = NOISES[noise]
    variable = keras.Variable(np.zeros((100, 100), "float32"), name="kernel")
    zeros = [(keras.ops.zeros((100, 100)), variable)]
    transform, twin = make(), make()
    draws = [keras.ops.convert_to_numpy(transform(zeros)[0][0]).astype(np.float64) for _ in range(3)]
    again = keras.ops.convert_to_numpy(twin(zeros)[0][0])
    assert np.array_equal(draws[0], again)
    assert np.abs(draws[0] - draws[1]).min() >= 0 and not np.allclose(draws[0], draws[1])
    for t, draw in enumerate(draws):
        np.testing.assert_allclose(draw.std(), std(t), rtol=0.03)
        assert abs(draw.mean()) < 4 * std(t) / 100
    if noise == "add_scaled_noise":
        assert np.abs(draws[0]).max() <= 2 * 0.5 * (1 + 1e-3)
    assert int(keras.ops.convert_to_numpy(transform.step)) == 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("noise", sorted(NOISES))
def test_noise_in_fit_is_the_transforms_own_draw(noise, mode):
    """One SGD step with noise minus one without is -lr times the draw of step 0; skipped steps draw none."""
    make, _ = NOISES[noise]
    x, y = regression_data(BATCH)
    transform = make()
    noisy, quiet = mlp(kt.Model), mlp(kt.Model)
    noisy.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[transform], check_numerics="skip",
                  **mode_kwargs(mode))
    quiet.compile(keras.optimizers.SGD(0.1), "mse", **mode_kwargs(mode))
    for model in (noisy, quiet):
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    zeros = [(keras.ops.zeros(v.shape), v) for v in noisy.trainable_variables]
    expected = [-0.1 * keras.ops.convert_to_numpy(g) for g, _ in make()(zeros)]
    moved = [keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)
             for a, b in zip(noisy.trainable_variables, quiet.trainable_variables)]
    assert max_abs_diff(moved, expected) < 1e-6
    noisy.fit(*nan_data(1), batch_size=BATCH, shuffle=False, verbose=0)  # 4 steps, 1 skipped
    assert int(keras.ops.convert_to_numpy(transform.step)) == 4


# -- transforms in fit ---------------------------------------------------------------

CLIPS = {
    "clip_by_global_norm": (T.clip_by_global_norm(0.05), {"global_clipnorm": 0.05}),
    "clip_by_norm": (T.clip_by_norm(0.05), {"clipnorm": 0.05}),
    "clip_by_value": (T.clip_by_value(0.01), {"clipvalue": 0.01}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(CLIPS))
@pytest.mark.parametrize("cls", [kt.Model, kt.Sequential, "subclass"])
def test_clip_equals_kerass_own_argument(cls, kind, mode):
    transform, keras_argument = CLIPS[kind]
    x, y = regression_data()
    if cls == "subclass":
        model, oracle = _built(KtSubclassedMLP()), _built(SubclassedMLP())
    elif cls is kt.Sequential:
        model, oracle = sequential_mlp(kt.Sequential), sequential_mlp(keras.Sequential)
    else:
        model, oracle = mlp(kt.Model), mlp(keras.Model)
    oracle.set_weights(model.get_weights())
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[transform], **mode_kwargs(mode))
    oracle.compile(keras.optimizers.SGD(0.1, **keras_argument), "mse", **mode_kwargs(mode))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    expected = oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), oracle.evaluate(x, y, verbose=0), rtol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), oracle.predict(x, verbose=0), atol=1e-6)


class KtSubclassedMLP(kt.TrainOpModel, SubclassedMLP):
    pass


def _built(model):
    model(np.zeros((1, 4), "float32"))  # built by a call, so that the weights can be copied
    return model


def _with_penalty(base):
    """A subclass of `base` whose loss adds an L2 penalty of the output kernel (Keras's hook)."""

    class Penalised(base):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = super().compute_loss(x, y, y_pred, sample_weight, training)
            return loss + 0.1 * keras.ops.sum(keras.ops.square(self.get_layer("out").kernel))

    return Penalised


@pytest.mark.parametrize("mode", MODES)
def test_a_compute_loss_override_is_what_the_step_minimises(mode):
    """Keras's backend-agnostic hook for a custom loss: the step (and its clip) sees it."""
    x, y = regression_data()
    model, oracle = mlp(_with_penalty(kt.Model)), mlp(_with_penalty(keras.Model))
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                  **mode_kwargs(mode))
    oracle.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    expected = oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-6)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6
    plain = mlp(keras.Model)
    plain.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    plain.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(state_of(model), state_of(plain)) > 1e-4  # the penalty counted


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["multiply_by_zero", "variables_to_train"])
def test_a_frozen_layer_as_keras_freezes_it(how, mode):
    """`multiply({"out/": 0})` with SGD, or `variables_to_train=["hidden"]`: as `out.trainable = False`."""
    x, y = regression_data()
    option = (
        {"grad_transforms": [T.multiply({"out/": 0.0})]}
        if how == "multiply_by_zero" else {"variables_to_train": ["hidden"]}
    )
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.1), "mse", **option, **mode_kwargs(mode))
    oracle = mlp(keras.Model)
    oracle.get_layer("out").trainable = False
    oracle.compile(keras.optimizers.SGD(0.1), "mse", **mode_kwargs(mode))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    values = lambda m: [keras.ops.convert_to_numpy(v) for v in m.weights]  # noqa: E731
    assert max_abs_diff(values(model), values(oracle)) < 1e-6
    initial = [keras.ops.convert_to_numpy(v) for v in mlp(keras.Model).get_layer("out").weights]
    assert max_abs_diff(values(model)[2:], initial) == 0.0


class MinimizingMLP(kt.Model):
    """A user's own `train_step` that keeps every option through `self.minimize` (README)."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data

        def loss_fn():
            y_pred = self(x, training=True)
            return self.compute_loss(x, y, y_pred), y_pred

        y_pred = self.minimize(loss_fn)
        for metric in self.metrics:
            if metric.name not in ("loss", "skipped_steps"):
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


@pytest.mark.skipif(ON_JAX, reason="JAX: a user train_step is stateless (docs/backends.md)")
@pytest.mark.parametrize("mode", MODES)
def test_a_users_train_step_keeps_the_options_through_minimize(mode):
    """The same clip and skip as the built-in step: plain Keras's `global_clipnorm` without the bad batch."""
    data = nan_data(2)
    model = MinimizingMLP()
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                  check_numerics="skip", **mode_kwargs(mode))
    keras.utils.set_random_seed(0)
    model(data[0][:1])
    oracle = SubclassedMLP()
    keras.utils.set_random_seed(0)
    oracle(data[0][:1])
    oracle.set_weights(model.get_weights())
    oracle.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    history = model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    oracle.fit(*without(data, 2), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert history["skipped_steps"] == [1.0, 1.0]
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


# -- check_numerics ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("policy", [True, "all"])
def test_a_non_finite_step_raises_and_changes_nothing(policy, steps_per_execution, mode):
    """Step 3 of 4 is nan: fit raises naming it, and every variable is as after step 2."""
    data = nan_data(2)
    model = mlp(kt.Model, batchnorm=True)
    model.compile("adam", "mse", check_numerics=policy, steps_per_execution=steps_per_execution,
                  **mode_kwargs(mode))
    with pytest.raises(kt.NonFiniteError) as raised:
        model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    error = raised.value
    assert error.step == 3
    if policy == "all":
        assert error.what == "loss and gradients"
        assert error.variables == [v.path for v in model.trainable_variables]
    else:
        assert (error.what, error.variables) == ("loss", [])
    oracle = plain_twin({"batchnorm": True}, optimizer="adam", loss="mse", **mode_kwargs(mode))
    oracle.fit(*without(data, 2, 3), batch_size=BATCH, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6
    # The record was read: the next fit on good data trains.
    model.fit(*without(data, 2), batch_size=BATCH, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 5


@pytest.mark.parametrize("mode", MODES)
def test_train_on_batch_raises_for_its_own_batch(mode):
    x, y = nan_data(1)
    model = mlp(kt.Model)
    model.compile("sgd", "mse", **mode_kwargs(mode))
    model.train_on_batch(x[:BATCH], y[:BATCH])
    with pytest.raises(kt.NonFiniteError) as raised:
        model.train_on_batch(x[BATCH:2 * BATCH], y[BATCH:2 * BATCH])
    assert raised.value.step == 2
    oracle = plain_twin(optimizer="sgd", loss="mse", **mode_kwargs(mode))
    oracle.train_on_batch(x[:BATCH], y[:BATCH])
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6
    for m in (model, oracle):
        m.train_on_batch(x[2 * BATCH:3 * BATCH], y[2 * BATCH:3 * BATCH])
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_skip_equals_training_without_the_bad_batch(steps_per_execution, mode):
    data = nan_data(2)
    transform = T.adaptive_clip_by_global_norm()
    model = mlp(kt.Model, batchnorm=True)
    model.compile("adam", "mse", check_numerics="skip", grad_transforms=[transform],
                  steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    history = model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    oracle_transform = T.adaptive_clip_by_global_norm()
    oracle = mlp(kt.Model, batchnorm=True)
    oracle.compile("adam", "mse", grad_transforms=[oracle_transform], **mode_kwargs(mode))
    expected = oracle.fit(*without(data, 2), batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    assert history["skipped_steps"] == [1.0, 1.0]
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-5
    # The transform's own state saw 6 updates, not 8.
    values = lambda t: [keras.ops.convert_to_numpy(v) for v in t.variables]  # noqa: E731
    assert max_abs_diff(values(transform), values(oracle_transform)) < 1e-5
    skipped_total = model.train_step_state.state_variables[-2]
    assert int(keras.ops.convert_to_numpy(skipped_total)) == 2


@pytest.mark.parametrize("mode", MODES)
def test_skip_raises_after_max_consecutive(mode):
    data = nan_data(1, 2)
    model = mlp(kt.Model)
    model.compile("sgd", "mse", check_numerics=kt.SkipNonFinite(max_consecutive=1), **mode_kwargs(mode))
    with pytest.raises(kt.NonFiniteError, match="2 consecutive steps"):
        model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    oracle = plain_twin(optimizer="sgd", loss="mse", **mode_kwargs(mode))
    oracle.fit(*without(data, 1, 2, 3), batch_size=BATCH, shuffle=False, verbose=0)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


class CountByUpdate(kt.transforms.GradientTransform):
    """Counts its updates through the state protocol."""

    def build(self, variables):
        self.count = self.add_state("count", "int32")
        super().build(variables)

    def update(self, grads_and_vars, state):
        return grads_and_vars, [state[0] + 1]


class CountByAssigning(kt.transforms.GradientTransform):
    """Counts its calls the older way: assigning its own state in `call`."""

    def build(self, variables):
        self.count = self.add_state("count", "int32")
        super().build(variables)

    def call(self, grads_and_vars):
        self.count.assign(self.count + 1)
        return grads_and_vars


@pytest.mark.parametrize("mode", MODES)
def test_a_users_stateful_transforms_count_only_applied_updates(mode):
    data = nan_data(1, 3)
    transforms = [CountByUpdate(), CountByAssigning()]
    model = mlp(kt.Model)
    model.compile("sgd", "mse", check_numerics="skip", grad_transforms=transforms, **mode_kwargs(mode))
    model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    counts = [int(keras.ops.convert_to_numpy(t.count)) for t in transforms]
    assert counts == [4, 4]  # 8 steps, 4 skipped
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4


@pytest.mark.parametrize("mode", MODES)
def test_mixed_bfloat16_clip_equals_kerass_own(mode, mixed_bfloat16):
    x, y = regression_data()
    model, oracle = mlp(kt.Model), mlp(keras.Model)
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                  check_numerics="all", **mode_kwargs(mode))
    oracle.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert model.weights[0].dtype == "float32"
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


# -- accumulation, the global step, loss scaling ----------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_accumulation_equals_one_batch_k_times_larger(steps_per_execution, mode):
    """4 micro-batches of 16 with a clip of their mean: one batch of 64 with Keras's own clip."""
    x, y = regression_data(n=128)
    step = keras.Variable(0, dtype="int32", trainable=False, name="global_step")
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.1), "mse", gradient_accumulation_steps=4, global_step=step,
                  grad_transforms=[T.clip_by_global_norm(0.05)], check_numerics="all",
                  steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    oracle = plain_twin(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.05), loss="mse",
                        **mode_kwargs(mode))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=4 * BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6
    assert int(keras.ops.convert_to_numpy(step)) == 4  # updates, not batches


@pytest.mark.parametrize("mode", MODES)
def test_a_global_step_variable_counts_applied_updates(mode):
    step = keras.Variable(0, dtype="int32", trainable=False, name="global_step")
    model = mlp(kt.Model)
    model.compile("sgd", "mse", check_numerics="skip", global_step=step, **mode_kwargs(mode))
    model.fit(*nan_data(1, 2), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(step)) == 4  # 8 steps, 4 skipped
    assert model.train_step_state.state_variables[-1] is step


class Counter(keras.layers.Layer):
    """Passes its input through; holds a non-trainable counter for update ops."""

    def build(self, shape):
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False,
                                     name="count")

    def call(self, x):
        return x


def counting_model():
    keras.utils.set_random_seed(0)
    counter = Counter()
    inputs = keras.Input((4,))
    return kt.Model(inputs, keras.layers.Dense(1)(counter(inputs))), counter


@pytest.mark.parametrize("mode", MODES)
def test_update_ops_run_once_per_applied_update(mode):
    model, counter = counting_model()
    model.compile("sgd", "mse", check_numerics="skip", gradient_accumulation_steps=2,
                  update_ops=[lambda: counter.count.assign_add(1)], **mode_kwargs(mode))
    model.fit(*nan_data(1), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    # 8 batches, 2 skipped: 6 kept make 3 updates of 2.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
    assert int(keras.ops.convert_to_numpy(counter.count)) == 3


@jax_only
def test_an_update_op_that_writes_outside_the_model_is_refused():
    elsewhere = keras.Variable(0, dtype="int32", trainable=False)
    model, _ = counting_model()
    model.compile("sgd", "mse", update_ops=[lambda: elsewhere.assign_add(1)])
    with pytest.raises(ValueError, match="may change only the model's non-trainable variables"):
        model.fit(*regression_data(), batch_size=BATCH, verbose=0)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_float16_transforms_see_unscaled_gradients(mode, mixed_float16):
    """kt's clip under Keras's LossScaleOptimizer: as the inner optimizer's own clip."""
    x, y = regression_data()
    model, oracle = mlp(kt.Model), mlp(keras.Model)
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                  **mode_kwargs(mode))
    oracle.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_an_overflow_under_loss_scaling_is_not_hidden_by_the_transforms(mode, mixed_float16):
    """float16 gradients overflow at first, and zero_nans + a clip would make them finite:
    the optimizer still skips and halves its scale, as Keras's does."""
    x, y = regression_data()
    y = y * 3000.0  # the scaled loss's gradients overflow float16 at the initial scale
    model, oracle = mlp(kt.Model), mlp(keras.Model)
    model.compile(keras.optimizers.SGD(1e-3), "mse", grad_transforms=[T.zero_nans(), T.clip_by_value(0.01)],
                  **mode_kwargs(mode))
    oracle.compile(keras.optimizers.SGD(1e-3, clipvalue=0.01), "mse", **mode_kwargs(mode))
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    oracle.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    scale = lambda m: float(keras.ops.convert_to_numpy(m.optimizer.dynamic_scale))  # noqa: E731
    assert scale(oracle) < 32768.0  # the oracle did overflow
    assert scale(model) == scale(oracle)
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


# -- gradient telemetry -------------------------------------------------------------------
#
# Event files are TensorFlow's (tf.summary writes them, TensorBoard reads them),
# on every backend, as for keras.callbacks.TensorBoard.

PATHS = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]


def read_events(logdir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    )
    acc.Reload()
    return acc


def values(acc, tag):
    import tensorflow as tf

    return [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def numpy_gradients(model, x, y):
    """The gradients of the MLP's mean squared error, by hand (NumPy, float64)."""
    w1, b1, w2, b2 = (keras.ops.convert_to_numpy(w).astype(np.float64) for w in model.weights)
    h = np.tanh(x @ w1 + b1)
    d_out = 2.0 * (h @ w2 + b2 - y) / y.size
    d_z = (d_out @ w2.T) * (1.0 - h**2)
    return dict(zip(PATHS, [x.T @ d_z, d_z.sum(0), h.T @ d_out, d_out.sum(0)]))


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_summarize_gradients_writes_every_update_to_the_default_writer(mode, steps_per_execution, tmp_path):
    import tensorflow as tf

    x, y = regression_data()
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.01), "mse", summarize_gradients=True,
                  steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    first = numpy_gradients(model, x[:BATCH].astype(np.float64), y[:BATCH].astype(np.float64))
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    writer.close()
    acc = read_events(tmp_path)
    assert set(acc.Tags()["tensors"]) == {f"{p}/gradient" for p in PATHS} | {f"{p}/gradient_norm" for p in PATHS}
    for p in PATHS:
        norms = values(acc, f"{p}/gradient_norm")
        assert [step for step, _ in norms] == list(range(1, 9))
        np.testing.assert_allclose(norms[0][1], np.linalg.norm(first[p]), rtol=1e-5)
        histograms = values(acc, f"{p}/gradient")
        assert [step for step, _ in histograms] == list(range(1, 9))
        assert histograms[0][1][:, 2].sum() == first[p].size  # every element counted once


@pytest.mark.parametrize("steps_per_execution", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_tensorboard_writes_applied_updates_at_their_steps(mode, steps_per_execution, tmp_path):
    x, y = nan_data(1)
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.01), "mse", check_numerics="skip",
                  grad_transforms=[T.clip_by_global_norm(0.05)], steps_per_execution=steps_per_execution,
                  **mode_kwargs(mode))
    first = numpy_gradients(model, x[:BATCH].astype(np.float64), y[:BATCH].astype(np.float64))
    callback = kt.GradientTensorBoard(tmp_path, update_freq=2, metrics=True)
    logs = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[callback]).history
    acc = read_events(tmp_path / "train")
    per_variable = {f"{p}/gradient" for p in PATHS} | {f"{p}/gradient_norm" for p in PATHS}
    overall = {"global_norm/gradient_norm", "global_norm/clipped_gradient_norm", "skipped_steps/total"}
    assert set(acc.Tags()["tensors"]) == per_variable | overall
    # 8 batches, 2 skipped: 6 updates, recorded at updates 2, 4 and 6.
    for tag in per_variable | overall:
        assert [step for step, _ in values(acc, tag)] == [2, 4, 6]
    assert values(acc, "skipped_steps/total")[-1][1] == 2
    raw = dict(values(acc, "global_norm/gradient_norm"))
    clipped = dict(values(acc, "global_norm/clipped_gradient_norm"))
    for step in (2, 4, 6):
        np.testing.assert_allclose(clipped[step], min(raw[step], 0.05), rtol=1e-5)
        norms = [dict(values(acc, f"{p}/gradient_norm"))[step] for p in PATHS]
        np.testing.assert_allclose(np.sqrt(np.sum(np.square(norms))), clipped[step], rtol=1e-5)
    # metrics=True: the global norms of every update, as epoch means in the logs.
    assert len(logs["grad_norm"]) == len(logs["clipped_grad_norm"]) == 2
    assert all(0.0 < c <= 0.05 + 1e-6 and c <= g for g, c in zip(logs["grad_norm"], logs["clipped_grad_norm"]))
    assert logs["grad_norm"][0] > np.sqrt(sum(np.sum(g**2) for g in first.values())) / 10  # the scale is right


# -- saving --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_saved_model_keeps_its_options_and_resumes_exactly(mode, tmp_path):
    data = nan_data(1)
    model = mlp(kt.Model)
    model.compile("adam", "mse", check_numerics="skip", grad_transforms=[T.clip_by_global_norm(0.05)],
                  **mode_kwargs(mode))
    model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, kt.Model)
    assert loaded.train_options.check_numerics == "skip"
    assert repr(loaded.train_options.transforms) == "[ClipByGlobalNorm(clip_norm=0.05)]"
    counters = lambda m: [int(keras.ops.convert_to_numpy(v)) for v in m.train_step_state.state_variables]  # noqa: E731
    assert counters(loaded) == counters(model) == [1, 0]  # skipped in all, consecutive
    for m in (model, loaded):
        m.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    assert max_abs_diff(state_of(loaded), state_of(model)) == 0.0
    assert counters(loaded) == counters(model) == [2, 0]
    # Served as the plain architecture: the weights are exactly its weights.
    plain = mlp(keras.Model)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(
        plain.predict(data[0][:8], verbose=0), model.predict(data[0][:8], verbose=0), atol=1e-6
    )


def installed(backend):
    import importlib.util

    return backend == "tensorflow" or importlib.util.find_spec(backend) is not None


# Each pair of backends is tested once, from the first backend's process.
OTHER_BACKENDS = {"tensorflow": ["jax", "torch"], "jax": ["torch"], "torch": []}[BACKEND]


def on_other_backend(backend, action, path):
    script = os.path.join(os.path.dirname(__file__), "cross_backend_script.py")
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    subprocess.run([sys.executable, script, backend, action, str(path)], check=True, timeout=300,
                   cwd=os.path.dirname(__file__), env=env, capture_output=True)


def resumed(path, backend):
    with np.load(f"{path}.{backend}.npz") as arrays:
        return [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
@pytest.mark.parametrize("other", OTHER_BACKENDS)
def test_a_model_saved_on_one_backend_resumes_on_the_other(other, tmp_path):
    """Keras's cross-backend promise, with the options and the step's own state."""
    from cross_backend_script import main

    if not installed(other):
        pytest.skip(f"{other} is not installed (README: the `{other}` extra)")
    theirs, ours = tmp_path / "theirs.keras", tmp_path / "ours.keras"
    on_other_backend(other, "save", theirs)
    main("save", str(ours))
    for path in (theirs, ours):
        main("resume", str(path))
        on_other_backend(other, "resume", path)
        here, there = resumed(path, BACKEND), resumed(path, other)
        # The skip counters went on from the file's: one skipped step an epoch.
        assert [int(c) for c in here[-2:]] == [int(c) for c in there[-2:]] == [2, 0]
        assert max_abs_diff(here, there) < 1e-5


# -- JAX and PyTorch ----------------------------------------------------------------


@not_tensorflow
@pytest.mark.parametrize("option, value", [
    ("aggregation_method", 0),
    ("gate_gradients", kt.GATE_NONE),
    ("colocate_gradients_with_ops", True),
])
def test_tensorflow_only_options_are_refused_at_compile(option, value):
    model = mlp(kt.Model)
    with pytest.raises(ValueError, match=f"`{option}` configures TensorFlow's graph gradients.*{BACKEND} backend"):
        model.compile("sgd", "mse", **{option: value})
    assert not hasattr(model, "train_options")  # nothing compiled


@jax_only
@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_on_two_devices_equals_one_device(mode):
    """The transforms and the check see the global batch's gradient (plain Keras on one device)."""
    devices = keras.distribution.list_devices()
    assert len(devices) == 2
    data = nan_data(1)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        model = mlp(kt.Model)
        model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                      check_numerics="skip", **mode_kwargs(mode))
        history = model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
        weights = state_of(model)
        assert len(model.weights[0].value.sharding.device_set) == 2  # replicated on both
    finally:
        keras.distribution.set_distribution(None)
    oracle = plain_twin(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.05), loss="mse",
                        **mode_kwargs(mode))
    oracle.fit(*without(data, 1), batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert history["skipped_steps"] == [1.0, 1.0]
    assert max_abs_diff(weights, state_of(oracle)) < 1e-6


class JaxMinimizingMLP(SubclassedMLP, kt.Model):
    """A user's own stateless `train_step(state, data)` through JAX's `self.minimize` (docs/backends.md)."""

    double_loss = False

    def train_step(self, state, data):
        x, y = data

        def doubled(*args, **kwargs):
            loss, (unscaled, *rest) = self.compute_loss_and_updates(*args, **kwargs)
            return 2.0 * loss, (2.0 * unscaled, *rest)

        return self.minimize(state, (x, 2.0 * y), doubled if self.double_loss else None)


class DoubledLoss(SubclassedMLP):
    def compute_loss(self, *args, **kwargs):
        return 2.0 * super().compute_loss(*args, **kwargs)


@jax_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("double_loss", [False, True], ids=["keras_loss", "own_loss"])
def test_a_users_stateless_train_step_keeps_the_options_through_minimize(double_loss, mode):
    """Its data (y doubled) and its loss (doubled) are what the clip and the skip act on."""
    data = nan_data(2)
    model = JaxMinimizingMLP()
    model.double_loss = double_loss
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[T.clip_by_global_norm(0.05)],
                  check_numerics="skip", **mode_kwargs(mode))
    model(data[0][:1])
    oracle = DoubledLoss() if double_loss else SubclassedMLP()
    oracle(data[0][:1])
    oracle.set_weights(model.get_weights())
    oracle.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    history = model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    x, y = without(data, 2)
    expected = oracle.fit(x, 2.0 * y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    assert history["skipped_steps"] == [1.0, 1.0]
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)  # the doubled loss, if own
    assert max_abs_diff(state_of(model), state_of(oracle)) < 1e-6


@not_tensorflow
@pytest.mark.parametrize("mode", MODES)
def test_the_step_runs_no_tensorflow(mode):
    """TensorFlow would claim a GPU's memory next to JAX or PyTorch once it initialises its devices.

    In a fresh process: other tests here write event files, with TensorFlow.
    """
    script = os.path.join(os.path.dirname(__file__), "no_tensorflow_script.py")
    result = subprocess.run([sys.executable, script, BACKEND, mode], cwd=os.path.dirname(__file__),
                            timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "initialised=False"


@not_tensorflow
def test_the_functional_api_says_it_needs_tensorflow():
    with pytest.raises(NotImplementedError, match="create_train_step.*TensorFlow backend"):
        kt.create_train_step(lambda: 0.0, keras.optimizers.SGD())
    with pytest.raises(NotImplementedError, match="create_train_op.*TensorFlow backend"):
        kt.create_train_op(0.0, keras.optimizers.SGD())


@jax_only
def test_the_private_jax_hooks_exist():
    """keras_trainop's JAX step leans on these (keras_trainop/_keras_private.py)."""
    model = mlp(kt.Model)
    model.compile("sgd", "mse")
    model.fit(*regression_data(), batch_size=BATCH, verbose=0)
    assert [id(v) for v in private.optimizer_variables_built_for(model.optimizer)] == [id(v) for v in model.trainable_variables]
    assert callable(model._update_metrics_variables)
    assert callable(model.jax_state_sync)
    assert model._jax_state_synced is True


# -- PyTorch -----------------------------------------------------------------------------


@torch_only
@pytest.mark.slow
def test_jit_compile_on_torch_trains_as_eagerly():
    """`jit_compile=True` is Keras's `torch.compile` of the step; the host reads break its graph, the numbers stay."""
    data = nan_data(2)
    histories, states = [], []
    for jit in (False, True):
        model = mlp(kt.Model, batchnorm=True)
        model.compile("adam", "mse", check_numerics="skip", grad_transforms=[T.clip_by_global_norm(0.05)],
                      jit_compile=jit)
        histories.append(model.fit(*data, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history)
        states.append(state_of(model))
    assert histories[0]["skipped_steps"] == histories[1]["skipped_steps"] == [1.0, 1.0]
    np.testing.assert_allclose(histories[1]["loss"], histories[0]["loss"], rtol=1e-5)
    assert max_abs_diff(states[1], states[0]) < 1e-5


@torch_only
@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.Adam(),
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
], ids=["adam", "loss_scaled_sgd"])
def test_a_saved_optimizer_names_kerass_public_class(optimizer):
    """Keras 3.15 on PyTorch saves its backend class's module (the reason for the private hook); kt saves the public one."""
    plain = keras.saving.serialize_keras_object(optimizer())
    modules = lambda config: [config["module"]] + (  # noqa: E731
        modules(config["config"]["inner_optimizer"]) if "inner_optimizer" in config["config"] else [])
    assert any(m.startswith("keras.src.backend.torch.optimizers") for m in modules(plain))
    model = mlp(kt.Model)
    model.compile(optimizer(), "mse")
    saved = model.get_compile_config()["optimizer"]
    assert all(m in ("keras.optimizers", "keras.src.optimizers.loss_scale_optimizer") for m in modules(saved))
    loaded = keras.saving.deserialize_keras_object(saved)
    assert type(loaded).__name__ == type(model.optimizer).__name__
