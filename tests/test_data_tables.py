"""The labels table: formats, filter, targets, splits; each bad input is one clear DataError."""

from __future__ import annotations

import pandas as pd
import pytest

from medctl.config import DataConfig
from medctl.data.tables import apply_filter, load_table, read_table
from medctl.errors import ConfigError, DataError


def data_config(table, **kwargs) -> DataConfig:
    return DataConfig.model_validate({"table": str(table), "id_column": "participant_id", **kwargs})


def write_tsv(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n")
    return path


TABLE = [
    "participant_id\tlabel\tretinal_oct\tage\tsplit\tsubject",
    "p1\thealthy\tTRUE\t40\ttrain\ts1",
    "p2\tedema\tTRUE\t55\tValidation\ts2",
    "p3\tedema\tFALSE\t61\ttest\ts3",
    "p4\thealthy\ttrue\tn/a\tdev\ts4",
    "p5\tedema\tTRUE\t33\ttraining\ts5",
]


def test_filter_reads_true_false_strings_as_booleans(tmp_path):
    cfg = data_config(write_tsv(tmp_path / "t.tsv", TABLE), filter="retinal_oct == True and age > 35")
    table = load_table(cfg.model_copy(update={"split_column": "split"}))
    assert table.frame["id"].tolist() == ["p1", "p2"]  # p3 FALSE, p4 has no age, p5 too young


def test_split_aliases_and_sorted_classes(tmp_path):
    cfg = data_config(write_tsv(tmp_path / "t.tsv", TABLE), split_column="split", targets=[{"name": "label"}])
    table = load_table(cfg)
    assert table.frame["split"].tolist() == ["train", "val", "test", "val", "train"]
    assert table.specs[0].classes == ["edema", "healthy"]  # sorted distinct values
    assert table.frame["label"].tolist() == [1, 0, 0, 1, 0]


def test_explicit_class_order_binary_and_several_targets(tmp_path):
    rows = ["participant_id\tlabel\tgrade", "a\thealthy\t2", "b\tedema\t10", "c\thealthy\t1"]
    cfg = data_config(
        write_tsv(tmp_path / "t.tsv", rows),
        targets=[{"name": "label", "kind": "binary", "classes": ["healthy", "edema"]}, {"name": "grade"}],
    )
    table = load_table(cfg)
    assert table.frame["label"].tolist() == [0, 1, 0]
    assert table.specs[1].classes == ["1", "2", "10"]  # numbers sort numerically
    assert table.specs[0].num_outputs == 1 and table.specs[1].num_outputs == 3


def test_multilabel_from_several_columns_csv_and_parquet(tmp_path):
    frame = pd.DataFrame({"participant_id": ["a", "b", "c"], "crack": [1, 0, 1], "rust": [False, True, True]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        target = {"name": "defects", "kind": "multilabel", "columns": ["crack", "rust"]}
        table = load_table(data_config(tmp_path / name, targets=[target]))
        assert table.frame["defects"].tolist() == [[1, 0], [0, 1], [1, 1]]
        assert table.specs[0].classes == ["crack", "rust"]


def test_unknown_class_names_value_column_and_key(tmp_path):
    rows = ["participant_id\tlabel", "a\thealthy", "b\tedema", "c\tHealthy"]
    cfg = data_config(
        write_tsv(tmp_path / "t.tsv", rows), targets=[{"name": "label", "classes": ["healthy", "edema"]}]
    )
    with pytest.raises(DataError) as info:
        load_table(cfg)
    message = str(info.value)
    assert "unknown class value 'Healthy' in column 'label' (ids c)" in message
    assert "data.targets[0].classes = ['healthy', 'edema']" in message and "did you mean 'healthy'" in message
    assert "\n" not in message


def test_duplicate_ids_empty_table_missing_columns_and_bad_filter(tmp_path):
    dup = write_tsv(tmp_path / "dup.tsv", ["participant_id\tlabel", "a\tx", "b\ty", "a\tx"])
    with pytest.raises(DataError, match=r"duplicate ids in participant_id: a \(x2\)"):
        load_table(data_config(dup))
    empty = write_tsv(tmp_path / "empty.tsv", ["participant_id\tlabel"])
    with pytest.raises(DataError, match="empty.tsv: the table has no rows"):
        load_table(data_config(empty))
    with pytest.raises(DataError, match=r"missing column\(s\) `diagnosis` \(data.targets\[0\].column\)"):
        load_table(data_config(dup, targets=[{"name": "diagnosis"}]))
    frame, _ = read_table(data_config(write_tsv(tmp_path / "t.tsv", TABLE)))
    with pytest.raises(DataError, match=r"data.filter = 'retinal_oc == True' cannot be evaluated"):
        apply_filter(frame, "retinal_oc == True")
    with pytest.raises(DataError, match="drops every one of the 5 rows"):
        apply_filter(frame, "age > 100")


def test_bad_split_values_and_missing_labels(tmp_path):
    rows = ["participant_id\tlabel\tsplit", "a\tx\ttrain", "b\t\tholdout"]
    path = write_tsv(tmp_path / "t.tsv", rows)
    with pytest.raises(DataError, match=r"not a split \(b: 'holdout'\); accepted: dev, test"):
        load_table(data_config(path, split_column="split"))
    with pytest.raises(
        DataError, match=r"column 'label' \(data.targets\[0\].column\) is empty for 1 id\(s\) \(b\)"
    ):
        load_table(data_config(path, targets=[{"name": "label"}]))


def test_generated_splits_are_grouped_and_frozen_by_seed(tmp_path):
    rows = ["participant_id\tlabel\tsubject"] + [f"p{i}\t{'ab'[i % 2]}\ts{i // 2}" for i in range(40)]
    cfg = data_config(
        write_tsv(tmp_path / "t.tsv", rows), group_column="subject", targets=[{"name": "label"}]
    )
    first, again = load_table(cfg).frame, load_table(cfg).frame
    assert first["split"].tolist() == again["split"].tolist()
    assert first.groupby("group")["split"].nunique().max() == 1
    assert set(first["split"]) == {"train", "val", "test"}


def test_impossible_target_settings_are_rejected_by_the_config():
    with pytest.raises(ValueError, match="binary target lists two classes"):
        DataConfig.model_validate({"targets": [{"name": "y", "kind": "binary", "classes": ["a", "b", "c"]}]})
    with pytest.raises(ValueError, match="multilabel target needs `columns`"):
        DataConfig.model_validate({"targets": [{"name": "y", "kind": "multilabel"}]})
    from medctl.config import load_config

    with pytest.raises(ConfigError, match="spatial_size is the size of each slice"):
        load_config(None, ['data.preprocess.slices="axial"'], env={})
