"""Run from the repository root (which puts the root on ``sys.path``), the card's folders ``kernels/``,
``fusion/``, ``retriever/`` and ``composer/`` never stand in for installed packages of those names:
transformers gets Hugging Face's ``kernels``, ``python app.py`` serves its page, and a pytest run of a
pipeline-building test file passes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CARD_FOLDERS = ("kernels", "fusion", "retriever", "composer")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _python(code: str, **env: str) -> dict:
    """``python -c code`` from the repository root ('' first on sys.path, as for ``python -m ...``)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=_env(**env), capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_installed_packages_named_like_the_card_folders_win_from_the_root(tmp_path):
    site = tmp_path / "site"
    for name in CARD_FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    got = _python(
        f"""
        import importlib, json
        names = {CARD_FOLDERS!r}
        theirs = {{n: importlib.import_module(n).WHO for n in names}}
        ours = {{n: importlib.import_module(f"lora_composer.{{n}}").__file__ for n in names if n != "composer"}}
        ours["composer"] = importlib.import_module("lora_composer").__file__
        print(json.dumps({{"theirs": theirs, "ours": ours}}))
        """,
        PYTHONPATH=str(site),  # after '' (the root) on sys.path: without the hand-over the folders shadow these
    )
    assert got["theirs"] == {n: f"installed {n}" for n in CARD_FOLDERS}
    for name, file in got["ours"].items():  # lora_composer's subpackages are still the card's folders
        assert Path(file).parent.name == name, (name, file)


def test_card_folders_are_not_importable_under_their_own_names(tmp_path):
    got = _python(
        f"""
        import importlib, json
        errors = {{}}
        for name in {("fusion", "retriever", "composer")!r}:
            try:
                importlib.import_module(name)
                errors[name] = None
            except ModuleNotFoundError as exc:
                errors[name] = [exc.name, str(exc)]
        print(json.dumps(errors))
        """
    )
    for name, error in got.items():
        if any(d.metadata["Name"] == name for d in importlib.metadata.distributions()):
            continue  # an installed package of that name: the previous test covers the hand-over
        assert error is not None, f"the repository's {name}/ imports as top-level {name!r}"
        assert error[0] == name and str(REPO / name) in error[1], error


def test_transformers_gets_hugging_face_kernels_from_the_root():
    got = _python(
        """
        import json
        from transformers import CLIPTextModel  # transformers 5.25 imports Hugging Face's kernels here
        from lora_composer import ComposerPipeline, tiny
        import lora_composer.kernels as ours
        try:
            import kernels
            theirs = kernels.__file__
        except ModuleNotFoundError:
            theirs = None
        print(json.dumps({"clip": CLIPTextModel.__name__, "pipeline": ComposerPipeline.__name__,
                          "theirs": theirs, "ours": ours.__file__}))
        """
    )
    assert got["clip"] == "CLIPTextModel" and got["pipeline"] == "ComposerPipeline"
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert got["theirs"] is not None and Path(got["theirs"]).parent != REPO / "kernels", got
    else:
        assert got["theirs"] is None, got
    assert Path(got["ours"]).parent.name == "kernels" and got["ours"] != got["theirs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_app_py_serves_its_page_from_the_root(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=_env(LORA_COMPOSER_HOME=str(tmp_path / "home"), GRADIO_ANALYTICS_ENABLED="False"),
    )  # fmt: skip
    try:
        deadline, page = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert page is not None, f"app.py exited with {proc.poll()} or never answered:\n" + (
            proc.stdout.read() if proc.poll() is not None else ""
        )
        assert page.status_code == 200 and "gradio" in page.text.lower(), page.text[:500]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pytest_from_the_root_builds_a_pipeline(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}",
         "tests/test_runtime.py::test_fused_matches_unfused"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_broken_dependency_stops_the_run_in_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    (site / "peft").mkdir(parents=True)
    (site / "peft" / "__init__.py").write_text("raise ImportError('a release that breaks its import')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}",
         "tests/test_prompt_syntax.py"],
        cwd=REPO, env=_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines[-20:]
    assert lines[0].startswith(f"peft {importlib.metadata.version('peft')}: `") and "breaks its import" in lines[0]
