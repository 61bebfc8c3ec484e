"""Errors that reach users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

import re
from collections.abc import Callable


class CimlError(Exception):
    """Base class for problems with the user's input: a file, a setting, a spec.

    The message must say what is wrong and where (file, key, parameter), since the CLI shows only it.
    """


class ParameterError(CimlError):
    """A function parameter has a value that cannot work; the message names it in API terms.

    ``str(error)`` reads ``"<parameter>: <problem>"``. The problem may name other parameters as
    ``{name}``: the API shows them as ``name``, and the CLI shows every parameter as the option that sets
    it (``--patch`` for ``patch_size``), so the mapping lives in one place.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        self.problem = problem
        super().__init__(f"{parameter}: {self.render(lambda name: name)}")

    def render(self, spell: Callable[[str], str]) -> str:
        """The problem with every ``{name}`` written as ``spell(name)``."""
        return re.sub(r"\{(\w+)\}", lambda match: spell(match.group(1)), self.problem)
