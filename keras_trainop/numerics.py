"""Finiteness: block a non-finite step before it reaches any variable, then say so.

`tf.debugging.check_numerics` is not enough: in TF1 graph mode it did not
block the update, and under XLA it is silently dropped. keras_trainop computes
one finiteness flag per step (the loss, and with `check_numerics="all"` or the
skip policy every gradient, in a few grouped sums: `gradient_flags`) and then:

- raise policy, eager and graph mode: an in-graph `tf.debugging.Assert` of
  the flag, and every state change of the update (assignments, the
  optimizer's `iterations += 1`) waits for it (`run_after`), so a failing
  step stops before any update runs. The update is not inside a `tf.cond`,
  and its arithmetic does not wait: a check of the loss alone costs nothing,
  and the check of every gradient costs what any all-or-nothing check must,
  a barrier between the last gradient and the first assignment, plus one
  sum over the gradients.
- XLA, where `Assert` is dropped, and the skip policy: the update runs under
  `tf.cond(flag, update, on_failure)`. Under XLA the failing step is recorded
  in a variable, every later step of the same execution is blocked too, and
  the caller reads the record after the call (`raise_if_failed`).

On failure, state the forward pass changed (BatchNormalization statistics) is
put back, and the record keeps the step, what failed, and one flag per
gradient. The flags come from the check's own sums (on the raise path in
graph mode they are written with `tf.where` on every step); only the names
are worked out, on the host, when a step fails.
"""

import collections
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop.summaries import gradient_values
from keras_trainop.variables import state_variable

_MARKER = "keras_trainop: non-finite training step"

# What a failure record says (`FailureGuard.what`).
_LOSS, _GRADIENTS, _CONSECUTIVE = 1, 2, 4


class SkipNonFinite:
    """`check_numerics` policy: skip non-finite steps and go on training.

    A step whose loss or any gradient is inf or nan applies no update (weights,
    optimizer slots and `iterations` unchanged). `TrainOpModel` reports the
    number of skipped steps of the epoch in the logs as `skipped_steps`.

    Args:
        max_consecutive: None, or a positive int: after this many consecutive
            skipped steps, the next non-finite step raises `NonFiniteError`.
    """

    def __init__(self, max_consecutive=None):
        if max_consecutive is not None and not (
            isinstance(max_consecutive, int)
            and not isinstance(max_consecutive, bool)
            and max_consecutive >= 1
        ):
            raise ValueError(
                "`max_consecutive` must be None or an int >= 1. "
                f"Received: max_consecutive={max_consecutive!r}"
            )
        self.max_consecutive = max_consecutive

    def __repr__(self):
        return f"SkipNonFinite(max_consecutive={self.max_consecutive!r})"

    def __eq__(self, other):
        return isinstance(other, SkipNonFinite) and other.max_consecutive == self.max_consecutive

    def __hash__(self):
        return hash((SkipNonFinite, self.max_consecutive))

    def get_config(self):
        return {"max_consecutive": self.max_consecutive}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


keras.saving.register_keras_serializable(package="keras_trainop")(SkipNonFinite)


class NumericsPolicy:
    """What `check_numerics` asks for, resolved from its accepted values.

    Accepted: False; True or "loss" (TF1: check the loss, raise); "all" (check
    the loss and every gradient, raise naming the variables); "skip" or a
    `SkipNonFinite` (check both, skip the step, go on).
    """

    def __init__(self, value):
        self.value = value
        if value is False:
            self.check_loss = self.check_gradients = self.skip = False
        elif value is True or value == "loss":
            self.check_loss, self.check_gradients, self.skip = True, False, False
        elif value == "all":
            self.check_loss, self.check_gradients, self.skip = True, True, False
        elif value == "skip" or isinstance(value, SkipNonFinite):
            self.check_loss, self.check_gradients, self.skip = True, True, True
        else:
            raise ValueError(
                "`check_numerics` must be False, True, \"loss\", \"all\", \"skip\" or "
                f"a kt.SkipNonFinite(...). Received: check_numerics={value!r}"
            )
        self.max_consecutive = value.max_consecutive if isinstance(value, SkipNonFinite) else None

    @property
    def enabled(self):
        return self.check_loss


