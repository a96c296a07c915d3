"""The `ict` command line (also `python -m ict_core`)."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import __version__, paths, ranking
from .cli_output import check_copy_to, copy_new, json_safe, tolerant_stdout
from .errors import ICTError, InputError
from .files import image_files

log = logging.getLogger("ict_core")


# --------------------------------------------------------------------------------------------------- helpers
def _model_path(given: str | None, kind: str, required: bool) -> str | None:
    if given:
        return given
    default = paths.default_model(kind)
    if default.exists():
        return str(default)
    if required:
        raise InputError(f"no ICT model: pass --model FILE.safetensors, or run `ict fetch` to put one in {default} "
                         f"(set ${paths.MODELS_ENV} to use another folder)")
    return None


def open_cache(args):
    """The embedding cache for this run, or None with --no-cache or when it cannot be had."""
    if getattr(args, "no_cache", False):
        return None
    try:
        from .cache import EmbeddingCache
    except ImportError as e:  # the cache is an accelerator, never a point of failure
        log.warning("embedding cache unavailable (%s); scoring without it", e)
        return None
    return EmbeddingCache(getattr(args, "cache_dir", None))


def load_scorer(args, need_hp: bool = False):
    from .scorer import Scorer

    model = _model_path(args.model, "ict", True)
    hp = None if getattr(args, "no_hp", False) else _model_path(args.hp_model, "hp", need_hp)
    return Scorer.load(model, hp, device=args.device, precision=args.precision, cache=open_cache(args),
                       config=args.config)


class Progress:
    """tqdm on stderr, adapted to the engine's progress(done, total) callback."""

    def __init__(self, quiet: bool, desc: str):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score(args, need_hp: bool = False):
    images = image_files(args.images)
    scorer = load_scorer(args, need_hp or args.prompt is None)  # no prompt: HP alone
    bar = Progress(args.quiet, "scoring")
    try:
        results = scorer.score(images, args.prompt, progress=bar, labels=images)
    finally:
        bar.close()
    for r in results:
        if r.error:
            print(f"ict: cannot score: {r.error}", file=sys.stderr)  # one line per image; the error names it
    return scorer, results


def _fmt(x):
    return "" if x is None else f"{x:.6f}"


# -------------------------------------------------------------------------------------------------- commands
def cmd_score(args) -> int:
    scorer, results = _score(args)
    if args.json:
        json.dump(json_safe({"model": str(scorer.paths[0]),
                             "hp_model": str(scorer.paths[1]) if scorer.paths[1] else None,
                             "results": [r.as_dict() for r in results], "cache": scorer.last_cache_stats}),
                  sys.stdout, indent=2)
        print()
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["image", "prompt", "ict", "hp", "score", "error"])
        for r in results:
            w.writerow([r.label, r.prompt, _fmt(r.ict), _fmt(r.hp), _fmt(r.score), r.error or ""])
    else:
        for r in results:
            if r.error:
                print(f"{r.label}\terror: {r.error}")
            else:
                ict = f"\tict={r.ict:.4f}" if r.ict is not None else ""
                hp = f"\thp={r.hp:.4f}" if r.hp is not None else ""
                print(f"{r.label}{ict}{hp}\tscore={r.score:.4f}")
    if all(r.error for r in results):
        raise InputError("no image could be scored; see the line of each image above")
    return 0


def cmd_rank(args) -> int:
    by = args.by or ("ict" if args.prompt is not None else "hp")
    if args.prompt is None and by != "hp":
        raise InputError(f"--by {by} needs --prompt (ICT compares each image with its prompt); without a prompt "
                         f"only --by hp works")
    if args.min_score is not None and math.isnan(args.min_score):
        raise InputError("--min-score nan is not a number any score can reach; give a number such as 0.25")
    if args.copy_to:
        check_copy_to(Path(args.copy_to), args.images)
    scorer, results = _score(args, need_hp=by != "ict")
    k = args.top_k if args.top_k is not None else len(results)
    sel = ranking.select(results, by, k=k, min_score=args.min_score)
    for note in sel.notes:
        log.warning("%s", note)
    copies = {}
    if args.copy_to:
        for pos, i in enumerate(sel.indices, 1):
            src = Path(results[i].label)
            copies[i] = str(copy_new(src, Path(args.copy_to), f"{pos:03d}_{src.name}"))
    if args.json:
        rows = []
        for pos, (i, v) in enumerate(zip(sel.indices, sel.values), 1):
            rows.append({"rank": pos, "index": i, **results[i].as_dict(), "value": v,
                         **({"copied_to": copies[i]} if i in copies else {})})
        failed = [r.as_dict() for r in results if r.error]
        json.dump(json_safe({"by": by, "results": rows, "failed": failed, "notes": sel.notes,
                             "cache": scorer.last_cache_stats}), sys.stdout, indent=2)
        print()
    else:
        print(ranking.report(results, by, sel))
    return 0


