"""Errors users see. Each names where the problem is (file, line, field or config key)."""


class KubetuneError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(KubetuneError):
    """A setting is unknown, of the wrong type or impossible; the message names the key."""


class DataError(KubetuneError):
    """Input data is unusable; the message names file, line (or row) and field."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        if len(self.problems) == 1:  # one problem, one line
            super().__init__(self.problems[0])
            return
        super().__init__(f"invalid data ({len(self.problems)} problem(s)):\n{text}")


class StageError(KubetuneError):
    """A stage failed for a reason the user can act on (message says what to change)."""
