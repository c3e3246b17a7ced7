"""TrainOpModel through `model.fit`: every compile() option, in eager, graph and jit mode."""

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    MODES,
    SubclassedMLP,
    max_abs_diff,
    mlp,
    mode_kwargs,
    optimizer_state,
    regression_data,
    sequential_mlp,
)
from tensorboard.backend.event_processing import event_accumulator

import keras_trainop as kt
from keras_trainop import gradients as gradients_module

BATCH = 16


def fit(model, x, y, epochs=1, **kwargs):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False, **kwargs)


def pair(mode, opt=lambda: keras.optimizers.Adam(0.01), plain_kwargs=None, **options):
    """A kt.Model with `options` and a plain keras.Model with the same initial weights."""
    ours, theirs = mlp(kt.Model), mlp(keras.Model)
    ours.compile(opt(), "mse", **mode_kwargs(mode), **options)
    theirs.compile((plain_kwargs or {}).pop("optimizer", None) or opt(), "mse", **mode_kwargs(mode))
    return ours, theirs


# -- no option: the same training as plain Keras ------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_default_options_train_like_plain_keras(mode):
    x, y = regression_data()
    ours, theirs = pair(mode)
    h_ours, h_theirs = fit(ours, x, y, epochs=2), fit(theirs, x, y, epochs=2)
    np.testing.assert_array_equal(h_ours.history["loss"], h_theirs.history["loss"])
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0
    assert max_abs_diff(optimizer_state(ours), optimizer_state(theirs)) == 0


PlainNet = SubclassedMLP
sequential = sequential_mlp


class Net(kt.TrainOpModel, PlainNet):
    pass


def subclassed(cls):
    keras.utils.set_random_seed(0)
    return cls()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make", [lambda: (sequential(kt.Sequential), sequential(keras.Sequential)),
             lambda: (subclassed(Net), subclassed(PlainNet))],
    ids=["sequential", "subclassed"],
)
def test_sequential_and_subclassed_train_like_plain_keras(mode, make):
    x, y = regression_data()
    ours, theirs = make()
    for model in (ours, theirs):
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", **mode_kwargs(mode))
        fit(model, x, y, epochs=2)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


# -- transforms -----------------------------------------------------------------


class Recorder:
    """A transform that scales gradients and records what it was called with."""

    def __init__(self, factor):
        self.factor = factor
        self.calls = []

    def __call__(self, grads_and_vars):
        self.calls.append(grads_and_vars)
        return [(None if g is None else g * self.factor, v) for g, v in grads_and_vars]


