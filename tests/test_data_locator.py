"""Key templates against one listing: one file, one DICOM folder, or a reported problem."""

from __future__ import annotations

import pytest

from medctl.data.locator import check_template, expand_template, glob_to_regex, listing_prefix, resolve
from medctl.errors import ConfigError
from medctl.storage import FileInfo, Listing


def listing(*keys: str) -> Listing:
    return Listing(
        "s3://bucket/root/", {k: FileInfo(k, "s3://bucket/root/" + k, 1, "etag:x:1") for k in keys}
    )


def test_id_placeholders_and_globs():
    files = listing(
        "sub-1.nrrd", "sub-10.nrrd", "sub-2/a.dcm", "sub-2/b.dcm", "sub-3/x/a.dcm", "sub-3/y/b.dcm"
    )
    res = resolve(["sub-1", "sub-10"], files, "{participant_id}.nrrd")
    assert res.matches == {"sub-1": ("sub-1.nrrd",), "sub-10": ("sub-10.nrrd",)}  # sub-1 does not take sub-10
    res = resolve(["sub-2", "sub-3", "sub-4"], files, "{id}/*.dcm")
    assert res.matches["sub-2"] == ("sub-2/a.dcm", "sub-2/b.dcm")  # one DICOM series, not ambiguity
    assert res.missing == ["sub-3", "sub-4"]  # * does not cross folders
    res = resolve(["sub-3"], files, "{id}/**/*.dcm")
    assert res.ambiguous == {"sub-3": ["sub-3/x/a.dcm", "sub-3/y/b.dcm"]}  # two folders: two series
    assert "2 keys match pattern 'sub-3/**/*.dcm'" in res.problem("sub-3")


def test_several_non_dicom_matches_are_ambiguous_and_never_guessed():
    files = listing("a_T1.nii.gz", "a_T2.nii.gz", "b_T1.nii.gz")
    res = resolve(["a", "b"], files, "{id}_*.nii.gz")
    assert res.matches == {"b": ("b_T1.nii.gz",)}
    assert res.ambiguous == {"a": ["a_T1.nii.gz", "a_T2.nii.gz"]}
    assert "make data.source.pattern specific" in res.problem("a")


def test_missing_id_names_the_expanded_pattern_and_root():
    res = resolve(["x"], listing("y.nrrd"), "{id}.nrrd")
    assert res.problem("x") == "no key matches pattern 'x.nrrd' under s3://bucket/root/"


def test_ids_with_glob_characters_are_literal():
    files = listing("a[1].nrrd", "a1.nrrd", "b*.nrrd", "bb.nrrd")
    res = resolve(["a[1]", "b*"], files, "{id}.nrrd")
    assert res.matches == {"a[1]": ("a[1].nrrd",), "b*": ("b*.nrrd",)}
    assert expand_template("{id}.nrrd", "b*") == "b[*].nrrd"


def test_prefix_and_regex_helpers():
    assert listing_prefix("images/{id}.nrrd") == "images/"
    assert listing_prefix("{id}/*.dcm") == ""
    assert listing_prefix("a/b/*/{id}.nii") == "a/b/"
    assert glob_to_regex("x/*.dcm").match("x/1.dcm") and not glob_to_regex("x/*.dcm").match("x/y/1.dcm")
    assert glob_to_regex("x/[!a]?.png").match("x/b1.png") and not glob_to_regex("x/[!a]?.png").match(
        "x/a1.png"
    )


def test_bad_templates_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown placeholder \{subject\}"):
        check_template("{subject}.nrrd", "participant_id")
    with pytest.raises(ConfigError, match="no id placeholder"):
        check_template("scan.nrrd", "participant_id")
    check_template("{participant_id}/*.dcm", "participant_id")
