"""A TF1 `create_train_op` training loop, rewritten for Keras 3 two ways.

The TF1 original (graph mode, a Session; `slim` is `tf.contrib.slim`):

    global_step = tf.train.get_or_create_global_step()
    x, y = iterator.get_next()
    logits = model(x)
    loss = tf.losses.sparse_softmax_cross_entropy(y, logits)

    ema = tf.train.ExponentialMovingAverage(0.99)           # weight averages,
    tf.add_to_collection(tf.GraphKeys.UPDATE_OPS,           # as slim's image
                         ema.apply(tf.trainable_variables()))  # classifiers did

    def transform_grads_fn(grads_and_vars):                 # slim's order:
        grads_and_vars = tf.contrib.training.multiply_gradients(
            grads_and_vars, {head_bias: 2.0})               # multiply, then
        return tf.contrib.training.clip_gradient_norms(     # clip per tensor
            grads_and_vars, 1.0)

    train_op = tf.contrib.training.create_train_op(
        loss, tf.train.AdamOptimizer(0.01),
        global_step=global_step,
        update_ops=tf.get_collection(tf.GraphKeys.UPDATE_OPS),
        transform_grads_fn=transform_grads_fn,
        summarize_gradients=True)
    with tf.train.MonitoredTrainingSession(...) as sess:
        for _ in range(STEPS):
            loss_value = sess.run(train_op)

Below: (a) the same call, `kt.create_train_op`, inside a `tf.function`, and
(b) `kt.create_train_step`, which takes a loss *function*. Both train the same
model from the same weights and end at the same weights.

Run: python examples/tf1_migration.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_trainop as kt  # noqa: E402

STEPS, BATCH = 150, 32


def make_dataset():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, 8)).astype("float32")
    y = (x[:, 0] * x[:, 1] + x[:, 2] > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def transform_grads_fn(grads_and_vars):
    # TF1 keyed multipliers by the variable; Keras 3 variables are unhashable,
    # so key by `variable.path` (or `variable.ref()`).
    grads_and_vars = kt.multiply_gradients(grads_and_vars, {"sequential/head/bias": 2.0})
    return kt.clip_gradient_norms(grads_and_vars, 1.0)


def train(model, use_train_op, log_dir):
    optimizer = keras.optimizers.Adam(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # TF1's global step: a scalar integer variable, +1 per applied update.
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    # TF1's UPDATE_OPS were graph ops; here an update op is a zero-argument
    # callable, run every step after the gradients are transformed and before
    # they are applied (a step that check_numerics blocks runs none).
    averages = [tf.Variable(v) for v in model.trainable_variables]

    def update_averages():
        return [a.assign(0.99 * a + 0.01 * v) for a, v in zip(averages, model.trainable_variables)]

    options = dict(
        global_step=global_step,
        update_ops=[update_averages],
        transform_grads_fn=transform_grads_fn,
        summarize_gradients=True,  # through the default tf.summary writer, if any
        check_numerics=True,  # TF1's default: a nan/inf loss raises, nothing changes
    )

    if use_train_op:
        # (a) kt.create_train_op: the TF1 call, inside a tf.function. It returns
        # the loss tensor (the value from before the update), as TF1's train_op.
        @tf.function
        def train_op(x, y):
            loss = loss_fn(y, model(x, training=True))
            return kt.create_train_op(loss, optimizer, **options)

    else:
        # (b) kt.create_train_step: give the loss as a function; `step(x, y)`
        # calls it, runs one step and returns the loss from before the update.
        # It runs eagerly too; tf.function makes it fast.
        step = kt.create_train_step(
            lambda x, y: loss_fn(y, model(x, training=True)), optimizer, **options
        )
        train_op = tf.function(step)

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():  # summarize_gradients writes here
        losses = [float(train_op(x, y)) for x, y in make_dataset()]
    writer.close()
    return losses, int(global_step.numpy()), averages


def main():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="hidden"),
         keras.layers.Dense(2, name="head")]
    )
    initial = model.get_weights()
    results = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for name, use_train_op in (("create_train_op", True), ("create_train_step", False)):
            model.set_weights(initial)
            losses, global_step, _ = train(model, use_train_op, os.path.join(log_dir, name))
            results[name] = model.get_weights()
            print(
                f"{name}: loss {np.mean(losses[:10]):.4f} (first 10 steps) -> "
                f"{np.mean(losses[-10:]):.4f} (last 10), global_step={global_step}"
            )
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(results["create_train_op"], results["create_train_step"])
    )
    print(f"both rewrites end at the same weights: max difference {difference:.1e}")


if __name__ == "__main__":
    main()
