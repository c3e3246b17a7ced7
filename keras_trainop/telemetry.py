"""Gradient statistics computed inside the step, written by the host after each call.

`tf.summary` cannot run under XLA, and inside a traced step it writes at the
step frozen at trace time. So the step computes its statistics with
XLA-compatible ops into a small ring buffer of variables, and the host writes
them after the call, at their exact steps.

A model has one `GradientRecorder`. Readers attach to it and say what they
want and where it goes:

- `summarize_gradients=True` (`SUMMARIES`): a histogram and a norm per
  gradient at every update, to the default `tf.summary` writer of the call
  (TF1's tags, at TF1's step);
- each `kt.GradientTensorBoard`: every `update_freq` updates, histograms,
  norms and the global norms, to its own writer.

A reader that records only every n-th update does not make the other calls
pay: the host runs a plain trace for calls that cannot reach a record
(`keras_trainop.host`). `GradientTensorBoard(metrics=True)` also puts the
global norms of every step in the logs through two Keras metrics.
"""

import contextlib
import math

import numpy as np
import tensorflow as tf

from keras_trainop import summaries
from keras_trainop.replicas import replica_cond
from keras_trainop.variables import state_variable

SUMMARIES = "summarize_gradients"


class Reader:
    """What one writer takes from the recorder.

    Args:
        every: records updates that are multiples of this (a positive int).
        writer: zero-argument callable returning the `tf.summary` writer to
            write to after a call, or None to write nothing this time.
        histograms: a histogram per gradient, `<variable.path>/gradient`.
        norms: a norm per gradient, `<variable.path>/gradient_norm`.
        global_norms: `global_norm/gradient_norm` (before the transforms) and
            `global_norm/clipped_gradient_norm` (after them, when set).
        skipped: also `skipped_steps/total`, the skip policy's count.
        at_global_step: write at the step of a `global_step` variable
            (TF1's summaries) instead of the number of updates.
        always: records in every call (False: only in calls that may reach
            a multiple of `every`; the host runs a plain trace for the others).
        wanted: zero-argument callable: whether to record for this reader in
            the traces made now (`summarize_gradients` records only when a
            default writer is active, so that without one it costs nothing).
        on_error: zero-argument callable run when a call raises (`fit` then
            skips `on_train_end`), or None.
    """

    def __init__(self, every, writer, histograms=True, norms=True, global_norms=False,
                 skipped=False, at_global_step=False, always=False, wanted=None, on_error=None):
        self.every = every
        self.writer = writer
        self.wanted = wanted or (lambda: True)
        self.on_error = on_error
        self.histograms = histograms
        self.norms = norms
        self.global_norms = global_norms
        self.skipped = skipped
        self.at_global_step = at_global_step
        self.always = always
        self.last_written = 0  # the update count of the last record written

    def config(self):
        """What a trace that records for this reader depends on."""
        return (self.every, self.histograms, self.norms, self.global_norms, self.always)

    def write(self, records, skipped_total):
        """Writes the records this reader has not written yet. Returns how many."""
        writer = self.writer()
        if writer is None:
            return 0
        new = [r for r in records if r.step > self.last_written and r.step % self.every == 0]
        for r in new:
            step = r.summary_step if self.at_global_step else r.step
            with writer.as_default(step=step):
                if self.global_norms:
                    tf.summary.scalar("global_norm/gradient_norm", r.global_norms[0])
                    if r.transformed:
                        tf.summary.scalar("global_norm/clipped_gradient_norm", r.global_norms[1])
                if self.norms:
                    for name, value in zip(r.names, r.norms):
                        tf.summary.scalar(f"{name}/gradient_norm", value)
                if self.histograms:
                    for name, buckets in zip(r.names, r.histograms):
                        summaries.write_histogram(f"{name}/gradient", buckets, step)
                if self.skipped and skipped_total is not None:
                    tf.summary.scalar("skipped_steps/total", skipped_total)
        if new:
            self.last_written = new[-1].step
        return len(new)


class Record:
    """One recorded update, as the host reads it back."""

    def __init__(self, step, summary_step, global_norms, norms, histograms, names, transformed):
        self.step = step
        self.summary_step = summary_step
        self.global_norms = global_norms
        self.norms = norms
        self.histograms = histograms
        self.names = names
        self.transformed = transformed


