"""The package's API on points and images: training, sampling, maps, evaluation, files."""

import time

import numpy as np
import pytest

import flowmap


def test_methods_are_the_registry():
    names = [m["name"] for m in flowmap.methods()]
    assert {"emd", "lmd", "cm", "ctm", "meanflow", "shortcut"} <= set(names)
    assert all(isinstance(m["needs_teacher"], bool) and m["summary"] for m in flowmap.methods())
    assert {m["name"] for m in flowmap.methods() if not m["needs_teacher"]} >= {"meanflow", "self-lmd"}


def test_models_describe_themselves(teacher, fmap):
    assert teacher.kind == "teacher" and fmap.kind == "flow_map"
    assert teacher.state_shape == [2] and teacher.num_classes is None
    meta = fmap.metadata
    assert meta["kind"] == "flow_map" and meta["training"]["objective"] == "emd"
    assert meta["arch"] == fmap.config and fmap.config["kind"] == "mlp"
    assert meta["training"]["train"]["steps"] == 60


def test_sampling_is_seeded_and_shaped(fmap):
    a = fmap.sample(500, nfe=2, seed=3)
    assert a.shape == (500, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, fmap.sample(500, nfe=2, seed=3))
    assert not np.array_equal(a, fmap.sample(500, nfe=2, seed=4))
    # A custom grid with the uniform grid's times is the same sampler.
    assert np.array_equal(a, fmap.sample(500, grid=[1.0, 0.5, 0.0], seed=3))


def test_sample_is_a_view_of_one_owned_buffer(fmap):
    """The samples' buffer is handed to NumPy, not copied: the array is a reshape of a flat array whose
    memory is the Rust vector itself (its owner is not a NumPy array)."""
    x = fmap.sample(100, nfe=1)
    flat = x.base
    assert isinstance(flat, np.ndarray) and flat.ndim == 1 and flat.size == x.size
    assert np.shares_memory(flat, x) and not flat.flags.owndata
    assert flat.base is not None and not isinstance(flat.base, np.ndarray)


def test_a_map_at_equal_times_is_the_identity(fmap):
    """`f(x, t, t) = x` exactly: the step `(s − t)·F` vanishes."""
    x = fmap.sample(64, nfe=2, seed=0)
    mid = fmap(x, t=0.0, s=0.0)
    np.testing.assert_array_equal(mid, x)


def test_teacher_map_is_its_ode_solution(teacher):
    """A teacher's map is Φ by its solver: dopri5 and a fine RK4 agree, and going down then from the
    midpoint composes (the semigroup property of Φ)."""
    x = teacher.sample(256, nfe=1, solver="euler", seed=1)
    a = teacher(x, 0.9, 0.1, solver="dopri5", tol=1e-6)
    b = teacher(x, 0.9, 0.1, solver="rk4", steps=200)
    np.testing.assert_allclose(a, b, atol=2e-4)
    c = teacher(teacher(x, 0.9, 0.5, tol=1e-6), 0.5, 0.1, tol=1e-6)
    np.testing.assert_allclose(a, c, atol=2e-4)


def test_velocity_is_the_derivative_of_the_map(teacher):
    """v(x, t) = d/ds Φ_{t→s}(x) at s = t: the map over a short step down moves by −h·v."""
    x = teacher.sample(128, nfe=4, seed=2)
    h = 1e-3
    v = teacher.velocity(x, 0.6)
    step = teacher(x, 0.6, 0.6 - h, solver="rk4", steps=1)
    np.testing.assert_allclose((step - x) / -h, v, rtol=0, atol=5e-2)


def test_per_row_times_and_classes(teacher):
    x = np.zeros((3, 2), dtype=np.float32)
    y = teacher(x, t=[1.0, 0.8, 0.5], s=[0.0, 0.0, 0.5], solver="euler", steps=4)
    np.testing.assert_array_equal(y[2], x[2])
    with pytest.raises(ValueError, match="2 values of t for 3 states"):
        teacher(x, t=[1.0, 0.5], s=0.0)