class NonFiniteError(tf.errors.InvalidArgumentError):
    """A training step met an inf or nan; its update was not applied.

    A subclass of `tf.errors.InvalidArgumentError`, the error TF1's
    `check_numerics` raised, so existing `except` clauses keep working.

    Attributes:
        step: the 1-based number of the failing step (`optimizer.iterations`
            after the step, had it been applied).
        what: what was not finite: `"loss"`, `"gradients"`, or both.
        variables: the `variable.path`s whose gradients were not finite.
    """

    def __init__(self, step, what="loss", variables=(), consecutive=None, cause=None):
        self.step = step
        self.what = what
        self.variables = list(variables)
        if consecutive is not None:
            message = (
                f"keras_trainop: {consecutive} consecutive steps had an inf or nan "
                f"{what} and were skipped (SkipNonFinite(max_consecutive="
                f"{consecutive - 1})); the last was step {step}, whose update was not "
                "applied."
            )
        else:
            message = (
                f"keras_trainop: the {describe(what, variables)} inf or nan at step "
                f"{step}. The update of step {step} was not applied: weights, "
                "optimizer state and `iterations` are as they were before it."
            )
        super().__init__(None, None, message)
        self.__cause__ = cause


def describe(what, variables):
    """ "loss is", "gradients of 'a', 'b' are", ... for the error message."""
    names = ", ".join(repr(v) for v in variables)
    grads = f"gradients of {names} are" if names else "gradients are"
    if what == "loss":
        return "loss is"
    if what == "gradients":
        return grads
    return f"loss and the {grads}"


def all_finite(tensors):
    """A scalar bool tensor: True when every element of every tensor is finite.

    The same grouped sums as the gradient check (`gradient_flags`), reduced.
    """
    return tf.reduce_all(gradient_flags(tensors)[0])


_IN_PLACE = 1 << 16  # elements: a larger gradient is checked where it is, not copied


def gradient_flags(grads):
    """Per-tensor finiteness of `grads` (no None), in few ops whatever their number.

    A large gradient is reduced where it is; small ones are stacked per
    (dtype, shape), one reduction per group that keeps one flag per tensor.
    Each reduction is a plain sum: a sum is finite only if every element is,
    and a float sum is several times faster on a CPU than
    `reduce_all(is_finite(x))` (a bool reduction) or a sum of `x * 0` (a
    second pass). A sum of finite elements can still overflow, so when any
    sum is not finite the flags are worked out again, exactly, from sums of
    `x * 0` (0 where every element is finite, nan otherwise, and a sum of
    zeros cannot overflow), in a `tf.cond` branch that a finite step never
    runs. A nested XLA cluster would fuse it all into one kernel, but its
    launch waits for every gradient and measured slower on a CPU than these
    few ops.

    Returns:
        `(flags, order)`: a bool vector with one flag per gradient, True when
        finite, and the index in `grads` of each flag.
    """
    parts, order, groups = [], [], {}  # parts: (tensor, axes to reduce)
    for i, t in enumerate(grads):
        size = t.shape.num_elements()
        if size is not None and size <= _IN_PLACE:
            groups.setdefault((t.dtype, tuple(t.shape)), []).append(i)
        else:
            parts.append((tf.reshape(t, [1, -1]), [1]))
            order.append(i)
    for (_, shape), indices in groups.items():
        members = [grads[i] for i in indices]
        # One member: a reshape, not a copy.
        stacked = tf.stack(members) if len(members) > 1 else tf.expand_dims(members[0], 0)
        parts.append((stacked, list(range(1, len(shape) + 1))))
        order.extend(indices)

    def flags_of(reduce):
        flags = [tf.math.is_finite(reduce(t, axes)) for t, axes in parts]
        return flags[0] if len(flags) == 1 else tf.concat(flags, 0)

    quick = flags_of(tf.reduce_sum)
    flags = tf.cond(tf.reduce_all(quick), lambda: quick, lambda: flags_of(_sum_of_zeros))
    return flags, order


