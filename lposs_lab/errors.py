"""Exception types: what the user asked for (one line, exit 2 on the command line) versus everything else.

:class:`UserError` is the base of every problem with the user's request: a bad config value, a missing
dataset folder, an unreadable image, missing weights, a checkpoint that does not fit the model, CUDA
requested on a machine without it. The command line prints these as ``error: <message>`` and exits with
status 2. Any other exception is a bug and keeps its traceback.

The concrete types also derive from the builtin that matches their meaning (``ValueError`` for bad values,
``RuntimeError`` for an environment that cannot do what was asked), so ``except ValueError`` keeps working
for library callers.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "ConfigError",
    "ImageError",
    "WeightsUnavailableError",
    "WeightsMismatchError",
    "DeviceUnavailableError",
    "OutputError",
]


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown or out of its valid range (the message names key, value, range)."""


class ImageError(UserError, ValueError):
    """An image (or label map) is missing, unreadable, truncated, empty or of an unsupported kind."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Model weights are not cached and cannot be fetched (offline, no network, missing local file).

    Attributes (when the weights come from the hub): ``kind`` (``vm``/``vlm``), ``name``, ``repo_id``,
    ``reason``, ``where`` (the cache folder), so several missing checkpoints can be reported in one line.
    """

    def __init__(self, message: str, **details: str) -> None:
        super().__init__(message)
        self.details = details

    @classmethod
    def combine(cls, errors: list[WeightsUnavailableError]) -> WeightsUnavailableError:
        """One error naming every missing checkpoint of ``errors`` and the two ways out."""
        if len(errors) == 1 or not all(e.details for e in errors):
            return errors[0] if len(errors) == 1 else cls("; ".join(str(e) for e in errors))
        models = " and ".join(
            f"{e.details['kind']} '{e.details['name']}' ({e.details['repo_id']})" for e in errors
        )
        flags = " ".join(f"{e.details['kind']}.pretrained=PATH" for e in errors)
        first = errors[0].details
        return cls(
            f"weights unavailable for {models}: not in {first['where']} and cannot be downloaded "
            f"({first['reason']}); cache them once with network access (HF_HOME), "
            f"or pass local files: {flags}"
        )


class WeightsMismatchError(UserError, RuntimeError):
    """A checkpoint does not fit the model architecture (missing/unexpected keys, shape mismatches)."""


class DeviceUnavailableError(UserError, RuntimeError):
    """A device was requested that this machine does not have (e.g. ``cuda`` without CUDA)."""


class OutputError(UserError, OSError):
    """An output location cannot be written (below a file, read-only, no permission)."""
