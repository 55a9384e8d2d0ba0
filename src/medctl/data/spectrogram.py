"""One EEG recording -> many STFT spectrogram windows, each a 2D image for a 2D encoder.

The recipe (every step configured in ``[data.eeg]``):

1. re-reference (``reference``: ``"average"`` or channel names) on all channels, so a reference
   channel need not be kept;
2. select ``channels`` by name, in the order given (a missing name is an error naming what the file has);
3. band-pass (``l_freq``/``h_freq``, MNE's FIR filter) and resample (``resample_hz``);
4. cut windows of ``window_s`` seconds every ``hop_s`` seconds (a recording shorter than one window fails);
5. per window and channel, the power spectral density by STFT (``scipy.signal.spectrogram`` with
   ``n_fft``, ``stft_hop``, ``stft_window``), cropped to ``[fmin, fmax]``, ``log10`` when ``log_power``,
   z-scored per window when ``normalize = "zscore"``;
6. ``layout = "channels"``: ``(C, F, T)``, channels as image channels; ``"tiled"``: ``(1, C*F, T)``, the
   channels' spectrograms stacked along frequency.

Each window's manifest row keeps the geometry of its image: ``spacing = (Hz per row, s per column)``
and ``origin = (first frequency, time of the first column from the recording's start)``, so maps over
a window have axes in Hz and seconds; ``channels`` and ``sfreq`` (after resampling) describe the signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import signal

from medctl.config import EEGConfig
from medctl.errors import DataError


@dataclass
class Window:
    """One cached spectrogram and its manifest row."""

    array: np.ndarray  # (C, F, T) or (1, C*F, T)
    row: dict[str, Any]


def check_rate(eeg: EEGConfig, sfreq: float, what: str) -> None:
    """Settings a recording at ``sfreq`` Hz cannot honour (window vs n_fft, Nyquist): DataError."""
    nyquist = sfreq / 2
    window = int(round(eeg.window_s * sfreq))
    problems = []
    if window < eeg.n_fft:
        problems.append(
            f"window_s = {eeg.window_s:g} s is {window} samples at {sfreq:g} Hz, shorter than n_fft = {eeg.n_fft}; "
            "lengthen data.eeg.window_s or lower data.eeg.n_fft"
        )
    for key in ("h_freq", "fmax", "l_freq", "fmin"):
        value = getattr(eeg, key)
        if value >= nyquist if key in ("l_freq", "fmin") else value > nyquist:
            problems.append(
                f"data.eeg.{key} = {value:g} Hz is not below Nyquist ({nyquist:g} Hz at {sfreq:g} Hz); "
                "lower it or set data.eeg.resample_hz higher"
            )
    if problems:
        raise DataError(f"{what}: " + "; ".join(problems))


def expected_image_size(eeg: EEGConfig) -> tuple[int, int] | None:
    """(H, W) of every cached spectrogram when the settings alone fix it; None when it depends on the
    recordings (their sampling rate without ``resample_hz``, their channel count when tiled without
    ``channels``). Mirrors :func:`spectrogram_windows`: ``scipy.signal.spectrogram`` without padding."""
    if eeg.image_size:
        return (int(eeg.image_size[0]), int(eeg.image_size[1]))
    if not eeg.resample_hz or (eeg.layout == "tiled" and not eeg.channels):
        return None
    sfreq = float(eeg.resample_hz)
    freqs = np.fft.rfftfreq(eeg.n_fft, 1.0 / sfreq)
    n_freqs = int(((freqs >= eeg.fmin) & (freqs <= (eeg.fmax or sfreq / 2))).sum())
    n_times = 1 + (int(round(eeg.window_s * sfreq)) - eeg.n_fft) // eeg.stft_hop
    return (n_freqs * (len(eeg.channels) if eeg.layout == "tiled" else 1), n_times)


def prepare_signal(raw, eeg: EEGConfig, what: str):
    """Steps 1-3 on an ``mne.io.Raw`` (changed in place and returned); :func:`check_finite` it first."""
    if eeg.reference:
        ref = "average" if eeg.reference == "average" else [c.strip() for c in eeg.reference.split(",")]
        missing = [c for c in ref if c not in raw.ch_names] if ref != "average" else []
        if missing:
            raise DataError(
                f"{what}: reference channel(s) {', '.join(missing)} (data.eeg.reference) not in the recording; "
                f"it has: {', '.join(raw.ch_names)}"
            )
        raw.set_eeg_reference(ref, projection=False, verbose="error")
    if eeg.channels:
        missing = [c for c in eeg.channels if c not in raw.ch_names]
        if missing:
            raise DataError(
                f"{what}: channel(s) {', '.join(missing)} (data.eeg.channels) not in the recording; "
                f"it has: {', '.join(raw.ch_names)}"
            )
        raw.pick(list(eeg.channels), verbose="error")
        raw.reorder_channels(list(eeg.channels))
    sfreq = float(raw.info["sfreq"])
    check_rate(eeg, eeg.resample_hz or sfreq, what)
    if eeg.l_freq or eeg.h_freq:
        if eeg.h_freq and eeg.h_freq >= sfreq / 2:
            raise DataError(
                f"{what}: data.eeg.h_freq = {eeg.h_freq:g} Hz is not below the file's Nyquist ({sfreq / 2:g} Hz)"
            )
        raw.filter(eeg.l_freq or None, eeg.h_freq or None, picks="all", verbose="error")
    if eeg.resample_hz and eeg.resample_hz != sfreq:
        raw.resample(eeg.resample_hz, verbose="error")
    return raw


def check_finite(raw, eeg: EEGConfig, what: str) -> None:
    """DataError naming each used channel that holds NaN or infinite samples, with how many and from when
    (the band-pass would spread them over every window, and the windows would be cached as valid).

    Used: every channel under an average reference, else the kept ones (``channels``, default all) and the
    reference channels. A recording with gaps is skipped, not patched: a window of invented samples would
    teach a model what the recording never said. Reads one channel at a time (no copy of the recording)."""
    wanted = set(raw.ch_names) if eeg.reference == "average" or not eeg.channels else {*eeg.channels}
    if eeg.reference and eeg.reference != "average":
        wanted |= {c.strip() for c in eeg.reference.split(",")}
    sfreq = float(raw.info["sfreq"])
    found = []
    for name in [c for c in raw.ch_names if c in wanted]:
        bad = ~np.isfinite(raw.get_data(picks=[name])[0])  # (N,)
        if bad.any():
            count = "all" if bad.all() else f"{int(bad.sum())} of {bad.size}"
            found.append(f"{name} ({count} samples, from {np.argmax(bad) / sfreq:.2f} s)")
    if found:
        raise DataError(
            f"{what}: NaN or infinite samples in channel(s) {', '.join(found)}; the recording has gaps: "
            "export it again, or leave the channel out of data.eeg.channels"
        )


def spectrogram_windows(data: np.ndarray, sfreq: float, eeg: EEGConfig, what: str) -> tuple[np.ndarray, dict]:
    """Steps 4-6 on ``data`` (C, N) at ``sfreq`` Hz: the windows (W, C', F', T) and their axes.

    Returns ``(images, axes)`` with ``axes = {"freqs": (F,), "times": (T,) within a window, "starts": (W,) s}``.
    """
    n_channels, n_samples = data.shape
    length = int(round(eeg.window_s * sfreq))
    hop = max(1, int(round(eeg.hop_s * sfreq)))
    if n_samples < length:
        raise DataError(
            f"{what}: the recording lasts {n_samples / sfreq:.2f} s, shorter than one window "
            f"(data.eeg.window_s = {eeg.window_s:g} s)"
        )
    starts = np.arange(0, n_samples - length + 1, hop)  # (W,) first sample of each window
    windows = np.stack([data[:, s : s + length] for s in starts])  # (W, C, L)
    freqs, times, power = signal.spectrogram(
        windows,
        fs=sfreq,
        window=eeg.stft_window,
        nperseg=eeg.n_fft,
        noverlap=eeg.n_fft - eeg.stft_hop,
        detrend=False,
        scaling="density",
        mode="psd",
        axis=-1,
    )  # power (W, C, F, T)
    keep = (freqs >= eeg.fmin) & (freqs <= (eeg.fmax or sfreq / 2))
    if not keep.any():
        raise DataError(
            f"{what}: no STFT frequency in [{eeg.fmin:g}, {eeg.fmax:g}] Hz; widen data.eeg.fmin/fmax"
        )
    freqs, power = freqs[keep], power[:, :, keep, :]
    if eeg.log_power:
        power = np.log10(np.maximum(power, np.finfo(np.float64).tiny))
    if eeg.normalize == "zscore":
        mean = power.mean(axis=(1, 2, 3), keepdims=True)
        std = power.std(axis=(1, 2, 3), keepdims=True)
        power = (power - mean) / np.where(std > 0, std, 1.0)
    if eeg.layout == "tiled":
        power = power.reshape(len(starts), 1, n_channels * len(freqs), len(times))  # (W, 1, C*F, T)
    axes = {"freqs": freqs, "times": times, "starts": starts / sfreq}
    if eeg.image_size:
        power, axes = _resize(power, axes, eeg.image_size, eeg.layout == "tiled")
    return power.astype(np.float32), axes


def _resize(power: np.ndarray, axes: dict, size: list[int], tiled: bool) -> tuple[np.ndarray, dict]:
    """Bilinear resize of (W, C, F, T) to (W, C, H, W'); the axes follow (bin centres of the new grid)."""
    import torch
    from torch.nn.functional import interpolate

    resized = interpolate(torch.from_numpy(power), size=tuple(size), mode="bilinear", align_corners=False)
    freqs, times = axes["freqs"], axes["times"]

    def centres(values: np.ndarray, n: int) -> np.ndarray:
        step = (values[1] - values[0]) if len(values) > 1 else 1.0
        low, span = values[0] - step / 2, step * len(values)
        return low + (np.arange(n) + 0.5) * span / n

    if not tiled:
        freqs = centres(freqs, size[0])
    return resized.numpy(), {**axes, "freqs": freqs, "times": centres(times, size[1])}


def recording_windows(raw, eeg: EEGConfig, source_id: str, dtype: str, what: str) -> list[Window]:
    """A prepared recording's windows with their manifest rows (ids ``<source_id>_w<k>``)."""
    sfreq = float(raw.info["sfreq"])
    data = raw.get_data()  # (C, N)
    images, axes = spectrogram_windows(data, sfreq, eeg, what)
    freqs, times = axes["freqs"], axes["times"]
    df = float(freqs[1] - freqs[0]) if len(freqs) > 1 else sfreq / eeg.n_fft
    dt = float(times[1] - times[0]) if len(times) > 1 else eeg.stft_hop / sfreq
    out = []
    for k, (image, start) in enumerate(zip(images, axes["starts"], strict=True)):
        spacing = [df, dt]
        origin = [float(freqs[0]), float(start + times[0])]
        affine = np.eye(3)
        affine[:2, :2] = np.diag(spacing)
        affine[:2, 2] = origin
        out.append(
            Window(
                image.astype(dtype, copy=False),
                {
                    "id": f"{source_id}_w{k}",
                    "slice_index": k,
                    "shape": list(image.shape),
                    "orig_shape": list(data.shape),
                    "spacing": spacing,
                    "origin": origin,
                    "direction": np.eye(2).ravel().tolist(),
                    "cache_affine": affine.ravel().tolist(),
                    "has_mask": False,
                    "dtype": dtype,
                    "channels": list(raw.ch_names),
                    "sfreq": sfreq,
                    "window_start_s": float(start),
                },
            )
        )
    return out
