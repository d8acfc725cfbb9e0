"""LPOSS / LPOSS+ scores composed by hand from the library's stages, for checking the predictor (tests only).

:func:`scores_by_hand` reads its settings from an :class:`LPOSSConfig` the test writes out itself and calls
the stage functions directly (``refine_patches``, ``stitch_windows``, ``refine_pixels``, ``pixel_features``,
``text_embeddings``); of the predictor it uses only the encoders and :meth:`LPOSS.extract` (decode, resize,
crop windows, encode). So a predictor that ignores a setting, mixes up the joint / per-window graphs, the
whole-image path, the ensemble mean or the synonym maximum gives other numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lposs_lab.config import LPOSSConfig
from lposs_lab.pixels import pixel_features, refine_pixels
from lposs_lab.propagation import propagate_patches
from lposs_lab.text import parse_classes, split_synonyms, text_embeddings
from lposs_lab.windows import patch_positions, stitch_windows

__all__ = ["scores_by_hand"]


@torch.inference_mode()
def scores_by_hand(
    model: Any, config: LPOSSConfig, method: str, image: Any, classes: Sequence[str]
) -> Tensor:
    """``[C, h, w]`` scores before the final resize, as docs/method.md §2-5 compose them for ``config`` and
    ``method``."""
    names = parse_classes(classes)
    synonyms, owner = split_synonyms(names)
    text = text_embeddings(model.vlm, synonyms).float()
    setups = [config.window] + [
        replace(config.window, size=s, stride=st, ensemble=()) for s, st in config.window.ensemble
    ]
    total, size = None, None
    for win in setups:
        feats = model.extract(image, win)
        b, gh, gw, _ = feats.vm.shape
        n = gh * gw
        y = feats.vlm.reshape(b, n, -1) @ text.T  # [B, n, T] initial (MaskCLIP) scores
        if method != "maskclip":
            graph = (feats.vm if config.lp.graph_features == "vm" else feats.vlm).reshape(b, n, -1)
            pos = patch_positions(feats.windows, (gh, gw), feats.patch_size).reshape(b, n, 2)
            lp = config.lp
            if win.joint:  # one graph over every window's patches
                flat = propagate_patches(
                    graph.reshape(b * n, -1), pos.reshape(b * n, 2), y.reshape(b * n, -1), lp
                )
                y = flat.reshape(b, n, -1)
            else:  # one graph per window
                y = torch.stack([propagate_patches(graph[i], pos[i], y[i], lp) for i in range(b)])
        grids = y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
        _, h, w = feats.image.shape
        if method == "lposs_plus":
            px = config.pixel
            feat = None
            if px.feature != "lab":
                depth = model.depth_model(feats.image[None])[0]
                feat = pixel_features(feats.image, depth, px.feature, depth_weight=px.depth_weight)
            stitched = stitch_windows(grids, feats.windows, h, w)
            scores = refine_pixels(feats.image, stitched, features=feat, **px.solver_kwargs())
        elif win.size <= 0:
            scores = grids[0]
        else:
            scores = stitch_windows(grids, feats.windows, h, w)
        # a class scores the maximum over its synonyms
        scores = torch.stack(
            [scores[[i for i, o in enumerate(owner) if o == c]].amax(0) for c in range(len(names))]
        )
        if total is None:
            total, size = scores, scores.shape[1:]
        else:
            if scores.shape[1:] != size:
                scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
            total = total + scores
    assert total is not None
    return total / len(setups)
