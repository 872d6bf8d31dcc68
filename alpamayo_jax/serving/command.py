"""`alpamayo-jax serve`: the command line of `alpamayo_jax.serving`.

`add_arguments(parser)` declares the flags on an (sub)parser and `main(args) -> int` runs the
server until SIGTERM / SIGINT (0 on a clean stop). Option checks (sampling values, camera map,
warm-up sizes, missing `serve` extra) fail before the model loads, with the CLI's one-line
`ValueError` messages. The model and sampling flags are those of `infer` (checked by the same
`alpamayo_jax.cli` helpers); the sampling ones are the defaults of every request.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from alpamayo_jax.serving.cameras import CameraMap

DEFAULT_WARMUP_SIZE = "1080x1920"


def _warmup_size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 1080x1920, got {value!r}")
    return int(match[1]), int(match[2])


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 65535 (0: any free port), got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags. Imports nothing of the `serve` extra."""
    from alpamayo_jax.cli import _existing_dir, _seed

    model = parser.add_argument_group("model (as for `infer`)")
    model.add_argument("--model", type=_existing_dir, required=True, help="bundle or Hugging Face directory")
    model.add_argument("--processor-dir", type=_existing_dir, help="tokenizer/template for a Hugging Face --model")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as stored)")
    model.add_argument("--mesh", help="device mesh over this host's devices: a preset (single, model2, data8, ...) "
                                      "or DATAxMODEL; default: no mesh (one device)")
    model.add_argument("--served-model-name", help="the model id of /v1/models and of responses (default: the "
                                                  "--model directory's name)")

    sampling = parser.add_argument_group("request defaults (a NIM request may override each)")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    sampling.add_argument("--num-samples", type=int, help="trajectories per request, NIM's num_traj_samples "
                                                         "(default: 1)")
    sampling.add_argument("--seed", type=_seed, default=0, help="seed of a NIM request that gives none, 0 .. 2**32 - 1 "
                                                              "(default: 0); AlpaSim sessions bring their own")
    sampling.add_argument("--temperature", type=float, help="sampling temperature (default: the reference's 0.6)")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling mass, 1 disables it (default: the "
                                                      "reference's 0.98)")
    sampling.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 disables it (default: the "
                                                    "reference's none)")
    sampling.add_argument("--max-new-tokens", type=int, help="reasoning token budget, NIM's max_generation_length "
                                                             "(default: the checkpoint's tokens_per_future_traj)")
    sampling.add_argument("--num-flow-steps", type=int,
                          help="Euler steps of flow matching (default: the checkpoint's num_inference_steps)")

    serving = parser.add_argument_group("serving")
    serving.add_argument("--host", default="127.0.0.1",
                         help="address both servers bind (default: 127.0.0.1, loopback only; 0.0.0.0 for all)")
    serving.add_argument("--http-port", type=_port, default=8000, help="NIM-style HTTP API (default: 8000; 0: any)")
    serving.add_argument("--alpasim-port", type=_port, default=50051,
                         help="AlpaSim egodriver gRPC (default: 50051; 0: any)")
    serving.add_argument("--alpasim-mode", choices=["alpasim", "carla"], default="alpasim",
                         help="who drives the egodriver: an AlpaSim runtime (default; pickled debug dict) or a "
                              "carla-driver-interface CARLA runtime (carla-driver-interface's --mode)")
    serving.add_argument("--camera-map", action="append", default=[], metavar="MODEL=SESSION",
                         help="feed model camera MODEL (camera_front_wide_120fov, ...; '*' for all) from session "
                              "camera SESSION; repeatable (default: the session's cameras of the model's ids)")
    serving.add_argument("--warmup-size", type=_warmup_size, action="append", metavar="HxW",
                         help=f"frame size to compile before ready, repeatable (default: {DEFAULT_WARMUP_SIZE}; "
                              "sizes of one aspect ratio share one compilation)")
    serving.add_argument("--max-batch-clips", type=int, default=1, metavar="N",
                         help="run up to N waiting requests of the same shape and settings as one batch, each with "
                              "its own seed's key, so results do not depend on the load (default: 1, no batching; "
                              "warm-up compiles batches of 1, 2, 4, ... N)")
    serving.add_argument("--grpc-workers", type=int, default=8, help="egodriver handler threads (default: 8)")
    serving.add_argument("--shutdown-grace", type=float, default=30.0,
                         help="seconds queued requests may still run after SIGTERM (default: 30)")
    serving.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO)")


def main(args: argparse.Namespace) -> int:
    """Runs the server of `args` (from `add_arguments`) until stopped; 0 on a clean stop. Raises
    ValueError / OSError with a one-line message for bad options (the CLI prints them)."""
    import logging

    from alpamayo_jax import cli
    from alpamayo_jax.serving.dependencies import MissingServeDependency, require

    try:
        require("fastapi", "uvicorn", "pydantic", "grpc", "carla_driver_interface")
    except MissingServeDependency as error:
        print(f"alpamayo-jax serve: error: {error}", file=sys.stderr)
        return 1
    if args.grpc_workers < 1:
        raise ValueError(f"--grpc-workers must be >= 1, got {args.grpc_workers}")
    if args.max_batch_clips < 1:
        raise ValueError(f"--max-batch-clips must be >= 1, got {args.max_batch_clips}")
    if args.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    camera_map = CameraMap.parse(args.camera_map)
    # `infer`'s checks and loader; serving is one host (no --distributed).
    args.distributed, args.coordinator, args.num_processes, args.process_id = False, None, None, None
    _, settings = cli._checked_model(args)
    if args.mesh is not None:
        from alpamayo_jax.sharding import mesh_shape

        mesh_shape(args.mesh)  # a bad name fails here, not after the HTTP server started
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from alpamayo_jax.serving.server import ServeConfig, Server

    config = ServeConfig(
        host=args.host, http_port=args.http_port, alpasim_port=args.alpasim_port, alpasim_mode=args.alpasim_mode,
        grpc_workers=args.grpc_workers, camera_map=camera_map,
        warmup_sizes=tuple(args.warmup_size or [_warmup_size(DEFAULT_WARMUP_SIZE)]),
        max_batch_clips=args.max_batch_clips,
        model_name=args.served_model_name or Path(args.model).resolve().name, default_seed=args.seed,
        shutdown_grace_s=args.shutdown_grace)
    return Server(config, load=lambda: cli._load_pipeline(args), settings=settings).run()
