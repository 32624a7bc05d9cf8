"""``compose ui`` on a bind other machines reach: refused without a login, uploads off unless asked for; with a
login, the page asks for it (Gradio's auth)."""

from __future__ import annotations

import httpx
import pytest

from lora_composer.frontends import ui as ui_module

pytestmark = pytest.mark.usefixtures("home")


@pytest.fixture
def started(monkeypatch):
    """Records what ``compose ui`` would build and launch, without loading a model or serving."""
    seen = {}

    class FakeUI:
        model, library = "m", "l"

        def __init__(self, *args, **kwargs):
            seen["ui"] = kwargs

    monkeypatch.setattr(ui_module, "ComposerUI", FakeUI)
    monkeypatch.setattr(ui_module, "launch", lambda ui, **kwargs: seen.update(launch=kwargs))
    monkeypatch.delenv(ui_module.AUTH_ENV, raising=False)
    return seen


def _one_line(capsys, code, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_an_open_bind_without_a_login_is_refused_before_anything_loads(started, capsys):
    code = ui_module.main(["--host", "0.0.0.0"])
    _one_line(
        capsys,
        code,
        "compose ui: error: --host 0.0.0.0 is reachable from other machines: set a login",
        "--auth-file",
        "LORA_COMPOSER_UI_AUTH",
    )
    assert started == {}  # no model loaded, nothing served


@pytest.mark.parametrize(
    "content, fragment",
    [("", "the file is empty"), ("nopassword", "expected USER:PASSWORD"), (":secret", "expected USER:PASSWORD")],
)
def test_a_bad_auth_file_is_one_line(started, capsys, tmp_path, content, fragment):
    path = tmp_path / "auth"
    path.write_text(content)
    _one_line(capsys, ui_module.main(["--host", "0.0.0.0", "--auth-file", str(path)]), f"--auth-file {path}", fragment)
    assert started == {}


def test_with_a_login_the_open_bind_starts_with_uploads_off_unless_asked(started, capsys, tmp_path, monkeypatch):
    path = tmp_path / "auth"
    path.write_text("ana:s3cret:with:colons\n")
    assert ui_module.main(["--host", "0.0.0.0", "--auth-file", str(path)]) == 0
    assert started["launch"]["auth"] == ("ana", "s3cret:with:colons")
    assert started["ui"]["allow_uploads"] is False
    assert "login required, uploads off" in capsys.readouterr().out
    monkeypatch.setenv(ui_module.AUTH_ENV, "bo:pw")
    assert ui_module.main(["--host", "0.0.0.0", "--uploads"]) == 0
    assert started["launch"]["auth"] == ("bo", "pw") and started["ui"]["allow_uploads"] is True
    monkeypatch.delenv(ui_module.AUTH_ENV)
    assert ui_module.main(["--host", "127.0.0.1"]) == 0  # this machine only: no login needed, uploads on
    assert started["launch"]["auth"] is None and started["ui"]["allow_uploads"] is True


def test_the_page_asks_for_the_login(tmp_path):
    from lora_composer.default_model import ensure_default_model

    model, library = ensure_default_model()
    ui = ui_module.ComposerUI(model, library, out_dir=tmp_path / "out", allow_uploads=False)
    demo = ui_module.launch(ui, host="127.0.0.1", port=None, block=False, auth=("ana", "s3cret"))
    try:
        url = demo.local_url.rstrip("/")
        assert httpx.get(f"{url}/config", timeout=30).status_code == 401  # nothing without the login
        assert httpx.post(f"{url}/login", data={"username": "ana", "password": "wrong"}, timeout=30).status_code == 400
        with httpx.Client(timeout=30) as client:
            assert client.post(f"{url}/login", data={"username": "ana", "password": "s3cret"}).status_code == 200
            assert client.get(f"{url}/config").status_code == 200
    finally:
        demo.close()
