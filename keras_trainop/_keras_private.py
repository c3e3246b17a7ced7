"""Every private Keras / TensorFlow hook keras_trainop relies on, and nothing else.

Each function is small and says why the public API is not enough.
`tests/test_keras_private.py` fails loudly when a Keras or TF release moves one
of these, so that a silent change of behaviour cannot slip through.
"""

import tensorflow as tf

from keras_trainop.optimizers import applying_optimizers


def loss_tracker(model):
    """The `Mean` metric that Keras's own `train_step` feeds with the loss.

    Keras 3 reports `logs["loss"]` from this tracker; there is no public handle
    on it. Feeding it keeps the logs identical to plain Keras.
    """
    return model._loss_tracker


def call_has_training_arg(model):
    """Whether `model.call` accepts `training=` (Keras inspects it once)."""
    return model._call_has_training_arg


def compute_loss(model, x, y, y_pred, sample_weight):
    """`model.compute_loss(..., training=True)`, also for overrides without `training`.

    Keras's `_compute_loss` is the wrapper its own `train_step` uses so that a
    user override of `compute_loss` written before Keras 3.3 keeps working.
    """
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def is_functional_call(args, kwargs):
    """Whether `Model(*args, **kwargs)` asks for a functional model (`Model(inputs, outputs)`).

    Keras decides it with this private function; keras_trainop must decide it
    the same way to give `kt.Model(inputs, outputs)` its functional class.
    """
    from keras.src.models.model import functional_init_arguments

    return functional_init_arguments(args, kwargs)


def functional_class():
    """Keras's `Functional` model class, which `keras.Model(inputs, outputs)` returns.

    Not exported by Keras; `kt.Model(inputs, outputs)` returns a subclass of it
    (and of `kt.Model`) so that Keras never has to rewrite `kt.Model`'s bases.
    """
    from keras.src.models.functional import Functional

    return Functional


def function_watched_variables():
    """The variables read so far in the `tf.function` being traced.

    `create_train_op(variables_to_train=None)` must find "the trainable
    variables the loss reads" without TF1's global collection. A FuncGraph
    records them (it is what `tf.function` uses for its own bookkeeping) but
    only in a private attribute. Returns None outside a FuncGraph.
    """
    graph = tf.compat.v1.get_default_graph()
    watched = getattr(graph, "_watched_variables", None)
    return None if watched is None else list(watched)


def in_xla_context():
    """Whether the code being traced will be compiled by XLA.

    Under XLA, `tf.debugging.Assert` / `check_numerics` are dropped and
    `tf.summary` cannot compile, so the step must know. `tf.function` exposes
    no public flag for it; TF's own control-flow code uses this check.
    """
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def add_control_input(op, control):
    """Makes the already built `op` wait for the op `control`.

    A failing step's update must not change any state, yet its constants,
    variable reads and arithmetic should not wait for the check: under
    `tf.control_dependencies` they all do, which cost 1.18 to 1.29 times a
    step without the check on a 200-variable model. So `gating.run_after`
    builds the update as it is and then gives this control edge to each op
    that changes state and does not already wait. TF's automatic control
    dependencies add edges the same way; there is no public call for it.
    """
    op._add_control_input(control)


def _as_given(grads_and_vars):
    return list(grads_and_vars)


def apply_gradients_as_given(optimizer):
    """Makes `optimizer` apply gradients without summing them over replicas.

    Under a distribution strategy, Keras all-reduces the gradients inside
    `apply` (`_all_reduce_sum_gradients`, called from `_backend_update_step`),
    after its own clipping, so that any transform before it would see only a
    replica's share. keras_trainop all-reduces once before its transforms and
    must then stop Keras from reducing a second time. There is no public
    switch for it. The hook goes on every optimizer that applies
    (`applying_optimizers`: a LossScaleOptimizer's inner one, each optimizer
    of a MultiOptimizer) and stays: a LossScaleOptimizer applies in new
    replica threads, where a per-call or thread-local flag would be unseen.
    """
    for opt in applying_optimizers(optimizer):
        if not callable(getattr(type(opt), "_all_reduce_sum_gradients", None)):
            raise RuntimeError(
                "keras_trainop: this Keras release has no `_all_reduce_sum_gradients` "
                f"on {type(opt).__name__}; keras_trainop cannot stop the optimizer's "
                "own all-reduce under a distribution strategy. Please report it."
            )
        if opt.__dict__.get("_all_reduce_sum_gradients") is not _as_given:
            opt._all_reduce_sum_gradients = _as_given


