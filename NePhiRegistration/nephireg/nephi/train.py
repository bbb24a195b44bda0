"""Training NePhi (encoder + both MLPs) on real pairs and/or synthetic pairs, single-process or DDP.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) each process trains on its own pairs and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPUs). Rank 0 writes checkpoints
(``checkpoint.pt``: weights, optimiser, step, history; all tensors, read back weights-only), logs the validation
metric and writes the final model file (:mod:`nephireg.nephi.model_io`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from dataclasses import field as default_of
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nephireg.nephi.data import Pair, Volume, load_pairs, load_volumes
from nephireg.nephi.encoder import Encoder, EncoderConfig
from nephireg.nephi.field import Codes, FieldConfig, NePhiNet
from nephireg.nephi.model_io import save_model
from nephireg.nephi.objective import LossSettings, PairImages, pair_loss
from nephireg.nephi.synthetic import SyntheticPair, WarpSettings, make_pair
from nephireg.protocol import PRESETS

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    out: str  # final model file
    workdir: str  # checkpoints and log
    pairs_csv: Optional[str] = None
    volumes_csv: Optional[str] = None
    steps: int = 1000
    learning_rate: float = 1e-3
    input_shape: Tuple[int, int, int] = (96, 96, 96)
    similarity_points: int = 4000
    gradicon_points: int = 100
    gradicon_weight: float = 1.0
    prior_weight: float = 0.01
    # weight of the known-warp error on synthetic pairs (mean ||T(phi(x)) - x|| + mean ||phi^-1(y) - T(y)||,
    # normalised units); 0 = unsupervised (similarity + GradICON only, as for real pairs)
    supervised_weight: float = 10.0
    synthetic_fraction: float = 1.0  # share of steps on synthetic pairs when both sources are given
    warp_amplitude: float = 0.05
    warp_affine: float = 1.0  # synthetic affine ranges as a fraction of WarpSettings' (3 deg, 3 %, 0.03)
    checkpoint_every: int = 100
    validate_every: int = 100
    validation_pairs: int = 4
    seed: int = 0
    resume: bool = False
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    field: Dict = default_of(default_factory=dict)  # FieldConfig overrides
    encoder: Dict = default_of(default_factory=dict)  # EncoderConfig overrides (besides input_shape)
    # intended use, written into the model file's metadata["intended_use"] (nephireg.modelstore.INTENDED_USE_KEYS):
    # what the training images show and which preset's intensity normalisation they had
    anatomy: str = ""
    modality: str = ""
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.pairs_csv and not self.volumes_csv:
            raise ValueError("training needs --pairs and/or --volumes")
        if self.steps < 1 or self.learning_rate <= 0:
            raise ValueError("steps must be >= 1 and the learning rate positive")
        if self.supervised_weight < 0 or self.warp_affine < 0:
            raise ValueError("supervised_weight and warp_affine must be >= 0")
        if "input_shape" in self.encoder:
            raise ValueError("set the encoder's input shape with input_shape (--input-size), not in encoder")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")

    def intended_use(self) -> Optional[Dict[str, str]]:
        """``{"anatomy", "modality", "preset"}`` when all three are given, else None (unknown use)."""
        values = {"anatomy": self.anatomy, "modality": self.modality, "preset": self.preset}
        return values if all(values.values()) else None


class Trainable(nn.Module):
    """Encoder + field; ``forward`` returns the loss terms of one pair (DDP hooks run on this call)."""

    def __init__(self, encoder: Encoder, net: NePhiNet, losses: LossSettings, supervised_weight: float = 0.0
                 ) -> None:
        super().__init__()
        self.encoder, self.net, self.losses = encoder, net, losses
        self.supervised_weight = supervised_weight

    def forward(self, images: PairImages, generator: torch.Generator,
                synthetic: Optional[SyntheticPair] = None) -> Dict[str, torch.Tensor]:
        global_code, local = self.encoder(images.fixed, images.moving)
        codes = (global_code[0], local[0])
        terms = pair_loss(self.net, codes, images, self.losses, generator)
        if synthetic is not None and self.supervised_weight > 0:
            # the synthetic warp is known: a direct target for both maps (much faster to learn from than NCC)
            count = max(16, self.losses.similarity_points // 4)
            x = images.fixed_points.sample(count, generator)
            y = images.moving_points.sample(count, generator)
            terms["supervised"] = 0.5 * (known_warp_error(self.net, codes, synthetic, x).mean()
                                         + inverse_warp_error(self.net, codes, synthetic, y).mean())
            terms["total"] = terms["total"] + self.supervised_weight * terms["supervised"]
        return terms


def known_warp_error(net: NePhiNet, codes: Codes, synthetic: SyntheticPair, points: torch.Tensor) -> torch.Tensor:
    """(P,) ``||T(phi(x)) - x||`` at fixed-image points (P, 3), normalised units: 0 for a perfect forward map."""
    return (synthetic.warp_points(net.transform(points, codes)) - points).norm(dim=1)


def inverse_warp_error(net: NePhiNet, codes: Codes, synthetic: SyntheticPair, points: torch.Tensor) -> torch.Tensor:
    """(P,) ``||phi^-1(y) - T(y)||`` at moving-image points (P, 3), normalised units (phi^-1 should be T)."""
    return (net.transform(points, codes, inverse=True) - synthetic.warp_points(points)).norm(dim=1)


def train(config: TrainConfig, log: Callable[[str], None] = print) -> Dict:
    """Run (or resume) training; returns the final metadata. Rank 0 writes files."""
    rank, world = _init_distributed()
    torch.manual_seed(config.seed + rank)
    workdir = Path(config.workdir)
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    shape = tuple(config.input_shape)
    pairs = load_pairs(Path(config.pairs_csv), shape) if config.pairs_csv else []
    volumes = load_volumes(Path(config.volumes_csv), shape) if config.volumes_csv else []
    encoder = Encoder(EncoderConfig(input_shape=shape, **config.encoder))
    model = Trainable(encoder, NePhiNet(FieldConfig(**config.field), config.seed),
                      LossSettings(config.similarity_points, config.gradicon_points, config.gradicon_weight,
                                   config.prior_weight), config.supervised_weight)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    state = {"step": 0, "history": [], "seconds": 0.0}
    if config.resume and (workdir / CHECKPOINT).is_file():
        state = _load_checkpoint(workdir / CHECKPOINT, model, optimiser)
        log(f"resumed from step {state['step']}")
    runner = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    warp = warp_settings(config)
    validation = _validation_set(volumes, warp, config) if rank == 0 else []
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank + 7919 * state["step"])
    started = time.perf_counter() - state["seconds"]
    model.train()
    for step in range(state["step"] + 1, config.steps + 1):
        images, synthetic = _draw(pairs, volumes, warp, config, generator)
        optimiser.zero_grad(set_to_none=True)
        terms = runner(images, generator, synthetic)
        terms["total"].backward()
        optimiser.step()
        state["step"], state["seconds"] = step, time.perf_counter() - started
        if rank == 0 and (step % config.validate_every == 0 or step == config.steps):
            record = {"step": step, "seconds": round(state["seconds"], 1),
                      "loss": round(float(terms["total"].detach()), 5), **_validate(model, validation, config)}
            state["history"].append(record)
            log(json.dumps(record))
        out_of_time = _out_of_time(config, state["seconds"], world)
        if rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
            _save_checkpoint(workdir / CHECKPOINT, model, optimiser, state)
        if out_of_time:
            log(f"time limit of {config.max_minutes} min reached at step {step}")
            break
    metadata = _metadata(config, state, pairs, volumes, world)
    if rank == 0:
        save_model(config.out, model.net, model.encoder, metadata)
        (workdir / "training.json").write_text(json.dumps(metadata, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metadata


def warp_settings(config: TrainConfig) -> WarpSettings:
    """The synthetic warps of a training run: velocity std and affine ranges from the configuration."""
    base = WarpSettings()
    return WarpSettings(amplitude=config.warp_amplitude, rotation_deg=base.rotation_deg * config.warp_affine,
                        scale=base.scale * config.warp_affine, translation=base.translation * config.warp_affine)


def _out_of_time(config: TrainConfig, seconds: float, world: int) -> bool:
    """Whether the time limit is reached; under DDP rank 0 decides, so every process stops at the same step."""
    flag = torch.tensor([float(config.max_minutes > 0 and seconds >= 60.0 * config.max_minutes)])
    if world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _init_distributed() -> Tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _draw(pairs: List[Pair], volumes: List[Volume], warp: WarpSettings, config: TrainConfig,
          generator: torch.Generator) -> Tuple[PairImages, Optional[SyntheticPair]]:
    """One training pair: its images, and the synthetic pair (with its known warp) when it is synthetic."""
    use_synthetic = volumes and (not pairs or float(torch.rand(1, generator=generator)) < config.synthetic_fraction)
    if use_synthetic:
        vol = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        p = make_pair(vol.image, vol.mask, warp, generator)
        return PairImages.build(p.fixed, p.moving, p.fixed_mask, p.moving_mask), p
    pair = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
    return PairImages.build(pair.fixed.image, pair.moving.image, pair.fixed.mask, pair.moving.mask), None


def _validation_set(volumes: List[Volume], warp: WarpSettings, config: TrainConfig):
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    return [make_pair(volumes[i % len(volumes)].image, volumes[i % len(volumes)].mask, warp, generator)
            for i in range(config.validation_pairs if volumes else 0)]


def _validate(model: Trainable, pairs, config: TrainConfig) -> Dict[str, float]:
    """Mean error ||T(phi(x)) - x|| over masked points of held-out synthetic pairs, in input-grid voxels, before
    (phi = identity) and after prediction."""
    if not pairs:
        return {}
    model.eval()
    before, after = [], []
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pairs:
            images = PairImages.build(p.fixed, p.moving, p.fixed_mask, p.moving_mask)
            x = images.fixed_points.sample(4000, generator)
            g, local = model.encoder(p.fixed, p.moving)
            phi = model.net.transform(x, (g[0], local[0]))
            half = (torch.tensor(config.input_shape[::-1], dtype=x.dtype) - 1) / 2  # normalised -> voxels
            before.append(((p.warp_points(x) - x) * half).norm(dim=1).mean())
            after.append(((p.warp_points(phi) - x) * half).norm(dim=1).mean())
    model.train()
    return {"val_error_before_vox": round(float(torch.stack(before).mean()), 4),
            "val_error_vox": round(float(torch.stack(after).mean()), 4)}


def _save_checkpoint(path: Path, model: Trainable, optimiser, state: Dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"encoder": model.encoder.state_dict(), "net": model.net.state_dict(),
                "optimiser": optimiser.state_dict(), "state": json.dumps(state)}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: Trainable, optimiser) -> Dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    model.encoder.load_state_dict(data["encoder"])
    model.net.load_state_dict(data["net"])
    optimiser.load_state_dict(data["optimiser"])
    return json.loads(data["state"])


def _metadata(config: TrainConfig, state: Dict, pairs, volumes, world: int) -> Dict:
    return {"recipe": asdict(config), "steps": state["step"], "seconds": round(state["seconds"], 1),
            "processes": world, "history": state["history"],
            "data": {"pairs": [[p.fixed.name, p.moving.name] for p in pairs],
                     "volumes": [v.name for v in volumes]},
            "torch": torch.__version__, "intended_use": config.intended_use()}
