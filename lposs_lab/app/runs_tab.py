"""The Runs tab: the runs below ``--runs``, one run's per-class and per-image numbers, one image's ground
truth and prediction, and two runs compared image by image (Gradio is imported by :mod:`.ui`)."""

from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lposs_lab.errors import UserError

from .render import blend, enlarge, legend_html
from .runs import (
    TABLE_COLUMNS,
    Run,
    compare_rows,
    image_files,
    pct1,
    per_image_rows,
    runs_table,
    scan_runs,
)

__all__ = ["build_runs_tab", "class_bars_html", "THUMB_SIDE"]

THUMB_SIDE = 72
ALL = "(all)"


def class_bars_html(per_class: dict[str, float | None]) -> str:
    """Per-class IoU as horizontal bars, best first; classes without a score (absent) listed last."""
    scored = sorted(((k, v) for k, v in per_class.items() if v is not None), key=lambda kv: (-kv[1], kv[0]))
    absent = [k for k, v in per_class.items() if v is None]
    rows = [
        f'<div class="bar-row" style="display:flex;align-items:center;gap:6px;font-size:13px">'
        f'<span style="width:160px;text-align:right">{html.escape(k)}</span>'
        f'<span style="display:inline-block;height:12px;width:{max(0.0, v) * 3:.1f}px;background:#4a7bd0">'
        f"</span><span>{v:.1f}</span></div>"
        for k, v in scored
    ]
    if absent:
        rows.append(f"<p>no pixels in ground truth or prediction: {html.escape(', '.join(absent))}</p>")
    return '<div class="class-bars">' + "".join(rows) + "</div>" if rows else "<p>no per-class IoU</p>"


def _thumb(work: Path, run: Run, image_id: str) -> str | None:
    """A small PNG of the image (kept in the app's folder), or None when the image cannot be read."""
    name = hashlib.sha1(f"{run.source}\0{image_id}".encode()).hexdigest()[:16] + ".png"
    path = work / "thumbs" / name
    if not path.is_file():
        try:
            files = image_files(run, image_id)
        except (UserError, FileNotFoundError, OSError):
            return None
        img = Image.fromarray(files.image)
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    return str(path)


def _present_legend(names: list[str], maps: dict[str, np.ndarray], headers: dict[str, str]) -> str:
    """The legend of the classes present in any of ``maps`` (a benchmark has up to 171 classes)."""
    present = sorted({int(v) for m in maps.values() for v in np.unique(m) if int(v) < len(names)})
    return legend_html(
        [names[c] for c in present], maps, headers, values=present, unknown_name="ignored / unknown"
    )


