"""Mini-world detectors: input forms, safe files, and (bench/miniworld/train_detectors.py) a short training run
that must learn every category and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.miniworld import train_detectors
from lora_composer.miniworld import detectors, world


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The detector is tiny: one thread is fastest, and stays fast next to other busy processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    return train_detectors.train_detector(steps=60, batch=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def pictures():
    images, _, scenes = world.sample(np.random.default_rng(123), 6, train_detectors.ALL_VALUES)
    return images, scenes


def _beats_chance(acc: dict[str, float]) -> dict[str, bool]:
    return {c.name: acc[c.name] > 2.0 / len(c.values) for c in world.CATEGORIES}


def test_detector_is_small_with_one_head_per_category():
    det = detectors.Detector()
    assert sum(t.numel() * t.element_size() for t in det.state_dict().values()) < 1_000_000
    assert list(det.heads) == [c.name for c in world.CATEGORIES]
    logits = det(torch.zeros(2, 3, world.SIZE, world.SIZE))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {c.name: (2, len(c.values)) for c in world.CATEGORIES}


def test_short_training_beats_twice_chance_on_fresh_images(trained):
    acc = train_detectors.accuracy(trained, n=500, seed=7)
    assert all(_beats_chance(acc).values()), acc


def test_untrained_detector_fails_the_same_bar():
    torch.manual_seed(0)
    acc = train_detectors.accuracy(detectors.Detector().eval(), n=500, seed=7)
    assert not all(_beats_chance(acc).values()), acc


def test_accuracy_images_are_not_training_images(monkeypatch):
    """Records what training and accuracy() actually draw (same seed): no picture is shared."""
    drawn = []
    real_draw = train_detectors.draw

    def recording_draw(rng, n):
        x, targets = real_draw(rng, n)
        drawn.append(x)
        return x, targets

    monkeypatch.setattr(train_detectors, "draw", recording_draw)
    train_detectors.train_detector(steps=1, batch=16, seed=0, progress=False)
    train_detectors.accuracy(detectors.Detector().eval(), n=16, seed=0)
    train_x, eval_x = drawn
    same = (train_x[:, None] == eval_x[None]).flatten(2).all(-1)  # [i, j]: training i is evaluation j
    assert not same.any()


def test_probs_and_predict_accept_arrays_pil_and_tensors_alike(trained, pictures):
    images, _ = pictures
    as_uint8 = trained.probs(images)
    as_pil = trained.probs([Image.fromarray(im) for im in images])
    as_float = trained.probs(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for c in world.CATEGORIES:
        assert as_uint8[c.name].shape == (len(images), len(c.values))
        torch.testing.assert_close(as_uint8[c.name].sum(-1), torch.ones(len(images)))
        torch.testing.assert_close(as_pil[c.name], as_uint8[c.name])
        torch.testing.assert_close(as_float[c.name], as_uint8[c.name])

    predicted = trained.predict(images)
    assert len(predicted) == len(images)
    for i, labels in enumerate(predicted):
        assert list(labels) == [c.name for c in world.CATEGORIES]
        assert labels == {c.name: c.values[int(as_uint8[c.name][i].argmax())] for c in world.CATEGORIES}


def test_other_sizes_are_resized_first(trained, pictures):
    """An upscaled picture reads (almost) as the original: resized back, not cropped or refused."""
    images, _ = pictures
    original = trained.probs(images)
    big = [Image.fromarray(im).resize((128, 128), Image.NEAREST) for im in images]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x96 = torch.nn.functional.interpolate(x, size=(96, 96), mode="nearest")
    for resized in (trained.probs(big), trained.probs(x96)):
        for c in world.CATEGORIES:  # resampling blurs a little (< 0.1 seen); a crop moves probs by 0.7+
            torch.testing.assert_close(resized[c.name], original[c.name], atol=0.2, rtol=0)


def test_bad_inputs_are_refused(trained):
    with pytest.raises(ValueError, match="uint8"):
        trained.probs(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="float images"):
        trained.probs(torch.zeros(1, 1, 64, 64))


def test_augmentation_degrades_but_keeps_range():
    x, _ = train_detectors.draw(np.random.default_rng(0), 8)
    y = train_detectors.augment(x, torch.Generator().manual_seed(0), p=1.0)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (y - x).abs().mean() > 0.01


def test_save_load_round_trip_gives_identical_probs(trained, pictures, tmp_path):
    path = detectors.save_detector(trained, tmp_path / "det.safetensors")
    loaded = detectors.load_detector(path)
    before, after = trained.probs(pictures[0]), loaded.probs(pictures[0])
    assert set(before) == set(after) == {c.name for c in world.CATEGORIES}
    assert all(torch.equal(before[k], after[k]) for k in before)


def _one_line_naming(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_values_mismatch_is_a_one_line_error_naming_the_file(trained, tmp_path):
    path = detectors.save_detector(trained, tmp_path / "det.safetensors")
    categories = {c.name: list(c.values) for c in world.CATEGORIES}
    categories["colour"] = categories["colour"][:-1]
    meta = {"format": detectors.FORMAT, "categories": json.dumps(categories)}
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError) as exc:
        detectors.load_detector(path)
    assert "retrain" in _one_line_naming(exc, path)


def test_missing_metadata_is_refused(trained, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as exc:
        detectors.load_detector(path)
    _one_line_naming(exc, path)


@pytest.mark.parametrize("content", [b"not a safetensors file at all", None], ids=["corrupt", "truncated"])
def test_corrupt_file_is_a_one_line_error_naming_the_file(trained, tmp_path, content):
    path = detectors.save_detector(trained, tmp_path / "det.safetensors")
    path.write_bytes(content if content is not None else path.read_bytes()[:500])
    with pytest.raises(ValueError) as exc:
        detectors.load_detector(path)
    _one_line_naming(exc, path)


def test_missing_file_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(ValueError) as exc:
        detectors.load_detector(path)
    _one_line_naming(exc, path)


def test_cli_writes_detector_and_report(tmp_path, capsys):
    """The file holds what train_detector gives for the same arguments, the report its accuracy."""
    out = tmp_path / "d" / "det.safetensors"
    assert train_detectors.main(["--out", str(out), "--steps", "2", "--batch", "8", "--eval-images", "20"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "det.safetensors.json").read_text())
    seconds = report.pop("seconds")
    assert isinstance(seconds, float)
    loaded = detectors.load_detector(out)
    reference = train_detectors.train_detector(steps=2, batch=8, seed=0, progress=False)
    want = reference.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items()) and len(want)
    accuracy = train_detectors.accuracy(reference, n=20, seed=0)
    assert report == {"accuracy": accuracy, "steps": 2, "batch": 8, "seed": 0, "eval_images": 20, "threads": 1}
    for name, value in accuracy.items():
        assert f"{name:>10}: {value:.2%}" in printed
