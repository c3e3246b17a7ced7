"""Per-step cost of a TrainOpModel against plain `keras.Model.fit`, in one run.

Model: MLP 784-256-256-10, batch 128, Adam, synthetic data, graph mode (the
Keras default on CPU). Every round runs one epoch of every variant, in an
order that rotates from round to round, so that drift of a shared machine
hits all variants alike. The statistic is the median of the per-batch times
(from `on_train_batch_begin` to `on_train_batch_end`) over all rounds, after
one warm-up epoch per variant; the ratio is each variant's median over plain
Keras's.

Usage:
    python benchmarks/bench_overhead.py [--rounds 12] [--steps 150]
        [--variants plain,default,no_check]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402

# name -> (model class, keras_trainop compile options)
VARIANTS = {
    "plain": (keras.Model, None),
    "default": (kt.Model, {}),
    "no_check": (kt.Model, {"check_numerics": False}),
    "tf_gradients_gate_op": (
        kt.Model,
        {"aggregation_method": 0},  # ADD_N: tf.gradients(gate_gradients=True)
    ),
    "tf_gradients_gate_graph": (kt.Model, {"gate_gradients": kt.GATE_GRAPH}),
    "summaries_no_writer": (kt.Model, {"summarize_gradients": True}),
}


class BatchTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def build(cls, options, jit):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    h = keras.layers.Dense(256, activation="relu")(inputs)
    h = keras.layers.Dense(256, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    model = cls(inputs, outputs)
    compile_kwargs = dict(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    model.compile(**compile_kwargs, **(options or {}))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--variants", default="plain,default,no_check,tf_gradients_gate_graph,summaries_no_writer"
    )
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for all")
    args = parser.parse_args()
    names = args.variants.split(",")
    if names[0] != "plain":
        names = ["plain"] + [n for n in names if n != "plain"]

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * 128, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * 128,))
    models = {n: build(*VARIANTS[n], jit=args.jit) for n in names}
    timers = {n: BatchTimer() for n in names}
    for n in names:  # warm-up: trace and first-run costs
        models[n].fit(x, y, batch_size=128, epochs=1, verbose=0)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            models[n].fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=[timers[n]])

    base = statistics.median(timers["plain"].times)
    print(f"rounds={args.rounds} steps/round={args.steps} jit={args.jit}")
    print(f"{'variant':<22}{'median ms/step':>16}{'ratio':>8}")
    for n in names:
        med = statistics.median(timers[n].times)
        print(f"{n:<22}{med * 1e3:>16.3f}{med / base:>8.3f}")


if __name__ == "__main__":
    main()
