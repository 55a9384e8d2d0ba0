"""``medctl saliency``: a trained classifier's attribution maps on cached samples or on one raw scan.

The checkpoint alone suffices: it rebuilds the classifier, names its targets and classes, records how
its training data was preprocessed, and holds the resolved config of its training run, whose
``[data]`` section says where the cache is and whose ``[saliency]`` section gives the defaults. A
config file (``-c``) and ``key=value`` overrides are layered on top, as for ``medctl evaluate``.

Steps: load the classifier -> resolve the config -> pick the target and the methods -> pick the samples
-> :func:`medctl.saliency.pipeline.run_saliency` (maps, NRRDs, panels, scores, ``index.csv``). The samples
are one of:

- a split of the cache (``split``, default ``saliency.split``): the maps of its first
  ``saliency.max_samples`` are written, with their masks and the manifest's source geometry, and every
  other lesion sample of the split is scored as well (``saliency.score_all_lesions``; scoring needs the
  map, not its files), so that the hit rate covers the split's lesions and the report says how many;
- ``ids`` from the cache, any split (a source id cut into slices selects all its slices);
- ``input_path``: one raw file (or a DICOM series folder, local or ``s3://``) read with the data
  readers and preprocessed exactly as the checkpoint's cache was, its own geometry kept so the maps
  resample back onto it; ``mask_path`` optionally gives its ground-truth mask for scoring. It has no
  label, so ``target = "true"`` explains its predicted class (and says so).

Each CAM method's layer, unless ``saliency.gradcam_layer`` names one, is chosen on a held-out check: up
to ``saliency.cam_check_samples`` lesion samples of the val split (of train when val is the split being
explained; never an explained id) score the deepest map sizes, and the best pointing one for that method
is read. Without
such samples (or for an ``--input`` scan) it is chosen for the size of the lesions: their median extent is
measured on up to :data:`EXTENT_MASKS` masks of the cache's training split (or on the ``--input`` scan's
mask); see :mod:`medctl.saliency.layers`.

Output goes to ``<run dir of the checkpoint>/saliency_<split | ids | input stem>/`` unless ``out_dir``
says otherwise; the resolved config is written there as ``config.toml``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medctl.config import Config, PreprocessConfig, checkpoint_config
from medctl.data.dataset import CacheDataset, check_cache_fits
from medctl.data.preprocess import ensure_cache, read_manifest
from medctl.data.readers import read_image
from medctl.data.tables import TargetSpec
from medctl.data.transforms import preprocess_image, validate_image
from medctl.errors import CheckpointError, DataError, UserError
from medctl.io import write_text_atomic
from medctl.models.checkpoints import load_classifier
from medctl.progress import log
from medctl.saliency.attribution import resolve_methods
from medctl.saliency.layers import lesion_extent
from medctl.saliency.pipeline import SaliencyResult, run_saliency
from medctl.saliency.samples import check_target
from medctl.storage import fetch, is_remote
from medctl.tracking import connect
from medctl.training.precision import resolve_device, set_threads

EXTENT_MASKS = 32  # training masks read to measure the lesions' size for the CAM layer choice


@dataclass
class SaliencyStageResult:
    """Where the maps went and what :func:`run_saliency` returned (``.result.scores``: per method)."""

    out_dir: Path
    result: SaliencyResult
    n_samples: int
    checkpoint: Path
    target_name: str
    samples: str  # what was explained: "test split", "ids", "input scan.nrrd"

    @property
    def index_path(self) -> Path:
        return self.result.index_path

    @property
    def scores_path(self) -> Path:
        return self.result.scores_path


def run_saliency_stage(
    checkpoint: str | Path,
    *,
    split: str | None = None,
    ids: Sequence[str] | None = None,
    input_path: str | Path | None = None,
    methods: Sequence[str] | None = None,
    target: str | None = None,
    out_dir: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    max_samples: int | None = None,
    target_name: str | None = None,
    mask_path: str | Path | None = None,
) -> SaliencyStageResult:
    """Explain the classifier in ``checkpoint`` on a split, on cached ids or on one raw scan.

    At most one of ``split``, ``ids`` and ``input_path``; none means ``saliency.split``. ``methods``,
    ``target`` (``pred`` | ``true`` | a class name) and ``max_samples`` default to ``[saliency]`` of the
    checkpoint's config layered with ``config_file`` and ``overrides``; ``target_name`` to the first
    target of the checkpoint. See the module docstring for the samples and the output folder.
    """
    checkpoint = Path(checkpoint)
    given = [flag for flag, value in (("--split", split), ("--ids", ids), ("--input", input_path)) if value]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both choose the samples; give one of --split, --ids, --input")
    if mask_path is not None and input_path is None:
        raise UserError("--mask scores the map of an --input scan; cached samples bring their own masks")

    classifier, meta = load_classifier(checkpoint)
    config = checkpoint_config(meta, checkpoint, None, config_file, overrides)
    tracker = connect(config.tracking, kind="saliency")
    chosen = {"methods": list(methods)} if methods else {}
    if target:
        chosen["target"] = target
    settings = config.saliency.model_copy(update=chosen)
    resolve_methods(settings.methods)  # an unknown method fails before the cache is read
    specs = [TargetSpec.from_dict(t) for t in meta.get("targets") or []]
    spec = choose_target(specs, target_name, checkpoint)
    check_target(settings.target, spec.classes, spec.name)
    device = resolve_device(config.run.device)
    set_threads(config.run.threads, config.data.num_workers)
    preprocessing = meta.get("preprocessing") or {}
    lesions_in_split = None

    if input_path is not None:
        samples: Sequence[Mapping[str, Any]] = input_samples(
            input_path, mask_path, preprocessing, config, checkpoint
        )
        what, folder = f"input {Path(str(input_path)).name}", f"saliency_{file_stem(input_path)}"
        extent = lesion_extent(np.asarray(s["mask"])[0] for s in samples if "mask" in s)
        check, check_source = None, ""
        if settings.target == "true":  # a raw scan carries no label
            log("saliency: an --input scan has no label, so its maps explain the predicted class")
            settings = settings.model_copy(update={"target": "pred"})
    else:
        cache = ensure_cache(config.data)
        check_cache_fits(cache, specs, preprocessing, checkpoint)
        extent = lesion_extent(training_masks(cache, EXTENT_MASKS))
        if ids:
            samples = CachedSamples.from_ids(cache, ids, spec.name)
            what, folder = "ids", "saliency_ids"
        else:
            split = split or settings.split
            limit = settings.max_samples if max_samples is None else max_samples
            if limit < 1:
                raise UserError(f"--max-samples {limit}: explain at least one sample")
            samples = CachedSamples.from_split(cache, split, spec.name, limit, settings.score_all_lesions)
            lesions_in_split = samples.lesions_in_split
            what, folder = f"{split} split", f"saliency_{split}"
        check_split = "train" if split == "val" else "val"
        n_check = 0 if settings.gradcam_layer else settings.cam_check_samples  # a named layer needs no check
        check = CachedSamples.lesions(
            cache, check_split, spec.name, n_check, exclude={str(i) for i in ids or ()}
        )
        check_source = f"{check_split} split"

    out = Path(out_dir) if out_dir is not None else run_dir_of(checkpoint) / folder
    result = run_saliency(
        classifier,
        samples,
        classes=spec.classes,
        target_name=spec.name,
        kind=spec.kind,  # type: ignore[arg-type]
        out_dir=out,
        settings=settings,
        device=device,
        cam_target_extent=extent,
        cam_check=check if check is not None else (),
        cam_check_source=check_source,
        lesions_in_split=lesions_in_split,
    )
    write_text_atomic(out / "config.toml", config.model_copy(update={"saliency": settings}).to_toml())
    tracker.begin(out, source_run=run_dir_of(checkpoint))  # into the checkpoint's tracked run, or linked to it
    tracker.finish()
    n_written = len(samples) if not isinstance(samples, CachedSamples) else samples.n_written
    return SaliencyStageResult(out, result, n_written, checkpoint, spec.name, what)


# ------------------------------------------------------------------------------------------ pieces
def choose_target(specs: Sequence[TargetSpec], name: str | None, checkpoint: Path) -> TargetSpec:
    """The target to explain: ``name``, else the checkpoint's first."""
    if not specs:
        raise CheckpointError(f"{checkpoint}: names no targets; pass a classifier from `medctl finetune`")
    if name is None:
        return specs[0]
    for spec in specs:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in specs)
    raise UserError(f"--target-name {name!r}: {checkpoint.name} predicts {known}; pick one of them")


