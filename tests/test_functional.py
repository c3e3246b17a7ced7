"""Tests of the functional API: `create_train_step`, `create_train_op` and TF1's helpers.

Every expected value comes from an independent oracle: NumPy on a linear model
with a closed-form gradient, or a hand-computed number.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import keras_trainop as kt
from keras_trainop import gradients as gradients_lib

MODES = ["eager", "graph", "jit"]
GRAPH_MODES = ["graph", "jit"]

X = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-1.0, 0.0]], "float32")
Y = np.array([[1.0], [2.0], [0.0], [-1.0]], "float32")
W0 = np.array([[0.1], [-0.2]], "float32")
B0 = np.array([0.05], "float32")
LR = 0.1
TOL = dict(rtol=1e-5, atol=1e-6)


def in_mode(fn, mode):
    """`fn` itself (eager), or a caller of it wrapped in a tf.function (graph / jit)."""
    if mode == "eager":
        return fn
    return tf.function(lambda *a, **k: fn(*a, **k), jit_compile=mode == "jit")


def npv(v):
    return keras.ops.convert_to_numpy(v)


def unchanged(pairs, original):
    """Whether the list `pairs` still holds exactly the pair objects of `original`."""
    return len(pairs) == len(original) and all(p is q for p, q in zip(pairs, original))


def mse(x, y, w, b):
    return tf.reduce_mean(tf.square(tf.matmul(x, w) + b - y))


def np_loss_grads(x, y, w, b):
    r = x.astype("float64") @ w + b - y
    return float(np.mean(r**2)), 2.0 / len(x) * x.T @ r, 2.0 / len(x) * r.sum(0)


def sgd_oracle(batches, w=W0, b=B0, lr=LR, scale=1.0):
    """Pre-update losses and final (w, b) of SGD on `scale * mse`."""
    w, b = w.astype("float64"), b.astype("float64")
    losses = []
    for x, y in batches:
        loss, gw, gb = np_loss_grads(x, y, w, b)
        losses.append(scale * loss)
        w, b = w - lr * scale * gw, b - lr * scale * gb
    return losses, w, b


BATCHES = [(X[:2], Y[:2]), (X[2:], Y[2:]), (X, Y)]


# -- create_train_step: the step ---------------------------------------------


@pytest.mark.parametrize("variable", [keras.Variable, tf.Variable], ids=["keras", "tf"])
@pytest.mark.parametrize("mode", MODES)
def test_step_sgd_matches_numpy_and_forwards_args(mode, variable):
    w, b = variable(W0, name="w"), variable(B0, name="b")
    opt = keras.optimizers.SGD(LR)
    step = in_mode(kt.create_train_step(lambda x, y: mse(x, y, w, b), opt), mode)
    got = [float(step(x, y)) for x, y in BATCHES]
    losses, w_ref, b_ref = sgd_oracle(BATCHES)
    np.testing.assert_allclose(got, losses, **TOL)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)
    np.testing.assert_allclose(npv(b), b_ref, **TOL)
    assert int(opt.iterations) == len(BATCHES)


def test_step_forwards_keyword_args():
    w, b = keras.Variable(W0), keras.Variable(B0)
    step = kt.create_train_step(lambda x, y: mse(x, y, w, b), keras.optimizers.SGD(LR))
    got = float(step(X, y=Y))
    losses, w_ref, _ = sgd_oracle([(X, Y)])
    assert got == pytest.approx(losses[0], rel=1e-5)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)


NESTED = {  # pack(mse, l2), total_loss_fn, weight of l2 in the minimised total
    "dict_with_total_fn": (
        lambda m, l2: {"mse": m, "l2": l2},
        lambda d: d["mse"] + 0.5 * d["l2"],
        0.5,
    ),
    "tuple_summed": (lambda m, l2: (m, l2), None, 1.0),
}


@pytest.mark.parametrize("structure", sorted(NESTED))
@pytest.mark.parametrize("mode", MODES)
def test_nested_loss(mode, structure):
    pack, total_fn, coef = NESTED[structure]
    w, b = keras.Variable(W0), keras.Variable(B0)
    step = kt.create_train_step(
        lambda: pack(mse(X, Y, w, b), tf.reduce_sum(tf.square(w))),
        keras.optimizers.SGD(LR),
        total_loss_fn=total_fn,
    )
    step = in_mode(step, mode)
    w_np, b_np = W0.astype("float64"), B0.astype("float64")
    for _ in range(2):
        out = step()
        m, gw, gb = np_loss_grads(X, Y, w_np, b_np)
        expected = pack(m, float(np.sum(w_np**2)))  # values from before the update
        tf.nest.assert_same_structure(out, expected)
        np.testing.assert_allclose(
            [float(t) for t in tf.nest.flatten(out)], tf.nest.flatten(expected), **TOL
        )
        w_np, b_np = w_np - LR * (gw + coef * 2 * w_np), b_np - LR * gb
    np.testing.assert_allclose(npv(w), w_np, **TOL)
    np.testing.assert_allclose(npv(b), b_np, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_default_selection_trains_only_what_the_loss_reads(mode):
    w = keras.Variable(W0, name="w")
    b = tf.Variable(B0, name="b")
    unread = tf.Variable([7.0], name="unread")
    scale = keras.Variable(2.0, name="scale", trainable=False)
    step = kt.create_train_step(lambda: scale * mse(X, Y, w, b), keras.optimizers.SGD(LR))
    in_mode(step, mode)()
    _, w_ref, b_ref = sgd_oracle([(X, Y)], scale=2.0)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)
    np.testing.assert_allclose(npv(b), b_ref, **TOL)
    assert npv(unread).tolist() == [7.0]
    assert float(npv(scale)) == 2.0


@pytest.mark.parametrize(
    "selection, trained",
    [
        (lambda w, b: [b], "b"),
        (lambda w, b: ["^w$"], "w"),  # regex on a keras.Variable's path
        (lambda w, b: ["^b$"], "b"),  # regex on a tf.Variable's name
        (lambda w, b: lambda: [w], "w"),  # a callable
    ],
    ids=["list", "regex_path", "regex_tf_name", "callable"],
)
def test_explicit_selection(selection, trained):
    w = keras.Variable(W0, name="w")
    b = tf.Variable(B0, name="b")
    step = kt.create_train_step(
        lambda: mse(X, Y, w, b), keras.optimizers.SGD(LR), variables_to_train=selection(w, b)
    )
    step()
    _, w_ref, b_ref = sgd_oracle([(X, Y)])
    np.testing.assert_allclose(npv(w), w_ref if trained == "w" else W0, **TOL)
    np.testing.assert_allclose(npv(b), b_ref if trained == "b" else B0, **TOL)


def _lazy_dense_in_name_scope():
    """A Dense layer built inside the loss under a tf.name_scope: its TF name != its path."""
    layer = keras.layers.Dense(1, kernel_initializer="ones", name="dense")
    other = keras.Variable([1.0], name="other")

    def loss():
        with tf.name_scope("tower"):
            out = layer(X)
        return tf.reduce_mean(tf.square(out - Y)) + tf.reduce_sum(tf.square(other))

    return layer, other, loss


def test_regex_selection_without_keras_variables_matches_the_tf_name():
    # With variables_to_train=None-like discovery, the step only sees the
    # tf.Variables the loss read: patterns match their TF name (documented).
    layer, other, loss = _lazy_dense_in_name_scope()
    step = kt.create_train_step(
        loss, keras.optimizers.SGD(LR), variables_to_train=["^tower/dense/kernel$"]
    )
    step()
    assert layer.kernel.path == "dense/kernel"
    _, gk, _ = np_loss_grads(X, Y, np.ones((2, 1)), np.zeros(1))
    np.testing.assert_allclose(npv(layer.kernel), 1.0 - LR * gk, **TOL)
    assert npv(layer.bias).tolist() == [0.0] and npv(other).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"for a plain tf.Variable: the name.*tower/dense/kernel"):
        kt.create_train_step(loss, keras.optimizers.SGD(LR), variables_to_train=["^nope$"])()


def test_keras_variables_selected_by_a_callable_reach_transforms_by_path():
    layer, other, loss = _lazy_dense_in_name_scope()
    seen = []

    def zero_kernel(gv):
        seen.extend(v for _, v in gv)
        return kt.multiply_gradients(gv, {layer.kernel.path: 0.0})

    step = kt.create_train_step(
        loss,
        keras.optimizers.SGD(LR),
        variables_to_train=lambda: [layer.kernel, layer.bias, other],
        transform_grads_fn=zero_kernel,
    )
    step()
    assert any(v is layer.kernel for v in seen)  # the keras.Variable itself, with its path
    np.testing.assert_allclose(npv(layer.kernel), np.ones((2, 1)))  # gradient zeroed
    np.testing.assert_allclose(npv(other), [1.0 - LR * 2.0], **TOL)


@pytest.mark.parametrize("counter, expected", [("default", 0), ("variable", 3), ("none", 0)])
@pytest.mark.parametrize("mode", MODES)
def test_global_step(mode, counter, expected):
    w, b = keras.Variable(W0), keras.Variable(B0)
    opt = keras.optimizers.SGD(LR)
    var = tf.Variable(0, dtype=tf.int64)
    global_step = {"default": kt.USE_GLOBAL_STEP, "variable": var, "none": None}[counter]
    step = kt.create_train_step(lambda: mse(X, Y, w, b), opt, global_step=global_step)
    step = in_mode(step, mode)
    for _ in range(3):
        step()
    assert int(opt.iterations) == 3
    assert int(var.numpy()) == expected
    _, w_ref, _ = sgd_oracle([(X, Y)] * 3)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_update_ops_run_once_per_step_before_apply(mode):
    w, b = keras.Variable(W0), keras.Variable(B0)
    opt = keras.optimizers.SGD(LR)
    count = tf.Variable(0.0)
    snapshot = tf.Variable(np.zeros_like(W0))

    def update_op():
        # Runs before the apply: the apply of this step must see the new rate,
        # and the snapshot must hold the weights from before this step's update.
        c = count.assign_add(1.0)
        return opt.learning_rate.assign(LR * c), snapshot.assign(tf.convert_to_tensor(w))

    step = in_mode(
        kt.create_train_step(lambda: mse(X, Y, w, b), opt, update_ops=[update_op]), mode
    )
    w_np, b_np = W0.astype("float64"), B0.astype("float64")
    for i in range(1, 3):
        w_before = w_np
        step()
        _, gw, gb = np_loss_grads(X, Y, w_np, b_np)
        w_np, b_np = w_np - LR * i * gw, b_np - LR * i * gb
    assert float(count.numpy()) == 2.0
    np.testing.assert_allclose(snapshot.numpy(), w_before, **TOL)
    np.testing.assert_allclose(npv(w), w_np, **TOL)
    np.testing.assert_allclose(npv(b), b_np, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_transform_grads_fn_gets_a_list_and_its_result_is_applied(mode):
    w, b = keras.Variable(W0), keras.Variable(B0)
    received = []

    def transform(gv):
        received.append((type(gv), [type(p) for p in gv]))
        return [(g * 3.0 if g.shape == (1,) else g, v) for g, v in gv]

    step = kt.create_train_step(
        lambda: mse(X, Y, w, b), keras.optimizers.SGD(LR), transform_grads_fn=transform
    )
    in_mode(step, mode)()
    assert received[0] == (list, [tuple, tuple])
    _, gw, gb = np_loss_grads(X, Y, W0, B0)
    np.testing.assert_allclose(npv(w), W0 - LR * gw, **TOL)
    np.testing.assert_allclose(npv(b), B0 - LR * 3.0 * gb, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_clip_gradient_norms_fn_as_transform(mode):
    w, b = keras.Variable(W0), keras.Variable(B0)
    max_norm = 1.0
    step = kt.create_train_step(
        lambda: mse(X, Y, w, b),
        keras.optimizers.SGD(LR),
        transform_grads_fn=kt.clip_gradient_norms_fn(max_norm),
    )
    in_mode(step, mode)()
    _, gw, gb = np_loss_grads(X, Y, W0, B0)
    assert np.linalg.norm(gw) > max_norm > np.linalg.norm(gb)  # one clipped, one not
    np.testing.assert_allclose(npv(w), W0 - LR * gw * max_norm / np.linalg.norm(gw), **TOL)
    np.testing.assert_allclose(npv(b), B0 - LR * gb, **TOL)


# -- aggregation_method / gate_gradients --------------------------------------

TF1_GRADIENT_OPTIONS = [
    dict(aggregation_method=tf.AggregationMethod.EXPERIMENTAL_TREE),
    dict(gate_gradients=kt.GATE_GRAPH),
    dict(gate_gradients=kt.GATE_NONE, aggregation_method=tf.AggregationMethod.ADD_N),
]


@pytest.fixture
def gradients_spy(monkeypatch):
    """Counts the calls of TF1's `gradients` (`tf.compat.v1.gradients`) made by `keras_trainop.gradients`."""
    calls = []
    real = tf.compat.v1.gradients

    def gradients(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients_lib.tf.compat.v1, "gradients", gradients)
    return calls