def test_save_load_round_trip_is_bit_exact(tmp_path, teacher, fmap):
    for m in (teacher, fmap):
        p = tmp_path / f"{m.kind}.safetensors"
        m.save(p)
        back = flowmap.load(p)
        assert back.kind == m.kind and back.metadata == m.metadata
        assert np.array_equal(back.sample(300, nfe=2, seed=5), m.sample(300, nfe=2, seed=5))
        p2 = tmp_path / f"{m.kind}-again.safetensors"
        back.save(p2)
        assert p.read_bytes() == p2.read_bytes()


def test_evaluate_returns_plain_rows(fmap, teacher):
    rows = flowmap.evaluate(fmap, nfe=[1, 2], n=400)
    assert [r["nfe"] for r in rows] == [1, 2]
    assert all(isinstance(r["energy"], float) and r["energy"] >= 0 for r in rows)
    rows_t = flowmap.evaluate(teacher, nfe=[4], n=400)
    assert [r["sampler"] for r in rows_t][0].startswith("euler")
    assert rows_t[-1]["sampler"].startswith("dopri5")


def test_arrays_in_are_the_data(tmp_path):
    """An array goes in unchanged: its held-out rows are rows of the array, and a teacher trains on it."""
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(500, 3)).astype(np.float64)
    d = flowmap.data(pts)
    held = d.heldout(50)
    assert held.shape == (50, 3)
    rows = {tuple(np.float32(r)) for r in pts}
    assert all(tuple(r) in rows for r in held)
    t = flowmap.train_teacher(pts, steps=20, batch=64, progress=False)
    assert t.state_shape == [3] and t.metadata["data"] == "array:500×3"


def test_gaussian_mixture_map_against_exact_phi(tmp_path):
    """On an analytic mixture, evaluate reports the map's error against the exact Φ."""
    spec = tmp_path / "mix.json"
    spec.write_text('{"weights":[0.5,0.5],"means":[[-1.0,0.0],[1.0,0.5]],"stds":[0.3,0.2]}')
    gmm = flowmap.load(f"gmm:{spec}")
    assert gmm.kind == "analytic" and gmm.metadata is None
    m = flowmap.distill(gmm, method="lmd", steps=40, batch=128, progress=False)
    rows = flowmap.evaluate(m, nfe=[1], n=300)
    assert rows.exact_map is not None and rows.exact_map["relative_error_uniform"] > 0