def build_runs_tab(gr: Any, runs_root: Path | None, work: Path) -> tuple[Any, list[Any]]:
    """Components and events of the Runs tab in the open Blocks; returns ``(refresh, its outputs)``
    for the page's load event."""
    state: dict[str, Any] = {"runs": {}}

    def load() -> tuple[list[Run], str]:
        if runs_root is None:
            return (
                [],
                "No runs folder: start the app with `--runs DIR` (a folder holding `results.json` files).",
            )
        runs, problems = scan_runs(runs_root)
        state["runs"] = {r.key: r for r in runs}
        note = f"{len(runs)} run(s) below `{runs_root}`."
        if problems:
            note += " Skipped: " + "; ".join(problems)
        return runs, note

    def filtered(dataset: str, method: str, text: str) -> list[Run]:
        runs = list(state["runs"].values())
        if dataset and dataset != ALL:
            runs = [r for r in runs if r.dataset == dataset]
        if method and method != ALL:
            runs = [r for r in runs if r.method == method]
        if text:
            runs = [r for r in runs if text.lower() in " ".join(map(str, runs_table([r])[0])).lower()]
        return runs

    def refresh(dataset=ALL, method=ALL, text=""):
        runs, note = load()
        shown = filtered(dataset, method, text)
        rows = runs_table(shown) if shown else []
        choices = [(r.label(), r.key) for r in shown]
        datasets = [ALL, *sorted({r.dataset for r in runs})]
        methods = [ALL, *sorted({r.method for r in runs})]
        return (
            note,
            gr.update(value=rows, headers=TABLE_COLUMNS),
            gr.update(choices=choices, value=None),
            gr.update(choices=choices, value=None),
            gr.update(choices=datasets),
            gr.update(choices=methods),
        )

    def pick_run(key):
        run = state["runs"].get(key)
        if run is None:
            return "", gr.update(value=[]), gr.update(choices=[], value=None)
        rows = []
        for rec in per_image_rows(run):
            thumb = _thumb(work, run, rec["id"])
            cell = f"![{rec['id']}](/gradio_api/file={thumb})" if thumb else "-"
            secs = rec.get("seconds")
            rows.append([cell, rec["id"], pct1(rec["mIoU"]), None if secs is None else round(secs, 2)])
        ids = [row[1] for row in rows]
        title = f"<p><b>{html.escape(run.key)}</b>: {run.dataset}, {run.method}, mIoU {pct1(run.miou)}</p>"
        return (
            title + class_bars_html(run.per_class),
            gr.update(value=rows),
            gr.update(choices=ids, value=None),
        )

    def show_image(key, image_id):
        run = state["runs"].get(key)
        if run is None or not image_id:
            return None, None, None, "", ""
        try:
            files = image_files(run, image_id)
        except (UserError, FileNotFoundError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        maps = {"truth": files.truth}
        if files.prediction is not None:
            maps["prediction"] = files.prediction
        legend = _present_legend(
            files.class_names, maps, {"truth": "ground truth", "prediction": "prediction"}
        )
        pred = None if files.prediction is None else enlarge(blend(files.image, files.prediction))
        return enlarge(files.image), enlarge(blend(files.image, files.truth)), pred, legend, files.note

    def row_selected(evt):
        row = evt.row_value or []
        return row[1] if len(row) > 1 else gr.skip()

    row_selected.__annotations__ = {"evt": gr.SelectData}  # Gradio reads it (this module's are strings)

    def compare(key_a, key_b):
        a, b = state["runs"].get(key_a), state["runs"].get(key_b)
        if a is None or b is None:
            return gr.update(value=[]), gr.update(choices=[], value=None), ""
        try:
            rows = compare_rows(a, b)
        except ValueError as exc:
            return gr.update(value=[]), gr.update(choices=[], value=None), str(exc)
        table = [[r["id"], pct1(r["a"]), pct1(r["b"]), f"{r['delta']:+.1f}"] for r in rows]
        note = f"{len(rows)} image(s) in both runs; ΔmIoU = B − A, most negative first."
        return gr.update(value=table), gr.update(choices=[r["id"] for r in rows], value=None), note

    def compare_image(key_a, key_b, image_id):
        out, notes = [], []
        for side, key in (("A", key_a), ("B", key_b)):
            run = state["runs"].get(key)
            if run is None or not image_id:
                out.append(None)
                continue
            try:
                files = image_files(run, image_id)
            except (UserError, FileNotFoundError) as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            out.append(None if files.prediction is None else enlarge(blend(files.image, files.prediction)))
            if files.note:
                notes.append(f"run {side}: {files.note}")
        return (*out, "\n\n".join(notes))

    note = gr.Markdown(elem_id="runs-note")
    with gr.Row():
        ds_filter = gr.Dropdown(choices=[ALL], value=ALL, label="dataset", elem_id="filter-dataset")
        method_filter = gr.Dropdown(choices=[ALL], value=ALL, label="method", elem_id="filter-method")
        text_filter = gr.Textbox(label="contains", elem_id="filter-text")
        reload = gr.Button("reload runs", elem_id="reload-runs")
    table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, elem_id="runs-table", wrap=True)
    run_pick = gr.Dropdown(label="run", elem_id="run-pick")
    with gr.Row():
        with gr.Column(scale=1):
            bars = gr.HTML(elem_id="class-bars")
        with gr.Column(scale=1):
            images = gr.Dataframe(
                headers=["thumbnail", "id", "mIoU", "seconds"], datatype=["markdown", "str", "str", "number"],
                interactive=False, elem_id="image-table", label="images, worst first",
            )  # fmt: skip
    image_pick = gr.Dropdown(label="image", elem_id="image-pick")
    with gr.Row():
        img = gr.Image(label="image", interactive=False, elem_id="run-image", format="png")
        truth = gr.Image(label="ground truth", interactive=False, elem_id="run-truth", format="png")
        pred = gr.Image(label="prediction", interactive=False, elem_id="run-prediction", format="png")
    img_legend = gr.HTML(elem_id="run-legend")
    img_note = gr.Markdown(elem_id="run-note")
    with gr.Accordion("compare with another run on the same dataset", open=False):
        run_b = gr.Dropdown(label="run B", elem_id="run-b")
        cmp_note = gr.Markdown(elem_id="compare-note")
        delta = gr.Dataframe(
            headers=["id", "mIoU A", "mIoU B", "Δ"], interactive=False, elem_id="delta-table"
        )
        cmp_pick = gr.Dropdown(label="image", elem_id="compare-pick")
        with gr.Row():
            left = gr.Image(label="run A", interactive=False, format="png", elem_id="compare-a")
            right = gr.Image(label="run B", interactive=False, format="png", elem_id="compare-b")
        cmp_img_note = gr.Markdown(elem_id="compare-image-note")

    kw = {"api_visibility": "private", "concurrency_limit": 4}
    filters = [ds_filter, method_filter, text_filter]
    outs = [note, table, run_pick, run_b, ds_filter, method_filter]
    reload.click(refresh, filters, outs, **kw)
    for f in filters:
        f.input(refresh, filters, outs, **kw)
    run_pick.change(pick_run, run_pick, [bars, images, image_pick], **kw)
    images.select(row_selected, None, image_pick, **kw)
    image_pick.change(show_image, [run_pick, image_pick], [img, truth, pred, img_legend, img_note], **kw)
    run_b.change(compare, [run_pick, run_b], [delta, cmp_pick, cmp_note], **kw)
    run_pick.change(compare, [run_pick, run_b], [delta, cmp_pick, cmp_note], **kw)
    cmp_pick.change(compare_image, [run_pick, run_b, cmp_pick], [left, right, cmp_img_note], **kw)
    return refresh, outs