def run_dir_of(checkpoint: Path) -> Path:
    """``runs/x/checkpoints/best.ckpt`` -> ``runs/x``; a checkpoint elsewhere -> its folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def file_stem(path: str | Path) -> str:
    """``scan.nrrd`` -> ``scan``, ``scan.nii.gz`` -> ``scan``, a DICOM folder -> its name."""
    name = Path(str(path).rstrip("/")).name
    for suffix in (".nii.gz", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name).stem or "input"


class CachedSamples:
    """Samples of a cache, loaded one at a time: ``image``, ``id``, the target's label, ``mask`` when
    the cache has one for the sample, and ``geometry`` (the manifest row: source grid + cache affine)."""

    def __init__(self, cache: Path, dataset: CacheDataset, positions: Sequence[int]):
        self.cache = cache
        self.dataset = dataset
        self.positions = list(positions)
        self.n_written = len(self.positions)  # the first n_written have their maps written; the rest are scored
        self.lesions_in_split: int | None = None

    @classmethod
    def from_split(
        cls, cache: Path, split: str, target_name: str, limit: int, score_all_lesions: bool = True
    ) -> CachedSamples:
        """The split's first ``limit`` samples, written; with ``score_all_lesions``, then every other lesion
        sample of the split, scored without writing its files."""
        dataset = CacheDataset(cache, split, [target_name])
        if not len(dataset):
            raise DataError(
                f"{cache}: the {split} split has no samples; pick another with --split (train, val, test)"
            )
        written = list(range(min(limit, len(dataset))))
        lesions = lesion_positions(cache, dataset)
        extra = [p for p in lesions if p >= len(written)] if score_all_lesions else []
        samples = cls(cache, dataset, written + extra)
        samples.n_written = len(written)
        samples.lesions_in_split = len(lesions) if lesions else None
        return samples

    @classmethod
    def from_ids(cls, cache: Path, ids: Sequence[str], target_name: str) -> CachedSamples:
        """Every usable cached sample of each id, in the given order; an id cut into slices brings all
        of its slices. An unknown or failed id is a DataError naming it."""
        dataset = CacheDataset(cache, None, [target_name])
        manifest = dataset.manifest
        source_ids = manifest["source_id"].astype(str) if "source_id" in manifest else manifest["id"]
        positions: list[int] = []
        for sample_id in dict.fromkeys(str(i).strip() for i in ids if str(i).strip()):
            found = np.flatnonzero((manifest["id"].astype(str) == sample_id).to_numpy())
            if not len(found):
                found = np.flatnonzero((source_ids == sample_id).to_numpy())
            if not len(found):
                raise DataError(unknown_id_message(cache, sample_id))
            positions += [int(i) for i in found]
        if not positions:
            raise UserError(
                "--ids is empty: give cached sample ids separated by commas, e.g. --ids sub-001,sub-002"
            )
        return cls(cache, dataset, positions)

    @classmethod
    def lesions(
        cls, cache: Path, split: str, target_name: str, limit: int, exclude: set[str] = frozenset()
    ) -> CachedSamples:
        """Up to ``limit`` samples of ``split`` whose lesion mask is not empty (the held-out check of the CAM
        layer), leaving out the ids in ``exclude``; none when the split has no such sample."""
        dataset = CacheDataset(cache, split, [target_name])
        kept = [p for p in lesion_positions(cache, dataset) if str(dataset.manifest.iloc[p]["id"]) not in exclude]
        positions = kept[:limit]
        return cls(cache, dataset, positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, position in enumerate(self.positions):
            item = dict(self.dataset[position])
            row = self.dataset.manifest.iloc[position]
            if bool(row.get("has_mask", False)):
                item["mask"] = torch.from_numpy(
                    np.load(self.cache / "masks" / f"{item['id']}.npy")
                )  # (1, *S)
            item["geometry"] = row.to_dict()
            item["write"] = index < self.n_written
            yield item


def lesion_positions(cache: Path, dataset: CacheDataset) -> list[int]:
    """Positions of ``dataset``'s samples whose lesion mask is not empty."""
    positions = []
    for position, row in enumerate(dataset.manifest.itertuples(index=False)):
        has_mask = getattr(row, "has_mask", False)
        if has_mask == has_mask and bool(has_mask):  # NaN: no mask
            if np.load(cache / "masks" / f"{row.id}.npy", mmap_mode="r").any():  # (1, *S)
                positions.append(position)
    return positions


