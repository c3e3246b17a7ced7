"""`GradientTensorBoard`: gradient histograms and norms at the right step, in every mode."""

import os

import keras
import tensorflow as tf

from keras_trainop.telemetry import GradientTelemetry, make_norm_trackers


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

    Steps that do not record run the model's plain train function: the callback
    switches to a second, recording train function only for the calls that
    reach a multiple of `update_freq`.

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
        self._telemetry = None

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
        self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        pipeline = model.train_pipeline
        key = (
            self.update_freq,
            self.histograms,
            self.norms,
            self.metrics,
            model.steps_per_execution,
            model.summary_writer_to_trace(),
        )
        # The two traces depend on the configuration, not on this callback's
        # writer (the host writes): later fits reuse them instead of tracing
        # again. (With summarize_gradients, the user's writer is traced in.)
        cache = pipeline.__dict__.setdefault("telemetry_functions", {})
        if key in cache:
            telemetry, plain, recording = cache[key]
            pipeline.telemetry = telemetry
        else:
            telemetry = GradientTelemetry(
                self.update_freq,
                histograms=self.histograms,
                norms=self.norms,
                log_metrics=self.metrics,
                steps_per_call=model.steps_per_execution,
            )
            if self.metrics:
                trackers = model.train_metrics
                if trackers.grad_norm is None:
                    trackers.grad_norm, clipped = make_norm_trackers()
                    if model.train_options.transforms:
                        trackers.clipped_grad_norm = clipped
                telemetry.norm_tracker = trackers.grad_norm
                telemetry.clipped_norm_tracker = trackers.clipped_grad_norm
            pipeline.telemetry = telemetry
            # Two traces of the step: the plain one, and one that records.
            model.make_train_function(force=True)
            plain = model.train_function
            model.make_train_function(force=True)
            recording = model.train_function
            cache[key] = (telemetry, plain, recording)
        self._telemetry = telemetry
        self._plain = plain
        self._known = int(model.optimizer.iterations.numpy())
        telemetry.last_written = self._known
        self._calls = 0
        model.train_function = self._switch(plain, recording)

    def _switch(self, plain, recording):
        model, telemetry, freq = self.model, self._telemetry, self.update_freq
        # The skip policy's count, read on the host after a recording call.
        skip = model.train_options.numerics.skip
        skipped = model.train_pipeline.guard.skipped_total if skip else None

        def train_function(iterator):
            per_call = model.steps_per_execution
            # Python counts calls; `iterations` is read on the host only when a
            # multiple of update_freq may be reached (skipped steps make the
            # count an upper bound).
            target = (max(self._known, telemetry.last_written) // freq + 1) * freq
            due = False
            if self._known + per_call * (self._calls + 1) >= target:
                self._known, self._calls = int(model.optimizer.iterations.numpy()), 0
                due = self._known + per_call >= target
            if not due:
                self._calls += 1
                return plain(iterator)
            telemetry.activate(True)
            try:
                logs = recording(iterator)
            finally:
                telemetry.activate(False)
            telemetry.flush(self._writer, None if skipped is None else int(skipped.numpy()))
            self._known, self._calls = int(model.optimizer.iterations.numpy()), 0
            return logs

        def detaching_on_error(iterator):
            try:
                return train_function(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise  # the end of the data: fit goes on
            except BaseException:
                # fit() does not call on_train_end when a step raises (a
                # NonFiniteError, an interrupt): detach now, so that a later
                # fit does not write into this log directory.
                self._detach()
                raise

        return detaching_on_error

    def on_train_end(self, logs=None):
        self._detach()

    def _detach(self):
        """Gives the model back its own train function and closes the writer."""
        model = self.model
        if self._telemetry is not None:
            model.train_pipeline.telemetry = None
            if self._telemetry.log_metrics:
                # The plain trace updates the norm metrics: a later fit
                # without this callback gets a fresh trace.
                model.make_train_function(force=True)
            else:
                # The plain trace is the model's own step.
                model.train_function = self._plain
            self._telemetry = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
