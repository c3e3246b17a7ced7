"""Quick start: a classifier trained with `model.fit`, gradient clipping,
check-numerics and the gradient TensorBoard callback.

Run: python examples/quickstart.py   (about 10 s on a laptop CPU)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_trainop as kt  # noqa: E402


def make_data(n=2048, features=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    y = (x[:, :5].sum(axis=1) > 0).astype("int32")
    return x, y


def main():
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = kt.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(64, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="logits"),
        ]
    )
    updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # TF1's options, next to Keras's own:
        grad_transforms=[kt.clip_gradient_norms_fn(0.1)],  # per-tensor norm <= 0.1
        check_numerics=True,  # a non-finite loss changes nothing and raises
        global_step=updates,  # +1 per applied update
    )
    # Gradient histograms and norms every 32 updates, into <log_dir>/train
    # (a temporary directory here; give a real one and run
    # `tensorboard --logdir <log_dir>` to look at them). metrics=True also puts
    # the global gradient norm before (grad_norm) and after the clip
    # (clipped_grad_norm) into the logs.
    with tempfile.TemporaryDirectory() as log_dir:
        gradients_tb = kt.GradientTensorBoard(log_dir, update_freq=32, metrics=True)
        history = model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[gradients_tb])
        steps, tags = set(), set()
        for path in tf.io.gfile.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    steps.add(event.step)
                    tags.add(value.tag)
    h = history.history
    for epoch in range(3):
        print(
            f"epoch {epoch + 1}: loss={h['loss'][epoch]:.4f} "
            f"accuracy={h['accuracy'][epoch]:.3f} grad_norm={h['grad_norm'][epoch]:.3f} "
            f"clipped_grad_norm={h['clipped_grad_norm'][epoch]:.3f}"
        )
    print(f"updates applied: {int(updates.numpy())} (optimizer.iterations={int(model.optimizer.iterations)})")
    print(f"gradient summaries: {len(tags)} tags at steps {sorted(steps)}")

    # A batch whose loss is nan: the step is blocked before it touches anything.
    weights = model.get_weights()
    bad_x = x[:64].copy()
    bad_x[5, 0] = np.nan
    try:
        model.fit(bad_x, y[:64], batch_size=64, epochs=1, verbose=0)
    except kt.NonFiniteError as error:
        unchanged = all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
        print(f"check_numerics stopped step {error.step}: {error.what} is inf or nan")
        print(f"weights unchanged: {unchanged}; updates still {int(updates.numpy())}")


if __name__ == "__main__":
    main()
