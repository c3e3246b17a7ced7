"""TrainOpModel under MirroredStrategy on two logical CPU devices (in a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def run_script(name):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(HERE / name)],
        capture_output=True, text=True, timeout=300, env=env, cwd=HERE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mirrored():
    return run_script("mirrored_script.py")


@pytest.fixture(scope="module")
def scale():
    return run_script("mirrored_scale_script.py")


def test_two_replicas(mirrored):
    assert mirrored["replicas"] == 2


@pytest.mark.parametrize("check", [True, False])
def test_default_options_train_like_plain_keras_under_mirrored(mirrored, check):
    # Oracle: plain keras.Model under the same strategy (the all-reduce is Keras's).
    assert mirrored[f"parity_check_{check}"] == 0


def test_non_finite_step_is_blocked_on_every_replica(mirrored):
    assert mirrored["error"] is not None and "inf or nan at step 3" in mirrored["error"]
    assert mirrored["error_step"] == 3
    assert mirrored["iterations"] == 2
    # Oracle: the same model trained on the two good batches only (BN statistics included).
    assert mirrored["blocked_diff"] == 0
    assert mirrored["blocked_slots_diff"] == 0


def test_skip_policy_under_mirrored(mirrored):
    assert mirrored["skip_history"] == [1.0]
    # Oracle: the same model trained on the good batches only.
    assert mirrored["skip_diff"] == 0


def test_all_policy_names_the_gradient_under_mirrored(mirrored):
    assert mirrored["all_error"] == [3, "gradients", ["poisonable/kernel"]]


def test_a_failure_on_the_second_replica_only_is_named_for_what_it_is(mirrored):
    # check_numerics=True checks the loss only: the error says "loss", not "gradients".
    assert mirrored["second_replica_loss"] == [3, "loss"]
    assert mirrored["second_replica_all"] == [2, "gradients", ["poisonable/kernel"]]


def test_gradient_tensorboard_records_the_reduced_gradients_once(mirrored):
    assert mirrored["callback_steps"] == [2, 4]
    # Oracle: the single-device gradient of the same global batch.
    assert abs(mirrored["callback_first_norm"] - mirrored["single_device_norm"]) <= 1e-5 * mirrored["single_device_norm"]


def test_the_logged_grad_norm_is_the_norm_of_the_reduced_gradients(mirrored):
    # Oracle: the mean over the epoch of the single-device gradient norms.
    assert abs(mirrored["logged_grad_norm"] - mirrored["single_device_mean_norm"]) <= (
        1e-5 * mirrored["single_device_mean_norm"])


# -- transforms see the all-reduced gradients (mirrored_scale_script.py) ----------


def test_clip_by_global_norm_under_mirrored_equals_one_device(scale):
    assert scale["replicas"] == 2
    # Oracle: Keras's SGD(global_clipnorm) on one device, same global batch.
    assert scale["clip_diff"] <= 1e-6
    assert scale["optimizer_as_given"] is True


def test_plain_keras_global_clipnorm_under_mirrored_is_wrong(scale):
    # What the README reports: Keras clips each replica's share before its all-reduce.
    assert scale["plain_keras_clip_diff"] > 1e-2


def test_the_update_norm_is_the_clip_norm(scale):
    # One SGD(1.0) step whose gradient norm is far above 1.0: the update's norm is 1.0.
    assert abs(scale["ours_update_norm"] - 1.0) <= 1e-5
    assert scale["plain_update_norm"] > 1.2


def test_sparse_gradients_are_reduced_and_clipped_under_mirrored(scale):
    assert scale["sparse_clip_diff"] <= 1e-6


def test_mixed_precision_under_mirrored(scale):
    # Oracle: Keras's LossScaleOptimizer over SGD(global_clipnorm) on one device,
    # which clips unscaled gradients: same overflow skips, same scale.
    assert scale["mixed_clip_diff"] <= 1e-4
    assert scale["mixed_scale"] == scale["mixed_reference_scale"] == 16384.0
    assert scale["mixed_iterations"] == [7, 7]  # 8 batches, the first overflowed
    # And float32 with the same transform, within float16 precision.
    assert scale["mixed_low_scale_iterations"] == 8
    assert scale["mixed_vs_float32_diff"] <= 1e-3


@pytest.mark.parametrize("transforms", ["none", "clip"])
@pytest.mark.parametrize("wrapper", ["multi_map", "multi_selector", "loss_scale_multi"])
def test_optimizers_that_wrap_others_apply_once_under_mirrored(scale, wrapper, transforms):
    # Oracle: one device (plain Keras without transforms; kt with the clip).
    # Before the fix a MultiOptimizer's sub-optimizers all-reduced again: 2x updates.
    assert scale["wrapped"][f"{wrapper}-{transforms}"] <= 1e-6
    assert scale["wrapped"][f"{wrapper}-as_given"] is True


def test_create_train_step_under_strategy_run(scale):
    assert scale["functional_clip_diff"] <= 1e-6


def test_an_unbuilt_optimizer_under_strategy_run_gets_a_clear_error(scale):
    assert "optimizer must be built before the step is traced" in scale["unbuilt_error"]


@pytest.mark.parametrize("policy", ["True", "skip"])
def test_gradient_accumulation_under_mirrored_equals_one_larger_batch(scale, policy):
    # Oracle: Keras's SGD(global_clipnorm) on one device with a batch twice as large.
    assert scale[f"accumulation_diff_{policy}"] <= 1e-6


def test_gradient_accumulation_under_mirrored_and_mixed_precision(scale):
    assert scale["accumulation_mixed_diff"] <= 1e-3
