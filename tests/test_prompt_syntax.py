"""A1111 ``<lora:...>`` prompt syntax, ``--lora`` specs, and LoRA name resolution in a library folder."""

from __future__ import annotations

import pytest

from lora_composer.errors import ComposerError
from lora_composer.library import list_loras, resolve_lora
from lora_composer.prompt_syntax import LoraRef, format_lora_tag, parse_lora_spec, parse_prompt


@pytest.mark.parametrize(
    "prompt, clean, refs",
    [
        ("a cat", "a cat", []),
        ("a cat <lora:ink>", "a cat", [LoraRef("ink", 1.0, 1.0)]),
        ("a cat <lora:ink:0.8>", "a cat", [LoraRef("ink", 0.8, 0.8)]),
        ("a cat <lora:ink:0.5:1.2>", "a cat", [LoraRef("ink", 0.5, 1.2)]),
        ("a cat <lora:ink:te=0.5:unet=0.8>", "a cat", [LoraRef("ink", 0.5, 0.8)]),
        ("<lora:ink:te=0.5>a cat", "a cat", [LoraRef("ink", 0.5, 0.5)]),  # A1111: unet follows te
        ("a cat <lora:ink:unet=0.3>", "a cat", [LoraRef("ink", 1.0, 0.3)]),
        ("a cat <lora:ink:0.7:unet=0.2>", "a cat", [LoraRef("ink", 0.7, 0.2)]),
        ("a cat <lyco:loha-x:0.6>", "a cat", [LoraRef("loha-x", 0.6, 0.6)]),
        ("a cat <LORA:Ink:-0.5>", "a cat", [LoraRef("Ink", -0.5, -0.5)]),
        ("a cat <lora: my style :1>", "a cat", [LoraRef("my style", 1.0, 1.0)]),
        (
            "a cat, <lora:ink:0.8>, outdoors <lora:shapes:.5>,",
            "a cat, outdoors",
            [LoraRef("ink", 0.8, 0.8), LoraRef("shapes", 0.5, 0.5)],
        ),
        ("<lora:a>, <lora:b>, sunset ,  sky", "sunset, sky", [LoraRef("a"), LoraRef("b")]),
        ("a <lora:ink> cat", "a cat", [LoraRef("ink")]),
        ("a cat <hypernet:x:1> <lora:ink>", "a cat <hypernet:x:1>", [LoraRef("ink")]),
        ("a cat <lora:ink> <lora:ink:0.2>", "a cat", [LoraRef("ink"), LoraRef("ink", 0.2, 0.2)]),
    ],
)
def test_parse_prompt(prompt, clean, refs):
    assert parse_prompt(prompt) == (clean, refs)


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("a <lora:ink:abc>", "<lora:ink:abc>"),
        ("a <lora:ink:1:2:3>", "<lora:ink:1:2:3>"),
        ("a <lora::0.5>", "<lora::0.5>"),
        ("a <lora:ink:nan>", "<lora:ink:nan>"),
        ("a <lora:ink:dyn=4>", "<lora:ink:dyn=4>"),
        ("a <lora:ink:te=x>", "<lora:ink:te=x>"),
        ("a <lora:ink:te=1:0.5>", "<lora:ink:te=1:0.5>"),
    ],
)
def test_bad_tags_give_one_line_errors_naming_the_tag(prompt, fragment):
    with pytest.raises(ComposerError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "prompt, shown",
    [
        ("a purple <lora:star-shape", "<lora:star-shape"),
        ("a <lora:ink:0.5 cat <lora:shapes>", "<lora:ink:0.5 cat"),  # the next tag does not close it
        ("<lyco:x:1", "<lyco:x:1"),
        ("a <LORA:", "<LORA:"),
    ],
)
def test_unclosed_tag_is_an_error(prompt, shown):
    with pytest.raises(ComposerError) as err:
        parse_prompt(prompt)
    assert (
        str(err.value) == f"unclosed tag {shown!r} in the prompt: end it with '>', as in <lora:NAME> or <lora:NAME:0.8>"
    )


def test_other_angle_brackets_are_left_alone():
    assert parse_prompt("a <hypernet:x and 3 < 4 > 2") == ("a <hypernet:x and 3 < 4 > 2", [])


def test_tag_formatting_round_trips():
    assert format_lora_tag("ink", 0.8) == "<lora:ink:0.8>"
    assert format_lora_tag("ink", 1.0, 1.0) == "<lora:ink:1>"
    assert format_lora_tag("ink", 0.5, 1.25) == "<lora:ink:0.5:1.25>"
    for ref in (LoraRef("ink", 0.1 + 0.2, 0.3), LoraRef("x", 1 / 3, 1 / 3), LoraRef("y", -2.0, 0.0)):
        assert parse_prompt(f"p {ref.tag}") == ("p", [ref])


@pytest.mark.parametrize(
    "spec, ref",
    [
        ("ink", LoraRef("ink", 1.0, 1.0)),
        ("ink:0.8", LoraRef("ink", 0.8, 0.8)),
        ("ink:0.5:1", LoraRef("ink", 0.5, 1.0)),
        ("loras/ink.safetensors", LoraRef("loras/ink.safetensors")),
        ("loras/ink.safetensors:-1", LoraRef("loras/ink.safetensors", -1.0, -1.0)),
        (r"C:\loras\ink.safetensors:0.7", LoraRef(r"C:\loras\ink.safetensors", 0.7, 0.7)),
        ("/a:b/ink.safetensors:0.2:0.3", LoraRef("/a:b/ink.safetensors", 0.2, 0.3)),
    ],
)
def test_parse_lora_spec(spec, ref):
    assert parse_lora_spec(spec) == ref


