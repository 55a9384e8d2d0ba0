"""Labelled synthetic datasets that look like a lab's own, for tests and ``medctl demo``.

Each sample is a smooth "organ" under noise, a smooth multiplicative bias field and a per-volume
intensity scale and offset, so no global statistic gives the class away. The class is carried by local
structures only: class 0 ("healthy") has none; class k > 0 has bright ellipsoidal lesions whose count
and size grow with k. Lesions are round in millimetres, so with spacing (2, 1, 1) they are flat in
voxels, as in a real anisotropic scan. Their ground-truth masks go to a separate folder, aligned
voxel for voxel with the images, so saliency can be scored against them.

With ``distractors=k`` every sample, healthy or not, also carries ``k`` small balls brighter than any
lesion and outside the masks: the class evidence is then no longer the brightest structure, so a map
that merely follows the image's intensity points at the distractors, and one that explains the model
has to find the (dimmer, larger) lesions. (2D images are then scaled into [0, 1] by 1/8 instead of 1/3, so
that the distractors are not clipped to the lesions' level.) Preprocess such data with ``intensity = "minmax"``:
a lesion widens its image's spread, so z-scoring dims the distractors of lesion images and their level alone
tells the class (AUROC 0.94 on 80 2D images, against 0.60 min-max scaled; tests/test_data_synthetic.py).

Layout under ``out_dir``::

    images/<id>.nrrd   int16, gzip, LPS spacing     (dims=2: images/<id>.png, uint8 or uint16)
    masks/<id>.nrrd    uint8 0/1 lesion masks        (dims=2: masks/<id>.png, 0/1)
    png/<id>.png       with slices_png=True (3D): the centre axial slice, and png_masks/<id>.png
    participants.tsv   participant_id, label, recommended_split, retinal_oct, subject_id

Two sessions share a subject (``subject_id``), a class and a split; a few training rows have
``retinal_oct = FALSE`` so that the ``retinal_oct == True`` filter drops them. Seeded and fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medctl.data.readers import write_nrrd
from medctl.data.synthetic_families import (
    COUNT_CLASSES,
    ROD_CLASSES,
    SHAPE_CLASSES,
    TEXTURE_CLASSES,
    count_sample,
    rod_sample,
    shape_sample,
    texture_sample,
)
from medctl.data.synthetic_parts import acquire, coordinates, smooth_noise
from medctl.data.synthetic_parts import organ as make_organ
from medctl.io import write_json

CLASS_NAMES = {
    2: ["healthy", "edema"],
    3: ["healthy", "mild", "severe"],
    4: ["healthy", "mild", "moderate", "severe"],
}
SPLIT_SHARES = (0.6, 0.2, 0.2)  # recommended_split per class: train, val, test
DISTRACTOR_DRAWS = 10  # tries to place a distractor off the lesions with a few voxels (small 2D images)


@dataclass
class SyntheticDataset:
    root: Path
    table: Path
    image_root: Path
    mask_root: Path
    classes: list[str]
    dims: int
    ids: list[str] = field(default_factory=list)
    size: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    pattern: str = "{participant_id}.nrrd"
    cache_dir: Path | None = None
    png_root: Path | None = None  # slices_png=True: centre axial slices as PNG
    png_mask_root: Path | None = None

    def config_overrides(self) -> list[str]:
        """Dotted ``key=value`` overrides (TOML values) pointing a Config at this dataset."""
        kind = "binary" if len(self.classes) == 2 else "multiclass"
        target = f'{{name="label", kind="{kind}", classes={json.dumps(self.classes)}}}'
        overrides = [
            f"data.table={json.dumps(str(self.table))}",
            f"data.id_column={json.dumps('participant_id')}",
            f"data.source.root={json.dumps(str(self.image_root))}",
            f"data.source.pattern={json.dumps(self.pattern)}",
            f"data.source.mask_root={json.dumps(str(self.mask_root))}",
            f"data.split_column={json.dumps('recommended_split')}",
            f"data.filter={json.dumps('retinal_oct == True')}",
            f"data.targets=[{target}]",
            f"data.preprocess.spatial_size={json.dumps(list(self.size))}",
        ]
        if self.cache_dir is not None:
            overrides += [
                f"data.cache_dir={json.dumps(str(self.cache_dir))}",
                f"data.download_dir={json.dumps(str(self.root / 'downloads'))}",
            ]
        return overrides


def make_synthetic_dataset(
    out_dir: str | Path,
    *,
    n: int = 24,
    dims: int = 3,
    size: Sequence[int] = (16, 32, 32),
    n_classes: int | None = None,
    seed: int = 0,
    slices_png: bool = False,
    spacing: Sequence[float] | None = None,
    png_bits: int = 8,
    n_excluded: int = 2,
    cache_dir: str | Path | None = "default",
    distractors: int = 0,
    family: str = "lesion",
    oriented_bias: float = 0.0,
) -> SyntheticDataset:
    """Write ``n`` labelled samples under ``out_dir`` (see the module docstring) and describe them.

    dims: 3 writes NRRD volumes of ``size`` (D, H, W); 2 writes PNG images of ``size[-2:]``.
    spacing: mm per axis; default (2.0, 1.0, 1.0) for volumes and (1.0, 1.0) for images.
    png_bits: 8 or 16, the PNG sample type of 2D images.
    n_excluded: training rows marked retinal_oct FALSE (dropped by the dataset's filter).
    cache_dir: where config_overrides() points data.cache_dir; "default" is ``out_dir/cache``,
    None leaves data.cache_dir alone.
    distractors: bright non-lesion balls per sample, in every class (see the module docstring).
    family: what carries the class: "lesion" (above; ``n_classes`` default 2) or one of
    :mod:`medctl.data.synthetic_families` ("count", "shape", "texture", "rod"), whose classes are fixed.
    oriented_bias: > 0 multiplies every sample by the same ramp ``exp(oriented_bias * y)`` along H, as a
    receive coil on one side does (what lets a rotation head cheat); 0 leaves it out.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {', '.join(FAMILIES)}")
    fixed_classes, sample = FAMILIES[family]
    if fixed_classes and n_classes not in (None, len(fixed_classes)):
        raise ValueError(f"n_classes={n_classes}: the {family} family has {len(fixed_classes)} classes")
    n_classes = len(fixed_classes) if fixed_classes else (n_classes or 2)
    if oriented_bias < 0:
        raise ValueError(f"oriented_bias={oriented_bias}: give 0 (none) or a positive strength")
    if dims not in (2, 3):
        raise ValueError(f"dims={dims}: synthetic data is 2D (PNG) or 3D (NRRD)")
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}: need at least 2 (healthy + one lesion class)")
    if n < 2 * n_classes:
        raise ValueError(f"n={n} is too small for {n_classes} classes; use n >= {2 * n_classes}")
    if distractors < 0:
        raise ValueError(f"distractors={distractors}: give a count of 0 or more")
    if png_bits not in (8, 16):
        raise ValueError(f"png_bits={png_bits}: PNGs are 8- or 16-bit")
    size = tuple(int(s) for s in size)
    size = size[-2:] if dims == 2 else size
    if len(size) != dims or min(size) < 8:
        raise ValueError(f"size={size}: give {dims} sizes of at least 8 voxels")
    spacing = tuple(float(s) for s in (spacing or ((2.0, 1.0, 1.0) if dims == 3 else (1.0, 1.0))))
    if len(spacing) != dims:
        raise ValueError(f"spacing={spacing}: give {dims} values")

    root = Path(out_dir).expanduser().absolute()
    image_root, mask_root = root / "images", root / "masks"
    image_root.mkdir(parents=True, exist_ok=True)
    mask_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = fixed_classes or CLASS_NAMES.get(n_classes, ["healthy", *[f"grade{k}" for k in range(1, n_classes)]])
    rows = _participants(n, n_classes, n_excluded, rng)
    ids = [r["participant_id"] for r in rows]
    suffix = ".nrrd" if dims == 3 else ".png"
    png_root = png_mask_root = None
    if slices_png and dims == 3:
        png_root, png_mask_root = root / "png", root / "png_masks"
        png_root.mkdir(exist_ok=True)
        png_mask_root.mkdir(exist_ok=True)
    for row in rows:
        image, mask = sample(size, spacing, row["class_index"], rng, distractors=distractors, oriented_bias=oriented_bias)
        id_ = row["participant_id"]
        if dims == 3:
            write_nrrd(image_root / f"{id_}{suffix}", image, spacing=spacing)
            write_nrrd(mask_root / f"{id_}{suffix}", mask, spacing=spacing)
            if png_root is not None:
                centre = int(np.argmax(mask.sum(axis=(1, 2)))) if mask.any() else size[0] // 2
                _write_png(png_root / f"{id_}.png", image[centre], 16)
                _write_mask_png(png_mask_root / f"{id_}.png", mask[centre])
        else:
            _write_png(image_root / f"{id_}{suffix}", image, png_bits)
            _write_mask_png(mask_root / f"{id_}{suffix}", mask)
    _write_table(root / "participants.tsv", rows, classes)
    cache = root / "cache" if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    return SyntheticDataset(
        root=root, table=root / "participants.tsv", image_root=image_root, mask_root=mask_root, classes=classes,
        dims=dims, ids=ids, size=size, spacing=spacing, pattern="{participant_id}" + suffix, cache_dir=cache,
        png_root=png_root, png_mask_root=png_mask_root,
    )  # fmt: skip


