"""Per-step cost of each check_numerics policy against no check, in one run.

Models: the core MLP (784-256-256-10, batch 128) and a deep narrow model with
200 small variables (100 Dense(16) layers, batch 64). Each round runs one epoch
of every variant in a rotating order; the statistic is the median per-batch
time; the ratio is against `check_numerics=False` on the same model.

Two more variants measure what any all-or-nothing gradient check must pay,
with no check at all: a plain `keras.Model` whose `train_step` applies the
gradients as Keras does ("tape"), and the same step with one barrier
(`tf.tuple`) that makes every update wait for every gradient ("barrier").

Usage:
    python benchmarks/bench_numerics.py [--model mlp|deep|both] [--rounds 10]
        [--steps 100] [--jit]
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_overhead import BatchTimer  # noqa: E402

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
    models = {p: build(architecture, v, args.jit) for p, v in VARIANTS.items()}
    batch = next(iter(models.values()))[1]
    features = next(iter(models.values()))[0].input_shape[-1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * batch, features), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * batch,))
    timers = {p: BatchTimer() for p in VARIANTS}
    names = list(VARIANTS)
    for p in names:
        models[p][0].fit(x, y, batch_size=batch, epochs=1, verbose=0)
    for r in range(args.rounds):
        for p in names[r % len(names):] + names[: r % len(names)]:
            models[p][0].fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timers[p]])
    base = statistics.median(timers["no_check"].times)
    variables = len(models["no_check"][0].trainable_variables)
    print(f"model={name} ({variables} variables) jit={args.jit} rounds={args.rounds} steps={args.steps}")
    for p in POLICIES:
        med = statistics.median(timers[p].times)
        print(f"  check_numerics={POLICIES[p]!r:<8} {med * 1e3:8.3f} ms/step  ratio {med / base:.3f}")
    tape = statistics.median(timers["tape"].times)
    barrier = statistics.median(timers["barrier"].times)
    print(f"  plain Keras, own train_step  {tape * 1e3:8.3f} ms/step  ratio {tape / base:.3f}")
    print(f"  the same with one barrier    {barrier * 1e3:8.3f} ms/step  ratio {barrier / base:.3f}"
          f"  (barrier / plain: {barrier / tape:.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["mlp", "deep", "both"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jit", action="store_true")
    args = parser.parse_args()
    for name, architecture in (("mlp", mlp), ("deep", deep)):
        if args.model in (name, "both"):
            run(name, architecture, args)


if __name__ == "__main__":
    main()
