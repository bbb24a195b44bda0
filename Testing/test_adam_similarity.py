"""Continuous Adam's similarity option: MIND-SSC, or MIND-SSC and intensities, as squared feature differences."""

import pytest
import SimpleITK as sitk
import torch

from conftest import sample_mask
from nephireg import io
from nephireg.errors import InputError
from nephireg.methods.adam import Settings, features
from nephireg.pipeline import Request, register
from nephireg.synthetic import warp_error_mm


def test_features_have_the_channels_each_similarity_names():
    image = torch.rand(1, 1, 12, 11, 10)
    mind = features(image, Settings(similarity="mind"))
    both = features(image, Settings(similarity="mind+intensity"))
    assert mind.shape == (1, 12, 12, 11, 10) and both.shape == (1, 13, 12, 11, 10)
    assert torch.equal(both[:, :12], mind)
    assert torch.allclose(both[:, 12:], image * 12 ** 0.5)  # as much weight as the 12 MIND channels together


def test_adam_recovers_a_known_deformation_with_mind_and_intensity(small_pair, tmp_path, one_torch_thread):
    similarity = "mind+intensity"
    out = tmp_path / similarity
    manifest = register(Request(small_pair["fixed"], small_pair["moving"], str(out), method="adam", preset="generic",
                                prealign="none", fixed_mask=small_pair["fixed_mask"], write_overview=False,
                                options={"iterations": 60, "coarse_iterations": 40, "similarity": similarity}))
    points = sample_mask(small_pair["mask"], 600)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), small_pair["truth"], small_pair["grid"], points)
    after = warp_error_mm(io.read_transform(out / "transform.h5"), small_pair["truth"], small_pair["grid"], points)
    assert after.mean() < 0.6 * before.mean(), (before.mean(), after.mean())
    assert manifest["metrics"]["folding_percent"] == 0.0


def test_unknown_similarity_is_refused():
    with pytest.raises(InputError, match="similarity"):
        Settings.from_options({"similarity": "intensity"})