def cmd_convert(args) -> int:
    from .weights import convert

    info = convert(args.src, args.out, args.config, args.dtype)
    print(f"wrote {info.path} ({info.kind}, {len(info.tensors)} tensors, {info.size / 1e6:.1f} MB)")
    return 0


def cmd_fetch(args) -> int:
    from .weights import fetch

    dest = Path(args.dest) if args.dest else paths.default_models_dir()
    for kind in (["ict", "hp"] if args.hp else ["ict"]):
        out = fetch(kind, dest)
        print(f"{kind}: {out}")
    return 0


# ----------------------------------------------------------------------------------------------------- parser
def _shown(default, *args) -> str:
    """A default folder for --help; the error itself is raised only by a command that needs it."""
    try:
        return str(default(*args))
    except ICTError:
        return "none: set HOME"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"converted ICT .safetensors (default: {_shown(paths.default_model, 'ict')})")
    p.add_argument("--hp-model", help="converted HP .safetensors (default: the fetched one, if present)")
    p.add_argument("--no-hp", action="store_true", help="do not load the HP model even if one is installed")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto = fp32, the official numbers; fp16/bf16 are faster on CUDA")
    p.add_argument("--config", help="transformers CLIPConfig JSON, to check the files' architecture")
    p.add_argument("--cache-dir", help=f"embedding cache folder (default ${paths.CACHE_ENV} or "
                                       f"{_shown(paths.default_cache_dir)})")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ict", description="Score images with the ICT and HP reward models.")
    parser.add_argument("--version", action="version", version=f"ict-reward {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score images for a prompt")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument("--prompt", "-p", help="the prompt the images were generated from; without it, images are "
                                          "scored by the HP model alone (HP needs no prompt)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    _model_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("rank", help="rank images for a prompt, keep the best")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--prompt", "-p", help="the prompt the images were generated from; without it, images are "
                                          "scored by the HP model alone (HP needs no prompt)")
    p.add_argument("--by", choices=ranking.BY, help="ranking rule (default ict; hp without --prompt)")
    p.add_argument("--top-k", type=int, help="keep only the K best")
    p.add_argument("--min-score", type=float, help="keep only images reaching this value")
    p.add_argument("--copy-to", help="copy the kept images here, prefixed by their rank")
    p.add_argument("--json", action="store_true")
    _model_args(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("convert", help="convert a downloaded 8y/ICT or 8y/HP folder to safetensors")
    p.add_argument("src", help="folder of 8y/ICT (pytorch_model.bin) or 8y/HP (hp_backbone/, hp_scorer/)")
    p.add_argument("--out", required=True, help="FILE.safetensors to write")
    p.add_argument("--config", help="transformers CLIPConfig JSON for another size (default ViT-H-14)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="store tensors in this dtype "
                                                                     "(default: as released)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("fetch", help="download 8y/ICT (and 8y/HP) and convert them")
    p.add_argument("--hp", action="store_true", help="also fetch the HP model")
    p.add_argument("--dest", help=f"models folder (default {_shown(paths.default_models_dir)})")
    p.set_defaults(func=cmd_fetch)

    try:
        from .cache_cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub, _model_args, model_path=_model_path, progress=Progress)
    from .scale.cli import register as register_ray  # --ray on score and index (imports no Ray)

    register_ray(sub, model_path=_model_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    tolerant_stdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="ict: %(levelname)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # a dependency's notice about its own API (timm under old open_clip) is not the user's
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|open_clip|transformers)\b")
    if args.command in ("score", "rank") and not args.images:
        print("ict: error: no images given; pass image files or folders", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ICTError as e:
        print(f"ict: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
