"""Errors that reach users as one clear line (the CLI prints them without a traceback)."""


class CimlError(Exception):
    """Base class for problems with the user's input: a file, a setting, a spec.

    The message must say what is wrong and where (file, key, option), since the CLI shows only it.
    """
