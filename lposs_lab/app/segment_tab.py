"""The Segment tab and the ``/segment`` API endpoint (Gradio is imported by the caller, :mod:`.ui`)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from lposs_lab.config import LPConfig, PixelConfig
from lposs_lab.errors import UserError
from lposs_lab.predictor import METHODS

from .choices import EXAMPLE_CLASSES, class_presets, examples, vlm_choices
from .engine import METHOD_LABELS, WINDOWS, Engine, Params, Result
from .render import blend, legend_html, save_label_png, save_scores_npz

__all__ = ["build_segment_tab", "RANDOM_BANNER"]

RANDOM_BANNER = (
    "**Random-init weights ({which}): the masks below are meaningless.** They show that the pipeline "
    "runs; start with trained weights (e.g. `--vm dino_b16 --vlm maskclip_b16`) for real masks."
)


def _out_dir(work: Path) -> Path:
    folder = work / "results" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _summary(result: Result, vlm: str) -> dict[str, Any]:
    h, w = result.image.shape[:2]
    return {
        "classes": result.class_names,
        "classes_asked": result.classes,
        "size": [h, w],
        "initial_predictor": vlm,
        "timings": result.timings,
        "features_reused": result.features_reused,
        "unchanged": result.unchanged,
        "random_init": result.random_init,
        "notices": result.notices,
    }


def build_segment_tab(gr: Any, engine: Engine, work: Path) -> None:
    """Components and events of the Segment tab, and the hidden ``/segment`` endpoint, in the open Blocks."""
    lp, px = LPConfig(), PixelConfig()
    presets = class_presets()
    default_window = next(k for k, v in WINDOWS.items() if v[0] == engine.config.window.size)

    def show_error(exc: Exception) -> Exception:
        return gr.Error(str(exc), print_exception=False)

    def run_page(image, classes, vlm, threshold, k, gamma, sigma, r, tau, window):
        params = Params(k=k, gamma=gamma, sigma=sigma, r=r, tau=tau, window=window, threshold=threshold)
        try:
            result = engine.segment(image, classes, vlm=vlm, params=params)
        except UserError as exc:
            raise show_error(exc) from None
        out = _out_dir(work)
        stem = Path(str(image)).stem[:40] or "image"
        files = [str(save_label_png(result.labels[m], out / f"{stem}.{m}.labels.png")) for m in METHODS]
        files.append(str(save_scores_npz(result.scores, result.class_names, out / f"{stem}.scores.npz")))
        overlays = [blend(result.image, result.labels[m]) for m in METHODS]
        headers = {m: METHOD_LABELS[m] for m in METHODS}
        notes = []
        if result.random_init and result.random_init != random_now:  # the top banner says it otherwise
            notes.append(RANDOM_BANNER.format(which=", ".join(result.random_init)))
        notes += [f"Note: {n}" for n in result.notices]
        redone = [METHOD_LABELS[m] for m in METHODS if m not in result.unchanged]
        reuse = "features reused" if result.features_reused else "features computed"
        reuse += "; recomputed: " + (", ".join(redone) or "nothing")
        seconds = sum(t["total"] for m, t in result.timings.items() if m not in result.unchanged)
        notes.append(f"Done in {seconds:.2f} s ({reuse}).")
        return (
            *overlays,
            legend_html(result.class_names, result.labels, headers),
            _summary(result, vlm or engine.vlm),
            files,
            "\n\n".join(notes),
        )

    def run_slider(image, *args):
        if image is None:  # a slider moved before there is an image: nothing to redo
            return [gr.skip()] * 7
        return run_page(image, *args)

    def run_api(image, classes, method):
        method = str(method or "lposs_plus")
        try:
            result = engine.segment(image, classes, methods=[method])
        except UserError as exc:
            raise show_error(exc) from None
        out = _out_dir(work)
        png = save_label_png(result.labels[method], out / "labels.png")
        summary = _summary(result, engine.vlm)
        summary["method"] = method
        return str(png), summary

    random_now = engine.random_init()
    gr.Markdown(RANDOM_BANNER.format(which=", ".join(random_now)) if random_now else "", elem_id="banner")
    with gr.Row():
        image = gr.Image(
            type="filepath", sources=["upload", "clipboard"], label="image", elem_id="input-image", height=320
        )
        with gr.Column():
            classes = gr.Textbox(
                label="classes (',' between classes, ';' between synonyms)",
                placeholder="person;astronaut, flag, rocket, wall;background",
                elem_id="classes",
                lines=2,
            )
            preset = gr.Dropdown(
                choices=["", *presets], value="", label="or a benchmark's vocabulary", elem_id="preset"
            )
            vlm = gr.Dropdown(
                choices=vlm_choices(engine.vlm),
                value=engine.vlm,
                label="initial predictor (VLM)",
                elem_id="vlm",
            )
            threshold = gr.Slider(
                0.0,
                1.0,
                value=0.0,
                step=0.01,
                label="abstain threshold (0: off; pixels below it are unknown)",
                elem_id="threshold",
            )
            button = gr.Button("Segment", variant="primary", elem_id="segment-button")
    with gr.Accordion("advanced: propagation", open=False):
        with gr.Row():
            k = gr.Slider(1, 1000, value=lp.k, step=1, label="k (patch neighbours)", elem_id="k")
            gamma = gr.Slider(0.0, 10.0, value=lp.gamma, step=0.1, label="γ (appearance power)")
            sigma = gr.Slider(0.001, 0.2, value=lp.sigma, step=0.001, label="σ (spatial scale)")
        with gr.Row():
            r = gr.Slider(1, 31, value=px.r, step=2, label="r (pixel window)")
            tau = gr.Slider(0.001, 0.2, value=px.tau, step=0.001, label="τ (pixel colour scale)")
            window = gr.Dropdown(choices=list(WINDOWS), value=default_window, label="window")
    example_files = examples()
    if example_files:
        rows = [[p, EXAMPLE_CLASSES.get(Path(p).name, "")] for p in example_files]
        gr.Examples(examples=rows, inputs=[image, classes], label="examples")
    status = gr.Markdown("", elem_id="status")
    with gr.Row():
        out_images = [
            gr.Image(label=METHOD_LABELS[m], format="png", interactive=False, elem_id=f"out-{m}")
            for m in METHODS
        ]
    legend = gr.HTML(elem_id="legend")
    with gr.Row():
        timings = gr.JSON(label="classes and per-stage seconds", elem_id="timings")
        downloads = gr.File(label="downloads: label maps (PNG) and scores (.npz)", file_count="multiple",
                            interactive=False, elem_id="downloads")  # fmt: skip
    inputs = [image, classes, vlm, threshold, k, gamma, sigma, r, tau, window]
    outputs = [*out_images, legend, timings, downloads, status]
    kw = {"concurrency_id": "model", "api_visibility": "private"}
    button.click(run_page, inputs, outputs, **kw)
    for control in (threshold, k, gamma, sigma, r, tau):
        control.release(run_slider, inputs, outputs, **kw)
    window.input(run_slider, inputs, outputs, **kw)
    preset.input(lambda name: presets.get(name, gr.skip()) if name else gr.skip(), preset, classes,
                 api_visibility="private")  # fmt: skip

    with gr.Row(visible=False):
        api_image = gr.File(type="filepath", label="image")
        api_classes = gr.Textbox(label="classes")
        api_method = gr.Textbox(value="lposs_plus", label="method: " + ", ".join(METHODS))
        api_png = gr.File(label="label map (PNG)")
        api_json = gr.JSON(label="summary")
        api_button = gr.Button("segment (API)")
    api_button.click(
        run_api, [api_image, api_classes, api_method], [api_png, api_json],
        api_name="segment", concurrency_id="model",
    )  # fmt: skip
