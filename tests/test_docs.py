"""The documentation stays true where a machine can tell: every `make TARGET`, `python -m MODULE
[subcommand] --flag`, relative link, `#anchor` and repository path that README.md and docs/*.md
name exists. Fast: no server, no network (make -n and --help only)."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"])
README_MAX_LINES = 250

# This repository's modules (python -m ...), and their subcommands where they have some.
OWN_PACKAGES = ("export", "serving", "client", "benchmarks", "deploy")
SUBCOMMANDS = {"export": ("random", "tiny", "onnx", "configs", "engines", "lora")}
COMMAND_GROUPS = {("export", "lora")}  # whose own subcommands (add, list, remove) carry the flags
# deploy.* need the deployment tools' venv (make install-deploy).
DEPLOY_PYTHON = ROOT / ".venv-deploy" / "bin" / "python"
# Paths named in inline code that must exist when they start with one of these (build/ is written by
# commands, so it is not checked).
TRACKED_TOP = ("contract", "export", "serving", "client", "deploy", "benchmarks", "perf", "tests",
               "requirements", "docs", "model_repository", ".ci")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- Reading Markdown --------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")


@functools.lru_cache(maxsize=None)
def split_markdown(path: Path) -> tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]:
    """(prose paragraphs, code lines), each with the line number it starts on. Prose paragraphs are
    joined lines (so that inline code wrapped over two lines is one span); a code block's lines
    ending in a backslash are joined with the next (one shell command), and so is an indented line
    that starts with an option (a synopsis wrapped over lines)."""
    prose, code = [], []
    paragraph, start, in_code, pending = [], 0, False, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            if paragraph:
                prose.append((start, " ".join(paragraph)))
                paragraph = []
            in_code = not in_code
            continue
        if in_code:
            if pending is not None:
                line, number = pending[1] + " " + line.strip(), pending[0]
                pending = None
            if line.rstrip().endswith("\\"):
                pending = (number, line.rstrip()[:-1])
                continue
            if code and code[-1][1].strip() and re.match(r"^\s+\[?--?[a-z]", line):
                code[-1] = (code[-1][0], code[-1][1] + " " + line.strip())  # a synopsis wrapped over lines
                continue
            code.append((number, line))
        elif line.strip():
            if not paragraph:
                start = number
            paragraph.append(line.strip())
        elif paragraph:
            prose.append((start, " ".join(paragraph)))
            paragraph = []
    if paragraph:
        prose.append((start, " ".join(paragraph)))
    return tuple(prose), tuple(code)


INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def command_texts(path: Path) -> list[tuple[int, str]]:
    """Where commands may be written: every inline code span (prose, and single-line spans inside code
    blocks) and every code block line."""
    prose, code = split_markdown(path)
    texts = [(n, m.group(1)) for n, text in prose for m in INLINE_CODE.finditer(text)]
    for n, line in code:
        texts.append((n, line))
        texts += [(n, m.group(1)) for m in INLINE_CODE.finditer(line)]
    return texts


# --- make targets ------------------------------------------------------------------------------------

MAKE_AT_START = re.compile(r"^\s*(?:\$\s+)?make\s+(.*)$")
MAKE_AFTER_AND = re.compile(r"&&\s*make\s+(.*)$")
TARGET = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def make_targets(text: str) -> list[str]:
    """Targets of a `make ...` command at the start of `text` (or after &&): its words that are not
    variables (NAME=value) or options."""
    targets = []
    for pattern in (MAKE_AT_START, MAKE_AFTER_AND):
        match = pattern.search(text)
        if not match:
            continue
        rest = re.split(r"&&|;|\|\||\s\|\s", match.group(1))[0]
        try:
            words = shlex.split(rest, comments=True)
        except ValueError:  # an unbalanced quote in prose: plain words
            words = rest.split("#")[0].split()
        for word in words:
            if "=" in word or word.startswith("-"):
                continue
            if word in ("&", "...") or not TARGET.match(word):
                break  # prose or a shell operator after the command
            targets.append(word)
    return targets


def documented_make_targets() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for number, text in command_texts(path):
            for target in make_targets(text):
                found.setdefault(target, []).append(f"{rel(path)}:{number}")
    return found


@functools.lru_cache(maxsize=None)
def make_dry_run(target: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True,
                            timeout=60, env=env)
    return result.returncode, result.stderr


def test_make_targets_parse():
    assert make_targets("make bench-engine BENCH_RESULTS=benchmarks/results") == ["bench-engine"]
    assert make_targets('make test PYTEST_ARGS="-k lora -x"') == ["test"]
    assert make_targets("make install install-gpu") == ["install", "install-gpu"]
    assert make_targets("make demo   # main job: set up, build") == ["demo"]
    assert make_targets("make serve &                 # or a production server") == ["serve"]
    assert make_targets("mkdir -p x && make clean") == ["clean"]
    assert make_targets("declares TYPE_FP16; make the configs follow") == []


def test_every_documented_make_target_exists():
    found = documented_make_targets()
    assert {"demo", "test", "serve"} <= set(found), f"the docs should name make demo, test and serve: {sorted(found)}"
    missing = []
    for target, places in sorted(found.items()):
        code, stderr = make_dry_run(target)
        if code != 0 and "No rule to make target" in stderr:
            missing.append(f"make {target} (named at {', '.join(places)})")
    assert not missing, "make targets named in the docs that the Makefile does not have:\n  " + "\n  ".join(missing)


# --- python -m commands ------------------------------------------------------------------------------

PYTHON_M = re.compile(r"(?:^|[\s`(\"'=/])(?:python3?|\.venv/bin/python|\$\(PY\))\s+-m\s+([\w.]+)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
COMMAND_END = re.compile(r"&&|;|\s\|\s|\s#|`|\|\|")


def python_commands(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(module, subcommand, flags) of every `python -m MODULE` of this repository in `text`: the flags
    are those written after it, up to the end of that command."""
    commands = []
    matches = list(PYTHON_M.finditer(text))
    for index, match in enumerate(matches):
        module = match.group(1).rstrip(".:,")
        if module.split(".")[0] not in OWN_PACKAGES:
            continue
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        rest = text[match.end():end]
        stop = COMMAND_END.search(rest)
        rest = rest[:stop.start()] if stop else rest
        subcommand = None
        words = rest.split()
        if module in SUBCOMMANDS and words and re.match(r"^[a-z][\w-]*$", words[0].rstrip(".:,)")):
            subcommand = words[0].rstrip(".:,)")
            if (module, subcommand) in COMMAND_GROUPS and len(words) > 1 and re.match(r"^[a-z][\w-]*$", words[1]):
                subcommand += " " + words[1]  # e.g. export lora add
        commands.append((module, subcommand, FLAG.findall(rest)))
    return commands


