"""``compose profile`` caches frequency scores once; ``--strategy cmlora`` then orders by them."""

from lora_composer.frontends.cli import main
from lora_composer.pipeline import ComposerPipeline
from lora_composer.pnginfo import read_record


def test_profile_then_cmlora_uses_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORA_COMPOSER_LIBRARY", raising=False)  # names are looked up in the mini world's library
    renders = []
    real_call = ComposerPipeline.__call__

    def spy(self, *a, **k):  # the guidance each render actually used, as recorded
        out = real_call(self, *a, **k)
        renders.append(self.last_record.guidance_scale)
        return out

    monkeypatch.setattr(ComposerPipeline, "__call__", spy)

    assert main(["profile", "--lora", "star-shape", "--lora", "pixel-style", "--steps", "2"]) == 0
    first = capsys.readouterr().out
    assert renders == [5.0, 5.0, 5.0]  # the base and each adapter alone, at the mini world's guidance
    assert "cmlora order (high frequency first): " in first

    assert main(["profile", "--lora", "star-shape", "--lora", "pixel-style", "--steps", "2"]) == 0
    assert len(renders) == 3  # cached by file hash: nothing rendered again
    assert capsys.readouterr().out == first

    out = tmp_path / "c.png"
    code = main(
        [
            "--prompt",
            "x",
            "--lora",
            "pixel-style",
            "--lora",
            "star-shape",
            "--strategy",
            "cmlora",
            "--steps",
            "2",
            "-q",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    args = read_record(out).strategy_args
    assert args["order_source"] == "profile cache"
    expected = first.split("first): ")[1].strip().split(", ")
    assert args["order"] == expected


def test_profile_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    assert main(["profile", "--lora", "no-such-lora", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compose profile: error:") and "no-such-lora" in err and "\n" not in err
    capsys.readouterr()
    assert main(["profile"]) == 2  # --lora is required
    assert "--lora" in capsys.readouterr().err