def training_masks(cache: Path, limit: int) -> Iterator[np.ndarray]:
    """Up to ``limit`` lesion masks ``(*S)`` of the cache's training split (any split when it has none)."""
    manifest = read_manifest(cache)
    has_mask = manifest["has_mask"].fillna(False).astype(bool) if "has_mask" in manifest else False
    usable = manifest[(manifest["status"] == "ok") & has_mask]
    train = usable[usable["split"] == "train"]
    found = 0
    for sample_id in (train if len(train) else usable)["id"].astype(str):
        mask = np.load(cache / "masks" / f"{sample_id}.npy")[0]  # (1, *S) -> (*S)
        if mask.any():
            found += 1
            yield mask
        if found >= limit:
            return


def unknown_id_message(cache: Path, sample_id: str) -> str:
    """Why ``sample_id`` cannot be explained: failed in preprocessing, or not in the cache at all."""
    manifest = read_manifest(cache)
    failed = manifest[(manifest["id"].astype(str) == sample_id) & (manifest["status"] != "ok")]
    if len(failed):
        error = failed.iloc[0].get("error", "")
        return f"--ids {sample_id}: failed in preprocessing ({error}); see {cache / 'data_errors.csv'}"
    example = ", ".join(manifest.loc[manifest["status"] == "ok", "id"].astype(str).head(3))
    return f"--ids {sample_id}: no such sample in the cache {cache}; its ids look like {example}"