class WithUnusedVariable(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.unused = self.add_weight(shape=(), initializer="ones", name="unused")

    def call(self, x):
        return self.dense(x)


class KtWithUnusedVariable(kt.TrainOpModel, WithUnusedVariable):
    pass


# -- functional and subclassed, in any order ------------------------------------------
#
# Keras's Model.__init__ puts `Functional` into the bases of a class used
# functionally, all the way up to keras.Model. Before the fix, the first
# `kt.Model(inputs, outputs)` of a process rewrote kt.Model's own bases, and
# every later `class Net(kt.Model)` failed to construct. Oracle: keras.Model,
# which is not affected.


def functional(cls):
    inputs = keras.Input((4,))
    return cls(inputs, keras.layers.Dense(1, name="out")(inputs))


def subclass_of(base):
    class Sub(base):
        def __init__(self):
            super().__init__()
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(x)

    return Sub


def saved_and_loaded(base, tmp_path):
    model = functional(base)
    model.compile("sgd", "mse")
    model.save(tmp_path / "functional.keras")
    return keras.saving.load_model(tmp_path / "functional.keras")


def used_functionally_by_a_subclass(base, tmp_path):
    class FunctionalSub(base):
        pass

    return functional(FunctionalSub)


FIRST_USES = {
    "functional": lambda base, tmp_path: functional(base),
    "loaded": saved_and_loaded,
    "subclass_used_functionally": used_functionally_by_a_subclass,
}


@pytest.mark.parametrize("first", sorted(FIRST_USES))
@pytest.mark.parametrize("base", [keras.Model, kt.Model], ids=["keras", "kt"])
def test_subclassing_works_after_functional_use(base, first, tmp_path):
    x, y = regression_data()
    bases = base.__bases__
    first_model = FIRST_USES[first](base, tmp_path)
    assert isinstance(first_model, base)
    assert isinstance(first_model, type(functional(keras.Model)))  # Keras's Functional
    subclassed_model = subclass_of(base)()
    subclassed_model.compile("sgd", "mse")
    subclassed_model.fit(x, y, batch_size=BATCH, verbose=0)
    assert base.__bases__ == bases
    assert isinstance(functional(base), base)  # and functional again


@pytest.mark.parametrize("mode", MODES)
def test_transform_grads_fn_gets_a_list_with_none_gradients(mode):
    x, y = regression_data()
    recorder = Recorder(0.5)
    keras.utils.set_random_seed(0)
    ours = KtWithUnusedVariable()
    ours.compile(keras.optimizers.SGD(0.1), "mse", transform_grads_fn=recorder, **mode_kwargs(mode))
    keras.utils.set_random_seed(0)
    theirs = WithUnusedVariable()
    theirs.compile(keras.optimizers.SGD(0.05), "mse", **mode_kwargs(mode))
    for model in (ours, theirs):  # plain Keras warns about the unused variable too
        with pytest.warns(UserWarning, match="Gradients do not exist"):
            fit(model, x, y)
    first = recorder.calls[0]
    assert isinstance(first, list)
    assert [type(p) for p in first] == [tuple] * 3
    by_path = {v.path.split("/", 1)[1]: g for g, v in first}  # drop the model's name
    assert by_path["unused"] is None
    assert by_path["dense/kernel"] is not None
    # Halving every gradient under SGD(0.1) is SGD(0.05).
    np.testing.assert_allclose(ours.dense.get_weights()[0], theirs.dense.get_weights()[0], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_grad_transforms_apply_in_order(mode):
    x, y = regression_data()
    clip_then_scale = [kt.clip_gradient_norms_fn(0.5), Recorder(0.1)]
    ours, theirs = pair(
        mode,
        opt=lambda: keras.optimizers.SGD(1.0),
        plain_kwargs={"optimizer": keras.optimizers.SGD(0.1, clipnorm=0.5)},
        grad_transforms=clip_then_scale,
    )
    fit(ours, x, y)
    fit(theirs, x, y)
    # Per-tensor clipping then scaling by 0.1 is Keras's clipnorm with a 10x smaller rate.
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in ours.get_weights()]),
        np.concatenate([w.ravel() for w in theirs.get_weights()]),
        rtol=1e-5,
        atol=1e-7,
    )
    reversed_order, _ = pair(mode, opt=lambda: keras.optimizers.SGD(1.0), grad_transforms=clip_then_scale[::-1])
    fit(reversed_order, x, y)
    assert max_abs_diff(reversed_order.get_weights(), theirs.get_weights()) > 1e-3


def test_grad_transforms_and_transform_grads_fn_are_exclusive():
    model = mlp(kt.Model)
    with pytest.raises(ValueError, match="not both"):
        model.compile("sgd", "mse", grad_transforms=[Recorder(1.0)], transform_grads_fn=Recorder(1.0))


@pytest.mark.parametrize("mode", MODES)
def test_a_transform_adding_a_variable_is_an_error(mode):
    x, y = regression_data()
    stranger = tf.Variable(np.ones((4, 8), "float32"))

    def add_pair(grads_and_vars):
        return grads_and_vars + [(tf.ones((4, 8)), stranger)]

    model = mlp(kt.Model)
    model.compile("sgd", "mse", transform_grads_fn=add_pair, **mode_kwargs(mode))
    with pytest.raises(ValueError, match="never add variables"):
        fit(model, x, y)