def _sum_of_zeros(t, axes):
    # x * 0 is 0 where x is finite and nan elsewhere; a sum of zeros cannot overflow.
    return tf.reduce_sum(t * tf.zeros([], t.dtype), axis=axes)


def _cross_replica_cond(ok, true_fn, false_fn, args):
    """`tf.cond(ok, true_fn(*args), false_fn(*args))` around code that calls `merge_call`.

    A strategy that synchronises through `merge_call` (MirroredStrategy on CPU,
    for one) cannot run a `tf.cond` in replica context whose branch calls it,
    and `optimizer.apply_gradients` does. As Keras's LossScaleOptimizer does,
    the cond runs in cross-replica context and each branch runs per replica.
    """

    def cross_replica(distribution, ok, args):
        ok = distribution.experimental_local_results(ok)[0]

        def per_replica(fn):
            return lambda: distribution.extended.call_for_each_replica(fn, args=args)

        tf.cond(ok, per_replica(true_fn), per_replica(false_fn))

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, args))


def replica_cond(pred, true_fn, false_fn, args):
    """`tf.cond(pred, true_fn(*args), false_fn(*args))`, also where branches call `merge_call`.

    Both branches return nothing. Under a strategy that synchronises through
    `merge_call`, through `_cross_replica_cond`; elsewhere a plain `tf.cond`.
    """
    if private.needs_merge_call():
        _cross_replica_cond(pred, true_fn, false_fn, args)
    else:
        tf.cond(pred, lambda: _then_none(true_fn, args), lambda: _then_none(false_fn, args))


def _then_none(fn, args):
    fn(*args)


class Verdict(collections.namedtuple("Verdict", ["checked", "loss_ok", "ok"])):
    """A step's finiteness: `ok` (bool scalar, the same on every replica),
    `loss_ok`, and for the gradients checked: `checked`, None or a
    `(flags, indices)` pair, a bool vector (True: finite) and the index among
    those given (None gradients are not checked) of each flag's gradient."""


_GUARDS = weakref.WeakKeyDictionary()


