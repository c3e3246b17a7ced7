import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ["KERAS_BACKEND"] == "jax":
    # Two host devices, for keras.distribution.DataParallel (read when JAX starts).
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
# The files every backend runs (README: one pytest process per backend, since
# Keras picks its backend at import); the others test TensorFlow's step.
ON_EVERY_BACKEND = {"test_backends.py"}
if BACKEND != "tensorflow":
    collect_ignore_glob = [
        name for name in os.listdir(os.path.dirname(__file__))
        if name.startswith("test_") and name.endswith(".py") and name not in ON_EVERY_BACKEND
    ]

# Execution modes: on JAX, a step without jit is the eager one. On PyTorch
# the step is eager; `jit_compile=True` (torch.compile, about 40 s a model on
# 2 CPU cores) has its own tests in test_backends.py.
MODES = {"tensorflow": ["eager", "graph", "jit"], "jax": ["eager", "jit"], "torch": ["eager"]}[BACKEND]


def pytest_collection_modifyitems(items):
    """On PyTorch, Keras refuses `steps_per_execution` > 1: those cases are skipped, saying so."""
    if BACKEND != "torch":
        return
    refused = pytest.mark.skip(reason="Keras: `steps_per_execution` must be 1 with the PyTorch backend")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("steps_per_execution", 1) > 1:
            item.add_marker(refused)


def mode_kwargs(mode):
    """Keras compile() arguments for an execution mode."""
    return {"run_eagerly": mode == "eager", "jit_compile": mode == "jit"}


@pytest.fixture(autouse=True)
def fresh_keras():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


def regression_data(n=64, features=4, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, features).astype("float32")
    y = (x @ rng.randn(features, 1)).astype("float32")
    return x, y


def mlp(cls=keras.Model, features=4, hidden=8, seed=0, batchnorm=False):
    """A small functional MLP of class `cls`, with fixed initial weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    h = keras.layers.Dense(hidden, activation="tanh", name="hidden")(inputs)
    if batchnorm:
        h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(1, name="out")(h)
    return cls(inputs, outputs)


class SubclassedMLP(keras.Model):
    """`mlp()` subclassed: its layers made in `__init__`, its weights at the first call."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def sequential_mlp(cls, seed=0):
    """`mlp()` as a `cls` (a Sequential class), with fixed initial weights."""
    keras.utils.set_random_seed(seed)
    return cls([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def max_abs_diff(a, b):
    """The largest elementwise difference of two equally long lists of equally shaped arrays."""
    a, b = list(a), list(b)
    assert len(a) == len(b), f"{len(a)} arrays against {len(b)}"
    assert a, "nothing to compare"
    for p, q in zip(a, b):
        assert np.shape(p) == np.shape(q), f"shape {np.shape(p)} against {np.shape(q)}"
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)), initial=0.0)) for p, q in zip(a, b))


def layer_weights(model):
    """The values of the model's own weights, without keras_trainop's step state.

    (A kt model with the skip policy, stateful transforms, accumulation or a
    Keras global step also keeps those among its weights, so they are saved.)
    """
    pipeline = getattr(model, "train_pipeline", None)
    state = {id(v) for v in pipeline.state_variables()} if pipeline is not None else set()
    return [v.numpy() for v in model.weights if id(v) not in state]


def optimizer_state(model):
    return [v.numpy() for v in model.optimizer.variables]


def _dtype_policy(name):
    keras.mixed_precision.set_dtype_policy(name)
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def mixed_float16():
    """The mixed_float16 dtype policy for one test (Keras then wraps optimizers in a LossScaleOptimizer)."""
    yield from _dtype_policy("mixed_float16")


@pytest.fixture
def mixed_bfloat16():
    """The mixed_bfloat16 dtype policy for one test (no loss scaling)."""
    yield from _dtype_policy("mixed_bfloat16")