@pytest.mark.parametrize(
    "options", TF1_GRADIENT_OPTIONS + [{}], ids=["tree", "gate_graph", "gate_none", "defaults"]
)
@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_tf1_gradient_options_use_tf_gradients_in_graph(mode, options, gradients_spy):
    w, b = keras.Variable(W0), keras.Variable(B0)
    step = kt.create_train_step(lambda: mse(X, Y, w, b), keras.optimizers.SGD(LR), **options)
    loss = in_mode(step, mode)()
    if options:
        assert len(gradients_spy) == 1
        assert gradients_spy[0]["aggregation_method"] == options.get("aggregation_method")
        # tf.gradients' bool `gate_gradients` is TF1's GATE_OP (the default).
        gate_op = options.get("gate_gradients", kt.GATE_OP) == kt.GATE_OP
        assert gradients_spy[0]["gate_gradients"] is gate_op
    else:
        assert gradients_spy == []  # the tape serves the defaults
    losses, w_ref, b_ref = sgd_oracle([(X, Y)])
    assert float(loss) == pytest.approx(losses[0], rel=1e-5)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)
    np.testing.assert_allclose(npv(b), b_ref, **TOL)


@pytest.mark.parametrize("options", TF1_GRADIENT_OPTIONS, ids=["tree", "gate_graph", "gate_none"])
def test_tf1_gradient_options_warn_once_per_step_eagerly(options, gradients_spy):
    w, b = keras.Variable(W0), keras.Variable(B0)
    opt = keras.optimizers.SGD(LR)
    step = kt.create_train_step(lambda: mse(X, Y, w, b), opt, **options)
    with pytest.warns(UserWarning, match="cannot act") as record:
        step()
        step()
    assert sum("cannot act" in str(r.message) for r in record) == 1
    with pytest.warns(UserWarning, match="cannot act"):  # a new step object warns again
        kt.create_train_step(lambda: mse(X, Y, w, b), opt, **options)()
    assert gradients_spy == []
    _, w_ref, _ = sgd_oracle([(X, Y)] * 3)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)


