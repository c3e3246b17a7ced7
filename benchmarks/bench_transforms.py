"""Per-step cost of `kt.transforms.clip_by_global_norm` against Keras's own
`SGD(global_clipnorm=)`, in one run.

Model: MLP 784-256-256-10, batch 128, SGD(0.01), synthetic data, graph mode
(the Keras default on CPU), as in `bench_overhead.py`. Every round runs one
epoch of every variant, in an order that rotates from round to round; the
statistic is the median of the per-batch times over all rounds, after one
warm-up epoch per variant; the ratio is each variant's median over plain
Keras's (`keras_global_clipnorm`).

Usage:
    python benchmarks/bench_transforms.py [--rounds 12] [--steps 150] [--jit]
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_overhead import BatchTimer  # noqa: E402

import keras_trainop as kt  # noqa: E402

CLIP = 1.0  # binds: the global gradient norm of this MLP is about 2 to 3
# name -> (model class, optimizer keyword arguments, keras_trainop compile options)
VARIANTS = {
    "keras_global_clipnorm": (keras.Model, {"global_clipnorm": CLIP}, None),
    "kt_clip_by_global_norm": (
        kt.Model, {}, {"grad_transforms": [kt.transforms.clip_by_global_norm(CLIP)]}),
    "kt_clip_no_check": (
        kt.Model, {},
        {"grad_transforms": [kt.transforms.clip_by_global_norm(CLIP)], "check_numerics": False}),
}


def build(cls, optimizer_kwargs, options, jit):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    h = keras.layers.Dense(256, activation="relu")(inputs)
    h = keras.layers.Dense(256, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    model = cls(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, **optimizer_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        **(options or {}),
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for all")
    args = parser.parse_args()
    names = list(VARIANTS)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * 128, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * 128,))
    models = {n: build(*VARIANTS[n], jit=args.jit) for n in names}
    timers = {n: BatchTimer() for n in names}
    for n in names:  # warm-up: trace and first-run costs
        models[n].fit(x, y, batch_size=128, epochs=1, verbose=0)
    # Same data, seed and clip: after the warm-up epoch the weights must agree
    # up to float rounding (which SGD amplifies over the epoch), or the timing
    # would compare different computations.
    reference = models["keras_global_clipnorm"].get_weights()
    diffs = {}
    for n in names:
        diffs[n] = max(float(np.max(np.abs(a - b))) for a, b in zip(models[n].get_weights(), reference))
        assert diffs[n] < 1e-3, f"{n} trained to other weights (max diff {diffs[n]})"
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            models[n].fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=[timers[n]])

    base = statistics.median(timers["keras_global_clipnorm"].times)
    print(f"rounds={args.rounds} steps/round={args.steps} jit={args.jit}")
    print(f"{'variant':<26}{'median ms/step':>16}{'ratio':>8}{'weight diff':>14}")
    for n in names:
        med = statistics.median(timers[n].times)
        print(f"{n:<26}{med * 1e3:>16.3f}{med / base:>8.3f}{diffs[n]:>14.1e}")


if __name__ == "__main__":
    main()
