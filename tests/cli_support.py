"""What several CLI tests read from a command's output."""

from __future__ import annotations


def one_error_line(result) -> str:
    """A command refused with exit 2 and exactly one ``error:`` line (log lines before it carry no prefix);
    its whole output on one line, for substring checks across the console's wrapping."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("error:", "failed:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return " ".join(result.output.split())
