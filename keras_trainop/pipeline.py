"""THE training step, shared by `TrainOpModel` and the functional API.

Order of one step (each stage only where its option is set):

1. forward pass and loss, under a `tf.GradientTape`;
2. loss scaling, when the optimizer is a `LossScaleOptimizer`;
3. gradients (`GradientTape`, or `tf.gradients` for `aggregation_method` /
   `gate_gradients`);
4. cross-replica reduction: under a distribution strategy the gradients are
   summed over replicas here, once, so that everything after sees the
   global-batch gradient (Keras divides each replica's loss by the number of
   replicas); the optimizer then applies them as given instead of reducing
   again after its own clipping, as plain Keras does;
5. unscaling, when a loss-scale optimizer is used and something reads the
   gradients;
6. finiteness of the loss (`check_numerics`);
6b. accumulation (`gradient_accumulation_steps`): the mean of the steps so
   far goes on; only every k-th step updates;
7. transforms, in order;
8. statistics (`summarize_gradients`);
9. update ops;
10. apply (`optimizer.apply_gradients`);
11. the global step, +1 per applied update.

Stages 9 to 11 form "the update". With `check_numerics` it runs under
`tf.cond(finite, update, record_failure)`, so a non-finite step changes no
variable: no weight, no optimizer slot, no counter.
"""

import functools

import keras
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop import gradients as gradients_lib
from keras_trainop import numerics
from keras_trainop import summaries
from keras_trainop.accumulation import GradientAccumulator
from keras_trainop.optimizers import is_loss_scale_optimizer, own_accumulation_steps
from keras_trainop.options import USE_GLOBAL_STEP
from keras_trainop.telemetry import SUMMARIES, GradientRecorder
from keras_trainop.transforms.base import build_child, child_variables, map_values
from keras_trainop.variables import select_variables


def _control_inputs(outputs):
    """The tensors and ops among what update ops returned, to order the apply after."""
    deps = []
    for out in tf.nest.flatten(outputs, expand_composites=False):
        if isinstance(out, (tf.Tensor, tf.Operation)):
            deps.append(out)
        elif isinstance(out, (tf.Variable, keras.Variable)):
            deps.append(tf.convert_to_tensor(out))
    return deps


def _check_transform_output(index, transform, result, allowed):
    if isinstance(result, tuple):
        result = list(result)
    if not isinstance(result, list) or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in result
    ):
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) must return a list of "
            "(gradient, variable) pairs, as TF1's `transform_grads_fn` did. "
            f"Received: {result!r}"
        )
    seen = set()
    for grad, var in result:
        if id(var) not in allowed:
            raise ValueError(
                f"Gradient transform {index} ({transform!r}) returned a pair for "
                f"variable {_describe(var)}, which is not one of the "
                "variables being trained. A transform may drop pairs or change "
                "gradients, never add variables."
            )
        if id(var) in seen:
            raise ValueError(
                f"Gradient transform {index} ({transform!r}) returned more than one "
                f"pair for variable {_describe(var)}: it would be updated twice. "
                f"Received: {len(result)} pairs for {len(allowed)} variables"
            )
        seen.add(id(var))
        if grad is not None:
            _check_gradient(index, transform, grad, var)
    return [tuple(p) for p in result]


def _describe(var):
    try:
        return repr(summaries.variable_name(var))
    except AttributeError:  # not a variable at all
        return repr(var)


