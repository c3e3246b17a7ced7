import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, mlp, mode_kwargs, regression_data
from tensorboard.backend.event_processing import event_accumulator

import keras_trainop as kt
from keras_trainop import report

BATCH = 16
BAD_BATCH = 2  # the third batch of every epoch has a NaN target: skipped
EPOCHS = 3
CLIP = 0.1
TAB_BLUE, TAB_RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)


def read(logdir):
    acc = event_accumulator.EventAccumulator(os.path.join(logdir, "train"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def values(acc, tag):
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def train(logdir, mode="graph", epochs=EPOCHS):
    """4 batches an epoch, the third skipped: returns the number of skipped batches."""
    x, y = regression_data(n=4 * BATCH)
    y = y.copy()
    y[BAD_BATCH * BATCH + 1] = np.nan
    model = mlp(kt.Model)
    model.compile(
        keras.optimizers.Adam(0.01),
        "mse",
        grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)],
        check_numerics="skip",
        **mode_kwargs(mode),
    )
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[kt.GradientTensorBoard(logdir, update_freq=1)])
    assert int(model.train_pipeline.failures.skipped_total.numpy()) == epochs
    return epochs


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    keras.backend.clear_session()
    path = str(tmp_path_factory.mktemp("logs"))
    train(path)
    return path


def expected_skipped_totals(epochs):
    """The count of skipped batches before each applied one, in batch order."""
    totals, skipped = [], 0
    for _ in range(epochs):
        for batch in range(4):
            if batch == BAD_BATCH:
                skipped += 1
            else:
                totals.append(skipped)
    return totals


def image(path):
    from matplotlib.image import imread

    assert os.path.isfile(path)
    return imread(path)  # float RGBA in [0, 1], shape (height, width, 4)


def assert_not_blank(pixels):
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint8)
    assert rgb.std() > 0
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) >= 8
    third = rgb.shape[0] // 3

    def has(colour, rows):
        return np.any(np.all(np.abs(rows.astype(int) - colour) <= 8, axis=-1))

    # The global norm (first curve, tab:blue) at the top, the skip count (red) at the bottom.
    assert has(TAB_BLUE, rgb[:third])
    assert has(TAB_RED, rgb[2 * third :])


@pytest.mark.parametrize("mode", MODES)
def test_the_skip_count_is_recorded_at_every_record(mode, tmp_path):
    epochs = 2
    train(str(tmp_path), mode, epochs=epochs)
    acc = read(str(tmp_path))
    steps = [step for step, _ in values(acc, "global_norm/gradient_norm")]
    assert steps == list(range(1, 3 * epochs + 1))
    assert values(acc, "skipped_steps/total") == list(zip(steps, map(float, expected_skipped_totals(epochs))))


def test_render_plots_what_the_events_hold(logdir, tmp_path):
    output = str(tmp_path / "report.png")
    plotted = report.render(logdir, output, width=900, height=700, dpi=100)
    assert image(output).shape == (700, 900, 4)
    assert_not_blank(image(output))
    acc = read(logdir)

    def as_events(series):
        return list(zip(series.steps.tolist(), series.values.tolist()))

    assert as_events(plotted.global_norm) == values(acc, "global_norm/gradient_norm")
    assert as_events(plotted.clipped_norm) == values(acc, "global_norm/clipped_gradient_norm")
    assert max(plotted.clipped_norm.values) <= CLIP * (1 + 1e-6)
    assert as_events(plotted.skipped) == values(acc, "skipped_steps/total")
    assert plotted.skipped.values[-1] == EPOCHS  # one NaN batch an epoch
    assert set(plotted.layers) == {"hidden", "out"}
    for layer, series in plotted.layers.items():
        kernel, bias = values(acc, f"{layer}/kernel/gradient_norm"), values(acc, f"{layer}/bias/gradient_norm")
        assert series.steps.tolist() == [s for s, _ in kernel]
        np.testing.assert_allclose(series.values, np.hypot([v for _, v in kernel], [v for _, v in bias]))
    means = [series.values.mean() for series in plotted.layers.values()]
    assert means == sorted(means, reverse=True)


def test_command_line(logdir, tmp_path):
    output = str(tmp_path / "main.png")
    report.main([logdir, "-o", output, "--max-layers", "1"])
    assert image(output).shape == (1200, 1200, 4)  # the default size
    assert_not_blank(image(output))

    output = str(tmp_path / "subprocess.png")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "keras_trainop.report", logdir, "-o", output, "--width", "640", "--height", "480"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert f"wrote {output}" in done.stdout
    assert image(output).shape == (480, 640, 4)
    assert_not_blank(image(output))


def test_non_finite_norms_and_no_skip_policy(tmp_path):
    # Records as GradientTensorBoard writes them without transforms nor skip policy.
    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    norms = [1.0, np.inf, np.nan, 1e4]
    with writer.as_default():
        for step, norm in enumerate(norms, start=1):
            tf.summary.scalar("global_norm/gradient_norm", norm, step=step)
            tf.summary.scalar("dense/kernel/gradient_norm", norm, step=step)
            tf.summary.scalar("dense/bias/gradient_norm", 0.5, step=step)
    writer.close()
    output = str(tmp_path / "report.png")
    plotted = report.render(str(tmp_path), output, width=500, height=600)
    assert image(output).shape == (600, 500, 4)
    np.testing.assert_array_equal(plotted.global_norm.values, norms)
    assert plotted.clipped_norm is None and plotted.skipped is None
    np.testing.assert_allclose(plotted.layers["dense"].values, np.hypot(norms, 0.5))


def test_a_directory_without_records_is_an_error(tmp_path):
    expected = "no GradientTensorBoard records under .*global_norm/gradient_norm"
    with pytest.raises(ValueError, match=expected):
        report.render(str(tmp_path), str(tmp_path / "r.png"))
    # Keras's own TensorBoard scalars alone are not enough either.
    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    with writer.as_default():
        tf.summary.scalar("epoch_loss", 1.0, step=0)
    writer.close()
    with pytest.raises(SystemExit, match=expected):
        report.main([str(tmp_path), "-o", str(tmp_path / "r.png")])
    with pytest.raises(SystemExit, match="no GradientTensorBoard records under .*not a directory"):
        report.main([str(tmp_path / "missing"), "-o", str(tmp_path / "r.png")])
    with pytest.raises(ValueError, match=r"`width` must be a positive int. Received: width=0"):
        report.render(str(tmp_path), str(tmp_path / "r.png"), width=0)
    assert not os.path.exists(tmp_path / "r.png")