# -- aggregation_method / gate_gradients -------------------------------------------


GRADIENT_OPTIONS = [
    {"aggregation_method": tf.AggregationMethod.ADD_N},
    {"aggregation_method": tf.AggregationMethod.EXPERIMENTAL_TREE},
    {"aggregation_method": tf.AggregationMethod.EXPERIMENTAL_ACCUMULATE_N},
    {"gate_gradients": kt.GATE_NONE},
    {"gate_gradients": kt.GATE_GRAPH},
]


@pytest.fixture
def tf_gradients_calls(monkeypatch):
    calls = []
    real = tf.compat.v1.gradients

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients_module.tf.compat.v1, "gradients", spy)
    yield calls
    monkeypatch.setattr(gradients_module.tf.compat.v1, "gradients", real)


@pytest.mark.parametrize("mode", ["graph", "jit"])
@pytest.mark.parametrize("options", GRADIENT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_aggregation_and_gating_act_through_tf_gradients(mode, options, tf_gradients_calls):
    x, y = regression_data()
    ours, theirs = pair(mode, **options)
    fit(ours, x, y)
    fit(theirs, x, y)
    assert tf_gradients_calls  # one call per trace
    expected_gate = options.get("gate_gradients", kt.GATE_OP) == kt.GATE_OP
    for call in tf_gradients_calls:
        assert call["aggregation_method"] == options.get("aggregation_method")
        assert call["gate_gradients"] == expected_gate
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


@pytest.mark.parametrize("options", [
    {"aggregation_method": tf.AggregationMethod.EXPERIMENTAL_TREE},
    {"gate_gradients": kt.GATE_NONE},
    {"gate_gradients": kt.GATE_GRAPH},
], ids=["aggregation", "gate_none", "gate_graph"])
def test_tf1_gradient_options_warn_once_when_eager_and_use_the_tape(options, tf_gradients_calls):
    x, y = regression_data()
    ours, theirs = pair("eager", **options)
    with pytest.warns(UserWarning, match="cannot act") as record:
        fit(ours, x, y, epochs=2)
    assert len([w for w in record if "cannot act" in str(w.message)]) == 1
    fit(theirs, x, y, epochs=2)
    assert tf_gradients_calls == []
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_colocate_gradients_with_ops_reaches_tf1_gradients(mode, tf_gradients_calls):
    x, y = regression_data()
    ours, theirs = pair(mode, colocate_gradients_with_ops=True)
    fit(ours, x, y)
    fit(theirs, x, y)
    assert tf_gradients_calls and all(c["colocate_gradients_with_ops"] for c in tf_gradients_calls)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


def test_colocate_gradients_with_ops_warns_once_when_eager(tf_gradients_calls):
    x, y = regression_data()
    ours, theirs = pair("eager", colocate_gradients_with_ops=True)
    with pytest.warns(UserWarning, match="cannot act") as record:
        fit(ours, x, y, epochs=2)
    assert len([w for w in record if "cannot act" in str(w.message)]) == 1
    fit(theirs, x, y, epochs=2)
    assert tf_gradients_calls == []
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


# -- check_numerics -------------------------------------------------------------------


def poisoned_targets(y, batch_index, value):
    y = y.copy()
    y[batch_index * BATCH + 3] = value
    return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_non_finite_loss_raises_and_changes_nothing(mode, value, steps_per_execution):
    x, y = regression_data()
    bad_y = poisoned_targets(y, batch_index=2, value=value)  # the 3rd step fails
    model, reference = mlp(kt.Model), mlp(kt.Model)
    for m in (model, reference):
        m.compile(keras.optimizers.Adam(0.01), "mse", steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    with pytest.raises(kt.NonFiniteError, match=r"inf or nan at step 3") as info:
        fit(model, x, bad_y)
    assert info.value.step == 3
    assert isinstance(info.value, tf.errors.InvalidArgumentError)
    # Oracle: the same model trained on the two good batches only.
    fit(reference, x[: 2 * BATCH], y[: 2 * BATCH])
    assert int(model.optimizer.iterations) == 2
    assert max_abs_diff(model.get_weights(), reference.get_weights()) == 0
    assert max_abs_diff(optimizer_state(model), optimizer_state(reference)) == 0
    # The record is cleared: training goes on once the data is fixed.
    fit(model, x, y)
    assert int(model.optimizer.iterations) == 2 + len(x) // BATCH


@pytest.mark.parametrize("mode", MODES)
def test_blocked_step_puts_back_batchnorm_statistics(mode):
    x, y = regression_data()
    bad_x = x.copy()
    bad_x[BATCH + 1] = np.nan  # 2nd step
    model, reference = mlp(kt.Model, batchnorm=True), mlp(kt.Model, batchnorm=True)
    for m in (model, reference):
        m.compile("adam", "mse", **mode_kwargs(mode))
    with pytest.raises(kt.NonFiniteError, match="step 2"):
        fit(model, bad_x, y)
    fit(reference, x[:BATCH], y[:BATCH])
    bn, bn_ref = model.get_layer("bn"), reference.get_layer("bn")
    assert np.all(np.isfinite(bn.moving_mean.numpy()))
    assert max_abs_diff(bn.non_trainable_weights, bn_ref.non_trainable_weights) == 0


@pytest.mark.parametrize("mode", MODES)
def test_check_numerics_false_lets_nan_reach_the_weights(mode):
    x, y = regression_data()
    model = mlp(kt.Model)
    model.compile("sgd", "mse", check_numerics=False, **mode_kwargs(mode))
    fit(model, x, poisoned_targets(y, 0, np.nan))
    assert np.isnan(model.get_layer("out").kernel.numpy()).all()


# -- update_ops -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_update_ops_run_every_step_before_the_update(mode):
    x, y = regression_data()
    model = mlp(kt.Model)
    calls = keras.Variable(0, dtype="int64", trainable=False)
    seen_iterations = keras.Variable(-1, dtype="int64", trainable=False)
    opt = keras.optimizers.SGD(0.01)

    def count():
        return calls.assign_add(1)

    def record_iterations():
        # Runs before the apply of the same step: iterations is still k - 1.
        return seen_iterations.assign(opt.iterations)

    model.compile(opt, "mse", update_ops=[count, record_iterations], **mode_kwargs(mode))
    fit(model, x, y)
    steps = len(x) // BATCH
    assert int(calls.numpy()) == steps
    assert int(seen_iterations.numpy()) == steps - 1


@pytest.mark.parametrize("update_ops", [None, []])
def test_no_update_ops_trains_like_plain_keras(update_ops):
    x, y = regression_data()
    ours, theirs = pair("graph", update_ops=update_ops)
    fit(ours, x, y)
    fit(theirs, x, y)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


# -- variables_to_train ------------------------------------------------------------


def frozen_oracle(mode, trainable_paths):
    """Plain Keras where only `trainable_paths` are trainable."""
    model = mlp(keras.Model)
    for v in model.trainable_variables:
        if v.path not in trainable_paths:
            v.trainable = False
    model.compile(keras.optimizers.Adam(0.05), "mse", **mode_kwargs(mode))
    return model


SELECTIONS = {
    "variables": lambda m: [m.get_layer("hidden").kernel, m.get_layer("out").bias],
    "callable": lambda m: (lambda: [m.get_layer("hidden").kernel, m.get_layer("out").bias]),
    "regex": lambda m: ["hidden/kernel", r"^out/b"],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", sorted(SELECTIONS))
def test_variables_to_train_leaves_the_rest_untouched(mode, form):
    x, y = regression_data()
    model = mlp(kt.Model)
    initial = {v.path: v.numpy() for v in model.trainable_variables}
    optimizer = keras.optimizers.Adam(0.05)
    optimizer.build(model.trainable_variables)  # slots for every variable, selected or not
    model.compile(optimizer, "mse", variables_to_train=SELECTIONS[form](model), **mode_kwargs(mode))
    fit(model, x, y)
    oracle = frozen_oracle(mode, {"hidden/kernel", "out/bias"})
    fit(oracle, x, y)
    assert max_abs_diff(model.get_weights(), oracle.get_weights()) == 0
    for v in model.trainable_variables:
        changed = not np.array_equal(v.numpy(), initial[v.path])
        assert changed == (v.path in {"hidden/kernel", "out/bias"}), v.path
    # The slots of the unselected variables exist and never moved; the others did.
    slots = {s.path: s.numpy() for s in model.optimizer.variables if s.path.endswith(("_momentum", "_velocity"))}
    unselected = [p for p in slots if "hidden_bias" in p or "out_kernel" in p]
    assert len(unselected) == 4 and len(slots) == 8, sorted(slots)
    for path, value in slots.items():
        assert np.any(value) == (path not in unselected), path


def test_variables_to_train_errors_name_the_culprits():
    model = mlp(kt.Model, batchnorm=True)
    moving_mean = model.get_layer("bn").moving_mean
    foreign = tf.Variable(1.0, name="foreign")
    with pytest.raises(ValueError, match=r"bn/moving_mean.*trainable=False"):
        model.compile("sgd", "mse", variables_to_train=[moving_mean])
    with pytest.raises(ValueError, match="foreign"):
        model.compile("sgd", "mse", variables_to_train=[model.get_layer("out").kernel, foreign])
    with pytest.raises(ValueError, match=r"No match for: \['nothing/here'\]"):
        model.compile("sgd", "mse", variables_to_train=["nothing/here"])
    with pytest.raises(ValueError, match="non-empty"):
        model.compile("sgd", "mse", variables_to_train=[])


# -- global_step -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make_counter",
    [lambda: tf.Variable(0, dtype=tf.int64, trainable=False), lambda: keras.Variable(0, dtype="int32", trainable=False)],
    ids=["tf.Variable", "keras.Variable"],
)
def test_global_step_counts_applied_updates(mode, make_counter):
    x, y = regression_data()
    counter = make_counter()
    model = mlp(kt.Model)
    model.compile("sgd", "mse", global_step=counter, **mode_kwargs(mode))
    fit(model, x, y)
    assert int(counter.numpy()) == len(x) // BATCH
    with pytest.raises(kt.NonFiniteError):
        fit(model, x, poisoned_targets(y, 1, np.nan))
    assert int(counter.numpy()) == len(x) // BATCH + 1  # the blocked step is not counted


@pytest.mark.parametrize("global_step", [kt.USE_GLOBAL_STEP, None])
def test_default_and_none_global_step_add_no_counter(global_step):
    x, y = regression_data()
    ours, theirs = pair("graph", global_step=global_step)
    fit(ours, x, y)
    fit(theirs, x, y)
    assert int(ours.optimizer.iterations) == len(x) // BATCH
    assert len(ours.variables) == len(theirs.variables)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0


# -- summarize_gradients -------------------------------------------------------------


def read_events(logdir):
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_summarize_gradients_writes_to_the_default_writer(mode, steps_per_execution, tmp_path):
    # The same tags and steps in every mode: the step records, the host writes
    # after each call (under XLA tf.summary cannot run inside the step).
    x, y = regression_data()
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.01), "mse", summarize_gradients=True,
                  steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        fit(model, x, y)
    writer.close()
    acc = read_events(str(tmp_path))
    paths = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    tags = acc.Tags()
    assert set(tags["tensors"]) == {f"{p}/gradient" for p in paths} | {f"{p}/gradient_norm" for p in paths}
    steps = len(x) // BATCH
    for p in paths:
        assert [e.step for e in acc.Tensors(f"{p}/gradient_norm")] == list(range(1, steps + 1))
        assert [e.step for e in acc.Tensors(f"{p}/gradient")] == list(range(1, steps + 1))
    # The first norm equals the norm of a GradientTape gradient at the initial weights.
    fresh = mlp(keras.Model)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[:BATCH], fresh(x[:BATCH]))
    kernel_grad = tape.gradient(loss, fresh.get_layer("out").kernel)
    first = tf.make_ndarray(acc.Tensors("out/kernel/gradient_norm")[0].tensor_proto)
    np.testing.assert_allclose(first, np.linalg.norm(kernel_grad.numpy()), rtol=1e-5)
    # ... and its histogram counts every element of that gradient.
    histogram = tf.make_ndarray(acc.Tensors("out/kernel/gradient")[0].tensor_proto)
    assert histogram[:, 2].sum() == kernel_grad.numpy().size
    assert histogram[0, 0] <= kernel_grad.numpy().min() and kernel_grad.numpy().max() <= histogram[-1, 1]
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("mode", MODES)
def test_summarize_gradients_follows_the_writer_of_each_fit(mode, tmp_path):
    # Each fit writes to the default writer of that fit: a fit under none
    # records nothing, a later one under a writer does.
    x, y = regression_data()
    model = mlp(kt.Model)
    model.compile(keras.optimizers.SGD(0.01), "mse", summarize_gradients=True, **mode_kwargs(mode))
    steps = len(x) // BATCH
    fit(model, x, y)  # no writer
    for name in ("first", "second"):
        writer = tf.summary.create_file_writer(str(tmp_path / name))
        with writer.as_default():
            fit(model, x, y)
        writer.close()  # a stale writer would now be closed
    first, second = read_events(str(tmp_path / "first")), read_events(str(tmp_path / "second"))
    assert [e.step for e in first.Tensors("out/kernel/gradient_norm")] == list(range(steps + 1, 2 * steps + 1))
    assert [e.step for e in second.Tensors("out/kernel/gradient_norm")] == list(range(2 * steps + 1, 3 * steps + 1))


