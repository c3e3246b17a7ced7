"""A long run: 20,000 steps with every transform and the callback.

Asserts: resident memory grows by less than 50 MB after warm-up, the train
step is traced a bounded number of times (counted per epoch: 3, all in the first),
and no event file is left open when `fit` returns.
"""

import os

import keras
import pytest
import tensorflow as tf
from test_transforms_model import embedding_model, every_builtin, token_data

import keras_trainop as kt

STEPS_PER_EPOCH = 2000
EPOCHS = 10  # 20,000 steps
BATCH = 8

pytestmark = pytest.mark.slow


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_files_under(directory):
    directory = os.path.realpath(directory)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory):
            found.append(target)
    return found


class Counted(kt.Model):
    traces = 0

    def train_step(self, data):
        # Python code of a traced step runs once per trace.
        type(self).traces += 1
        return super().train_step(data)


class Memory(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.per_epoch = []
        self.traces = []

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(resident_mb())
        self.traces.append(Counted.traces)


def test_twenty_thousand_steps_do_not_grow_or_retrace(tmp_path):
    x, y = token_data(n=256)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model = embedding_model(Counted)
    model.compile(keras.optimizers.SGD(0.01), "mse", grad_transforms=[every_builtin()])
    memory = Memory()
    logdir = tmp_path / "logs"
    model.fit(
        dataset, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, verbose=0, shuffle=False,
        callbacks=[kt.GradientTensorBoard(str(logdir), update_freq=100, metrics=True), memory],
    )
    assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * EPOCHS
    # The callback runs a plain and a recording step; the recording one is
    # traced twice on its first call, which creates its variables (as
    # tf.function does). All of it in the first epoch, none later.
    assert memory.traces == [3] * EPOCHS, memory.traces
    growth = memory.per_epoch[-1] - memory.per_epoch[1]  # after two epochs of warm-up
    assert growth < 50, f"resident memory grew by {growth:.1f} MB: {memory.per_epoch}"
    assert open_files_under(tmp_path) == []
    # And every record was written: 200 steps, one scalar each.
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    steps = [e.step for e in acc.Tensors("global_norm/gradient_norm")]
    assert steps == list(range(100, STEPS_PER_EPOCH * EPOCHS + 1, 100))
