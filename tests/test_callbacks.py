"""GradientTensorBoard: exact tags and steps in every mode, read back with TensorBoard's reader."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, SubclassedMLP, mlp, mode_kwargs, regression_data
from tensorboard.backend.event_processing import event_accumulator

import keras_trainop as kt

BATCH = 16
PATHS = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]


def read(logdir):
    acc = event_accumulator.EventAccumulator(
        os.path.join(logdir, "train"),
        size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE},
    )
    acc.Reload()
    return acc


def values(acc, tag):
    return [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]


def compiled(mode, steps_per_execution=1, **options):
    model = mlp(kt.Model)
    model.compile(
        keras.optimizers.Adam(0.01),
        "mse",
        steps_per_execution=steps_per_execution,
        **mode_kwargs(mode),
        **options,
    )
    return model


def fit(model, x, y, callbacks, epochs=1, **kwargs):
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks, **kwargs
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("transforms", [False, True])
def test_exact_tags_and_steps(mode, steps_per_execution, transforms, tmp_path):
    x, y = regression_data(n=160)  # 10 steps an epoch
    options = {"grad_transforms": [kt.clip_gradient_norms_fn(0.1)]} if transforms else {}
    model = compiled(mode, steps_per_execution, **options)
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=3)], epochs=2)
    acc = read(str(tmp_path))
    expected = {f"{p}/gradient" for p in PATHS} | {f"{p}/gradient_norm" for p in PATHS}
    expected.add("global_norm/gradient_norm")
    if transforms:
        expected.add("global_norm/clipped_gradient_norm")
    assert set(acc.Tags()["tensors"]) == expected
    for tag in expected:
        assert [e.step for e in acc.Tensors(tag)] == [3, 6, 9, 12, 15, 18], tag


def numpy_buckets(grad, buckets=30):
    """The same rule as keras_trainop's histogram, in NumPy (float32)."""
    flat = grad.astype(np.float32).ravel()
    low, high = flat.min(), flat.max()
    if low == high:  # documented: one value spans [value - 0.5, value + 0.5]
        low, high = low - np.float32(0.5), high + np.float32(0.5)
    width = (high - low) / np.float32(buckets)
    index = np.clip(np.floor((flat - low) / width).astype(int), 0, buckets - 1)
    return low, high, np.bincount(index, minlength=buckets)


@pytest.mark.parametrize("mode", MODES)
def test_histograms_and_norms_match_tape_gradients(mode, tmp_path):
    x, y = regression_data()
    model = compiled(mode)
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=2)])
    # Oracle: the gradients of step 2 from a GradientTape, after one Adam step.
    oracle = mlp(keras.Model)
    oracle.compile(keras.optimizers.Adam(0.01), "mse")
    oracle.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0, shuffle=False)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[BATCH : 2 * BATCH], oracle(x[BATCH : 2 * BATCH]))
    grads = dict(zip([v.path for v in oracle.trainable_variables], tape.gradient(loss, oracle.trainable_variables)))
    acc = read(str(tmp_path))
    for path in PATHS:
        grad = grads[path].numpy()
        (step, norm), _ = values(acc, f"{path}/gradient_norm")
        assert step == 2
        np.testing.assert_allclose(norm, np.linalg.norm(grad), rtol=1e-5)
        (step, histogram), _ = values(acc, f"{path}/gradient")
        assert step == 2 and histogram.shape == (30, 3)
        assert histogram[:, 2].sum() == grad.size
        low, high, counts = numpy_buckets(grad)
        np.testing.assert_allclose([histogram[0, 0], histogram[-1, 1]], [low, high], rtol=1e-5)
        # Floor at a bucket edge may fall either side by float rounding.
        assert np.abs(histogram[:, 2] - counts).sum() <= 2
    (_, total), _ = values(acc, "global_norm/gradient_norm")
    np.testing.assert_allclose(total, np.sqrt(sum((g.numpy() ** 2).sum() for g in grads.values())), rtol=1e-5)


def test_a_second_fit_goes_on_at_the_right_steps(tmp_path):
    x, y = regression_data(n=160)
    model = compiled("graph")
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=4)])
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=4)])
    fit(model, x, y, [])  # without the callback: the plain step, no stale writer
    acc = read(str(tmp_path))
    assert [e.step for e in acc.Tensors("out/kernel/gradient")] == [4, 8, 12, 16, 20]
    assert int(model.optimizer.iterations) == 30