def test_train_from_data_and_resume_equivalence(tmp_path):
    """A run stopped by a callback resumes from the state it left, bit for bit the uninterrupted run."""
    kw = dict(steps=30, batch=64, progress=False, seed=1)
    whole = flowmap.train("meanflow", "moons", **kw)

    def stop_at(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(flowmap.TrainingInterrupted) as info:
        flowmap.train("meanflow", "moons", **{**kw, "progress": stop_at}, state=tmp_path / "s.safetensors")
    state = info.value.state
    assert isinstance(info.value, KeyboardInterrupt) and state.step in (12, 13)
    assert (tmp_path / "s.safetensors").exists()
    resumed = flowmap.train("meanflow", "moons", **kw, resume=state)
    assert np.array_equal(resumed.sample(200, nfe=1), whole.sample(200, nfe=1))
    resumed_file = flowmap.train("meanflow", "moons", **kw, resume=tmp_path / "s.safetensors")
    assert np.array_equal(resumed_file.sample(200, nfe=1), whole.sample(200, nfe=1))


def test_progress_callback_sees_every_step_and_the_end():
    seen = []
    flowmap.train_teacher("moons", steps=25, batch=32, progress=lambda s, l: seen.append((s, l)))
    steps = [s for s, _ in seen if s is not None]
    assert steps[-1] == 25 and steps == sorted(steps) and seen[-1] == (None, None)
    assert any(l is not None for s, l in seen if s is not None)


def test_a_callback_error_is_raised_as_itself():
    def bad(step, loss):
        if step == 3:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        flowmap.train_teacher("moons", steps=20, batch=32, progress=bad)


def test_config_dict_and_keywords(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nsteps = 7\nbatch_size = 32\n[arch]\nhidden = 32\n")
    t = flowmap.train_teacher("moons", config=cfg, progress=False)
    assert t.metadata["training"]["train"]["steps"] == 7 and t.config["hidden"] == 32
    t2 = flowmap.train_teacher("moons", config=cfg, steps=5, hidden=16, progress=False)
    assert t2.metadata["training"]["train"]["steps"] == 5 and t2.config["hidden"] == 16


def test_distill_settings_reach_the_objective(teacher):
    m = flowmap.distill(teacher, method="emd", steps=5, batch=64, progress=False,
                        settings={"weighting": {"kind": "adaptive", "c": 1e-3, "p": 0.5}})
    assert m.metadata["training"]["distill"]["weighting"]["kind"] == "adaptive"


def test_images_in_their_own_range(image_teacher, digits):
    images, labels = digits
    t = image_teacher
    assert t.state_shape == [1, 28, 28] and t.num_classes == 10
    x = t.sample(12, nfe=2, classes=3)
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32
    # f(x, t, t) = x: the map takes and returns the data's range (uint8 pixels here).
    img = images[:4, None].astype(np.float32)
    np.testing.assert_allclose(t(img, 0.5, 0.5), img, atol=1e-3)
    grid = t.sample(20, nfe=1, classes=list(range(10)) * 2)
    assert grid.shape == (20, 1, 28, 28)
    g = t.sample(4, nfe=2, classes=1, guidance=2.0)
    assert np.isfinite(g).all()


def test_progress_true_draws_a_tqdm_bar(capsys):
    pytest.importorskip("tqdm")
    flowmap.train_teacher("moons", steps=30, batch=32, progress=True)
    err = capsys.readouterr().err
    assert "teacher:" in err and "/30 " in err  # a bar of the run's 30 steps, cleared when done


def test_a_time_budget_plans_steps_that_reproduce_it():
    """`minutes` plans the steps that fit; the same call with that many `steps` gives the same bits."""
    t0 = time.perf_counter()
    planned = flowmap.train_teacher("moons", minutes=0.05, batch=64, progress=False, hidden=32)
    took = time.perf_counter() - t0
    steps = planned.metadata["training"]["train"]["steps"]
    assert steps > 30 and took < 3 * 0.05 * 60
    again = flowmap.train_teacher("moons", steps=steps, batch=64, progress=False, hidden=32)
    assert np.array_equal(planned.sample(200, nfe=4), again.sample(200, nfe=4))
    with pytest.raises(ValueError, match="steps or minutes"):
        flowmap.train_teacher("moons", minutes=1, steps=10)


def test_distill_without_a_method_takes_the_recommended_recipe(teacher):
    m = flowmap.distill(teacher, steps=10, batch=64, progress=False)
    training = m.metadata["training"]
    assert training["objective"] == "cm" and m.kind == "consistency_model"
    assert "energy distance" in training["recommended"]


def test_one_time_broadcasts_against_per_row_times(fmap):
    """t as one number and s one per row (and the other way round) pair row by row."""
    x = fmap.sample(3, nfe=1, seed=7)
    y = fmap(x, t=1.0, s=[0.0, 0.5, 1.0])
    np.testing.assert_array_equal(y[2], x[2])
    np.testing.assert_array_equal(y[0], fmap(x[:1], 1.0, 0.0)[0])
    with pytest.raises(ValueError, match="s = 0.9 is greater than t = 0.5"):
        fmap(x, t=[1.0, 0.5, 1.0], s=0.9)


def test_bf16_precision_trains_samples_and_is_recorded(tmp_path):
    """`precision="bf16"`: the checkpoint records it, samples stay close to f32's (bf16 rounding), and an
    unknown precision is a ValueError naming it."""
    t16 = flowmap.train_teacher("moons", steps=30, batch=64, hidden=32, depth=1, precision="bf16", progress=False)
    assert t16.metadata["training"]["train"]["precision"] == "bf16"
    t32 = flowmap.train_teacher("moons", steps=30, batch=64, hidden=32, depth=1, progress=False)
    assert "precision" not in t32.metadata["training"]["train"]
    a = t32.sample(256, nfe=4, seed=1)
    b = t32.sample(256, nfe=4, seed=1, precision="bf16")
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        t32.sample(4, precision="fp16")
