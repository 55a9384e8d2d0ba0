"""Fine-tuning: linear probes (on cached embeddings) and fine-tunes of an encoder with one head per target.

- :mod:`~medctl.finetune.run`: ``run_finetune(config) -> FinetuneResult``, the stage (read its docstring).
- :mod:`~medctl.finetune.features`: the on-disk embedding cache of the linear probe.
- :mod:`~medctl.finetune.augment`: ``[train.augment]`` as MONAI array transforms.
- logits, probabilities and prediction tables come from :mod:`medctl.training.predict` (shared with evaluate).
"""

from medctl.finetune.run import FinetuneResult, run_finetune

__all__ = ["FinetuneResult", "run_finetune"]
