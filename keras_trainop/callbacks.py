"""`GradientTensorBoard`: gradient histograms and norms at the right step, in every mode."""

import os

import keras
import tensorflow as tf

from keras_trainop.telemetry import Reader


class GradientTensorBoard(keras.callbacks.Callback):
    """Writes gradient histograms and norms of a `TrainOpModel` to TensorBoard.

    Tags, in `<log_dir>/train` (so that, with the same `log_dir` as
    `keras.callbacks.TensorBoard`, both show as one run):

    - histogram `<variable.path>/gradient`, scalar `<variable.path>/gradient_norm`
      (after the transforms, as TF1's `summarize_gradients`);
    - scalar `global_norm/gradient_norm` (before the transforms) and, when
      transforms are set, `global_norm/clipped_gradient_norm` (after them);
    - with `check_numerics="skip"`, scalar `skipped_steps/total` (the steps
      skipped so far).

    The step is the number of optimizer updates including the recorded one
    (1-based, like Keras's `batch_*` scalars); a record is written at every step
    that is a multiple of `update_freq`. It works with `run_eagerly=True`, in
    graph mode, with `jit_compile=True` (statistics are computed with
    XLA-compatible ops inside the step and written by the host after it), and
    with `steps_per_execution > 1`.

    Steps that do not record run the model's plain train function: the model
    switches to a second, recording one only for the calls that reach a
    multiple of `update_freq`. The writer is opened at the first record and
    closed when `fit` ends (or raises).

    Args:
        log_dir: the directory (created if missing, not an existing file);
            events go to `<log_dir>/train`.
        update_freq: a positive int: record every `update_freq` updates.
        histograms: write a histogram per gradient.
        norms: write a norm per gradient and the global norms.
        metrics: also put the global gradient norm of every step in the logs
            (progress bar, History, CSVLogger) as `grad_norm`, and, when
            transforms are set, the norm after them as `clipped_grad_norm`.
            Epoch values are means. Never in validation logs. This computes
            the norms at every step.
    """

    def __init__(self, log_dir="logs", update_freq=100, histograms=True, norms=True, metrics=False):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise ValueError(
                f"`log_dir` must be a non-empty path. Received: log_dir={log_dir!r}"
            )
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise ValueError(
                "`log_dir` must be a directory (created if missing); this path is an "
                f"existing file. Received: log_dir={log_dir!r}"
            )
        if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
            hint = (
                'keras.callbacks.TensorBoard\'s "batch" is update_freq=1 here; there '
                'is no "epoch" mode. '
                if isinstance(update_freq, str)
                else ""
            )
            raise ValueError(
                "`update_freq` must be a positive int (a number of updates). "
                f"{hint}Received: update_freq={update_freq!r}"
            )
        for name, value in (("histograms", histograms), ("norms", norms), ("metrics", metrics)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
        if not (histograms or norms or metrics):
            raise ValueError(
                "At least one of `histograms`, `norms` and `metrics` must be True: "
                "otherwise the callback has nothing to do. Received: histograms=False, "
                "norms=False, metrics=False"
            )
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.histograms = histograms
        self.norms = norms
        self.metrics = metrics
        self._writer = None
        self._name = None  # the name of its reader while attached

    def set_model(self, model):
        if not hasattr(model, "train_pipeline"):
            raise ValueError(
                "GradientTensorBoard needs a keras_trainop model (kt.Model, "
                "kt.Sequential or a subclass of kt.TrainOpModel) compiled with "
                f"compile(). Received: model of type {type(model).__name__}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        model = self.model
        recorder = model.train_pipeline.recorder
        reader = Reader(
            self.update_freq,
            self._lazy_writer,
            histograms=self.histograms,
            norms=self.norms,
            global_norms=self.norms,
            skipped=model.train_options.numerics.skip,
            on_error=self._detach,
        )
        reader.last_written = int(model.optimizer.iterations.numpy())
        # Named by position: a later fit with the same callbacks gets the same
        # names, and the model reuses the traces it made for them.
        taken = [n for n in recorder.readers if n.startswith("GradientTensorBoard")]
        self._name = f"GradientTensorBoard#{len(taken)}"
        recorder.attach(self._name, reader)
        if self.metrics:
            trackers = model.train_metrics
            if trackers.grad_norm is None:
                trackers.grad_norm = keras.metrics.Mean(name="grad_norm")
                if model.train_options.transforms:
                    trackers.clipped_grad_norm = keras.metrics.Mean(name="clipped_grad_norm")
            recorder.log_metrics = True
            recorder.norm_tracker = trackers.grad_norm
            recorder.clipped_norm_tracker = trackers.clipped_grad_norm
        model.make_train_function()

    def _lazy_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        return self._writer

    def on_train_end(self, logs=None):
        self._detach()

    def _detach(self):
        """Gives the model back its train function without this callback, and closes the writer."""
        if self._name is not None:
            recorder = self.model.train_pipeline.recorder
            recorder.detach(self._name)
            if self.metrics:
                recorder.log_metrics = False
            self._name = None
            self.model.make_train_function()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
