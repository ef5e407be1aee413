"""The documentation holds: every relative link and #anchor leads somewhere, and every example marked
runnable runs as written against a real server on the default model, printing what the page shows.

Marking, in README.md and docs/*.md:
- a fenced block with info string `sh runnable` holds shell commands; a line `#> text` after a command
  is a line of that command's expected stdout (`#>` alone: an empty line); other `#` lines are comments.
  A command may span lines (an open quote, or a trailing backslash).
- a fenced block with info string `python runnable` is one program; its `#> ` lines, in order, are its
  expected stdout.
- in an expected line `...` matches any text, and a line that is only `...` matches any number of lines;
  runs of spaces and tabs compare equal.
The examples are written for `make serve ARGS="--http-port 8000"`: gRPC on 127.0.0.1:50051 (the CLI's
default), HTTP on :8000, metrics on :9464. The test points them at its own server, started on free
loopback ports, and unregisters every adapter before each page, so each page's examples stand alone.
"""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_PAGES = [page for page in PAGES if page.name != "BENCHMARKS.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
# What the docs must not carry: one workplace's machine paths, remarks about its other jobs, tracker numbers.
WORKPLACE = re.compile(r"\.carry/|\$OUT|shared/bench|other agents|issue [0-9]+|METHOD\.md|gpu_round")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


@dataclass
class Block:
    info: str
    lines: list[str]
    line: int   # of the opening fence, 1-based

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info.split()[1:]

    @property
    def language(self) -> str:
        return (self.info.split() or [""])[0]


def split_page(text: str) -> tuple[list[str], list[Block]]:
    """The page's prose lines (code blocks blanked out) and its fenced blocks, indentation removed."""
    prose, blocks = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, start = [], i
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(opening["info"].strip(), body, start + 1))
        prose.extend([""] * (i - start + 1))
        i += 1
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but `-` dropped, spaces -> `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())     # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_page(page.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading[1])
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def links(page: Path) -> list[tuple[int, str]]:
    prose, _ = split_page(page.read_text())
    out = []
    for number, line in enumerate(prose, 1):
        line = re.sub(r"(`+)(.*?)\1", "", line)          # inline code is not a link
        out += [(number, m["target"].strip("<>")) for m in LINK.finditer(line)]
    return out


