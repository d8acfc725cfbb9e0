"""lposs_lab's Hydra entry point: ``python run.py task=segment image=... 'classes="a,b"'``.

Everything is a config under ``conf/``; see README.md for the tasks and the config groups.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from lposs_lab.lab.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
