"""``nephireg train`` and ``nephireg models``: the NePhi subcommands of the engine's command line.

The engine's ``cli.py`` calls :func:`add_subcommands`; each subcommand sets ``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List

from nephireg.errors import InputError
from nephireg.protocol import PRESETS


def add_subcommands(subparsers) -> None:
    _add_train(subparsers)
    _add_models(subparsers)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a NePhi model (single process, or under torchrun with DDP)",
                              description="Train a NePhi model on a CSV of pairs and/or synthetic pairs made from "
                                          "a CSV of volumes (see docs/nephi.md).")
    p.add_argument("--pairs", dest="pairs_csv", help="CSV: fixed,moving[,fixed_mask,moving_mask][,window_lo,window_hi]")
    p.add_argument("--volumes", dest="volumes_csv", help="CSV: image[,mask][,window_lo,window_hi] for synthetic pairs")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out model file")
    p.add_argument("--workdir", required=True, help="folder for checkpoints and the training log")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", dest="learning_rate", type=float, default=1e-3)
    p.add_argument("--input-size", type=int, default=96, help="encoder input cube edge, voxels (> 64)")
    p.add_argument("--similarity-points", type=int, default=4000)
    p.add_argument("--gradicon-points", type=int, default=100)
    p.add_argument("--regularization", dest="gradicon_weight", type=float, default=1.0)
    p.add_argument("--supervised-weight", type=float, default=10.0,
                   help="weight of the known-warp error on synthetic pairs (0: unsupervised)")
    p.add_argument("--warp-amplitude", type=float, default=0.05, help="synthetic velocity std, normalised units")
    p.add_argument("--warp-affine", type=float, default=1.0,
                   help="synthetic affine ranges as a fraction of 3 deg, 3 %%, 0.03 normalised (0: no affine)")
    p.add_argument("--local-convs", type=int, default=0,
                   help="stride-1 conv blocks on the encoder's local branch (0: the paper's encoder)")
    p.add_argument("--validate-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this long (0: no limit)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR/checkpoint.pt")
    use = p.add_argument_group("intended use (stored in the model file; a run on another preset warns)")
    use.add_argument("--anatomy", default="", help="what the training images show, e.g. lung, brain")
    use.add_argument("--modality", default="", help="imaging modality of the training images, e.g. CT, MRI")
    use.add_argument("--preset", choices=PRESETS, default=None,
                     help="the preset whose intensity normalisation the training images had")
    p.set_defaults(func=run_train)


def _add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list NePhi models (shipped, registry, user cache) or fetch one")
    p.add_argument("--json", action="store_true", help="machine-readable list")
    p.add_argument("--fetch", metavar="NAME", help="download a registry model into the cache (checksum verified)")
    p.add_argument("--info", metavar="PATH_OR_NAME", help="show a model file's configuration and training metadata")
    p.set_defaults(func=run_models)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from nephireg.nephi.train import TrainConfig, train
    from nephireg.validate import check_output_file

    try:  # before any work: the model file may not replace a file (without --overwrite) or an input
        check_output_file(args.out, args.overwrite, [args.pairs_csv, args.volumes_csv, args.workdir])
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(exc.exit_code)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = TrainConfig(out=args.out, workdir=args.workdir, pairs_csv=args.pairs_csv,
                             volumes_csv=args.volumes_csv, steps=args.steps, learning_rate=args.learning_rate,
                             input_shape=(args.input_size,) * 3, similarity_points=args.similarity_points,
                             gradicon_points=args.gradicon_points, gradicon_weight=args.gradicon_weight,
                             supervised_weight=args.supervised_weight,
                             warp_amplitude=args.warp_amplitude, warp_affine=args.warp_affine,
                             encoder={"local_convs": args.local_convs}, validate_every=args.validate_every,
                             checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                             seed=args.seed, resume=args.resume, field={"hidden": args.hidden},
                             anatomy=args.anatomy, modality=args.modality, preset=args.preset or "")
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(InputError.exit_code)
    try:
        train(config, log=lambda line: print(line, flush=True))
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(exc.exit_code)
    return 0


def run_models(args: argparse.Namespace) -> int:
    try:
        return _models(args)
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(exc.exit_code)


def _models(args: argparse.Namespace) -> int:
    from nephireg import modelstore

    if args.fetch:
        path = modelstore.resolve_model(args.fetch, progress=_progress)
        print(path)
        return 0
    if args.info:
        return _info(modelstore.resolve_model(args.info))
    models = modelstore.list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"cache: {modelstore.cache_dir()}")
    for m in models:
        flag = "*" if m["default"] else " "
        where = m["path"] or (f"not downloaded ({m['url']})" if m["url"] else "missing from the package")
        preset = m["preset"] or "?"
        default_for = f" (default for {', '.join(m['default_for'])})" if m["default_for"] else ""
        print(f"{flag} {m['name']:<24} {m['anatomy']:<8} {m['modality']:<5} {preset:<10} {m['source']:<8} "
              f"{where}{default_for}")
    print("* default for every other preset; columns: name, anatomy, modality, preset trained for, source, file")
    return 0


def _info(path: str) -> int:
    from nephireg.nephi.model_io import read_payload

    payload = read_payload(path)
    keys: List[str] = ["format", "format_version", "engine_version", "field_config", "encoder_config"]
    info = {k: payload.get(k) for k in keys}
    meta = payload.get("metadata") or {}
    info["metadata"] = {k: v for k, v in meta.items() if k != "history"}
    info["metadata"]["last_validation"] = (meta.get("history") or [None])[-1]
    print(json.dumps(info, indent=2, default=str))
    return 0


def _progress(done: int, total) -> None:
    text = f"{done / 1e6:.1f} MB" + (f" / {total / 1e6:.1f} MB" if total else "")
    sys.stderr.write(f"\r  downloading {text}   ")
    sys.stderr.flush()
