"""One side of tests/test_backends.py's cross-backend test, run in its own process.

    python cross_backend_script.py BACKEND save FILE      train an epoch, save FILE
    python cross_backend_script.py BACKEND resume FILE    load FILE, train an epoch, write FILE.BACKEND.npz
"""

import os
import sys

if __name__ == "__main__":  # imported by the test, it runs on the test's backend
    os.environ["KERAS_BACKEND"] = sys.argv[1]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_trainop as kt  # noqa: E402
from test_backends import BATCH, nan_data, state_of  # noqa: E402
from conftest import mlp  # noqa: E402


def make():
    model = mlp(kt.Model, batchnorm=True)
    model.compile("adam", "mse", check_numerics="skip",
                  grad_transforms=[kt.transforms.clip_by_global_norm(0.05),
                                   kt.transforms.adaptive_clip_by_global_norm()])
    return model


def main(action, path):
    data = nan_data(1)
    if action == "save":
        model = make()
        model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
        model.save(path)
        return
    model = keras.saving.load_model(path)
    model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    own = [keras.ops.convert_to_numpy(v) for v in model.train_step_state.state_variables]
    np.savez(f"{path}.{keras.backend.backend()}.npz", *state_of(model), *own)


if __name__ == "__main__":
    main(sys.argv[2], sys.argv[3])