@pytest.mark.parametrize("spec", ["ink:heavy", ":0.5", "ink:inf"])
def test_bad_lora_spec(spec):
    with pytest.raises(ComposerError, match="--lora"):
        parse_lora_spec(spec)


# -- library -------------------------------------------------------------------------------------


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "loras"
    (lib / "styles").mkdir(parents=True)
    for rel in (
        "Ink-Style.safetensors",
        "styles/watercolor.safetensors",
        "shapes.safetensors",
        "shapes.pt",
        "notes.txt",
    ):
        (lib / rel).write_bytes(b"x")
    (lib / ".trash").mkdir()
    (lib / ".trash" / "old.safetensors").write_bytes(b"x")
    return lib


def test_list_loras(library):
    names = [p.relative_to(library).as_posix() for p in list_loras(library)]
    assert names == ["Ink-Style.safetensors", "shapes.pt", "shapes.safetensors", "styles/watercolor.safetensors"]
    assert list_loras(None) == []


def test_resolve_by_name_case_insensitive_and_recursive(library):
    assert resolve_lora("ink-style", library) == library / "Ink-Style.safetensors"
    assert resolve_lora("INK-STYLE.safetensors", library) == library / "Ink-Style.safetensors"
    assert resolve_lora("watercolor", library) == library / "styles" / "watercolor.safetensors"
    assert resolve_lora("styles/watercolor", library) == library / "styles" / "watercolor.safetensors"
    assert resolve_lora("shapes", library) == library / "shapes.safetensors"  # safetensors preferred
    assert resolve_lora("shapes.pt", library) == library / "shapes.pt"


def test_existing_file_is_used_as_is(library, tmp_path):
    f = tmp_path / "elsewhere.safetensors"
    f.write_bytes(b"x")
    assert resolve_lora(str(f), library) == f
    assert resolve_lora(f, None) == f


def test_unknown_name_suggests_close_names(library):
    with pytest.raises(ComposerError) as err:
        resolve_lora("ink-styel", library)
    message = str(err.value)
    assert message == f"unknown LoRA 'ink-styel' in {library} (did you mean: Ink-Style)"
    with pytest.raises(ComposerError, match=r"available: Ink-Style, shapes, watercolor"):
        resolve_lora("zzzzzz", library)


def test_missing_path_is_not_an_unknown_name(library, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in (
        "./nowhere.safetensors",
        "../nowhere.safetensors",
        str(tmp_path / "nowhere.safetensors"),
        "~/nowhere-4bf1.safetensors",
    ):
        with pytest.raises(ComposerError) as err:
            resolve_lora(ref, library)
        assert str(err.value) == f"{ref}: file not found"  # the library is not searched for an explicit path
    assert resolve_lora("./loras/shapes.pt", library).resolve() == library / "shapes.pt"  # an existing file as is
    with pytest.raises(ComposerError) as err:  # a name with an extension: a file, or a name in the library
        resolve_lora("ink-styel.safetensors", library)
    assert str(err.value) == (
        f"ink-styel.safetensors: file not found, and no LoRA of that name in {library} (did you mean: Ink-Style)"
    )
    with pytest.raises(ComposerError, match=r"^styles/nope: file not found, and no LoRA of that name in"):
        resolve_lora("styles/nope", library)
    with pytest.raises(ComposerError, match=r"^unknown LoRA 'nope' in"):
        resolve_lora("nope", library)


def test_hidden_folders_are_not_searched(library):
    with pytest.raises(ComposerError, match="unknown LoRA 'old'"):
        resolve_lora("old", library)


def test_ambiguous_name(library):
    (library / "more").mkdir()
    (library / "more" / "watercolor.safetensors").write_bytes(b"x")
    with pytest.raises(ComposerError, match="ambiguous"):
        resolve_lora("watercolor", library)
    assert resolve_lora("more/watercolor", library) == library / "more" / "watercolor.safetensors"


def test_missing_library_and_no_library(tmp_path):
    with pytest.raises(ComposerError, match="does not exist"):
        resolve_lora("ink", tmp_path / "nope")
    with pytest.raises(ComposerError, match="no LoRA library given"):
        resolve_lora("ink", None)
    with pytest.raises(ComposerError, match="not found"):
        resolve_lora(str(tmp_path / "missing.safetensors"), None)
    with pytest.raises(ComposerError, match="no LoRA files"):
        resolve_lora("ink", tmp_path)


def test_with_tag_names_renames_tags_in_place():
    from lora_composer.prompt_syntax import with_tag_names

    prompt = "a <lora:x:0.5> b BREAK c <lyco:y:te=0.2:unet=1>, d"
    assert with_tag_names(prompt, ["/l/x.safetensors", "/l/y.safetensors"]) == (
        "a <lora:/l/x.safetensors:0.5> b BREAK c <lora:/l/y.safetensors:0.2:1>, d"
    )
    assert with_tag_names("no tags", []) == "no tags"
