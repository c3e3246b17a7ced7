"""Scaling: per-variable gradient multipliers (TF1's `gradient_multipliers`)."""

import re

import keras
import numpy as np
import tensorflow as tf

from keras_trainop.summaries import variable_name
from keras_trainop.transforms.base import (
    PACKAGE,
    GradientTransform,
    current_number,
    is_pattern,
    is_real,
    is_tensor_or_variable,
    read_state,
    scale,
    warn_unsaved,
)


def _is_variable(value):
    return isinstance(value, (tf.Variable, keras.Variable))


def _same_variable(a, b):
    return a is b or getattr(a, "value", None) is b or getattr(b, "value", None) is a


def _target(key):
    """The variable a key names, or None for a string key."""
    if isinstance(key, str):
        return None
    return key.deref() if hasattr(key, "deref") else key


@keras.saving.register_keras_serializable(package=PACKAGE)
class Multiply(GradientTransform):
    """Multiplies the gradients of chosen variables (TF1's `multiply_gradients`).

    Keys, in order of precedence for a variable:

    1. the variable itself, or `tf.Variable.ref()` (Keras and TF2 variables
       are unhashable: give variables as a list of `(variable, value)` pairs);
    2. a string equal to `variable.path` (for a plain `tf.Variable`, its name
       without `:0`);
    3. a regular expression searched (`re.search`) in that path. A variable
       matched by two expressions is an error.

    A variable no key matches passes through, as in TF1. A multiplier for a
    None gradient is an error, as in TF1 slim.

    Values: a number, or a scalar tensor or variable, read (and cast to the
    gradient's dtype) at every step, so that a schedule can change it.

    Saving: string keys and number values are saved. A variable key is saved
    as its path and a tensor or variable value as its current value, with a
    warning: after loading, pass the variable again if something changes it.

    Args:
        multipliers: a non-empty dict `{key: value}` or list of `(key, value)`.
    """

    def __init__(self, multipliers):
        super().__init__()
        self._set(multipliers, "multipliers")

    @classmethod
    def from_tf1(cls, gradient_multipliers):
        """The transform TF1's `multiply_gradients(pairs, gradient_multipliers)` applies.

        The same rules; errors name `gradient_multipliers`, as TF1's did.
        """
        transform = cls.__new__(cls)
        GradientTransform.__init__(transform)
        transform._set(gradient_multipliers, "gradient_multipliers")
        return transform

    def _set(self, multipliers, argument):
        self.multipliers = _checked_multipliers(multipliers, argument)
        self._argument, self._given = argument, multipliers  # for error messages

    def multiplier_for(self, variable):
        """The multiplier that applies to `variable`, or None."""
        name = variable_name(variable)
        by_identity = [
            v
            for k, v in self.multipliers
            if not isinstance(k, str) and _same_variable(_target(k), variable)
        ]
        if by_identity:
            return by_identity[0]
        strings = [(k, v) for k, v in self.multipliers if isinstance(k, str)]
        exact = [v for k, v in strings if k == name]
        if exact:
            return exact[0]
        found = [(k, v) for k, v in strings if re.search(k, name)]
        if len(found) > 1:
            raise ValueError(
                f"Variable {name!r} is matched by more than one multiplier pattern: "
                f"{[k for k, _ in found]}. Give it its own key (its path) or make the "
                "patterns exclusive."
            )
        return found[0][1] if found else None

    def call(self, grads_and_vars):
        result = []
        for grad, var in grads_and_vars:
            multiplier = self.multiplier_for(var)
            if multiplier is not None:
                if grad is None:
                    raise ValueError(
                        "Requested multiple of `None` gradient for variable "
                        f"{variable_name(var)!r}. Received: {self._argument}="
                        f"{self._given!r}"
                    )
                if not is_real(multiplier):  # a number stays a float: exact in float64
                    (multiplier,) = read_state([multiplier])
                grad = scale(grad, multiplier)
            result.append((grad, var))
        return result

    def get_config(self):
        saved = {}
        for key, value in self.multipliers:
            if not isinstance(key, str):
                path = variable_name(_target(key))
                warn_unsaved(
                    f"the `multiply` key for variable {path!r} is saved as that exact "
                    "path, which a reloaded subclassed or Sequential model may not "
                    "have (its layers get new names). Key by a regular expression "
                    "(e.g. 'dense/kernel$') to be safe."
                )
                key = path
            if not is_real(value):
                number = current_number(value)
                warn_unsaved(
                    f"the `multiply` multiplier for {key!r} is a tensor or variable; "
                    f"it is saved as its current value {number!r}. After loading, set "
                    "it again if a schedule changes it."
                )
                value = number
            saved[key] = value
        return {"multipliers": saved}

    def _repr_config(self):
        return {"multipliers": self.multipliers}


def _checked_multipliers(multipliers, argument):
    """The `(key, value)` pairs of `multipliers`, validated; errors name `argument`."""
    received = f"Received: {argument}={multipliers!r}"
    pairs = list(multipliers.items()) if isinstance(multipliers, dict) else multipliers
    if not isinstance(pairs, (list, tuple)) or not pairs or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs
    ):
        raise ValueError(
            f"`{argument}` must be a non-empty dict {{key: multiplier}} or list of "
            f"(key, multiplier) pairs. {received}"
        )
    checked = []
    for key, value in pairs:
        if not (is_pattern(key) or (not isinstance(key, str) and _is_variable(_target(key)))):
            raise ValueError(
                f"Each key of `{argument}` must be a variable, a `variable.ref()`, a "
                f"`variable.path` or a regular expression. Found {key!r}. {received}"
            )
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if not (is_real(value) or is_tensor_or_variable(value)):
            raise ValueError(
                "Each multiplier must be a number, a scalar tensor or a scalar variable "
                f"(the values of `{argument}`). Found {value!r} for key {key!r}. {received}"
            )
        if not is_real(value) and tuple(value.shape) != ():
            raise ValueError(
                f"Each multiplier must be a scalar (the values of `{argument}`); the one "
                f"for {key!r} has shape {tuple(value.shape)}. {received}"
            )
        checked.append((key, float(value) if is_real(value) else value))
    return checked


def multiply(multipliers):
    """Multiplies chosen gradients by numbers or scalar tensors. Returns a `Multiply`.

    `kt.transforms.multiply({"embedding": 0.1, r"bias$": 2.0})`.
    """
    return Multiply(multipliers)
