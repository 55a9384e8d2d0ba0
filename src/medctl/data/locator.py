"""Find each id's file(s) under a root from a key template, against ONE listing of that root.

A template is a path under ``data.source.root`` with the id in braces and optional glob wildcards:
``{id}.nrrd``, ``images/{participant_id}.nii.gz``, ``{participant_id}/*.dcm``, ``**/{id}_T1w.nii.gz``.
``{id}`` and ``{<id_column>}`` both name the id. ``*`` and ``?`` stay inside one folder, ``**`` crosses
folders, ``[abc]`` is a character class.

What counts as one sample, decided per reader:
- DICOM (``.dcm``, ``.dicom``, ``.ima`` or no extension): every match in ONE folder is one series, read
  as one volume. Matches spread over several folders are ambiguous.
- Every other format is one file per sample: two or more matches are ambiguous.
Ids with no match or an ambiguous one are reported (``missing``, ``ambiguous``), never guessed.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from medctl.data.readers import DICOM_SUFFIXES, image_format
from medctl.errors import ConfigError
from medctl.storage import Listing, is_remote

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = "*?["


@dataclass
class Resolution:
    """Each id's matched keys (relative to the root), and the ids that could not be matched."""

    pattern: str
    root: str
    matches: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)

    def problem(self, id_: str) -> str | None:
        """The reason ``id_`` has no usable match, in plain words; None when it has one."""
        if id_ in self.missing:
            found = not_a_file(self.root, expand_template(self.pattern, id_))
            return found or f"no key matches pattern '{expand_template(self.pattern, id_)}' under {self.root}"
        if id_ in self.ambiguous:
            keys = self.ambiguous[id_]
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            return (
                f"{len(keys)} keys match pattern '{expand_template(self.pattern, id_)}' ({shown}); "
                "make data.source.pattern specific enough to match one file (or one DICOM folder)"
            )
        return None


    def tried(self, id_: str) -> str:
        """The key (or key glob) looked for under the root: the pattern with the id filled in."""
        return _unescape(expand_template(self.pattern, id_))


def not_a_file(root: str, concrete: str) -> str:
    """Under a local ``root``: what the glob ``concrete`` names that a listing leaves out (it lists files
    only), i.e. a dangling symlink or a folder named like a scan, in plain words; "" when nothing is there."""
    if is_remote(root):
        return ""
    for hit in sorted(glob.glob(os.path.join(root, concrete), recursive=True)):
        if os.path.islink(hit) and not os.path.exists(hit):
            return f"{hit} is a dangling symlink (to {os.readlink(hit)}); fix or remove the link"
        if os.path.isdir(hit) and not concrete.endswith("/"):
            return f"{hit} is a folder, not an image file; point data.source.pattern at files"
    return ""


def check_template(pattern: str, id_column: str, key: str = "data.source.pattern") -> None:
    """Reject templates without the id or with unknown placeholders (ConfigError naming ``key``)."""
    names = _PLACEHOLDER.findall(pattern)
    unknown = sorted({n for n in names if n not in ("id", id_column)})
    if unknown:
        raise ConfigError(
            [f"`{key}` = {pattern!r}: unknown placeholder {{{unknown[0]}}}; use {{id}} or {{{id_column}}}"]
        )
    if not names:
        raise ConfigError([f"`{key}` = {pattern!r}: no id placeholder; e.g. '{{{id_column}}}.nrrd'"])


def expand_template(pattern: str, id_: str) -> str:
    """The glob for one id: every ``{id}``/``{<id_column>}`` replaced by the id, glob-escaped."""
    escaped = glob.escape(id_)
    return _PLACEHOLDER.sub(lambda _match: escaped, pattern)


def listing_prefix(pattern: str) -> str:
    """The literal folder in front of the first placeholder or wildcard ("images/{id}.nrrd" -> "images/")."""
    cut = len(pattern)
    for i, char in enumerate(pattern):
        if char in "{" + _GLOB_CHARS:
            cut = i
            break
    head = pattern[:cut]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob with folder-aware ``*``/``?``/``**`` into an anchored regex."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(char))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if len(body) == 1:  # glob.escape's "[*]": a literal character
                    out.append(re.escape(body))
                else:
                    negate = body.startswith("!")
                    body = re.sub(r"([\\\[\]^])", r"\\\1", body[1:] if negate else body)
                    out.append(f"[{'^' if negate else ''}{body}]")
                i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return re.compile("".join(out) + r"\Z")


def literal_prefix(glob_pattern: str) -> str:
    """The part of a concrete glob before its first wildcard (what to bisect the listing on)."""
    for i, char in enumerate(glob_pattern):
        if char in _GLOB_CHARS:
            return _unescape(glob_pattern[:i])
    return _unescape(glob_pattern)


def _unescape(text: str) -> str:
    return re.sub(r"\[([*?\[])\]", r"\1", text)


def resolve(ids: Iterable[str], listing: Listing, pattern: str) -> Resolution:
    """Match every id against the listing: one file, one DICOM folder, or a reported problem."""
    resolution = Resolution(pattern=pattern, root=listing.root)
    for id_ in ids:
        concrete = expand_template(pattern, id_)
        regex = glob_to_regex(concrete)
        keys = [k for k in listing.with_prefix(literal_prefix(concrete)) if regex.match(k)]
        if not keys:
            resolution.missing.append(id_)
        elif len(keys) == 1 or is_dicom_series(keys):
            resolution.matches[id_] = tuple(keys)
        else:
            resolution.ambiguous[id_] = keys
    return resolution


def is_dicom_series(keys: list[str]) -> bool:
    """Several DICOM files in one folder: one series (one sample), not ambiguity."""
    folders = {PurePosixPath(k).parent for k in keys}
    return len(folders) == 1 and all(_is_dicom_name(k) for k in keys)


def _is_dicom_name(key: str) -> bool:
    suffix = PurePosixPath(key).suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix == "" and image_format(key) == "dicom")
