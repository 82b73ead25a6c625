"""Bad input: one Python exception, of the expected built-in class, with the library's message."""

import numpy as np
import pytest

import flowmap
from flowmap import errors


def test_every_error_is_a_flowmap_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), flowmap.FlowmapError)


def test_maps_go_down_in_time(fmap):
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="s = 0.5 is greater than t = 0.2"):
        fmap(x, 0.2, 0.5)
    with pytest.raises(ValueError, match="outside"):
        fmap(x, 1.5, 0.0)


def test_wrong_shapes_and_nans(fmap):
    with pytest.raises(ValueError, match=r"takes N × \[2\] states"):
        fmap(np.zeros((2, 3), np.float32), 1.0, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        fmap(np.full((2, 2), np.nan, np.float32), 1.0, 0.0)
    bad = np.random.default_rng(0).normal(size=(100, 2))
    bad[5, 1] = np.nan
    with pytest.raises(flowmap.errors.DataError, match="not finite"):
        flowmap.data(bad)
    with pytest.raises(ValueError, match="expected N × D points"):
        flowmap.data(np.zeros(10))


def test_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        flowmap.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(flowmap.errors.CheckpointError):
        flowmap.load(junk)
    with pytest.raises(FileNotFoundError):
        flowmap.train_teacher(tmp_path / "missing.npy", steps=1, progress=False)


def test_unknown_names(teacher):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        flowmap.distill(teacher, method="nope", progress=False)
    with pytest.raises(ValueError, match="distils a teacher"):
        flowmap.train("emd", "moons", steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown data spec"):
        flowmap.data("no-such-spec")
    with pytest.raises(ValueError, match="unknown solver|euler"):
        teacher.sample(4, solver="nope")
    with pytest.raises(ValueError):
        flowmap.train_teacher("moons", steps=1, progress=False, no_such_setting=3)
    with pytest.raises(flowmap.errors.ConfigError):
        flowmap.distill(teacher, method="emd", steps=1, progress=False, settings={"no_such_key": 1})


def test_classes_and_guidance(fmap, image_teacher):
    with pytest.raises(ValueError, match="unconditional"):
        fmap.sample(4, classes=3)
    with pytest.raises(ValueError, match="class 10 is out of range"):
        image_teacher.sample(4, classes=10)
    with pytest.raises(ValueError, match="non-negative"):
        image_teacher.sample(4, classes=-1)
    with pytest.raises(ValueError, match="no guidance input"):
        fmap.sample(4, guidance=2.0)
    with pytest.raises(ValueError, match="at least 1"):
        fmap.sample(4, nfe=0)
    with pytest.raises(ValueError, match="at least 1"):
        fmap.sample(0)


def test_labels_go_with_images():
    with pytest.raises(ValueError, match="labels go with images"):
        flowmap.data(np.zeros((20, 2)), labels=np.zeros(20, dtype=int))
    with pytest.raises(ValueError, match="labels of shape"):
        flowmap.data(np.zeros((20, 8, 8), np.uint8), labels=np.zeros(19, dtype=int))


def test_nothing_half_written(tmp_path, fmap):
    with pytest.raises(OSError):
        fmap.save(tmp_path / "no-such-dir" / "m.safetensors")
    assert not (tmp_path / "no-such-dir").exists()
