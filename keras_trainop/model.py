"""`TrainOpModel`: TF1's `create_train_op` options in `compile()`, for `model.fit`.

The mixin is thin: `compile()` validates the options into a `StepPipeline`,
`train_step` hands the forward pass to it, and the compile config carries the
options through `model.save` / `keras.saving.load_model`.
"""

import keras
import tensorflow as tf

from keras_trainop import _keras_private as private
from keras_trainop import host, serialization
from keras_trainop.options import GATE_OP, USE_GLOBAL_STEP, TrainOptions
from keras_trainop.pipeline import StepPipeline
from keras_trainop.state import StepState
from keras_trainop.telemetry import SUMMARIES, Reader
from keras_trainop.variables import select_variables

# Keras picks its backend once, at import. On TensorFlow the step is
# `StepPipeline`, run by `keras_trainop.host`; on JAX it is
# `keras_trainop.jax_step` (Keras's stateless `train_step(state, data)`); on
# PyTorch `keras_trainop.torch_step`.
BACKEND = keras.backend.backend()
ON_TENSORFLOW = BACKEND == "tensorflow"
ON_JAX = BACKEND == "jax"
ON_TORCH = BACKEND == "torch"
if ON_JAX:
    from keras_trainop import jax_host, jax_step
elif ON_TORCH:
    from keras_trainop import torch_step
elif not ON_TENSORFLOW:
    raise ImportError(
        "keras_trainop runs on Keras's TensorFlow, JAX and PyTorch backends. Received: "
        f"KERAS_BACKEND={BACKEND!r}"
    )
if not ON_TENSORFLOW:
    from keras_trainop.backend_step import check_options


def _batch_size(x):
    if not ON_TENSORFLOW:
        return keras.ops.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


def _replicas():
    """The replicas a step's loss is divided among (TensorFlow's strategies; 1 elsewhere)."""
    return tf.distribute.get_strategy().num_replicas_in_sync if ON_TENSORFLOW else 1


def _unscale_for_distribution(loss):
    # Keras divides each replica's loss by the number of replicas; its loss
    # metric reports the loss multiplied back (as Keras's own train_step does).
    replicas = _replicas()
    return loss * keras.ops.cast(replicas, loss.dtype) if replicas > 1 else loss


