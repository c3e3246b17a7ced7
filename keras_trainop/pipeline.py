"""THE training step, shared by `TrainOpModel` and the functional API.

The step computes, decides once, and writes once. Each stage takes values and
returns values (each only where its option is set):

1. `run`: the forward pass and the loss under a `tf.GradientTape`, the loss
   scaled for a `LossScaleOptimizer`, and the gradients (the tape, or TF1's
   `gradients` for `aggregation_method`, `gate_gradients`, colocation);
2. `reduce`: under a distribution strategy, the gradients summed over the
   replicas once, so that everything after sees the global batch's gradient
   (the optimizer then applies them as given instead of reducing again after
   its own clipping, as plain Keras does);
3. `unscale`: true-scale gradients for a loss-scale optimizer, when
   something reads them;
4. `check`: the finiteness verdict of `check_numerics`, on the raw gradients
   (before any transform could hide an inf);
5. `accumulate`: with `gradient_accumulation_steps`, the mean of the
   micro-batches so far, and whether this step updates;
6. `transform`: the transforms in order, and their new state;
7. `observe`: statistics for `summarize_gradients` and `GradientTensorBoard`;
8. `rescale`: back to the loss scale for the optimizer;
9. the commit (`keras_trainop.commit`): the only writes, under the step's
   one decision. A blocked or skipped step writes nothing but its failure
   record; only what the forward pass itself wrote (BatchNormalization
   statistics) is put back.
"""

import keras
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop import finiteness
from keras_trainop import gradients as gradients_lib
from keras_trainop import replicas
from keras_trainop import summaries
from keras_trainop.accumulation import GradientAccumulator
from keras_trainop.commit import Commit, all_of
from keras_trainop.failures import FailureRecord
from keras_trainop.optimizers import check_accumulation, is_loss_scale_optimizer
from keras_trainop.options import USE_GLOBAL_STEP
from keras_trainop.telemetry import SUMMARIES, GradientRecorder
from keras_trainop.transforms.base import (
    build_child,
    child_variables,
    map_values,
    run_transforms,
    self_written_variables,
)
from keras_trainop.variables import select_variables


