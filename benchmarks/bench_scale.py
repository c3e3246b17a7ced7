"""Every option with XLA on and off, and accumulation against one large batch, in one run.

Model: MLP 784-256-256-10, SGD with momentum, synthetic data, on this machine's
CPU. Every round runs one epoch of every variant, in an order that rotates
from round to round, after one warm-up epoch per variant.

Part 1, per-step medians (from `on_train_batch_begin` to `..._end`), batch
128: plain Keras and `kt.Model` with every option that can act under XLA
(clip by global norm after zero_nans, check_numerics="skip", an update op,
variables_to_train, a global step; `summarize_gradients` cannot compile and
tf.gradients' aggregation and gating are left out as they change no value),
each with `jit_compile` False and True. Ratios are to plain Keras in the same
mode, and XLA to no XLA for the same variant.

Part 2, per-epoch medians of the same 128 x steps samples: one update per
batch of 128 against `gradient_accumulation_steps=4` over batches of 32 (the
same updates), both `kt.Model` with the clip, graph mode; and, for the cost
of running 4 small steps at all, the same batches of 32 without accumulation
(4 times the updates).

Usage:
    python benchmarks/bench_scale.py [--rounds 10] [--steps 100]
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
from bench_overhead import BatchTimer  # noqa: E402

BATCH = 128
K = 4


def every_option():
    counter = tf.Variable(0, dtype=tf.int64)
    runs = tf.Variable(0, dtype=tf.int64)
    return dict(
        grad_transforms=[kt.transforms.zero_nans(), kt.transforms.clip_by_global_norm(1.0)],
        check_numerics="skip",
        update_ops=[lambda: runs.assign_add(1)],
        variables_to_train=["dense"],
        global_step=counter,
    )


def clip_only():
    return {"grad_transforms": [kt.transforms.clip_by_global_norm(1.0)]}


# name -> (model class, options factory, jit_compile, batch size)
PART1 = {
    "plain": (keras.Model, dict, False, BATCH),
    "plain_xla": (keras.Model, dict, True, BATCH),
    "all_options": (kt.Model, every_option, False, BATCH),
    "all_options_xla": (kt.Model, every_option, True, BATCH),
}
PART2 = {
    "one_batch_of_128": (kt.Model, clip_only, False, BATCH),
    "accumulate_4_x_32": (kt.Model, lambda: dict(clip_only(), gradient_accumulation_steps=K), False, BATCH // K),
    # The per-step cost of any loop over 4 batches of 32 (4 updates, not 1).
    "no_accumulation_4_x_32": (kt.Model, clip_only, False, BATCH // K),
}


def build(cls, options, jit):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    h = keras.layers.Dense(256, activation="relu", name="dense")(inputs)
    h = keras.layers.Dense(256, activation="relu", name="dense_1")(h)
    outputs = keras.layers.Dense(10, name="dense_2")(h)
    model = cls(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        **options(),
    )
    return model


def run(variants, rounds, x, y):
    """Per-batch times and per-epoch times of each variant, interleaved."""
    names = list(variants)
    models = {n: build(*variants[n][:3]) for n in names}
    batch_times = {n: BatchTimer() for n in names}
    epoch_times = {n: [] for n in names}
    for n in names:  # warm-up: trace and first-run costs
        models[n].fit(x, y, batch_size=variants[n][3], epochs=1, verbose=0)
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            models[n].fit(x, y, batch_size=variants[n][3], epochs=1, verbose=0, callbacks=[batch_times[n]])
            epoch_times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t.times) for n, t in batch_times.items()}, {
        n: statistics.median(t) for n, t in epoch_times.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * BATCH, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * BATCH,))
    print(f"rounds={args.rounds} samples/epoch={len(x)}")

    per_step, _ = run(PART1, args.rounds, x, y)
    print(f"{'part 1 variant':<22}{'median ms/step':>16}{'vs plain, same mode':>22}{'XLA / no XLA':>14}")
    for n in PART1:
        base = per_step["plain_xla" if n.endswith("_xla") else "plain"]
        xla = f"{per_step[n] / per_step[n[:-4]]:.3f}" if n.endswith("_xla") else ""
        print(f"{n:<22}{per_step[n] * 1e3:>16.3f}{per_step[n] / base:>22.3f}{xla:>14}")

    _, per_epoch = run(PART2, args.rounds, x, y)
    updates = args.steps
    base = per_epoch["one_batch_of_128"]
    print(f"{'part 2 variant':<22}{'median ms/update':>18}{'ratio':>8}")
    for n in PART2:
        print(f"{n:<22}{per_epoch[n] / updates * 1e3:>18.3f}{per_epoch[n] / base:>8.3f}")


if __name__ == "__main__":
    main()
