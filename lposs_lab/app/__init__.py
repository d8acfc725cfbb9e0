"""The third floor: a web app (Gradio) to segment your own images and to browse evaluation runs.

It imports the lab and the library; nothing below imports it. Gradio is an optional extra
(``pip install -e '.[app]'``), imported only when the page is built::

    python -m lposs_lab.app --runs outputs/ --vm dino_b16 --vlm maskclip_b16     # or: lposs-app ...
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m lposs_lab.app`` / ``lposs-app``: see :mod:`lposs_lab.app.__main__`."""
    from .__main__ import main as _main

    return _main(argv)
