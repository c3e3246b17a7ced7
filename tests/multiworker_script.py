"""One worker of tests/test_multiworker.py, in a process of its own.

`python multiworker_script.py OUT_DIR` runs every scenario under
MultiWorkerMirroredStrategy (TF_CONFIG names the cluster and this worker) and
writes `OUT_DIR/worker_<index>.json`. Worker 0 then trains the single-process
references (plain Keras, no strategy, same global batch) into
`OUT_DIR/reference.json`.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# Before TensorFlow runs anything: the strategy starts this worker's server.
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
from keras.src.backend.tensorflow import trainer  # noqa: E402 (what the workaround patches)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import mlp, regression_data  # noqa: E402

import keras_trainop as kt  # noqa: E402
from keras_trainop import _keras_private as private  # noqa: E402

GLOBAL_BATCH = 16
EPOCHS = 2
CLIP = 0.5  # the gradients' global norm is above it on most steps
PATCHED = [(private.tensorflow_trainer_class(), "_maybe_symbolic_build"), (trainer, "reduce_per_replica")]


def optimizer(**kwargs):
    return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)


def dataset():
    """Batched with the global batch; each worker reads its share of every batch."""
    x, y = regression_data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)


def weights(model):
    return [w.tolist() for w in model.get_weights()]


def fit(cls, **options):
    with STRATEGY.scope():
        model = mlp(cls)
        model.compile(optimizer(), "mse", **options)
    history = model.fit(dataset(), epochs=EPOCHS, verbose=0, shuffle=False)
    return {
        "weights": weights(model),
        "loss": history.history["loss"],
        "iterations": int(model.optimizer.iterations.numpy()),
    }


def error_of(run):
    """None, or the type and text of what `run()` raised.

    Only for failures that both workers meet at the same point before any
    collective op runs (Keras's, at trace time): the workers stay in step.
    """
    try:
        run()
    except Exception as e:  # noqa: BLE001 (the test asserts the type and text)
        return [type(e).__name__, str(e)[-2000:]]
    return None


def scenario(run):
    result = {}
    result["error"] = error_of(lambda: result.update(run()))
    return result


def installed():
    return [getattr(getattr(owner, name), "keras_trainop_original", None) is not None for owner, name in PATCHED]


def uninstall():
    """Takes the workaround out (it is process-wide), as if never installed."""
    for owner, name in PATCHED:
        current = getattr(owner, name)
        setattr(owner, name, getattr(current, "keras_trainop_original", current))


def keras_errors():
    """What Keras's own fit raises here: as released, and with the first workaround only."""
    errors = {"as_released": error_of(lambda: fit(keras.Model))}
    private.patch_fit_for_multi_worker()
    trainer.reduce_per_replica = trainer.reduce_per_replica.keras_trainop_original
    errors["stock_reduce_per_replica"] = error_of(lambda: fit(keras.Model))
    uninstall()
    return errors


def custom_loop():
    """`kt.create_train_step` run by `strategy.run` in a tf.function, over a distributed dataset."""
    with STRATEGY.scope():
        model = mlp(keras.Model)
        opt = optimizer()
        opt.build(model.trainable_variables)

        def loss_fn(x, y):
            per_example = keras.losses.mean_squared_error(y, model(x, training=True))
            return tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)

        step = kt.create_train_step(loss_fn, opt)

    @tf.function
    def train(x, y):
        return STRATEGY.run(step, args=(x, y))

    for _ in range(EPOCHS):
        for x, y in STRATEGY.experimental_distribute_dataset(dataset()):
            train(x, y)
    return {"weights": weights(model), "iterations": int(opt.iterations.numpy())}


def references():
    """The same trainings with no strategy: plain Keras in this process, one device."""

    def reference(**kwargs):
        model = mlp(keras.Model)
        model.compile(optimizer(**kwargs), "mse")
        history = model.fit(dataset(), epochs=EPOCHS, verbose=0, shuffle=False)
        return {"weights": weights(model), "loss": history.history["loss"]}

    return {"plain": reference(), "clipped": reference(global_clipnorm=CLIP)}


def main():
    out_dir = sys.argv[1]
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    results = {
        "replicas": STRATEGY.num_replicas_in_sync,
        "multi_worker": private.is_multi_worker(STRATEGY),
        "installed_at_start": installed(),
    }
    results.update(keras_errors())
    # Keras as released again: a kt.Model's compile must install the workaround.
    results["kt_model"] = scenario(lambda: fit(kt.Model))
    results["installed_by_compile"] = installed()
    results["kt_model_clipped"] = scenario(
        lambda: fit(kt.Model, grad_transforms=[kt.transforms.clip_by_global_norm(CLIP)])
    )
    results["custom_loop"] = scenario(custom_loop)
    # A plain keras.Model gets it by hand.
    private.patch_fit_for_strategy(STRATEGY)
    results["keras_model"] = scenario(lambda: fit(keras.Model))
    with open(os.path.join(out_dir, f"worker_{index}.json"), "w") as f:
        json.dump(results, f)
    if index == 0:
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            json.dump(references(), f)


if __name__ == "__main__":
    main()
