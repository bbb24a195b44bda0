"""NePhi predict (``nephi``) and NePhi + instance optimisation (``nephi-io``): METHODS.md methods 2 and 3.

Both take a :class:`nephireg.pair.PreparedPair` and return a :class:`nephireg.fields.DisplacementField` in LPS mm.
``nephi`` needs a trained model (``options["model"]``: a path or a registry name, default: the registry's default
model of the run's preset); ``nephi-io`` starts from the model's codes and weights when one is given, otherwise from
the identity (zero last layer, zero codes), so it works with no weights at all. A model trained for another preset
than the run's still runs, with a ``model-preset-mismatch`` warning. ``nephi`` also runs the model on the fixed
image registered to itself (:func:`identity_test_mm`, the right answer being no motion) and warns
(``model-identity-bias``, :mod:`nephireg.quality`) when it moves it; :func:`model_record` is the provenance of the
model file a run uses, for the result manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from nephireg import quality
from nephireg.errors import InputError
from nephireg.fields import DisplacementField, evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.methods.adam import PARAMETERISATIONS as ADAM_PARAMETERISATIONS
from nephireg.methods.adam import SIMILARITIES as ADAM_SIMILARITIES
from nephireg.nephi.losses import GRADICON_JACOBIANS
from nephireg.options import SEED_RULE, Rule, check_settings, settings_from
from nephireg.pair import PreparedPair
from nephireg.progress import Reporter

COARSE_MODES = ("none", "adam")
COARSE_LEVELS = (1, 2, 4, 8)  # finest pooling factor of the coarse Adam step
SIMILARITIES = ("ncc", "mind")  # NCC of the (masked) intensities, or of MIND-SSC features
_IGNORED = ("grid_spacing_mm", "device")  # common options NePhi does not use
BACKWARD_LATTICE = 8.0  # the backward map's lattice (x working spacing): the start of the inversion, no more
MODEL_PRESET_MISMATCH = "model-preset-mismatch"  # warning: the model was trained for another preset than the run's


@dataclass(frozen=True)
class Settings:
    """Options of both NePhi methods (preset defaults with the user's overrides on top)."""

    iterations: int = 200  # IO steps (nephi-io only)
    regularization: float = 1.0  # GradICON weight lambda (10 in the paper; 1 measured better here, docs/nephi.md)
    model: Optional[str] = None  # path or registry name; None: the shipped default (predict) / identity (IO)
    seed: int = 0  # point sampling and fresh MLP weights; the pipeline passes the run's --seed
    learning_rate: float = 2e-3  # Adam, MLP weights
    code_learning_rate: float = 2e-2  # Adam, latent codes
    similarity_points: int = 10_000  # per direction and step
    gradicon_points: int = 250  # per direction and step
    gradicon_jacobian: str = "exact"  # "fd": GradICON's Jacobian by forward differences (no double backward)
    prior_weight: float = 0.01
    latent_stride: int = 8  # working voxels per local-code cell when starting from identity
    mask_images: bool = True  # with masks: image x mask and similarity points inside the masks
    similarity: str = "ncc"  # "mind": NCC of MIND-SSC features (of the unmasked images) instead of intensities
    coarse: str = "none"  # "adam": a coarse continuous-Adam field first, NePhi refines on top
    coarse_iterations: int = 60  # at each level of the coarse step
    coarse_level: int = 4  # finest pooling factor of the coarse step: 4 = the 1/4 grid only, 2 = 1/4 then 1/2
    coarse_regularization: float = 1.0  # diffusion weight of the coarse Adam step (see methods.adam.Settings)
    coarse_similarity: str = "mind"  # features of the coarse Adam step (methods.adam.SIMILARITIES)
    coarse_lncc_weight: float = 1.0  # weight of the coarse step's local NCC term, if its similarity has one
    coarse_parameterisation: str = "displacement"  # of the coarse Adam step (methods.adam.PARAMETERISATIONS)
    output_lattice: float = 2.0  # dense output sampled on a lattice of this x working spacing; 0 = exact
    threads: int = 1  # torch CPU threads during the IO loop (restored after); 0 = leave as is

    def __post_init__(self) -> None:
        check_settings(self, OPTION_RULES, INVARIANTS)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Settings:
        return settings_from(cls, options, OPTION_RULES, ignored=_IGNORED, what="NePhi")


MAX_POINTS = 10_000_000
# The one schema of these options (nephireg.options): type and allowed range of every Settings field.
OPTION_RULES = {
    "iterations": Rule("int", 0, 100_000),
    "regularization": Rule("float", 0, 1e6),
    "model": Rule("text", optional=True),
    "seed": SEED_RULE,
    "learning_rate": Rule("float", 0, 10, low_open=True),
    "code_learning_rate": Rule("float", 0, 10, low_open=True),
    "similarity_points": Rule("int", 16, MAX_POINTS),  # nephi.objective needs 16 for its statistics
    "gradicon_points": Rule("int", 1, MAX_POINTS),
    "gradicon_jacobian": Rule("choice", choices=GRADICON_JACOBIANS),
    "prior_weight": Rule("float", 0, 1e6),
    "latent_stride": Rule("int", 1, 64),
    "mask_images": Rule("bool"),
    "similarity": Rule("choice", choices=SIMILARITIES),
    "coarse": Rule("choice", choices=COARSE_MODES),
    "coarse_iterations": Rule("int", 0, 100_000),
    "coarse_level": Rule("choice", choices=COARSE_LEVELS),
    "coarse_regularization": Rule("float", 0, 1e6),
    "coarse_similarity": Rule("choice", choices=ADAM_SIMILARITIES),
    "coarse_lncc_weight": Rule("float", 0, 1e6, low_open=True),
    "coarse_parameterisation": Rule("choice", choices=ADAM_PARAMETERISATIONS),
    "output_lattice": Rule("float", 1, 64, also=(0,)),
    "threads": Rule("int", 0, 1024),
}
INVARIANTS = ((lambda s: s.coarse != "adam" or s.coarse_iterations >= 1,
               "--option coarse_iterations must be >= 1 with --option coarse=adam"),)


def coarsest_pooling(settings: Settings, grid: Grid) -> int:  # noqa: ARG001 - the methods' common signature
    """The largest pooling factor of the working grid these methods use (the coarse Adam step's), for the
    geometry check."""
    return max(coarse_levels(settings.coarse_level)) if settings.coarse == "adam" else 1


def availability() -> Dict[str, Any]:
    """``nephi`` (predict) needs a model; report whether the default one is there."""
    from nephireg import modelstore

    path = modelstore.default_model_path()
    if path is None:
        return {"available": False, "reason": "no NePhi model installed (nephi-io works without one)"}
    return {"available": True, "reason": ""}


def model_record(method: str, settings: Settings, preset: Optional[str]) -> Optional[Dict[str, Any]]:
    """Provenance of the model file a run of ``method`` with ``settings`` on ``preset`` loads, or None (nephi-io
    from identity): registry name (the file's stem outside the registry), absolute path, SHA-256, model card and
    intended use (:func:`nephireg.modelstore.intended_use`; None fields when the model states none)."""
    from nephireg import modelstore

    path = _model_path(settings.model, required=method == "nephi", preset=preset)
    if path is None:
        return None
    path = os.path.abspath(path)
    listed = [m["name"] for m in modelstore.list_models() if m["path"] and os.path.abspath(m["path"]) == path]
    name = listed[0] if listed else os.path.splitext(os.path.basename(path))[0]
    entry = next((e for e in modelstore.load_registry()["models"] if listed and e["name"] == name), {})
    use = modelstore.intended_use(path) or {}
    return {"name": name, "file": path, "sha256": modelstore.sha256_of(path), "card": entry.get("card"),
            **{key: use.get(key) for key in modelstore.INTENDED_USE_KEYS}}


def run_predict(pair: PreparedPair, options: Mapping[str, Any], reporter: Reporter) -> DisplacementField:
    """One encoder pass: latent codes from the pair, the field from the model's MLPs; then the identity test."""
    settings = Settings.from_options(options)
    reporter.stage("nephi-predict", "NePhi: predicting the deformation")
    images, coarse = _inputs(pair, settings, reporter, with_features=False)  # no similarity term in predict
    model = _load(settings.model, required=True, pair=pair, reporter=reporter)
    codes = _predict_codes(model, images.fixed, images.moving)
    reporter.step(1, 1)
    bias_mm = identity_test_mm(model, images, pair)
    reporter.log(f"identity test: the model moves the fixed image registered to itself by {bias_mm:.2f} mm on average")
    quality.check_identity_bias(bias_mm, reporter)
    return _output(model.net, codes, pair, settings, coarse, reporter)


IDENTITY_TEST_LATTICE = 8.0  # the identity test samples its field at this x the working spacing (docs/quality.md)


def identity_test_mm(model, images, pair: PreparedPair) -> float:
    """Mean |u| (mm) of the model's field for the fixed image registered to itself, over the fixed mask, else the
    fixed image's foreground (:func:`nephireg.quality.identity_mean_mm`): 0 for an unbiased model."""
    from nephireg.nephi.output import NePhiField
    from nephireg.sampling import resample_volume

    codes = _predict_codes(model, images.fixed, images.fixed)
    lattice = pair.grid.resampled([s * IDENTITY_TEST_LATTICE for s in pair.grid.spacing])
    values = evaluate_on_grid(NePhiField(model.net, codes, pair.grid), lattice, pair.device)  # (Z, Y, X, 3)
    fixed = resample_volume(pair.fixed, pair.grid, lattice)[0, 0].cpu().numpy()
    mask = None
    if pair.fixed_mask is not None:
        mask = resample_volume(pair.fixed_mask, pair.grid, lattice)[0, 0].cpu().numpy() > 0.5
    return quality.identity_mean_mm(np.linalg.norm(values, axis=-1), fixed, mask)


def run_instance_optimisation(pair: PreparedPair, options: Mapping[str, Any], reporter: Reporter
                              ) -> DisplacementField:
    """Optimise the latent codes and MLP weights (never the encoder) for this pair, Adam, on sampled points."""
    from nephireg.nephi.field import NePhiNet, zero_codes
    from nephireg.nephi.optimise import optimise

    settings = Settings.from_options({"seed": pair.seed, **options})  # the run's --seed unless an option says
    torch.manual_seed(settings.seed)
    images, coarse = _inputs(pair, settings, reporter)
    model = _load(settings.model, required=False, pair=pair, reporter=reporter)
    if model is not None:
        reporter.stage("nephi-predict", "NePhi: initial codes from the model")
        net, codes = model.net, _predict_codes(model, images.fixed, images.moving)
    else:
        from nephireg.nephi.field import FieldConfig

        config = FieldConfig()
        net = NePhiNet(config, seed=settings.seed).to(pair.device)
        shape = tuple(max(2, round(n / settings.latent_stride)) for n in pair.grid.shape_zyx)
        codes = zero_codes(config, shape, device=pair.device)
    reporter.stage("nephi-io", f"NePhi + IO: {settings.iterations} iterations")
    net, codes = optimise(net, codes, images, settings, reporter)
    return _output(net, codes, pair, settings, coarse, reporter)


def _inputs(pair: PreparedPair, settings: Settings, reporter: Reporter, with_features: bool = True):
    """Masked images and point samplers, after the optional coarse step (which warps the moving image)."""
    from nephireg.nephi.objective import PairImages

    coarse = None
    moving, moving_mask = pair.moving, pair.moving_mask
    if settings.coarse == "adam":
        coarse, moving, moving_mask = _coarse_step(pair, settings, reporter)
    fixed_mask = pair.fixed_mask if settings.mask_images else None
    moving_mask = moving_mask if settings.mask_images else None
    features = _mind_features(pair.fixed, moving) if with_features and settings.similarity == "mind" else None
    fixed = pair.fixed if fixed_mask is None else pair.fixed * fixed_mask
    moving = moving if moving_mask is None else moving * moving_mask
    return PairImages.build(fixed, moving, fixed_mask, moving_mask, features), coarse


def _mind_features(fixed: torch.Tensor, moving: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MIND-SSC (1, 12, Z, Y, X) of both unmasked images, with continuous Adam's radius and dilation (a mask
    edge would otherwise be the strongest structure); the similarity points still come from the masks."""
    from nephireg.features import MindScratch, mind_ssc
    from nephireg.methods.adam import Settings as AdamSettings
    from nephireg.sampling import channels_last

    defaults = AdamSettings()
    scratch = MindScratch()  # the second image's working arrays are the first's
    with torch.no_grad():
        fixed_features = mind_ssc(fixed, defaults.mind_radius, defaults.mind_dilation, scratch)
        moving_features = mind_ssc(moving, defaults.mind_radius, defaults.mind_dilation, scratch)
    del scratch
    return channels_last(fixed_features), channels_last(moving_features)


def _coarse_step(pair: PreparedPair, settings: Settings, reporter: Reporter):
    """Continuous Adam at low resolution; the moving image (and mask) warped through it onto the working grid."""
    from nephireg.methods import adam
    from nephireg.sampling import grid_points_mm, sample_points

    field = adam.run(pair, {"levels": coarse_levels(settings.coarse_level), "iterations": settings.coarse_iterations,
                            "coarse_iterations": settings.coarse_iterations,
                            "regularization": settings.coarse_regularization,
                            "similarity": settings.coarse_similarity, "lncc_weight": settings.coarse_lncc_weight,
                            "parameterisation": settings.coarse_parameterisation}, reporter)
    values = torch.from_numpy(evaluate_on_grid(field, pair.grid, pair.device, cancel=reporter.check_cancel)
                              ).to(pair.fixed)
    points = grid_points_mm(pair.grid, device=pair.device) + values
    flat = points.reshape(-1, 3)
    shape = pair.moving.shape

    def warp(volume: torch.Tensor) -> torch.Tensor:
        return sample_points(volume, pair.grid, flat).T.reshape(shape)

    mask = None if pair.moving_mask is None else (warp(pair.moving_mask) > 0.5).to(pair.moving_mask)
    return field, warp(pair.moving), mask


def coarse_levels(finest: int) -> Tuple[int, ...]:
    """Pooling factors of the coarse Adam step, coarse to fine: (8,), (4,), (4, 2) or (4, 2, 1); (4, 2) is
    continuous Adam's own default pyramid (``methods.adam.Settings.levels``)."""
    return (finest,) if finest >= 4 else tuple(f for f in (4, 2, 1) if f >= finest)


def _model_path(name: Optional[str], required: bool, preset: Optional[str]) -> Optional[str]:
    """The model file a run loads: ``name`` resolved (``preset``'s default when required and not given), else None."""
    from nephireg import modelstore

    return modelstore.resolve_model(name, preset=preset) if (name or required) else None


def _load(name: Optional[str], required: bool, pair: PreparedPair, reporter: Reporter):
    """The model (``name``: path or registry name; None: the preset's default when ``required``), its intended
    use checked against the run's preset."""
    from nephireg import modelstore

    path = _model_path(name, required, pair.preset)
    if path is None:
        if required:
            raise InputError("NePhi predict needs a model: none is installed; use --method nephi-io or --model")
        return None
    from nephireg.nephi.model_io import load_model

    model = load_model(path, device=pair.device)
    label = name or modelstore.default_model_name(pair.preset) or path
    use = modelstore.intended_use(path) or modelstore.valid_intended_use(model.metadata.get("intended_use"))
    check_intended_use(label, use, pair.preset, reporter)
    return model


def check_intended_use(label: str, use: Optional[Mapping[str, str]], preset: Optional[str], reporter: Reporter
                       ) -> None:
    """Warn (``model-preset-mismatch``) when the model ``label`` was trained for another preset than ``preset``;
    a model that states no use is only logged, a pair outside a run (``preset`` None) not checked."""
    if preset is None:
        return
    if use is None:
        reporter.log(f"NePhi model {label} states no intended use (anatomy, modality, preset); it is not checked "
                     f"against the {preset} preset")
        return
    if use["preset"] != preset:
        reporter.warn(MODEL_PRESET_MISMATCH,
                      f"NePhi model {label} was trained for {use['anatomy']} {use['modality']} (preset "
                      f"{use['preset']}) but this run uses the {preset} preset: expect a poor result; use a model "
                      f"trained for {preset} (nephireg models), or --method adam")


def _predict_codes(model, fixed: torch.Tensor, moving: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.predict_codes(fixed, moving)


def _output(net, codes, pair: PreparedPair, settings: Settings, coarse, reporter: Reporter) -> DisplacementField:
    """The forward field; without a coarse step, with NePhi's backward map as its inverse, which starts the
    pipeline's inversion (:mod:`nephireg.inverse`). The backward map is sampled on a coarse lattice
    (:data:`BACKWARD_LATTICE`): the fixed-point iteration refines it anyway, and on the lung pair the raw map was
    0.83 mm mean from consistent (docs/methods.md), while evaluating the MLP on the output lattice would double a
    prediction's output cost."""
    from nephireg.fields import FieldWithInverse
    from nephireg.nephi.output import ComposedField, NePhiField, lattice_field

    field: DisplacementField = NePhiField(net, codes, pair.grid)
    if settings.output_lattice:
        field = lattice_field(field, pair.grid, settings.output_lattice, pair.device, cancel=reporter.check_cancel)
    if coarse is not None:
        return ComposedField(field, coarse)  # no inverse of the coarse step at hand: the inversion starts afresh
    backward = NePhiField(net, codes, pair.grid, inverse=True)
    return FieldWithInverse(field, lattice_field(backward, pair.grid, BACKWARD_LATTICE, pair.device,
                                                 cancel=reporter.check_cancel))
