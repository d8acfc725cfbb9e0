"""The Gradio page (Segment and Runs tabs) and how it is served: bound to 127.0.0.1 unless told otherwise,
files served only from below the runs folder, the data folders its runs name and the app's own folder,
uploads capped, one model request at a time (the page shows the queue position)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import Engine

__all__ = ["AppSettings", "build_app", "launch", "MAX_FILE_SIZE"]

#: Largest upload the server accepts.
MAX_FILE_SIZE = "25mb"
TITLE = "LPOSS / LPOSS+ lab"


@dataclass
class AppSettings:
    """What ``python -m lposs_lab.app`` was asked for (see :mod:`lposs_lab.app.__main__`)."""

    runs: Path | None = None
    vm: str = "dino_b16"
    vlm: str = "maskclip_b16"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    work: Path | None = None


def _work_dir(settings: AppSettings) -> Path:
    """The app's own folder (Gradio's temp folder too, unless ``GRADIO_TEMP_DIR`` is set)."""
    if settings.work is None:
        settings.work = Path(tempfile.mkdtemp(prefix="lposs-app-"))
    settings.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.work / "gradio"))
    return settings.work.resolve()


def build_app(settings: AppSettings, engine: Engine | None = None) -> Any:
    """The ``gr.Blocks`` of the app (not launched). Gradio is imported here, not before."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    work = _work_dir(settings)
    import gradio as gr

    from .runs_tab import build_runs_tab
    from .segment_tab import build_segment_tab

    engine = engine or Engine(settings.vm, settings.vlm, settings.device)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}: open-vocabulary segmentation by label propagation")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                build_segment_tab(gr, engine, work)
            with gr.Tab("Runs", id="runs"):
                refresh, outs = build_runs_tab(gr, settings.runs, work)
        demo.load(refresh, None, outs, api_visibility="private")
    demo.engine = engine
    return demo


def served_folders(settings: AppSettings) -> list[str]:
    """The folders the server may read files from: runs, the data and prediction folders of its runs, and
    the app's own folder."""
    from .runs import allowed_folders, scan_runs

    folders = [_work_dir(settings)]
    if settings.runs is not None:
        runs, _ = scan_runs(settings.runs)
        folders += [Path(settings.runs).expanduser().resolve(), *allowed_folders(runs)]
    return [str(f) for f in folders]


def launch(demo: Any, settings: AppSettings, **kwargs: Any) -> Any:
    """Queue (one model request at a time) and serve ``demo`` as ``settings`` says."""
    allowed = served_folders(settings)
    # Gradio also serves the current folder's files it created and its own cache; block everything else
    # that could hold secrets: the home folder and the file system root, less the allowed folders.
    blocked = [str(Path.home()), "/etc", "/proc", "/sys", "/root", "/var"]
    keep = [*allowed, os.environ.get("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "gradio"))]
    blocked = [b for b in blocked if not any(Path(a).resolve().is_relative_to(b) for a in keep)]
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        allowed_paths=allowed,
        blocked_paths=blocked,
        max_file_size=MAX_FILE_SIZE,
        show_error=True,
        ssr_mode=False,
        **kwargs,
    )
