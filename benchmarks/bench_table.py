"""keras_trainop against the peer a user would pick instead: the speed table of docs/performance.md.

Each row times a keras_trainop feature and its peer in the same run, on two
models: the MLP 784-256-256-10 and "200 vars", `Dense(32)` x 100 (202
variables, where per-op overhead dominates). Adam, batch 128, synthetic data.

Method. Every model is built `--copies` times (two copies of one model can
differ by a few percent in speed, steadily). A round runs one epoch of
`--steps` steps of every copy of every variant, in an order that rotates from
round to round, so that drift of a shared machine hits all alike. A copy's
figure is the median of its per-batch times (`on_train_batch_begin` to
`on_train_batch_end`) over all rounds, after one warm-up epoch; a variant's is
the mean over its copies; a row's ratio is the feature's figure over its
peer's.

Usage:
    python benchmarks/bench_table.py [--rounds 10] [--steps 40] [--copies 2]
        [--models mlp,deep] [--rows 1,3] [--jit-auto]

`--jit-auto` compiles every variant with `jit_compile="auto"` (on a GPU, Keras
then turns XLA on by itself) instead of each row's own setting.
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_trainop as kt  # noqa: E402
from models import commit, network  # noqa: E402
from bench_overhead import BatchTimer  # noqa: E402

BATCH = 128
CLIP = 1.0


def adam(**kwargs):
    return keras.optimizers.Adam(1e-3, **kwargs)


def every_option():
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    runs = tf.Variable(0, dtype=tf.int64, trainable=False)
    return dict(
        grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)],
        check_numerics="skip",
        update_ops=[lambda: runs.assign_add(1)],
        global_step=counter,
    )


class CondStep(keras.Model):
    """Plain Keras whose update runs in a `tf.cond` on the loss's finiteness (no other check)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)

        def apply():
            self.optimizer.apply(grads, self.trainable_variables)
            return tf.constant(True)

        tf.cond(tf.math.is_finite(loss), apply, lambda: tf.constant(False))
        return {"loss": loss}


# name -> (model class, optimizer factory, compile options factory, jit_compile)
VARIANTS = {
    "plain": (False, adam, dict, False),
    "plain_cond": (CondStep, adam, dict, False),
    "plain_clip_jit": (False, lambda: adam(global_clipnorm=CLIP), dict, True),
    "plain_cond_clip_jit": (CondStep, lambda: adam(global_clipnorm=CLIP), dict, True),
    "plain_accumulate": (False, lambda: adam(gradient_accumulation_steps=4), dict, False),
    "plain_clip": (False, lambda: adam(global_clipnorm=CLIP), dict, False),
    "plain_jit": (False, adam, dict, True),
    "keras_skip": (False, lambda: keras.optimizers.LossScaleOptimizer(adam()), dict, False),
    "kt_default": (True, adam, dict, False),
    "kt_accumulate": (True, adam, lambda: dict(gradient_accumulation_steps=4), False),
    "kt_clip": (True, adam, lambda: dict(grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)]), False),
    "kt_every": (True, adam, every_option, False),
    "kt_every_jit": (True, adam, every_option, True),
    "kt_clip_unchecked_jit": (True, adam, lambda: dict(
        check_numerics=False, grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)]), True),
    "kt_skip": (True, adam, lambda: dict(check_numerics="skip"), False),
    "kt_all": (True, adam, lambda: dict(check_numerics="all"), False),
}

# (what, feature, peer, target)
ROWS = [
    ("gradient_accumulation_steps=4, per micro-batch", "kt_accumulate", "plain_accumulate", 1.00),
    ("clip_by_global_norm(1.0) vs Adam(global_clipnorm=1.0)", "kt_clip", "plain_clip", 1.00),
    ("every option, jit_compile=True vs plain Keras jit", "kt_every_jit", "plain_jit", 1.05),
    ("every option, XLA vs the same without XLA", "kt_every_jit", "kt_every", 0.90),
    ('check_numerics="skip" vs LossScaleOptimizer(Adam) float32', "kt_skip", "keras_skip", 0.95),
    ('check_numerics="all" vs LossScaleOptimizer(Adam) float32', "kt_all", "keras_skip", 0.95),
    ("default options vs plain keras.Model", "kt_default", "plain", 1.01),
]

# Floors: what plain Keras itself pays for a part of a feature (no target).
FLOORS = [
    ("plain Keras, its update in a tf.cond vs plain Keras", "plain_cond", "plain"),
    ("plain Keras, Adam(global_clipnorm) jit vs plain Keras jit", "plain_clip_jit", "plain_jit"),
    ("clip_by_global_norm, check_numerics=False, jit vs Adam(global_clipnorm) jit",
     "kt_clip_unchecked_jit", "plain_clip_jit"),
    ("plain Keras, Adam(global_clipnorm), its update in a tf.cond, jit vs plain Keras jit",
     "plain_cond_clip_jit", "plain_jit"),
]


def build(model_name, variant, jit_auto):
    ours, optimizer, options, jit = VARIANTS[variant]
    cls = ours if isinstance(ours, type) else (kt.Model if ours else keras.Model)
    model = network(model_name, cls)
    model.compile(
        optimizer=optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile="auto" if jit_auto else jit,
        **options(),
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--models", default="mlp,deep")
    parser.add_argument("--jit-auto", action="store_true")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (1-based) to time")
    args = parser.parse_args()
    model_names = args.models.split(",")
    rows = ROWS if args.rows is None else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    floors = FLOORS if args.rows is None else []
    variants = [v for v in VARIANTS if any(v in (row[1], row[2]) for row in rows + floors)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * BATCH, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * BATCH,))

    runs = [(m, v, c) for m in model_names for v in variants for c in range(args.copies)]
    models = {run: build(run[0], run[1], args.jit_auto) for run in runs}
    timers = {run: BatchTimer() for run in runs}
    for run in runs:  # warm-up: tracing and first-run costs
        models[run].fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for r in range(args.rounds):
        shift = r * len(runs) // args.rounds
        for run in runs[shift:] + runs[:shift]:
            models[run].fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[timers[run]])

    def figure(model_name, variant):
        return statistics.mean(
            statistics.median(timers[(model_name, variant, c)].times) for c in range(args.copies)
        )

    print(f"commit {commit()}; rounds={args.rounds} steps={args.steps} copies={args.copies} "
          f"jit_auto={args.jit_auto}; devices: {[d.device_type for d in tf.config.list_logical_devices()]}")
    header = "| what | " + " | ".join(model_names) + " | target |"
    print(header)
    print("|" + "---|" * (len(model_names) + 2))
    for what, feature, peer, target in rows:
        ratios = [figure(m, feature) / figure(m, peer) for m in model_names]
        cells = " | ".join(f"{r:.3f}" for r in ratios)
        print(f"| {what} | {cells} | <= {target:.2f} |")
    for what, feature, peer in floors:
        ratios = [figure(m, feature) / figure(m, peer) for m in model_names]
        print(f"| (floor) {what} | " + " | ".join(f"{r:.3f}" for r in ratios) + " | - |")
    print()
    print("ms per step:", ", ".join(
        f"{m}/{v} {figure(m, v) * 1e3:.2f}" for m in model_names for v in variants))


if __name__ == "__main__":
    main()