# -- check_numerics -------------------------------------------------------------


def _poisonable_step(mode_check_numerics=True, global_step=kt.USE_GLOBAL_STEP):
    w = keras.Variable([1.0, 2.0], name="w")
    opt = keras.optimizers.SGD(LR, momentum=0.9)
    step = kt.create_train_step(
        lambda v: tf.reduce_sum(w * v),
        opt,
        check_numerics=mode_check_numerics,
        global_step=global_step,
    )
    return w, opt, step


def _state(w, opt):
    return [npv(w)] + [npv(v) for v in opt.variables]


GOOD = np.array([1.0, 1.0], "float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_numerics_eager_raises_non_finite_error(bad):
    counter = tf.Variable(0, dtype=tf.int64)
    w, opt, step = _poisonable_step(global_step=counter)
    step(GOOD)
    before = _state(w, opt)
    with pytest.raises(kt.NonFiniteError) as info:
        step(np.array([bad, 1.0], "float32"))
    assert isinstance(info.value, tf.errors.InvalidArgumentError)
    assert "inf or nan" in str(info.value) and "step 2" in str(info.value)
    assert info.value.step == 2
    after = _state(w, opt)
    assert all(np.array_equal(p, q) for p, q in zip(before, after))
    assert int(opt.iterations) == 1 and int(counter.numpy()) == 1
    step(GOOD)  # training goes on
    assert int(opt.iterations) == 2 and int(counter.numpy()) == 2


def test_check_numerics_graph_raises_invalid_argument():
    w, opt, step = _poisonable_step()
    fn = in_mode(step, "graph")
    fn(GOOD)
    before = _state(w, opt)
    with pytest.raises(tf.errors.InvalidArgumentError, match="inf or nan"):
        fn(np.array([np.nan, 1.0], "float32"))
    assert all(np.array_equal(p, q) for p, q in zip(before, _state(w, opt)))
    assert int(opt.iterations) == 1
    # The documented way to get the error that says what failed.
    with pytest.raises(kt.NonFiniteError, match="the loss is inf or nan at step 2"):
        step.raise_if_failed()


def test_check_numerics_jit_blocks_then_raise_if_failed():
    w, opt, step = _poisonable_step()
    fn = in_mode(step, "jit")
    fn(GOOD)
    step.raise_if_failed()  # nothing failed
    before = _state(w, opt)
    fn(np.array([np.nan, 1.0], "float32"))  # nothing can raise under XLA
    assert all(np.array_equal(p, q) for p, q in zip(before, _state(w, opt)))
    with pytest.raises(kt.NonFiniteError, match="inf or nan") as info:
        step.raise_if_failed()
    assert info.value.step == 2
    step.raise_if_failed()  # the record was cleared
    fn(GOOD)
    assert int(opt.iterations) == 2
    # Momentum 0.9, gradient [1, 1] twice: v1 = -0.1, v2 = 0.9 * v1 - 0.1.
    np.testing.assert_allclose(npv(w), np.array([1.0, 2.0]) - 0.1 - 0.19, **TOL)


def test_check_numerics_step_number_after_caught_graph_failure():
    w, opt, step = _poisonable_step()
    fn = in_mode(step, "graph")
    fn(GOOD)
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn(np.array([np.nan, 1.0], "float32"))  # step 2 fails
    fn(GOOD)  # step 2 applied
    with pytest.raises(kt.NonFiniteError) as info:
        step(np.array([np.nan, 1.0], "float32"))  # step 3 fails
    assert info.value.step == 3


@pytest.mark.parametrize("mode", MODES)
def test_check_numerics_false_lets_nan_through(mode):
    w, opt, step = _poisonable_step(mode_check_numerics=False)
    in_mode(step, mode)(np.array([np.nan, 1.0], "float32"))
    assert np.isnan(npv(w)[0]) and npv(w)[1] == pytest.approx(1.9)
    assert int(opt.iterations) == 1


# -- create_train_step: errors ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss=tf.constant(1.0)), "`loss`"),
        (dict(total_loss_fn="sum"), "`total_loss_fn`"),
        (dict(optimizer=tf.compat.v1.train.GradientDescentOptimizer(0.1)), "`optimizer`"),
        (dict(optimizer=object()), "`optimizer`"),
    ],
    ids=["loss", "total_loss_fn", "tf1_optimizer", "not_an_optimizer"],
)
def test_create_train_step_errors(kwargs, match):
    args = dict(loss=lambda: tf.constant(1.0), optimizer=keras.optimizers.SGD())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kt.create_train_step(args.pop("loss"), args.pop("optimizer"), **args)


