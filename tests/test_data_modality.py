"""``data.modality`` is one object the preprocess path asks (medctl.data.modality), and caches built before it
keep their place: the settings hash of an image and of an EEG config is what it was."""

from __future__ import annotations

import pickle

import pytest

from medctl.config import load_config
from medctl.data.cache.sample import SampleTask
from medctl.data.modality import EEGModality, ImageModality, modality_for
from medctl.data.preprocess import settings_for, settings_hash
from medctl.storage import FileInfo

BASE = [
    'data.table="t.tsv"',
    'data.source.root="r"',
    'data.source.pattern="{participant_id}.nrrd"',
    'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]',
]
EEG = ['data.modality="eeg"', "data.eeg.sfreq=128.0"]


@pytest.mark.parametrize(
    ("extra", "kind", "hash_before"),
    [([], ImageModality, "640c7a274124040b"), (EEG, EEGModality, "ac969c438eeab187")],
    ids=["image", "eeg"],
)
def test_the_modality_object_keeps_each_cache_hash(extra, kind, hash_before):
    data = load_config(None, [*BASE, *extra], env={}).data
    modality = modality_for(data)
    assert isinstance(modality, kind) and modality.name == data.modality
    # the hash the same settings had when preprocess.py switched on data.modality itself
    assert settings_hash(settings_for(data, "0" * 64)) == hash_before


def test_a_task_carries_its_modality_and_its_settings_to_a_worker():
    data = load_config(None, [*BASE, *EEG, "data.eeg.window_s=3.0"], env={}).data
    info = FileInfo("s1.edf", "/data/s1.edf", 10, "x")
    task = SampleTask("s1", [info], [], "f", "/cache", {}, "", "", 0, modality_for(data))
    shipped = pickle.loads(pickle.dumps(task))  # what the forkserver pool does to every task
    assert isinstance(shipped.modality, EEGModality) and shipped.modality.eeg.window_s == 3.0
    assert shipped.modality.cache_key() == {"modality": "eeg", "eeg": data.eeg.model_dump(mode="json")}
    assert isinstance(SampleTask("s1", [info], [], "f", "/cache", {}, "", "", 0).modality, ImageModality)
