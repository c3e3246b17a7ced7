"""The step on Keras's JAX backend: compute, decide once, return the new state.

Keras's JAX trainer is stateless. It calls `model.train_step(state, data)`
with the values of four lists of variables (trainable, non-trainable,
optimizer, metrics), takes their new values back, and writes them into the
variables at the end of an epoch, or when a callback asks. keras_trainop's
step on JAX is that function, with the stages of the TensorFlow step:

1. the loss and its gradients: `jax.value_and_grad` over Keras's own
   `compute_loss_and_updates` (the forward pass, the loss, the
   BatchNormalization statistics as values);
2. the check: one finiteness verdict for the step (the loss; with "all" and
   "skip" every gradient too);
3. the transforms, in a stateless scope where the variables and the
   transforms' own state read as this step's values;
4. the commit: one conditional of two branches: keep the state as it was,
   or apply (with accumulation: add, where a blocked or skipped step adds
   nothing, or update from the mean): the optimizer's update, the
   transforms' new state, the gradient sums and the global step; the forward
   pass's statistics and the metrics (with the skip policy) are selected by
   the same verdict. A blocked or skipped step returns the state it got, so
   it changes nothing by construction.

keras_trainop's own state (the failure record, the transforms' state, the
gradient sums, the skip counters, a global step variable) rides in the
metrics list: `TrainOpModel.metrics_variables`
appends it on JAX, so Keras carries it through the step and writes it back as
it does the metrics'.

A failed check cannot raise inside a jitted function: the step blocks this
and every later update until the record is read, returns the failed step's
number in the logs, and the host (`keras_trainop.jax_host`) writes the state
back and raises `kt.NonFiniteError`, in eager and jit mode alike.
"""

import warnings

import jax
import keras
from keras import ops

from keras_trainop import _keras_private as private
from keras_trainop.backend_step import BackendStep
from keras_trainop.gradient_buffer import global_norm
from keras_trainop.jax_host import FAILED_STEP


