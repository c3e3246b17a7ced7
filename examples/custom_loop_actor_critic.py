"""A custom training loop with nested losses: actor-critic on a contextual bandit.

The loss function returns a dict of losses (policy, value, entropy), as
TF-Agents' `LossInfo` does; `total_loss_fn` says what to minimise; each step
returns the whole dict, from before the update.

The bandit: a state s of 4 numbers, 2 actions; action 1 pays 1 when
s[0] + s[1] > 0, action 0 pays 1 otherwise. An actor (policy network) and a
critic (value network) learn from sampled actions, A2C-style.

Run: python examples/custom_loop_actor_critic.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_trainop as kt  # noqa: E402

STEPS, BATCH = 300, 64


def reward(states, actions):
    best = tf.cast(states[:, 0] + states[:, 1] > 0, tf.int32)
    return tf.cast(tf.equal(actions, best), tf.float32)


def main():
    keras.utils.set_random_seed(0)
    actor = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(32, "tanh"), keras.layers.Dense(2)]  # 2 logits
    )
    critic = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(32, "tanh"), keras.layers.Dense(1)]  # V(s)
    )

    def losses(states, actions, rewards):
        log_probs = tf.nn.log_softmax(actor(states))
        values = tf.squeeze(critic(states), -1)
        advantages = tf.stop_gradient(rewards - values)
        taken = tf.reduce_sum(tf.one_hot(actions, 2) * log_probs, axis=-1)
        return {
            "policy": -tf.reduce_mean(taken * advantages),
            "value": tf.reduce_mean(tf.square(rewards - values)),
            "entropy": -tf.reduce_mean(tf.reduce_sum(tf.exp(log_probs) * log_probs, -1)),
        }

    train_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
    step = kt.create_train_step(
        losses,
        keras.optimizers.Adam(3e-3),
        # The scalar to minimise; the step still returns the whole dict.
        total_loss_fn=lambda loss: loss["policy"] + 0.5 * loss["value"] - 0.01 * loss["entropy"],
        # None (the default) trains every trainable variable the loss reads:
        # here the actor's and the critic's.
        variables_to_train=None,
        transform_grads_fn=kt.transforms.clip_by_global_norm(0.5),  # A2C's max_grad_norm
        check_numerics="all",  # a nan/inf loss or gradient raises, naming the variables
        global_step=train_steps,
    )

    @tf.function
    def collect_and_train(states):
        # Acting: sample actions from the current policy (no gradient needed).
        actions = tf.squeeze(tf.random.categorical(actor(states), 1, dtype=tf.int32), -1)
        return step(states, actions, reward(states, actions))

    rng = np.random.default_rng(0)
    for i in range(1, STEPS + 1):
        values = collect_and_train(rng.standard_normal((BATCH, 4)).astype("float32"))
        if i % 100 == 0:
            print(f"step {i}: " + " ".join(f"{k}={float(v):.4f}" for k, v in values.items()))

    states = rng.standard_normal((1000, 4)).astype("float32")
    greedy = tf.argmax(actor(states), axis=-1, output_type=tf.int32)
    print(f"updates: {int(train_steps.numpy())}; "
          f"greedy policy reward: {float(tf.reduce_mean(reward(states, greedy))):.3f}")


if __name__ == "__main__":
    main()
