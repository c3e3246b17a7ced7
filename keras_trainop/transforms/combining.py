"""Combinators: `chain`, `masked` and `partition`.

They build their children (so stateful children keep state) and list the
children's state in their own `variables`. Masks and labels are regular
expressions searched (`re.search`) in `variable.path`, as Keras's
`exclude_from_weight_decay` and keras_trainop's `variables_to_train`, so that
they can be saved.
"""

import keras

from keras_trainop.summaries import variable_name
from keras_trainop.transforms.base import (
    PACKAGE,
    GradientTransform,
    build_child,
    check_patterns,
    child_variables,
    deserialize_child,
    is_registered,
    matches,
    run_transform,
    serialize_child,
    warn_unsaved,
)


def _check_transform(name, value, allow_none=False):
    if callable(value) or (value is None and allow_none):
        return value
    what = "a callable" + (" or None" if allow_none else "")
    raise ValueError(
        f"`{name}` must be {what} taking and returning a list of (gradient, "
        f"variable) pairs. Received: {name}={value!r}"
    )


def _run_child(transform, pairs, state):
    """`transform` on `pairs`: a dict from `id(variable)` to its output pair, and its new state.

    A child may drop pairs, never return a variable it was not given (it would
    be lost here, and that variable would silently stop training).
    """
    given = {id(v) for _, v in pairs}
    out = {}
    result, new_state = run_transform(transform, pairs, state)
    for g, v in result:
        if id(v) not in given:
            raise ValueError(
                f"The transform {transform!r} returned a pair for variable "
                f"{variable_name(v)!r}, which it was not given. A transform may "
                "drop pairs or change gradients, never add variables (or swap a "
                "variable for another object, such as `variable.value`)."
            )
        out[id(v)] = (g, v)
    return out, new_state


class _Combinator(GradientTransform):
    def children(self):
        raise NotImplementedError

    @property
    def variables(self):
        return [v for child in self.children() for v in child_variables(child)]

    def build(self, variables):
        for child in self.children():
            build_child(child, variables)
        super().build(variables)

    def split_state(self, state):
        """`state` (the values of `self.variables`) cut into the children's, in order."""
        parts, start = [], 0
        for child in self.children():
            count = len(child_variables(child))
            parts.append(list(state[start : start + count]))
            start += count
        return parts


