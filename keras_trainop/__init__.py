"""keras_trainop: TF1's `create_train_op` feature set for Keras 3 (TensorFlow backend).

Public names only; see README.md.
"""

from keras_trainop.callbacks import GradientTensorBoard
from keras_trainop.functional import add_gradients_summaries
from keras_trainop.functional import clip_gradient_norms
from keras_trainop.functional import clip_gradient_norms_fn
from keras_trainop.functional import create_train_op
from keras_trainop.functional import create_train_step
from keras_trainop.functional import multiply_gradients
from keras_trainop.functional import raise_if_failed
from keras_trainop.model import Model
from keras_trainop.model import Sequential
from keras_trainop.model import TrainOpModel
from keras_trainop.numerics import NonFiniteError
from keras_trainop.numerics import SkipNonFinite
from keras_trainop.options import GATE_GRAPH
from keras_trainop.options import GATE_NONE
from keras_trainop.options import GATE_OP
from keras_trainop.options import USE_GLOBAL_STEP
from keras_trainop import transforms

__version__ = "0.1.0"

__all__ = [
    "GATE_GRAPH",
    "GradientTensorBoard",
    "GATE_NONE",
    "GATE_OP",
    "USE_GLOBAL_STEP",
    "Model",
    "NonFiniteError",
    "Sequential",
    "SkipNonFinite",
    "TrainOpModel",
    "add_gradients_summaries",
    "clip_gradient_norms",
    "clip_gradient_norms_fn",
    "create_train_op",
    "create_train_step",
    "multiply_gradients",
    "raise_if_failed",
    "transforms",
]
