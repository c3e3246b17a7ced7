"""`check_numerics`: its values, and the error a failed check raises.

The check itself is in `finiteness` (one verdict per step), the decision and
the writes in the pipeline's commit, the record of a failure and how it is
reported in `failures`.
"""

import keras
import tensorflow as tf


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
