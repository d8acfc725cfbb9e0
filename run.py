"""lposs_lab's Hydra entry point.

    python run.py dataset=ade20k vm=dino_b8 lp.k=800                       # evaluate a benchmark
    python run.py image=photo.jpg 'classes="cat,dog;puppy,sky"'            # segment your own images

Everything is a config under ``conf/``; see README.md for the tasks and the config groups. Mistakes on the
command line (a group choice, a key, a value, a path) print one ``error: ...`` line and exit with status 2,
in a second or two: they are checked before torch, Lightning or a model is imported.
"""

import importlib.util
import sys


def _missing_lab_package() -> str | None:
    """The first of the lab's packages that is not installed (looked up without importing any)."""
    for name in ("hydra", "omegaconf", "pytorch_lightning", "torchmetrics", "datasets", "wandb"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


if (_missing := _missing_lab_package()) is not None:  # `pip install lposs_lab` is the library only
    print(f"error: run.py needs the lab ({_missing} is not installed): pip install 'lposs_lab[lab]'",
          file=sys.stderr)
    sys.exit(2)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from lposs_lab.lab.tasks import objective, run_task

    # a sweeper that optimises (hparams_search=optuna) reads the metric named by optimized_metric
    return objective(run_task(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    from lposs_lab.lab.tasks.hydra_errors import one_line_hydra_errors

    with one_line_hydra_errors():
        main()
