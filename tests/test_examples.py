"""Each example runs as a user would run it, in a process of its own, bounded in time."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_trains_clips_and_blocks_a_nan_step():
    out = run_example("quickstart.py")
    lines = out.splitlines()
    accuracy = float(next(line for line in lines if line.startswith("epoch 3")).split("accuracy=")[1])
    assert accuracy > 0.9
    assert "updates applied: 96 (optimizer.iterations=96)" in out
    assert "check_numerics stopped step 97: loss is inf or nan" in out
    assert "weights unchanged: True; updates still 96" in out


def test_nonfinite_comparison_shows_what_each_policy_leaves():
    out = run_example("nonfinite_vs_terminate_on_nan.py")
    assert "keras TerminateOnNaN: stopped after 5 updates; weights finite: False" in out
    assert "kt check_numerics=True: raised at step 5 (loss) after 4 updates; weights finite: True" in out
    skip_line = next(line for line in out.splitlines() if line.startswith("kt check_numerics='skip'"))
    assert "skipped_steps per epoch [1, 1, 1], 27 updates; weights finite: True" in skip_line
    assert "last epoch loss nan" not in skip_line
