"""The README's examples run as written, and the docs link only inside the repository.

Every ```python block of README.md and docs/api.md runs in a fresh temporary directory, in a subprocess
with a timeout. The files a snippet reads (string literals such as "r18.onnx") are made
first by the README's own shell commands that write them (`fmcompress ... -o FILE` in a
```bash block), found by parsing those blocks, not hard-coded here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "api.md"  # the README's Python section continued: its snippets run too
TIMEOUT_S = 300  # per command or snippet; the whole module takes about 20 s on two cores

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # line of the opening fence in the file
    page: str = "README.md"

    @property
    def label(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    line: int

    @property
    def output(self) -> str | None:
        """The file the command writes (`-o FILE` / `--output FILE`), if it says."""
        for flag, value in zip(self.argv, self.argv[1:], strict=False):
            if flag in ("-o", "--output"):
                return value
        return None

    def __str__(self) -> str:
        return shlex.join(self.argv)


def blocks(path: Path, lang: str) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, str(path.relative_to(ROOT)))
            for m in FENCE.finditer(text) if m.group(1) == lang]


def fmcompress_commands(path: Path = README) -> list[Command]:
    """The `fmcompress ...` commands of the ```bash blocks, in order (chains split at &&)."""
    commands = []
    for block in blocks(path, "bash"):
        for offset, line in enumerate(block.code.splitlines(), start=1):
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and argv[0] == "fmcompress":
                    commands.append(Command(tuple(argv), block.line + offset))
    return commands


def string_literals(code: str) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def commands_for(files: set[str], commands: list[Command]) -> list[Command]:
    """The commands that write `files`, plus the earlier ones that write what those read."""
    needed: list[Command] = []
    wanted = set(files)
    for command in reversed(commands):
        if command.output in wanted:
            needed.insert(0, command)
            wanted.discard(command.output)
            wanted.update(command.argv[1:])
    return needed


PYTHON_SNIPPETS = blocks(README, "python") + blocks(API_PAGE, "python")
COMMANDS = fmcompress_commands()


# --- fast: the README parses and its snippets are well formed ---------------------------


def test_readme_has_python_snippets_that_compile():
    assert PYTHON_SNIPPETS, "README.md has no ```python block"
    for number, snippet in enumerate(PYTHON_SNIPPETS, start=1):
        compile(snippet.code, f"python snippet {number} ({snippet.label})", "exec")


def written_files(code: str) -> set[str]:
    """String literals passed to a save/write call: files the snippet writes, not reads."""
    written = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.startswith(("save", "write")):
                written.update(a.value for a in node.args if isinstance(a, ast.Constant))
    return written


def test_quick_start_exports_what_the_snippets_read():
    exports = [c for c in COMMANDS if c.argv[1:2] == ("export",)]
    assert exports, "the README's bash blocks have no `fmcompress export` command"
    produced = {c.output for c in COMMANDS if c.output}
    for number, snippet in enumerate(PYTHON_SNIPPETS, start=1):
        reads = {s for s in string_literals(snippet.code) if s.endswith(".onnx")} - written_files(snippet.code)
        missing = reads - produced
        assert not missing, f"python snippet {number} ({snippet.label}) reads {sorted(missing)}, " \
                            "which no README command writes"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(page: Path):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        where = f"{page.relative_to(ROOT)}: link {target!r}"
        assert "://" not in target and not target.startswith("mailto:"), f"{where} points outside"
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        assert resolved.is_relative_to(ROOT), f"{where} leaves the repository"
        assert resolved.exists(), f"{where}: no such file"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{where}: no such heading"


# --- slow: every snippet runs as written -------------------------------------------------


def _run(argv: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, "MPLBACKEND": "Agg"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {TIMEOUT_S} s")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{tail}")


@pytest.fixture(scope="module")
def readme_files(tmp_path_factory):
    """produce(filename) -> path, made once by the README command that writes it."""
    folder = tmp_path_factory.mktemp("readme_files")
    made: dict[str, Path] = {}

    def produce(files: set[str]) -> dict[str, Path]:
        for command in commands_for(files, COMMANDS):
            if command.output not in made:
                argv = [sys.executable, "-m", "fmcompress", *command.argv[1:]]
                _run(argv, folder, f"README command `{command}` (README.md:{command.line})")
                made[command.output] = folder / command.output
        return {name: made[name] for name in files if name in made}

    return produce


@pytest.mark.slow
@pytest.mark.parametrize("number, snippet", list(enumerate(PYTHON_SNIPPETS, start=1)),
                         ids=[f"snippet{n}-{Path(s.page).stem}-line{s.line}" for n, s in enumerate(PYTHON_SNIPPETS, start=1)])
def test_readme_python_snippet_runs_as_written(number: int, snippet: Block, readme_files, tmp_path):
    for name, path in readme_files(string_literals(snippet.code)).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    script = tmp_path / f"readme_snippet_{number}.py"
    script.write_text(snippet.code, encoding="utf-8")
    _run([sys.executable, script.name], tmp_path, f"python snippet {number} ({snippet.label})")
