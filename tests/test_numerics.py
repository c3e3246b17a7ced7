"""check_numerics policies: raise on the loss, raise naming gradients, skip; in every mode."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, layer_weights, max_abs_diff, mode_kwargs, optimizer_state, regression_data

import keras_trainop as kt

BATCH = 16
SENTINEL = 7.0  # a finite input value that makes PoisonableScale's gradient nan


class PoisonableScale(keras.layers.Layer):
    """y = x * kernel, with a nan kernel gradient for any batch holding SENTINEL.

    The loss stays finite: only this layer's gradient is not.
    """

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="kernel")

    def call(self, x):
        bad = tf.reduce_any(tf.equal(x, SENTINEL))

        @tf.custom_gradient
        def scale(x, k):
            def grad(dy):
                dk = tf.reduce_sum(dy * x, axis=0)
                return dy * k, tf.where(bad, tf.fill(tf.shape(dk), tf.constant(np.nan, dk.dtype)), dk)

            return x * k, grad

        return scale(x, tf.convert_to_tensor(self.kernel))  # a read: the gradient reaches the kernel


def model(cls=kt.Model):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = PoisonableScale(name="poisonable")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    return cls(inputs, keras.layers.Dense(1, name="out")(h))


def compiled(mode, check_numerics, steps_per_execution=1, loss="mse"):
    m = model()
    m.compile(
        keras.optimizers.Adam(0.01),
        loss,
        check_numerics=check_numerics,
        steps_per_execution=steps_per_execution,
        **mode_kwargs(mode),
    )
    return m


def fit(m, x, y, **kwargs):
    return m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, **kwargs)


def batches(x, y, keep):
    rows = np.concatenate([np.arange(b * BATCH, (b + 1) * BATCH) for b in keep])
    return x[rows], y[rows]


def poison(x, y, batch, how):
    """A copy of the data where batch `batch` carries `how`: 'nan_y', 'inf_y', 'gradient'."""
    x, y = x.copy(), y.copy()
    row = batch * BATCH + 2
    if how == "nan_y":
        y[row] = np.nan
    elif how == "inf_y":
        y[row] = np.inf
    else:
        x[row, 0] = SENTINEL
    return x, y


INJECTIONS = ["nan_y", "inf_y", "gradient"]
# A non-finite loss usually brings non-finite gradients with it: both are named.
WHAT = {"nan_y": "loss and gradients", "inf_y": "loss and gradients", "gradient": "gradients"}


# -- raise policies -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", INJECTIONS)
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_all_names_what_was_not_finite_and_changes_nothing(mode, how, steps_per_execution):
    x, y = regression_data(n=96)
    bad_x, bad_y = poison(x, y, batch=3, how=how)  # the 4th step fails
    m = compiled(mode, "all", steps_per_execution)
    with pytest.raises(kt.NonFiniteError, match="inf or nan at step 4") as info:
        fit(m, bad_x, bad_y)
    error = info.value
    assert (error.step, error.what) == (4, WHAT[how])
    if how == "gradient":
        assert error.variables == ["poisonable/kernel"]
        assert "gradients of 'poisonable/kernel' are inf or nan" in str(error)
    else:
        assert "the loss and the gradients of" in str(error)
    reference = compiled(mode, "all", steps_per_execution)
    fit(reference, *batches(x, y, [0, 1, 2]))
    assert int(m.optimizer.iterations) == 3
    assert max_abs_diff(m.get_weights(), reference.get_weights()) == 0
    assert max_abs_diff(optimizer_state(m), optimizer_state(reference)) == 0


@pytest.mark.parametrize("mode", MODES)
def test_loss_policy_does_not_see_a_non_finite_gradient(mode):
    # TF1's meaning of check_numerics=True: the loss only. The poisoned gradient
    # goes through (and ruins the kernel), which is why "all" exists.
    x, y = regression_data()
    m = compiled(mode, True)
    # Step 2's nan gradient is applied; step 3's loss is then nan and raises.
    with pytest.raises(kt.NonFiniteError, match="the loss is inf or nan at step 3"):
        fit(m, *poison(x, y, batch=1, how="gradient"))
    assert np.isnan(m.get_layer("poisonable").kernel.numpy()).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", [-1001.0, -1000.5], ids=["nan", "inf"])
def test_non_finite_loss_from_the_loss_function(mode, target):
    x, y = regression_data()

    def log_loss(y_true, y_pred):
        # For the batch holding the target: log(-0.5) = nan, or log(0) = -inf.
        return tf.reduce_mean(tf.math.log(y_true + 1000.5) + tf.square(y_true - y_pred))

    y = y.copy()
    y[BATCH + 4] = target  # the 2nd step
    m = compiled(mode, "all", loss=log_loss)
    reference = compiled(mode, "all", loss=log_loss)
    # The nan term does not depend on the prediction: the gradients stay finite.
    with pytest.raises(kt.NonFiniteError, match="the loss is inf or nan at step 2"):
        fit(m, x, y)
    fit(reference, x[:BATCH], y[:BATCH])
    assert int(m.optimizer.iterations) == 1
    assert max_abs_diff(m.get_weights(), reference.get_weights()) == 0


def decaying(mode, check_numerics, counter, global_step):
    """A model whose update changes state that reads no gradient.

    AdamW's weight decay (`w -= lr * wd * w`), a kernel constraint, the
    optimizer's `iterations += 1`, an update op and a global step: none of
    them depends on the gradients, and all must wait for the check.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh", kernel_constraint=keras.constraints.MaxNorm(1.5))(inputs)
    m = kt.Model(inputs, keras.layers.Dense(1)(h))
    m.compile(
        keras.optimizers.AdamW(0.01, weight_decay=0.5),
        "mse",
        check_numerics=check_numerics,
        update_ops=[lambda: counter.assign_add(1)],
        global_step=global_step,
        **mode_kwargs(mode),
    )
    return m


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", [True, "all"])
def test_a_failing_step_changes_no_state_that_reads_no_gradient(mode, policy):
    x, y = regression_data(n=64)
    counter, step = keras.Variable(0, dtype="int64"), keras.Variable(0, dtype="int64")
    m = decaying(mode, policy, counter, step)
    with pytest.raises(kt.NonFiniteError, match="inf or nan at step 3"):
        fit(m, *poison(x, y, batch=2, how="nan_y"))
    ref_counter, ref_step = keras.Variable(0, dtype="int64"), keras.Variable(0, dtype="int64")
    reference = decaying(mode, policy, ref_counter, ref_step)
    fit(reference, *batches(x, y, [0, 1]))
    assert int(m.optimizer.iterations) == 2
    assert (int(counter.numpy()), int(step.numpy())) == (2, 2) == (int(ref_counter.numpy()), int(ref_step.numpy()))
    assert max_abs_diff(m.get_weights(), reference.get_weights()) == 0
    assert max_abs_diff(optimizer_state(m), optimizer_state(reference)) == 0


