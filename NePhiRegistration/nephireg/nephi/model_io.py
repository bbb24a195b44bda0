"""NePhi model files: one file = configuration + weights (incl. the Fourier matrix) + engine version + training
metadata, written with ``torch.save`` and read with ``torch.load(weights_only=True)``, so loading a file never
executes code from it. Every failure is an :class:`nephireg.errors.InputError` naming the file and the problem.

File layout (a dict of plain containers and tensors)::

    {"format": "nephireg-nephi-model", "format_version": 1, "engine_version": "0.1.0",
     "field_config": {...}, "encoder_config": {...} | None, "net": state_dict, "encoder": state_dict | None,
     "metadata": {...}}

``metadata["intended_use"]`` = ``{"anatomy", "modality", "preset"}`` (or None) states what the model was trained
for; :func:`nephireg.modelstore.intended_use` reads it (without torch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from nephireg import __version__
from nephireg.errors import InputError
from nephireg.nephi.encoder import Encoder, EncoderConfig
from nephireg.nephi.field import FieldConfig, NePhiNet

FORMAT = "nephireg-nephi-model"
FORMAT_VERSION = 1


@dataclass
class NePhiModel:
    net: NePhiNet
    encoder: Optional[Encoder]
    metadata: Dict[str, Any]

    def predict_codes(self, fixed: torch.Tensor, moving: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Latent codes (G,), (L, z, y, x) for one pair of (1, 1, Z, Y, X) images."""
        if self.encoder is None:
            raise InputError("this NePhi model has no encoder, so it cannot predict")
        self.encoder.eval()
        global_code, local = self.encoder(fixed, moving)
        return global_code[0], local[0]

    def to(self, device: torch.device) -> NePhiModel:
        self.net.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self


def save_model(path: os.PathLike, net: NePhiNet, encoder: Optional[Encoder], metadata: Mapping[str, Any]) -> None:
    """Write a model file atomically (:func:`nephireg.resultdir.staged_file`: a private file renamed into place;
    the caller decides beforehand whether an existing file may be replaced)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": __version__,
               "field_config": net.config.to_dict(),
               "encoder_config": None if encoder is None else encoder.config.to_dict(),
               "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "encoder": None if encoder is None else {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
               # through JSON: plain containers only, which weights-only loading accepts
               "metadata": json.loads(json.dumps(dict(metadata), default=str))}
    from nephireg.resultdir import staged_file

    with staged_file(path, overwrite=True) as staged:
        torch.save(payload, staged)


def read_payload(path: os.PathLike) -> Dict[str, Any]:
    """The file's dict, after the format checks (no code runs: weights-only unpickling)."""
    if not os.path.isfile(path):
        raise InputError("model file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all mean the same here
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise InputError("refused: the file holds objects other than weights (loading it could run code)",
                             path) from None
        raise InputError(f"corrupt or not a model file ({text})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"not a NePhi model file (format is not {FORMAT!r})", path)
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"incompatible model file: format version {version!r}, this engine "
                         f"(nephireg {__version__}) reads version {FORMAT_VERSION}", path)
    return payload


def load_model(path: os.PathLike, device: Optional[torch.device] = None) -> NePhiModel:
    """Load a model file (see the module docstring); errors name the file and the problem."""
    payload = read_payload(path)
    try:
        net = NePhiNet(FieldConfig.from_dict(payload["field_config"]))
        net.load_state_dict(payload["net"])
        encoder = None
        if payload.get("encoder_config") is not None:
            encoder = Encoder(EncoderConfig.from_dict(payload["encoder_config"]))
            encoder.load_state_dict(payload["encoder"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        text = str(exc).splitlines()[0]
        raise InputError(f"incompatible model file: {text}", path) from None
    model = NePhiModel(net.eval(), encoder.eval() if encoder else None, dict(payload.get("metadata") or {}))
    return model.to(device) if device is not None else model
