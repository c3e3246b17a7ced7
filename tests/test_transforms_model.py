"""The built-in gradient transforms through `model.fit` and the functional API.

Oracles: plain Keras (`SGD(clipvalue=)`, `SGD(clipnorm=)`, `SGD(global_clipnorm=)`),
TF1's `optimize_loss` test numbers, and an uninterrupted run for saving.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, max_abs_diff, mlp, mode_kwargs, optimizer_state, regression_data

import keras_trainop as kt

T = kt.transforms
BATCH = 16
VOCAB = 10


def fit(model, x, y, epochs=1):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False)


def token_data(n=64, seed=0):
    """Integer tokens with repeats inside every batch (duplicate IndexedSlices indices)."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, VOCAB, size=(n, 3)).astype("int32")
    y = rng.randn(n, 1).astype("float32")
    return x, y


def embedding_model(cls, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 4, name="embedding")(inputs)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(1, name="dense")(h)
    return cls(inputs, outputs)


def first_batch_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:BATCH], model(x[:BATCH]))
        loss = tf.reduce_mean(loss)
    return [tf.convert_to_tensor(g.values if isinstance(g, tf.IndexedSlices) else g)
            for g in tape.gradient(loss, model.trainable_variables)]


# -- plain Keras as the oracle ----------------------------------------------------

KERAS_CLIPS = [
    ("clipvalue", 0.01, T.clip_by_value, lambda gs, c: max(float(tf.reduce_max(tf.abs(g))) for g in gs) > c),
    ("clipnorm", 0.05, T.clip_by_norm, lambda gs, c: max(float(tf.norm(g)) for g in gs) > c),
    ("global_clipnorm", 0.05, T.clip_by_global_norm, lambda gs, c: float(tf.linalg.global_norm(gs)) > c),
]
MODELS = {
    "mlp": (lambda cls: mlp(cls), regression_data),
    "embedding": (embedding_model, token_data),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("clip", KERAS_CLIPS, ids=[c[0] for c in KERAS_CLIPS])
def test_clipping_matches_plain_keras_optimizer_arguments(clip, model_kind, mode):
    argument, value, factory, binds = clip
    make, data = MODELS[model_kind]
    x, y = data()
    ours, theirs = make(kt.Model), make(keras.Model)
    assert binds(first_batch_gradients(theirs, x, y), value)  # the clip really acts
    ours.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[factory(value)], **mode_kwargs(mode))
    theirs.compile(keras.optimizers.SGD(0.1, **{argument: value}), "mse", **mode_kwargs(mode))
    fit(ours, x, y, epochs=2)
    fit(theirs, x, y, epochs=2)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) <= 1e-6


# -- TF1 optimize_loss numbers -----------------------------------------------------


def tf1_step(transform, mode):
    """One step of TF1's optimize_loss test: var 10, loss |var * 5|, SGD(0.1)."""
    var = keras.Variable(10.0, name="v")
    step = kt.create_train_step(
        lambda: tf.abs(var * 5.0),
        keras.optimizers.SGD(0.1),
        variables_to_train=lambda: [var],
        transform_grads_fn=transform,
    )
    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "jit")
    step()
    return float(var.numpy())