@pytest.mark.parametrize("mode", MODES)
def test_a_fit_that_raises_detaches_the_callback(mode, tmp_path):
    # fit() skips on_train_end when a step raises; the callback detaches itself.
    x, y = regression_data(n=160)
    bad_y = y.copy()
    bad_y[5 * BATCH + 1] = np.nan  # step 6 raises
    model = compiled(mode)
    with pytest.raises(kt.NonFiniteError, match="at step 6"):
        fit(model, x, bad_y, [kt.GradientTensorBoard(tmp_path / "first", update_freq=2)])
    fit(model, x, y, [])  # no callback: nothing more may reach the first log dir
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path / "second", update_freq=5)])
    first, second = read(str(tmp_path / "first")), read(str(tmp_path / "second"))
    assert [e.step for e in first.Tensors("out/kernel/gradient")] == [2, 4]
    assert [e.step for e in second.Tensors("out/kernel/gradient")] == [20, 25]  # updates 16..25
    assert int(model.optimizer.iterations) == 5 + 10 + 10


def test_non_recording_calls_run_the_plain_trace(tmp_path):
    x, y = regression_data(n=160)
    model = compiled("graph")
    callback = kt.GradientTensorBoard(tmp_path, update_freq=5)
    calls = {"plain": 0, "recording": 0}

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # Runs after GradientTensorBoard.on_train_begin: wrap the two traces
            # the model's hosted train function now picks from.
            hosted = model.train_function
            (plain_names, plain), (recording_names, recording) = hosted.traces

            def counting(name, function):
                def call(iterator):
                    calls[name] += 1
                    return function(iterator)
                return call

            hosted.traces = [(plain_names, counting("plain", plain)),
                             (recording_names, counting("recording", recording))]

    fit(model, x, y, [callback, Spy()], epochs=2)
    assert calls == {"plain": 16, "recording": 4}  # steps 5, 10, 15, 20 record


def test_grad_norm_is_not_in_the_logs_of_a_later_fit_without_metrics(tmp_path):
    x, y = regression_data()
    model = compiled("graph")
    first = fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1, metrics=True)])
    assert set(first.history) == {"loss", "grad_norm"}
    assert set(fit(model, x, y, []).history) == {"loss"}
    assert set(fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1)]).history) == {"loss"}
    again = fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1, metrics=True)])
    assert set(again.history) == {"loss", "grad_norm"} and again.history["grad_norm"][0] > 0


@pytest.mark.parametrize("mode", MODES)
def test_metrics_in_logs_are_the_mean_of_the_step_norms(mode, tmp_path):
    x, y = regression_data()
    model = compiled(mode, grad_transforms=[kt.clip_gradient_norms_fn(0.1)])
    history = fit(
        model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1, metrics=True)],
        validation_data=(x, y),
    )
    assert {"grad_norm", "clipped_grad_norm", "loss", "val_loss"} == set(history.history)
    acc = read(str(tmp_path))
    before = [v for _, v in values(acc, "global_norm/gradient_norm")]
    after = [v for _, v in values(acc, "global_norm/clipped_gradient_norm")]
    np.testing.assert_allclose(history.history["grad_norm"], [np.mean(before)], rtol=1e-5)
    np.testing.assert_allclose(history.history["clipped_grad_norm"], [np.mean(after)], rtol=1e-5)
    assert max(after) <= 0.2 + 1e-6  # 4 tensors clipped to 0.1 each


@pytest.mark.parametrize("mode", MODES)
def test_indexed_slices_gradients(mode, tmp_path):
    keras.utils.set_random_seed(0)
    model = kt.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(50, 4, name="emb"),
                           keras.layers.Flatten(), keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.1), "mse", **mode_kwargs(mode))
    x = np.random.RandomState(0).randint(0, 50, size=(32, 3)).astype("int32")
    y = np.ones((32, 1), "float32")
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1)])
    acc = read(str(tmp_path))
    [tag] = [t for t in acc.Tags()["tensors"] if t.endswith("embeddings/gradient")]
    assert tag == f"{model.get_layer('emb').embeddings.path}/gradient"
    (step, histogram), _ = values(acc, tag)
    assert step == 1
    assert histogram[:, 2].sum() == BATCH * 3 * 4  # the IndexedSlices values: rows x dim


