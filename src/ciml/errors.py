"""Errors that reach users as one clear line (the CLI prints them without a traceback)."""


class CimlError(Exception):
    """Base class for problems with the user's input: a file, a setting, a spec.

    The message must say what is wrong and where (file, key, parameter), since the CLI shows only it.
    """


class ParameterError(CimlError):
    """A function parameter has a value that cannot work; the message names it in API terms.

    ``str(error)`` reads ``"<parameter>: <problem>"``; the CLI shows the same problem under the option
    that sets the parameter (``--patch: ...`` for ``patch_size``), so the mapping lives in one place.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
        self.problem = problem