def described_synthetic_dataset(folder: str | Path, **settings: Any) -> tuple[SyntheticDataset, bool]:
    """:func:`make_synthetic_dataset` into ``folder`` once, and whether it was there already: a second call reads
    the ``dataset.json`` the first wrote instead of rewriting the files (rewritten files would change their
    fingerprints and force the cache to decode them again)."""
    described = Path(folder) / "dataset.json"
    if described.exists():
        fields = json.loads(described.read_text())
        paths = ("root", "table", "image_root", "mask_root", "cache_dir", "png_root", "png_mask_root")
        for key in paths:
            fields[key] = Path(fields[key]) if fields.get(key) else None
        for key in ("size", "spacing"):
            fields[key] = tuple(fields[key])
        return SyntheticDataset(**fields), True
    dataset = make_synthetic_dataset(folder, **settings)
    write_json(described, dataset.__dict__)
    return dataset, False


def _participants(n: int, n_classes: int, n_excluded: int, rng: np.random.Generator) -> list[dict]:
    """Two sessions per subject; classes round-robin over subjects; splits balanced per class."""
    n_subjects = (n + 1) // 2
    subject_class = np.arange(n_subjects) % n_classes
    subject_split = np.empty(n_subjects, dtype=object)
    for k in range(n_classes):
        members = np.flatnonzero(subject_class == k)
        members = members[rng.permutation(len(members))]
        # at least one subject per class in val (from 2 subjects) and in test (from 3)
        n_val = max(1, round(SPLIT_SHARES[1] * len(members))) if len(members) >= 2 else 0
        n_test = max(1, round(SPLIT_SHARES[2] * len(members))) if len(members) >= 3 else 0
        subject_split[members] = "train"
        subject_split[members[:n_val]] = "val"
        subject_split[members[n_val : n_val + n_test]] = "test"
    rows = []
    for i in range(n):
        s = i // 2
        rows.append(
            {
                "participant_id": f"sub-{i + 1:03d}",
                "class_index": int(subject_class[s]),
                "recommended_split": subject_split[s],
                "retinal_oct": "TRUE",
                "subject_id": f"subj-{s + 1:03d}",
            }
        )
    _exclude(rows, n_excluded, n_classes)
    return rows


