"""One bad batch, three ways: Keras's TerminateOnNaN, check_numerics=True, and "skip".

The data has one batch whose target is nan (step 5 of each epoch). Run:
    python examples/nonfinite_vs_terminate_on_nan.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402

BATCH, BAD_STEP = 32, 5


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((320, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 1))).astype("float32")
    y_bad = y.copy()
    y_bad[(BAD_STEP - 1) * BATCH + 7] = np.nan
    return x, y, y_bad


def build(cls, **options):
    keras.utils.set_random_seed(0)
    model = cls([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse", **options)
    return model


def finite(model):
    return all(np.isfinite(w).all() for w in model.get_weights())


def main():
    x, y, y_bad = data()
    fit = dict(batch_size=BATCH, epochs=3, verbose=0, shuffle=False)

    plain = build(keras.Sequential)
    plain.fit(x, y_bad, callbacks=[keras.callbacks.TerminateOnNaN()], **fit)
    print(
        f"keras TerminateOnNaN: stopped after {int(plain.optimizer.iterations)} updates; "
        f"weights finite: {finite(plain)}"
    )

    raising = build(kt.Sequential, check_numerics=True)
    try:
        raising.fit(x, y_bad, **fit)
    except kt.NonFiniteError as error:
        print(
            f"kt check_numerics=True: raised at step {error.step} ({error.what}) after "
            f"{int(raising.optimizer.iterations)} updates; weights finite: {finite(raising)}"
        )

    skipping = build(kt.Sequential, check_numerics="skip")
    history = skipping.fit(x, y_bad, **fit)
    clean = build(kt.Sequential)
    clean_history = clean.fit(x, y, **fit)
    print(
        f"kt check_numerics='skip': trained {len(history.history['loss'])} epochs, "
        f"skipped_steps per epoch {[int(s) for s in history.history['skipped_steps']]}, "
        f"{int(skipping.optimizer.iterations)} updates; weights finite: {finite(skipping)}; "
        f"last epoch loss {history.history['loss'][-1]:.4f} "
        f"(clean data, no skip: {clean_history.history['loss'][-1]:.4f})"
    )


if __name__ == "__main__":
    main()
