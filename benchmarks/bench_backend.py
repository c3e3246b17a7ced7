"""keras_trainop on Keras's JAX or PyTorch backend against plain Keras on the same backend.

The JAX and PyTorch tables of docs/performance.md: the rows of
`bench_table.py` that these backends have, on the same two models (the MLP
784-256-256-10 and "deep", `Dense(32)` x 100), Adam, batch 128, synthetic
data, with Keras's default compilation on each backend (JAX:
`jit_compile=True`; PyTorch: eager).

Method. JAX dispatches steps asynchronously, so a step's time is not the
time between two callbacks: a copy's figure is the time of one `fit` epoch of
`--steps` steps, ended by reading a weight (which waits for the last step),
divided by the steps; the median over the rounds; a variant's figure is the
mean over its copies. Every round runs every copy of every variant, in an
order that rotates from round to round. A row's ratio is the feature's
figure over its peer's, from the same run.

Last, the same script on the TensorFlow backend (a subprocess, after this
one: not interleaved) times keras_trainop with its default options under
`jit_compile=True`, for the "vs TensorFlow" row.

Usage:
    python benchmarks/bench_backend.py --backend jax|torch [--rounds 8] [--steps 100] [--copies 2]
        [--models mlp,deep]

(About 4 minutes on JAX and 9 on PyTorch on the project's 2-core machine.)
An epoch of 100 steps: with fewer, the fixed cost of a `fit` call (its data
adapter and callbacks) is a visible part of each figure.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":
    _backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "jax"
    os.environ["KERAS_BACKEND"] = "tensorflow" if "--tensorflow" in sys.argv else _backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402
from models import commit, network  # noqa: E402

BATCH = 128
CLIP = 1.0


def adam(**kwargs):
    return keras.optimizers.Adam(1e-3, **kwargs)


class JaxCondStep(keras.Model):
    """Plain Keras on JAX whose update runs in an `ops.cond` on the loss's finiteness (no other check)."""

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y = data
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
        (loss, (unscaled, y_pred, non_trainable, metrics_values)), grads = grad_fn(
            trainable, non_trainable, metrics_values, x, y, None, training=True,
            optimizer_variables=optimizer_values)

        def apply():
            return self.optimizer.stateless_apply(optimizer_values, grads, trainable)

        trainable, optimizer_values = keras.ops.cond(
            keras.ops.isfinite(loss), apply, lambda: (trainable, optimizer_values))
        logs, metrics_values = self._update_metrics_variables(metrics_values, unscaled, x, y, y_pred, None)
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)


class TorchCondStep(keras.Model):
    """Plain Keras on PyTorch that reads the loss's finiteness on the host before it updates (no other check)."""

    def train_step(self, data):
        import torch

        x, y = data
        y_pred = self(x, training=True)
        loss = self.compute_loss(x, y, y_pred)
        self._loss_tracker.update_state(loss, sample_weight=keras.ops.shape(x)[0])  # as Keras's step
        variables = self.trainable_variables
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        if bool(keras.ops.isfinite(loss)):
            with torch.no_grad():
                self.optimizer.apply(grads, variables)
        return self.compute_metrics(x, y, y_pred)


CondStep = {"jax": JaxCondStep, "torch": TorchCondStep}.get(keras.backend.backend())


# name -> (model class: keras_trainop's (True), plain Keras (False) or a class; optimizer
# factory; compile options factory)
VARIANTS = {
    "plain": (False, adam, dict),
    "plain_cond": (CondStep, adam, dict),
    "plain_clip": (False, lambda: adam(global_clipnorm=CLIP), dict),
    "plain_accumulate": (False, lambda: adam(gradient_accumulation_steps=4), dict),
    "keras_skip": (False, lambda: keras.optimizers.LossScaleOptimizer(adam()), dict),
    "kt_default": (True, adam, dict),
    "kt_clip": (True, adam, lambda: dict(grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)])),
    "kt_accumulate": (True, adam, lambda: dict(gradient_accumulation_steps=4)),
    "kt_skip": (True, adam, lambda: dict(check_numerics="skip")),
    "kt_unchecked": (True, adam, lambda: dict(check_numerics=False)),
}

