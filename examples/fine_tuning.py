"""Fine-tuning: freeze part of a pretrained backbone, treat the rest per group.

- `variables_to_train`: regular expressions searched in `variable.path`; the
  variables no pattern matches (here the first backbone layer) do not change,
  optimizer slots included.
- `kt.transforms.partition`: one transform per group of variables. The
  backbone's gradient is clipped to a small global norm, the head's to a
  larger one, each group on its own.
- `kt.transforms.masked`: one transform on the variables a pattern matches;
  here the backbone's gradients are scaled by 0.1 (a lower learning rate for
  the pretrained layers).

Run: python examples/fine_tuning.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402

T = kt.transforms


def make_task(rule, n=2048, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype("float32")
    return x, rule(x).astype("int32")


def weights_by_layer(model):
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in model.layers}


def main():
    keras.utils.set_random_seed(0)
    model = kt.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu", name="backbone_1"),
            keras.layers.Dense(64, activation="relu", name="backbone_2"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # "Pretraining" on task A, all variables.
    x_a, y_a = make_task(lambda x: x[:, 0] + x[:, 1] > 0)
    model.compile(keras.optimizers.Adam(1e-2), loss, metrics=["accuracy"])
    model.fit(x_a, y_a, batch_size=64, epochs=2, verbose=0)

    # Fine-tuning on task B: backbone_1 frozen, backbone_2 at a tenth of the
    # step and a small clip, the head with a larger clip.
    x_b, y_b = make_task(lambda x: x[:, 0] - x[:, 2] > 0, seed=1)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        loss,
        metrics=["accuracy"],
        variables_to_train=[r"backbone_2/", r"head/"],  # re.search in variable.path
        grad_transforms=[
            T.partition(
                {"backbone": T.clip_by_global_norm(0.1), "head": T.clip_by_global_norm(1.0)},
                labels={"backbone": r"backbone"},
                default_label="head",
            ),
            T.masked(T.multiply({".*": 0.1}), r"backbone"),
        ],
    )
    before = weights_by_layer(model)
    _, accuracy_before = model.evaluate(x_b, y_b, verbose=0)
    model.fit(x_b, y_b, batch_size=64, epochs=3, verbose=0)
    after = weights_by_layer(model)
    _, accuracy_after = model.evaluate(x_b, y_b, verbose=0)

    for name in before:
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(before[name], after[name]))
        print(f"{name}: largest weight change {moved:.4f}")
    frozen = all(np.array_equal(a, b) for a, b in zip(before["backbone_1"], after["backbone_1"]))
    print(
        f"task B accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}; "
        f"backbone_1 frozen: {frozen}"
    )


if __name__ == "__main__":
    main()