@pytest.mark.parametrize("mode", MODES)
def test_tf1_global_norm_clip(mode):
    np.testing.assert_allclose(tf1_step(T.clip_by_global_norm(0.1), mode), 9.98999, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_tf1_gradient_multiplier(mode):
    assert tf1_step(T.multiply({"v": 7.0}), mode) == pytest.approx(6.5, rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_tf1_adaptive_clipping_with_default_arguments(mode):
    transform = T.adaptive_clip_by_global_norm()
    np.testing.assert_allclose(tf1_step(transform, mode), 9.8916, atol=1e-4)
    assert len(transform.variables) == 2
    assert not any(v.trainable for v in transform.variables)


# -- state, saving and resuming --------------------------------------------------------


def every_builtin():
    """A chain holding every built-in transform, with saveable arguments only."""
    return T.chain(
        T.zero_nans(),
        T.clip_by_value(5.0),
        T.clip_by_norm(2.0),
        T.multiply({"dense/kernel": 0.5, r"embeddings$": 2.0}),
        T.adaptive_grad_clip(0.5),
        T.adaptive_clip_by_global_norm(),
        T.clip_by_global_norm(1.0),
        T.masked(T.add_noise(0.01, seed=1), "dense"),
        T.partition(
            {"emb": T.add_scaled_noise(0.001, seed=2), "rest": T.centralize(), "frozen": None},
            labels={"emb": "embedding", "frozen": "dense/bias"},
            default_label="rest",
        ),
    )


def compiled_embedding_model(mode, transforms):
    model = embedding_model(kt.Model)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", grad_transforms=transforms,
                  **mode_kwargs(mode))
    return model


def transform_state(model):
    return [v.numpy() for v in model.train_step_state.state_variables]


@pytest.mark.parametrize("mode", MODES)
def test_keras_file_round_trip_of_every_builtin_resumes_exactly(mode, tmp_path):
    x, y = token_data()
    uninterrupted = compiled_embedding_model(mode, [every_builtin()])
    fit(uninterrupted, x, y, epochs=2)

    first = compiled_embedding_model(mode, [every_builtin()])
    # Built model: the state exists before the first step is traced.
    assert [v.path for v in first.train_step_state.state_variables] == [
        "adaptive_max_norm_mean", "adaptive_max_norm_sq_mean", "noise_step", "noise_step"]
    fit(first, x, y)
    first.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    assert transform_state(resumed) == transform_state(first)
    (chain,) = resumed.train_options.transforms
    assert type(chain) is T.Chain
    assert keras.saving.serialize_keras_object(chain) == keras.saving.serialize_keras_object(
        first.train_options.transforms[0])
    assert [type(t) for t in chain.transforms] == [type(t) for t in every_builtin().transforms]
    fit(resumed, x, y)

    assert max_abs_diff(resumed.get_weights(), uninterrupted.get_weights()) == 0
    assert max_abs_diff(optimizer_state(resumed), optimizer_state(uninterrupted)) == 0
    assert transform_state(resumed) == transform_state(uninterrupted)
    # The frozen group never moved.
    np.testing.assert_array_equal(
        resumed.get_layer("dense").bias.numpy(), embedding_model(keras.Model).get_layer("dense").bias.numpy())


@pytest.mark.parametrize("save", [
    "weights_file",  # what keras.callbacks.ModelCheckpoint(save_weights_only=True) writes
    "tf_checkpoint",
])
def test_checkpoints_save_and_restore_transform_state(save, tmp_path):
    x, y = token_data()
    noise = T.add_noise(0.1, seed=4)
    adaptive = T.adaptive_clip_by_global_norm()
    model = compiled_embedding_model("graph", [noise, adaptive])
    fit(model, x, y)
    saved = transform_state(model)
    assert saved[0] == 4  # the noise counted 4 steps
    if save == "weights_file":
        model.save_weights(tmp_path / "w.weights.h5")
        fit(model, x, y)
        assert transform_state(model) != saved
        model.load_weights(tmp_path / "w.weights.h5")
    else:
        checkpoint = tf.train.Checkpoint(model=model)
        path = checkpoint.save(tmp_path / "ckpt")
        fit(model, x, y)
        assert transform_state(model) != saved
        checkpoint.restore(path).assert_existing_objects_matched()
    assert transform_state(model) == saved


@pytest.mark.parametrize("mode", MODES)
def test_a_blocked_step_leaves_transform_state_unchanged(mode):
    x, y = token_data()
    y[BATCH + 2] = np.nan  # the second step's loss is NaN
    noise = T.add_noise(0.1, seed=4)
    model = compiled_embedding_model(mode, [noise])
    with pytest.raises(kt.NonFiniteError):
        fit(model, x, y)
    assert int(noise.step.numpy()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_loss_scale_overflow_leaves_transform_state_unchanged(mode, mixed_float16):
    # Before the fix an overflow turned the adaptive averages into nan for good:
    # every later step was skipped and the scale fell without end.
    x, y = regression_data(n=128)
    x[:BATCH] *= 300.0  # the first step overflows float16 at the initial scale
    noise, adaptive = T.add_noise(1e-4, seed=4), T.adaptive_clip_by_global_norm()
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.01), "mse", grad_transforms=[adaptive, noise],
                  **mode_kwargs(mode))
    fit(model, x, y)
    steps = len(x) // BATCH
    applied = int(model.optimizer.iterations)
    assert float(model.optimizer.dynamic_scale) < 32768  # overflows happened
    assert 0 < applied < steps  # ... were skipped, and training went on
    # Oracle: counting. Only applied steps advance the noise counter.
    assert int(noise.step.numpy()) == applied
    assert np.isfinite([v.numpy() for v in adaptive.variables]).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_a_blocked_functional_step_leaves_transform_state_unchanged():
    w = keras.Variable([1.0, 2.0], name="w")
    noise = T.add_noise(0.1, seed=4)
    step = kt.create_train_step(lambda v: tf.reduce_sum(w * v), keras.optimizers.SGD(0.1),
                                transform_grads_fn=noise)
    step(tf.constant([1.0, 1.0]))
    with pytest.raises(kt.NonFiniteError):
        step(tf.constant([np.nan, 1.0]))
    assert int(noise.step.numpy()) == 1


