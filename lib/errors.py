"""Error types for bad user input, in a module with no heavy imports so models and data code can raise them.

Every subclass of `UserError` is shown by `lib.runtime.cli_main` as one line without a traceback
(set DEBUG=1 to see it). Raise the most specific one; the message names the key, file or value.
"""

from __future__ import annotations


class UserError(RuntimeError):
    """Bad input from the user (data, weights, config): shown as one line, no traceback."""


class DataError(UserError):
    """A dataset folder, annotation or image that is missing, corrupt or out of range."""


class ModelError(UserError):
    """A model option or weight layout that cannot be built or mapped."""
