"""`--ray [ADDRESS]`, `--out DIR` and friends on `ict score` and `ict index`; `ict index --ingest DIR`.

ict_core.cli calls register() once its subcommands exist; the options are added to the `score` and
`index` parsers, and their command functions are wrapped so that the plain path runs unchanged when
--ray is not given. Nothing here imports Ray or pyarrow until a --ray or --ingest run needs them.
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from ..errors import ICTError, InputError

_ADDRESS = re.compile(r"(auto|local|ray://\S+|[\w.-]+:\d+)$")


def register(subparsers, *, model_path) -> None:
    """Add the Ray options to the `score` and `index` subcommands of the `ict` parser; model_path
    resolves --model/--hp-model as the plain commands do (it is bound into each command's function)."""
    for name, positional in (("score", "images"), ("index", "paths")):
        p = subparsers.choices.get(name)
        if p is None:
            continue
        g = p.add_argument_group("many images, many machines (Ray Data; needs the [ray] extra)")
        g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run on Ray: no ADDRESS starts a local Ray for this run; `auto` or ray://HOST:PORT "
                            "joins a cluster. Needs --out. Model files must be at the same path on every node")
        g.add_argument("--out", metavar="DIR", help="with --ray: Parquet folder (new, or an earlier run's), one "
                                                    "row per input path; a re-run skips the inputs with a row")
        g.add_argument("--actors", type=int, metavar="N",
                       help="with --ray: scorer actors (default one per GPU, else 1)")
        g.add_argument("--batch-size", type=int, metavar="B",
                       help="with --ray: images per batch (default 32 on GPU, 8 on CPU)")
        if name == "index":
            g.add_argument("--ingest", action="store_true",
                           help="the DIRs are --out folders of `ict index --ray`: add their rows to the gallery "
                                "without encoding any image")
        p.set_defaults(func=functools.partial(_dispatch, p.get_default("func"), positional, model_path))


def ray_argv(argv: list[str]) -> list[str]:
    """The command line with a bare `--ray` written `--ray=local` where the next argument is not an address:
    `--ray` takes an optional ADDRESS, so argparse would eat the first image after it (`ict score --ray a.png
    b.png`). The `ict` parser applies this before it parses."""
    argv = list(argv)
    for i, a in enumerate(argv[:-1]):
        if a == "--ray" and not (_ADDRESS.match(argv[i + 1]) and not Path(argv[i + 1]).exists()):
            argv[i] = "--ray=local"
    return argv


def _dispatch(plain, positional: str, model_path, args) -> int:
    if getattr(args, "ingest", False):
        return _ingest(args)
    if args.ray is None:
        for opt in ("out", "actors", "batch_size"):
            if getattr(args, opt) is not None:
                raise InputError(f"--{opt.replace('_', '-')} is an option of --ray runs; add --ray (see ict "
                                 f"{args.command} --help)")
        return plain(args)
    return _run(args, getattr(args, positional), model_path)


def _models(args, need_hp: bool, model_path):
    ict = model_path(args.model, "ict", True)
    hp = None if getattr(args, "no_hp", False) else model_path(args.hp_model, "hp", need_hp)
    return str(Path(ict).resolve()), (str(Path(hp).resolve()) if hp else None)


def _run(args, items, model_path) -> int:
    from ..text import check_prompt
    from ..weights import fingerprint
    from . import inputs, output
    from .job import Job, import_ray, run

    if not args.out:
        raise InputError(f"--ray writes its results as Parquet: pass --out DIR "
                         f"(ict {args.command} --ray --out DIR ...)")
    for opt in ("actors", "batch_size"):
        n = getattr(args, opt)
        if n is not None and n < 1:
            raise InputError(f"--{opt.replace('_', '-')} must be at least 1, got {n}; leave it out for the default")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; --out takes a folder (new, or the --out of an earlier run)")
    if getattr(args, "json", False) or getattr(args, "csv", False):
        raise InputError("--json/--csv print results of the plain path; with --ray the results are the Parquet "
                         "files in --out")
    import_ray()  # say how to install Ray before any other work
    prompt = getattr(args, "prompt", None)
    prompt = check_prompt(prompt) if prompt is not None else None
    ict, hp = _models(args, args.command == "score" and prompt is None, model_path)
    paths = inputs.expand(items)
    job = Job(args.command, paths, Path(args.out).resolve(), ict, hp, prompt, args.device,
              args.precision, getattr(args, "config", None), args.actors, args.batch_size, args.quiet)
    job.manifest = {"command": args.command, "prompt": prompt, "ict": fingerprint(ict),
                    "hp": fingerprint(hp) if hp else None, "precision": args.precision,
                    "inputs": output.inputs_digest(paths)}
    address = None if args.ray == "local" else args.ray
    s = run(job, address)
    print(f"{args.command}: {s.new_rows} new row(s) ({s.new_errors} failed), {s.skipped} input(s) already done; "
          f"{job.out} holds {s.rows} row(s) [{s.actors} {s.device} actor(s)]")
    if s.new_errors:
        print(f"ict: {s.new_errors} image(s) could not be read; their rows have an `error`", file=sys.stderr)
    if args.command == "index" and not getattr(args, "no_cache", False):
        _to_gallery(args, job.out)
    if s.new_rows and s.new_errors == s.new_rows:  # as the plain path: nothing at all could be scored
        raise InputError("no image could be scored; see the rows' `error` in --out")
    return 0


def _to_gallery(args, out: Path) -> None:
    from ..cache import EmbeddingCache
    from .output import ingest

    cache = EmbeddingCache(getattr(args, "cache_dir", None))
    try:
        added, failed = ingest(out, cache)
    except ICTError:
        if not cache.memory_only:
            raise
        raise ICTError(f"could not save to the cache folder {cache.path} (read-only, full or not a folder); "
                       f"the rows stay in {out}: pass a writable --cache-dir and run `ict index --ingest {out}`"
                       ) from None
    finally:
        cache.close()
    print(f"gallery: {added} image(s) stored from {out} ({failed} error row(s) skipped) in {cache.path}")


def _ingest(args) -> int:
    if args.ray is not None:
        raise InputError("--ingest reads the Parquet of a finished `ict index --ray` run; drop --ray")
    if getattr(args, "no_cache", False):
        raise InputError("--ingest adds to the embedding cache; drop --no-cache")
    for d in args.paths:
        if not Path(d).is_dir():
            raise InputError(f"{d} is not a folder; --ingest takes the --out folders of `ict index --ray`")
        _to_gallery(args, Path(d))
    return 0