@keras.saving.register_keras_serializable(package=PACKAGE)
class Chain(_Combinator):
    """Applies transforms one after the other (optax's `chain`).

    Saving: an element that cannot be saved (a lambda, an unregistered
    function) is left out of the config with a warning, as in
    `compile(grad_transforms=[...])`.

    Args:
        transforms: transforms or plain functions with TF1's contract.
    """

    def __init__(self, transforms):
        super().__init__()
        if not isinstance(transforms, (list, tuple)):
            raise ValueError(
                f"`transforms` must be a list of transforms. Received: transforms={transforms!r}"
            )
        for i, t in enumerate(transforms):
            _check_transform(f"transforms[{i}]", t)
        self.transforms = list(transforms)

    def children(self):
        return self.transforms

    def update(self, grads_and_vars, state):
        new_state = []
        for transform, child_state in zip(self.transforms, self.split_state(state)):
            grads_and_vars, child_new = run_transform(transform, grads_and_vars, child_state)
            grads_and_vars = list(grads_and_vars)
            new_state += child_new
        return grads_and_vars, new_state

    def get_config(self):
        saved = []
        for i, transform in enumerate(self.transforms):
            if is_registered(transform):
                saved.append(keras.saving.serialize_keras_object(transform))
            else:
                warn_unsaved(
                    f"`chain` element {i} ({transform!r}) cannot be saved and is left "
                    "out of the chain's config. Register it with "
                    "@keras.saving.register_keras_serializable(), or pass it to "
                    "compile() again after loading."
                )
        return {"transforms": saved}

    @classmethod
    def from_config(cls, config):
        return cls([deserialize_child(c) for c in config["transforms"]])

    def _repr_config(self):
        return {"transforms": self.transforms}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Masked(_Combinator):
    """Applies `transform` to the variables `mask` matches; the others pass unchanged.

    Args:
        transform: a transform or a plain function; it sees only the matched
            pairs (and may drop some).
        mask: a regular expression or a list of them, searched in
            `variable.path`.
    """

    def __init__(self, transform, mask):
        super().__init__()
        self.transform = _check_transform("transform", transform)
        self.mask = check_patterns("mask", mask)

    def children(self):
        return [self.transform]

    def build(self, variables):
        super().build([v for v in variables if matches(self.mask, v)])

    def update(self, grads_and_vars, state):
        selected = [matches(self.mask, v) for _, v in grads_and_vars]
        subset = [p for p, keep in zip(grads_and_vars, selected) if keep]
        (child_state,) = self.split_state(state)
        out, new_state = _run_child(self.transform, subset, child_state)
        result = []
        for pair, keep in zip(grads_and_vars, selected):
            if not keep:
                result.append(pair)  # the others stay where they were
            elif id(pair[1]) in out:
                result.append(out[id(pair[1])])
        return result, new_state

    def get_config(self):
        return {"transform": serialize_child(self.transform, "The masked transform"),
                "mask": self.mask}

    @classmethod
    def from_config(cls, config):
        return cls(deserialize_child(config["transform"]), config["mask"])

    def _repr_config(self):
        return {"transform": self.transform, "mask": self.mask}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Partition(_Combinator):
    """Splits the variables into labelled groups, each with its own transform.

    optax's `partition`. Each group's transform sees only the group's pairs,
    so `clip_by_global_norm` clips each group's norm on its own. A group whose
    transform is None is frozen: its pairs are dropped, so the optimizer
    leaves those variables (and their slots) untouched.

    ```python
    kt.transforms.partition(
        {"embedding": kt.transforms.clip_by_global_norm(1.0),
         "rest": kt.transforms.clip_by_global_norm(5.0),
         "frozen": None},
        labels={"embedding": "embedding", "frozen": [r"bias$"]},
        default_label="rest",
    )
    ```

    Args:
        transforms: a dict from label to a transform, a plain function, or
            None (frozen).
        labels: a dict from label to a regular expression or a list of them,
            searched in `variable.path`. A variable matched by two labels is
            an error.
        default_label: the label of the variables no pattern matches; None
            makes an unmatched variable an error.
    """

    def __init__(self, transforms, labels, default_label=None):
        super().__init__()
        if not isinstance(transforms, dict) or not transforms or not all(
            isinstance(k, str) for k in transforms
        ):
            raise ValueError(
                "`transforms` must be a non-empty dict from label (a string) to a "
                f"transform or None. Received: transforms={transforms!r}"
            )
        for label, t in transforms.items():
            _check_transform(f"transforms[{label!r}]", t, allow_none=True)
        if not isinstance(labels, dict) or not set(labels) <= set(transforms):
            raise ValueError(
                "`labels` must be a dict from labels of `transforms` to regular "
                f"expressions. Received: labels={labels!r}"
            )
        if default_label is not None and default_label not in transforms:
            raise ValueError(
                "`default_label` must be None or a label of `transforms` "
                f"({sorted(transforms)}). Received: default_label={default_label!r}"
            )
        self.transforms = dict(transforms)
        self.labels = {k: check_patterns(f"labels[{k!r}]", v) for k, v in labels.items()}
        self.default_label = default_label

    def children(self):
        return [t for t in self.transforms.values() if t is not None]

    def label_of(self, variable):
        """The label of `variable` (a ValueError if none or several apply)."""
        found = [label for label, patterns in self.labels.items() if matches(patterns, variable)]
        if len(found) > 1:
            raise ValueError(
                f"Variable {variable_name(variable)!r} matches the patterns of more "
                f"than one label of `partition`: {found}."
            )
        if found:
            return found[0]
        if self.default_label is None:
            raise ValueError(
                f"Variable {variable_name(variable)!r} matches no label of `partition` "
                f"(labels: {self.labels}) and there is no `default_label`."
            )
        return self.default_label

    def build(self, variables):
        by_label = [self.label_of(v) for v in variables]
        for label, transform in self.transforms.items():
            if transform is not None:
                build_child(transform, [v for v, lb in zip(variables, by_label) if lb == label])
        GradientTransform.build(self, variables)

    def update(self, grads_and_vars, state):
        by_label = [self.label_of(v) for _, v in grads_and_vars]
        labelled = [(label, t) for label, t in self.transforms.items() if t is not None]
        out, new_state = {}, []
        for (label, transform), child_state in zip(labelled, self.split_state(state)):
            group = [p for p, lb in zip(grads_and_vars, by_label) if lb == label]
            if not group:  # nothing to transform: its state stays
                new_state += child_state
                continue
            child_out, child_new = _run_child(transform, group, child_state)
            out.update(child_out)
            new_state += child_new
        # A frozen group (transform None) adds nothing: its pairs are dropped.
        return [out[id(v)] for _, v in grads_and_vars if id(v) in out], new_state

    def get_config(self):
        return {
            "transforms": {
                label: serialize_child(t, f"The `partition` transform of label {label!r}")
                for label, t in self.transforms.items()
            },
            "labels": self.labels,
            "default_label": self.default_label,
        }

    @classmethod
    def from_config(cls, config):
        transforms = {k: deserialize_child(v) for k, v in config["transforms"].items()}
        return cls(transforms, config["labels"], config["default_label"])

    def _repr_config(self):
        return {"transforms": self.transforms, "labels": self.labels,
                "default_label": self.default_label}


def chain(*transforms):
    """Applies `transforms` in order. Returns a `Chain`."""
    return Chain(list(transforms))


def masked(transform, mask):
    """Applies `transform` only to the variables whose path `mask` matches. Returns a `Masked`."""
    return Masked(transform, mask)


def partition(transforms, labels, default_label=None):
    """One transform per labelled group of variables (None: frozen). Returns a `Partition`."""
    return Partition(transforms, labels, default_label)
