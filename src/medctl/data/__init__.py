"""Data: tables, splits, locator, readers, preprocessing into a cache, cache datasets, synthetic data.

Entry points: :func:`medctl.data.preprocess.preprocess`, :class:`medctl.data.dataset.CacheDataset`,
:func:`medctl.data.synthetic.make_synthetic_dataset`, :func:`medctl.data.checks.check_bucket` and
:func:`medctl.data.checks.check_data`. Submodules are imported on use (no heavy imports here).
"""