def test_only_state_changes_wait_for_the_check():
    # The update's constants, reads and arithmetic run while the step still
    # computes; only ops that change state get the check as a control input.
    m = decaying("graph", "all", keras.Variable(0, dtype="int64"), None)
    x, y = regression_data(n=16)
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)  # builds the optimizer
    graph = tf.function(m.train_step).get_concrete_function((tf.constant(x), tf.constant(y))).graph
    asserts = [op for op in graph.get_operations() if op.type == "Assert"]
    assert len(asserts) == 1
    waiting = [op for op in graph.get_operations() if asserts[0] in op.control_inputs]
    types = {op.type for op in waiting}
    assert waiting and types <= {"AssignAddVariableOp", "AssignSubVariableOp", "AssignVariableOp", "NoOp"}, types
    # At most one per variable the update writes (weights, slots, iterations, ...).
    assert len(waiting) <= len(m.trainable_variables) + len(m.optimizer.variables) + 2


# -- skip policy ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_skip_policy_skips_bad_steps_and_counts_them(mode, steps_per_execution):
    x, y = regression_data(n=96)  # 6 steps
    bad_x, bad_y = poison(x, y, batch=1, how="nan_y")
    bad_x, bad_y = poison(bad_x, bad_y, batch=4, how="gradient")
    m = compiled(mode, "skip", steps_per_execution)
    history = fit(m, bad_x, bad_y, validation_data=(x[:BATCH], y[:BATCH]))
    assert history.history["skipped_steps"] == [2.0]
    assert "val_skipped_steps" not in history.history
    # Oracle: the same model trained on the good batches only.
    reference = compiled(mode, "skip", steps_per_execution)
    reference_history = fit(reference, *batches(x, y, [0, 2, 3, 5]))
    # Skipped batches stay out of the loss: it is the loss of the good ones.
    np.testing.assert_allclose(history.history["loss"], reference_history.history["loss"], rtol=1e-6)
    assert int(m.optimizer.iterations) == 4
    assert max_abs_diff(layer_weights(m), layer_weights(reference)) == 0
    assert max_abs_diff(optimizer_state(m), optimizer_state(reference)) == 0
    # The count is per epoch, like every Keras metric.
    assert fit(m, x, y).history["skipped_steps"] == [0.0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_skip_policy_raises_after_too_many_consecutive_skips(mode, steps_per_execution):
    x, y = regression_data(n=96)
    bad_x, bad_y = poison(x, y, batch=1, how="nan_y")
    bad_x, bad_y = poison(bad_x, bad_y, batch=3, how="nan_y")  # not consecutive: fine
    m = compiled(mode, kt.SkipNonFinite(max_consecutive=1), steps_per_execution)
    assert fit(m, bad_x, bad_y).history["skipped_steps"] == [2.0]
    bad_x, bad_y = poison(x, y, batch=2, how="inf_y")
    bad_x, bad_y = poison(bad_x, bad_y, batch=3, how="gradient")  # two in a row: 6+3, 6+4
    with pytest.raises(kt.NonFiniteError, match="2 consecutive steps") as info:
        fit(m, bad_x, bad_y)
    # 4 updates in the first fit, 2 in this one, then two skipped attempts at
    # update 7: skipped steps do not advance `iterations`.
    assert info.value.step == 7
    assert int(m.optimizer.iterations) == 6


# -- functional API ---------------------------------------------------------------------

FUNCTIONAL_MODES = {
    "eager": lambda f: f,
    "graph": tf.function,
    "jit": lambda f: tf.function(f, jit_compile=True),
}


def linear_step(check_numerics):
    w = keras.Variable(np.ones(2, "float32"), name="w")
    b = keras.Variable(np.zeros(1, "float32"), name="b")
    opt = keras.optimizers.SGD(0.1)

    def loss(x, y):
        return tf.reduce_mean(tf.square(tf.reduce_sum(w * x, axis=-1) + b - y))

    step = kt.create_train_step(
        loss, opt, check_numerics=check_numerics, variables_to_train=lambda: [w, b]
    )
    return step, w, b, opt


def test_functional_all_names_the_gradient_eagerly():
    step, w, b, opt = linear_step("all")
    x = tf.constant([[1.0, np.inf]])  # the loss is inf, and w's gradient with it
    with pytest.raises(kt.NonFiniteError, match="inf or nan at step 1") as info:
        step(x, tf.constant([0.0]))
    assert info.value.what == "loss and gradients" and "w" in info.value.variables
    np.testing.assert_array_equal(w.numpy(), [1.0, 1.0])
    assert int(opt.iterations) == 0


@pytest.mark.parametrize("mode", MODES)
def test_functional_skip_counts_and_goes_on(mode):
    step, w, b, opt = linear_step("skip")
    run = FUNCTIONAL_MODES[mode](step)
    good_x, y = tf.constant([[1.0, 2.0]]), tf.constant([1.0])
    run(good_x, y)
    run(tf.constant([[np.nan, 2.0]]), y)
    run(good_x, y)
    assert int(step.skipped_steps.numpy()) == 1
    assert int(opt.iterations) == 2
    # Oracle: two SGD steps on the good batch, by hand.
    w_ref, b_ref = np.ones(2), np.zeros(1)
    for _ in range(2):
        err = (w_ref @ [1.0, 2.0] + b_ref - 1.0)[0]
        w_ref, b_ref = w_ref - 0.1 * 2 * err * np.array([1.0, 2.0]), b_ref - 0.1 * 2 * err
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-6)


