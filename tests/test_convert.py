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


def test_convert_to_shira_counts_the_conv_layers_it_leaves_out(sd15_pipe, make_lora, tmp_path, capsys):
    import os

    src = make_lora(sd15_pipe, "l", rank=4, seed=1, text_encoder=False, conv=True)
    convs = sum(1 for d in load_adapter(src).deltas.values() if d.is_conv)
    out = tmp_path / "s.safetensors"
    assert cli.main(["convert", "--to", "shira", "--density", "0.05", "-q", str(src), str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    total = len(load_adapter(src).deltas)
    assert convs > 0 and f"; {convs} Conv2d (LoCon) layer(s) of {total} left out" in summary, summary
    assert len(load_adapter(out).deltas) == total - convs
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not 0600


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