def applies_gradients_as_given(optimizer):
    """Whether `apply_gradients_as_given(optimizer)` is in effect on every optimizer that applies."""
    return all(
        opt.__dict__.get("_all_reduce_sum_gradients") is _as_given
        for opt in applying_optimizers(optimizer)
    )


def needs_merge_call():
    """Whether the current replica context synchronises through `merge_call`.

    Such a strategy (MirroredStrategy on CPU, for one) forbids a `tf.cond` in
    replica context whose branch calls `merge_call`, as `apply_gradients`
    does. Keras's own LossScaleOptimizer asks TF the same question, through
    the same internal function.
    """
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def default_summary_writer():
    """The `tf.summary` writer made default by `writer.as_default()`, or None.

    A traced step captures the default writer when it is traced; a model with
    `summarize_gradients=True` must trace again when a later `fit` runs under
    another writer (or the first ran under none). TF keeps the default writer
    in a private thread-local state and exposes no getter for it.
    """
    from tensorflow.python.ops import summary_ops_v2

    return getattr(summary_ops_v2._summary_state, "writer", None)


# -- model.fit under MultiWorkerMirroredStrategy ------------------------------
#
# Keras 3.15.1's own `fit` fails there, for any model (tests/test_multiworker.py
# asserts it still does, so that the workaround goes when Keras fixes it).


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy over several workers.

    The same test as Keras's `_collective_all_reduce_multi_worker`, which
    guards the code path the workaround below replaces. TF has no public
    answer: `cluster_resolver.cluster_spec()` lists the cluster's tasks, not
    the workers this task trains with.
    """
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def _symbolic_build_from_a_local_batch(original):
    import keras

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is None or not is_multi_worker(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = next(it)
            break
        leaves = keras.tree.flatten(data_batch)
        if all(isinstance(v, tf.distribute.DistributedValues) for v in leaves):
            # Only shapes and dtypes are read: this worker's first replica's
            # batch has them, and needs no cross-worker reduction.
            data_batch = keras.tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0], data_batch
            )
        return original(self, data_batch=data_batch)

    return _maybe_symbolic_build


def _reduce_per_replica_for_scalars(original):
    import keras

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return original(values, strategy, reduction)

        def reduce(v):
            local = strategy.experimental_local_results(v)[0]
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return keras.tree.map_structure(reduce, values)

    return reduce_per_replica


def _install(owner, name, make):
    import functools

    original = getattr(owner, name)
    if getattr(original, "keras_trainop_original", None) is not None:
        return  # installed already
    patched = functools.update_wrapper(make(original), original)
    patched.keras_trainop_original = original
    setattr(owner, name, patched)


def tensorflow_trainer_class():
    """The TensorFlow backend's trainer class: `TensorFlowTrainer`, renamed `Trainer` in Keras 3.16."""
    from keras.src.backend.tensorflow import trainer

    return getattr(trainer, "TensorFlowTrainer", None) or trainer.Trainer


