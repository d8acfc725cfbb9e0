"""The floors: the library (lposs_lab/ minus lab/ and app/) never imports the lab or the lab's stack, nothing
below the app (lposs_lab/app/) imports it, the app imports Gradio lazily, and no module of the package
imports another in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lposs_lab"
LAB_STACK = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "torchmetrics", "datasets", "wandb")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_lab(name: str) -> bool:
    return name == "lposs_lab.lab" or name.startswith("lposs_lab.lab.")


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; relative imports resolved), at any depth in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            out.add(root)
            out.update(f"{root}.{alias.name}" for alias in node.names)
    return out


def _is_app(name: str) -> bool:
    return name == "lposs_lab.app" or name.startswith("lposs_lab.app.")


MODULES = _all_modules()
LIBRARY = sorted(n for n in MODULES if not _is_lab(n) and not _is_app(n))
BELOW_APP = sorted(n for n in MODULES if not _is_app(n))
APP = sorted(n for n in MODULES if _is_app(n))


@pytest.mark.parametrize("name", BELOW_APP)
def test_nothing_below_the_app_imports_it(name):
    bad = sorted(imp for imp in _imports(name, MODULES[name]) if _is_app(imp))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", APP)
def test_the_app_imports_gradio_only_inside_functions(name):
    tree = ast.parse(MODULES[name].read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m.split(".")[0] in ("gradio", "gradio_client", "playwright")}


def test_the_scan_sees_both_floors():
    assert "lposs_lab.predictor" in LIBRARY and "lposs_lab.models.registry" in LIBRARY
    assert "lposs_lab.lab.module" in MODULES and "lposs_lab.lab.tasks.evaluate" in MODULES
    assert not any(_is_lab(n) for n in LIBRARY)
    assert "lposs_lab.app.engine" in APP and not any(_is_app(n) for n in LIBRARY)


@pytest.mark.parametrize("name", LIBRARY)
def test_library_module_imports_neither_the_lab_nor_its_stack(name):
    bad = sorted(
        imp for imp in _imports(name, MODULES[name])
        if _is_lab(imp) or imp.split(".")[0] in LAB_STACK
    )
    assert not bad, f"{name} imports {bad}"


#: a ``sys.meta_path`` finder that makes the lab's packages look uninstalled (``pip install lposs_lab``)
_BLOCK_LAB = (
    "import importlib.abc, sys\n"
    "class BlockLab(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {LAB_STACK!r}:\n"
    "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
    "        return None\n"
    "sys.meta_path.insert(0, BlockLab())\n"
)


def _run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_LAB + code, *args], capture_output=True, text=True, timeout=300,
        cwd=PACKAGE.parent,
    )


@pytest.mark.slow  # a subprocess
def test_library_imports_and_predicts_without_the_lab_installed():
    # the lab's packages cannot be imported at all, as after `pip install lposs_lab` without [lab]; timm
    # imports wandb by itself when it is there and copes when it is not
    code = (
        "import importlib\n"
        f"names = {LIBRARY!r}\n"
        "for n in names:\n"
        "    if n.endswith(('triton_stencil', 'numba_stencil', 'numba_solver')):\n"
        "        continue  # import numba/triton on first use; checked by the AST scan\n"
        "    importlib.import_module(n)\n"
        "import numpy as np\n"
        "from lposs_lab import LPOSS, LPOSSConfig, WindowConfig\n"
        "cfg = LPOSSConfig(vm='tiny_random', vlm='tiny_random', device='cpu',\n"
        "                  window=WindowConfig(short_side=32))\n"
        "model = LPOSS.from_config(cfg, text_cache_dir=None)\n"
        "pred = model.predict(np.zeros((32, 48, 3), np.uint8), ['a', 'b'])\n"
        f"stack = {LAB_STACK!r}\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.split('.')[0] in stack or m.startswith('lposs_lab.lab'))\n"
        "print(tuple(pred.labels.shape), loaded)\n"
    )
    out = _run_blocked(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(32, 48) []", out.stdout


def test_the_blocker_blocks_and_run_py_names_the_lab_extra():
    probe = _run_blocked("import omegaconf")
    assert probe.returncode == 1 and "No module named 'omegaconf' (blocked by the test)" in probe.stderr
    run_py = str(PACKAGE.parent / "run.py")
    out = _run_blocked(f"import runpy; sys.argv = [{run_py!r}, 'image=x.png']; runpy.run_path({run_py!r})")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "error: run.py needs the lab (hydra is not installed): pip install 'lposs_lab[lab]'"
    ]


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for imp in _imports(name, path):
            # an import of a.b.c depends on the deepest package module that exists
            parts = imp.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            if parts and ".".join(parts) != name:
                deps.add(".".join(parts))
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    # every import counts, lazy ones and a submodule's imports of its own package's __init__ included
    assert _cycles(_package_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_backwards_imports_from_library_to_lab_even_lazily():
    # lazy imports inside functions are seen by ast.walk too
    offenders = {n: sorted(i for i in _imports(n, MODULES[n]) if _is_lab(i)) for n in LIBRARY}
    assert {n: v for n, v in offenders.items() if v} == {}
