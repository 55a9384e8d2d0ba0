"""The typed settings: one pydantic model per config section, with every default and the reason for it."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medctl.config.toml import dump_toml


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = ""  # runs/<name>/; empty: a timestamp
    root: str = "runs"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    # bit-identical reruns for ablations: PyTorch's deterministic algorithms (warn-only where an op has
    # none), cuDNN without autotuning, the cuBLAS workspace variable; slower on GPU, so off by default
    deterministic: bool = False
    # torch CPU threads; 0: the CPUs this process may use (affinity, cgroup quota) minus DataLoader workers
    threads: int = Field(default=0, ge=0)


# ---------------------------------------------------------------------------------------------- data
class SourceConfig(Section):
    root: str = ""  # local folder or s3://bucket/prefix/
    pattern: str = "{id}.nrrd"  # key template under root; {<id_column>} and {id} both name the id
    endpoint_url: str = ""  # else S3_ENDPOINT_URL; credentials never live in config
    mask_root: str = ""  # optional ground-truth masks (same pattern), used to score saliency
    mask_pattern: str = ""  # key template under mask_root; "" uses `pattern`
    retries: int = Field(default=3, ge=0)  # transient S3 failures, with exponential backoff (not 403/404)

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "credentials never live in config: remove user:password@ from the URL and set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
            )
        return value


class TargetConfig(Section):
    name: str
    column: str = ""  # defaults to name
    kind: Literal["binary", "multiclass", "multilabel", "regression"] = "multiclass"
    classes: list[str] = []  # class order; empty: the sorted distinct values
    standardize: bool = True  # regression: train on (y - mean) / std of the training split (stored with the model)
    columns: list[str] = []  # multilabel: one 0/1 column per label
    weight: float = Field(default=1.0, ge=0)  # weight of this target's loss in the sum

    @model_validator(mode="after")
    def _fill_column(self) -> TargetConfig:
        if not self.column and self.kind != "multilabel":
            object.__setattr__(self, "column", self.name)
        if self.kind == "multilabel" and not self.columns:
            raise ValueError("a multilabel target needs `columns`, one 0/1 column per label")
        if self.kind == "binary" and self.classes and len(self.classes) != 2:
            raise ValueError("a binary target lists two classes, [negative, positive]; use kind = \"multiclass\"")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("`classes` lists a class twice")
        if self.kind == "regression" and self.classes:
            raise ValueError("a regression target has no `classes`; remove them or use kind = \"multiclass\"")
        return self


class PreprocessConfig(Section):
    spatial_size: list[int] = [32, 64, 64]  # resize target, (D, H, W) or (H, W); [] keeps the size
    spacing: list[float] = []  # resample to this spacing first (mm); [] skips resampling
    orientation: str = ""  # e.g. "RAS"; "" keeps the stored orientation
    intensity: Literal["zscore", "percentile", "minmax", "none"] = "zscore"
    percentiles: list[float] = [0.5, 99.5]  # clip range for "percentile" (then scaled to [0, 1])
    unsharp: bool = False
    unsharp_sigma: float = Field(default=1.0, gt=0)
    unsharp_amount: float = Field(default=1.0, ge=0)
    slices: Literal["", "axial", "coronal", "sagittal"] = ""  # cut 2D slices from volumes
    slice_count: int = Field(default=1, ge=1)  # slices per volume, evenly spaced around the centre
    workers: int = Field(default=2, ge=1)  # upper bound; fewer when memory is short (see memory_gb)
    memory_gb: float = Field(default=0, ge=0)  # what the workers may use together; 0: memory available now
    # 4D images (time series, echoes): -1 stacks the 4th axis as channels, k >= 0 keeps volume k
    volume_index: int = Field(default=-1, ge=-1)
    dtype: Literal["float16", "float32"] = "float32"

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessConfig:
        problems = []
        if self.spatial_size and (len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 1):
            problems.append("spatial_size needs 2 (H, W) or 3 (D, H, W) positive sizes, or [] to keep the size")
        if self.spacing and (len(self.spacing) not in (2, 3) or min(self.spacing) <= 0):
            problems.append("spacing needs 2 or 3 positive values (mm), or [] to keep the spacing")
        if self.slices and self.spatial_size and len(self.spatial_size) != 2:
            problems.append(
                "with `slices` set, spatial_size is the size of each slice: give (H, W), e.g. spatial_size=[64, 64]"
            )
        if self.slices and self.spacing and len(self.spacing) != 3:
            problems.append("with `slices` set, spacing resamples the volume first: give 3 values (D, H, W)")
        if not self.slices and self.spacing and self.spatial_size and len(self.spacing) != len(self.spatial_size):
            problems.append("spacing and spatial_size need the same number of axes")
        low, high = (self.percentiles + [0.0, 0.0])[:2]
        if len(self.percentiles) != 2 or not 0 <= low < high <= 100:
            problems.append("percentiles needs [low, high] with 0 <= low < high <= 100, e.g. [0.5, 99.5]")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EEGConfig(Section):
    """Recordings -> STFT spectrogram windows (``data.modality = "eeg"``); see medctl.data.spectrogram."""

    channels: list[str] = []  # channel names to keep, in this order; empty: all (a missing name is an error)
    reference: str = ""  # "" keeps the recorded reference; "average", or a channel name (comma-separate several)
    l_freq: float = Field(default=0.0, ge=0)  # band-pass low edge (Hz); 0: no high-pass
    h_freq: float = Field(default=0.0, ge=0)  # band-pass high edge (Hz); 0: no low-pass
    resample_hz: float = Field(default=0.0, ge=0)  # 0 keeps each file's rate (recordings at several rates are refused)
    window_s: float = Field(default=4.0, gt=0)  # each recording -> windows of this length, one cache row each
    hop_s: float = Field(default=2.0, gt=0)  # start-to-start distance of windows (< window_s: they overlap)
    n_fft: int = Field(default=256, ge=8)  # STFT segment length (samples); frequency step = rate / n_fft
    stft_hop: int = Field(default=32, ge=1)  # STFT step (samples); time step = stft_hop / rate
    stft_window: str = "hann"  # any scipy.signal.get_window name
    fmin: float = Field(default=0.0, ge=0)  # keep frequencies in [fmin, fmax] (Hz)
    fmax: float = Field(default=0.0, ge=0)  # 0: up to Nyquist
    log_power: bool = True  # log10 of the power spectral density (else the power itself)
    normalize: Literal["zscore", "none"] = "zscore"  # per window, over all channels and bins
    layout: Literal["channels", "tiled"] = "channels"  # (C, F, T) image channels, or (1, C*F, T) stacked along F
    image_size: list[int] = []  # resize each spectrogram to (H, W) (bilinear), e.g. [32, 32] for unet2d; []: keep
    variable: str = ""  # .mat files: the variable holding the (channels, samples) array
    sfreq: float = Field(default=0.0, ge=0)  # .npy/.mat/.csv files: their sampling rate (Hz), which they do not state
    array_channels: list[str] = []  # .npy/.mat files: channel names (default ch0, ch1, ...); .csv: its header

    @model_validator(mode="after")
    def _consistent(self) -> EEGConfig:
        problems = []
        if self.l_freq and self.h_freq and self.l_freq >= self.h_freq:
            problems.append(f"l_freq ({self.l_freq:g} Hz) must be below h_freq ({self.h_freq:g} Hz)")
        if self.fmax and self.fmin >= self.fmax:
            problems.append(f"fmin ({self.fmin:g} Hz) must be below fmax ({self.fmax:g} Hz)")
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
            problems.append("image_size needs two positive sizes (H = frequency rows, W = time columns), or []")
        if self.stft_hop > self.n_fft:
            problems.append(f"stft_hop ({self.stft_hop}) is longer than n_fft ({self.n_fft}): samples would be skipped")
        if self.resample_hz:
            nyquist = self.resample_hz / 2
            window = int(round(self.window_s * self.resample_hz))
            if window < self.n_fft:
                problems.append(
                    f"window_s = {self.window_s:g} s is {window} samples at {self.resample_hz:g} Hz, shorter than "
                    f"n_fft = {self.n_fft}: lengthen window_s or lower n_fft"
                )
            for key in ("h_freq", "fmax"):
                if getattr(self, key) > nyquist:
                    problems.append(
                        f"{key} = {getattr(self, key):g} Hz is above Nyquist ({nyquist:g} Hz at resample_hz = "
                        f"{self.resample_hz:g}); lower it or raise resample_hz"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DataConfig(Section):
    modality: Literal["image", "eeg"] = "image"  # eeg: recordings -> spectrogram windows ([data.eeg])
    table: str = ""  # local path or s3://bucket/key; .tsv, .csv or .parquet
    id_column: str = "participant_id"
    filter: str = ""  # e.g. "retinal_oct == True"
    split_column: str = ""  # absent: splits are generated with split_ratios / group_column
    split_ratios: list[float] = [0.7, 0.15, 0.15]  # train, val, test
    group_column: str = ""  # one subject never spans two splits
    split_seed: int = 0  # seed of generated splits; they are frozen into the cache manifest
    cache_dir: str = ".medctl/cache"
    download_dir: str = ".medctl/downloads"
    batch_size: int = Field(default=2, ge=1)
    num_workers: int = Field(default=0, ge=0)  # DataLoader workers; 0 is fastest for small caches
    source: SourceConfig = SourceConfig()
    targets: list[TargetConfig] = []
    preprocess: PreprocessConfig = PreprocessConfig()
    eeg: EEGConfig = EEGConfig()
    allow_incomplete: bool = False  # use a cache some samples of which storage could not serve (results.json lists them)

    @field_validator("split_ratios")
    @classmethod
    def _ratios_sum_to_one(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(r < 0 for r in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("split_ratios needs three non-negative numbers (train, val, test) summing to 1")
        return value


# --------------------------------------------------------------------------------------------- model
class HeadConfig(Section):
    kind: Literal["linear", "mlp", "attentive"] = "linear"
    hidden: int = Field(default=0, ge=0)  # MLP width; 0 means linear
    dropout: float = Field(default=0.1, ge=0, lt=1)
    # a frozen encoder's linear or MLP probe reads its embeddings standardised per dimension on the training
    # split (MAE's BatchNorm without affine), folded into the head when saved; off for fine-tunes and
    # attentive heads (which normalise their tokens)
    standardize: bool = True


class ModelConfig(Section):
    # "auto": the architecture model.checkpoint (or a sweep entry's file) was saved with, read from it
    # (medctl/models/architecture.py), so mixed checkpoints need no per-file settings; a random
    # initialisation needs a name from `medctl list models`
    encoder: str = "auto"
    encoder_args: dict[str, Any] = {}  # passed to the builder, e.g. {pos_embed = "rope"}; with "auto", override what is read
    in_channels: int = Field(default=1, ge=1)  # `check checkpoint` only: training reads the cache's channels
    checkpoint: str = ""  # "" is random initialisation
    # "auto" without a checkpoint: a random initialisation of the architecture this file holds (no weights
    # read); a sweep sets it for its random baseline from the first checkpoint it can read
    architecture_from: str = ""
    # "" picks target_encoder, encoder, context_encoder, state_dict, model in that order
    checkpoint_key: str = ""
    allow_partial_load: bool = False
    freeze_encoder: bool = True
    unfreeze_at_epoch: int = -1  # 1-based epoch from which the encoder trains; -1: linear probe only
    head: HeadConfig = HeadConfig()


# --------------------------------------------------------------------------------------------- train
class AugmentConfig(Section):
    """On-the-fly MONAI array transforms of the cached training images (never val/test); 0 disables each."""

    enabled: bool = False
    flip_axes: list[int] = []  # spatial axes to flip at random, e.g. [0, 1, 2] ((D, H, W)) or [0, 1] ((H, W))
    flip_prob: float = Field(default=0.5, ge=0, le=1)  # per listed axis
    rotate_degrees: float = Field(default=0.0, ge=0)  # small rotations, uniform in [-deg, deg] about each axis
    rotate_prob: float = Field(default=0.5, ge=0, le=1)
    intensity_jitter: float = Field(default=0.0, ge=0)  # scale by 1 + U(-j, j), shift by U(-j, j) (z-scored units)
    intensity_prob: float = Field(default=0.5, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0)  # Gaussian noise, std drawn in [0, noise_std]
    noise_prob: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: float = Field(default=0.0, ge=0)  # Gaussian blur, sigma drawn in [sigma / 2, sigma] voxels
    blur_prob: float = Field(default=0.2, ge=0, le=1)
    crop_scale: float = Field(default=1.0, gt=0, le=1)  # random crop keeping >= this share per axis, resized back
    crop_prob: float = Field(default=0.5, ge=0, le=1)


class GridConfig(Section):
    """``train.grid``: one probe head per combination of these values, trained together on each batch; the
    best on the selection split is kept (V-JEPA 2's attentive probe: 5 lr x 4 wd heads; DINOv2; CT-FM).
    An empty list takes the single value ``train.lr_head`` / ``train.weight_decay``; both empty: no grid."""

    lr_head: list[Annotated[float, Field(gt=0)]] = []
    weight_decay: list[Annotated[float, Field(ge=0)]] = []

    @field_validator("lr_head", "weight_decay")
    @classmethod
    def _distinct(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values):
            raise ValueError("lists a value twice; give each value once")
        return values

    @property
    def enabled(self) -> bool:
        return bool(self.lr_head or self.weight_decay)


class TrainConfig(Section):
    epochs: int = Field(default=50, ge=1)
    lr_head: float = Field(default=1e-3, gt=0)
    lr_encoder: float = Field(default=3e-5, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=2, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    loss: Literal["cross_entropy", "focal", "bce"] = "cross_entropy"
    class_weights: Literal["auto", "none"] | list[float] = "auto"
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: Literal["dynamic", "none"] | float | list[float] = "dynamic"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    regression_loss: Literal["mse", "huber", "l1"] = "mse"  # regression targets, on the standardised scale
    huber_delta: float = Field(default=1.0, gt=0)  # in standard deviations when the target is standardised
    # per-task loss weights: a table target -> weight (unlisted targets: data.targets[].weight), or "uncertainty"
    # for weights learned with the task's homoscedastic uncertainty (Kendall et al. 2018)
    task_weights: Literal["uncertainty"] | dict[str, float] = {}
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast on CUDA only
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    # a validation metric: accuracy, balanced_accuracy, macro_f1, auroc or loss (with several targets these are
    # means over targets, and <target>_<metric> names one, e.g. val_age_mae); regression targets have mae, rmse,
    # r2, pearson_r; higher is better unless it is a loss or an error (mae, rmse)
    monitor: str = "balanced_accuracy"
    patience: int = Field(default=10, ge=0)  # 0 disables early stopping
    # an inner split file (id, inner_split = inner_train | inner_val; `medctl sweep` writes one under
    # sweep.select_on = "inner_val"): fit on inner_train and pick the epoch on inner_val, both carved from the
    # train split, so val and test select nothing. "" : fit on train, pick the epoch on val
    inner_split: str = ""
    feature_cache: bool = True  # linear probe trains on cached embeddings, not the encoder
    # an attentive probe caches every token (float16, memory-mapped, under <data cache>/features/); when the
    # train + val tokens would take more than this many GB (or more than the free disk), the frozen encoder
    # runs every epoch instead. A ViT-L at [64, 384, 384] gives 18,432 x 1024 tokens, 38 MB per volume
    feature_cache_max_gb: float = Field(default=100.0, ge=0)
    log_every: int = Field(default=50, ge=0)  # steps between train_step rows in metrics.jsonl; 0: epochs only
    bootstrap: int = Field(default=1000, ge=0)  # `medctl evaluate`: resamples for the 95% CIs; 0 skips them
    augment: AugmentConfig = AugmentConfig()
    # a grid of probe heads, e.g. { lr_head = [1e-4, 1e-3, 1e-2], weight_decay = [0.0, 1e-2] }: one head per
    # combination, each with its own optimiser state, early stopping and best epoch; the best on the selection
    # split (val, or inner_val) is kept (ties: the smaller lr). {} trains the one head of lr_head and weight_decay
    grid: GridConfig = GridConfig()


# ------------------------------------------------------------------------------------------ pretrain
class PretrainConfig(Section):
    """What every method shares: the optimisation, the EMA schedule, monitoring, the subset. Each method's own
    settings are its table ``[pretrain.<method>]`` (``[pretrain.byol]``, ...), typed and defaulted by the
    method's module (``medctl.pretrain.<method>``) and validated by :mod:`medctl.pretrain` with the rest of
    the config: this layer keeps the tables as tables and leaves them to it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "byol"  # a registered method (`medctl list methods`); checked by the pretrain layer
    epochs: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: int = Field(default=2, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: float = Field(default=1.0, ge=0)
    log_every: int = Field(default=50, ge=0)  # steps between train_step rows in metrics.jsonl; 0: epochs only
    # target networks (byol, jepa) follow the online ones with a cosine momentum schedule from start to end
    ema_momentum: float = Field(default=0.99, ge=0, le=1)
    ema_momentum_end: float = Field(default=1.0, ge=0, le=1)
    # monitoring: every N epochs (0 disables)
    monitor_every: int = Field(default=1, ge=0)
    tsne_every: int = Field(default=0, ge=0)
    knn_every: int = Field(default=1, ge=0)
    monitor_samples: int = Field(default=256, ge=2)  # per split: a fixed, seeded subset keeps monitoring cheap
    # the collapse verdict, on even with monitoring off: the embeddings' spread against the same encoder before
    # pretraining, and the online k-NN against chance, after `collapse_check_epoch` epochs, at the end, and with
    # monitoring on at every monitored epoch in between
    collapse_check: bool = True
    collapse_check_epoch: int = Field(default=3, ge=1)  # early enough to stop a doomed run, late enough to move
    collapse_ratio: float = Field(default=0.1, gt=0, le=1)  # collapsed below this share of the spread before
    stop_on_collapse: bool = False  # stop at a failed verdict (checkpoints kept, exit 1); see the README
    subset: str = ""  # pretrain on a subset of train: "fraction:0.5" (seeded) or "column:value" (manifest column)


# keys of the one flat [pretrain] namespace that moved into their method's table: history, for the one-line
# error that names the new place (a new method adds nothing here)
_BYOL_KEYS = (
    "reconstruction_weight rotation_weight jigsaw_weight jigsaw_permutations rotation_plane view_crop_scale "
    "view_flip_prob view_intensity_jitter view_noise_std view_blur_prob view_blur_sigma"
)
_MIM_KEYS = (
    "patch_size mask_ratio temperature contrastive_weight mim_weight halves_unsharp_amount halves_unsharp_sigma "
    "halves_intensity_jitter halves_noise_std halves_blur_prob halves_blur_sigma halves_crop_scale"
)
_JEPA_KEYS = (
    "predictor_dim predictor_depth predictor_heads mask_blocks mask_block_scale mask_aspect_ratio mask_depth_scale "
    "export_vjepa2"
)
MOVED_KEYS: dict[str, tuple[str, ...]] = {
    **{f"pretrain.{k}": (f"pretrain.byol.{k}",) for k in _BYOL_KEYS.split()},
    **{f"pretrain.{k}": (f"pretrain.mim_contrastive.{k}",) for k in _MIM_KEYS.split()},
    **{f"pretrain.{k}": (f"pretrain.jepa.{k}",) for k in _JEPA_KEYS.split()},
    **{f"pretrain.{k}": (f"pretrain.byol.{k}", f"pretrain.mim_contrastive.{k}") for k in ("projector_dim", "projector_hidden")},
}


# --------------------------------------------------------------------------------------------- sweep
SweepMode = Literal["linear_probe", "finetune", "both"]  # a probe per checkpoint, a fine-tune, or probes then fine-tunes
SWEEP_MODES: tuple[str, ...] = get_args(SweepMode)


class SweepConfig(Section):
    checkpoints: list[str] = []
    checkpoint_dir: str = ""
    checkpoint_glob: str = "*.pt*"  # files in checkpoint_dir (.pt, .pth, .ckpt via "*")
    mode: SweepMode = "linear_probe"
    random_baseline: bool = True
    jobs: int = Field(default=1, ge=1)
    finetune_top: int = Field(default=1, ge=0)  # "both": fine-tune this many of the probe leaders
    bootstrap: int = Field(default=1000, ge=0)  # resamples for the CIs and the p-values vs the leader; 0 skips them
    # fine-tune entries (<stem>_ft): the heads train alone in epochs 1 .. k-1, the encoder joins at epoch k
    # (epochs count from 1; 0 or 1: the encoder trains from the first epoch)
    finetune_unfreeze_at_epoch: int = Field(default=0, ge=0)
    # key=value items for fine-tune entries only (e.g. "train.epochs=30", "train.augment.enabled=true");
    # data.* and run.* are refused: every entry reads the same cache
    finetune_overrides: list[str] = []
    # a text file of the participant ids a foreign checkpoint (one without medctl provenance) was pretrained on,
    # one per line; finetune, sweep and `check data` count the val/test participants among them ("" : unknown)
    pretrain_ids: str = ""
    # the split the leaderboard ranks on. Each probe picks its best epoch on val (train.monitor), so val
    # flatters every entry; "test" ranks on held-out samples that selected nothing
    rank_on: Literal["test", "val"] = "test"
    # the metric the leaderboard ranks on (and mode "both" picks fine-tunes by, on val): "<metric>" of the primary
    # (first) target or "<target>_<metric>", a headline metric of `medctl evaluate` (balanced_accuracy, macro_f1,
    # auroc, accuracy; regression: mae, rmse, r2, pearson_r). "": train.monitor's metric, the one that picked each
    # probe's epoch (a loss, which evaluate does not report: the primary target's balanced accuracy, or MAE).
    # Errors (mae, rmse) rank lower first, every other metric higher first
    rank_by: str = ""
    # the samples that pick each entry's epoch (train.monitor): "val", or "inner_val", a share of the train
    # split carved once per sweep (seeded by data.split_seed, grouped by subject, stratified; frozen in
    # <sweep dir>/inner_split.csv), so that rank_on = "val" ranks on samples that selected nothing and test
    # stays untouched for the final figure
    select_on: Literal["val", "inner_val"] = "val"
    inner_val_share: float = Field(default=0.2, gt=0, lt=1)  # select_on = "inner_val": train's share carved off
    # run every entry once per seed: run.seed of its probe (and of the random baseline's initial weights);
    # "{seed}" in a checkpoint path picks the pretraining run of that seed. The leaderboard shows the mean and
    # std over seeds and a paired t-test across seeds; [] runs each entry once, at run.seed
    seeds: list[int] = []

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("lists a seed twice; give distinct seeds, e.g. [0, 1, 2]")
        return value


# ------------------------------------------------------------------------------------------ saliency
class SaliencyConfig(Section):
    methods: list[str] = ["integrated_gradients", "gradcam"]
    split: str = "test"
    # true: explain each sample's labelled class, so the pointing game asks where the evidence for its lesion
    # is (Zhang et al. 2016; a misclassified sample's "pred" map explains the other class); pred | a class name
    target: str = "true"
    max_samples: int = Field(default=8, ge=1)  # samples of the split whose maps are written (NRRD, PNG)
    # score every lesion sample of the split (scoring needs the map, not its files); false: only the written
    score_all_lesions: bool = True
    alpha: float = Field(default=0.05, gt=0, lt=1)  # level of every paired test behind "beats"
    ig_steps: int = Field(default=32, ge=2)
    occlusion_window: list[Annotated[int, Field(ge=1)]] = Field(default=[4, 8, 8], min_length=1)  # voxels per spatial axis
    occlusion_stride: list[Annotated[int, Field(ge=1)]] = Field(default=[4, 8, 8], min_length=1)
    randomisation_check: bool = True
    # the check recomputes each map with a re-initialised model: on every scored lesion sample (the paired
    # pointing test against random weights) and on the first few samples of any class (rank correlation)
    randomisation_samples: int = Field(default=4, ge=1)
    # full: every weight re-initialised (Adebayo et al.'s end point); top: heads + last encoder block only
    randomisation_scope: Literal["full", "top"] = "full"
    # Spearman rho at or above which a method is flagged as input-driven, unless the paired random-weight test
    # shows its maps depend on the weights (see saliency/scoring.py for why 0.5)
    randomisation_threshold: float = Field(default=0.5, gt=0, le=1)
    pointing_tolerance: int = Field(default=0, ge=0)  # voxels the pointing-game mask is grown by
    # deletion curve (faithfulness): a grid of deletion_grid patches per axis, removed in deletion_steps groups
    deletion: bool = True
    deletion_grid: int = Field(default=8, ge=2)
    deletion_steps: int = Field(default=16, ge=2)
    internal_batch_size: int = Field(default=0, ge=0)  # IG/occlusion batch; 0 sizes it to fit memory
    memory_budget_gb: float = Field(default=0.0, ge=0)  # for that sizing; 0: 80% of free CUDA, 2 GiB CPU
    # encoder module the CAMs read, e.g. "layer3" or "stem.1"; "" lets each CAM method choose its own on the
    # held-out check (saliency/layers.py); "last" the encoder's own last spatial layer
    gradcam_layer: str = ""
    # with gradcam_layer "": lesion samples held out from the reported ones (val; train when val is reported)
    # on which each CAM method scores the deepest map sizes to choose its layer; 0: the resolution rule alone
    cam_check_samples: int = Field(default=8, ge=0)


# ------------------------------------------------------------------------------------------ tracking
class TrackingConfig(Section):
    """Experiment tracking beside TensorBoard (which stays on): one tracked run per run folder.

    Credentials never live here: W&B reads WANDB_API_KEY or ``wandb login``, MLflow its MLFLOW_TRACKING_*
    variables; neither is written to a run folder or printed."""

    backend: Literal["none", "mlflow", "wandb"] = "none"  # needs `uv sync --extra tracking`
    project: str = "medctl"  # the W&B project, or the MLflow experiment
    run_name: str = ""  # "": run.name (a sweep entry: <sweep>/<entry>)
    tags: dict[str, str] = {}  # MLflow tags; W&B labels "key:value"
    # every n-th train_step row of metrics.jsonl is sent (epoch rows always are); 1 sends what TensorBoard gets
    log_every: int = Field(default=1, ge=1)
    uri: str = ""  # MLflow server or store; "": MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db)
    log_checkpoints: bool = False  # best.ckpt / encoder.ckpt as artifacts (they can be GBs)


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sweep: SweepConfig = SweepConfig()
    saliency: SaliencyConfig = SaliencyConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_toml(self) -> str:
        return dump_toml(self.model_dump(mode="json"))