def _check_gradient(index, transform, grad, var):
    """A transform's gradient must fit its variable: a tensor of its shape and dtype."""
    values = summaries.gradient_values(grad)
    shape, dtype = getattr(values, "shape", None), getattr(values, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) returned, for variable "
            f"{_describe(var)}, a gradient that is not a tensor, tf.IndexedSlices "
            f"or None. Received: gradient={grad!r}"
        )
    shape, dtype = tf.TensorShape(shape), tf.as_dtype(dtype)
    var_shape, var_dtype = tf.TensorShape(var.shape), tf.as_dtype(var.dtype)
    if isinstance(grad, tf.IndexedSlices):  # rows of the variable
        fits = shape.rank is None or (
            shape.rank == var_shape.rank and shape[1:].is_compatible_with(var_shape[1:])
        )
    else:
        fits = shape.is_compatible_with(var_shape)
    if not fits or dtype != var_dtype:
        raise ValueError(
            f"Gradient transform {index} ({transform!r}) returned, for variable "
            f"{_describe(var)} of shape {var_shape} and dtype {var_dtype.name}, a "
            "gradient that does not fit it: a transform must keep each gradient's "
            f"shape and dtype. Received: gradient of shape {shape} and dtype {dtype.name}"
        )


def _put_back_where(blocked, pairs, only=None):
    """Assigns each `(variable, saved)` pair's saved value where `blocked` is True.

    Without control flow (`tf.where`), so it costs a few ops on every step and
    holds nothing back. `only`: the ids of the variables to consider, if not all.
    """
    return [
        var.assign(tf.where(blocked, value, tf.convert_to_tensor(var)))
        for var, value in pairs
        if only is None or id(var) in only
    ]


def _all_of(*flags):
    """The conjunction of the bool scalars that are not None; None if all are."""
    flags = [f for f in flags if f is not None]
    return functools.reduce(tf.logical_and, flags) if flags else None