def patch_fit_for_multi_worker():
    """Makes Keras's `fit` work under a multi-worker MultiWorkerMirroredStrategy.

    Keras 3.15.1 fails there in two places of
    `keras/src/backend/tensorflow/trainer.py`, which no public API reaches:

    1. `TensorFlowTrainer._maybe_symbolic_build` (the class is `Trainer` in
       Keras 3.16) builds the model from
       `strategy.reduce("MEAN", batch, axis=None)` of the nested per-replica
       batch, which `CollectiveAllReduceExtended._reduce_to` cannot take
       ("Attempt to convert a value (PerReplica:...) ... to a Tensor"). The
       patch builds from this worker's first replica's batch instead: the
       build reads only shapes and dtypes.
    2. `reduce_per_replica` reduces each log with `strategy.reduce("MEAN", v,
       axis=0)`, which fails for a scalar ("Invalid reduction dimension 0 for
       input with 0 dimensions"). The patch uses `axis=None` for scalars.

    Both patched functions call the original unchanged unless the strategy is
    multi-worker (`is_multi_worker`). Installing again does nothing; each
    original stays reachable as `.keras_trainop_original` of its patch.
    """
    from keras.src.backend.tensorflow import trainer

    _install(tensorflow_trainer_class(), "_maybe_symbolic_build", _symbolic_build_from_a_local_batch)
    _install(trainer, "reduce_per_replica", _reduce_per_replica_for_scalars)


def patch_fit_for_strategy(strategy):
    """`patch_fit_for_multi_worker()` if `strategy` needs it; else nothing.

    `TrainOpModel.compile` calls it, so that a `kt.Model` compiled under a
    multi-worker strategy can `fit`; a plain `keras.Model` may call it too.
    """
    if is_multi_worker(strategy):
        patch_fit_for_multi_worker()


# -- the JAX backend ---------------------------------------------------------


def jax_update_metrics(model, metrics_values, loss, x, y, y_pred, sample_weight):
    """`(logs, new metrics values)`: Keras's JAX trainer's stateless metrics update.

    `JAXTrainer._update_metrics_variables` feeds the loss tracker and the
    compiled metrics in a stateless scope, as Keras's own JAX `train_step`
    does; there is no public stateless form of it.
    """
    return model._update_metrics_variables(metrics_values, loss, x, y, y_pred, sample_weight)


def optimizer_variables_built_for(optimizer):
    """The variables an optimizer was built for, in the order `stateless_apply` takes them.

    `stateless_apply(optimizer_variables, grads, trainable_variables)` wants
    exactly these (`Optimizer._trainable_variables`); Keras has no public name
    for the list.
    """
    return optimizer._trainable_variables


def jax_write_state(model, state):
    """Writes a JAX train step's returned state into the model's variables now.

    Keras's JAX `fit` keeps the state as values and writes it back only at the
    end of an epoch (`jax_state_sync`, from `_jax_state`); a step that raises
    must write it first, or the variables keep the state of the epoch's start
    (or none: `fit` purges them while it trains).
    """
    names = ("trainable_variables", "non_trainable_variables", "optimizer_variables", "metrics_variables")
    model._jax_state = dict(zip(names, state))
    model._jax_state_synced = False
    model.jax_state_sync()


def tensorflow_devices_initialized():
    """Whether TensorFlow has initialised its eager context, and with it its devices.

    On the JAX backend keras_trainop must not: TensorFlow would claim a GPU's
    memory next to JAX. TensorFlow has no public way to ask that does not
    initialise them; its context's handle is made on first use.
    """
    import sys

    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


def portable_optimizer_config(config):
    """A serialized optimizer (`{"module", "class_name", "config", ...}`) that loads on every backend.

    On PyTorch, `keras.optimizers.Adam()` is an instance of a backend class
    (`keras.src.backend.torch.optimizers.torch_adam.Adam`, and the same for
    SGD, AdamW, ...), and Keras 3.15 saves that class's module in the file:
    loaded on TensorFlow or JAX, the file makes a PyTorch optimizer, which
    fails at its first update. The class names are the public ones, so a
    backend module is replaced by `keras.optimizers`, in nested optimizers
    (`inner_optimizer` of a `LossScaleOptimizer`) too. Anything else is
    returned unchanged.
    """
    import keras

    if isinstance(config, list):
        return [portable_optimizer_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    config = {k: portable_optimizer_config(v) for k, v in config.items()}
    module, name = config.get("module"), config.get("class_name")
    if (isinstance(module, str) and module.startswith("keras.src.backend.") and ".optimizers" in module
            and isinstance(getattr(keras.optimizers, str(name), None), type)):
        config["module"] = "keras.optimizers"
    return config
