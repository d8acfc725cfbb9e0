"""lposs_lab's evaluation lab, built on the library below it (``lposs_lab``), which never imports it.

Benchmarks and their datasets (:mod:`~lposs_lab.lab.data`), torchmetrics metrics, per-image records and the
resumable state store, tables and the report CLI (``python -m lposs_lab.lab.report``), the feature cache, the
Lightning module and data module, callbacks, and the Hydra tasks behind ``run.py``
(:mod:`~lposs_lab.lab.tasks`, the only code that reads a Hydra config).
"""