def all_records(acc):
    return {tag: [(e.step, tf.make_ndarray(e.tensor_proto).tolist()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


@pytest.mark.parametrize("mode", MODES)
def test_a_skipped_step_is_not_recorded(mode, tmp_path):
    # Oracle: the same run without the bad batch: the same records at the same steps.
    x, y = regression_data()
    bad_y = y.copy()
    bad_y[2 * BATCH + 1] = np.nan  # the third batch is skipped
    keep = np.r_[0 : 2 * BATCH, 3 * BATCH : 4 * BATCH]
    histories = []
    for name, (xs, ys) in {"skip": (x, bad_y), "clean": (x[keep], y[keep])}.items():
        model = compiled(mode, check_numerics="skip")
        callback = kt.GradientTensorBoard(tmp_path / name, update_freq=1, metrics=True)
        histories.append(fit(model, xs, ys, [callback]).history)
    skipped, clean = all_records(read(str(tmp_path / "skip"))), all_records(read(str(tmp_path / "clean")))
    assert [step for step, _ in skipped["global_norm/gradient_norm"]] == [1, 2, 3]
    # The same records but the skip count, which counts the bad batch in the skip run only.
    assert skipped.pop("skipped_steps/total") == [(1, 0.0), (2, 0.0), (3, 1.0)]
    assert clean.pop("skipped_steps/total") == [(1, 0.0), (2, 0.0), (3, 0.0)]
    assert skipped == clean
    assert histories[0]["skipped_steps"] == [1.0]
    np.testing.assert_allclose(histories[0]["grad_norm"], histories[1]["grad_norm"], rtol=1e-6)


def test_non_finite_gradients_are_left_out_of_histograms(tmp_path):
    x, y = regression_data()
    y = y.copy()
    y[3] = np.nan
    model = compiled("graph", check_numerics=False)
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=1)])
    acc = read(str(tmp_path))
    (step, histogram), *_ = values(acc, "out/bias/gradient")
    assert step == 1 and histogram[:, 2].sum() == 0  # the only element is nan
    (_, norm), *_ = values(acc, "out/bias/gradient_norm")
    assert np.isnan(norm)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"log_dir": ""}, "log_dir"),
        ({"log_dir": None}, "log_dir"),
        ({"update_freq": 0}, "update_freq"),
        ({"update_freq": 1.5}, "update_freq"),
        ({"update_freq": True}, "update_freq"),
        ({"update_freq": "epoch"}, "update_freq"),
        ({"histograms": "yes"}, "histograms"),
        ({"metrics": 1}, "metrics"),
        ({"histograms": False, "norms": False}, "histograms"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received: .*{name}="):
        kt.GradientTensorBoard(**kwargs)


def test_a_plain_keras_model_is_refused(tmp_path):
    x, y = regression_data()
    model = mlp(keras.Model)
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="needs a keras_trainop model"):
        fit(model, x, y, [kt.GradientTensorBoard(tmp_path)])


@pytest.mark.slow
def test_a_tensorboard_server_serves_the_gradient_histogram(tmp_path):
    x, y = regression_data()
    model = compiled("graph")
    fit(model, x, y, [kt.GradientTensorBoard(tmp_path, update_freq=2)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    query = urllib.parse.urlencode({"run": "train", "tag": "out/kernel/gradient"})
    url = f"http://127.0.0.1:{port}/data/plugin/histograms/histograms?{query}"
    try:
        deadline, data = time.monotonic() + 90, None
        while time.monotonic() < deadline and data is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.loads(response.read())
            except (OSError, ValueError):
                time.sleep(1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    assert data is not None, "tensorboard did not answer in 90 s"
    # [wall_time, step, [[left, right, count], ...]] per record.
    assert [record[1] for record in data] == [2, 4]
    assert sum(bucket[2] for bucket in data[0][2]) == 8  # out/kernel: 8 x 1


class BuiltNet(kt.Model, SubclassedMLP):
    pass


def test_a_subclassed_model_built_before_compile_logs_grad_norm_and_skips(tmp_path):
    # A built Keras layer takes no new tracked state: before the fix, compile(
    # check_numerics="skip") and metrics=True failed on such a model.
    x, y = regression_data()
    bad_y = y.copy()
    bad_y[1] = np.nan  # the first batch
    model = BuiltNet()
    model(x[:1])
    model.compile(keras.optimizers.SGD(0.01), "mse", check_numerics="skip")
    history = fit(model, x, bad_y, [kt.GradientTensorBoard(tmp_path, update_freq=1, metrics=True)])
    assert history.history["skipped_steps"] == [1.0]
    # Oracle: the logged mean equals the mean of the written step norms.
    written = [v for _, v in values(read(str(tmp_path)), "global_norm/gradient_norm")]
    assert len(written) == len(x) // BATCH - 1
    np.testing.assert_allclose(history.history["grad_norm"], [np.mean(written)], rtol=1e-5)
