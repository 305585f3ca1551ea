"""A clone stays as git has it: exports assemble a servable repository under build/ from the tracked
templates (model_repository/) and never write into them; a repository left by an older export gets
this checkout's templates again; the server names what is missing in a repository with nothing
exported. (.ci/run checks the same end to end: `make demo`, `make test`, `git status --porcelain`.)"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from contract.configs import EXPORTED_MODELS, config_files, declared_interface, follow_exported_graphs, read_config
from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT, TEMPLATES


def snapshot(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


def test_the_default_repository_is_an_ignored_build_output():
    assert DEFAULT_REPOSITORY.is_relative_to(REPO_ROOT / "build") and DEFAULT_REPOSITORY != TEMPLATES
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_REPOSITORY / "unet" / "config.pbtxt")], cwd=REPO_ROOT)
    assert ignored.returncode == 0
    assert "REPOSITORY ?= build/model_repository" in (REPO_ROOT / "Makefile").read_text()


def test_an_export_copies_the_templates_and_leaves_them_alone(exported, tmp_path):
    before = snapshot(TEMPLATES)
    repository = exported("fp32")  # exported by the session into a new directory
    assert snapshot(TEMPLATES) == before
    for model in EXPORTED_MODELS:
        for path in config_files(repository, model):
            assert declared_interface(read_config(repository, model))  # a real config, set to the export
    assert (repository / "ensemble_sdxl" / "config.pbtxt").read_text() == (TEMPLATES / "ensemble_sdxl" / "config.pbtxt").read_text()
    assert (repository / "unet" / "1" / "model.py").read_text() == (TEMPLATES / "unet" / "1" / "model.py").read_text()


def test_an_older_exports_repository_gets_this_checkouts_templates(exported, tmp_path):
    import shutil

    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)
    stale = {repository / "ensemble_sdxl" / "config.pbtxt", repository / "scheduler" / "1" / "model.py",
             repository / "unet" / "configs" / "cpu.pbtxt"}
    for path in stale:
        path.write_text(path.read_text() + "\n# left by an older checkout\n")
    before = snapshot(TEMPLATES)
    follow_exported_graphs(repository, TEMPLATES)
    assert snapshot(TEMPLATES) == before
    for path in stale:
        assert "left by an older checkout" not in path.read_text(), path
    # and still declares the fp32 export's types, not the templates' fp16
    assert declared_interface(read_config(repository, "unet", "cpu"))["sample"][0] == "FP32"


def test_serving_a_repository_with_nothing_exported_names_the_fix(tmp_path):
    empty = tmp_path / "nothing_here"
    result = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(empty), "--variant", "cpu"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{empty}: not a model repository (no ensemble_sdxl/config.pbtxt)" in result.stderr
    assert "make export-tiny" in result.stderr and "Traceback" not in result.stderr


def test_serving_the_templates_alone_names_the_missing_graphs(tmp_path):
    import shutil

    repository = tmp_path / "templates_only"
    shutil.copytree(TEMPLATES, repository)
    result = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(repository), "--variant", "cpu"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no ONNX graphs (text_encoder/1/model.onnx" in result.stderr and "make export-tiny" in result.stderr
