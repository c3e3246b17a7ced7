"""`model.train_function` as keras_trainop runs it (TensorFlow backend).

Keras calls `model.train_function(iterator)` once per `steps_per_execution`
steps. keras_trainop wraps the traces Keras makes so that, for each call, the
host:

1. picks the trace: the plain one, or one that also records gradient
   statistics for the readers that may be due in this call (a
   `GradientTensorBoard` recording every 100 updates leaves the other 99
   calls alone);
2. runs it;
3. raises `kt.NonFiniteError` for a failed check: it translates the in-graph
   assertion's error, and under XLA, where nothing raises inside the step,
   it reads the failure record after the call;
4. writes the call's new gradient records to their readers' writers.

The traces are cached per configuration (`trace_key`), so a later `fit` with
the same callbacks traces nothing again.
"""

import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop.telemetry import RingBuffer


def trace_key(model, readers):
    """What the traces depend on: the readers that want records now, and the call size."""
    recorder = model.train_pipeline.recorder
    return (
        model.steps_per_execution,
        recorder.log_metrics,
        tuple((name, readers[name].config()) for name in sorted(readers)),
    )


class HostedTrainFunction:
    """One call of the model's steps, with keras_trainop's work before and after it.

    Args:
        model: the `TrainOpModel`.
        traces: `(recording, function)` pairs: the names of the readers a
            trace records for, and the trace. The first records only for the
            readers that record at every call (`Reader.always`); the last for
            all of them.
        buffer: the `RingBuffer` the traces record into.
    """

    def __init__(self, model, traces, buffer):
        self.model = model
        self.traces = traces
        self.buffer = buffer
        self.pipeline = model.train_pipeline
        self._known = None  # `iterations` as last read on the host
        self._calls = 0  # calls since then

    def forget_iterations(self):
        """Called for each new fit: `iterations` is read again at the next call."""
        self._known = None

    def __call__(self, iterator):
        recorder = self.pipeline.recorder
        recording, function = self._pick(recorder)
        recorder.recording, recorder.buffer = recording, self.buffer
        try:
            with recorder.closing_on_error(ends=(StopIteration, tf.errors.OutOfRangeError)):
                logs = self._run(function, iterator)
        finally:
            recorder.recording = ()
        if recording:
            record = self.pipeline.failures
            skip = record is not None and self.pipeline.options.numerics.skip
            recorder.flush(recording, int(record.skipped_total.numpy()) if skip else None)
        if function is not self.traces[0][1]:
            self._read_iterations()
        return logs

    def _read_iterations(self):
        self._known, self._calls = int(self.model.optimizer.iterations.numpy()), 0

    def _pick(self, recorder):
        """The trace for this call: the plain one unless a periodic reader may be due."""
        if len(self.traces) == 1:
            return self.traces[0]
        if self._known is None:
            self._read_iterations()
        periodic = [recorder.readers[n] for n in self.traces[-1][0] if not recorder.readers[n].always]
        per_call = self.model.steps_per_execution
        # Python counts calls; `iterations` is read on the host only when a
        # multiple of `every` may be reached (skipped steps make the count an
        # upper bound).
        target = min((max(self._known, r.last_written) // r.every + 1) * r.every for r in periodic)
        due = False
        if self._known + per_call * (self._calls + 1) >= target:
            self._read_iterations()
            due = self._known + per_call >= target
        if not due:
            self._calls += 1
            return self.traces[0]
        return self.traces[-1]

    def _run(self, function, iterator):
        record = self.pipeline.failures
        if record is None:
            return function(iterator)
        logs = record.call_translating(function, iterator)
        if self.model.jit_compile and not self.model.run_eagerly:
            # Under XLA the in-graph Assert is dropped: the step hands the
            # record's step back with its logs; the host reads the whole
            # record only after a failure (or from a train_step of the user's).
            failed = logs.pop(FAILED_STEP, None) if isinstance(logs, dict) else None
            if failed is None or int(failed):
                record.raise_if_failed()
        return logs


FAILED_STEP = "keras_trainop_failed_step"


def with_failure_record(logs, pipeline):
    """The step's logs, under XLA with the failure record's step (0: none), for the host.

    Reading it from the logs costs the host nothing; reading the variable
    after every call would be one more operation per call.
    """
    record = pipeline.failures
    if record is None or not private.in_xla_context() or not isinstance(logs, dict):
        return logs
    return dict(logs, **{FAILED_STEP: tf.convert_to_tensor(record.failed_step)})


def make(model, make_keras_train_function):
    """The hosted train function for the model's readers now (cached per configuration).

    Args:
        model: the `TrainOpModel`.
        make_keras_train_function: zero-argument callable returning a new
            trace of Keras's own train function.
    """
    recorder = model.train_pipeline.recorder
    readers = {name: r for name, r in recorder.readers.items() if r.wanted()}
    key = trace_key(model, readers)
    cache = model.train_pipeline.hosted_functions
    hosted = cache.get(key)
    if hosted is None:
        always = tuple(sorted(n for n, r in readers.items() if r.always))
        everything = tuple(sorted(readers))
        traces = [(always, make_keras_train_function())]
        if everything != always:
            traces.append((everything, make_keras_train_function()))
        hosted = cache[key] = HostedTrainFunction(model, traces, RingBuffer(model.steps_per_execution, list(readers.values())))
    hosted.forget_iterations()
    return hosted
