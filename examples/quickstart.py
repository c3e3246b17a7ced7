"""Quick start: a classifier trained with `model.fit`, gradient transforms and check-numerics.

Run: python examples/quickstart.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
        grad_transforms=[kt.clip_gradient_norms_fn(1.0)],  # per-tensor norm <= 1
        check_numerics=True,  # a non-finite loss changes nothing and raises
        global_step=updates,  # +1 per applied update
    )
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    for epoch, (loss, acc) in enumerate(zip(history.history["loss"], history.history["accuracy"]), 1):
        print(f"epoch {epoch}: loss={loss:.4f} accuracy={acc:.3f}")
    print(f"updates applied: {int(updates.numpy())} (optimizer.iterations={int(model.optimizer.iterations)})")

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
