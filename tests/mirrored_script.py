"""Run by tests/test_distribute.py in a process of its own: logical CPU devices
must be configured before TensorFlow initialises, which the test process has done.

Prints one JSON object with what the test asserts.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import layer_weights, max_abs_diff, mlp, regression_data  # noqa: E402

import keras_trainop as kt  # noqa: E402

BATCH = 16


def fit(model, x, y, epochs=1):
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False)


def compiled(strategy, cls, batchnorm=False, **options):
    with strategy.scope():
        model = mlp(cls, batchnorm=batchnorm)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", **options)
    return model


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = regression_data()
    results = {"replicas": strategy.num_replicas_in_sync}

    for check in (True, False):
        ours, theirs = compiled(strategy, kt.Model, check_numerics=check), compiled(strategy, keras.Model)
        fit(ours, x, y, epochs=2)
        fit(theirs, x, y, epochs=2)
        results[f"parity_check_{check}"] = max_abs_diff(ours.get_weights(), theirs.get_weights())

    bad_y = y.copy()
    bad_y[2 * BATCH + 1] = np.nan  # the 3rd step; the nan lands on one replica only
    model = compiled(strategy, kt.Model, batchnorm=True)
    reference = compiled(strategy, kt.Model, batchnorm=True)
    try:
        fit(model, x, bad_y)
        results["error"] = None
    except kt.NonFiniteError as e:
        results["error"] = str(e)
        results["error_step"] = e.step
    fit(reference, x[: 2 * BATCH], y[: 2 * BATCH])
    results["iterations"] = int(model.optimizer.iterations.numpy())
    results["blocked_diff"] = max_abs_diff(model.get_weights(), reference.get_weights())
    results["blocked_slots_diff"] = max_abs_diff(
        [v.numpy() for v in model.optimizer.variables],
        [v.numpy() for v in reference.optimizer.variables],
    )
    # check_numerics="skip": the bad step is skipped on every replica, counted once.
    from test_numerics import SENTINEL, poison
    from test_numerics import model as poisonable_model

    def poisonable(policy):
        with strategy.scope():
            m = poisonable_model()
            m.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", check_numerics=policy)
        return m

    skipper, reference = poisonable("skip"), poisonable("skip")
    history = skipper.fit(*poison(x, y, 1, "nan_y"), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    rows = np.r_[0:BATCH, 2 * BATCH : 4 * BATCH]
    fit(reference, x[rows], y[rows])
    results["skip_history"] = history.history["skipped_steps"]
    results["skip_diff"] = max_abs_diff(layer_weights(skipper), layer_weights(reference))

    # check_numerics="all": a non-finite gradient of one layer is named.
    checker = poisonable("all")
    try:
        fit(checker, *poison(x, y, 2, "gradient"))
        results["all_error"] = None
    except kt.NonFiniteError as e:
        results["all_error"] = [e.step, e.what, e.variables]
    # The same failures on the second replica only: still reported for what they are.
    half = BATCH // 2  # each replica gets half of the global batch
    on_second = y.copy()
    on_second[2 * BATCH + half + 1] = np.nan
    try:
        fit(compiled(strategy, kt.Model), x, on_second)
        results["second_replica_loss"] = None
    except kt.NonFiniteError as e:
        results["second_replica_loss"] = [e.step, e.what]
    x_second = x.copy()
    x_second[BATCH + half + 1, 0] = SENTINEL
    try:
        fit(poisonable("all"), x_second, y)
        results["second_replica_all"] = None
    except kt.NonFiniteError as e:
        results["second_replica_all"] = [e.step, e.what, e.variables]
    # GradientTensorBoard: one record per step, of the reduced gradients.
    import tempfile

    from tensorboard.backend.event_processing import event_accumulator

    logdir = tempfile.mkdtemp()
    recorded = compiled(strategy, kt.Model)
    recorded.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False,
                 callbacks=[kt.GradientTensorBoard(logdir, update_freq=2)])
    acc = event_accumulator.EventAccumulator(os.path.join(logdir, "train"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("global_norm/gradient_norm")
    results["callback_steps"] = [e.step for e in events]
    results["callback_first_norm"] = float(tf.make_ndarray(events[0].tensor_proto))
    # Oracle: one device, same global batch: the gradient of step 2 by tape.
    single = mlp(keras.Model)
    single.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    single.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0, shuffle=False)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[BATCH : 2 * BATCH], single(x[BATCH : 2 * BATCH]))
    results["single_device_norm"] = float(tf.linalg.global_norm(tape.gradient(loss, single.trainable_variables)))
    # The opt-in grad_norm metric: the mean over the epoch of the reduced norms.
    logged = compiled(strategy, kt.Model)
    history = logged.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False,
                         callbacks=[kt.GradientTensorBoard(tempfile.mkdtemp(), update_freq=1000, metrics=True)])
    results["logged_grad_norm"] = history.history["grad_norm"][0]
    # Oracle: the same steps on one device, each gradient's norm taken by tape.
    single, norms = mlp(keras.Model), []
    single.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    for start in range(0, len(x), BATCH):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(yb, single(xb))
        norms.append(float(tf.linalg.global_norm(tape.gradient(loss, single.trainable_variables))))
        single.train_on_batch(xb, yb)
    results["single_device_mean_norm"] = float(np.mean(norms))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
