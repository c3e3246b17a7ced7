"""Mixed precision under MirroredStrategy, with a clip and gradient accumulation.

Two logical CPU devices stand in for two GPUs. keras_trainop sums the
replicas' gradients once, before its transforms, so the clip acts on the
gradient of the global batch (plain Keras clips each replica's share); with
`mixed_float16` the transforms see unscaled gradients, and the
LossScaleOptimizer (which Keras puts around the optimizer) still skips
overflowing steps and adjusts its scale.

Run: python examples/mixed_precision_mirrored.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# Before anything else touches the devices: split the CPU into 2 logical devices.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402

ACCUMULATE, BATCH = 4, 64  # each update: the mean gradient of 4 global batches of 64


def main():
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 16)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int32")

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(f"replicas: {strategy.num_replicas_in_sync}")
    with strategy.scope():
        model = kt.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(64, activation="relu"),
                # Outputs in float32, for a numerically safe softmax and loss.
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),  # wrapped in a LossScaleOptimizer by Keras
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            grad_transforms=[kt.transforms.clip_by_global_norm(1.0)],
            gradient_accumulation_steps=ACCUMULATE,
        )
    hidden = model.layers[0]
    print(f"variables: {hidden.kernel.dtype}, computation: {hidden.compute_dtype}")
    print(f"optimizer: {type(model.optimizer).__name__}, "
          f"initial loss scale {float(model.optimizer.dynamic_scale.numpy()):.0f}")

    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
    batches = 3 * len(x) // BATCH
    print(f"loss scale after training: {float(model.optimizer.dynamic_scale.numpy()):.0f}")
    print(f"{batches} batches -> {int(model.optimizer.iterations.numpy())} updates")
    loss, accuracy = history.history["loss"][-1], history.history["accuracy"][-1]
    print(f"final loss={loss:.4f} accuracy={accuracy:.3f}")


if __name__ == "__main__":
    main()
