"""The README and docs/ as executable documentation: every python block and every `perfml ...`
command of each page runs (CPU, tiny settings) in a temporary directory, through
tests/_scripts/run_doc.py; plus the rules the pages follow (README size, links that resolve) and
tests of the block runner itself, so that a broken snippet cannot pass unnoticed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "_scripts" / "run_doc.py"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10 * 1024

sys.path.insert(0, str(RUNNER.parent))
import run_doc  # noqa: E402


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _run_page(page: Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # run as a user would: the default paths (C++ on CPU), not the tests' interpret mode
    env.pop("TRITON_INTERPRET", None)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(RUNNER), str(page)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_code_block_runs(page, tmp_path):
    """Runs in a scratch directory with a copy of configs/, as in a fresh clone; nothing is
    written into the repository."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    done = _run_page(page, tmp_path)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"{_page_id(page)}: a code block failed\n{output[-8000:]}"


def test_readme_stays_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{_page_id(page)} links to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_page_id(page)}: no heading for {target}"


# the runner itself


PAGE = """\
intro

```python
value = 20 + 1
```

```text
not code
```

```python no-run
raise SystemExit("never run")
```

```python
assert value == 21
```

```bash
perfml --help   # a comment
perfml train --config a.yaml \\
    --set max_steps=2
```

```console
$ perfml --help
usage: perfml ...
```
"""


def test_runner_finds_blocks_languages_flags_and_lines():
    blocks = run_doc.blocks(PAGE)
    assert [(b.lang, b.flags, b.line, b.runnable) for b in blocks] == [
        ("python", (), 4, True),
        ("text", (), 8, False),
        ("python", ("no-run",), 12, False),
        ("python", (), 16, True),
        ("bash", (), 20, True),
        ("console", (), 26, True),
    ]
    assert run_doc.commands(blocks[4]) == [
        (20, ["--help"]),
        (21, ["train", "--config", "a.yaml", "--set", "max_steps=2"]),
    ]
    assert run_doc.commands(blocks[5]) == [(26, ["--help"])]


def test_runner_refuses_other_commands_in_a_runnable_block():
    block = run_doc.blocks("```bash\npip install perfml\n```\n")[0]
    with pytest.raises(ValueError, match="'pip' is not a perfml command.*no-run"):
        run_doc.commands(block)


def test_runner_refuses_an_unclosed_block():
    with pytest.raises(ValueError, match="line 1: code block never closed"):
        run_doc.blocks("```python\nx = 1\n")


def test_runner_shares_names_between_blocks_and_fails_on_an_error(tmp_path, capsys):
    good = tmp_path / "good.md"
    good.write_text("```python\nx = 2\n```\n\n```python\nassert x == 2\n```\n")
    assert run_doc.run(good) == 0
    bad = tmp_path / "bad.md"
    bad.write_text("```python\nx = 2\n```\n\ntext\n\n```python\nassert x == 3\n```\n")
    assert run_doc.run(bad) == 1
    assert "FAILED python block at bad.md:8" in capsys.readouterr().out


def test_runner_fails_on_a_failing_command(tmp_path):
    page = tmp_path / "cli.md"
    page.write_text("```bash\nperfml no-such-command\n```\n")
    done = _run_page(page, tmp_path, timeout=300)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 1 and "FAILED (exit 2): cli.md:2" in output, output