def _exclude(rows: list[dict], n_excluded: int, n_classes: int) -> None:
    """Mark training rows retinal_oct FALSE, one class at a time, leaving each class a training row."""
    train = [r for r in rows if r["recommended_split"] == "train"]
    by_class = [[r for r in train if r["class_index"] == k] for k in range(n_classes)]
    while n_excluded > 0 and any(len(members) > 1 for members in by_class):
        for members in by_class:
            if n_excluded > 0 and len(members) > 1:
                members.pop()["retinal_oct"] = "FALSE"
                n_excluded -= 1


def synthetic_sample(
    size: tuple[int, ...],
    spacing: tuple[float, ...],
    class_index: int,
    rng: np.random.Generator,
    *,
    distractors: int = 0,
    oriented_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (int16 volume or float 2D image in [0, 1]) and its 0/1 uint8 lesion mask (lesions only:
    ``distractors`` bright balls are added outside it)."""
    dims = len(size)
    grids = coordinates(size)
    extent = np.asarray(size) * np.asarray(spacing)  # mm
    organ, organ_centre, organ_radius = make_organ(grids, rng)
    texture = smooth_noise(size, rng, cells=4) * 0.08
    tissue = np.where(organ, 1.0 + texture, 0.15 + 0.3 * texture)  # organ ~1, background ~0.15
    mask = np.zeros(size, dtype=np.uint8)
    if class_index > 0:
        count = class_index if class_index < 3 else class_index + rng.integers(0, 2)
        for _ in range(int(count)):
            radius_mm = rng.uniform(0.10, 0.14) * extent.min() * (1.0 + 0.35 * (class_index - 1))
            centre = organ_centre + rng.uniform(-0.45, 0.45, dims) * organ_radius
            inside = (
                sum(
                    ((g - c) * (e / 2) / radius_mm) ** 2
                    for g, c, e in zip(grids, centre, extent, strict=True)
                )
                <= 1.0
            )
            mask |= inside & organ
        tissue = np.where(mask > 0, tissue + rng.uniform(1.3, 1.6), tissue)  # lesions ~2.5x the organ
    placed = np.zeros(size, dtype=bool)
    for _ in range(distractors):  # brighter than any lesion, half a lesion's radius, never on one
        for _attempt in range(DISTRACTOR_DRAWS):  # drawn again while it falls on a lesion or between voxels
            radius_mm = rng.uniform(0.05, 0.07) * extent.min()
            centre = organ_centre + rng.uniform(-0.5, 0.5, dims) * organ_radius
            ball = (
                sum(((g - c) * (e / 2) / radius_mm) ** 2 for g, c, e in zip(grids, centre, extent, strict=True))
                <= 1.0
            ) & organ & (mask == 0) & ~placed  # overlapping balls do not add up
            if ball.sum() >= 2**dims:
                break
        placed |= ball
        tissue = np.where(ball, tissue + rng.uniform(2.6, 3.0), tissue)
    # 2D images are [0, 1]: lesions (~2.5x the organ) reach 1 at /3; distractors (~4x) would be clipped to the
    # lesions' level there, so with distractors the scale leaves room for them to stay the brightest
    return acquire(tissue, rng, oriented_bias=oriented_bias, image_top=8.0 if distractors else 3.0), mask


def _write_png(path: Path, image: np.ndarray, bits: int) -> None:
    from PIL import Image as PILImage

    if image.dtype == np.int16:  # a slice of a volume: to [0, 1] first
        image = np.clip(image.astype(np.float32) / 3000.0, 0.0, 1.0)
    top = 255 if bits == 8 else 65535
    pixels = np.round(image * top).astype(np.uint8 if bits == 8 else np.uint16)
    PILImage.fromarray(pixels).save(path)


def _write_mask_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(mask.astype(np.uint8)).save(path)


def _write_table(path: Path, rows: list[dict], classes: list[str]) -> None:
    lines = ["participant_id\tlabel\trecommended_split\tretinal_oct\tsubject_id"]
    for r in rows:
        lines.append(
            f"{r['participant_id']}\t{classes[r['class_index']]}\t{r['recommended_split']}\t"
            f"{r['retinal_oct']}\t{r['subject_id']}"
        )
    path.write_text("\n".join(lines) + "\n")


# family -> (its fixed class names, [] when n_classes chooses them; its sample function)
FAMILIES = {
    "lesion": ([], synthetic_sample),
    "count": (COUNT_CLASSES, count_sample),
    "shape": (SHAPE_CLASSES, shape_sample),
    "texture": (TEXTURE_CLASSES, texture_sample),
    "rod": (ROD_CLASSES, rod_sample),
}
