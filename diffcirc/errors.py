"""The package's input-error base class.

An ``InputError`` is a broken input found while working (corrupt or mismatched weights, a dataset
without a readable image, an output folder of another configuration or held by another run): its
message names the file and says what to do. The CLI prints it in one line; anything else is a bug
and keeps its traceback. Each layer subclasses it where the error is raised, so this module
imports nothing of the package.
"""


class InputError(ValueError):
    """An input that cannot be used as it is; the message names it and says what to do."""
