"""medctl: from raw medical scans to explained results."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medctl")  # the one place it is written is pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
