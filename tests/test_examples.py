"""Each example (and the migration guide's snippets) runs as a user would run it, in a process
of its own, bounded in time."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(path, timeout=240, **extra_env):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", **extra_env)
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_example(name, timeout=240):
    return run_script(ROOT / "examples" / name, timeout)


def line_starting(out, prefix):
    return next(line for line in out.splitlines() if line.startswith(prefix))


def number_after(line, key):
    return float(re.search(re.escape(key) + r"([-0-9.e+]+)", line).group(1))


def test_quickstart_trains_clips_and_blocks_a_nan_step():
    out = run_example("quickstart.py")
    last = line_starting(out, "epoch 3")
    assert number_after(last, "accuracy=") > 0.9
    # The per-tensor clip acts: the global norm after it is smaller than before.
    assert number_after(last, "clipped_grad_norm=") < number_after(last, " grad_norm=")
    assert "updates applied: 96 (optimizer.iterations=96)" in out
    assert "gradient summaries: 10 tags at steps [32, 64, 96]" in out
    assert "check_numerics stopped step 97: loss is inf or nan" in out
    assert "weights unchanged: True; updates still 96" in out


def test_nonfinite_comparison_shows_what_each_policy_leaves():
    out = run_example("nonfinite_vs_terminate_on_nan.py")
    assert "keras TerminateOnNaN: stopped after 5 updates; weights finite: False" in out
    assert (
        "kt check_numerics=True: raised at step 5 (loss) after 4 updates; weights finite: True" in out
    )
    skip_line = line_starting(out, "kt check_numerics='skip'")
    assert "skipped_steps per epoch [1, 1, 1], 27 updates; weights finite: True" in skip_line
    assert "last epoch loss nan" not in skip_line


def test_tf1_migration_both_rewrites_agree():
    out = run_example("tf1_migration.py")
    for name in ("create_train_op", "create_train_step"):
        line = line_starting(out, f"{name}: loss")
        assert line.endswith("global_step=150")
        first, last = re.findall(r"loss ([0-9.]+) .*-> ([0-9.]+)", line)[0]
        assert float(last) < float(first)
    assert number_after(line_starting(out, "both rewrites"), "max difference ") < 1e-5


def test_actor_critic_returns_nested_losses_and_learns():
    out = run_example("custom_loop_actor_critic.py")
    line = line_starting(out, "step 300:")
    assert all(f"{key}=" in line for key in ("policy", "value", "entropy"))
    last = out.splitlines()[-1]
    assert last.startswith("updates: 300;")
    assert number_after(last, "greedy policy reward: ") > 0.9


def test_fine_tuning_freezes_and_clips_per_group():
    out = run_example("fine_tuning.py")
    assert "backbone_1: largest weight change 0.0000" in out
    assert number_after(line_starting(out, "backbone_2:"), "change ") > 0
    last = out.splitlines()[-1]
    assert last.endswith("backbone_1 frozen: True")
    before, after = re.findall(r"accuracy ([0-9.]+) -> ([0-9.]+)", last)[0]
    assert float(after) > float(before)


def test_mixed_precision_mirrored_accumulates_on_two_replicas():
    out = run_example("mixed_precision_mirrored.py")
    assert "replicas: 2" in out
    assert "variables: float32, computation: float16" in out
    assert "optimizer: LossScaleOptimizer" in out
    assert "192 batches -> 48 updates" in out
    assert number_after(line_starting(out, "loss scale after training:"), "training: ") > 0
    assert number_after(out.splitlines()[-1], "accuracy=") > 0.9


def test_migration_guide_snippets_run(tmp_path):
    # docs/migration.md: its setup block, then every block marked `# keras_trainop`.
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "migration.md").read_text(), re.S)
    setup = [b for b in blocks if "def make_model" in b]
    snippets = [b for b in blocks if b.startswith("# keras_trainop")]
    assert len(setup) == 1 and len(snippets) == 8
    script = tmp_path / "migration_snippets.py"
    script.write_text(
        setup[0] + "".join(f"\n{b}\nprint('snippet {i} ran')\n" for i, b in enumerate(snippets))
    )
    out = run_script(script, TMPDIR=str(tmp_path))  # the snippets' log_dir goes there
    assert f"snippet {len(snippets) - 1} ran" in out


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_readmes_first_example_runs_as_pasted_and_survives_saving(tmp_path):
    # The first block of README.md, as a user would paste it, in a fresh directory.
    first = python_blocks(ROOT / "README.md")[0]
    script = tmp_path / "first_example.py"
    script.write_text(first)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(script)],  # no "cannot be saved" warning
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[ClipByGlobalNorm(clip_norm=1.0)]"
    assert (tmp_path / "model.keras").exists()
    assert list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))


def test_the_transform_guides_stateful_example_trains_and_saves(tmp_path):
    # docs/transforms.md: the user-defined stateful transform, in a model that saves and loads it.
    (block,) = [b for b in python_blocks(ROOT / "docs" / "transforms.md") if "class ScaleByRunningNorm" in b]
    script = tmp_path / "own_transform.py"
    script.write_text(textwrap.dedent(block) + '''
import numpy as np

x = np.random.default_rng(0).standard_normal((256, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
transform = ScaleByRunningNorm(decay=0.5)
model = kt.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile("sgd", "mse", grad_transforms=[transform])
model.fit(x, y, batch_size=32, verbose=0)
path = __file__.replace(".py", ".keras")  # next to the script, in the test's directory
model.save(path)
loaded = keras.saving.load_model(path)
(restored,) = loaded.train_options.transforms
print("state", float(transform.mean.numpy()), float(restored.mean.numpy()), restored.decay)
''')
    out = run_script(script, timeout=240)
    _, kept, restored, decay = out.strip().splitlines()[-1].split()
    assert kept == restored and float(kept) != 1.0 and decay == "0.5"
