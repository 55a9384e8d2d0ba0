"""The labels table: read (TSV/CSV/Parquet, local or s3://), filter, ids, targets, splits, groups.

The table is read as text so class names match what the file says ("healthy", "1", "TRUE"). For the
filter only, a typed copy turns bool-ish columns (TRUE/FALSE, yes/no) into booleans and numeric
columns into numbers, so ``retinal_oct == True`` and ``age > 40`` mean what they say. Missing cells are
empty, ``n/a``, ``NA``, ``nan``, ``None`` or ``null`` (in the id column only empty cells are).

Each step raises one DataError naming the key and the fix; :func:`load_table` runs them all, and
`medctl check data` runs them one by one to report every problem.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from medctl.config import DataConfig, TargetConfig
from medctl.data.splits import SPLIT_ALIASES, make_splits, normalize_split
from medctl.errors import DataError
from medctl.storage import fetch

NA_TOKENS = {"", "n/a", "na", "nan", "none", "null", "<na>"}
TRUE_TOKENS = {"true", "yes"}
FALSE_TOKENS = {"false", "no"}
RESERVED_COLUMNS = {
    "id", "source_id", "slice_index", "source_key", "mask_key", "n_files", "fingerprint", "split", "group",
    "status", "stage", "error", "shape", "orig_shape", "spacing", "origin", "direction", "cache_affine",
    "has_mask", "dtype",
}  # fmt: skip


@dataclass(frozen=True)
class TargetSpec:
    """One prediction target: ``classes`` in output order (binary: [negative, positive]; regression: none)."""

    name: str
    kind: str  # binary | multiclass | multilabel | regression
    classes: list[str]

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind in ("binary", "regression") else len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> TargetSpec:
        return cls(str(value["name"]), str(value["kind"]), [str(c) for c in value["classes"]])


@dataclass
class LabelTable:
    """One row per sample: ``id``, ``split``, ``group`` and one column per target (encoded)."""

    frame: pd.DataFrame
    specs: list[TargetSpec]
    source: str
    sha256: str


# ------------------------------------------------------------------------------------------ read
def read_table(data: DataConfig) -> tuple[pd.DataFrame, str]:
    """The table as text (every cell a str or NA) and the SHA-256 of its bytes."""
    if not data.table:
        raise DataError("data.table is empty: set it to a .tsv, .csv or .parquet file (local or s3://)")
    path, _ = fetch(
        data.table,
        download_dir=data.download_dir,
        endpoint_url=data.source.endpoint_url,
        retries=data.source.retries,
    )
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    name = data.table.lower().removesuffix(".gz")
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
            frame = frame.apply(lambda col: col.map(_cell_text)).astype(object)
        else:
            sep = "," if name.endswith(".csv") else "\t"
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, compression="infer")
            frame.columns = [str(c).strip() for c in frame.columns]
            frame = frame.apply(lambda col: col.map(_clean_cell))
            frame = frame.astype(object)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{data.table}: not a readable table ({type(exc).__name__}: {exc})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{data.table}: the table has no rows")
    return frame.reset_index(drop=True), sha


def _clean_cell(value: object) -> object:
    """Cells are text as written: "NA", "None", "null" can be ids or classes (a severity grade "None");
    only a cell the table leaves empty is missing."""
    text = str(value).strip()
    return text if text else pd.NA


def _cell_text(value: object) -> object:
    """Parquet cells as the text a TSV would hold: 1.0 -> "1", True -> "true", None -> NA."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return pd.NA
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return _clean_cell(value)