class FailureGuard:
    """Runs an update only on finite steps; records failures and skips.

    Its variables live outside the model's weights: `failed_step` (0, or the
    step that failed), `failed_what` (bits: loss 1, gradients 2, consecutive
    limit 4), per-size gradient flags, and for the skip policy `skipped_total`
    and `consecutive`. There is one guard per optimizer
    (`FailureGuard.for_optimizer`), so that a step traced again (as
    `tf.function` does) reuses them instead of creating new ones.
    """

    @classmethod
    def for_optimizer(cls, optimizer):
        guard = _GUARDS.get(optimizer)
        if guard is None:
            guard = _GUARDS[optimizer] = cls()
        return guard

    def __init__(self):
        self.failed_step = state_variable(0, tf.int64, "keras_trainop_failed_step")
        self.failed_what = state_variable(0, tf.int32, "keras_trainop_failed_what")
        # Keras variables: a model with the skip policy keeps them among its
        # weights, so a resumed run goes on counting where it stopped.
        with tf.init_scope():
            self.skipped_total = _counter("skipped_steps_total")
            self.consecutive = _counter("consecutive_skipped_steps")
        self._flags = {}
        self.names = []
        self.max_consecutive = None

    def _flag_variable(self, size):
        if size not in self._flags:
            self._flags[size] = state_variable(
                np.zeros([size], bool), tf.bool, "keras_trainop_bad_gradients"
            )
        return self._flags[size]

    def verdict(self, policy, loss, grads):
        """Whether the step is finite, as `policy` asks: a `Verdict`.

        Args:
            policy: the `NumericsPolicy`.
            loss: the unscaled scalar loss.
            grads: the gradients to check (None entries allowed), if the
                policy checks gradients.
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        loss_ok, ok, checked = tf.reduce_all(tf.math.is_finite(loss)), None, None
        if policy.check_gradients and present:
            flags, order = gradient_flags([gradient_values(grads[i]) for i in present])
            checked = (flags, [present[j] for j in order])
            ok = tf.logical_and(loss_ok, tf.reduce_all(flags))
        ok = loss_ok if ok is None else ok
        if private.needs_merge_call():
            # Every replica must take the same decision (finite only if all
            # are) and report the same cause.
            bad = _any_replica(tf.stack([tf.logical_not(ok), tf.logical_not(loss_ok)]))
            ok, loss_ok = tf.unstack(tf.logical_not(bad))
        return Verdict(checked, loss_ok, ok)

    def guard(
        self,
        policy,
        verdict,
        names,
        step,
        update,
        restore=None,
        args=(),
        in_xla=False,
        restore_where=None,
    ):
        """Runs `update(*args)` only if the step is finite, as `policy` asks.

        Args:
            policy: the `NumericsPolicy`.
            verdict: the step's `Verdict`, from `verdict()`.
            names: the `variable.path` of each gradient given to `verdict()`,
                for the error.
            step: int64 scalar, the number of this step.
            update: callable doing the whole update from `args`.
            restore: optional callable run with `args` on failure instead
                (puts back state that the forward pass changed).
            restore_where: the same as `restore_where(ok, *args)`, written
                with `tf.where` (no control flow), returning its assign ops.
            args: the tensors `update` and `restore` work on, passed explicitly
                because under a distribution strategy both may run per replica.
            in_xla: whether the step is compiled by XLA, where `Assert` does
                nothing.

        Returns:
            A float32 scalar: 1.0 if the step was skipped, else 0.0.
        """
        checked, loss_ok, ok = verdict
        merge = private.needs_merge_call()
        self.names = list(names)
        self.max_consecutive = policy.max_consecutive
        has_flags = checked is not None
        flags = self._flag_variable(len(names)) if has_flags else None
        checked_indices = checked[1] if has_flags else []
        update_args = len(args)
        # Under a strategy each branch runs once per replica: everything it
        # reads travels as an argument, never through a closure.
        args = tuple(args) + (loss_ok, ok, checked[0] if has_flags else tf.constant(True))

        def on_failure(*all_args):
            args, (loss_ok, ok, finite) = all_args[:update_args], all_args[update_args:]
            if restore is not None:
                restore(*args)
            failed = tf.logical_not(ok)  # False for a step blocked by an earlier failure
            bad = None
            if has_flags:
                bad = tf.logical_not(finite)
                if merge:
                    bad = _any_replica(bad)  # a gradient bad on any replica is named
                bad = _in_name_order(bad, checked_indices, len(names))
            what = _cause(loss_ok, bad)
            if policy.skip:
                self.skipped_total.assign_add(tf.cast(failed, tf.int64))
                self.consecutive.assign_add(tf.cast(failed, tf.int64))
                if policy.max_consecutive is None:
                    return
                over = self.consecutive > policy.max_consecutive
                what = tf.where(over, what + _CONSECUTIVE, what)
                failed = tf.logical_and(failed, over)
            # Under XLA keep the first failure of the call (later steps were
            # blocked because of it); elsewhere this step raises now.
            write = tf.logical_and(failed, tf.logical_or(tf.equal(self.failed_step, 0), not in_xla))
            self.failed_step.assign(tf.where(write, step, self.failed_step))
            self.failed_what.assign(tf.where(write, what, self.failed_what))
            if has_flags:
                flags.assign(tf.where(write, bad, flags))

        def on_success(*all_args):
            update(*all_args[:update_args])
            if policy.skip:
                self.consecutive.assign(0)

        if policy.skip or in_xla:
            gate = ok
            if in_xla:
                # Nothing raises inside XLA: no later step of the same call may
                # apply until the caller has read the record.
                gate = tf.logical_and(ok, tf.equal(self.failed_step, 0))
            replica_cond(gate, on_success, on_failure, args)
            if not in_xla and policy.skip and policy.max_consecutive is not None:
                with tf.control_dependencies([tf.convert_to_tensor(self.consecutive)]):
                    tf.debugging.Assert(
                        self.consecutive <= policy.max_consecutive,
                        [_MARKER, "(inf or nan) consecutive skips up to step", _for_message(step)],
                    )
            return 1.0 - tf.cast(ok, tf.float32)

        # Raise policy, eager or graph: the update waits for the assertion.
        if not merge:
            # No tf.cond on the way to the update (it would add its latency to
            # every step); the record and the state are rewritten with `where`,
            # a few cheap ops.
            named = None
            if has_flags:
                named = (flags, _in_name_order(tf.logical_not(checked[0]), checked_indices, len(names)))
            failure = self._record_without_cond(ok, loss_ok, step, restore_where, args[:update_args], named)
        else:
            # Writing the record syncs replicas: not inside a replica-context cond.
            _cross_replica_cond(ok, lambda *a: None, on_failure, args)
            failure = self.failed_step.read_value()
        with tf.control_dependencies([failure]):
            check = tf.debugging.Assert(ok, [_MARKER, "(inf or nan) at step", _for_message(step)])
        run_after(check, update, args[:update_args])
        return tf.constant(0.0)

    def _record_without_cond(self, ok, loss_ok, step, restore_where, args, named=None):
        ops = []
        bad = None
        if named is not None:
            flags, bad = named
            ops.append(flags.assign(tf.where(ok, flags, bad)))
        what = _cause(loss_ok, bad)
        ops += [
            self.failed_step.assign(tf.where(ok, self.failed_step, step)),
            self.failed_what.assign(tf.where(ok, self.failed_what, what)),
        ]
        if restore_where is not None:
            ops.extend(restore_where(ok, *args))
        return tf.group(ops)

    def take_failure(self):
        """Returns `(step, what_bits, variable_names)` and clears the record."""
        step = int(self.failed_step.numpy())
        if not step:
            return 0, 0, []
        what = int(self.failed_what.numpy())
        names = []
        if what & _GRADIENTS and len(self.names) in self._flags:
            flags = self._flags[len(self.names)].numpy()
            names = [n for n, bad in zip(self.names, flags) if bad]
        self.failed_step.assign(0)
        self.failed_what.assign(0)
        return step, what, names

    def _error(self, cause=None):
        step, what, names = self.take_failure()
        if not step:
            return None
        kinds = ("loss" if what & _LOSS else "") + (" gradients" if what & _GRADIENTS else "")
        kinds = {"loss": "loss", " gradients": "gradients"}.get(kinds, "loss and gradients")
        consecutive = self.max_consecutive + 1 if what & _CONSECUTIVE else None
        return NonFiniteError(step, kinds, names, consecutive=consecutive, cause=cause)

    def raise_if_failed(self):
        error = self._error()
        if error is not None:
            raise error

    def translate(self, error):
        """Turns the `Assert` error of a failed step into a `NonFiniteError`."""
        if _MARKER not in str(error):
            return error
        return self._error(cause=error) or error

    def wrap(self, function, host_check):
        """Wraps a train function so that a failed step raises `NonFiniteError`.

        Args:
            function: the callable to wrap.
            host_check: read the failure record after every call (needed
                under XLA only).
        """

        def checked(*args, **kwargs):
            try:
                result = function(*args, **kwargs)
            except tf.errors.InvalidArgumentError as e:
                translated = e if isinstance(e, NonFiniteError) else self.translate(e)
                if translated is e:
                    raise
                raise translated from e
            if host_check:
                self.raise_if_failed()
            return result

        checked.__wrapped__ = function
        return checked


# Ops that only read a resource: they change nothing, so they need not wait.
_READS = frozenset(
    ("ReadVariableOp", "ResourceGather", "ResourceGatherNd", "VariableShape", "VarIsInitializedOp")
)


def run_after(check, update, args):
    """Runs `update(*args)` so that none of its state changes happen before `check`.

    Eagerly, `check` has already raised if it failed. In a graph, the obvious
    `tf.control_dependencies([check])` around the update also holds back its
    hundreds of constants, variable reads and arithmetic, which would
    otherwise run while the rest of the step computes. Instead the update is
    built as it is, and then each of its ops that changes state (the
    assignments, the optimizer's `iterations += 1`) is made to wait for
    `check`, unless it already does through an earlier one. Under a strategy
    whose replicas build their ops in turns, interleaved at `merge_call`, the
    plain control dependency.
    """
    if tf.executing_eagerly():
        update(*args)
        return
    if private.needs_merge_call():
        with tf.control_dependencies([check]):
            update(*args)
        return
    graph = tf.compat.v1.get_default_graph()
    start = len(graph.get_operations())
    update(*args)
    _hold_state_changes(graph.get_operations()[start:], check)


def _hold_state_changes(ops, check):
    """Makes each op of `ops` that changes state wait for `check`, unless it already does.

    `ops` are in the order they were built. An op already waits if one of its
    inputs comes from an op that waits, or if it uses a resource that an op
    that waits wrote before it (`tf.function` runs the uses of a resource in
    the order they were written).
    """
    waiting = set()
    held = set()  # resources whose last write waits
    for op in ops:
        resources = [_resource(t).ref() for t in op.inputs if t.dtype == tf.resource]
        waits = (
            any(t.op in waiting for t in op.inputs)
            or any(c in waiting for c in op.control_inputs)
            or any(r in held for r in resources)
        )
        changes = _changes_state(op)
        if changes and not waits:
            private.add_control_input(op, check)
            waits = True
        if waits:
            waiting.add(op)
            if changes:
                held.update(resources)


def _resource(handle):
    while handle.op.type == "Identity":
        handle = handle.op.inputs[0]
    return handle


def _changes_state(op):
    if op.type in _READS:
        return False
    try:
        return op.op_def.is_stateful
    except (KeyError, ValueError, tf.errors.NotFoundError):
        return True  # no registered definition (a function called by name): assume it does


def _counter(name):
    return keras.Variable(0, dtype="int64", trainable=False, aggregation="only_first_replica", name=name)


def _in_name_order(bad, indices, count):
    """`bad[j]` placed at `indices[j]` of a vector of `count` flags (False elsewhere)."""
    position = {i: j for j, i in enumerate(indices)}
    padded = tf.concat([bad, [False]], 0)
    return tf.gather(padded, [position.get(i, len(indices)) for i in range(count)])


def _cause(loss_ok, bad=None):
    """The `what` bits of a failure: `_LOSS` unless `loss_ok`, `_GRADIENTS` if any of `bad`."""
    what = tf.where(loss_ok, 0, _LOSS)
    if bad is not None:
        what += tf.where(tf.reduce_any(bad), _GRADIENTS, 0)
    return what


def _any_replica(flags):
    """Bool tensor: each flag OR-ed over the replicas (one all-reduce)."""
    context = tf.distribute.get_replica_context()
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flags, tf.int32)) > 0


def _for_message(step):
    # String and int32 data keep `Assert` a single op: with any other dtype TF
    # wraps it in a tf.cond ("AssertGuard"), which would hold back the update.
    return tf.cast(step, tf.int32)