def poisonable_linear_step():
    """A functional step whose loss stays finite while `k`'s gradient is nan for a SENTINEL input."""
    k = keras.Variable(np.ones(2, "float32"), name="k")
    b = keras.Variable(np.zeros(1, "float32"), name="b")
    opt = keras.optimizers.Adam(0.1)
    layer = PoisonableScale()
    layer.kernel = k

    def loss(x, y):
        return tf.reduce_mean(tf.square(tf.reduce_sum(layer.call(x), axis=-1) + b - y))

    return kt.create_train_step(loss, opt, check_numerics="all", variables_to_train=lambda: [k, b]), k, b, opt


# Eagerly the step raises NonFiniteError; in a tf.function the graph's assertion
# raises InvalidArgumentError (its base class); under XLA nothing can raise and
# the step is blocked. In every mode raise_if_failed() then says what failed.
RAISED = {"eager": kt.NonFiniteError, "graph": tf.errors.InvalidArgumentError, "jit": None}


@pytest.mark.parametrize("mode", MODES)
def test_functional_all_names_a_single_layer_gradient(mode):
    step, k, b, opt = poisonable_linear_step()
    run = FUNCTIONAL_MODES[mode](step)
    good_x, y = tf.constant([[1.0, 2.0]]), tf.constant([1.0])
    run(good_x, y)
    before = [v.numpy() for v in [k, b, *opt.variables]]
    bad_x = tf.constant([[SENTINEL, 2.0]])
    expected = RAISED[mode]
    try:
        run(bad_x, y)
        raised = None
    except tf.errors.InvalidArgumentError as e:
        raised = e
    assert type(raised) is expected or (raised is None and expected is None)
    failure = raised if isinstance(raised, kt.NonFiniteError) else None
    if failure is None:
        with pytest.raises(kt.NonFiniteError) as info:
            step.raise_if_failed()
        failure = info.value
    assert (failure.step, failure.what, failure.variables) == (2, "gradients", ["k"])
    assert "gradients of 'k' are inf or nan" in str(failure)
    # Oracle: the state after the good step, unchanged (Adam's slots and iterations included).
    assert max_abs_diff([v.numpy() for v in [k, b, *opt.variables]], before) == 0
    assert int(opt.iterations) == 1


