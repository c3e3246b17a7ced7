"""Resolving `variables_to_train` into the list of variables a step updates."""

import re

import keras
import tensorflow as tf

from keras_trainop.summaries import variable_name


def state_variable(value, dtype, name):
    """A non-trainable variable for keras_trainop's own bookkeeping.

    Created under `tf.init_scope` (so also from inside a traced step), outside
    the model's weights; under a distribution strategy, the first replica's
    writes count.
    """
    with tf.init_scope():
        return tf.Variable(
            value,
            dtype=dtype,
            trainable=False,
            name=name,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )


def _match(items, trainable):
    """Which trainable variables `items` (variables and patterns) name.

    Returns `(chosen_ids, given, unknown, unmatched)`: the ids of the chosen
    variables, the object each was named by (by id), the variables that are
    not trainable variables here, and the patterns that match nothing.
    """
    index = {}
    for var in trainable:
        for key in _keys(var):
            index[key] = var
    chosen_ids, given, unknown, unmatched = set(), {}, [], []
    for item in items:
        if isinstance(item, str):
            hits = [v for v in trainable if re.search(item, variable_name(v))]
            if not hits:
                unmatched.append(item)
            chosen_ids.update(id(v) for v in hits)
            continue
        match = next((index[k] for k in _keys(item) if k in index), None)
        if match is None:
            unknown.append(item)
        else:
            chosen_ids.add(id(match))
            given[id(match)] = item
    return chosen_ids, given, unknown, unmatched


def _keys(variable):
    """Identity keys of a variable: itself, and the TF variable under a Keras one."""
    keys = {id(variable)}
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        keys.add(id(inner))
    return keys


def select_variables(selection, default, trainable, owner):
    """Returns the variables to train, in the order of `trainable`.

    Args:
        selection: the validated `variables_to_train`: None, a callable, or
            a list of variables and/or regular expressions (searched in
            `variable.path` with `re.search`, as Keras's own
            `exclude_from_weight_decay` does).
        default: what None selects.
        trainable: the trainable variables a selection may name.
        owner: how errors name where the variables must come from.

    Raises:
        ValueError: for a variable that is not trainable or not in
            `trainable`, a pattern that matches no trainable variable, or an
            empty selection; the message names them.
    """
    if selection is None:
        chosen = list(default)
        if not chosen:
            raise ValueError(
                f"There are no trainable variables to train in {owner}. "
                "Received: variables_to_train=None"
            )
        return chosen
    items = selection() if callable(selection) else selection
    if not isinstance(items, (list, tuple)):
        items = [items]
    for item in items:
        if not isinstance(item, (str, tf.Variable, keras.Variable)):
            # What a callable returned (a list given directly is checked at compile()).
            raise ValueError(
                "`variables_to_train` must select variables and/or regular "
                f"expressions on `variable.path`. Found {item!r} of type "
                f"{type(item).__name__}. Received: variables_to_train={selection!r}"
            )
    chosen_ids, given, unknown, unmatched = _match(items, trainable)
    if unknown:
        described = ", ".join(
            f"{variable_name(v)!r} (trainable={bool(getattr(v, 'trainable', False))})"
            for v in unknown
        )
        raise ValueError(
            "`variables_to_train` must name trainable variables of "
            f"{owner}. These are not: {described}. "
            f"Received: variables_to_train={selection!r}"
        )
    if unmatched:
        raise ValueError(
            "`variables_to_train` regular expressions must each match the "
            "`path` (for a plain tf.Variable: the name) of at least one "
            f"trainable variable of {owner}. No match "
            f"for: {unmatched}. Trainable variables: "
            f"{[variable_name(v) for v in trainable]}. "
            f"Received: variables_to_train={selection!r}"
        )
    # A variable named explicitly is kept as given: a keras.Variable rather
    # than the tf.Variable under it, so that transforms see its `path`.
    chosen = [given.get(id(v), v) for v in trainable if id(v) in chosen_ids]
    if not chosen:
        raise ValueError(
            "`variables_to_train` selects no variable. "
            f"Received: variables_to_train={selection!r}"
        )
    return chosen
