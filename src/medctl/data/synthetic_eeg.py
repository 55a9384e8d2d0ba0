"""A synthetic EEG study written as real EDF files, for tests, the benchmark and ``medctl demo --eeg``.

Each subject has one or more resting recordings of a few channels: pink-ish noise plus rhythms whose
power carries the labels, so each target is learnable from a spectrogram and from nothing else:

- ``health`` (binary, healthy | patient): healthy subjects have a strong occipital alpha rhythm
  (10 Hz), patients a strong theta rhythm (6 Hz) instead;
- ``gender`` (binary, F | M): a beta rhythm (20 Hz) on the left channels (F) or the right ones (M);
- ``age`` (regression, years 20-80): the amplitude of a delta rhythm (3 Hz) grows with age.

Amplitudes also vary per recording by a random gain, so absolute power alone does not give a label away.

Layout under ``out_dir``::

    recordings/<recording_id>.edf   EDF (edfio), microvolts, ``sfreq`` Hz, channels CHANNELS
    participants.tsv                recording_id, subject_id, health, gender, age, recommended_split

A subject's recordings share its labels and split; splits are assigned per subject, seeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHANNELS = ["F3", "F4", "C3", "C4", "O1", "O2"]
LEFT, RIGHT = ("F3", "C3", "O1"), ("F4", "C4", "O2")
RHYTHMS_HZ = {"alpha": 10.0, "theta": 6.0, "beta": 20.0, "delta": 3.0}


@dataclass
class SyntheticEEG:
    root: Path
    table: Path
    recording_root: Path
    ids: list[str] = field(default_factory=list)
    sfreq: float = 128.0
    seconds: float = 20.0
    cache_dir: Path | None = None

    def config_overrides(self, targets: tuple[str, ...] = ("health", "gender", "age")) -> list[str]:
        """Dotted ``key=value`` overrides pointing a Config at this study, windows of 4 s every 2 s."""
        known = {
            "health": '{name="health", kind="binary", classes=["healthy", "patient"]}',
            "gender": '{name="gender", kind="binary", classes=["F", "M"]}',
            "age": '{name="age", kind="regression"}',
        }
        overrides = [
            'data.modality="eeg"',
            f"data.table={json.dumps(str(self.table))}",
            'data.id_column="recording_id"',
            'data.group_column="subject_id"',
            'data.split_column="recommended_split"',
            f"data.source.root={json.dumps(str(self.recording_root))}",
            'data.source.pattern="{recording_id}.edf"',
            f"data.targets=[{', '.join(known[t] for t in targets)}]",
            f"data.eeg.resample_hz={self.sfreq:g}",
            "data.eeg.window_s=4.0",
            "data.eeg.hop_s=2.0",
            "data.eeg.n_fft=128",
            "data.eeg.stft_hop=16",
            "data.eeg.fmax=32.0",
        ]
        if self.cache_dir is not None:
            overrides += [
                f"data.cache_dir={json.dumps(str(self.cache_dir))}",
                f"data.download_dir={json.dumps(str(self.root / 'downloads'))}",
            ]
        return overrides


def write_edf(path: str | Path, data_uv: np.ndarray, sfreq: float, channels: list[str]) -> None:
    """Write ``data_uv`` (C, N) microvolts as an EDF file (a ``.bdf`` name: 24-bit BDF), one signal per channel."""
    from edfio import Bdf, BdfSignal, Edf, EdfSignal

    bdf = Path(path).suffix.lower() == ".bdf"
    signal, container = (BdfSignal, Bdf) if bdf else (EdfSignal, Edf)
    limit = float(np.ceil(np.abs(data_uv).max() + 1.0))
    signals = [
        signal(
            row.astype(np.float64), sfreq, label=name, physical_dimension="uV", physical_range=(-limit, limit)
        )
        for row, name in zip(data_uv, channels, strict=True)
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    container(signals).write(Path(path))


def make_eeg_dataset(
    out_dir: str | Path,
    *,
    n_subjects: int = 24,
    recordings_per_subject: int = 2,
    seconds: float = 20.0,
    sfreq: float = 128.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> SyntheticEEG:
    """Write the study (see the module docstring) and return where everything is."""
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    recordings = root / "recordings"
    rows = []
    splits = _subject_splits(n_subjects, rng)
    for s in range(n_subjects):
        subject = f"sub-{s:03d}"
        health = "healthy" if s % 2 == 0 else "patient"
        gender = "F" if (s // 2) % 2 == 0 else "M"
        age = float(np.round(rng.uniform(20, 80), 1))
        for r in range(recordings_per_subject):
            recording_id = f"{subject}_run-{r + 1}"
            data = synthetic_recording(health, gender, age, seconds, sfreq, rng)
            write_edf(recordings / f"{recording_id}.edf", data, sfreq, CHANNELS)
            rows.append(f"{recording_id}\t{subject}\t{health}\t{gender}\t{age:g}\t{splits[s]}")
    table = root / "participants.tsv"
    table.write_text(
        "recording_id\tsubject_id\thealth\tgender\tage\trecommended_split\n" + "\n".join(rows) + "\n"
    )
    ids = [row.split("\t")[0] for row in rows]
    return SyntheticEEG(root, table, recordings, ids, sfreq, seconds, Path(cache_dir) if cache_dir else None)


def synthetic_recording(
    health: str, gender: str, age: float, seconds: float, sfreq: float, rng: np.random.Generator
) -> np.ndarray:
    """(C, N) microvolts: 1/f noise plus the label-carrying rhythms of the module docstring."""
    n = int(round(seconds * sfreq))
    t = np.arange(n) / sfreq  # (N,)
    white = rng.normal(size=(len(CHANNELS), n))
    spectrum = np.fft.rfft(white, axis=1)
    freqs = np.fft.rfftfreq(n, 1 / sfreq)
    spectrum /= np.sqrt(np.maximum(freqs, 1.0))  # pink-ish background
    data = np.fft.irfft(spectrum, n, axis=1) * 8.0  # (C, N)
    gain = rng.uniform(0.7, 1.4)
    for c, name in enumerate(CHANNELS):

        def wave(hz: float, amp: float) -> np.ndarray:
            return amp * np.sin(2 * np.pi * (hz + rng.normal(0, 0.2)) * t + rng.uniform(0, 2 * np.pi))

        rhythm = wave(RHYTHMS_HZ["alpha"], 6.0 if health == "healthy" else 1.0)
        rhythm += wave(RHYTHMS_HZ["theta"], 1.0 if health == "healthy" else 6.0)
        beta_side = LEFT if gender == "F" else RIGHT
        rhythm += wave(RHYTHMS_HZ["beta"], 4.0 if name in beta_side else 0.5)
        rhythm += wave(RHYTHMS_HZ["delta"], 1.0 + 9.0 * (age - 20.0) / 60.0)
        data[c] += rhythm
    return data * gain


def _subject_splits(n_subjects: int, rng: np.random.Generator) -> list[str]:
    """train/val/test per subject, 60/20/20, balanced over the four health x gender cells."""
    splits = [""] * n_subjects
    for cell in range(4):
        members = [s for s in range(n_subjects) if (s % 2) + 2 * ((s // 2) % 2) == cell]
        members = list(rng.permutation(members))
        n_val = n_test = max(1, round(0.2 * len(members))) if len(members) >= 3 else 0
        for i, s in enumerate(members):
            splits[s] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return splits
