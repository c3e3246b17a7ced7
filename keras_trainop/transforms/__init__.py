"""Gradient transforms: composable, serialisable, exact on sparse gradients.

Each transform has TF1's `transform_grads_fn` contract (a list of
`(gradient, variable)` pairs in, a new list out) and goes into
`compile(grad_transforms=[...])`, `transform_grads_fn=` or the functional
API. See docs/transforms.md for the table of formulas and
sparse support.
"""

from keras_trainop.transforms.adaptive import AdaptiveClipByGlobalNorm
from keras_trainop.transforms.adaptive import AdaptiveGradClip
from keras_trainop.transforms.adaptive import adaptive_clip_by_global_norm
from keras_trainop.transforms.adaptive import adaptive_grad_clip
from keras_trainop.transforms.base import GradientTransform
from keras_trainop.transforms.clipping import ClipByGlobalNorm
from keras_trainop.transforms.clipping import ClipByNorm
from keras_trainop.transforms.clipping import ClipByValue
from keras_trainop.transforms.clipping import clip_by_global_norm
from keras_trainop.transforms.clipping import clip_by_norm
from keras_trainop.transforms.clipping import clip_by_value
from keras_trainop.transforms.combining import Chain
from keras_trainop.transforms.combining import Masked
from keras_trainop.transforms.combining import Partition
from keras_trainop.transforms.combining import chain
from keras_trainop.transforms.combining import masked
from keras_trainop.transforms.combining import partition
from keras_trainop.transforms.noise import AddNoise
from keras_trainop.transforms.noise import AddScaledNoise
from keras_trainop.transforms.noise import add_noise
from keras_trainop.transforms.noise import add_scaled_noise
from keras_trainop.transforms.others import Centralize
from keras_trainop.transforms.others import ZeroNans
from keras_trainop.transforms.others import centralize
from keras_trainop.transforms.others import zero_nans
from keras_trainop.transforms.scaling import Multiply
from keras_trainop.transforms.scaling import multiply

__all__ = [
    "AdaptiveClipByGlobalNorm",
    "AdaptiveGradClip",
    "AddNoise",
    "AddScaledNoise",
    "Centralize",
    "Chain",
    "ClipByGlobalNorm",
    "ClipByNorm",
    "ClipByValue",
    "GradientTransform",
    "Masked",
    "Multiply",
    "Partition",
    "ZeroNans",
    "adaptive_clip_by_global_norm",
    "adaptive_grad_clip",
    "add_noise",
    "add_scaled_noise",
    "centralize",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "masked",
    "multiply",
    "partition",
    "zero_nans",
]
