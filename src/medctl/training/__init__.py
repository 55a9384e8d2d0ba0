"""The training loop shared by ``medctl pretrain`` and ``medctl finetune``, and what it is built from.

Free functions, one concern per module (no Trainer class, no callbacks):

- :mod:`~medctl.training.fit`: the loop itself, ``fit(...) -> FitResult`` (read its docstring first).
- :mod:`~medctl.training.seed`: ``set_seed``, ``rng_state`` / ``restore_rng_state``.
- :mod:`~medctl.training.optim`: AdamW param groups, ``get_lr`` (cosine with warmup), the scheduler,
  the EMA momentum schedule.
- :mod:`~medctl.training.precision`: ``resolve_device``, ``autocast_context`` (bf16 on CUDA only).
- :mod:`~medctl.training.ema`: ``ema_update`` for BYOL/JEPA target networks.
- :mod:`~medctl.training.state`: atomic ``train_state`` checkpoints for ``--resume``.
- :mod:`~medctl.training.logging`: ``MetricsLogger`` (``metrics.jsonl`` + tensorboard ``tb/``).
- :mod:`~medctl.training.early_stopping`: ``EarlyStopping``.
- :mod:`~medctl.training.distributed`: torchrun/DDP helpers, ``make_loader``.
- :mod:`~medctl.training.losses`: supervised losses per target kind (CE, focal, BCE).
- :mod:`~medctl.training.ssl_losses`: ``byol_loss``, ``info_nce``.
- :mod:`~medctl.training.predict`: logits over a dataset, probabilities, prediction tables (fine-tune
  and evaluate both use them).
"""