class RingBuffer:
    """The variables one trace records into, enough for the records of one call.

    Records are made at multiples of `stride` (the greatest common divisor of
    the readers' `every`), at most `slots - 1` in one call of
    `steps_per_call` steps; record `step` goes to slot `(step // stride) % slots`.
    """

    def __init__(self, steps_per_call, readers):
        self.stride = math.gcd(*[r.every for r in readers]) if readers else 1
        self.slots = -(-steps_per_call // self.stride) + 1
        self.count = None
        self.variables = None
        self.names = []
        self.transformed = False

    def ensure(self, count):
        if self.count != count:
            k = self.slots
            self.count = count
            self.variables = {
                "step": state_variable(np.zeros(k, np.int64), tf.int64, "keras_trainop_recorded_steps"),
                "summary_step": state_variable(np.zeros(k, np.int64), tf.int64, "keras_trainop_summary_steps"),
                "global": state_variable(np.zeros((k, 2), np.float32), tf.float32, "keras_trainop_global_norms"),
                "norms": state_variable(np.zeros((k, count), np.float32), tf.float32, "keras_trainop_norms"),
                "histograms": state_variable(
                    np.zeros((k, count, summaries.BUCKETS, 3), np.float32),
                    tf.float32,
                    "keras_trainop_histograms",
                ),
            }
        return self.variables

    def read(self, after, histograms):
        """The records of updates after `after`, in step order (host side)."""
        if self.variables is None:
            return []
        state = self.variables
        steps = state["step"].numpy()
        order = sorted((int(s), i) for i, s in enumerate(steps) if s > after)
        if not order:
            return []
        summary_steps, global_norms = state["summary_step"].numpy(), state["global"].numpy()
        norms = state["norms"].numpy()
        buckets = state["histograms"].numpy() if histograms else None
        return [
            Record(step, int(summary_steps[i]), global_norms[i], norms[i],
                   None if buckets is None else buckets[i], self.names, self.transformed)
            for step, i in order
        ]


class GradientRecorder:
    """The model's one recorder of gradient statistics.

    `readers` are attached by name. While a trace is built or run,
    `recording` names the readers it records for (set by the host before
    each call) and `buffer` is where it records.
    """

    def __init__(self):
        self.readers = {}
        self.recording = ()
        self.buffer = None
        # GradientTensorBoard(metrics=True): the global norms of every step, as metrics.
        self.log_metrics = False
        self.norm_tracker = self.clipped_norm_tracker = None

    def attach(self, name, reader):
        self.readers[name] = reader

    def detach(self, name):
        self.readers.pop(name, None)

    def close_on_error(self):
        for reader in list(self.readers.values()):
            if reader.on_error is not None:
                reader.on_error()

    @contextlib.contextmanager
    def closing_on_error(self, ends=(StopIteration,)):
        """Closes the readers if the call inside raises, but for the end of the data (`ends`).

        fit() does not call on_train_end when a step raises (a
        NonFiniteError, an interrupt): callbacks detach now, so that a later
        fit does not write into their log directories.
        """
        try:
            yield
        except ends:
            raise  # the end of the data: fit goes on
        except BaseException:
            self.close_on_error()
            raise

    @property
    def reads_gradients(self):
        """Whether the step being traced reads the gradients for this recorder."""
        return bool(self.recording) or self.log_metrics

    # -- inside the step ------------------------------------------------------

    def record(self, step, summary_step, before, after, transformed, applies=None):
        """Records this update's statistics for the readers due at `step` (called by the pipeline).

        Args:
            step: int64 scalar, the number of updates including this one.
            summary_step: int64 scalar, the step TF1's summaries write at.
            before: `(gradient, variable)` pairs before the transforms.
            after: the pairs after the transforms.
            transformed: whether there are transforms (a clipped norm exists).
            applies: None, or a bool scalar: False when the update will not be
                applied (a skipped step), which is then neither recorded nor
                counted in the logged norms.
        """
        if not self.reads_gradients:
            return
        pairs = [(g, v) for g, v in after if g is not None]
        grads = [summaries.gradient_values(g) for g, _ in pairs]
        # Under a strategy the pipeline has reduced the gradients already:
        # these are the norms of what the optimizer applies, on every replica.
        before_norm = _global_norm(before)
        after_norm = _global_norm(after) if transformed else before_norm
        if self.log_metrics and self.norm_tracker is not None:
            self._log(before_norm, after_norm, transformed, applies)
        readers = [self.readers[name] for name in self.recording]
        if not readers:
            return
        buffer = self.buffer
        buffer.names = [summaries.variable_name(v) for _, v in pairs]
        buffer.transformed = transformed
        state = buffer.ensure(len(pairs))
        want_norms = any(r.norms for r in readers)
        want_histograms = any(r.histograms for r in readers)

        def write(step, summary_step, before_norm, after_norm, grads):
            slot = tf.cast((step // buffer.stride) % buffer.slots, tf.int32)

            def put(name, value):
                # (Variable.scatter_nd_update has no MirroredVariable version.)
                var = state[name]
                var.assign(tf.tensor_scatter_nd_update(var, [[slot]], [value]))

            put("step", step)
            put("summary_step", summary_step)
            put("global", tf.stack([before_norm, after_norm]))
            if grads and want_norms:
                put("norms", tf.stack([tf.norm(tf.cast(g, tf.float32)) for g in grads]))
            if grads and want_histograms:
                put("histograms", tf.stack([summaries.histogram_buckets(g) for g in grads]))

        due = tf.reduce_any(tf.stack([tf.equal(step % r.every, 0) for r in readers]))
        if applies is not None:
            due = tf.logical_and(due, applies)
        args = (step, tf.cast(summary_step, tf.int64), before_norm, after_norm, tuple(grads))
        replica_cond(due, write, lambda *a: None, args)

    def _log(self, before_norm, after_norm, transformed, applies):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Every replica reports the same norms; the metric sums replicas.
        weight = 1.0 / replicas
        logged = [before_norm, after_norm]
        if applies is not None:
            # Weight 0 alone would not do: nan * 0 is nan.
            weight = tf.cast(applies, tf.float32) * weight
            logged = [tf.where(applies, n, 0.0) for n in logged]
        self.norm_tracker.update_state(logged[0], sample_weight=weight)
        if transformed and self.clipped_norm_tracker is not None:
            self.clipped_norm_tracker.update_state(logged[1], sample_weight=weight)

    # -- on the host ----------------------------------------------------------

    def flush(self, recording, skipped_total=None):
        """Writes the new records of a call that recorded for the readers named in `recording`."""
        readers = [self.readers[name] for name in recording if name in self.readers]
        if not readers or self.buffer is None:
            return
        after = min(r.last_written for r in readers)
        records = self.buffer.read(after, histograms=any(r.histograms for r in readers))
        for reader in readers:
            reader.write(records, skipped_total)


def _global_norm(pairs):
    values = [tf.cast(summaries.gradient_values(g), tf.float32) for g, _ in pairs if g is not None]
    return tf.linalg.global_norm(values) if values else tf.constant(0.0)