def broken_links(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            continue                                      # http(s), mailto: not checked here
        where = f"{rel(page)}:{number}: {target}"
        path = (page.parent / parts.path).resolve() if parts.path else page
        if not path.exists():
            problems.append(f"{where}: no file {path}")
            continue
        if parts.fragment:
            if path.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif parts.fragment not in anchors(path):
                problems.append(f"{where}: no heading with anchor #{parts.fragment} in {rel(path)}")
    return problems


# ------------------------------------------------------------------------------------------------- links

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--store` flag: what it does\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the---store-flag-what-it-does) [no file](missing.md) [no anchor](other.md#nope)\n"
                    "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n[self](#page)\n# Page\n")
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.md: no file" in problems[0] and "no heading with anchor #nope" in problems[1]


def test_headings_get_githubs_anchors():
    assert slug("Training: `cartridge train` and `cartridge eval`") == "training-cartridge-train-and-cartridge-eval"
    assert slug("The server: `cartridge serve --store DIR`") == "the-server-cartridge-serve---store-dir"
    assert slug("GPU deployment (Docker)") == "gpu-deployment-docker"


# ------------------------------------------------------------------------------------------ what they say

def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {urlsplit(target).path for _, target in links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_the_docs_speak_of_the_product_alone(page):
    hits = [f"{rel(page)}:{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if WORKPLACE.search(line)]
    assert hits == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_placeholder_is_left_where_output_belongs(page):
    # An example's output still to be captured was marked by a line such as TOUR_GATE2.
    hits = [f"{rel(page)}:{n}: {line}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", line.strip())]
    assert hits == []


# ------------------------------------------------------------------------------------- runnable examples

@dataclass
class Command:
    text: str
    line: int
    expected: list[str] = field(default_factory=list)
    shows_output: bool = False


def complete(command: str) -> bool:
    if command.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:       # an open quote: the command goes on on the next line
        return False
    return True


def shell_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    pending: list[str] = []
    for offset, line in enumerate(block.lines, block.line + 1):
        if pending:
            pending.append(line)
            if complete("\n".join(pending)):
                commands[-1].text = "\n".join(pending)
                pending = []
            continue
        if line.startswith("#>"):
            assert commands, f"line {offset}: output before any command"
            commands[-1].expected.append(line[3:] if line.startswith("#> ") else line[2:])
            commands[-1].shows_output = True
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        else:
            commands.append(Command(line, offset))
            if not complete(line):
                pending = [line]
    assert not pending, f"block at line {block.line}: unfinished command {pending[0]!r}"
    return commands


def python_program(block: Block) -> Command:
    expected = [line.strip()[3:] if line.strip().startswith("#> ") else "" for line in block.lines
                if line.strip().startswith("#>")]
    return Command("\n".join(block.lines), block.line, expected, bool(expected))


def examples(page: Path) -> list[tuple[str, Command]]:
    _, blocks = split_page(page.read_text())
    out = []
    for block in blocks:
        if not block.runnable:
            continue
        assert block.language in ("sh", "python"), f"{rel(page)}:{block.line}: runnable {block.language!r}?"
        if block.language == "sh":
            out += [("sh", command) for command in shell_commands(block)]
        else:
            out.append(("python", python_program(block)))
    return out


def normalize(text: str) -> list[str]:
    lines = [re.sub(r"[ \t]+", " ", line).rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def output_matches(expected: list[str], actual: str) -> bool:
    pattern = ""
    for line in normalize("\n".join(expected)):
        if line == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += "[^\\n]*?".join(re.escape(part) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, "\n".join(normalize(actual)) + "\n", re.DOTALL) is not None \
        if pattern else not normalize(actual)


def test_the_output_check_tells_a_difference():
    assert output_matches(["{\"id\": \"...\", \"n\": 2}"], '{"id": "x1",  "n": 2}\n\n')
    assert not output_matches(["{\"id\": \"...\", \"n\": 2}"], '{"id": "x1", "n": 3}\n')
    assert output_matches(["first", "...", "last"], "first\na\nb\nlast\n")
    assert not output_matches(["first", "last"], "first\nextra\nlast\n")
    assert output_matches(["", "  indented"], "\n  indented\n")


def test_the_pages_hold_runnable_examples():
    assert len(examples(ROOT / "README.md")) >= 5
    assert sum(len(examples(page)) for page in RUNNABLE_PAGES) >= 15
    commands = " ".join(command.text for page in RUNNABLE_PAGES for _, command in examples(page))
    for used in ("cartridge adapters register records adapters/examples/records", "cartridge generate",
                 "cartridge adapters list", "curl"):
        assert used in commands


@pytest.fixture(scope="module")
def docs_server():
    from .conftest import start_server

    proc = start_server("--http-port", "0", "--max-batch-size", "4", "--max-seq-len", "512",
                        "--max-lora-rank", "8")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    """A `cartridge` command on PATH that runs this tree's client, as `make setup` installs it."""
    directory = tmp_path_factory.mktemp("bin")
    script = directory / "cartridge"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m client.cli \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def point_at(text: str, server) -> str:
    http = urlsplit(server.http_url).netloc
    metrics = urlsplit(server.metrics_url).netloc
    for default, ours in (("50051", server.address), ("8000", http), ("9464", metrics)):
        text = re.sub(rf"\b(?:localhost|127\.0\.0\.1):{default}\b", ours, text)
    return text


@pytest.mark.parametrize("page", [page for page in RUNNABLE_PAGES
                                  if any(block.runnable for block in split_page(page.read_text())[1])], ids=rel)
def test_runnable_examples_run_as_written(page, docs_server, shim):
    from client.client import CartridgeClient

    found = examples(page)
    with CartridgeClient(docs_server.address, timeout=60) as client:   # each page starts from no adapters
        for adapter in client.list_adapters():
            client.unregister_adapter(adapter.name)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARTRIDGE_")}
    env.update(PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               CARTRIDGE_SERVER=docs_server.address, PYTHONUNBUFFERED="1")
    for language, command in found:
        text = point_at(command.text, docs_server)
        argv = ["bash", "-c", text] if language == "sh" else [sys.executable, "-c", text]
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        where = f"{rel(page)}:{command.line}: {command.text.splitlines()[0]}"
        assert result.returncode == 0, f"{where}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        if command.shows_output:
            assert output_matches(command.expected, result.stdout), \
                f"{where}\nthe page shows:\n" + "\n".join(command.expected) + f"\nit printed:\n{result.stdout}"
