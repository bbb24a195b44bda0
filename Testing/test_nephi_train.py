"""NePhi training: a few steps single-process, 2 gloo processes (DDP), resume from a checkpoint, CLI entry."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nephireg.nephi.encoder import Encoder, EncoderConfig
from nephireg.nephi.field import FieldConfig, NePhiNet
from nephireg.nephi.model_io import load_model
from nephireg.nephi.objective import LossSettings, PairImages
from nephireg.nephi.synthetic import WarpSettings, make_pair
from nephireg.nephi.train import CHECKPOINT, Trainable, TrainConfig, train

SMALL_FIELD = {"global_dim": 32, "local_dim": 32, "fourier_features": 16, "hidden": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volumes_csv(tmp_path_factory):
    """Two small real-shaped volumes (a CT-like one in HU with a mask, an MR-like one) and their CSV."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("vols")
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 36, 44)), indexing="ij")
    body = (x ** 2 + y ** 2 + z ** 2 < 0.8).astype(np.float32)
    ct = -1000 + 1000 * body + 300 * rng.standard_normal(body.shape).astype(np.float32) * body
    mr = np.cos(4 * x) * np.sin(3 * y + z) + 0.1 * rng.standard_normal(body.shape)
    for name, array in (("ct.nrrd", ct), ("mask.nrrd", body.astype(np.uint8)), ("mr.nrrd", mr.astype(np.float32))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.5, 2.0))
        sitk.WriteImage(image, str(folder / name))
    csv = folder / "volumes.csv"
    csv.write_text("image,mask,window_lo,window_hi\nct.nrrd,mask.nrrd,-1000,0\nmr.nrrd,,,\n")
    return csv


def _config(tmp_path, volumes_csv, **kw) -> TrainConfig:
    values = dict(out=str(tmp_path / "model.pt"), workdir=str(tmp_path / "work"), volumes_csv=str(volumes_csv),
                  steps=3, input_shape=(66, 66, 66), similarity_points=300, gradicon_points=8,
                  validate_every=3, checkpoint_every=2, validation_pairs=1, field=SMALL_FIELD)
    values.update(kw)
    return TrainConfig(**values)


def test_single_process_training_writes_a_model_and_resumes(tmp_path, volumes_csv):
    lines = []
    meta = train(_config(tmp_path, volumes_csv), log=lines.append)
    assert meta["steps"] == 3 and meta["processes"] == 1
    record = json.loads(lines[-1])
    assert record["step"] == 3 and record["val_error_before_vox"] > 0 and np.isfinite(record["val_error_vox"])
    model = load_model(tmp_path / "model.pt")
    assert model.metadata["steps"] == 3 and model.encoder is not None
    first = {k: v.clone() for k, v in model.net.state_dict().items()}
    # resume: the checkpoint at step 3 continues to step 5 (not from scratch)
    lines.clear()
    meta = train(_config(tmp_path, volumes_csv, steps=5, resume=True, validate_every=1), log=lines.append)
    assert lines[0] == "resumed from step 3" and json.loads(lines[1])["step"] == 4 and meta["steps"] == 5
    assert len(meta["history"]) == 3  # step 3 from the first run, steps 4 and 5
    resumed = load_model(tmp_path / "model.pt").net.state_dict()
    assert any(not torch.equal(first[k], resumed[k]) for k in first)


def _worker(rank: int, world: int, port: int, config: TrainConfig) -> None:
    import os

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    train(config, log=lambda line: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_with_ddp(tmp_path, volumes_csv):
    config = _config(tmp_path, volumes_csv, steps=2, checkpoint_every=1)
    mp.spawn(_worker, args=(2, _free_port(), config), nprocs=2, join=True)
    model = load_model(tmp_path / "model.pt")
    assert model.metadata["processes"] == 2 and model.metadata["steps"] == 2
    assert (tmp_path / "work" / CHECKPOINT).is_file()


def test_train_needs_data():
    with pytest.raises(ValueError, match="--pairs and/or --volumes"):
        TrainConfig(out="m.pt", workdir="w")


def test_supervised_term_measures_the_known_warp_and_reaches_the_encoder():
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 1, 66, 66, 66, generator=gen)
    synthetic = make_pair(volume, None, WarpSettings(amplitude=0.08), gen)
    images = PairImages.build(synthetic.fixed, synthetic.moving)
    config = FieldConfig(**SMALL_FIELD)
    model = Trainable(Encoder(EncoderConfig(input_shape=(66, 66, 66))), NePhiNet(config),
                      LossSettings(similarity_points=400, gradicon_points=8), supervised_weight=10.0)
    # a fresh field is the identity: the term is then exactly the mean size of the known warp, both ways
    terms = {k: float(v.detach()) for k, v in model(images, torch.Generator().manual_seed(1), synthetic).items()}
    x = images.fixed_points.sample(400, torch.Generator().manual_seed(2))
    warp_size = float((synthetic.warp_points(x) - x).norm(dim=1).mean())
    assert terms["supervised"] == pytest.approx(warp_size, rel=0.25)
    assert terms["total"] > terms["similarity"] + 10.0 * 0.5 * warp_size
    assert "supervised" not in model(images, gen)  # a real pair: no known warp, no term
    # with a non-zero read-out the term's gradient reaches the encoder's local head
    torch.nn.init.normal_(model.net.forward_map.out.weight, std=0.1)
    model(images, gen, synthetic)["supervised"].backward()
    assert model.encoder.local_head.weight.grad.abs().sum() > 0


def test_supervised_weight_must_not_be_negative(tmp_path, volumes_csv):
    with pytest.raises(ValueError, match="supervised_weight"):
        _config(tmp_path, volumes_csv, supervised_weight=-1.0)
