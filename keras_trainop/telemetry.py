"""Gradient statistics computed inside the step, for `GradientTensorBoard`.

The step computes, at steps that are multiples of `update_freq`, a histogram
and a norm per gradient and the global norms before and after the transforms,
with XLA-compatible ops, into variables. The host writes them after the call
(`flush`), at the exact step. Only the train function that the callback runs
when a record is due computes anything (`active`); the other is the plain step.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_trainop import summaries
from keras_trainop.numerics import replica_cond
from keras_trainop.variables import state_variable


class GradientTelemetry:
    """What the step records for the callback, and how the host writes it.

    Args:
        update_freq: record at steps that are multiples of this.
        histograms: record a histogram per gradient.
        norms: record a norm per gradient and the global norms.
        log_metrics: also put the global norms of every step in the logs
            (`grad_norm`, and `clipped_grad_norm` when transforms are set).
        steps_per_call: the model's `steps_per_execution`.
    """

    def __init__(self, update_freq, histograms=True, norms=True, log_metrics=False, steps_per_call=1):
        self.update_freq = update_freq
        # One call of the train function may reach several multiples of
        # update_freq (steps_per_execution > update_freq): keep a slot for each.
        self.slots = -(-steps_per_call // update_freq) + 1
        self.histograms = histograms
        self.norms = norms
        self.log_metrics = log_metrics
        self._active = False
        self.names = []
        self.transformed = False
        self.last_written = 0
        self._state = None
        self.norm_tracker = self.clipped_norm_tracker = None

    # -- inside the step ------------------------------------------------------

    @property
    def active(self):
        """True while the recording train function runs (and is traced).

        A plain attribute, not a thread-local: MirroredStrategy traces the step
        in one thread per replica.
        """
        return self._active

    def activate(self, value):
        self._active = value

    def _variables(self, count):
        if self._state is None or self._state["count"] != count:
            k = self.slots
            self._state = {
                "count": count,
                "step": state_variable(np.zeros(k, np.int64), tf.int64, "keras_trainop_recorded_steps"),
                "global": state_variable(np.zeros((k, 2), np.float32), tf.float32, "keras_trainop_global_norms"),
                "norms": state_variable(np.zeros((k, count), np.float32), tf.float32, "keras_trainop_norms"),
                "histograms": state_variable(
                    np.zeros((k, count, summaries.BUCKETS, 3), np.float32),
                    tf.float32,
                    "keras_trainop_histograms",
                ),
            }
        return self._state

    def record(self, step, before, after, transformed, applies=None):
        """Records statistics of this step if it is due (called by the pipeline).

        Args:
            step: int64 scalar, the number of updates including this one.
            before: `(gradient, variable)` pairs before the transforms.
            after: the pairs after the transforms.
            transformed: whether there are transforms (a clipped norm exists).
            applies: None, or a bool scalar: False when the update will not be
                applied (a skipped step), which is then neither recorded nor
                counted in the logged norms.
        """
        logs_norms = self.log_metrics and self.norm_tracker is not None
        pairs = [(g, v) for g, v in after if g is not None]
        grads = [summaries.gradient_values(g) for g, _ in pairs]
        # Under a strategy the pipeline has reduced the gradients already:
        # these are the norms of what the optimizer applies, on every replica.
        before_norm = _global_norm(before)
        after_norm = _global_norm(after) if transformed else before_norm
        if logs_norms:
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            # Every replica reports the same norms; the metric sums replicas.
            weight = 1.0 / replicas
            logged = [before_norm, after_norm]
            if applies is not None:
                # Weight 0 alone would not do: nan * 0 is nan.
                weight = tf.cast(applies, tf.float32) * weight
                logged = [tf.where(applies, n, 0.0) for n in logged]
            self.norm_tracker.update_state(logged[0], sample_weight=weight)
            if transformed:
                self.clipped_norm_tracker.update_state(logged[1], sample_weight=weight)
        if not self.active:
            return
        self.names = [summaries.variable_name(v) for _, v in pairs]
        self.transformed = transformed
        state = self._variables(len(pairs))

        def write(step, before_norm, after_norm, grads):
            slot = tf.cast((step // self.update_freq) % self.slots, tf.int32)

            def put(name, value):
                # (Variable.scatter_nd_update has no MirroredVariable version.)
                var = state[name]
                var.assign(tf.tensor_scatter_nd_update(var, [[slot]], [value]))

            put("step", step)
            put("global", tf.stack([before_norm, after_norm]))
            if grads and self.norms:
                put("norms", tf.stack([tf.norm(tf.cast(g, tf.float32)) for g in grads]))
            if grads and self.histograms:
                put("histograms", tf.stack([summaries.histogram_buckets(g) for g in grads]))

        due = tf.equal(step % self.update_freq, 0)
        if applies is not None:
            due = tf.logical_and(due, applies)
        args = (step, before_norm, after_norm, tuple(grads))
        replica_cond(due, write, lambda *a: None, args)

    # -- on the host ----------------------------------------------------------

    def flush(self, writer, skipped_total=None):
        """Writes the records not written yet, in step order. Returns the last step.

        Args:
            writer: the summary writer.
            skipped_total: None, or the skip policy's count of skipped steps,
                read by the host after the call: written at each record as
                `skipped_steps/total` (with `steps_per_execution > 1`, the
                count at the end of the call, which may be past the record).
        """
        if self._state is None:
            return 0
        state = self._state
        steps = state["step"].numpy()
        new = sorted((int(s), i) for i, s in enumerate(steps) if s > self.last_written)
        if not new:
            return 0
        global_norms, norms = state["global"].numpy(), state["norms"].numpy()
        histograms = state["histograms"].numpy() if self.histograms else None
        for step, i in new:
            with writer.as_default(step=step):
                if self.norms:
                    tf.summary.scalar("global_norm/gradient_norm", global_norms[i, 0])
                    if self.transformed:
                        tf.summary.scalar("global_norm/clipped_gradient_norm", global_norms[i, 1])
                    for name, value in zip(self.names, norms[i]):
                        tf.summary.scalar(f"{name}/gradient_norm", value)
                if self.histograms:
                    for name, buckets in zip(self.names, histograms[i]):
                        summaries.write_histogram(f"{name}/gradient", buckets, step)
                if skipped_total is not None and (self.norms or self.histograms):
                    tf.summary.scalar("skipped_steps/total", skipped_total)
        self.last_written = new[-1][0]
        return self.last_written


def _global_norm(pairs):
    values = [tf.cast(summaries.gradient_values(g), tf.float32) for g, _ in pairs if g is not None]
    return tf.linalg.global_norm(values) if values else tf.constant(0.0)


def make_norm_trackers():
    return keras.metrics.Mean(name="grad_norm"), keras.metrics.Mean(name="clipped_grad_norm")
