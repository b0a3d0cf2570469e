"""`clm serve`: an OpenAI-compatible server where every request sets its own alpha (clm_ext.serve)."""
from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

from ..sources import DEFAULT_MODEL
from . import UsageError
from ._checks import check_device

# The real demo's trained layers, served by default with the default model: the block layer (the one the demo
# measured best) when the checkout has it, else the older linear layer.
DEMO_DIR = Path(__file__).resolve().parents[2] / "docs" / "demo"
DEMO_LAYERS = (DEMO_DIR / "smollm2-block-layer", DEMO_DIR / "smollm2-layer")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a checkpoint directory, a .gguf file or a packaged model (default {DEFAULT_MODEL})")
    parser.add_argument("--alignment", help="a trained layer, linear or block (save_alignment / clm train), served in "
                        "mode 'embed'; default: the demo's trained block layer for the default model (its linear layer "
                        "if the block layer is absent), else the identity (alpha has no effect)")
    parser.add_argument("--mode", choices=("embed", "logits"), default="embed",
                        help="embed (default): one stream, alpha mixes the layer's output per token; logits: two "
                        "streams per request (base and aligned) in every forward, their logits mixed by alpha "
                        "(the paper's merge; twice the compute and KV cache)")
    parser.add_argument("--served-model-name", help="the name clients send as 'model' (default: the --model name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--alpha-default", type=float, default=1.0, help="alpha of a request that sets none")
    parser.add_argument("--alpha-range", default="-2,4", help="accepted alphas, LOW,HIGH (default -2,4)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests in flight (running or waiting) before new ones get HTTP 429 (default 64)")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per forward (default 256)")
    parser.add_argument("--cache-blocks", type=int, default=128,
                        help="paged KV cache size in pages of --page-size tokens (default 128)")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per cache page (default 64)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def _alpha_range(text: str) -> tuple:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--alpha-range must be LOW,HIGH (two numbers), got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise UsageError(f"--alpha-range must be finite with LOW <= HIGH, got {text!r}")
    return low, high


def _check_args(args) -> tuple:
    alpha_range = _alpha_range(args.alpha_range)
    if not (math.isfinite(args.alpha_default) and alpha_range[0] <= args.alpha_default <= alpha_range[1]):
        raise UsageError(f"--alpha-default {args.alpha_default} is outside --alpha-range {args.alpha_range}")
    for name in ("max_queue", "max_batch_tokens", "cache_blocks", "page_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    with socket.socket() as s:  # fail before loading the model, not after
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    return alpha_range


def _alignment_dir(args):
    if args.alignment:
        if not Path(args.alignment).is_dir():
            raise UsageError(f"--alignment {args.alignment} is not a directory")
        return args.alignment
    if args.model == DEFAULT_MODEL:
        return next((str(layer) for layer in DEMO_LAYERS if layer.is_dir()), None)
    return None


def _describe_layer(model, directory, merge: str) -> str:
    """The start-up line's account of the layer served: which directory, which kind, which mode."""
    from clm_ext.model import alignment_site, read_alignment_config

    if directory is None:
        return "identity (no trained layer: every alpha gives the base model)"
    site = alignment_site(model)
    saved = read_alignment_config(directory).get("mode")
    trained = f", trained in mode {saved!r}" if saved != merge else ""
    demo = " (the demo's layer)" if Path(directory) in DEMO_LAYERS else ""
    streams = " (two streams per request)" if merge == "logits" else ""
    return f"{directory}{demo}: layer {site.layer_kind!r} served in mode {merge!r}{streams}{trained}"


def _load(args, alignment) -> tuple:
    """The model, its layer and the running engine; every error a start-up UsageError of one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import clm_ext
    from clm_ext.serve.engine import Engine, EngineConfig
    from clm_ext.sources import ModelSourceError, resolve_model

    try:
        model_dir = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    except (ModelSourceError, OSError, ValueError) as e:
        raise UsageError(f"cannot load --model {args.model}: {e}".splitlines()[0]) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    try:
        if alignment:  # loaded in mode 'embed' whatever it was trained in; --mode logits runs it as two streams
            clm_ext.load_alignment(model, alignment, mode="embed")
        else:
            clm_ext.add_alignment_control(model)
        config = EngineConfig(max_queue=args.max_queue, page_size=args.page_size, num_blocks=args.cache_blocks,
                              max_batch_tokens=args.max_batch_tokens)
        return model_dir, tokenizer, model, Engine(model, tokenizer, config, merge=args.mode)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def run(args) -> int:
    import asyncio

    import torch

    import clm_ext
    from clm_ext.serve.app import create_app
    from clm_ext.serve.batch_hooks import RequestSpec
    from clm_ext.serve.protocol import Limits
    from clm_ext.serve.threads import in_passing_thread

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a server's log, and a start-up error, stay one line each
    alpha_range = _check_args(args)
    if args.device:
        check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    alignment = _alignment_dir(args)
    model_dir, tokenizer, model, engine = in_passing_thread(lambda: _load(args, alignment))
    described = _describe_layer(model, alignment, args.mode)
    name = args.served_model_name or (args.model if args.model == DEFAULT_MODEL else Path(args.model).name)
    dials = clm_ext.model.alignment_site(model).dial_names
    limits = Limits(model_name=name, alpha_default=args.alpha_default, alpha_range=alpha_range,
                    max_context=engine.max_context, dials=None if dials is None else tuple(dials))

    async def warm_up():  # the engine's first request pays its set-up: do it before serving
        warm = RequestSpec(alpha=0.0 if dials is None else (0.0,) * len(dials))
        async for _ in engine.generate(tokenizer("warm up")["input_ids"], warm, 2):
            pass

    asyncio.run(warm_up())
    device = next(model.parameters()).device
    print(f"clm serve: model {name!r} from {model_dir} on {device}; alignment: {described}; alpha default "
          f"{args.alpha_default:g}, range [{alpha_range[0]:g}, {alpha_range[1]:g}]; up to {engine.max_context} "
          f"tokens per request, --max-queue {args.max_queue}; http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    return serve_until_stopped(engine, create_app(engine, limits, described), args.host, args.port)


def serve_until_stopped(engine, app, host: str, port: int) -> int:
    """Serve until interrupted (exit 0) or until the generation engine dies (exit 1, one line on stderr): a
    server whose engine is gone can only answer errors, so it exits for a supervisor to restart it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    died = []

    def on_death(reason: str) -> None:
        died.append(reason)
        print(f"clm serve: {reason}; exiting", file=sys.stderr, flush=True)
        server.should_exit = True

    engine.watch(on_death)
    try:
        server.run()
    finally:
        engine.stop()
    return 1 if died else 0