def _is_number_or_flag(value: object) -> bool:
    """A cell a boolean or numeric column may hold: empty, NA-like, true/false/yes/no or a number."""
    if value is pd.NA:
        return True
    text = str(value).lower()
    if text in NA_TOKENS | TRUE_TOKENS | FALSE_TOKENS:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy for the filter: bool-ish text -> booleans, numeric text -> numbers, the rest unchanged.

    In a column of booleans or numbers, NA-like text ("NA", "n/a", "null", ...) is a missing value; in a
    text column it stays text, so ``grade == "None"`` selects a class named None.
    """
    out = {}
    for column in frame.columns:
        values = frame[column]
        if values.map(_is_number_or_flag).all():
            values = values.map(lambda v: pd.NA if v is not pd.NA and str(v).lower() in NA_TOKENS else v)
        present = values.dropna().map(lambda v: str(v).lower())
        if len(present) and present.isin(TRUE_TOKENS | FALSE_TOKENS).all():
            out[column] = values.map(lambda v: pd.NA if v is pd.NA else str(v).lower() in TRUE_TOKENS)
            out[column] = out[column].astype("boolean")
            continue
        numbers = pd.to_numeric(values, errors="coerce")
        if len(present) and numbers.notna().sum() == len(present):
            out[column] = numbers
        else:
            out[column] = values
    return pd.DataFrame(out, index=frame.index)


# ---------------------------------------------------------------------------------------- filter
def apply_filter(frame: pd.DataFrame, expression: str, source: str = "data.table") -> pd.DataFrame:
    """Keep the rows where ``expression`` (pandas query syntax, on typed columns) is true."""
    if not expression.strip():
        return frame
    try:
        mask = typed(frame).eval(expression, engine="python")
    except (SyntaxError, NameError, KeyError, TypeError, ValueError, AttributeError) as exc:
        columns = ", ".join(map(str, frame.columns))
        raise DataError(
            f"data.filter = {expression!r} cannot be evaluated ({type(exc).__name__}: {exc}); "
            f"columns: {columns} (quote odd names with backticks)"
        ) from exc
    if not isinstance(mask, pd.Series) or len(mask) != len(frame):
        raise DataError(
            f"data.filter = {expression!r} is not a condition on rows (e.g. 'retinal_oct == True')"
        )
    try:
        keep = mask.astype("boolean").fillna(False).astype(bool)
    except (TypeError, ValueError) as exc:
        raise DataError(f"data.filter = {expression!r} gives {mask.dtype} values, not true/false") from exc
    filtered = frame[keep.to_numpy()].reset_index(drop=True)
    if filtered.empty:
        raise DataError(f"data.filter = {expression!r} drops every one of the {len(frame)} rows of {source}")
    return filtered


# --------------------------------------------------------------------------------------- columns
def required_columns(data: DataConfig) -> dict[str, str]:
    """Column -> the config key that names it."""
    needed = {data.id_column: "data.id_column"}
    if data.split_column:
        needed[data.split_column] = "data.split_column"
    if data.group_column:
        needed[data.group_column] = "data.group_column"
    for i, target in enumerate(data.targets):
        if target.kind == "multilabel":
            for column in target.columns:
                needed.setdefault(column, f"data.targets[{i}].columns")
        else:
            needed.setdefault(target.column, f"data.targets[{i}].column")
    return needed


def check_columns(frame: pd.DataFrame, data: DataConfig) -> None:
    missing = [(c, key) for c, key in required_columns(data).items() if c not in frame.columns]
    if missing:
        listed = "; ".join(f"`{c}` ({key})" for c, key in missing)
        raise DataError(
            f"{data.table}: missing column(s) {listed}; the table has: {', '.join(frame.columns)}"
        )


# ------------------------------------------------------------------------------------------- ids
def read_ids(frame: pd.DataFrame, data: DataConfig) -> list[str]:
    """The id column as unique, non-empty strings usable as file names."""
    ids = frame[data.id_column]
    empty = ids.isna()
    if empty.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(empty)[:5])
        raise DataError(f"{data.table}: empty {data.id_column} (data.id_column) on line(s) {rows}")
    ids = ids.astype(str).tolist()
    counts = pd.Series(ids).value_counts()
    duplicated = counts[counts > 1]
    if len(duplicated):
        shown = ", ".join(f"{i} (x{n})" for i, n in duplicated.head(5).items())
        raise DataError(
            f"{data.table}: duplicate ids in {data.id_column}: {shown}; each row must be one sample"
        )
    bad = [i for i in ids if "/" in i or "\\" in i or i in {".", ".."}]
    if bad:
        raise DataError(f"{data.table}: id {bad[0]!r} cannot name a cache file (no '/' or '\\'); rename it")
    return ids


# --------------------------------------------------------------------------------------- targets
def encode_target(
    frame: pd.DataFrame, target: TargetConfig, index: int, ids: list[str]
) -> tuple[list, TargetSpec]:
    """Per-row class index (binary/multiclass) or 0/1 list (multilabel), and the target's spec."""
    key = f"data.targets[{index}]"
    if target.name in RESERVED_COLUMNS:
        raise DataError(f"{key}.name = {target.name!r} clashes with a manifest column; rename the target")
    if target.kind == "multilabel":
        return _encode_multilabel(frame, target, key, ids)
    if target.kind == "regression":
        return _encode_regression(frame, target, key, ids)
    values = frame[target.column]
    missing = values.isna().to_numpy()
    if missing.any():
        shown = ", ".join(np.asarray(ids)[missing][:5])
        raise DataError(
            f"column {target.column!r} ({key}.column) is empty for {int(missing.sum())} id(s) ({shown}); "
            f'fill them or drop those rows with data.filter (e.g. "{target.column}.notna()")'
        )
    text = values.astype(str)
    classes = list(target.classes) or _sorted_classes(text.unique().tolist())
    if target.kind == "binary" and len(classes) != 2:
        raise DataError(
            f"{key} is binary but column {target.column!r} has classes {classes}; "
            f"list the two classes (negative, positive) in {key}.classes"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(text) - set(lookup))
    if unknown:
        value = unknown[0]
        shown = ", ".join(np.asarray(ids)[(text == value).to_numpy()][:3])
        near = [c for c in classes if c.lower() == value.lower()]
        hint = (
            f"; did you mean {near[0]!r}?" if near else "; add it there or drop those rows with data.filter"
        )
        raise DataError(
            f"unknown class value {value!r} in column {target.column!r} (ids {shown}); "
            f"{key}.classes = {classes}{hint}"
        )
    return [lookup[v] for v in text], TargetSpec(target.name, target.kind, classes)


