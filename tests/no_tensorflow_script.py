"""tests/test_backends.py's check that the JAX or PyTorch step runs no TensorFlow, in a fresh process.

    python no_tensorflow_script.py BACKEND MODE     prints initialised=True|False
"""

import os
import sys

os.environ["KERAS_BACKEND"] = sys.argv[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_trainop as kt  # noqa: E402
from conftest import mlp, mode_kwargs  # noqa: E402
from keras_trainop import _keras_private as private  # noqa: E402
from test_backends import BATCH, nan_data  # noqa: E402

T = kt.transforms


def main(mode):
    data = nan_data(1)
    model = mlp(kt.Model, batchnorm=True)
    step = keras.Variable(0, dtype="int32", trainable=False, name="global_step")
    model.compile("adam", "mse", check_numerics="skip", variables_to_train=["hidden", "out"],
                  grad_transforms=[T.clip_by_global_norm(1.0), T.adaptive_grad_clip(0.1), T.add_noise(0.01),
                                   T.adaptive_clip_by_global_norm(), T.centralize(), T.zero_nans()],
                  gradient_accumulation_steps=2, global_step=step, update_ops=[lambda: None],
                  **mode_kwargs(mode))
    model.fit(*data, batch_size=BATCH, epochs=2, validation_data=data, verbose=0)
    model.evaluate(*data, verbose=0)
    model.predict(data[0], verbose=0)
    print(f"initialised={private.tensorflow_devices_initialized()}")


if __name__ == "__main__":
    main(sys.argv[2])