class StepPipeline:
    """One training step with TF1's `create_train_op` options.

    Args:
        options: the `TrainOptions` of the step.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is understood).
        record: the `FailureRecord` to write, if not the pipeline's own (one
            is made when `check_numerics` is on).
    """

    def __init__(self, options, optimizer, record=None):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`optimizer` must be a Keras 3 optimizer instance (TF1 "
                "`tf.compat.v1.train.Optimizer`s are not supported). "
                f"Received: optimizer={optimizer!r}"
            )
        self.warned = set()
        check_accumulation(options, optimizer, self.warned)
        self.options = options
        self.optimizer = optimizer
        if options.numerics.enabled and record is None:
            record = FailureRecord(options.numerics)
        self.failures = record if options.numerics.enabled else None
        self.accumulator = (
            GradientAccumulator(options.gradient_accumulation_steps) if options.accumulates else None
        )
        self.commit = Commit(options, optimizer, self.failures)
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
        """All state the step keeps between steps, beyond the optimizer's: saved with a model.

        The transforms' state, the gradient sums, the skip policy's counters,
        and a `global_step` given as a `keras.Variable` (a plain `tf.Variable`
        is the caller's to save).
        """
        state = self.transform_variables() + self.accumulator_variables()
        if self.failures is not None:
            state += self.failures.counters
        if isinstance(self.options.global_step, keras.Variable):
            state.append(self.options.global_step)
        return state

    # -- the step ---------------------------------------------------------

    def run(self, forward, candidates=None, state_variables=(), on_kept=None):
        """Runs one step: forward, gradients, update.

        Args:
            forward: zero-argument callable returning `(loss, aux)`: the
                scalar loss to minimise (unscaled) and anything to hand back.
            candidates: the trainable variables that `variables_to_train=None`
                selects, or a zero-argument callable returning them (called
                after `forward`, which may build a model lazily); None means
                the trainable variables `forward` reads.
            state_variables: non-trainable variables that `forward` may change
                (e.g. BatchNormalization statistics), or a zero-argument
                callable returning them; put back if the step's check fails.
            on_kept: with the skip policy, a callable of `aux` run only by a
                step that is not skipped (the model's metrics), or None.

        Returns:
            `(aux, skipped)`: forward's aux output, and a float32 scalar that is
            1.0 if the step was skipped (`SkipNonFinite`), else 0.0.
        """
        own = {id(v) for v in self.state_variables()}  # never changed by a failed step
        if callable(state_variables):
            state_variables = state_variables()
        forward_state = [v for v in state_variables if id(v) not in own] if self.failures else []
        saved = [tf.identity(tf.convert_to_tensor(v)) for v in forward_state]
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
            loss, list(zip(grads, variables)), list(zip(forward_state, saved)), on_kept=on_kept, aux=aux
        )
        return aux, skipped

    def update(self, loss, grads_and_vars, forward_state=(), on_kept=None, aux=None):
        """The stages after the gradients, and the commit.

        Args:
            loss: the unscaled scalar loss, for the finiteness check.
            grads_and_vars: `(gradient, variable)` pairs of the scaled loss.
            forward_state: `(variable, value before the forward pass)` pairs
                to put back if the check fails.
            on_kept, aux: with the skip policy, `on_kept(aux)` runs only in a
                step that is not skipped.

        Returns:
            A float32 scalar: 1.0 if the step was skipped, else 0.0.
        """
        variables = [v for _, v in grads_and_vars]
        self._build(variables)
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64) + 1
        raw = self.reduce(grads_and_vars)
        grads, scale = self.unscale(raw)
        verdict = self.check(loss, raw)
        put_back = list(forward_state)
        if self.accumulator is None:
            # The rest of the step as values, before the decision.
            grads, state, finite = self.finish(step, raw, grads, scale, verdict)
            put_back += [(v, before) for v, before, _ in state if self._writes_own_state(v)]
            update, args = self.commit.apply, (grads, state, finite)
        else:
            # Every k-th kept step runs the rest of the step on the mean.
            update, args = self._accumulate, (grads, scale, step)
        names = [] if self.failures is None or is_loss_scale_optimizer(self.optimizer) else [
            summaries.variable_name(v) for v in variables
        ]
        return self.commit(verdict, step, update, args, put_back, names, on_kept, aux)

    # -- the stages -------------------------------------------------------

    def _build(self, variables):
        opt = self.optimizer
        if not opt.built:
            if replicas.in_replica_context():
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
        self.build_transforms(variables)

    def reduce(self, grads_and_vars):
        """Under a distribution strategy, the gradients summed over replicas, once."""
        if not replicas.in_replica_context():
            return list(grads_and_vars)
        private.apply_gradients_as_given(self.optimizer)
        return replicas.all_reduce(grads_and_vars)

    def unscale(self, grads_and_vars):
        """True-scale gradients for the stages, and the loss scale to multiply back by.

        Only with a loss-scale optimizer and a stage that reads the gradients
        (the scale is a power of two: unscaling and rescaling are exact).
        """
        options = self.options
        reads = (
            bool(options.transforms)
            or options.summarize_gradients
            or self.recorder.reads_gradients
            or self.accumulator is not None
        )
        if not (is_loss_scale_optimizer(self.optimizer) and reads):
            return grads_and_vars, None
        scale = self.optimizer.dynamic_scale

        def divide(g):
            return g / tf.cast(scale, g.dtype)

        return [(map_values(divide, g), v) for g, v in grads_and_vars], scale

    def check(self, loss, raw):
        """The finiteness verdict, or None without `check_numerics`.

        Under a loss-scale optimizer an overflow of the gradients is the
        optimizer's business (it skips the step and halves the scale, as in
        plain Keras): only the loss is checked.
        """
        if self.failures is None:
            return None
        checked = [] if is_loss_scale_optimizer(self.optimizer) else [g for g, _ in raw]
        return finiteness.verdict(self.options.numerics, loss, checked)

    def finish(self, step, raw, grads_and_vars, scale, verdict=None):
        """The stages after the check, as values: `(pairs to apply, transform state, finite)`.

        `finite`: with a loss-scale optimizer, whether what it gets is finite
        (None otherwise). The statistics record an update only if it applies.
        """
        finite = None if scale is None else finiteness.all_finite(
            [summaries.gradient_values(g) for g, _ in raw if g is not None]
        )
        transformed, state = self.transform(grads_and_vars)
        ok = None if verdict is None else verdict.ok
        self.observe(step, grads_and_vars, transformed, applies=all_of(ok, finite))
        return self.rescale(transformed, scale, finite), state, finite

    def _accumulate(self, grads_and_vars, scale, step):
        """A kept step with accumulation: adds to the sums, or, every k-th, updates from their mean."""
        accumulator = self.accumulator

        def update(grads_and_vars, step):
            mean = accumulator.mean(grads_and_vars)
            # Under a loss-scale optimizer the accumulated gradient is checked:
            # one overflow among the k micro-batches skips the update.
            grads, state, finite = self.finish(step, mean, mean, scale)
            self.commit.apply(grads, state, finite)
            accumulator.reset()

        def add(grads_and_vars, step):
            del step
            accumulator.add(grads_and_vars)

        replicas.replica_cond(accumulator.ready(), update, add, (grads_and_vars, step))

    def transform(self, grads_and_vars):
        """The transforms in order: the pairs to apply, and `(variable, before, new)` of their state."""
        return run_transforms(self.options.transforms, grads_and_vars)

    def _writes_own_state(self, variable):
        """Whether `variable` belongs to a transform that assigns it itself (the older protocol)."""
        return id(variable) in {id(v) for t in self.options.transforms for v in self_written_variables(t)}

    def observe(self, step, before, after, applies=None):
        """Statistics for the summaries and the callbacks (a step not applied records nothing)."""
        if self.options.summarize_gradients and SUMMARIES not in self.recorder.readers:
            self._summarize(after, step)
        # A step that is not applied is not recorded: its number is the next
        # applied update's.
        self.recorder.record(
            step, self._summary_step(step), before, after, bool(self.options.transforms),
            applies=applies,
        )

    def rescale(self, grads_and_vars, scale, finite):
        """The gradients scaled back for a loss-scale optimizer, poisoned unless `finite`.

        If the raw gradients overflowed, the rescaled ones are NaN, so that a
        transform such as clipping cannot hide the overflow from the optimizer,
        which then skips the step and halves the scale.
        """
        if scale is None:
            return grads_and_vars

        def back(g):
            g = g * tf.cast(scale, g.dtype)
            return tf.where(finite, g, tf.constant(float("nan"), g.dtype))

        return [(map_values(back, g), v) for g, v in grads_and_vars]

    # -- summaries in a function of the user's -------------------------------

    def _summary_step(self, step):
        """The step TF1's summaries write at: a `global_step` variable's, after this update."""
        counter = self.options.global_step
        if counter is not None and counter is not USE_GLOBAL_STEP:
            return tf.cast(tf.convert_to_tensor(counter), tf.int64) + 1
        return step

    def _summarize(self, grads_and_vars, step):
        """`summarize_gradients` in the functional API (a model's step records instead)."""
        if private.in_xla_context():
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
        summaries.add_gradients_summaries(grads_and_vars, step=self._summary_step(step))