# -- create_train_op ---------------------------------------------------------------


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_create_train_op_applies_one_update(mode):
    w, b = keras.Variable(W0, name="w"), tf.Variable(B0, name="b")
    unread = tf.Variable([7.0], name="unread")
    scale = keras.Variable(2.0, name="scale", trainable=False)
    opt = keras.optimizers.SGD(LR)

    @tf.function(jit_compile=mode == "jit")
    def train(x, y):
        side = unread * 3.0  # read in the function, not by the loss
        loss = scale * mse(x, y, w, b)
        return kt.create_train_op(loss, opt), side

    got = [float(train(x, y)[0]) for x, y in BATCHES[:2]]
    losses, w_ref, b_ref = sgd_oracle(BATCHES[:2], scale=2.0)
    np.testing.assert_allclose(got, losses, **TOL)
    np.testing.assert_allclose(npv(w), w_ref, **TOL)
    np.testing.assert_allclose(npv(b), b_ref, **TOL)
    assert npv(unread).tolist() == [7.0] and float(npv(scale)) == 2.0
    assert int(opt.iterations) == 2


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_create_train_op_options(mode):
    # Oracle: SGD by hand on the linear model, with b frozen, the gradient
    # halved by the transform, an update op and a global step counting updates.
    w, b = tf.Variable(W0, name="w"), tf.Variable(B0, name="b")
    counter = tf.Variable(0, dtype=tf.int64, name="counter")
    ran = tf.Variable(0.0, name="ran")
    opt = keras.optimizers.SGD(LR)

    def halve(grads_and_vars):
        return [(None if g is None else g * 0.5, v) for g, v in grads_and_vars]

    @tf.function(jit_compile=mode == "jit")
    def train(x, y):
        return kt.create_train_op(
            mse(x, y, w, b), opt, global_step=counter, variables_to_train=[w],
            transform_grads_fn=halve, update_ops=[lambda: ran.assign_add(1.0)],
        )

    w_ref = W0.astype("float64")
    for x, y in BATCHES[:2]:
        train(x, y)
        _, gw, _ = np_loss_grads(x, y, w_ref, B0)
        w_ref = w_ref - LR * 0.5 * gw
    np.testing.assert_allclose(npv(w), w_ref, **TOL)
    assert npv(b).tolist() == B0.tolist()
    assert int(counter.numpy()) == 2 and float(ran.numpy()) == 2.0 and int(opt.iterations) == 2


