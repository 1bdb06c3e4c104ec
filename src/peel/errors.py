"""The project's error types: every failure a user can fix is a :class:`PeelError`.

They subclass ``ValueError`` so that code (and the CLI) that already catches ``ValueError``
keeps working, while the fuzz tests can assert that a reader fails *only* with these types:
any other exception escaping a reader is a bug, not a message.
"""

from __future__ import annotations


class PeelError(ValueError):
    """An input, option or output a user can fix; the message names it and the fix."""


class ConfigError(PeelError):
    """A configuration value of the wrong type or range (file, section, key, expected)."""


class OutputError(PeelError):
    """An output path that cannot be written (not a folder, no permission, special file)."""


class InputError(PeelError):
    """An input path that cannot be read as asked (special file, folder, too large a line)."""


class LockError(PeelError):
    """Another live process is using the same run folder."""


class TaskError(RuntimeError):
    """A task failed on a worker (e.g. a Ray task): the message names the task, such as user
    group ``g003``, where it ran and the cause; ``cause`` is the worker's exception."""

    def __init__(self, label: str, cause: BaseException | None, message: str) -> None:
        super().__init__(message)
        self.label = label
        self.cause = cause


__all__ = ["ConfigError", "InputError", "LockError", "OutputError", "PeelError", "TaskError"]