class JaxStep(BackendStep):
    """One model's training step on the JAX backend (Keras's stateless `train_step`).

    Args:
        options: the `TrainOptions` of the step.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is understood).

    Its own state, and what the JAX and PyTorch steps share, is
    `BackendStep`'s.
    """

    def train_step(self, model, state, data, compute_loss_and_updates=None):
        """Keras's stateless `train_step(state, data)` with keras_trainop's options.

        `compute_loss_and_updates`: what is differentiated, with the signature
        and return value of Keras's `model.compute_loss_and_updates` (the
        default): `(loss, (unscaled_loss, y_pred, non_trainable_values,
        metrics_values))`.
        """
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(compute_loss_and_updates or model.compute_loss_and_updates, has_aux=True)
        (_, aux), grads = grad_fn(
            trainable, non_trainable, metrics_values, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_values,
        )
        loss, y_pred, forward_state, metrics_values = aux

        riding = self.riding_variables()
        split = len(metrics_values) - len(riding)
        own = dict(zip(map(id, riding), metrics_values[split:]))
        variables = model.trainable_variables
        scope = list(zip(variables, trainable)) + list(zip(model.non_trainable_variables, non_trainable))
        scope += [(v, own[id(v)]) for v in riding]
        values = _Values(variables, trainable, optimizer_values, scope, model.non_trainable_variables,
                         forward_state)
        selected = self.variables(variables, owner=f"model {model.name!r}")
        pairs = [(grads[values.position[id(v)]], v) for v in selected]

        verdict = self.check(loss, pairs, own, optimizer_values)
        ok = None if verdict is None else verdict["ok"]
        branches, choice = self.commit(values, self.unscale(pairs, optimizer_values), own, ok, non_trainable)
        # One decision: a single conditional, or none.
        trainable, optimizer_values, non_trainable, committed, observed = (
            branches[0]() if choice is None else ops.cond(choice, branches[1], branches[0])
        )

        before = metrics_values[:split]
        logs, metrics_values = private.jax_update_metrics(
            model, before + [own[id(v)] for v in riding], loss, x, y, y_pred, sample_weight
        )
        keras_metrics = metrics_values[:split]
        if (verdict is not None and self.policy.skip) or self.recorder.log_metrics:
            keras_metrics, logs = self._own_metrics(model, before, keras_metrics, verdict, observed)
        new = dict(zip(map(id, self._committed()), committed))
        if verdict is not None:
            new.update(zip(map(id, self.record), verdict["record"]))
            new.update(zip(map(id, self.counters), verdict["counters"]))
        own_values = [ops.cast(new[id(v)], v.dtype) for v in riding]
        logs = dict(logs)
        if self.record and not (self.policy.skip and self.policy.max_consecutive is None):
            logs[FAILED_STEP] = own_values[0]
        return logs, (trainable, non_trainable, optimizer_values, keras_metrics + own_values)

    def _committed(self):
        """The state the commit writes: the transforms', the sums, the global step, the records."""
        return self.transform_variables() + self.sums + self.count + self.global_step + self._buffer_variables()

    def commit(self, values, pairs, own, ok, non_trainable):
        """The step's two branches (zero-argument functions), and which one runs (None: the first, alone).

        Each branch returns `(trainable, optimizer, non-trainable, committed,
        observed)` values: `committed` in the order of `_committed()`,
        `observed` the global norms before and after the transforms and 1.0
        for an update (zeros for a step that does not update).

        `ok`: the verdict (None without a check). Without accumulation the
        branches are "as it was" (a blocked or skipped step: the state it got,
        the forward pass's too) and "update". With accumulation they are
        "add" and "update from the mean" (the k-th kept step); a blocked or
        skipped step takes "add" with nothing to add, so that one conditional
        of two branches decides every step (a third branch cost the MLP of
        `benchmarks/bench_backend.py` 15%). A kept step keeps what its
        forward pass computed (BatchNormalization statistics); an update also
        runs the update ops.
        """
        old = {id(v): own[id(v)] for v in self._committed()}

        def update(pairs, sums_after):
            # What a loss-scale optimizer gets must stay non-finite if the
            # gradients overflowed: a transform (a clip) could hide it.
            finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g, _ in pairs])) if self.scaled else None
            raw = pairs
            with keras.StatelessScope(state_mapping=values.scope):
                pairs, transform_state = self.transform(pairs)
            forward = self.run_update_ops(values)
            trainable, optimizer_values = self._apply(self.rescale(pairs, values.optimizer, finite), values)
            new = dict(old)
            new.update(zip(map(id, self.transform_variables()), transform_state))
            new.update(zip(map(id, self.sums + self.count), sums_after))
            if self.global_step:
                iterations = self._index(self.optimizer.iterations)
                applied = optimizer_values[iterations] - values.optimizer[iterations]
                step = self.global_step[0]
                new[id(step)] = old[id(step)] + ops.cast(applied, step.dtype)
            observed = self.observe(raw, pairs, values, new, finite)
            new.update(zip(map(id, self._buffer_variables()), observed.pop("buffer", [])))
            return trainable, optimizer_values, forward, [new[id(v)] for v in self._committed()], observed["norms"]

        if not self.sums:
            if ok is None:
                return [lambda: update(pairs, [])], None
            unchanged = (values.trainable, values.optimizer, non_trainable, [old[id(v)] for v in self._committed()],
                         _nothing_observed())
            return [lambda: unchanged, lambda: update(pairs, [])], ok
        k = self.options.gradient_accumulation_steps
        sums = [old[id(v)] for v in self.sums]
        (count,) = (old[id(v)] for v in self.count)
        kept = True if ok is None else ok
        # (A select, not a product: a blocked step's gradients may be inf or nan.)
        added = [g if ok is None else ops.where(ok, g, ops.zeros_like(g)) for g, _ in pairs]
        totals = [s + ops.cast(g, s.dtype) for s, g in zip(sums, added)]
        forward = values.forward if ok is None else [ops.where(ok, a, b) for a, b in zip(values.forward, non_trainable)]

        def mean():
            averaged = [(t / k, v) for t, (_, v) in zip(totals, pairs)]
            return update(averaged, [ops.zeros_like(s) for s in sums] + [ops.zeros_like(count)])

        def add():
            new = dict(old)
            new.update(zip(map(id, self.sums + self.count), totals + [count + ops.cast(kept, count.dtype)]))
            return (values.trainable, values.optimizer, forward, [new[id(v)] for v in self._committed()],
                    _nothing_observed())

        return [add, mean], ops.logical_and(kept, count + 1 >= k)

    def observe(self, raw, pairs, values, new, finite):
        """This update's statistics: `{"norms": [before, after, 1.0], "buffer": new values}`.

        Recorded only for an update that applies (under a loss-scale
        optimizer, only if what it gets is finite).
        """
        observed = {"norms": _nothing_observed()}
        if self.recorder.log_metrics:
            before = global_norm([g for g, _ in raw])
            after = global_norm([g for g, _ in pairs]) if self.options.transforms else before
            applied = 1.0 if finite is None else ops.cast(finite, "float32")
            observed["norms"] = [before * applied, after * applied, ops.convert_to_tensor(applied, "float32")]
        if self.buffer is not None:
            step = ops.cast(values.optimizer[self._index(self.optimizer.iterations)], "int32") + 1
            summary_step = new[id(self.global_step[0])] if self.global_step else step
            old = [new[id(v)] for v in self.buffer.variables]
            observed["buffer"] = self.buffer.record(old, step, summary_step, raw, pairs, finite)
        return observed

    def run_update_ops(self, values):
        """The non-trainable variables' values after the update ops (TF1's barrier before the update).

        On a stateless backend an update op changes what it assigns only if
        that rides in the step's state: the model's non-trainable variables.
        """
        if not self.options.update_ops:
            return values.forward
        mapping = list(zip(values.variables, values.trainable))
        mapping += list(zip(values.forward_variables, values.forward))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            for op in self.options.update_ops:
                op()
        changed = [v for v, value in mapping[: len(values.trainable)] if scope.get_current_value(v) is not value]
        if changed or len(scope.state_mapping) != len(mapping):
            what = f"the trainable variable {changed[0].path!r}" if changed else "a variable outside the model"
            raise ValueError(
                "On the JAX backend `update_ops` may change only the model's non-trainable "
                "variables (its state is values carried from step to step; nothing else is "
                f"written back). An update op assigned {what}. "
                f"Received: update_ops={self.options.update_ops!r}"
            )
        return [scope.get_current_value(v) for v in values.forward_variables]

    def _apply(self, pairs, values):
        """The optimizer's update of the selected variables; the others keep their values."""
        optimizer = self.optimizer
        given = {id(v): g for g, v in pairs}
        own = private.optimizer_variables_built_for(optimizer)
        grads = [given.get(id(v)) for v in own]
        current = [values.trainable[values.position[id(v)]] for v in own]
        with warnings.catch_warnings():
            # Unselected variables (and pairs a transform dropped) get no
            # gradient, as on TensorFlow: Keras then leaves them and their
            # slots as they are, and says so in a warning meant for a loss
            # that does not read them.
            warnings.filterwarnings("ignore", message="Gradients do not exist")
            new_values, optimizer_values = optimizer.stateless_apply(values.optimizer, grads, current)
        trainable = list(values.trainable)
        for variable, value in zip(own, new_values):
            trainable[values.position[id(variable)]] = value
        return trainable, optimizer_values

    def _own_metrics(self, model, before, after, verdict, observed):
        """The metrics after keras_trainop's part: the kept step's, the skip counted, the norms logged.

        With the skip policy a skipped batch stays out of the loss and the
        metrics (one nan would turn the epoch's mean into nan). With
        `GradientTensorBoard(metrics=True)` the global norms of each update
        are logged as `grad_norm` (and `clipped_grad_norm`).
        """
        skip = verdict is not None and self.policy.skip
        kept = [ops.where(verdict["ok"], a, b) for a, b in zip(after, before)] if skip else list(after)
        references = model.metrics_variables[: len(before)]
        recorder, trackers = self.recorder, model.train_metrics
        with keras.StatelessScope(state_mapping=list(zip(references, kept))) as scope:
            if skip:
                trackers.skipped_steps.update_state(ops.cast(verdict["skipped"], "float32"))
            if recorder.log_metrics:
                before_norm, after_norm, weight = observed
                recorder.norm_tracker.update_state(before_norm, sample_weight=weight)
                if recorder.clipped_norm_tracker is not None:
                    recorder.clipped_norm_tracker.update_state(after_norm, sample_weight=weight)
            logs = model.get_metrics_result()
        values = [scope.get_current_value(v) for v in references]
        return [k if v is None else v for k, v in zip(kept, values)], logs


class _Values:
    """The values a step starts from, and those its forward pass computed.

    Attributes:
        variables, trainable: the model's trainable variables and their
            values at the step's start; `position`: the id of one -> its index.
        optimizer: the values of the optimizer's variables.
        scope: `(variable, value)` pairs for the transforms' stateless scope.
        forward_variables, forward: the model's non-trainable variables, and
            their values after the forward pass.
    """

    def __init__(self, variables, trainable, optimizer, scope, forward_variables, forward):
        self.variables = variables
        self.trainable = trainable
        self.position = {id(v): i for i, v in enumerate(variables)}
        self.optimizer = optimizer
        self.scope = scope
        self.forward_variables = forward_variables
        self.forward = forward


def _nothing_observed():
    """The norms of a step that is no update, and their weight 0."""
    return [ops.zeros((), "float32")] * 3