def _encode_multilabel(
    frame: pd.DataFrame, target: TargetConfig, key: str, ids: list[str]
) -> tuple[list, TargetSpec]:
    classes = list(target.classes) or list(target.columns)
    if len(classes) != len(target.columns):
        raise DataError(
            f"{key}.classes has {len(classes)} names for {len(target.columns)} columns; give one per column"
        )
    matrix = np.zeros((len(frame), len(target.columns)), dtype=int)
    for j, column in enumerate(target.columns):
        for row, value in enumerate(frame[column]):
            flag = _flag(value)
            if flag is None:
                raise DataError(
                    f"column {column!r} ({key}.columns) holds {value if value is pd.NA else repr(value)} for id "
                    f"{ids[row]}; multilabel columns hold 0/1 (or true/false)"
                )
            matrix[row, j] = flag
    return [list(map(int, row)) for row in matrix], TargetSpec(target.name, "multilabel", classes)


def _encode_regression(
    frame: pd.DataFrame, target: TargetConfig, key: str, ids: list[str]
) -> tuple[list, TargetSpec]:
    """Per-row float values of a numeric column; an empty or non-numeric cell names its id."""
    values = frame[target.column]
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    bad = numbers.isna().to_numpy() | ~np.isfinite(numbers.to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        shown = values.iloc[row]
        raise DataError(
            f"column {target.column!r} ({key}.column) holds {shown if shown is pd.NA else repr(shown)} for id "
            f"{ids[row]} ({int(bad.sum())} such row(s)); a regression target needs a number in every row "
            f'(drop them with data.filter, e.g. "{target.column}.notna()")'
        )
    return numbers.tolist(), TargetSpec(target.name, "regression", [])


def _flag(value: object) -> int | None:
    if value is pd.NA:
        return None
    text = str(value).strip().lower()
    if text in {"1", "1.0"} | TRUE_TOKENS:
        return 1
    if text in {"0", "0.0"} | FALSE_TOKENS:
        return 0
    return None


def _sorted_classes(values: list[str]) -> list[str]:
    """Sorted distinct values; numerically when they are all numbers ("2" before "10")."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def stratification_labels(labels: dict[str, list], specs: list[TargetSpec]) -> np.ndarray | None:
    """The first classification target's label matrix (regression targets are not stratified)."""
    first = next((s for s in specs if s.kind != "regression"), None)
    return label_matrix(labels[first.name], first) if first is not None else None


def label_matrix(labels: list, spec: TargetSpec) -> np.ndarray:
    """(N, L) one-hot (binary/multiclass) or multi-hot (multilabel) matrix, for stratification."""
    if spec.kind == "multilabel":
        return np.asarray(labels, dtype=float).reshape(len(labels), len(spec.classes))
    return np.eye(len(spec.classes))[np.asarray(labels, dtype=int)]


# ---------------------------------------------------------------------------------- splits/groups
def read_groups(frame: pd.DataFrame, data: DataConfig, ids: list[str]) -> list[str]:
    if not data.group_column:
        return list(ids)
    values = frame[data.group_column]
    if values.isna().any():
        shown = ", ".join(np.asarray(ids)[values.isna().to_numpy()][:5])
        raise DataError(f"column {data.group_column!r} (data.group_column) is empty for id(s) {shown}")
    return values.astype(str).tolist()


def read_splits(frame: pd.DataFrame, data: DataConfig, ids: list[str]) -> list[str]:
    """Splits from ``data.split_column`` (train/val/test; validation/valid/dev -> val)."""
    raw = frame[data.split_column]
    splits = [normalize_split(v) if v is not pd.NA else None for v in raw]
    bad = [(i, v) for i, v, s in zip(ids, raw, splits, strict=True) if s is None]
    if bad:
        accepted = ", ".join(sorted(set(SPLIT_ALIASES)))
        shown = ", ".join(f"{i}: {v if v is pd.NA else repr(v)}" for i, v in bad[:3])
        raise DataError(
            f"column {data.split_column!r} (data.split_column) has {len(bad)} value(s) that are not a split "
            f"({shown}); accepted: {accepted}"
        )
    return splits  # type: ignore[return-value]


def assign_splits(
    frame: pd.DataFrame, data: DataConfig, ids: list[str], groups: list[str], labels: np.ndarray | None
) -> list[str]:
    if data.split_column:
        return read_splits(frame, data, ids)
    return list(make_splits(groups, labels, data.split_ratios, data.split_seed))


def find_leaks(splits: list[str], groups: list[str]) -> dict[str, list[str]]:
    """Groups (subjects) that appear in more than one split -> the splits they appear in."""
    seen: dict[str, set[str]] = {}
    for split, group in zip(splits, groups, strict=True):
        seen.setdefault(group, set()).add(split)
    return {g: sorted(s) for g, s in seen.items() if len(s) > 1}


# ------------------------------------------------------------------------------------------- all
def load_table(data: DataConfig) -> LabelTable:
    """Read, filter and encode the table; generate (or read) splits. Raises the first DataError."""
    raw, sha = read_table(data)
    check_columns(raw, data)
    frame = apply_filter(raw, data.filter, data.table)
    ids = read_ids(frame, data)
    specs, columns = [], {}
    for i, target in enumerate(data.targets):
        values, spec = encode_target(frame, target, i, ids)
        specs.append(spec)
        columns[spec.name] = values
    if len({s.name for s in specs}) != len(specs):
        raise DataError("two data.targets share one name; give each target its own name")
    groups = read_groups(frame, data, ids)
    labels = stratification_labels(columns, specs)
    splits = assign_splits(frame, data, ids, groups, labels)
    out = pd.DataFrame({"id": ids, "split": splits, "group": groups, **columns})
    return LabelTable(out, specs, data.table, sha)