# -- composing with plain functions; sparse gradients stay sparse ------------------------


class Spy:
    """A plain TF1-contract function that records the gradient types it sees."""

    def __init__(self):
        self.types = {}

    def __call__(self, grads_and_vars):
        self.types.update({v.path: type(g).__name__ for g, v in grads_and_vars})
        return grads_and_vars


def halve(grads_and_vars):
    """A plain TF1-contract function."""
    def half(g):
        if isinstance(g, tf.IndexedSlices):
            return tf.IndexedSlices(g.values * 0.5, g.indices, g.dense_shape)
        return g * 0.5

    return [(half(g), v) for g, v in grads_and_vars]


@pytest.mark.parametrize("mode", MODES)
def test_plain_functions_work_alongside_builtins(mode):
    x, y = token_data()
    ours = embedding_model(kt.Model)
    ours.compile(keras.optimizers.SGD(0.2), "mse", **mode_kwargs(mode),
                 grad_transforms=[T.chain(T.clip_by_global_norm(0.05), halve), Spy()])
    theirs = embedding_model(keras.Model)
    theirs.compile(keras.optimizers.SGD(0.1, global_clipnorm=0.05), "mse", **mode_kwargs(mode))
    fit(ours, x, y, epochs=2)
    fit(theirs, x, y, epochs=2)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_indexed_slices_stay_sparse_through_the_sparse_preserving_transforms(mode):
    x, y = token_data()
    spy = Spy()
    sparse_preserving = T.chain(
        T.zero_nans(), T.clip_by_value(5.0), T.clip_by_norm(2.0), T.multiply({"dense": 0.5}),
        T.adaptive_grad_clip(0.5), T.adaptive_clip_by_global_norm(), T.clip_by_global_norm(1.0),
        T.masked(T.clip_by_norm(0.5), "embedding"),
        T.partition({"a": T.clip_by_global_norm(0.1)}, labels={}, default_label="a"), spy,
    )
    fit(compiled_embedding_model(mode, [sparse_preserving]), x, y)
    sparse = {path: name == "IndexedSlices" for path, name in spy.types.items()}
    assert sparse == {"embedding/embeddings": True, "dense/kernel": False, "dense/bias": False}


def test_masked_and_partition_forward_the_state_of_their_children():
    noise, adaptive = T.add_noise(0.1, seed=0), T.adaptive_clip_by_global_norm()
    model = compiled_embedding_model("graph", [
        T.masked(noise, "dense"),
        T.partition({"a": adaptive, "b": None}, labels={"b": "bias"}, default_label="a"),
    ])
    assert [id(v) for v in model.train_step_state.state_variables] == [
        id(v) for v in noise.variables + adaptive.variables]


# -- what cannot be saved ---------------------------------------------------------------


def test_variable_keys_and_values_are_saved_as_path_and_number_with_warnings():
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    transform = T.multiply([(kernel, 2.0), ("bias", keras.Variable(3.0))])
    with pytest.warns(UserWarning) as record:
        config = transform.get_config()
    assert config == {"multipliers": {"kernel": 2.0, "bias": 3.0}}
    messages = " ".join(str(w.message) for w in record)
    assert "saved as that exact path" in messages and "saved as its current value 3.0" in messages


