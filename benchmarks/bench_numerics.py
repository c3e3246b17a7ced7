"""Per-step cost of each check_numerics policy against no check, in one run.

Models: the core MLP (784-256-256-10, batch 128) and a deep narrow model with
200 small variables (100 Dense(16) layers, batch 64), Adam, graph mode.

Method. Two copies of the same model can differ by several percent in speed
(measured: 4.5% between two plain Keras copies, steadily over 1000 calls), so
every variant is built `--copies` times and each copy's step is a
`tf.function` of its `train_step`, called on one fixed batch. The calls are
interleaved (one call of every copy of every variant, in an order that
rotates), so that drift of a shared machine hits all alike. A copy's figure is
the median of its call times; a variant's is the mean over its copies, and
its ratio is against `check_numerics=False`.

Two more variants measure what any all-or-nothing gradient check must pay,
with no check at all: a plain `keras.Model` whose `train_step` applies the
gradients as Keras does ("tape"), and the same step with one barrier
(`tf.tuple`) that makes every update wait for every gradient ("barrier").

`--reductions` times, instead, ways to tell whether one gradient is finite,
on a tensor the size of the MLP's 784x256 kernel gradient: each is a
`tf.function`, called in turn, and its figure is the median call time minus
that of a function that does nothing.

Usage:
    python benchmarks/bench_numerics.py [--model mlp|deep|both] [--copies 4]
        [--calls 250] [--jit]
    python benchmarks/bench_numerics.py --reductions [--calls 3000]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_trainop as kt  # noqa: E402

POLICIES = {"no_check": False, "loss": True, "all": "all", "skip": "skip"}
PLAIN = ("tape", "barrier")


class TapeStep(keras.Model):
    """Plain Keras with a train_step of its own; `barrier=True` gates the update."""

    barrier = False

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        if self.barrier:
            grads = tf.tuple(grads)  # no update starts before every gradient exists
        self.optimizer.apply(grads, self.trainable_variables)
        return self.compute_metrics(x, y, y_pred)


class BarrierStep(TapeStep):
    barrier = True


def mlp():
    inputs = keras.Input((784,))
    h = keras.layers.Dense(256, activation="relu")(inputs)
    h = keras.layers.Dense(256, activation="relu")(h)
    return inputs, keras.layers.Dense(10)(h), 128


def deep():
    inputs = keras.Input((16,))
    h = inputs
    for _ in range(99):
        h = keras.layers.Dense(16, activation="tanh")(h)
    return inputs, keras.layers.Dense(10)(h), 64


def build(architecture, policy, jit):
    keras.utils.set_random_seed(0)
    inputs, outputs, batch = architecture()
    options = {}
    if policy in PLAIN:
        model = {"tape": TapeStep, "barrier": BarrierStep}[policy](inputs, outputs)
    else:
        model, options = kt.Model(inputs, outputs), {"check_numerics": policy}
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        **options,
    )
    return model, batch


VARIANTS = {**POLICIES, **{name: name for name in PLAIN}}


def run(name, architecture, args):
    copies = {}  # (variant, copy) -> step function
    for copy in range(args.copies):
        for p, v in VARIANTS.items():
            model, batch = build(architecture, v, args.jit)
            copies[p, copy] = tf.function(model.train_step)
    features = model.input_shape[-1]
    rng = np.random.default_rng(0)
    data = (
        tf.constant(rng.standard_normal((batch, features), dtype=np.float32)),
        tf.constant(rng.integers(0, 10, size=(batch,))),
    )
    keys = list(copies)
    for key in keys:
        for _ in range(3):
            copies[key](data)
    times = {key: [] for key in keys}
    for call in range(args.calls):
        shift = call % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            copies[key](data)
            times[key].append(time.perf_counter() - start)

    def figure(p):
        per_copy = [statistics.median(times[p, c]) for c in range(args.copies)]
        return statistics.mean(per_copy), per_copy

    base, _ = figure("no_check")
    variables = len(model.trainable_variables)
    print(
        f"model={name} ({variables} variables) jit={args.jit} copies={args.copies} "
        f"calls={args.calls}"
    )
    labels = {p: f"check_numerics={POLICIES[p]!r}" for p in POLICIES}
    labels.update(tape="plain Keras, own train_step", barrier="the same with one barrier")
    for p in VARIANTS:
        mean, per_copy = figure(p)
        spread = " ".join(f"{t * 1e3:.2f}" for t in per_copy)
        print(f"  {labels[p]:<30} {mean * 1e3:7.3f} ms/step  ratio {mean / base:.3f}  (copies: {spread})")
    tape, barrier = figure("tape")[0], figure("barrier")[0]
    print(f"  barrier / plain Keras: {barrier / tape:.3f}")


REDUCTIONS = {
    "sum (what the check runs)": lambda t: tf.math.is_finite(tf.reduce_sum(t)),
    "sum of x * 0 (its exact fallback)": lambda t: tf.math.is_finite(tf.reduce_sum(t * 0.0)),
    "reduce_all(is_finite(x))": lambda t: tf.reduce_all(tf.math.is_finite(t)),
    "max of |x|": lambda t: tf.math.is_finite(tf.reduce_max(tf.abs(t))),
    "nothing": lambda t: tf.constant(True),
}


def reductions(calls):
    t = tf.constant(np.random.default_rng(0).standard_normal((784, 256), dtype=np.float32))
    functions = {name: tf.function(f) for name, f in REDUCTIONS.items()}
    times = {name: [] for name in functions}
    for f in functions.values():
        for _ in range(20):
            f(t)
    for _ in range(calls):
        for name, f in functions.items():
            start = time.perf_counter()
            f(t)
            times[name].append(time.perf_counter() - start)
    empty = statistics.median(times["nothing"])
    print(f"is every element of a 784x256 float32 tensor finite? ({calls} calls each)")
    for name in functions:
        if name != "nothing":
            print(f"  {name:<36} {(statistics.median(times[name]) - empty) * 1e6:7.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["mlp", "deep", "both"])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--calls", type=int, default=None, help="default: 250, or 3000 with --reductions")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--reductions", action="store_true")
    args = parser.parse_args()
    if args.reductions:
        reductions(args.calls or 3000)
        return
    args.calls = args.calls or 250
    for name, architecture in (("mlp", mlp), ("deep", deep)):
        if args.model in (name, "both"):
            run(name, architecture, args)


if __name__ == "__main__":
    main()
