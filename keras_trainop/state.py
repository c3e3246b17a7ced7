"""`StepState`: the step's own state, saved with the model but not one of its weights.

keras_trainop keeps state between steps beyond the optimizer's: the skip
policy's counters, the transforms' state (a noise counter, moving averages),
the gradient sums of `gradient_accumulation_steps`, and a `global_step` given
as a `keras.Variable`. A model trained with keras_trainop must stay a plain
Keras model to whoever serves it: `model.weights`, `get_weights()`,
`summary()` and a `.weights.h5` file hold exactly the architecture's weights.
So this state travels the way the optimizer's does: Keras's saving walks the
model's attributes and saves each Keras object it finds under its attribute
name (`optimizer/...`, and here `train_step_state/...`), in `.keras` and
`.weights.h5` files alike (hence `BackupAndRestore` and `ModelCheckpoint`). A
plain model of the same architecture never looks there, so it loads such a
file unchanged.
"""

import warnings

import keras


class StepState(keras.layers.Layer):
    """The state variables of one model's keras_trainop step, for Keras's saving.

    A Keras layer only so that Keras's saving library visits it
    (`save_own_variables` / `load_own_variables`, Keras's public hooks). It is
    reached through the `train_step_state` property of the model, never
    assigned to it, so the model does not track it as a sublayer and its
    variables are not the model's weights.

    Args:
        variables_fn: zero-argument callable returning the state variables,
            in a fixed order (they may be created after this object: a model
            built by its first step builds its transforms then).
    """

    def __init__(self, variables_fn):
        super().__init__(name="train_step_state", trainable=False)
        self._variables_fn = variables_fn

    @property
    def state_variables(self):
        """The step's state variables, in the order they are saved."""
        return list(self._variables_fn())

    def save_own_variables(self, store):
        for i, variable in enumerate(self.state_variables):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        variables = self.state_variables
        if len(store.keys()) != len(variables):
            # As Keras's optimizer does: the weights still load; this state
            # belongs to other compile() options.
            warnings.warn(
                "keras_trainop: skipping the step's state (skip counters, "
                "transform state, gradient sums, global step): the model has "
                f"{len(variables)} such variables and the file {len(store.keys())}, "
                "because it was saved with other compile() options. The "
                "model's weights load as usual.",
                UserWarning,
                stacklevel=2,
            )
            return
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