@pytest.mark.parametrize("mode", MODES)
def test_two_steps_sharing_an_optimizer_keep_their_own_failure_records(mode):
    # Each step owns its record. Before, the record was the optimizer's: the
    # second step's names overwrote the first's, and under XLA the first's
    # failure blocked the second. Oracle: each step's own variable.
    a, b = keras.Variable(np.ones(2, "float32"), name="a"), keras.Variable(np.ones(2, "float32"), name="b")
    opt = keras.optimizers.SGD(0.1)
    opt.build([a, b])
    steps = {
        v.name: kt.create_train_step(lambda x, v=v: tf.reduce_sum(v * x), opt, check_numerics="all",
                                     variables_to_train=lambda v=v: [v])
        for v in (a, b)
    }
    runs = {name: FUNCTIONAL_MODES[mode](step) for name, step in steps.items()}
    bad, good = tf.constant([np.nan, 1.0]), tf.constant([1.0, 1.0])
    raised = {}
    for name in ("a", "b"):  # both fail before either is reported
        try:
            runs[name](bad)
        except tf.errors.InvalidArgumentError as e:  # eager and graph: the step raises
            raised[name] = e if isinstance(e, kt.NonFiniteError) else None
    for name in ("a", "b"):
        failure = raised.get(name)
        if failure is None:  # in a graph or under XLA: the record says what failed
            with pytest.raises(kt.NonFiniteError) as info:
                kt.raise_if_failed(steps[name])
            failure = info.value
        assert failure.variables == [name]
    runs["a"](good)
    runs["b"](good)  # each record was cleared on its own: both apply
    assert int(opt.iterations) == 2
    np.testing.assert_allclose(a.numpy(), [0.9, 0.9])
    np.testing.assert_allclose(b.numpy(), [0.9, 0.9])


