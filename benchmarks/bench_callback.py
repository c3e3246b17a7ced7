"""Cost of GradientTensorBoard against the same model without it, in one run.

Model: the core MLP (784-256-256-10, batch 128, Adam), graph mode. Variants:
the kt.Model without the callback, and with GradientTensorBoard(update_freq).
Non-recording steps: ratio of per-batch medians (the median step does not
record). Amortised: ratio of per-batch means, recording steps included.

Usage:
    python benchmarks/bench_callback.py [--rounds 10] [--steps 200] [--update-freq 100]
"""

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_overhead import BatchTimer, build  # noqa: E402

import keras_trainop as kt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--update-freq", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.steps * 128, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(args.steps * 128,))
    logdir = tempfile.mkdtemp(prefix="bench_callback_")
    models = {"without": build(kt.Model, {}, jit=False), "with_callback": build(kt.Model, {}, jit=False)}
    timers = {n: BatchTimer() for n in models}

    def callbacks(name):
        extra = [kt.GradientTensorBoard(logdir, update_freq=args.update_freq)] if name == "with_callback" else []
        return extra + [timers[name]]

    names = list(models)
    for n in names:
        models[n].fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks(n)[:-1])
    for r in range(args.rounds):
        for n in names[r % 2:] + names[: r % 2]:
            models[n].fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks(n))
    base_median = statistics.median(timers["without"].times)
    base_mean = statistics.mean(timers["without"].times)
    print(f"rounds={args.rounds} steps/round={args.steps} update_freq={args.update_freq}")
    for n in names:
        med, mean = statistics.median(timers[n].times), statistics.mean(timers[n].times)
        print(
            f"{n:<14} median {med * 1e3:7.3f} ms (ratio {med / base_median:.3f})   "
            f"mean {mean * 1e3:7.3f} ms (ratio {mean / base_mean:.3f})"
        )


if __name__ == "__main__":
    main()