def test_summarize_gradients_without_a_writer_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = regression_data()
    ours, theirs = pair("graph", summarize_gradients=True)
    fit(ours, x, y)
    fit(theirs, x, y)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0
    assert glob.glob(str(tmp_path / "**" / "events.*"), recursive=True) == []


def summaries_in(mode, tmp_path, **options):
    x, y = regression_data()
    ours, theirs = pair(mode, summarize_gradients=True, **options)
    writer = tf.summary.create_file_writer(str(tmp_path / mode))
    with writer.as_default():
        fit(ours, x, y, epochs=2)
    writer.close()
    fit(theirs, x, y, epochs=2)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0  # and it trains as plain Keras
    acc = read_events(str(tmp_path / mode))
    return {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_summarize_gradients_writes_the_same_records_in_every_mode(tmp_path):
    # Before, under XLA it wrote nothing (one warning). Oracle: graph mode.
    records = {mode: summaries_in(mode, tmp_path) for mode in MODES}
    for mode in ("eager", "jit"):
        assert records[mode].keys() == records["graph"].keys()
        for tag, graph_records in records["graph"].items():
            assert [s for s, _ in records[mode][tag]] == [s for s, _ in graph_records]
            for (_, ours), (_, reference) in zip(records[mode][tag], graph_records):
                if tag.endswith("/gradient_norm"):
                    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
                    continue
                # A histogram: the same edges and counts, up to an element on an
                # edge that float rounding puts in the next bucket.
                np.testing.assert_allclose(ours[:, :2], reference[:, :2], rtol=1e-4, atol=1e-6)
                assert ours[:, 2].sum() == reference[:, 2].sum()
                assert np.abs(np.cumsum(ours[:, 2]) - np.cumsum(reference[:, 2])).max() <= 1


@pytest.mark.parametrize("mode", MODES)
def test_summarize_gradients_writes_at_the_global_step(mode, tmp_path):
    counter = tf.Variable(100, dtype=tf.int64)
    records = summaries_in(mode, tmp_path, global_step=counter)
    steps = 2 * len(regression_data()[0]) // BATCH
    assert [s for s, _ in records["out/kernel/gradient_norm"]] == list(range(101, 101 + steps))


# -- a custom train_step keeps every option through minimize() -----------------------------


class CustomStep(kt.Model):
    def train_step(self, data):
        x, y = data

        def loss_fn():
            y_pred = self(x, training=True)
            return self.compute_loss(x, y, y_pred), y_pred

        y_pred = self.minimize(loss_fn)
        for metric in self.metrics:
            if metric.name != "loss":
                metric.update_state(y, y_pred)
        return {"mae": self.metrics[-1].result()}


@pytest.mark.parametrize("mode", MODES)
def test_custom_train_step_calls_the_pipeline(mode):
    x, y = regression_data()
    model = mlp(CustomStep)
    model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"], transform_grads_fn=Recorder(0.5), **mode_kwargs(mode))
    theirs = mlp(keras.Model)
    theirs.compile(keras.optimizers.SGD(0.05), "mse", **mode_kwargs(mode))
    history = fit(model, x, y)
    fit(theirs, x, y)
    assert "mae" in history.history
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in model.get_weights()]),
        np.concatenate([w.ravel() for w in theirs.get_weights()]),
        rtol=1e-5,
        atol=1e-7,
    )
    # Steps are counted across fits: 4 done, the 2nd of this fit is step 6.
    with pytest.raises(kt.NonFiniteError, match="step 6"):
        fit(model, x, poisoned_targets(y, 1, np.nan))