def in_replica_context():
    """Whether the step runs per replica, under a distribution strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def all_reduce(grads_and_vars):
    """The pairs with each gradient summed over the replicas (None kept as None).

    One all-reduce for all gradients; IndexedSlices stay IndexedSlices.
    """
    present = [i for i, (g, _) in enumerate(grads_and_vars) if g is not None]
    if not present:
        return list(grads_and_vars)
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [grads_and_vars[i][0] for i in present]
    )
    pairs = list(grads_and_vars)
    for i, g in zip(present, reduced):
        pairs[i] = (g, pairs[i][1])
    return pairs


def _rescale(grads_and_vars, scale, finite):
    """The gradients scaled back for a loss-scale optimizer, poisoned unless `finite`.

    If the raw gradients overflowed, the rescaled ones are NaN, so that a
    transform such as clipping cannot hide the overflow from the optimizer,
    which then skips the step and halves the scale.
    """

    def back(g):
        g = g * tf.cast(scale, g.dtype)
        return tf.where(finite, g, tf.constant(float("nan"), g.dtype))

    return [(map_values(back, g), v) for g, v in grads_and_vars]


class StepPipeline:
    """One training step with TF1's `create_train_op` options.

    Args:
        options: the `TrainOptions` of the step.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is understood).
    """

    def __init__(self, options, optimizer):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`optimizer` must be a Keras 3 optimizer instance (TF1 "
                "`tf.compat.v1.train.Optimizer`s are not supported). "
                f"Received: optimizer={optimizer!r}"
            )
        self.warned = set()
        own = own_accumulation_steps(optimizer)
        if own and options.accumulates:
            raise ValueError(
                "Pass `gradient_accumulation_steps` to keras_trainop or to the "
                "optimizer, not both (the optimizer's own would accumulate "
                "again what keras_trainop hands it). Received: "
                f"gradient_accumulation_steps={options.gradient_accumulation_steps!r} "
                f"and an optimizer with gradient_accumulation_steps={own!r}"
            )
        if own and (options.transforms or options.numerics.check_gradients):
            gradients_lib.warn_once(
                self.warned,
                "optimizer-accumulation",
                "keras_trainop: the optimizer accumulates gradients itself "
                f"(gradient_accumulation_steps={own}), after keras_trainop's "
                "transforms and checks, which therefore act on each micro-batch. "
                "To clip the accumulated gradient, pass gradient_accumulation_steps "
                "to keras_trainop instead.",
            )
        self.options = options
        self.optimizer = optimizer
        self.guard = (
            numerics.FailureGuard.for_optimizer(optimizer) if options.numerics.enabled else None
        )
        self.accumulator = (
            GradientAccumulator(options.gradient_accumulation_steps) if options.accumulates else None
        )
        self.selected = None  # the variables to train, once resolved
        # Gradient statistics the host writes after each call (a model's
        # summarize_gradients and GradientTensorBoard), and the hosted train
        # functions made for them (keras_trainop.host).
        self.recorder = GradientRecorder()
        self.hosted_functions = {}
        # A model's `train_step_state`: how Keras's saving finds the state.
        self.saved_state = None

    # -- variables --------------------------------------------------------

    def variables(self, candidates, trainable=None, owner="the model"):
        """The variables to train, resolved once from `variables_to_train`.

        Args:
            candidates: the trainable variables that None selects.
            trainable: all trainable variables a selection may name
                (defaults to `candidates`).
            owner: how errors name where the variables must come from.
        """
        if self.selected is None:
            self.selected = select_variables(
                self.options.variables_to_train,
                candidates,
                candidates if trainable is None else trainable,
                owner,
            )
        return self.selected

    # -- stateful transforms ----------------------------------------------

    def build_transforms(self, variables):
        """Lets each transform with a `build(variables)` method create its state.

        Called once, before the transforms first run; under `tf.init_scope` so
        that state variables are created outside any traced function.
        """
        with tf.init_scope():
            for transform in self.options.transforms:
                build_child(transform, variables)
            if self.accumulator is not None:
                self.accumulator.build(variables)

    def transform_variables(self):
        """The state variables of all transforms (their `variables` attribute)."""
        return [v for t in self.options.transforms for v in child_variables(t)]

    def accumulator_variables(self):
        """The gradient sums and the micro-batch counter, with accumulation."""
        return [] if self.accumulator is None else self.accumulator.variables

    def state_variables(self):
        """All state the step keeps between steps, beyond the optimizer's: saved with the model.

        The transforms' state, the gradient sums, the skip policy's counters,
        and a `global_step` given as a `keras.Variable` (a plain `tf.Variable`
        is not a Keras weight: it is the caller's to save).
        """
        state = self.transform_variables() + self.accumulator_variables()
        if self.guard is not None and self.options.numerics.skip:
            state += [self.guard.skipped_total, self.guard.consecutive]
        if isinstance(self.options.global_step, keras.Variable):
            state.append(self.options.global_step)
        return state

    # -- the step ---------------------------------------------------------

    def run(self, forward, candidates=None, state_variables=()):
        """Runs one step: forward, gradients, update.

        Returns:
            `(aux, skipped)`: forward's aux output, and a float32 scalar that is
            1.0 if the step was skipped (`SkipNonFinite`), else 0.0.

        Args:
            forward: zero-argument callable returning `(loss, aux)`: the
                scalar loss to minimise (unscaled) and anything to hand back.
            candidates: the trainable variables that `variables_to_train=None`
                selects, or a zero-argument callable returning them (called
                after `forward`, which may build a model lazily); None means
                the trainable variables `forward` reads.
            state_variables: non-trainable variables that `forward` may change
                (e.g. BatchNormalization statistics); put back if the step is
                blocked.
        """
        snapshot = None
        if self.guard is not None and state_variables:
            snapshot = [tf.identity(tf.convert_to_tensor(v)) for v in state_variables]
        with tf.GradientTape() as tape:
            loss, aux = forward()
            scaled_loss = self.optimizer.scale_loss(loss)
        if candidates is None:
            variables = self.variables(
                [v for v in tape.watched_variables() if v.trainable],
                owner="what the loss reads",
            )
        else:
            variables = self.variables(candidates() if callable(candidates) else candidates)
        grads = gradients_lib.compute_gradients(
            tape, scaled_loss, variables, self.options, self.warned
        )

        skipped = self.update(
            loss, list(zip(grads, variables)), state_variables=state_variables, snapshot=snapshot
        )
        return aux, skipped

    def update(self, loss, grads_and_vars, state_variables=(), snapshot=None):
        """Stages 5 to 11 on gradients of the (scaled) loss.

        Args:
            loss: the unscaled scalar loss, for the finiteness check.
            grads_and_vars: `(gradient, variable)` pairs of the scaled loss.
            state_variables: variables put back to `snapshot` when the step is
                blocked (the forward pass's non-trainable state).
            snapshot: their values from before the forward pass, or None.

        The transforms' own state (a noise counter, moving averages) is put
        back too when the step is blocked, or when a loss-scale optimizer
        skips it for an overflow: a step that applies nothing leaves no trace.

        Returns:
            A float32 scalar: 1.0 if the step was skipped, else 0.0.
        """
        in_xla = private.in_xla_context()
        opt = self.optimizer
        options = self.options
        variables = [v for _, v in grads_and_vars]
        if not opt.built:
            if in_replica_context():
                # TF cannot initialise variables created while tracing a
                # replica's step (plain Keras `optimizer.apply` fails the
                # same way, with an unfed placeholder): say what to do.
                raise ValueError(
                    "Under a distribution strategy the optimizer must be built "
                    "before the step is traced: call `optimizer.build("
                    "model.trainable_variables)` inside `strategy.scope()` "
                    f"first. Received: optimizer={opt!r} (not built)"
                )
            # Slots must exist before the update runs inside a `tf.cond`.
            opt.build(variables)
        step = tf.cast(tf.convert_to_tensor(opt.iterations), tf.int64) + 1

        if in_replica_context():
            grads_and_vars = all_reduce(grads_and_vars)
            private.apply_gradients_as_given(opt)
        raw = list(grads_and_vars)
        lso = is_loss_scale_optimizer(opt)
        recorder = self.recorder
        accumulator = self.accumulator
        reads_gradients = (
            bool(options.transforms)
            or options.summarize_gradients
            or recorder.reads_gradients
            or accumulator is not None
        )
        scale = None
        if lso and reads_gradients:
            grads_and_vars, scale = self._unscale(grads_and_vars)

        # Gradients are checked raw, before any transform could hide an inf.
        # Under a loss-scale optimizer an overflow is the optimizer's business:
        # it skips the step and halves the scale, as in plain Keras.
        checked = [] if lso else raw
        verdict = None
        if self.guard is not None:
            verdict = self.guard.verdict(options.numerics, loss, [g for g, _ in checked])

        self.build_transforms(variables)
        ready = None  # with accumulation: whether this step updates
        if accumulator is not None:
            grads_and_vars, ready = accumulator.add(
                grads_and_vars, tf.constant(True) if verdict is None else verdict.ok
            )
        finite = None  # with a loss-scale optimizer: whether what it gets is finite
        if scale is not None:
            finite = numerics.all_finite(
                [summaries.gradient_values(g) for g, _ in (raw if ready is None else grads_and_vars) if g is not None]
            )
        # When nothing is applied, the transforms' state is put back.
        held = _all_of(ready, finite)
        held = None if held is None else tf.logical_not(held)
        kept = self.transform_variables()
        kept_ids = {id(v) for v in kept}
        skip_ids = {id(v) for v in self.state_variables()}  # never changed by a blocked step
        if snapshot is None:
            state_variables, snapshot = [], []
        pairs = [(v, s) for v, s in zip(state_variables, snapshot) if id(v) not in skip_ids]
        if kept and (self.guard is not None or held is not None):
            # Read before the transforms run: automatic control dependencies
            # order these reads before the transforms' assignments.
            pairs += [(v, tf.identity(tf.convert_to_tensor(v))) for v in kept]
        state_variables = [v for v, _ in pairs]
        snapshot = tuple(s for _, s in pairs)
        before = list(grads_and_vars)
        allowed = {id(v) for v in variables}
        for i, transform in enumerate(options.transforms):
            result = transform(list(grads_and_vars))
            grads_and_vars = _check_transform_output(i, transform, result, allowed)

        if options.summarize_gradients and SUMMARIES not in recorder.readers:
            self._summarize(grads_and_vars, step, in_xla, ready)
        # A step that will not be applied is not recorded: its number is the
        # next applied update's.
        recorder.record(
            step, self._summary_step(step), before, grads_and_vars, bool(options.transforms),
            applies=_all_of(None if verdict is None else verdict.ok, finite, ready),
        )

        if scale is not None:
            grads_and_vars = _rescale(grads_and_vars, scale, finite)
        if held is not None and kept:
            # The optimizer will skip an overflowing step, and an accumulating
            # step applies nothing: the transforms' state stays as it was.
            _put_back_where(held, list(zip(state_variables, snapshot)), kept_ids)

        def apply_update(grads_and_vars, snapshot):
            del snapshot
            outputs = [op() for op in options.update_ops]
            with tf.control_dependencies(_control_inputs(outputs)):
                counter = options.global_step
                if counter is None or counter is USE_GLOBAL_STEP:
                    opt.apply_gradients(grads_and_vars)
                    return
                iterations_before = tf.convert_to_tensor(opt.iterations)
                opt.apply_gradients(grads_and_vars)
                # +1 per update the optimizer really applied (a loss-scale
                # optimizer skips overflowing steps without counting them).
                applied = tf.convert_to_tensor(opt.iterations) - iterations_before
                counter.assign_add(tf.cast(applied, counter.dtype))

        restore = restore_where = None
        if state_variables:

            def restore(grads_and_vars, saved, *unused):
                del grads_and_vars, unused
                for var, value in zip(state_variables, saved):
                    var.assign(value)

            def restore_where(ok, grads_and_vars, saved, *unused):
                del grads_and_vars, unused
                return _put_back_where(tf.logical_not(ok), list(zip(state_variables, saved)))

        args = (grads_and_vars, snapshot)
        if ready is not None:
            apply_now = apply_update

            def apply_update(grads_and_vars, snapshot, ready):
                # Only every k-th step updates (a cond: the optimizer's update
                # is the expensive part, and it changes its own state).
                numerics.replica_cond(ready, apply_now, lambda *a: None, (grads_and_vars, snapshot))

            args += (ready,)
        if self.guard is None:
            apply_update(*args)
            return tf.constant(0.0)
        return self.guard.guard(
            options.numerics,
            verdict,
            [summaries.variable_name(v) for _, v in checked],
            step,
            apply_update,
            restore=restore,
            args=args,
            in_xla=in_xla,
            restore_where=restore_where,
        )

    def _unscale(self, grads_and_vars):
        """True-scale gradients for transforms, and the scale to multiply back by.

        The scale is a power of two, so unscaling and rescaling are exact.
        """
        scale = self.optimizer.dynamic_scale

        def divide(g):
            return g / tf.cast(scale, g.dtype)

        return [(map_values(divide, g), v) for g, v in grads_and_vars], scale

    def _summary_step(self, step):
        """The step TF1's summaries write at: a `global_step` variable's, after this update."""
        counter = self.options.global_step
        if counter is not None and counter is not USE_GLOBAL_STEP:
            return tf.cast(tf.convert_to_tensor(counter), tf.int64) + 1
        return step

    def _summarize(self, grads_and_vars, step, in_xla, ready=None):
        """`summarize_gradients` in a function of the user's (the model's step records instead)."""
        if in_xla:
            gradients_lib.warn_once(
                self.warned,
                "xla-summaries",
                "keras_trainop: `summarize_gradients=True` cannot write summaries "
                "from inside your jit_compile=True function (tf.summary has no XLA "
                "kernel), so no gradient summary is written. Compile it with "
                "jit_compile=False, or train with model.fit, which writes them "
                "in every mode.",
            )
            return
        step = self._summary_step(step)
        if ready is None:
            summaries.add_gradients_summaries(grads_and_vars, step=step)
            return
        # Accumulating: only the step that updates writes.
        with tf.summary.record_if(tf.logical_and(tf.summary.should_record_summaries(), ready)):
            summaries.add_gradients_summaries(grads_and_vars, step=step)
