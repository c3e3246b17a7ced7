"""The step on Keras's PyTorch backend: compute, decide once, write once.

Keras's PyTorch trainer is stateful and eager: its `train_step(data)` runs
the forward pass, `loss.backward()`, and the optimizer's in-place update.
keras_trainop's step on PyTorch has the stages of the other backends' steps:

1. the loss and its gradients: the forward pass (which writes
   BatchNormalization's statistics, as on TensorFlow), then
   `torch.autograd.grad` of the (loss-scaled) loss for the variables being
   trained (None for a variable the loss does not read, as on TensorFlow);
2. the check: one finiteness verdict for the step (the loss; with "all" and
   "skip" every gradient too), computed as values;
3. the decision: the host reads whether the step passes, once per checked
   step (the one host synchronisation a check adds on PyTorch; Keras's own
   `LossScaleOptimizer` reads its finiteness the same way, with `ops.cond`);
   only a failed step computes its full verdict (the record, the counters);
4. a blocked or skipped step puts back the statistics its forward pass wrote
   and writes only its record or its skip counters; a kept step runs the
   transforms on values and then writes once: the update ops, the
   optimizer's update, the transforms' new state, the gradient sums, the
   global step, the gradient records.

A failed check raises `kt.NonFiniteError` at once: the step runs on the host.
`keras_trainop.model` calls `run` from its `train_step`, and from
`minimize` in a user's own `train_step`.
"""

import math

import torch
from keras import ops

from keras_trainop.backend_step import BackendStep
from keras_trainop.gradient_buffer import global_norm


class TorchStep(BackendStep):
    """One model's training step on the PyTorch backend.

    Args:
        options: the `TrainOptions` of the step.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is understood).

    Its own state, and what the JAX and PyTorch steps share, is
    `BackendStep`'s.
    """

    def run(self, forward, candidates, state_variables=(), on_kept=None):
        """Runs one step, with `StepPipeline.run`'s contract: returns `(aux, skipped)`.

        Args:
            forward: zero-argument callable returning `(loss, aux)`.
            candidates: zero-argument callable returning the trainable
                variables `variables_to_train=None` selects (called after
                `forward`, which may build the model).
            state_variables: the variables the forward pass may write
                (BatchNormalization's statistics), or a zero-argument
                callable returning them: put back if the step is not applied.
            on_kept: with the skip policy, a callable of `aux` run only by a
                step that is not skipped (the model's metrics), or None.

        The step runs eagerly, every time: what it can, it looks up once
        (the selected variables) or only where it is needed (the optimizer's
        values under a loss-scale optimizer or for a failed check).
        """
        checking = self.policy.enabled
        forward_state = []
        if checking:
            own = {id(v) for v in self.riding_variables()}
            listed = state_variables() if callable(state_variables) else state_variables
            forward_state = [v for v in listed if id(v) not in own]
        saved = [ops.copy(v.value) for v in forward_state]
        loss, aux = forward()
        selected = self.selected if self.built else self.variables(candidates())
        if not self.built:  # a model built by its first step
            self.build_transforms(selected)
            self.prepare_recording(1)
        pairs = list(zip(self.gradients(loss, selected), selected))
        with torch.no_grad():
            optimizer_values = [v.value for v in self.optimizer.variables] if self.scaled else None
            if checking and not self.finite(loss, pairs):  # the one host read of a checked step
                own_values = {id(v): v.value for v in self.riding_variables()}
                optimizer_values = [v.value for v in self.optimizer.variables]
                verdict = self.check(loss, pairs, own_values, optimizer_values)
                for variable, value in zip(self.counters, verdict["counters"]):
                    variable.assign(value)
                for variable, value in zip(forward_state, saved):
                    variable.assign(value)
                if self.policy.skip and bool(verdict["skipped"]):
                    return aux, 1.0
                for variable, value in zip(self.record, verdict["record"]):
                    variable.assign(value)
                raise self.error()
            if self.counters:  # a kept step ends a run of skipped ones
                self.counters[1].assign(0)
            self.commit(self.unscale(pairs, optimizer_values), optimizer_values)
        if on_kept is not None:
            on_kept(aux)
        return aux, 0.0

    def finite(self, loss, pairs):
        """Whether the step passes its check: `check`'s verdict, read on the host, cheaply.

        The loss, and with "all" and "skip" the sum of every gradient's sum:
        finite exactly when every element is, unless a sum of finite values
        overflows, which the exact per-gradient check then rules out (a
        failure is rare; its record comes from `check`).
        """
        ok = _read_finite(loss)
        grads = [g for g, _ in pairs if g is not None]
        if not (ok and self.policy.check_gradients and grads and not self.scaled):
            return ok
        if _read_finite(torch.stack([torch.sum(g, dtype=torch.float32) for g in grads]).sum()):
            return True
        return all(_read_finite(g) for g in grads)

    def gradients(self, loss, variables):
        """The gradients of the (loss-scaled) loss for `variables`; None where the loss does not read one."""
        if not variables:
            return []
        scaled = self.optimizer.scale_loss(loss)
        return list(torch.autograd.grad(scaled, [v.value for v in variables], allow_unused=True))

    def commit(self, pairs, optimizer_values):
        """The kept step's writes: its gradients added to the sums, or the update.

        Without accumulation every kept step updates; with it the k-th adds
        its gradients and updates from the mean, the others only add theirs
        (which of the two is read from the counter on the host, as Keras's
        own accumulation does on PyTorch).
        """
        if self.sums:
            k = self.options.gradient_accumulation_steps
            (count,) = self.count
            if int(count.value) + 1 < k:
                # In place, as Keras's own `assign` writes on PyTorch: one op a gradient.
                for total, (g, _) in zip(self.sums, pairs):
                    if g is not None:
                        total.value.add_(g.to(total.value.dtype))
                count.assign(count.value + 1)
                return
            pairs = [((s.value if g is None else s.value + g.to(s.value.dtype)) / k, v)
                     for s, (g, v) in zip(self.sums, pairs)]
            for total in self.sums:
                total.value.zero_()
            count.assign(0)
        self.update(pairs, optimizer_values)

    def update(self, pairs, optimizer_values):
        """Transforms, update ops, the optimizer's update, and the state that goes with an update."""
        # What a loss-scale optimizer gets must stay non-finite if the
        # gradients overflowed: a transform (a clip) could hide it.
        finite = _all_finite([g for g, _ in pairs]) if self.scaled else None
        raw = pairs
        pairs, transform_state = self.transform(pairs)
        for op in self.options.update_ops:
            op()
        iterations = self.optimizer.iterations
        before = ops.copy(iterations.value) if self.global_step or self.buffer is not None else None
        applied = [(g, v) for g, v in self.rescale(pairs, optimizer_values, finite) if g is not None]
        if applied:
            self.optimizer.apply([g for g, _ in applied], [v for _, v in applied])
        for variable, value in zip(self.transform_variables(), transform_state):
            variable.assign(value)
        if self.global_step:
            (step,) = self.global_step
            step.assign(step.value + ops.cast(iterations.value - before, step.dtype))
        self.observe(raw, pairs, before, finite)

    def observe(self, raw, pairs, iterations_before, finite):
        """This update's statistics: the logged global norms, and the readers' ring buffer."""
        recorder = self.recorder
        applies = 1.0 if finite is None else ops.cast(finite, "float32")
        if recorder.log_metrics:
            before = global_norm([g for g, _ in raw if g is not None])
            after = global_norm([g for g, _ in pairs if g is not None]) if self.options.transforms else before
            recorder.norm_tracker.update_state(before * applies, sample_weight=applies)
            if recorder.clipped_norm_tracker is not None:
                recorder.clipped_norm_tracker.update_state(after * applies, sample_weight=applies)
        if self.buffer is not None:
            step = ops.cast(iterations_before, "int32") + 1
            summary_step = self.global_step[0].value if self.global_step else step
            variables = self.buffer.variables
            new = self.buffer.record([v.value for v in variables], step, summary_step,
                                     _present(raw), _present(pairs), finite)
            for variable, value in zip(variables, new):
                variable.assign(value)


