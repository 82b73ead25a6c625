"""Ctrl-C during training: a real SIGINT stops the run after its step, with its state kept."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import flowmap


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_sigint_stops_after_the_step_and_keeps_the_state(tmp_path):
    started = threading.Event()

    def progress(step, loss):
        if step is not None and step >= 5:
            started.set()

    def interrupt():
        started.wait(60)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    kw = dict(steps=100_000, batch=64, seed=2)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt) as info:
        flowmap.train_teacher("moons", progress=progress, state=tmp_path / "t.safetensors", **kw)
    assert time.time() - t0 < 60
    err = info.value
    assert isinstance(err, flowmap.TrainingInterrupted)
    step = err.state.step
    assert 5 <= step < 100_000
    assert "interrupted after step" in str(err) and str(tmp_path / "t.safetensors") in str(err)
    # The state on disk is the one on the exception.
    assert flowmap.TrainState.load(tmp_path / "t.safetensors").step == step
    # Resuming it to a short horizon equals a run of that horizon from scratch (within the 100 warm-up
    # steps the learning rate does not depend on the horizon).
    assert step + 3 <= 100, f"the interrupt came late (step {step})"
    short = dict(kw, steps=step + 3)
    whole = flowmap.train_teacher("moons", progress=False, **short)
    resumed = flowmap.train_teacher("moons", progress=False, resume=err.state, **short)
    assert np.array_equal(whole.sample(100, nfe=4), resumed.sample(100, nfe=4))
