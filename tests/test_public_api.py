import keras_trainop as kt

PUBLIC = {
    "GATE_GRAPH", "GATE_NONE", "GradientTensorBoard", "GATE_OP", "USE_GLOBAL_STEP", "Model", "NonFiniteError",
    "Sequential", "SkipNonFinite", "TrainOpModel", "add_gradients_summaries", "clip_gradient_norms",
    "clip_gradient_norms_fn", "create_train_op", "create_train_step", "multiply_gradients", "raise_if_failed",
    "transforms",
}


def test_public_names_are_exactly_the_documented_ones():
    assert set(kt.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(kt, name) is not None


def test_gate_values_are_tf1s():
    import tensorflow as tf

    optimizer = tf.compat.v1.train.Optimizer
    assert (kt.GATE_NONE, kt.GATE_OP, kt.GATE_GRAPH) == (optimizer.GATE_NONE, optimizer.GATE_OP, optimizer.GATE_GRAPH)


def test_version_is_a_string():
    assert isinstance(kt.__version__, str) and kt.__version__.count(".") == 2
