"""Run the code blocks of one Markdown file in order, in the current directory.

    python tests/_scripts/run_doc.py README.md

- ```python blocks run in one namespace, in the order they appear, so a later block may use the
  names an earlier one defined;
- ```bash / ```sh / ```shell / ```console blocks run their commands; every command must be a
  `perfml ...` command (run as `python -m perfml ...` with this interpreter), a console block's
  commands are its `$ ` lines (the other lines are output and are not compared);
- a block whose info string carries `no-run` (```bash no-run) is skipped: keep those for commands
  that need a GPU, several processes or a long time, and say so in the text around them;
- every other fence (text, yaml, json, ...) is prose.

Exit status 0 when every block ran; otherwise the failing block's file:line and the error.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
NO_RUN = "no-run"
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclass
class Block:
    lang: str
    flags: tuple[str, ...]
    code: str
    line: int  # 1-based line of the first code line

    @property
    def runnable(self) -> bool:
        return NO_RUN not in self.flags and (self.lang in PYTHON or self.lang in SHELL)


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        words = info.replace(",", " ").split()
        lang = words[0].lower() if words else ""
        start = i + 1
        j = start
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close.group(2).startswith(fence) and not close.group(3).strip():
                break
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: code block never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[start:j]]
        out.append(
            Block(lang, tuple(w.lower() for w in words[1:]), "\n".join(body) + "\n", start + 1)
        )
        i = j + 1
    return out


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv after `perfml`) for each command of a shell block. Raises ValueError for a
    command that is not a perfml command (mark such a block no-run)."""
    lines = block.code.splitlines()
    if block.lang == "console":
        lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
    out: list[tuple[int, list[str]]] = []
    pending, first = "", 0
    for n, line in enumerate(lines):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if not words:
            continue
        where = block.line + first
        if words[0] != "perfml":
            raise ValueError(
                f"line {where}: {words[0]!r} is not a perfml command; a block that runs other "
                f"commands must be marked no-run (```{block.lang} {NO_RUN})"
            )
        out.append((where, words[1:]))
    return out


def run(path: Path) -> int:
    text = path.read_text()
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(text):
        if not block.runnable:
            continue
        start = time.perf_counter()
        where = f"{path.name}:{block.line}"
        if block.lang in PYTHON:
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except BaseException:  # noqa: BLE001 - report any failure with its block
                traceback.print_exc()
                print(f"FAILED python block at {where}", flush=True)
                return 1
        else:
            for line, argv in commands(block):
                cmd = [sys.executable, "-m", "perfml", *argv]
                print(f"$ perfml {shlex.join(argv)}", flush=True)
                done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                print(done.stdout.decode(errors="replace")[-4000:], flush=True)
                if done.returncode != 0:
                    print(f"FAILED (exit {done.returncode}): {path.name}:{line}", flush=True)
                    return 1
        print(f"ok {block.lang} block at {where} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: run_doc.py FILE.md")
    raise SystemExit(run(Path(sys.argv[1])))