def documented_python_commands() -> dict[tuple[str, str | None], dict[str, list[str]]]:
    """(module, subcommand) -> {flag: places}; the flag "" stands for the command itself."""
    found: dict[tuple[str, str | None], dict[str, list[str]]] = {}
    for path in DOCS:
        for number, text in command_texts(path):
            for module, subcommand, flags in python_commands(text):
                place = f"{rel(path)}:{number}"
                entry = found.setdefault((module, subcommand), {})
                for flag in ("", *flags):
                    entry.setdefault(flag, [])
                    if place not in entry[flag]:
                        entry[flag].append(place)
    return found


def python_for(module: str) -> str | None:
    if module.startswith("deploy."):
        return str(DEPLOY_PYTHON) if DEPLOY_PYTHON.exists() else None
    return sys.executable


@functools.lru_cache(maxsize=None)
def module_help(python: str, module: str, subcommand: str | None) -> tuple[int, str]:
    command = [python, "-m", module, *(subcommand.split() if subcommand else []), "--help"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_python_commands_parse():
    assert python_commands("python -m export random OUT_DIR [--arch tiny|ssd-1b|sdxl] [--seed N]") == [
        ("export", "random", ["--arch", "--seed"])]
    assert python_commands("python3 -m export onnx --out /models && python3 -m export engines --onnx /models") == [
        ("export", "onnx", ["--out"]), ("export", "engines", ["--onnx"])]
    assert python_commands("make bench-fuzz     # python -m benchmarks.fuzz [--examples 3000]: about 2 minutes") == [
        ("benchmarks.fuzz", None, ["--examples"])]
    assert python_commands("pip install --no-index -r x.txt; python -m pip install --upgrade y") == []
    assert python_commands(".venv/bin/python -m client \"a cat\" -o cat.png --seed 42") == [("client", None, ["--seed"])]
    assert python_commands("python -m export lora add ink ink.safetensors --repository /models") == [
        ("export", "lora add", ["--repository"])]


def test_every_documented_python_command_and_flag_exists():
    found = documented_python_commands()
    assert ("export", "onnx") in found and ("client", None) in found, f"expected export onnx and the client: {sorted(found, key=str)}"
    problems, skipped = [], []
    for (module, subcommand), flags in sorted(found.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        name = f"python -m {module}" + (f" {subcommand}" if subcommand else "")
        python = python_for(module)
        if python is None:
            skipped.append(name)
            continue
        code, text = module_help(python, module, subcommand)
        if code != 0:
            problems.append(f"{name} --help exits {code} (named at {', '.join(flags[''])}): {text.strip()[-300:]}")
            continue
        for flag, places in sorted(flags.items()):
            if flag and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{name}: no {flag} in its --help (named at {', '.join(places)})")
    assert not problems, "python -m commands or flags named in the docs that the code does not have:\n  " + "\n  ".join(problems)
    if skipped:
        pytest.skip(f"{', '.join(skipped)} not checked: {DEPLOY_PYTHON.relative_to(ROOT)} is missing (make install-deploy)")


# --- links and anchors -------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped (but '-' and '_'), lowercase,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(result)


def test_github_slug():
    assert github_slug("Full size on a CPU machine (`make bench-scale`)") == "full-size-on-a-cpu-machine-make-bench-scale"
    assert github_slug("Checked on tritonserver 2.51 (streaming)") == "checked-on-tritonserver-251-streaming"
    assert github_slug("Admission, limits and cancellation") == "admission-limits-and-cancellation"
    assert github_slug("Why fp32 on a CPU") == "why-fp32-on-a-cpu"


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for path in DOCS:
        prose, _ = split_markdown(path)
        for number, text in prose:
            for match in LINK.finditer(INLINE_CODE.sub("", text)):
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{rel(path)}:{number}: ({target})"
                if not linked.exists():
                    problems.append(f"{where}: no such file {file_part}")
                    continue
                if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {rel(linked)} "
                                    f"(has: {', '.join(sorted(anchors(linked)))})")
    assert not problems, "links in the docs that do not resolve:\n  " + "\n  ".join(problems)


# --- repository paths --------------------------------------------------------------------------------

PATH_LIKE = re.compile(r"^\.?[\w.-]+(/[\w.-]+)+/?$")


def test_every_repository_path_named_exists():
    """Inline code that is a path into a tracked directory (`serving/denoise.py`, `tests/data/...`)
    names a file or directory that exists; build outputs and placeholders (<name>, *) are not checked."""
    problems = []
    for path in DOCS:
        prose, _ = split_markdown(path)
        for number, text in prose:
            for match in INLINE_CODE.finditer(text):
                span = match.group(1).strip()
                if not PATH_LIKE.match(span) or span.split("/")[0] not in TRACKED_TOP:
                    continue
                if not (ROOT / span).exists():
                    problems.append(f"{rel(path)}:{number}: `{span}`")
    assert not problems, "paths named in the docs that do not exist:\n  " + "\n  ".join(problems)


# --- the front door ----------------------------------------------------------------------------------

def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move detail into docs/ and link to it")
    for name in ("make demo", "make test"):
        assert name in README.read_text(encoding="utf-8"), f"README.md should give `{name}`"