def test_create_train_op_eager_points_to_create_train_step():
    with pytest.raises(ValueError, match="create_train_step"):
        kt.create_train_op(tf.constant(1.0), keras.optimizers.SGD())


def test_create_train_op_check_numerics():
    w = tf.Variable([1.0, 2.0])
    opt = keras.optimizers.SGD(LR)

    @tf.function
    def train(v):
        return kt.create_train_op(tf.reduce_sum(w * v), opt)

    assert float(train(tf.constant(GOOD))) == 3.0
    np.testing.assert_allclose(w.numpy(), [0.9, 1.9], **TOL)
    with pytest.raises(tf.errors.InvalidArgumentError, match="inf or nan"):
        train(tf.constant([np.nan, 1.0]))
    np.testing.assert_allclose(w.numpy(), [0.9, 1.9], **TOL)
    assert int(opt.iterations) == 1


def test_create_train_op_check_numerics_jit_blocks_then_raise_if_failed():
    w = tf.Variable([1.0, 2.0])
    opt = keras.optimizers.SGD(LR)

    @tf.function(jit_compile=True)
    def train(v):
        return kt.create_train_op(tf.reduce_sum(w * v), opt)

    train(tf.constant(GOOD))
    kt.raise_if_failed(opt)  # nothing failed
    train(tf.constant([np.nan, 1.0]))  # nothing can raise under XLA: blocked
    train(tf.constant(GOOD))  # blocked too, until the record is read
    np.testing.assert_allclose(w.numpy(), [0.9, 1.9], **TOL)
    with pytest.raises(kt.NonFiniteError, match="inf or nan at step 2") as info:
        kt.raise_if_failed(opt)
    assert info.value.step == 2 and info.value.what == "loss"
    kt.raise_if_failed(opt)  # the record was cleared
    train(tf.constant(GOOD))
    np.testing.assert_allclose(w.numpy(), [0.8, 1.8], **TOL)
    assert int(opt.iterations) == 2