# -- mixed precision: loss scaling -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_mixed_precision_scales_the_loss_like_plain_keras(mode, mixed_float16):
    x, y = regression_data()
    ours, theirs = pair(mode, opt=lambda: keras.optimizers.SGD(0.05))
    assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
    fit(ours, x, y, epochs=2)
    fit(theirs, x, y, epochs=2)
    assert max_abs_diff(ours.get_weights(), theirs.get_weights()) == 0
    assert float(ours.optimizer.dynamic_scale) == float(theirs.optimizer.dynamic_scale)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_precision_transforms_see_unscaled_gradients(mode, mixed_float16):
    x, y = regression_data()
    largest_norm = tf.Variable(0.0, trainable=False)

    def record_norm(grads_and_vars):
        norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g, _ in grads_and_vars])
        # Overflowing steps (skipped by the optimizer) have an infinite norm.
        largest_norm.assign(tf.where(tf.math.is_finite(norm), tf.maximum(largest_norm, norm), largest_norm))
        return grads_and_vars

    ours, theirs = pair(
        mode,
        opt=lambda: keras.optimizers.SGD(0.05),
        # Keras's LossScaleOptimizer unscales before its inner optimizer clips.
        plain_kwargs={"optimizer": keras.optimizers.SGD(0.05, clipnorm=0.5)},
        grad_transforms=[record_norm, kt.clip_gradient_norms_fn(0.5)],
    )
    fit(ours, x, y)
    fit(theirs, x, y)
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in ours.get_weights()]),
        np.concatenate([w.ravel() for w in theirs.get_weights()]),
        rtol=1e-3,
        atol=1e-3,
    )
    # Unscaled: gradient norms of order 1, not thousands of times that.
    assert 0.1 < float(largest_norm.numpy()) < 100
    # The first steps overflowed at the initial scale: the skip path ran, as in plain Keras.
    assert float(ours.optimizer.dynamic_scale) == float(theirs.optimizer.dynamic_scale) < 32768
