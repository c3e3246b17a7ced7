"""model.fit and the functional API under MultiWorkerMirroredStrategy: two local CPU workers.

Both workers run tests/multiworker_script.py once (one rendezvous for every
scenario); each writes what the tests assert to a JSON file.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import max_abs_diff

HERE = pathlib.Path(__file__).resolve().parent
WORKERS = 2
TIMEOUT_S = 180
WORKAROUND = "keras_trainop._keras_private.patch_fit_for_multi_worker"

pytestmark = pytest.mark.slow


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(WORKERS)]}
    workers = []
    for index in range(WORKERS):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=tf_config, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
        log = open(out / f"worker_{index}.log", "w")
        workers.append((subprocess.Popen(
            [sys.executable, str(HERE / "multiworker_script.py"), str(out)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE,
        ), log))
    failures = []
    for index, (process, log) in enumerate(workers):
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other, _ in workers:
                other.kill()  # this worker's own pid only
                other.wait()
            code = "timeout"
        log.close()
        if code != 0:
            failures.append(f"worker {index}: {code}\n{(out / f'worker_{index}.log').read_text()[-3000:]}")
    assert not failures, "\n".join(failures)
    results = [json.loads((out / f"worker_{index}.json").read_text()) for index in range(WORKERS)]
    return results, json.loads((out / "reference.json").read_text())


def test_two_workers_of_one_replica_each(run):
    workers, _ = run
    for worker in workers:
        assert worker["replicas"] == WORKERS
        assert worker["multi_worker"] is True
        assert worker["installed_at_start"] == [False, False]


def test_keras_fit_still_fails_without_the_first_workaround(run):
    # When a Keras release builds the model from a multi-worker batch, this fails.
    for worker in run[0]:
        error = worker["as_released"]
        assert error is not None and error[0] == "ValueError" and "PerReplica" in error[1], (
            "Keras's fit no longer fails in `_maybe_symbolic_build` under "
            f"MultiWorkerMirroredStrategy: remove that workaround in {WORKAROUND}. "
            f"Received: {error}"
        )


def test_keras_fit_still_fails_without_the_second_workaround(run):
    # When a Keras release reduces scalar logs across workers, this fails.
    for worker in run[0]:
        error = worker["stock_reduce_per_replica"]
        assert error is not None and error[0] == "ValueError" and (
            "Invalid reduction dimension 0 for input with 0 dimensions" in error[1]
        ), (
            "Keras's fit no longer fails in `reduce_per_replica` under "
            f"MultiWorkerMirroredStrategy: remove that workaround in {WORKAROUND}. "
            f"Received: {error}"
        )


def test_compiling_a_kt_model_installs_the_workaround(run):
    for worker in run[0]:
        assert worker["installed_by_compile"] == [True, True]


@pytest.mark.parametrize(
    "scenario, reference",
    [
        ("kt_model", "plain"),
        ("kt_model_clipped", "clipped"),
        ("custom_loop", "plain"),
        ("keras_model", "plain"),
    ],
)
def test_trains_like_one_process_with_the_global_batch(run, scenario, reference):
    workers, references = run
    first, second = (worker[scenario] for worker in workers)
    assert first["error"] is None, first["error"]
    assert second["error"] is None, second["error"]
    assert first["iterations"] == second["iterations"] == 2 * 4  # 2 epochs of 64 / 16
    assert max_abs_diff(first["weights"], second["weights"]) == 0
    # Oracle: plain Keras without a strategy, same global batch (Keras's own
    # global_clipnorm for the clipped run: the clip of the global-batch gradient).
    assert max_abs_diff(first["weights"], references[reference]["weights"]) <= 1e-6
    if "loss" in first:
        np.testing.assert_allclose(first["loss"], references[reference]["loss"], rtol=1e-6)


def test_the_clip_acts(run):
    _, references = run
    assert max_abs_diff(references["clipped"]["weights"], references["plain"]["weights"]) > 1e-3
