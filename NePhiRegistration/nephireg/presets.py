"""Presets: intensity handling, masks, pre-alignment, working resolution and per-method defaults for an anatomy.

A preset is data. Per-method defaults are plain dicts of the method's own options (see each method's
``Settings``); a user's expert options override them key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from nephireg.protocol import PRESETS


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    intensity: str  # "window" (clamp to window, scale to [0, 1]) | "percentile" (robust [p_lo, p_hi] -> [0, 1])
    window: Tuple[float, float] = (-1000.0, 0.0)  # intensity units (HU for CT), used by "window"
    percentiles: Tuple[float, float] = (0.5, 99.5)  # used by "percentile"
    derive_lung_masks: bool = False  # make lung masks when the user gives none (CT in HU)
    mask_images: bool = False  # multiply normalised images by their (dilated) masks
    mask_dilation_mm: float = 0.0  # dilation of masks before use as similarity weights
    prealign: str = "center"  # nephireg.protocol.PREALIGN_MODES, without "preset"
    working_spacing_mm: float = 2.0  # isotropic spacing of the working grid
    crop_margin_mm: Optional[float] = None  # if set, crop the working grid to the fixed mask's box plus this margin
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, method: str, overrides: Mapping[str, Any]) -> Dict[str, Any]:
        """The preset's options for ``method`` with the user's non-None ``overrides`` on top."""
        options = dict(self.method_options.get(method, {}))
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options


_PRESETS = {
    "lung-ct": Preset(
        name="lung-ct",
        description="Thorax CT in Hounsfield units: lung window [-1000, 0] HU, lung masks derived if not given.",
        intensity="window",
        window=(-1000.0, 0.0),
        derive_lung_masks=True,
        mask_images=False,
        mask_dilation_mm=6.0,
        prealign="center",
        working_spacing_mm=1.5,
        # Measured on the lung pair (docs/adam-tuning.md): lambda 0.2 gives 1.32 mm (median 0.99) with 0.0005 %
        # folding, against 1.43 mm at 1.0 and 0.0097 % folding at 0.1; 30 fine + 30 coarse iterations did as well
        # as 80 + 60 or 270 + 100, in a third of the time.
        # NePhi predict: the dense output sampled on a 6x working-spacing lattice (9 mm; 2.90 mm at 3x, 2.89 mm at 4x,
        # 2.86 mm at 6x, 2.85 mm at 8x, 0 % folding; 6x evaluates the MLP at a quarter of 4x's points; docs/nephi.md).
        # NePhi + IO: multi-resolution (continuous Adam on the 1/4 then 1/2 grid first, 30 iterations each, lambda 0.2
        # as above), a local-code cell every 4 working voxels, Adam rates 2.5x the generic ones, NCC of MIND-SSC
        # features, GradICON lambda 0.5, 6000 similarity points, 110 iterations: 1.30-1.33 mm over seeds 0-2, 77 s on a
        # slow 2-core CPU (docs/nephi.md, session 4). The 1/4 grid alone with cells every 8 voxels gave 1.36-1.40 mm.
        # Session 6 (speed, docs/nephi.md): 40 iterations instead of 110: 1.312 / 1.308 / 1.323 mm over seeds 0-2
        # (medians 0.93 / 0.93 / 0.95; 110: 1.310, median 0.91), 0 % folding. GradICON by forward differences
        # (gradicon_jacobian=fd, 0.8x a step) gave 1.284 / 1.320 / 1.326 at 40 but folded 0.0004 % at seed 0: not here.
        method_options={"adam": {"regularization": 0.2, "iterations": 30, "coarse_iterations": 30},
                        "nephi": {"output_lattice": 6},
                        "nephi-io": {"coarse": "adam", "coarse_level": 2, "coarse_iterations": 30,
                                     "coarse_regularization": 0.2, "latent_stride": 4, "iterations": 40,
                                     "learning_rate": 5e-3, "code_learning_rate": 5e-2, "similarity_points": 6000,
                                     "similarity": "mind", "regularization": 0.5, "output_lattice": 3}},
    ),
    "brain-mri": Preset(
        name="brain-mri",
        description="Brain MRI (any weighting): robust 0.5-99.5 percentile normalisation, affine pre-alignment.",
        intensity="percentile",
        prealign="affine",  # docs/prealign.md: recovers a known affine to 0.03 mm where translations leave 7 mm
        working_spacing_mm=1.5,
        # Tuned on the ROBEX atlas <-> MNI152 pair (Otsu tissue classes) and a known 4 mm warp of the ROBEX atlas
        # only, never on the reported template <-> subject pair (docs/adam-tuning.md, "Brain MRI"): MIND-SSC plus
        # the intensities, a stationary velocity field (5 squarings), lambda 0.05, 40 + 40 iterations gave tissue
        # Dice 0.657 (ANTs SyN 0.571; MIND alone at lambda 0.05: 0.581, lambda 1: 0.553) with 0 % folding, and
        # 0.70 mm known-warp error (ANTs 0.82, lambda 1: 1.19). Without the velocity field the same similarity folds
        # 0.12-0.13 % at lambda 0.05 and 0.02 % at 0.1. Second round, same cases: adding the local NCC term
        # (weight 0.1, radius 4 working voxels) gave 0.677 tissue Dice (mind+intensity 0.657) and 0.660 mm (0.695);
        # weights 0.05-1 and lncc / mind+lncc were measured too (docs/adam-tuning.md).
        method_options={"adam": {"regularization": 0.05, "iterations": 40, "coarse_iterations": 40,
                                 "similarity": "mind+intensity+lncc", "lncc_weight": 0.1, "parameterisation": "svf"},
                        "nephi": {},
                        "nephi-io": {"coarse": "adam", "coarse_level": 2, "coarse_iterations": 40,
                                     # the coarse step is continuous Adam with the adam default's similarity
                                     "coarse_regularization": 0.05, "coarse_similarity": "mind+intensity+lncc",
                                     "coarse_lncc_weight": 0.1,
                                     "coarse_parameterisation": "svf", "latent_stride": 4, "iterations": 40,
                                     # session 6, tuning cases (docs/nephi.md): fd and 40 iterations 0.702 / 0.581
                                     # and 0.745 / 0.642 WM / GM Dice, exact and 110: 0.701 / 0.579, 0.744 / 0.641
                                     "gradicon_jacobian": "fd",
                                     "learning_rate": 5e-3, "code_learning_rate": 5e-2, "similarity_points": 6000,
                                     "similarity": "mind", "regularization": 0.5, "output_lattice": 3}},
    ),
    "generic": Preset(
        name="generic",
        description="Any modality: robust percentile normalisation, field-of-view-centre pre-alignment.",
        intensity="percentile",
        prealign="center",
        working_spacing_mm=2.0,
        # Measured on both anatomies (docs/adam-tuning.md, "The generic preset"): on the lung development pair with
        # this preset (no lung masks, 2 mm) lambda 1 gave 1.76 mm, 0.5 gave 1.60 mm with 0.001 % folding and 0.2 gave
        # 1.48 mm but 0.14 % folding. On the brain tuning pair with this preset (centre pre-alignment only) lambda 0.5
        # lost against 1 (tissue Dice 0.408 against 0.431): a compromise that favours the larger lung gain; brain
        # MRI has its own preset.
        method_options={"adam": {"regularization": 0.5, "iterations": 40, "coarse_iterations": 40},
                        "nephi": {}, "nephi-io": {}},
    ),
}
assert tuple(_PRESETS) == PRESETS


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
