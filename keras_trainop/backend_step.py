"""What the JAX and PyTorch steps share: their own state, the verdict, the transforms, the report.

On Keras's JAX and PyTorch backends keras_trainop's step is written with
`keras.ops` around what each backend does its own way (`keras_trainop.jax_step`:
Keras's stateless `train_step(state, data)`, `jax.grad`, and a commit
returned as state; `keras_trainop.torch_step`: autograd, and a commit written
into the variables once the step has decided). This class holds the rest:

- the step's own state (the failure record, the transforms' state, the
  gradient sums, the skip counters, a `global_step` variable, the gradient
  ring buffer), saved in the order TensorFlow's step saves it;
- the verdict of the finiteness check, as values;
- unscaling and rescaling around a loss-scale optimizer, and the transforms;
- the `kt.NonFiniteError` of a recorded failure.

It imports no backend module.
"""

import keras
from keras import ops

from keras_trainop import failures
from keras_trainop.gradient_buffer import GradientBuffer
from keras_trainop.numerics import NonFiniteError
from keras_trainop.optimizers import check_accumulation, is_loss_scale_optimizer
from keras_trainop.options import GATE_OP, USE_GLOBAL_STEP
from keras_trainop.summaries import variable_name
from keras_trainop.telemetry import GradientRecorder
from keras_trainop.transforms.base import build_child, child_variables, run_transforms
from keras_trainop.variables import select_variables

# What computes the gradients on each backend, for the messages.
GRADIENTS_BY = {"jax": "`jax.grad`", "torch": "PyTorch's autograd"}


def check_options(options, optimizer, warned):
    """Raises, at `compile()`, for an option this backend's step does not take, saying why.

    `warned`: the warnings already given, as in `gradients.warn_once`.
    """
    tensorflow_only = {
        "aggregation_method": (options.aggregation_method is not None, options.aggregation_method),
        "gate_gradients": (options.gate_gradients != GATE_OP, options.gate_gradients),
        "colocate_gradients_with_ops": (
            options.colocate_gradients_with_ops, options.colocate_gradients_with_ops,
        ),
    }
    backend = keras.backend.backend()
    for name, (given, value) in tensorflow_only.items():
        if given:
            raise ValueError(
                f"`{name}` configures TensorFlow's graph gradients (`tf.gradients`) and "
                f"has no meaning on the {backend} backend, where {GRADIENTS_BY[backend]} "
                f"computes the gradients: leave it at its default. Received: {name}={value!r}"
            )
    step = options.global_step
    if not (step is USE_GLOBAL_STEP or step is None or isinstance(step, keras.Variable)):
        raise ValueError(
            f"On the {backend} backend `global_step` must be kt.USE_GLOBAL_STEP, None or a "
            "scalar integer keras.Variable (a tf.Variable is TensorFlow's). "
            f"Received: global_step={step!r}"
        )
    if isinstance(optimizer, keras.optimizers.Optimizer):
        check_accumulation(options, optimizer, warned)


