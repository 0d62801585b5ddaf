"""Bad input to an evaluation: the entry points print one `error:` line and exit 2 (cli.run_main)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """Input an evaluation cannot score as given; the message says which file/task and which option to change."""