class HostedTrainFunction:
    """Keras's PyTorch train function, with the gradient records of each call written to their readers."""

    def __init__(self, model, function):
        self.model = model
        self.function = function

    def __call__(self, data):
        step = self.model.train_pipeline
        with step.recorder.closing_on_error():
            logs = self.function(data)
        if step.buffer is not None:
            step.write_records(lambda variable: variable.value)
        return logs


def make(model, make_keras_train_function, force=False):
    """`model.train_function`: Keras's, made by `make_keras_train_function(force)`, hosted.

    The step's own state is made first, outside the function Keras may
    compile (`jit_compile=True`: `torch.compile`).
    """
    step = model.train_pipeline
    if model.built:
        step.variables(model.trainable_variables, owner=f"model {model.name!r}")
        if not step.built:
            step.build_transforms(step.selected)
    if step.built:
        step.prepare_recording(1)  # Keras refuses steps_per_execution > 1 on PyTorch
    unwrapped = model.train_function
    make_keras_train_function(force)
    if model.train_function is not unwrapped:  # Keras made a new one
        model.train_function = HostedTrainFunction(model, model.train_function)
    return model.train_function


def _read_finite(tensor):
    """Whether every element of `tensor` is finite, read on the host.

    A one-element tensor is read as a Python number (`item()`): `isfinite`
    and `all` on it cost about 25 us a step on a CPU, a third of what the
    default check costs plain Keras's step on the MLP of `bench_backend.py`.
    """
    if tensor.numel() == 1:
        return math.isfinite(tensor.item())
    return bool(torch.isfinite(tensor).all())


def _all_finite(grads):
    present = [g for g in grads if g is not None]
    return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in present])) if present else True


def _present(pairs):
    return [(g, v) for g, v in pairs if g is not None]