@pytest.mark.parametrize("api", ["create_train_step", "create_train_op"])
def test_jit_warns_that_check_numerics_cannot_raise(api):
    w = tf.Variable([1.0, 2.0])
    opt = keras.optimizers.SGD(LR)
    step = kt.create_train_step(lambda v: tf.reduce_sum(w * v), opt)

    @tf.function(jit_compile=True)
    def train(v):
        if api == "create_train_op":
            return kt.create_train_op(tf.reduce_sum(w * v), opt)
        return step(v)

    how = "kt.raise_if_failed(optimizer)" if api == "create_train_op" else "step.raise_if_failed()"
    with pytest.warns(UserWarning, match="nothing can raise") as record:
        train(tf.constant(GOOD))
    assert [str(r.message).count(how) for r in record] == [1]


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_jit_and_graph_warn_nothing_without_check_numerics(mode, recwarn):
    w = tf.Variable([1.0, 2.0])
    opt = keras.optimizers.SGD(LR)

    @tf.function(jit_compile=mode == "jit")
    def train(v):
        return kt.create_train_op(tf.reduce_sum(w * v), opt, check_numerics=False)

    train(tf.constant(GOOD))
    assert not [r for r in recwarn if "keras_trainop" in str(r.message)]


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_create_train_op_with_a_loss_scale_optimizer_applies_the_true_gradient(mode):
    # Oracle: SGD by hand. A loss-scale optimizer divides the gradients it is
    # given by its scale, so they must be those of the scaled loss.
    w = tf.Variable([1.0, 2.0])
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR))

    @tf.function(jit_compile=mode == "jit")
    def train(v):
        return kt.create_train_op(tf.reduce_sum(w * v), opt)

    train(tf.constant([1.0, 3.0]))
    np.testing.assert_allclose(w.numpy(), [1.0 - LR * 1.0, 2.0 - LR * 3.0], **TOL)
    assert int(opt.iterations) == 1


# -- TF1 helpers -----------------------------------------------------------------


def test_clip_gradient_norms_per_tensor():
    v1, v2, v3, v4 = (tf.Variable(np.zeros(s, "float32")) for s in [(2,), (2,), (3,), (4, 2)])
    big = np.array([3.0, 4.0], "float32")  # norm 5
    small = np.array([0.3, 0.4], "float32")  # norm 0.5
    slices = tf.IndexedSlices(
        tf.constant([[6.0, 8.0], [0.0, 0.0]]), tf.constant([3, 1]), tf.constant([4, 2])
    )
    pairs = [(tf.constant(big), v1), (tf.constant(small), v2), (None, v3), (slices, v4)]
    original = list(pairs)
    out = kt.clip_gradient_norms(pairs, 1.0)
    assert unchanged(pairs, original) and out is not pairs
    assert [v for _, v in out] == [v1, v2, v3, v4]
    np.testing.assert_allclose(out[0][0].numpy(), big / 5.0, **TOL)
    np.testing.assert_allclose(out[1][0].numpy(), small, **TOL)
    assert out[2][0] is None
    clipped = out[3][0]
    assert isinstance(clipped, tf.IndexedSlices)
    assert clipped.indices is slices.indices and clipped.dense_shape is slices.dense_shape
    np.testing.assert_allclose(clipped.values.numpy(), [[0.6, 0.8], [0.0, 0.0]], **TOL)


