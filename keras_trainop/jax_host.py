"""What the host does around the JAX backend's step (`keras_trainop.jax_step`).

After each call of the train function: raise `kt.NonFiniteError` for a
failed check, without making the host wait for every call, and write the
gradient records of the call to their readers.
"""

import collections

from keras_trainop import _keras_private as private

FAILED_STEP = "keras_trainop_failed_step"


def make(model, make_keras_train_function, force=False):
    """`model.train_function`: Keras's, made by `make_keras_train_function(force)`, hosted.

    The step's own state is made first: Keras reads the state it carries
    (the step's rides in `metrics_variables`) before the first call. A new
    configuration of gradient readers (a `GradientTensorBoard` attached or
    detached) makes a new trace.
    """
    step = model.train_pipeline
    step.variables(model.trainable_variables, owner=f"model {model.name!r}")
    if not step.built:
        step.build_transforms(step.selected)
    key = step.prepare_recording(model.steps_per_execution)
    force = force or key != getattr(step, "trace_key", key)
    step.trace_key = key
    unwrapped = model.train_function
    make_keras_train_function(force)
    if model.train_function is not unwrapped:  # Keras made a new one
        model.train_function = HostedTrainFunction(model, model.train_function)
    return model.train_function


class HostedTrainFunction:
    """Keras's JAX train function, raising `kt.NonFiniteError` for a call whose check failed.

    JAX runs calls asynchronously, and reading a call's failure flag at once
    would make the host wait for each call before it sends the next. A
    failure blocks every later update until the host reads the record, and
    every later call's flag carries it. So the host keeps the flags of the
    calls in flight, takes those already computed after each call is sent
    (`is_ready()`: no waiting; calls finish in order, so these are the oldest
    ones), and reads the newest of them once `READ_EVERY` have come in; it
    waits only with `MAX_IN_FLIGHT` flags in flight, and after the last call
    (`settle`, at the end of `fit` and `train_on_batch`). The calls sent
    after a failure change nothing: the weights are those of the last good
    step; the error comes at most `READ_EVERY + MAX_IN_FLIGHT` calls late.

    Measured on the MLP of `benchmarks/bench_backend.py` (2 CPU cores): a
    read costs about 20 us while the device works, and reading one flag per
    call with 8 in flight made the default options 3% slower than plain
    Keras; with these settings they cost what `check_numerics=False` does.
    """

    MAX_IN_FLIGHT = 64
    READ_EVERY = 16

    def __init__(self, model, function):
        self.model = model
        self.function = function
        self.pending = collections.deque()  # the failure flags of the calls in flight, oldest first
        self.newest = None  # the newest flag computed, not read yet
        self.unread = 0  # the flags computed since the last read

    def __call__(self, state, iterator):
        step = self.model.train_pipeline
        with step.recorder.closing_on_error():
            logs, state = self.function(state, iterator)
            failed = logs.pop(FAILED_STEP, None) if isinstance(logs, dict) else None
            if failed is not None:
                self.pending.append(failed)
                if self._failed(wait=len(self.pending) > self.MAX_IN_FLIGHT):
                    # Write the state (as before the failed step, with its record) before raising.
                    private.jax_write_state(self.model, state)
                    raise step.error()
        if step.buffer is not None:
            self.write_records(step, state)
        return logs, state

    def _failed(self, wait):
        """Whether a read flag says a step failed.

        Takes the flags already computed (the oldest one, waiting, if `wait`)
        and reads the newest of them once `READ_EVERY` have come in: a read
        while the device works costs about 20 us on a CPU, and the newest
        flag carries every earlier failure.
        """
        while self.pending and (wait or _is_ready(self.pending[0])):
            self.newest = self.pending.popleft()
            self.unread += 1
            wait = False
        if self.newest is None or self.unread < self.READ_EVERY:
            return False
        return self._read()

    def _read(self):
        """Reads the newest flag taken: whether it says a step failed (then the calls in flight are dropped)."""
        flag, self.newest, self.unread = self.newest, None, 0
        if flag is None or not int(flag):
            return False
        self.pending.clear()
        return True

    def write_records(self, step, state):
        """Writes the call's new gradient records to their readers (reads the buffer: waits for the call)."""
        riding = step.riding_variables()
        values = dict(zip(map(id, riding), state[3][len(state[3]) - len(riding):]))
        step.write_records(lambda variable: values[id(variable)])

    def settle(self):
        """Raises for a failure in the calls not read yet (`fit` has written the state back by then)."""
        if self.pending:  # the newest flag carries every earlier failure
            self.newest = self.pending[-1]
            self.pending.clear()
        if self._read():
            raise self.model.train_pipeline.error()


def _is_ready(value):
    """Whether a JAX array is computed (public `jax.Array.is_ready`); other values always are."""
    is_ready = getattr(value, "is_ready", None)
    return True if is_ready is None else is_ready()
