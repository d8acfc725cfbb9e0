"""The docs name only what exists: every repository path and ``python -m`` module in the Markdown files.

What counts as a repository path: a backticked token or a link target whose first part is a top-level entry
of the repository (``lposs_lab/...``, ``conf/...``, ``docs/...``), a relative link, or a bare file name with a
source extension (``run.py``, ``RESULTS.md``). Skipped: URLs, globs, placeholders (``DIR``, ``PATH``,
``<name>``, ``$VAR``), absolute paths, ``key=value`` overrides, and what commands create (``outputs/``,
``multirun/``, ``reports/``, ``results.json``: none of those start with a repository entry).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: the repository's own top-level entries (fixed: a checkout may also hold outputs/, data/, multirun/ ...)
TOP = ("lposs_lab", "conf", "tests", "benchmarks", "docs", "examples", "experiments", "notebooks",
       "run.py", "Makefile", "pyproject.toml", "README.md")
SOURCE_SUFFIXES = (".py", ".md", ".ipynb", ".yaml", ".toml")
#: file names that runs write (a logger's, Hydra's), not repository files
OUTPUT_NAMES = ("hparams.yaml", "overrides.yaml", "results.json", "segment.json")
PLACEHOLDER = re.compile(r"[<>{}*$~=|,;()\[\]\\]|^(DIR|PATH|FILE|NAME)\b|/(DIR|PATH|NAME)\b")


def markdown_files() -> list[Path]:
    """README.md, docs/*.md, experiments/README.md, benchmarks/RESULTS.md, examples/README.md, notebooks."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "README.md",
             REPO / "benchmarks" / "RESULTS.md", REPO / "examples" / "README.md",
             *sorted((REPO / "notebooks").glob("*.ipynb"))]
    return [f for f in files if f.is_file()]


def _text(path: Path) -> str:
    if path.suffix != ".ipynb":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _split(text: str) -> tuple[str, list[str]]:
    """``(prose, code blocks)`` of Markdown text (fenced blocks taken out of the prose)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    return re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S), blocks


def path_tokens(text: str) -> list[str]:
    """Backticked tokens and link targets of the prose that look like repository paths."""
    prose, _ = _split(text)
    tokens = [t for span in re.findall(r"`([^`\n]+)`", prose) for t in span.split()]
    tokens += [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", prose)]
    tokens += re.findall(r"python ([\w./-]+\.py)\b", text)  # scripts run in prose or code blocks
    out = []
    for token in tokens:
        token = token.rstrip(".,:;")
        if not token or "://" in token or token.startswith(("#", "/", "mailto:")):
            continue
        if PLACEHOLDER.search(token):
            continue
        if token.rsplit("/", 1)[-1] in OUTPUT_NAMES:
            continue
        first = token.removeprefix("./").split("/")[0]
        if first in TOP or first == ".." or ("/" not in token and token.endswith(SOURCE_SUFFIXES)):
            out.append(token)
    return out


def modules(text: str) -> list[str]:
    """Every ``python -m MODULE`` in the text, prose and code blocks alike."""
    return re.findall(r"python -m ([A-Za-z_][\w.]*)", text)


def _exists(token: str, md: Path) -> bool:
    token = token.rstrip("/")
    if "/" in token:
        return (REPO / token).exists() or (md.parent / token).exists()
    # a bare file name: anywhere in the repository's own folders (e.g. config.py, _base.yaml)
    return (REPO / token).exists() or (md.parent / token).exists() or any(
        any((REPO / top).rglob(token)) for top in TOP if (REPO / top).is_dir()
    )


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(md: Path):
    missing = sorted({t for t in path_tokens(_text(md)) if not _exists(t, md)})
    assert not missing, f"{md.relative_to(REPO)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_modules_exist(md: Path):
    missing = sorted({m for m in modules(_text(md)) if importlib.util.find_spec(m) is None})
    assert not missing, f"{md.relative_to(REPO)} runs modules that do not exist: {missing}"


def test_the_checks_can_fail(tmp_path):
    md = tmp_path / "x.md"
    text = "See `lposs_lab/nope.py`, [the spec](missing.md), `outputs/run/` and `DIR/x.png`.\n\n" \
           "```bash\npython -m lposs_lab.lab.nope\n```\n"
    assert path_tokens(text) == ["lposs_lab/nope.py", "missing.md"]
    assert not _exists("lposs_lab/nope.py", md) and _exists("lposs_lab/config.py", md)
    assert modules(text) == ["lposs_lab.lab.nope"]
    assert importlib.util.find_spec("lposs_lab.lab.nope") is None


# ------------------------------------------------------------------ citations of files users do not have

#: the method's and the predictors' notes the project was written from: users have docs/method.md and
#: docs/predictors.md instead
CITED = re.compile(r"SPEC\.md|PREDICTORS\.md|DATASETS\.md|WEB\.md|\.\./shared|\bSPEC (§|section)")
CITING_SUFFIXES = (".py", ".md", ".ipynb", ".yaml", ".json")


def project_files() -> list[Path]:
    """The repository's own text files (this test excluded: it names what it looks for)."""
    out = [REPO / name for name in TOP if (REPO / name).is_file()]
    for top in TOP:
        if (REPO / top).is_dir():
            out += [p for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(p for p in out if p.suffix in CITING_SUFFIXES and p != Path(__file__).resolve())


def test_no_file_cites_notes_outside_the_repository():
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in project_files()
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if CITED.search(line)
    ]
    assert not offenders, f"cite docs/method.md or docs/predictors.md instead: {offenders}"


def test_the_citation_check_can_fail():
    assert project_files() and REPO / "lposs_lab" / "config.py" in project_files()
    for line in ("see SPEC §3", "(SPEC section 6)", "PREDICTORS.md §4", "../shared/data/benchmarks.json"):
        assert CITED.search(line), line
    assert not CITED.search("see docs/method.md §3 and docs/predictors.md §4")
