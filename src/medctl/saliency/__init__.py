"""Saliency: Captum attribution maps for 2D and 3D classifiers, written as NRRD/PNG and scored on masks.

``METHODS`` maps each attribution method's name (``saliency.methods``) to its function;
:func:`run_saliency` is the whole stage for a classifier and an iterable of samples.
"""

from medctl.saliency.attribution import (
    METHODS,
    ClassScores,
    auto_internal_batch_size,
    compute_map,
    integrated_gradients_attribution,
    resolve_methods,
)
from medctl.saliency.geometry import (
    Geometry,
    cache_geometry,
    resample_to_grid,
    resample_to_shape,
    source_geometry,
)
from medctl.saliency.pipeline import SaliencyResult, run_saliency
from medctl.saliency.scoring import (
    mask_share,
    mass_in_mask,
    pointing_chance,
    pointing_game,
    randomised_copy,
    rank_correlation,
)

__all__ = [
    "METHODS",
    "ClassScores",
    "Geometry",
    "SaliencyResult",
    "auto_internal_batch_size",
    "cache_geometry",
    "compute_map",
    "integrated_gradients_attribution",
    "mask_share",
    "mass_in_mask",
    "pointing_chance",
    "pointing_game",
    "randomised_copy",
    "rank_correlation",
    "resample_to_grid",
    "resample_to_shape",
    "resolve_methods",
    "run_saliency",
    "source_geometry",
]