class TrainOpModel:
    """Mixin that gives a Keras model TF1's `create_train_op` training options.

    Put it first in the bases: `class Net(kt.TrainOpModel, keras.Model)`, or
    use the ready classes `kt.Model` and `kt.Sequential`. Then pass the
    options to `compile()` next to Keras's own arguments, and call `fit`.

    A model that overrides `train_step` keeps every option by calling
    `self.minimize(loss_fn)` where it would compute and apply gradients.
    """

    def compile(
        self,
        *args,
        grad_transforms=None,
        transform_grads_fn=None,
        aggregation_method=None,
        gate_gradients=GATE_OP,
        colocate_gradients_with_ops=False,
        check_numerics=True,
        update_ops=None,
        variables_to_train=None,
        summarize_gradients=False,
        global_step=USE_GLOBAL_STEP,
        gradient_accumulation_steps=None,
        **kwargs,
    ):
        """Configures the model for training: Keras's arguments plus TF1's options.

        Args:
            *args, **kwargs: Keras's own `compile()` arguments (`optimizer`,
                `loss`, `metrics`, `run_eagerly`, `jit_compile`, ...).
            grad_transforms: a callable or a list of callables, each taking and
                returning a list of `(gradient, variable)` pairs (None
                gradients included), applied in order after the gradients are
                computed (and unscaled) and before they are applied.
            transform_grads_fn: TF1's single transform with the same contract.
                Pass this or `grad_transforms`, not both.
            aggregation_method: a `tf.AggregationMethod` value, or None. Acts in
                graph and XLA mode through `tf.gradients`; under
                `run_eagerly=True` it cannot, and a warning says so once.
            gate_gradients: `kt.GATE_NONE`, `kt.GATE_OP` (default) or
                `kt.GATE_GRAPH`, as in TF1. `GATE_OP`'s guarantee holds by
                construction in a TF2 graph; the other two go through
                `tf.gradients` in graph and XLA mode.
            colocate_gradients_with_ops: if True, each gradient op is placed
                with the forward op it differentiates, as in TF1 (graph and
                XLA mode, through `tf.compat.v1.gradients`); under
                `run_eagerly=True` it cannot act, and a warning says so once.
            check_numerics: True (default) or "loss": a step whose loss is inf
                or nan changes no variable and raises `kt.NonFiniteError`, in
                eager, graph and XLA mode. "all": the loss and every gradient
                are checked, and the error names the variables. "skip" or
                `kt.SkipNonFinite(max_consecutive=None)`: such a step is
                skipped, training goes on, and the logs count `skipped_steps`.
                False: no check.
            update_ops: None or a list of zero-argument callables run every
                step before the gradients are applied. Keras 3 layers such as
                BatchNormalization update their statistics inside `call()`,
                so they need none.
            variables_to_train: None (all trainable variables), a list of
                variables, a callable returning them, or regular expressions
                searched in `variable.path`. Unselected variables do not
                change, optimizer slots included.
            summarize_gradients: if True, write a histogram and a norm scalar
                per gradient at every update to the default `tf.summary` writer
                active during `fit`, in every mode (the step records them, the
                host writes them after each call).
            global_step: `kt.USE_GLOBAL_STEP` (the optimizer's `iterations`),
                None, or a scalar variable incremented by 1 per applied update.
            gradient_accumulation_steps: None, or an int k >= 1: the
                gradients of k consecutive batches are summed, and every k-th
                step applies their mean once, through the transforms (a clip
                acts on the accumulated gradient) and the update ops. With a
                mean loss, the same as one batch k times larger.
        """
        options = TrainOptions(
            grad_transforms=grad_transforms,
            transform_grads_fn=transform_grads_fn,
            aggregation_method=aggregation_method,
            gate_gradients=gate_gradients,
            colocate_gradients_with_ops=colocate_gradients_with_ops,
            check_numerics=check_numerics,
            update_ops=update_ops,
            variables_to_train=variables_to_train,
            summarize_gradients=summarize_gradients,
            global_step=global_step,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        # Resolved before anything changes, so that a bad selection leaves the
        # previous compiled state as it was.
        selected = self._resolve_selection(options)
        if not ON_TENSORFLOW:  # before Keras's compile: a refused option changes nothing
            optimizer = kwargs.get("optimizer", args[0] if args else "rmsprop")
            # (Its warnings come once, from the step made below.)
            check_options(options, optimizer, warned={"optimizer-accumulation"})
        super().compile(*args, **kwargs)
        if ON_TENSORFLOW:
            # Keras 3.15's own `fit` fails under a multi-worker strategy.
            private.patch_fit_for_strategy(self.distribute_strategy)
        self.train_options = options
        self.train_pipeline = self._make_pipeline(options, selected)
        self._track_step_state()
        if getattr(self, "train_metrics", None) is None:
            self.train_metrics = StepMetrics()
        if options.numerics.skip and self.train_metrics.skipped_steps is None:
            # Reset each epoch, shown in the progress bar and History.
            self.train_metrics.skipped_steps = keras.metrics.Sum(name="skipped_steps")

    def _resolve_selection(self, options):
        """The variables to train, for a built model (None: resolved at the first step).

        An unbuilt model resolves them when its first step is traced; a frozen
        model compiled only for `evaluate` has nothing to resolve.
        """
        if not self.built or (options.variables_to_train is None and not self.trainable_variables):
            return None
        return select_variables(
            options.variables_to_train, self.trainable_variables, self.trainable_variables, self._owner_name()
        )

    def _make_pipeline(self, options, selected):
        if ON_JAX:
            pipeline = jax_step.JaxStep(options, self.optimizer)
        elif ON_TORCH:
            pipeline = torch_step.TorchStep(options, self.optimizer)
        else:
            pipeline = StepPipeline(options, self.optimizer)
        if selected is not None:
            pipeline.selected = selected
            if not self.optimizer.built:
                # Slots for exactly the variables it updates, as a loaded
                # model will build them (see compile_from_config).
                self.optimizer.build(selected)
            pipeline.build_transforms(selected)
        pipeline.saved_state = StepState(pipeline.state_variables)
        if options.summarize_gradients:
            # Written by the host after each call, in every mode, XLA included.
            pipeline.recorder.attach(SUMMARIES, Reader(
                1, private.default_summary_writer, always=True, at_global_step=True,
                wanted=lambda: private.default_summary_writer() is not None,
            ))
        return pipeline

    @property
    def train_step_state(self):
        """The step's own state (`keras_trainop.state.StepState`), None before `compile()`.

        Saved and loaded with the model, next to the optimizer's variables,
        but not among `model.weights`: `.state_variables` lists the skip
        policy's counters, the transforms' state, the gradient sums and a
        `keras.Variable` global step.
        """
        pipeline = getattr(self, "train_pipeline", None)
        return None if pipeline is None else pipeline.saved_state

    def _track_step_state(self):
        """Makes tf.train.Checkpoint(model=...) save and restore the step's state.

        Keras's own files find it through `train_step_state`; a TensorFlow
        checkpoint follows tracked attributes instead. A tf.Module holds the
        variables (refilled when a model built by its first step has just
        built its transforms): TensorFlow tracks it, Keras does not (it is
        neither a layer nor a variable), so the model's weights stay its own.
        """
        if not ON_TENSORFLOW:  # a TensorFlow checkpoint is TensorFlow's
            return
        state = self.train_pipeline.state_variables()
        holder = getattr(self, "_checkpointed_step_state", None)
        if holder is None and not state:
            return
        if holder is None or [id(v) for v in holder.state] != [id(v) for v in state]:
            holder = _CheckpointedState()
            holder.state = list(state)
            self._checkpointed_step_state = holder

    def _owner_name(self):
        return f"model {self.name!r}"

    def _selected_variables(self):
        return self.train_pipeline.variables(self.trainable_variables, owner=self._owner_name())

    def minimize(self, *args, **kwargs):
        """Runs the whole keras_trainop step for a loss, inside a `train_step`.

        On TensorFlow and PyTorch, `minimize(loss_fn)` in a `train_step(data)`:

        ```python
        def train_step(self, data):
            x, y = data

            def loss_fn():
                y_pred = self(x, training=True)
                return self.compute_loss(x, y, y_pred), y_pred

            y_pred = self.minimize(loss_fn)
            ...
        ```

        `loss_fn`: zero-argument callable returning the scalar loss, or a
        pair `(loss, aux)`. Returns `aux` (None if `loss_fn` returned only
        the loss).

        On JAX, whose `train_step(state, data)` is stateless,
        `minimize(state, data, compute_loss_and_updates=None)` returns
        `(logs, new_state)`, what the `train_step` returns:

        ```python
        def train_step(self, state, data):
            x, y = data
            return self.minimize(state, (augment(x), y))
        ```

        `compute_loss_and_updates`: what is differentiated, with the
        signature and return value of Keras's own
        `model.compute_loss_and_updates` (the default).
        """
        if ON_JAX:
            return self.train_pipeline.train_step(self, *args, **kwargs)

        def minimize(loss_fn):  # (Python's own error for other arguments)
            return self._minimize(loss_fn)[0]

        return minimize(*args, **kwargs)

    def _minimize(self, loss_fn, on_kept=None):
        """`minimize`, also returning the 1.0 / 0.0 "skipped" flag of the step.

        `on_kept(aux)`, with the skip policy: run only by a step that is not skipped.
        """

        def forward():
            result = loss_fn()
            if isinstance(result, (tuple, list)) and len(result) == 2:
                return result
            return result, None

        aux, skipped = self.train_pipeline.run(
            forward,
            candidates=lambda: self._selected_variables(),
            state_variables=lambda: self.non_trainable_weights,
            on_kept=on_kept,
        )
        # A model built by its first step has just built its transforms too.
        self._track_step_state()
        tracker = self.train_metrics.skipped_steps
        if tracker is not None and self.train_options.numerics.skip:
            # Every replica reports the same skip; the metric sums replicas.
            tracker.update_state(skipped / _replicas())
        return aux, skipped

    def train_step(self, *args):
        # TensorFlow: train_step(data); JAX: train_step(state, data), stateless.
        if ON_JAX:
            return self.train_pipeline.train_step(self, *args)
        (data,) = args
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        def loss_fn():
            if private.call_has_training_arg(self):
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = private.compute_loss(self, x, y, y_pred, sample_weight)
            # What the metrics read travels with the step (under a strategy,
            # per replica), not through this closure.
            return loss, (x, y, sample_weight, y_pred, loss)

        def update_metrics(aux):
            x, y, sample_weight, y_pred, loss = aux
            private.loss_tracker(self).update_state(
                _unscale_for_distribution(loss), sample_weight=_batch_size(x)
            )
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        if not self.train_options.numerics.skip:
            logs = update_metrics(self._minimize(loss_fn)[0])
        else:
            # A skipped batch stays out of the loss and the metrics (one nan
            # would turn the epoch's mean into nan): the step's commit updates
            # them in the same cond as the update, only for a kept step.
            self._minimize(loss_fn, on_kept=update_metrics)
            logs = self.get_metrics_result()
        return host.with_failure_record(logs, self.train_pipeline) if ON_TENSORFLOW else logs

    @property
    def metrics(self):
        extra = getattr(self, "train_metrics", None)
        if extra is None:
            return super().metrics
        return super().metrics + extra.active(self.train_options, self.train_pipeline.recorder)

    @property
    def metrics_variables(self):
        """Keras's metrics' variables; on JAX followed by the step's own state.

        Keras's JAX trainer carries four lists of variables through its
        stateless step; the step's own state rides in this one (see
        `keras_trainop.jax_step`).
        """
        variables = super().metrics_variables
        pipeline = getattr(self, "train_pipeline", None)
        if ON_JAX and pipeline is not None:
            variables = variables + pipeline.riding_variables()
        return variables

    def test_step(self, *args):
        result = super().test_step(*args)
        logs = result[0] if ON_JAX else result  # JAX: (logs, state)
        # Training counters and gradient norms: not validation metrics.
        for name in ("skipped_steps", "grad_norm", "clipped_grad_norm"):
            logs.pop(name, None)
        return result

    def make_train_function(self, force=False):
        """Keras's train function, run by keras_trainop's host (`keras_trainop.host`; on JAX `jax_host`).

        One trace per configuration of the gradient readers (and a plain one
        next to a periodic reader's), cached: a later `fit` with the same
        callbacks traces nothing again; `force=True` traces anew.
        """
        if ON_JAX:
            return jax_host.make(self, super().make_train_function, force)
        if ON_TORCH:
            return torch_step.make(self, super().make_train_function, force)
        pipeline = self.train_pipeline
        if force:
            pipeline.hosted_functions.clear()

        def keras_trace():
            super(TrainOpModel, self).make_train_function(force=True)
            return self.train_function

        self.train_function = host.make(self, keras_trace)
        return self.train_function

    def fit(self, *args, **kwargs):
        history = super().fit(*args, **kwargs)
        self._settle()
        return history

    def train_on_batch(self, *args, **kwargs):
        logs = super().train_on_batch(*args, **kwargs)
        self._settle()
        return logs

    def _settle(self):
        """On JAX, raises for a failed check in the last call (see `jax_host.HostedTrainFunction`)."""
        settle = getattr(self.train_function, "settle", None)
        if ON_JAX and settle is not None:
            settle()

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and "optimizer" in config:
            config["optimizer"] = private.portable_optimizer_config(config["optimizer"])
        if config and hasattr(self, "train_options"):
            config.update(
                serialization.serialize_options(self.train_options, self.trainable_variables)
            )
        return config

    def compile_from_config(self, config):
        config = dict(config)
        if "optimizer" in config:  # a file saved on PyTorch, by keras_trainop or not
            config["optimizer"] = private.portable_optimizer_config(config["optimizer"])
        options = serialization.deserialize_options(config, self.trainable_variables)
        config = keras.saving.deserialize_keras_object(config)
        # compile() builds the optimizer of a built model over the variables it
        # trains, so that the saved optimizer variables load into it.
        self.compile(**config, **options)


@keras.saving.register_keras_serializable(package="keras_trainop")
class Model(TrainOpModel, keras.Model):
    """A `keras.Model` with keras_trainop's `compile()` options.

    Works subclassed (`class Net(kt.Model)`) and functional
    (`kt.Model(inputs, outputs)`), in any order. As `keras.Model(inputs,
    outputs)` returns a Keras `Functional`, `kt.Model(inputs, outputs)`
    returns a `keras_trainop.model.Functional`, a subclass of both `kt.Model`
    and Keras's `Functional`.
    """

    def __new__(cls, *args, **kwargs):
        if private.is_functional_call(args, kwargs):
            if cls is Model:
                return super().__new__(Functional)
            if not issubclass(cls, private.functional_class()):
                # A subclass used functionally: Keras would put its Functional
                # class into the bases all the way up, kt.Model's included,
                # which would break every later `class Net(kt.Model)`.
                _make_functional(cls)
        return super().__new__(cls)


def _make_functional(cls):
    """Puts `Functional` in the place of `Model` among the bases of `cls` and its parents."""
    if cls is Model:
        return Functional
    if issubclass(cls, Model):
        cls.__bases__ = tuple(_make_functional(base) for base in cls.__bases__)
    return cls


@keras.saving.register_keras_serializable(package="keras_trainop")
class Functional(Model, private.functional_class()):
    """The class of `kt.Model(inputs, outputs)`: a functional `kt.Model`."""


@keras.saving.register_keras_serializable(package="keras_trainop")
class Sequential(TrainOpModel, keras.Sequential):
    """A `keras.Sequential` with keras_trainop's `compile()` options."""


class StepMetrics:
    """The metrics keras_trainop adds to a model's logs.

    A plain object on the model: neither Keras nor TensorFlow tracks what it
    holds, so a model built before `compile()` can take them (a built Keras
    layer takes no new tracked state), and the model's `metrics` property
    lists them only while they count something.

    Attributes:
        skipped_steps: `Sum` of the steps skipped by the skip policy.
        grad_norm, clipped_grad_norm: `Mean`s of the global gradient norm
            before and after the transforms, for `GradientTensorBoard(metrics=True)`.
    """

    def __init__(self):
        self.skipped_steps = None
        self.grad_norm = self.clipped_grad_norm = None

    def active(self, options, recorder):
        """The metrics that count in a step with these options and this gradient recorder."""
        metrics = []
        if self.skipped_steps is not None and options.numerics.skip:
            metrics.append(self.skipped_steps)
        # The gradient-norm trackers stay between fits (their variables are
        # part of the traces) but are metrics only while a callback records them.
        if recorder.log_metrics:
            metrics += [m for m in (self.grad_norm, self.clipped_grad_norm) if m is not None]
        return metrics


class _CheckpointedState(tf.Module):
    """The step's state variables, as tf.train.Checkpoint dependencies."""
