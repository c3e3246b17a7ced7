"""An interrupted run resumes exactly: BackupAndRestore and ModelCheckpoint.

Oracle: the same run, uninterrupted. Compared: weights, optimizer state, the
transforms' state, the gradient sums, the skip counters and the global step.
"""

import keras
import numpy as np
import pytest
from conftest import MODES, max_abs_diff, mlp, mode_kwargs, regression_data

import keras_trainop as kt

T = kt.transforms
BATCH = 8
EPOCHS = 3
INTERRUPTED_EPOCH, INTERRUPTED_BATCH = 2, 3


def data():
    x, y = regression_data()
    y = y.copy()
    y[2 * BATCH + 1] = np.nan  # one skipped step per epoch
    return x, y


def compiled(mode):
    model = mlp(kt.Model)
    model.compile(
        keras.optimizers.Adam(0.01),
        "mse",
        grad_transforms=[T.adaptive_clip_by_global_norm(), T.add_noise(0.01, seed=3), T.clip_by_global_norm(1.0)],
        check_numerics=kt.SkipNonFinite(max_consecutive=4),
        global_step=keras.Variable(0, dtype="int64", trainable=False, name="global_step"),
        gradient_accumulation_steps=2,
        **mode_kwargs(mode),
    )
    return model


def state(model):
    """Everything a resumed run must restore, by name."""
    pipeline = model.train_pipeline
    return {
        "weights": [v.numpy() for v in model.trainable_weights],
        "optimizer": [v.numpy() for v in model.optimizer.variables],
        "transforms": [v.numpy() for v in pipeline.transform_variables()],
        "sums": [v.numpy() for v in pipeline.accumulator_variables()],
        "skip counters": [pipeline.failures.skipped_total.numpy(), pipeline.failures.consecutive.numpy()],
        "global step": [model.train_options.global_step.numpy()],
    }


def assert_same_state(ours, reference):
    ours, reference = state(ours), state(reference)
    for name in reference:
        assert max_abs_diff(ours[name], reference[name]) == 0, name


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == INTERRUPTED_EPOCH and batch == INTERRUPTED_BATCH:
            raise KeyboardInterrupt("interrupted")


def fit(model, callbacks=(), **kwargs):
    x, y = data()
    return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=list(callbacks), **kwargs)


@pytest.fixture
def uninterrupted(request):
    model = compiled(request.getfixturevalue("mode"))
    fit(model)
    # The run did skip, accumulate and count: the state compared is not trivial.
    counters = state(model)["skip counters"]
    assert counters[0] == EPOCHS and model.train_options.global_step.numpy() > 0
    return model


@pytest.mark.parametrize("mode", MODES)
def test_backup_and_restore_resumes_exactly(mode, uninterrupted, tmp_path):
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        fit(compiled(mode), [keras.callbacks.BackupAndRestore(backup), Interrupt()])
    # A new process would build and compile a new model: so does this test.
    resumed = compiled(mode)
    history = fit(resumed, [keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == EPOCHS - INTERRUPTED_EPOCH
    assert_same_state(resumed, uninterrupted)


@pytest.mark.parametrize("mode", MODES)
def test_model_checkpoint_keras_file_resumes_exactly(mode, uninterrupted, tmp_path):
    path = str(tmp_path / "last.keras")
    with pytest.raises(KeyboardInterrupt):
        fit(compiled(mode), [keras.callbacks.ModelCheckpoint(path), Interrupt()])
    resumed = keras.saving.load_model(path)
    assert isinstance(resumed.train_options.check_numerics, kt.SkipNonFinite)
    # A keras.Variable global step is one of the weights: the loaded model has
    # a new one, with the saved value.
    assert isinstance(resumed.train_options.global_step, keras.Variable)
    fit(resumed, initial_epoch=INTERRUPTED_EPOCH)
    assert_same_state(resumed, uninterrupted)


@pytest.mark.parametrize("mode", MODES)
def test_model_checkpoint_weights_resume_exactly(mode, uninterrupted, tmp_path):
    path = str(tmp_path / "last.weights.h5")
    with pytest.raises(KeyboardInterrupt):
        fit(compiled(mode), [keras.callbacks.ModelCheckpoint(path, save_weights_only=True), Interrupt()])
    resumed = compiled(mode)
    resumed.load_weights(path)
    fit(resumed, initial_epoch=INTERRUPTED_EPOCH)
    assert_same_state(resumed, uninterrupted)
