"""``compose convert``: LoRA -> SHiRA and LoRA-Squeeze from the command line."""

from __future__ import annotations

import torch

from lora_composer.frontends import cli
from lora_composer.adapters import load_adapter
from lora_composer.adapters.shira import dense_delta


def test_convert_to_shira(sd15_pipe, make_lora, tmp_path, capsys):
    src = make_lora(sd15_pipe, "l", rank=4, seed=1, text_encoder=False)
    out = tmp_path / "s.safetensors"
    assert cli.main(["convert", "--to", "shira", "--density", "0.05", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "rel. error" in text and "SHiRA at density 0.05" in text and "wrote" in text
    lora, shira = load_adapter(src), load_adapter(out)
    assert shira.is_sparse and shira.family == lora.family and set(shira.deltas) == set(lora.deltas)
    for key, d in shira.deltas.items():
        assert abs(d.density - 0.05) < 1e-3
        full = dense_delta(lora.deltas[key])
        assert torch.allclose(d.dense()[d.dense() != 0], full[d.dense() != 0])


def test_convert_to_shira_keeps_the_conv_layers(sd15_pipe, make_lora, tmp_path, capsys):
    import os

    src = make_lora(sd15_pipe, "l", rank=4, seed=1, text_encoder=False, conv=True)
    lora = load_adapter(src)
    convs = sum(1 for d in lora.deltas.values() if d.is_conv)
    out = tmp_path / "s.safetensors"
    assert cli.main(["convert", "--to", "shira", "--density", "0.05", "-q", str(src), str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    total = len(lora.deltas)
    assert convs > 0 and f"; kept {total - convs} Linear + {convs} Conv2d layers of {total}" in summary, summary
    assert "left out" not in summary
    shira = load_adapter(out)
    assert set(shira.deltas) == set(lora.deltas)
    for key, d in shira.deltas.items():
        assert d.is_conv == lora.deltas[key].is_conv and abs(d.density - 0.05) < 1e-3
        if d.is_conv:
            assert d.shape == (lora.deltas[key].up.shape[0], *lora.deltas[key].down.shape[1:])
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not 0600


def test_converted_star_lora_still_draws_a_star(tmp_path, capsys, one_thread):
    """The mini world's star LoRA draws its star through its 36 conv (LoCon) layers as much as its Linear ones:
    converted to SHiRA at density 0.3 the detector still sees a star in every image, as with the LoRA itself;
    the same SHiRA file without its conv layers draws none."""
    from lora_composer.adapters import save_shira
    from lora_composer.adapters.types import Adapter
    from lora_composer.miniworld import assets, world
    from lora_composer.miniworld.detectors import load_detector
    from lora_composer.pipeline import ComposerPipeline

    src = assets.library_dir() / "star-shape.safetensors"
    out = tmp_path / "star-shira.safetensors"
    assert cli.main(["convert", "--to", "shira", "--density", "0.3", "-q", str(src), str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert "kept 78 Linear + 36 Conv2d layers of 114" in summary, summary
    shira = load_adapter(out)
    linear = save_shira(
        Adapter("linear-only", shira.family, {k: d for k, d in shira.deltas.items() if not d.is_conv}),
        tmp_path / "linear-only.safetensors",
    )
    pipe = ComposerPipeline.from_pretrained(assets.model_dir())
    detector = load_detector(assets.detector_path())
    star = list(world.CATEGORY["shape"].values).index("star")

    def confidence(lora) -> torch.Tensor:
        images = []
        for seed, prompt in enumerate(["a red star on a plain background", "a blue star on a dotted background"]):
            images += pipe(
                prompt,
                loras=[(str(lora), 1.0)],
                seed=seed,
                num_inference_steps=8,
                num_images_per_prompt=2,
                progress=False,
            )
        return detector.probs(images)["shape"][:, star]

    original, converted, without_conv = confidence(src), confidence(out), confidence(linear)
    assert original.min() > 0.9, original
    assert converted.min() > 0.9 and converted.mean() >= original.mean() - 0.05, (converted, original)
    assert without_conv.max() < 0.1, without_conv


def test_convert_squeeze_rank_and_auto(sd15_pipe, make_lora, tmp_path, capsys):
    src = make_lora(sd15_pipe, "l", rank=8, seed=2, text_encoder=False)
    out = tmp_path / "r2.safetensors"
    assert cli.main(["convert", "--rank", "2", str(src), str(out)]) == 0
    assert "energy" in capsys.readouterr().out
    assert load_adapter(out).ranks == {2}
    out = tmp_path / "auto.safetensors"
    assert cli.main(["convert", "--rank", "auto", "--energy", "0.999999", "-q", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA-Squeeze to rank auto" in text
    lora, squeezed = load_adapter(src), load_adapter(out)
    for key, d in squeezed.deltas.items():  # random rank-8 deltas need (nearly) all 8 directions
        full = dense_delta(lora.deltas[key])
        assert float((dense_delta(d) - full).norm() / full.norm()) < 2e-3


def test_convert_usage_errors(sd15_pipe, make_lora, tmp_path, capsys):
    src = make_lora(sd15_pipe, "l", rank=4, seed=1, text_encoder=False)
    out = str(tmp_path / "x.safetensors")
    assert cli.main(["convert", str(src), out]) == 2
    assert cli.main(["convert", "--to", "shira", str(src), out]) == 2
    assert cli.main(["convert", "--rank", "auto", str(src), out]) == 2
    assert cli.main(["convert", "--rank", "x", str(src), out]) == 2
    assert cli.main(["convert", "--to", "shira", "--density", "2", str(src), out]) == 2
    err = capsys.readouterr().err
    assert err.count("compose convert: error:") == 5
