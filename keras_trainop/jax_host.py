"""What the host does around the JAX backend's step (`keras_trainop.jax_step`).

After each call of the train function: raise `kt.NonFiniteError` for a
failed check, without making the host wait for every call, and write the
gradient records of the call to their readers.
"""

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
    calls in flight and reads, after each call is sent, the newest one that
    is already computed (`is_ready()`: no waiting); it waits only when
    `MAX_IN_FLIGHT` flags are unread, and after the last call (`settle`, at
    the end of `fit` and `train_on_batch`). The calls sent after a failure
    change nothing: the weights are those of the last good step.
    """

    MAX_IN_FLIGHT = 8

    def __init__(self, model, function):
        self.model = model
        self.function = function
        self.pending = []  # the failure flags of the calls not yet read, oldest first

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
        """Whether a read flag says a step failed; reads the newest computed one (or the oldest, if `wait`)."""
        ready = [i for i, flag in enumerate(self.pending) if _is_ready(flag)]
        if not ready and not wait:
            return False
        newest = ready[-1] if ready else 0
        flag = self.pending[newest]
        del self.pending[: newest + 1]
        if int(flag):
            self.pending = []
            return True
        return False

    def write_records(self, step, state):
        """Writes the call's new gradient records to their readers (reads the buffer: waits for the call)."""
        riding = step.riding_variables()
        values = dict(zip(map(id, riding), state[3][len(state[3]) - len(riding):]))
        step.write_records(lambda variable: values[id(variable)])

    def settle(self):
        """Raises for a failure in the calls not read yet (`fit` has written the state back by then)."""
        pending, self.pending = self.pending, []
        if pending and int(pending[-1]):  # the newest flag carries every earlier failure
            raise self.model.train_pipeline.error()


def _is_ready(value):
    """Whether a JAX array is computed (public `jax.Array.is_ready`); other values always are."""
    is_ready = getattr(value, "is_ready", None)
    return True if is_ready is None else is_ready()
