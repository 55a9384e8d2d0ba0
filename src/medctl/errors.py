"""One exception family for medctl.

The CLI maps every :class:`UserError` to one red line and exit code 2 (the user can fix it: a config
key, a missing file, an unknown class) and every :class:`RunFailure` to exit code 1 (something broke
while running). Library code raises these; it never prints or exits.
"""

from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host; scheme://token@host -> scheme://***@host
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*)(?P<password>:[^/\s@]*)?@")


def redact_url_credentials(text: str) -> str:
    """Hide the credentials of every URL in ``text`` (``http://user:pass@host`` -> ``http://user:***@host``).

    Messages never carry secrets: the CLI passes every line it prints through this (see
    :func:`medctl.storage.redact_secrets`, which also hides the AWS variables' values).
    """

    def hide(match: re.Match[str]) -> str:
        if match["password"] is None:
            return f"{match['scheme']}***@"
        return f"{match['scheme']}{match['user']}:***@"

    return _URL_USERINFO.sub(hide, text)


class MedctlError(Exception):
    """Base class of every error medctl raises on purpose."""

    exit_code = 1


class UserError(MedctlError):
    """Bad input the user can fix: the message names the file or key and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in the resolved configuration, all reported at once."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{source}: {len(self.problems)} problems\n{listed}"
        super().__init__(message)


class DataError(UserError):
    """A table, file or bucket that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


class RunFailure(MedctlError):
    """A failure while running that is not the user's input (exit code 1)."""


class StorageUnavailable(RunFailure):
    """The storage endpoint could not be reached (after the retries): not the data's fault, rerun later."""

    def __init__(self, endpoint: str, reason: str, message: str = ""):
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(message or f"cannot reach {endpoint}: {reason}")