@pytest.mark.parametrize(
    "key",
    [
        lambda kv, tv: (tv.ref(), 1),
        lambda kv, tv: ("blk/kw", 0),  # keras.Variable path
        lambda kv, tv: ("tw", 1),  # tf.Variable name without ':0'
    ],
    ids=["ref", "keras_path", "tf_name"],
)
@pytest.mark.parametrize(
    "multiplier",
    [
        lambda: 3.0,
        lambda: tf.constant(3.0),
        lambda: tf.Variable(3.0),
        lambda: tf.constant(3.0, tf.float64),
    ],
    ids=["float", "tensor", "variable", "float64_tensor"],
)
def test_multiply_gradients(key, multiplier):
    with keras.name_scope("blk"):
        kv = keras.Variable([0.0, 0.0], name="kw")
    tv = tf.Variable([0.0, 0.0], name="tw")
    other = tf.Variable([0.0], name="other")
    grads = [tf.constant([1.0, -2.0]), tf.constant([0.5, 4.0]), tf.constant([5.0])]
    pairs = [(grads[0], kv), (grads[1], tv), (grads[2], other)]
    original = list(pairs)
    dict_key, scaled = key(kv, tv)
    out = kt.multiply_gradients(pairs, {dict_key: multiplier()})
    assert unchanged(pairs, original)
    assert [v for _, v in out] == [kv, tv, other]
    for i, (g, _) in enumerate(out):
        assert g.dtype == tf.float32
        np.testing.assert_allclose(g.numpy(), grads[i].numpy() * (3.0 if i == scaled else 1.0))


def test_multiply_gradients_indexed_slices_and_none_passthrough():
    v, untouched = tf.Variable(np.zeros((4, 2), "float32"), name="emb"), tf.Variable([0.0])
    slices = tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([2]), tf.constant([4, 2]))
    out = kt.multiply_gradients([(slices, v), (None, untouched)], {v.ref(): 0.5})
    g = out[0][0]
    assert isinstance(g, tf.IndexedSlices)
    assert g.indices is slices.indices and g.dense_shape is slices.dense_shape
    np.testing.assert_allclose(g.values.numpy(), [[0.5, 1.0]])
    assert out[1] == (None, untouched)


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda v: ([(None, v)], {v.ref(): 2.0}), "Requested multiple of `None` gradient"),
        (lambda v: (((tf.constant([1.0]), v),), {v.ref(): 2.0}), "must be a list"),
        (lambda v: ([(tf.constant([1.0]), v)], {}), "is empty"),
        (lambda v: ([(tf.constant([1.0]), v)], [(v.ref(), 2.0)]), "must be a dict"),
    ],
    ids=["none_gradient", "tuple", "empty", "not_a_dict"],
)
def test_multiply_gradients_errors(make_args, match):
    v = tf.Variable([0.0], name="v")
    with pytest.raises(ValueError, match=match):
        kt.multiply_gradients(*make_args(v))


def test_create_train_op_colocates_gradient_ops_with_their_forward_ops():
    # TF1's option: each gradient op gets the colocation group of the op it
    # differentiates. Oracle: the same function without it, where only the
    # ops TF always colocates (the initial gradient, with the loss) have one.
    w = tf.Variable([[1.0, 2.0]])
    opt = keras.optimizers.SGD(LR)
    opt.build([w])

    def colocated_ops(colocate):
        @tf.function
        def train(x):
            loss = tf.reduce_sum(tf.tanh(x @ tf.transpose(w)))
            return kt.create_train_op(loss, opt, colocate_gradients_with_ops=colocate, check_numerics=False)

        graph = train.get_concrete_function(tf.constant([[1.0, 1.0]])).graph
        return {op.name for op in graph.get_operations()
                if any(group != b"loc:@" + op.name.encode() for group in op.colocation_groups())}

    plain, colocated = colocated_ops(False), colocated_ops(True)
    assert plain < colocated
    assert any("MatMul" in name for name in colocated - plain)  # the matmul's gradient, with the matmul


# The TF1 helpers are thin wrappers over the registered transforms: one
# implementation per feature (before, each had its own, with its own float16
# handling and key rules, and `clip_gradient_norms_fn` returned an unsaveable closure).


def test_clip_gradient_norms_of_float16_gradients_sums_in_float32():
    # |g|^2 = 250,000 overflows float16 (max 65,504): summed in float16 the norm
    # is inf and the clipped gradient 0. Oracle: NumPy in float64.
    v = tf.Variable(np.zeros(2, "float16"))
    g = tf.constant([300.0, 400.0], tf.float16)
    (clipped, _), = kt.clip_gradient_norms([(g, v)], 1.0)
    assert clipped.dtype == tf.float16
    np.testing.assert_allclose(clipped.numpy().astype("float64"), [0.6, 0.8], rtol=1e-3)
    (transformed, _), = kt.transforms.clip_by_norm(1.0)([(g, v)])
    np.testing.assert_array_equal(clipped.numpy(), transformed.numpy())


