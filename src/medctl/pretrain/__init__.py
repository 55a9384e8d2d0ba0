"""Self-supervised pretraining: one module per method (byol, mim_contrastive, jepa) plus the views
(:mod:`~medctl.pretrain.views`) and masks (:mod:`~medctl.pretrain.masks`) they learn from."""