# -- huge but finite gradients ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["all", "skip"])
@pytest.mark.parametrize("size", [4, 70_000], ids=["grouped", "in_place"])
def test_huge_finite_gradients_are_applied(mode, policy, size):
    # Every gradient element is 3e38: finite, but their sum overflows float32.
    # The check's quick sums call that non-finite; its exact fallback must not.
    w = keras.Variable(np.zeros(size, "float32"), name="w")
    huge = tf.constant(np.full(size, 3e38, "float32"))
    opt = keras.optimizers.SGD(1e-30)
    step = kt.create_train_step(
        lambda: tf.reduce_sum(w * huge), opt, check_numerics=policy, variables_to_train=lambda: [w]
    )
    FUNCTIONAL_MODES[mode](step)()
    step.raise_if_failed()  # nothing was recorded as failed
    assert int(opt.iterations) == 1
    assert int(step.skipped_steps.numpy()) == 0
    # Oracle: one SGD step in float32, by hand.
    expected = np.float32(0) - np.float32(1e-30) * np.float32(3e38)
    np.testing.assert_allclose(w.numpy(), np.full(size, expected), rtol=1e-6)


# -- mixed precision: an overflow is the loss-scale optimizer's business ------------------


def clip_by_value(grads_and_vars):
    # Maps inf to +-0.1: would hide an overflow if it saw scaled gradients.
    return [(None if g is None else tf.clip_by_value(g, -0.1, 0.1), v) for g, v in grads_and_vars]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["all", "skip"])
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_loss_scale_overflow_is_skipped_not_reported(mode, policy, steps_per_execution, mixed_float16):
    x, y = regression_data()
    x = x * 30.0  # the first steps overflow float16 at the initial scale
    ours = compiled(mode, policy)
    keras.utils.set_random_seed(0)
    theirs = model(keras.Model)
    per_call = dict(steps_per_execution=steps_per_execution, **mode_kwargs(mode))
    ours.compile(keras.optimizers.SGD(0.01), "mse", check_numerics=policy, transform_grads_fn=clip_by_value, **per_call)
    theirs.compile(keras.optimizers.SGD(0.01, clipvalue=0.1), "mse", **per_call)
    history = fit(ours, x, y)
    fit(theirs, x, y)
    # No error, the same skips and scale as plain Keras (which unscales, then clips).
    scale = float(theirs.optimizer.dynamic_scale)
    assert scale < 32768
    assert float(ours.optimizer.dynamic_scale) == scale
    assert int(ours.optimizer.iterations) == int(theirs.optimizer.iterations)
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in layer_weights(ours)]),
        np.concatenate([w.ravel() for w in layer_weights(theirs)]),
        rtol=1e-3,
        atol=1e-3,
    )
    assert history.history.get("skipped_steps", [0.0]) == [0.0]  # not counted as ours