def test_a_chain_leaves_out_what_cannot_be_saved_and_masked_refuses():
    chain = T.chain(T.clip_by_norm(1.0), lambda gv: gv)
    with pytest.warns(UserWarning, match="`chain` element 1 .* is left out"):
        config = keras.saving.serialize_keras_object(chain)
    restored = keras.saving.deserialize_keras_object(config)
    assert [type(t) for t in restored.transforms] == [T.ClipByNorm]
    with pytest.raises(ValueError, match="The masked transform .* cannot be saved"):
        T.masked(lambda gv: gv, "kernel").get_config()


# -- a transform of the user's with state ----------------------------------------------
#
# The protocol: build() creates the state, update(pairs, state) returns the new
# pairs and the new state, and keras_trainop writes the state only when the
# step's update is applied. The older protocol (call() assigning its own state)
# still works: the state is put back when the step is not applied.


class CountingScale(T.GradientTransform):
    """Counts applied steps in its state and scales each gradient by 1 / (1 + count)."""

    def build(self, variables):
        self.count = self.add_state("count", "float32")
        super().build(variables)

    def update(self, grads_and_vars, state):
        (count,) = state
        factor = 1.0 / (1.0 + count)
        return [(None if g is None else g * factor, v) for g, v in grads_and_vars], [count + 1.0]


class AssigningCountingScale(T.GradientTransform):
    """The same, the older way: `call` assigns the state itself."""

    def build(self, variables):
        self.count = self.add_state("count", "float32")
        super().build(variables)

    def call(self, grads_and_vars):
        factor = 1.0 / (1.0 + tf.convert_to_tensor(self.count))
        self.count.assign_add(1.0)
        return [(None if g is None else g * factor, v) for g, v in grads_and_vars]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [CountingScale, AssigningCountingScale], ids=["update", "call"])
def test_a_stateful_transform_of_the_users_moves_only_with_applied_steps(make, mode):
    # Oracle: the same model trained with a stateless transform that scales
    # the k-th applied step by 1 / k, on the good batches only.
    x, y = regression_data()
    bad_y = y.copy()
    bad_y[BATCH + 1] = np.nan  # the second batch is skipped
    transform = make()
    ours = mlp(kt.Model)
    ours.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[transform],
                 check_numerics="skip", **mode_kwargs(mode))
    fit(ours, x, bad_y)
    assert float(transform.count.numpy()) == len(x) // BATCH - 1  # the skipped step did not count

    applied = tf.Variable(0.0)

    def by_position(grads_and_vars):
        factor = 1.0 / (1.0 + applied)
        applied.assign_add(1.0)
        return [(g * factor, v) for g, v in grads_and_vars]

    keep = np.r_[0:BATCH, 2 * BATCH : len(x)]
    reference = mlp(kt.Model)
    reference.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[by_position],
                      check_numerics=False, **mode_kwargs(mode))
    fit(reference, x[keep], y[keep])
    assert max_abs_diff(ours.get_weights(), reference.get_weights()) <= 1e-6


def test_a_stateful_transform_called_on_its_own_writes_its_state():
    transform = CountingScale()
    v = tf.Variable([1.0])
    (g, _), = transform([(tf.constant([2.0]), v)])
    (h, _), = transform([(tf.constant([2.0]), v)])
    np.testing.assert_allclose([g.numpy()[0], h.numpy()[0]], [2.0, 1.0])
    assert float(transform.count.numpy()) == 2.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [CountingScale, AssigningCountingScale], ids=["update", "call"])
def test_a_blocked_step_leaves_a_users_transform_state_unchanged(make, mode):
    x, y = regression_data()
    y[BATCH + 1] = np.nan  # the second step's loss is NaN: the step raises
    transform = make()
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.1), "mse", grad_transforms=[transform], **mode_kwargs(mode))
    with pytest.raises(kt.NonFiniteError, match="at step 2"):
        fit(model, x, y)
    assert float(transform.count.numpy()) == 1.0