def input_samples(
    path: str | Path,
    mask_path: str | Path | None,
    preprocessing: Mapping[str, Any],
    config: Config,
    checkpoint: Path,
) -> list[dict[str, Any]]:
    """One raw scan preprocessed as the checkpoint's cache was: one sample, or one per slice."""
    recorded = (preprocessing.get("settings") or {}).get("preprocess")
    settings = PreprocessConfig.model_validate(recorded) if recorded else config.data.preprocess
    image = read_image(local_files(path, config))
    mask = read_image(local_files(mask_path, config)) if mask_path is not None else None
    validate_image(image, settings, what=str(path))
    if mask is not None and mask.spatial_shape != image.spatial_shape:
        raise DataError(
            f"--mask {mask_path}: shape {mask.spatial_shape} differs from the scan's {image.spatial_shape}"
        )
    processed = preprocess_image(image, mask, settings)
    stem = file_stem(path)
    samples = []
    for part in processed:
        array = np.asarray(part.array, dtype=np.float32)  # (C, *S)
        check_input_fits(array.shape, preprocessing, path, checkpoint)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(array),
            "id": f"{stem}_s{part.slice_index}" if part.slice_index >= 0 else stem,
            "geometry": {
                "orig_shape": list(image.array.shape),
                "spacing": list(image.spacing),
                "origin": list(image.origin),
                "direction": np.asarray(image.direction, dtype=float).ravel().tolist(),
                "cache_affine": np.asarray(part.affine, dtype=float).ravel().tolist(),
            },
        }
        if part.mask is not None:
            sample["mask"] = torch.from_numpy(part.mask)  # (1, *S)
        samples.append(sample)
    return samples


def local_files(path: str | Path, config: Config) -> list[Path]:
    """A local path (a DICOM series folder: its files), or a local copy of an ``s3://`` URL."""
    if is_remote(str(path)):
        source = config.data.source
        local, _ = fetch(
            str(path),
            download_dir=config.data.download_dir,
            endpoint_url=source.endpoint_url,
            retries=source.retries,
        )
        return [local]
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: an empty folder; --input takes an image file or a DICOM series folder")
        return files
    if not path.is_file():
        raise DataError(f"{path} not found: check the --input/--mask path")
    return [path]


def check_input_fits(
    shape: Sequence[int], preprocessing: Mapping[str, Any], path: str | Path, checkpoint: Path
) -> None:
    """The preprocessed scan must have the channels and size the classifier was trained on."""
    channels, size = preprocessing.get("in_channels"), preprocessing.get("spatial_size")
    if channels is not None and shape[0] != int(channels):
        raise DataError(
            f"{path}: {shape[0]} channel(s) but {checkpoint.name} was trained on {channels}; "
            "give a scan with the training data's channels"
        )
    if size and list(shape[1:]) != [int(s) for s in size]:
        raise DataError(
            f"{path}: preprocessed to {list(shape[1:])} but {checkpoint.name} takes {list(size)} "
            f"({len(size)}D); give a {len(size)}D scan like its training data"
        )