# (what, feature, peer, target)
ROWS = [
    ("default options vs plain keras.Model", "kt_default", "plain", 1.01),
    ("clip_by_global_norm(1.0) vs Adam(global_clipnorm=1.0)", "kt_clip", "plain_clip", 1.00),
    ('check_numerics="skip" vs LossScaleOptimizer(Adam) float32', "kt_skip", "keras_skip", 1.00),
    ("gradient_accumulation_steps=4 vs Adam(gradient_accumulation_steps=4)", "kt_accumulate",
     "plain_accumulate", 1.00),
]
# What a part of a feature costs (no target).
FLOORS = [
    ("check_numerics=False vs plain keras.Model", "kt_unchecked", "plain"),
    ("plain Keras, its update after a check of the loss (JAX: in an ops.cond; PyTorch: read on the host) "
     "vs plain Keras", "plain_cond", "plain"),
]


def build(model_name, variant):
    ours, optimizer, options = VARIANTS[variant]
    cls = ours if isinstance(ours, type) else (kt.Model if ours else keras.Model)
    model = network(model_name, cls)
    model.compile(
        optimizer=optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=keras.backend.backend() != "torch",  # each backend's default
        **options(),
    )
    return model


def epoch_time(model, x, y, steps):
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    keras.ops.convert_to_numpy(model.trainable_variables[0])  # waits for the last step
    return (time.perf_counter() - start) / steps


def measure(model_names, variants, rounds, steps, copies):
    """{(model, variant): seconds per step}."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * BATCH, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(steps * BATCH,))
    runs = [(m, v, c) for m in model_names for v in variants for c in range(copies)]
    models = {run: build(*run[:2]) for run in runs}
    times = {run: [] for run in runs}
    for run in runs:  # warm-up: compilation and first-run costs
        epoch_time(models[run], x, y, steps)
    for r in range(rounds):
        shift = r * len(runs) // rounds
        for run in runs[shift:] + runs[:shift]:
            times[run].append(epoch_time(models[run], x, y, steps))
    return {
        (m, v): statistics.mean(statistics.median(times[(m, v, c)]) for c in range(copies))
        for m in model_names for v in variants
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "torch"], default="jax")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--models", default="mlp,deep")
    parser.add_argument("--tensorflow", action="store_true",
                        help="(internal) time kt_default on TensorFlow and print its ms per step")
    args = parser.parse_args()
    model_names = args.models.split(",")
    if args.tensorflow:
        figures = measure(model_names, ["kt_default"], args.rounds, args.steps, args.copies)
        print(" ".join(f"{figures[(m, 'kt_default')]!r}" for m in model_names))
        return
    variants = [v for v in VARIANTS if any(v in row[1:3] for row in ROWS + FLOORS)]
    figures = measure(model_names, variants, args.rounds, args.steps, args.copies)
    tensorflow = subprocess.run(
        [sys.executable, __file__, "--tensorflow", "--backend", args.backend, "--rounds", str(args.rounds), "--steps",
         str(args.steps), "--copies", str(args.copies), "--models", args.models],
        env=dict(os.environ, KERAS_BACKEND="tensorflow"), capture_output=True, text=True, check=True,
    ).stdout.split()

    print(f"commit {commit()}; keras {keras.__version__} on {keras.backend.backend()}; "
          f"rounds={args.rounds} steps={args.steps} copies={args.copies}")
    print("| what | " + " | ".join(model_names) + " | target |")
    print("|" + "---|" * (len(model_names) + 2))
    for what, feature, peer, target in ROWS:
        cells = " | ".join(f"{figures[(m, feature)] / figures[(m, peer)]:.3f}" for m in model_names)
        print(f"| {what} | {cells} | <= {target:.2f} |")
    for what, feature, peer in FLOORS:
        cells = " | ".join(f"{figures[(m, feature)] / figures[(m, peer)]:.3f}" for m in model_names)
        print(f"| (part) {what} | {cells} | - |")
    cells = " | ".join(f"{figures[(m, 'kt_default')] / float(t):.3f}" for m, t in zip(model_names, tensorflow))
    print(f"| keras_trainop default, {keras.backend.backend()} vs TensorFlow (TensorFlow jit_compile=True; "
          f"not interleaved) | {cells} | - |")
    print()
    print("ms per step:", ", ".join(f"{m}/{v} {figures[(m, v)] * 1e3:.2f}" for m in model_names for v in variants),
          ", ".join(f"{m}/kt_default on tensorflow {float(t) * 1e3:.2f}" for m, t in zip(model_names, tensorflow)))


if __name__ == "__main__":
    main()
