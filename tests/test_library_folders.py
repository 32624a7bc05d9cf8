"""LoRAs as Hugging Face repos ship them: a folder holding diffusers' ``pytorch_lora_weights.safetensors`` or
PEFT's ``adapter_model.safetensors`` is a LoRA named after the folder (in the library, on the command line and
in the pipeline), not a pile of LoRAs all called ``pytorch_lora_weights``."""

from __future__ import annotations

import shutil

import pytest

from lora_composer.errors import ComposerError
from lora_composer.library import list_loras, lora_name, resolve_lora
from lora_composer.pipeline import ComposerPipeline


@pytest.fixture
def library(tmp_path, sd15_pipe, make_lora):
    lib = tmp_path / "loras"
    for folder, file in (("ink-style", "pytorch_lora_weights"), ("toon", "adapter_model")):
        (lib / folder).mkdir(parents=True)
        shutil.move(make_lora(sd15_pipe, f"{folder}-src", seed=len(folder)), lib / folder / f"{file}.safetensors")
    shutil.move(make_lora(sd15_pipe, "plain", seed=9), lib / "plain.safetensors")
    (lib / "empty-folder").mkdir()
    return lib


def test_saved_folders_are_named_after_the_folder(library, sd15_pipe):
    assert sorted(lora_name(p) for p in list_loras(library)) == ["ink-style", "plain", "toon"]
    ink = library / "ink-style" / "pytorch_lora_weights.safetensors"
    assert resolve_lora("ink-style", library) == ink
    assert resolve_lora("INK-STYLE", library) == ink
    assert resolve_lora(str(library / "ink-style"), None) == ink  # the folder itself, as a path
    assert resolve_lora("toon", library) == library / "toon" / "adapter_model.safetensors"
    with pytest.raises(ComposerError, match="did you mean: ink-style"):
        resolve_lora("ink-styel", library)
    with pytest.raises(ComposerError) as err:
        resolve_lora(str(library / "empty-folder"), None)
    assert "empty-folder" in str(err.value) and "\n" not in str(err.value)

    pipe = ComposerPipeline(sd15_pipe, library=library)
    names = [pipe.load_lora(n).name for n in ("ink-style", "toon", "plain")]
    assert names == ["ink-style", "toon", "plain"]
    assert set(pipe.adapters) == {"ink-style", "toon", "plain"}