class BackendStep:
    """One model's training step on a backend other than TensorFlow: the shared part.

    Args:
        options: the `TrainOptions` of the step.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is understood).

    The step's own state, each list in this order (`riding_variables`):
    the failure record (`record`), the transforms' state, the gradient sums
    and their counter (`sums`, `count`), the skip counters (`counters`), and a
    `global_step` variable. All but the record are saved with a model, in
    the order TensorFlow's step saves them (`state_variables`).
    """

    def __init__(self, options, optimizer):
        self.warned = set()
        check_options(options, optimizer, self.warned)
        self.options = options
        self.optimizer = optimizer
        self.policy = options.numerics
        self.scaled = is_loss_scale_optimizer(optimizer)
        self.selected = None
        self.built = False  # the transforms' state, the sums and the gradient flags made
        # Gradient statistics for summarize_gradients and GradientTensorBoard:
        # the readers, and the buffer the step records into for them.
        self.recorder = GradientRecorder()
        self.buffer = None
        self.saved_state = None  # the model's `train_step_state`
        self.names = []  # `variable.path` of each selected variable, for errors
        self.record = []  # failed step, what failed, [the flags of the gradients]
        self.counters = []  # skipped steps in all, consecutive skipped steps
        self.sums, self.count = [], []
        if self.policy.enabled:
            self.record = [_scalar("keras_trainop_failed_step"), _scalar("keras_trainop_failed_what")]
        if self.policy.skip:
            self.counters = [_scalar("skipped_steps_total"), _scalar("consecutive_skipped_steps")]
        step = options.global_step
        self.global_step = [step] if isinstance(step, keras.Variable) else []

    # -- variables --------------------------------------------------------

    def variables(self, candidates, owner="the model"):
        """The variables to train, resolved once from `variables_to_train` among the trainable `candidates`."""
        if self.selected is None:
            self.selected = select_variables(self.options.variables_to_train, candidates, candidates, owner)
        return self.selected

    def build_transforms(self, variables):
        """Creates the state kept for the variables to train: the transforms', the sums, the flags."""
        self.names = [variable_name(v) for v in variables]
        self.built = True
        for transform in self.options.transforms:
            build_child(transform, variables)
        if self.options.accumulates:
            self.sums = [
                keras.Variable(ops.zeros(v.shape, v.dtype), trainable=False, name="accumulated_gradient")
                for v in variables
            ]
            self.count = [_scalar("accumulated_steps")]
        if self.policy.check_gradients and len(self.record) == 2 and not self.scaled:
            self.record.append(keras.Variable(
                [False] * len(variables), dtype="bool", trainable=False,
                name="keras_trainop_bad_gradients",
            ))

    def transform_variables(self):
        return [v for t in self.options.transforms for v in child_variables(t)]

    def state_variables(self):
        """The state saved with a model, in the order of TensorFlow's step."""
        return self.transform_variables() + self.sums + self.count + self.counters + self.global_step

    def riding_variables(self):
        """All of the step's own state, in the order it rides in the metrics list (the buffer last)."""
        return self.record + self.state_variables() + self._buffer_variables()

    def _buffer_variables(self):
        return [] if self.buffer is None else self.buffer.variables

    def prepare_recording(self, steps_per_call):
        """Makes the buffer for the readers that want records now; returns what a trace depends on."""
        readers = {n: r for n, r in self.recorder.readers.items() if r.wanted()}
        key = (steps_per_call, self.recorder.log_metrics, tuple((n, readers[n].config()) for n in sorted(readers)))
        if not readers:
            self.buffer = None
        elif self.buffer is None or self.buffer.key != key:
            self.buffer = GradientBuffer(steps_per_call, readers.values(), self.selected, bool(self.options.transforms))
            self.buffer.key = key
            self.buffer.recording = tuple(sorted(readers))
        return key

    def write_records(self, value_of):
        """Writes the buffer's new gradient records to their readers (on the host, after a call).

        `value_of(variable)`: the value of one of the step's variables after the call.
        """
        readers = [self.recorder.readers[n] for n in self.buffer.recording if n in self.recorder.readers]
        if not readers:
            return
        after = min(r.last_written for r in readers)
        records = self.buffer.read([value_of(v) for v in self.buffer.variables], after)
        skipped = int(ops.convert_to_numpy(value_of(self.counters[0]))) if self.counters else None
        for reader in readers:
            reader.write(records, skipped)

    def check(self, loss, pairs, own, optimizer_values):
        """The step's verdict: whether it applies, and what the record and counters become.

        Under a loss-scale optimizer an overflow of the gradients is the
        optimizer's business (it skips the update and halves the scale, as in
        plain Keras): only the loss is checked.
        """
        if not self.policy.enabled:
            return None
        loss_ok = ops.all(ops.isfinite(loss))
        bad = None
        finite = loss_ok
        if self.policy.check_gradients and pairs and not self.scaled:
            # (No gradient is None on JAX; on PyTorch one is for a variable the loss does not read.)
            bad = ops.stack([ops.convert_to_tensor(False) if g is None else ~ops.all(ops.isfinite(g))
                             for g, _ in pairs])
            finite = finite & ~ops.any(bad)
        failed_step, failed_what = own[id(self.record[0])], own[id(self.record[1])]
        clear = failed_step == 0  # a failure blocks every later update of the call
        number = ops.cast(optimizer_values[self._index(self.optimizer.iterations)], "int32") + 1
        what = ops.where(loss_ok, 0, failures.LOSS)
        if bad is not None:
            what = what + ops.where(ops.any(bad), failures.GRADIENTS, 0)
        if self.policy.skip:
            total, consecutive = (own[id(v)] for v in self.counters)
            limit = self.policy.max_consecutive
            over = ops.convert_to_tensor(False) if limit is None else consecutive >= limit
            fails = ~finite & over
            skipped = ~finite & ~over & clear
            what = what + ops.where(over, failures.CONSECUTIVE, 0)
            counters = [total + ops.cast(skipped, total.dtype),
                        ops.where(finite, 0, consecutive + ops.cast(skipped, consecutive.dtype))]
        else:
            fails, skipped, counters = ~finite, None, []
        writes = fails & clear
        record = [ops.where(writes, number, failed_step), ops.where(writes, what, failed_what)]
        if len(self.record) == 3:
            flags = own[id(self.record[2])]
            record.append(flags if bad is None else ops.where(writes, bad, flags))
        return {"ok": finite & clear, "skipped": skipped, "record": record, "counters": counters}

    def unscale(self, pairs, optimizer_values):
        """True-scale gradients under a loss-scale optimizer (the transforms and sums see these)."""
        if not self.scaled:
            return pairs
        scale = optimizer_values[self._index(self.optimizer.dynamic_scale)]
        return [(None if g is None else g / ops.cast(scale, g.dtype), v) for g, v in pairs]

    def transform(self, pairs):
        """The transforms in order: the pairs to apply, and the new values of their state."""
        pairs, state = run_transforms(self.options.transforms, pairs)
        return pairs, [ops.cast(new, v.dtype) for v, _, new in state]

    def rescale(self, pairs, optimizer_values, finite):
        """Back to the loss scale for a loss-scale optimizer (a power of two: exact); NaN unless `finite`.

        If the gradients overflowed, what the optimizer gets is NaN, so that it
        skips the update and halves the scale, as in plain Keras.
        """
        if not self.scaled:
            return pairs
        scale = optimizer_values[self._index(self.optimizer.dynamic_scale)]

        def back(g):
            return ops.where(finite, g * ops.cast(scale, g.dtype), float("nan"))

        return [(None if g is None else back(g), v) for g, v in pairs]

    def _index(self, variable):
        """The position of one of the optimizer's variables in `optimizer.variables`."""
        ids = [id(v) for v in self.optimizer.variables]
        return ids.index(id(variable))

    # -- on the host --------------------------------------------------------

    def error(self):
        """The `NonFiniteError` of the recorded failure (clearing the record), or None."""
        step = int(ops.convert_to_numpy(self.record[0]))
        if not step:
            return None
        what = int(ops.convert_to_numpy(self.record[1])) or failures.LOSS
        names = []
        if what & failures.GRADIENTS and len(self.record) == 3:
            flags = ops.convert_to_numpy(self.record[2])
            names = [n for n, bad in zip(self.names, flags) if bad]
        for variable in self.record[:2]:
            variable.assign(0)
        kinds = {
            failures.LOSS: "loss", failures.GRADIENTS: "gradients",
        }.get(what & (failures.LOSS | failures.GRADIENTS), "loss and gradients")
        consecutive = self.policy.max_consecutive + 1 if what & failures.CONSECUTIVE else None
        return NonFiniteError(step, kinds, names, consecutive=consecutive)


def _scalar(name):
    return keras.Variable(0, dtype="int32", trainable=False, name=name)
