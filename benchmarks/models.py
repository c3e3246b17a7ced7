"""What every speed table shares: the two networks it times (the MLP and "deep", a
hundred small layers), and the commit it names."""

import subprocess

import keras


def network(model_name, cls):
    """An uncompiled `cls(inputs, outputs)` with fixed initial weights.

    "mlp": 784-256-256-10. "deep": `Dense(32)` x 100 then `Dense(10)` (202
    variables, where per-op overhead dominates).
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    if model_name == "mlp":
        h = keras.layers.Dense(256, activation="relu")(inputs)
        h = keras.layers.Dense(256, activation="relu")(h)
    else:
        h = keras.layers.Dense(32, activation="relu")(inputs)
        for _ in range(99):
            h = keras.layers.Dense(32, activation="relu")(h)
    return cls(inputs, keras.layers.Dense(10)(h))


def commit():
    """The short hash of the checked-out commit, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
