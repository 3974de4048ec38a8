"""`ferrum-jax`: generate, convert, info and bench from the command line."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from ferrum_jax.dtypes import DTYPE_NAMES
from ferrum_jax.errors import FerrumError


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a one-line `FerrumError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FerrumError.invalid_parameter(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="ferrum-jax", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=None,
            help="HF directory, .gguf file or orbax directory (default: embedded SmolLM2)",
        )
        p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    gen = commands.add_parser("generate", help="generate text, streamed to stdout")
    model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead")
    gen.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,model=2")

    convert = commands.add_parser("convert", help="convert an HF or GGUF checkpoint to orbax")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    convert.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    info = commands.add_parser("info", help="describe a model and the devices")
    model_args(info)
    info.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="measure throughput against HF transformers")
    model_args(bench)
    bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--compare", choices=("hf",), default=None)
    bench.add_argument("--repeat", type=int, default=3)
    bench.add_argument("--json", dest="json_path", default=None, metavar="FILE")
    bench.add_argument("--plot", default=None, metavar="FILE.png")
    bench.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,model=2")
    return parser


def _load(args: argparse.Namespace, mesh_spec: str | None = None):
    from ferrum_jax import sharding
    from ferrum_jax.checkpoint import load_model

    mesh = sharding.mesh_from_spec(mesh_spec) if mesh_spec else None
    return load_model(args.model, dtype=args.dtype, mesh=mesh)


def _generate(args: argparse.Namespace) -> int:
    from ferrum_jax.sampling import SamplingParams
    from ferrum_jax.streaming import stream_tokens

    sampling = SamplingParams.make(
        1,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
    )
    from ferrum_jax import sharding

    loaded = _load(args, args.mesh)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise FerrumError.tokenizer(f"{loaded.source} ships no tokenizer; cannot encode a prompt")
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    stop_tokens = tokenizer.eos_token_ids or loaded.config.eos_token_ids
    timings: dict[str, float] = {}
    detokenizer = tokenizer.stream_decoder(skip_special_tokens=True)
    token_ids: list[int] = []
    text: list[str] = []
    finish_reason = "length"
    primary = sharding.is_primary()
    for token in stream_tokens(
        loaded,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        stop_tokens=stop_tokens,
        timings=timings,
    ):
        token_ids.append(token.token_id)
        if token.stop:
            finish_reason = "stop"
            break
        piece = detokenizer.push(token.token_id)
        text.append(piece)
        if not args.json and primary:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = detokenizer.flush()
    text.append(tail)
    generated = len(token_ids)
    decode_s = timings.get("decode_s", 0.0)
    report = {
        "text": "".join(text),
        "token_ids": token_ids,
        "prompt_token_ids": list(prompt_ids),
        "finish_reason": finish_reason,
        "timings": {
            "prefill_s": timings.get("prefill_s", 0.0),
            "decode_s": decode_s,
            "decode_tok_s": (generated - 1) / decode_s if decode_s and generated > 1 else 0.0,
        },
    }
    if primary:
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            sys.stdout.write(tail + "\n")
            sys.stdout.flush()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ferrum_jax.checkpoint import load_model, save_orbax
    from ferrum_jax.checkpoint.orbax import check_destination

    start = time.perf_counter()
    check_destination(args.dst)  # before the (slow) load
    loaded = load_model(args.src, dtype=args.dtype)
    save_orbax(loaded, args.dst)
    print(
        f"converted {loaded.format} {args.src} -> orbax {args.dst} "
        f"({args.dtype}, {time.perf_counter() - start:.1f}s)"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    import jax

    loaded = _load(args)
    config = loaded.config
    report: dict[str, Any] = {
        "source": loaded.source,
        "format": loaded.format,
        "architecture": config.architecture,
        "parameters": config.num_params,
        "dtype": args.dtype,
        "parameter_bytes": loaded.param_bytes,
        "kv_bytes_per_token": config.kv_bytes_per_token(loaded.dtype.itemsize),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "tokenizer": loaded.tokenizer is not None,
        "devices": [str(d) for d in jax.devices()],
    }
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ferrum_jax.bench import run_bench

    return run_bench(args)


def _enable_compilation_cache() -> None:
    """Keeps compiled programs on disk, so a second run starts without compiling.

    `JAX_COMPILATION_CACHE_DIR` overrides the location; an empty value disables it.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:
        return  # JAX reads it itself
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(cache / "ferrum-jax" / "xla"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ferrum-jax` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _enable_compilation_cache()
    try:
        args = _parser().parse_args(argv)
        handler = {
            "generate": _generate,
            "convert": _convert,
            "info": _info,
            "bench": _bench,
        }[args.command]
        return handler(args)
    except FerrumError as e:
        if debug:
            raise
        print(f"ferrum-jax: error: {e}", file=sys.stderr)
        return 2 if e.kind.value == "invalid_parameter" else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
