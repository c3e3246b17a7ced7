"""Run by tests/test_distribute.py in a process of its own (two logical CPU devices).

Gradient transforms, mixed precision, sparse gradients and the functional API
under MirroredStrategy, each against one device with the same global batch.
Prints one JSON object with what the tests assert.
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
from conftest import max_abs_diff, mlp, regression_data  # noqa: E402

import keras_trainop as kt  # noqa: E402

BATCH = 16  # the global batch: 8 examples per replica
CLIP = 0.3


def build(strategy, cls, optimizer, precision="float32", embedding=False, **options):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        with strategy.scope():
            if embedding:
                keras.utils.set_random_seed(0)
                inputs = keras.Input((3,), dtype="int32")
                h = keras.layers.Embedding(20, 4, name="embedding")(inputs)
                h = keras.layers.Flatten()(h)
                model = cls(inputs, keras.layers.Dense(1, name="out", dtype="float32")(h))
            else:
                model = mlp(cls)
            model.compile(optimizer(), "mse", **options)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


def sgd(**kwargs):
    return lambda: keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)


def fit(model, x, y, epochs=2, batch=BATCH):
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    return model.get_weights()


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.get_strategy()
    x, y = regression_data()
    results = {"replicas": mirrored.num_replicas_in_sync}

    # clip_by_global_norm: the oracle is Keras's SGD(global_clipnorm) on one device.
    reference = fit(build(one, keras.Model, sgd(global_clipnorm=CLIP)), x, y)
    ours = build(mirrored, kt.Model, sgd(), grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)])
    results["clip_diff"] = max_abs_diff(fit(ours, x, y), reference)
    results["optimizer_as_given"] = kt._keras_private.applies_gradients_as_given(ours.optimizer)
    plain = build(mirrored, keras.Model, sgd(global_clipnorm=CLIP))
    results["plain_keras_clip_diff"] = max_abs_diff(fit(plain, x, y), reference)

    # One step with SGD(1.0) and a clip of 1.0: the update's norm is the clip.
    def update_norm(cls, optimizer, **options):
        model = build(mirrored, cls, optimizer, **options)
        before = [w.copy() for w in model.get_weights()]
        after = fit(model, x[:BATCH], 20.0 * y[:BATCH], epochs=1)
        return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before))))

    results["ours_update_norm"] = update_norm(
        kt.Model, lambda: keras.optimizers.SGD(1.0), grad_transforms=[kt.transforms.clip_by_global_norm(1.0)]
    )
    results["plain_update_norm"] = update_norm(keras.Model, lambda: keras.optimizers.SGD(1.0, global_clipnorm=1.0))

    # Sparse gradients (Embedding): IndexedSlices reduced, clipped, applied.
    ids = np.random.RandomState(1).randint(0, 20, size=(64, 3)).astype("int32")
    reference = fit(build(one, keras.Model, sgd(global_clipnorm=CLIP), embedding=True), ids, y)
    ours = build(mirrored, kt.Model, sgd(), embedding=True, grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)])
    results["sparse_clip_diff"] = max_abs_diff(fit(ours, ids, y), reference)

    # Mixed precision: the oracle is Keras's LossScaleOptimizer over
    # SGD(global_clipnorm) on one device, which clips unscaled gradients.
    float32_reference = fit(build(one, keras.Model, sgd(global_clipnorm=CLIP)), x, y)
    keras_lso = build(one, keras.Model, sgd(global_clipnorm=CLIP), precision="mixed_float16")
    reference = fit(keras_lso, x, y)
    ours = build(
        mirrored, kt.Model, sgd(), precision="mixed_float16",
        grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)],
    )
    results["mixed_clip_diff"] = max_abs_diff(fit(ours, x, y), reference)
    results["mixed_scale"] = float(ours.optimizer.dynamic_scale.numpy())
    results["mixed_reference_scale"] = float(keras_lso.optimizer.dynamic_scale.numpy())
    results["mixed_iterations"] = [int(ours.optimizer.iterations.numpy()), int(keras_lso.optimizer.iterations.numpy())]
    # Against float32 with the same transform, within float16's precision: a
    # scale low enough that no step overflows, so both apply every step.
    low = build(
        mirrored, kt.Model,
        lambda: keras.optimizers.LossScaleOptimizer(sgd()(), initial_scale=2.0**8),
        precision="mixed_float16", grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)],
    )
    results["mixed_vs_float32_diff"] = max_abs_diff(fit(low, x, y), float32_reference)
    results["mixed_low_scale_iterations"] = int(low.optimizer.iterations.numpy())

    # Gradient accumulation: 2 global batches of 16 make one update, the same
    # as one batch of 32 on one device, clip included.
    def accumulate_fit(build_strategy, cls, optimizer, batch, **options):
        model = build(build_strategy, cls, optimizer, **options)
        model.fit(x, y, batch_size=batch, epochs=2, verbose=0, shuffle=False)
        return [v.numpy() for v in model.trainable_weights]

    reference = accumulate_fit(one, keras.Model, sgd(global_clipnorm=CLIP), 2 * BATCH)
    for policy in (True, "skip"):
        ours = accumulate_fit(
            mirrored, kt.Model, sgd(), BATCH, check_numerics=policy,
            grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)], gradient_accumulation_steps=2,
        )
        results[f"accumulation_diff_{policy}"] = max_abs_diff(ours, reference)
    ours = accumulate_fit(
        mirrored, kt.Model, lambda: keras.optimizers.LossScaleOptimizer(sgd()(), initial_scale=2.0**8),
        BATCH, precision="mixed_float16", grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)],
        gradient_accumulation_steps=2,
    )
    results["accumulation_mixed_diff"] = max_abs_diff(ours, reference)

    # Optimizers that wrap others: each applying optimizer must apply the
    # all-reduced gradients as given (before the fix a MultiOptimizer's
    # sub-optimizers reduced them again: every update twice as large).
    results["wrapped"] = wrapped_optimizers(mirrored, one, x, y)

    # An unbuilt optimizer in a custom loop: a clear error, not TF's unfed placeholder.
    results["unbuilt_error"] = unbuilt(mirrored, x, y)
    # The functional API in a custom loop: strategy.run over a distributed dataset.
    results["functional_clip_diff"] = functional(mirrored, x, y)
    print(json.dumps(results))


def multi(kind):
    """A MultiOptimizer sending the hidden layer to Adam and the rest to SGD."""

    def make():
        adam, sgd_ = keras.optimizers.Adam(0.01), sgd()()
        if kind == "map":
            return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(sgd_, {"hidden/.*": adam}))
        # A selector function: the sub-optimizers are known only once it is built.
        return keras.optimizers.MultiOptimizer(lambda v: adam if v.path.startswith("hidden") else sgd_)

    return make


WRAPPED = {
    "multi_map": multi("map"),
    "multi_selector": multi("selector"),
    "loss_scale_multi": lambda: keras.optimizers.LossScaleOptimizer(multi("map")(), initial_scale=2.0**4),
}


def wrapped_optimizers(mirrored, one, x, y):
    """Max weight difference, Mirrored against one device, per wrapper and transform."""
    diffs = {}
    for name, optimizer in WRAPPED.items():
        # Oracle without transforms: plain Keras with the same optimizer on one device.
        reference = fit(build(one, keras.Model, optimizer), x, y)
        diffs[f"{name}-none"] = max_abs_diff(fit(build(mirrored, kt.Model, optimizer), x, y), reference)
        # With a clip: kt on one device, where no all-reduce happens at all.
        clip = dict(grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)])
        reference = fit(build(one, kt.Model, optimizer, **clip), x, y)
        model = build(mirrored, kt.Model, optimizer, **clip)
        diffs[f"{name}-clip"] = max_abs_diff(fit(model, x, y), reference)
        diffs[f"{name}-as_given"] = kt._keras_private.applies_gradients_as_given(model.optimizer)
    return diffs


def functional(strategy, x, y):
    """create_train_step under strategy.run against Keras's global_clipnorm on one device."""
    reference = mlp(keras.Model)
    reference.compile(keras.optimizers.SGD(0.05, momentum=0.9, global_clipnorm=CLIP), "mse")
    reference.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    with strategy.scope():
        model = mlp(keras.Model)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        optimizer.build(model.trainable_variables)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    )
    mse = keras.losses.MeanSquaredError(reduction="sum")

    def loss(xb, yb):
        # Each replica's share of the mean over the global batch.
        return mse(yb, model(xb, training=True)) / BATCH

    with strategy.scope():
        train = kt.create_train_step(
            loss, optimizer, transform_grads_fn=kt.transforms.clip_by_global_norm(CLIP)
        )

    @tf.function
    def step(xb, yb):
        strategy.run(train, args=(xb, yb))

    for xb, yb in dataset:
        step(xb, yb)
    return max_abs_diff(model.get_weights(), reference.get_weights())


def unbuilt(strategy, x, y):
    with strategy.scope():
        model = mlp(keras.Model)
        train = kt.create_train_step(
            lambda xb, yb: keras.losses.mean_squared_error(yb, model(xb))[0], keras.optimizers.SGD(0.05)
        )

    @tf.function
    def step(xb, yb):
        strategy.run(train, args=(xb, yb))

    try:
        step(x[:BATCH], y[:BATCH])
    except ValueError as e:
        return str(e)
    return None


if __name__ == "__main__":
    main()