def test_clip_gradient_norms_fn_is_the_registered_transform_and_is_saved(tmp_path):
    transform = kt.clip_gradient_norms_fn(0.5)
    assert type(transform) is kt.transforms.ClipByNorm and transform.clip_norm == 0.5
    model = kt.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", grad_transforms=[transform])
    model.save(tmp_path / "m.keras")  # no warning: warnings are errors here
    (loaded,) = keras.saving.load_model(tmp_path / "m.keras").train_options.transforms
    assert type(loaded) is kt.transforms.ClipByNorm and loaded.clip_norm == 0.5


def test_clip_gradient_norms_takes_a_tensor_bound():
    v = tf.Variable(np.zeros(2, "float32"))
    bound = tf.Variable(2.0)
    (clipped, _), = kt.clip_gradient_norms([(tf.constant([3.0, 4.0]), v)], bound)
    np.testing.assert_allclose(clipped.numpy(), [1.2, 1.6], **TOL)


def test_multiply_gradients_follows_the_key_rules_of_the_multiply_transform():
    with keras.name_scope("blk"):
        kernel, bias = keras.Variable([1.0, 1.0], name="kernel"), keras.Variable([1.0], name="bias")
    pairs = [(tf.constant([1.0, 2.0]), kernel), (tf.constant([3.0]), bias)]
    # A regular expression searched in the path, as in kt.transforms.multiply.
    out = kt.multiply_gradients(pairs, {r"kernel$": 2.0, "blk/bias": np.float32(0.5)})
    expected = kt.transforms.multiply({r"kernel$": 2.0, "blk/bias": 0.5})(pairs)
    for (g, _), (e, _) in zip(out, expected):
        np.testing.assert_array_equal(g.numpy(), e.numpy())
    np.testing.assert_allclose(out[0][0].numpy(), [2.0, 4.0])
    np.testing.assert_allclose(out[1][0].numpy(), [1.5])


def test_add_gradients_summaries_writes_tf1_tags(tmp_path):
    with keras.name_scope("blk"):
        kv = keras.Variable(np.zeros((2, 2), "float32"), name="kw")
    tv = tf.Variable([0.0, 0.0, 0.0], name="tw")
    emb = tf.Variable(np.zeros((5, 2), "float32"), name="emb")
    none_var = tf.Variable([0.0], name="nograd")
    dense_kv = np.array([[1.0, 2.0], [2.0, 4.0]], "float32")
    dense_tv = np.array([3.0, 0.0, -4.0], "float32")
    slice_values = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], "float32")
    slices = tf.IndexedSlices(
        tf.constant(slice_values), tf.constant([0, 0, 3]), tf.constant([5, 2])
    )
    pairs = [
        (tf.constant(dense_kv), kv),
        (tf.constant(dense_tv), tv),
        (slices, emb),
        (None, none_var),
    ]
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        results = kt.add_gradients_summaries(pairs, step=7)
    writer.flush()
    writer.close()
    assert len(results) == 6 and all(bool(r) for r in results)

    acc = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    )
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    expected = {
        "blk/kw": (dense_kv, np.linalg.norm(dense_kv)),
        "tw": (dense_tv, 5.0),
        "emb": (slice_values, np.sqrt(6.0)),  # over `.values`, duplicate indices kept
    }
    assert tags == {f"{n}/{s}" for n in expected for s in ("gradient", "gradient_norm")}
    for name, (values, norm) in expected.items():
        (norm_event,) = acc.Tensors(f"{name}/gradient_norm")
        (hist_event,) = acc.Tensors(f"{name}/gradient")
        assert norm_event.step == 7 and hist_event.step == 7
        assert float(tf.make_ndarray(norm_event.tensor_proto)) == pytest.approx(norm, rel=1e-6)
        assert acc.SummaryMetadata(f"{name}/gradient_norm").plugin_data.plugin_name == "scalars"
        assert acc.SummaryMetadata(f"{name}/gradient").plugin_data.plugin_name == "histograms"
        buckets = tf.make_ndarray(hist_event.tensor_proto)
        assert buckets[:, 2].sum() == values.size
        assert buckets[:, 0].min() == pytest.approx(values.min())
        assert buckets[:, 1].max() == pytest.approx(values.max())


def test_add_gradients_summaries_logs_none_gradient(caplog):
    v = tf.Variable([0.0], name="lonely")
    caplog.set_level(logging.INFO, logger="keras_trainop")
    assert kt.add_gradients_summaries([(None, v)], step=1) == []
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("keras_trainop", logging.INFO, "Var lonely has no gradient")
    ]
