"""The `ict` command line (also `python -m ict_core`)."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__, paths, ranking
from .cli_common import Progress, model_args, model_path, open_cache, shown
from .cli_output import check_copy_to, copy_new, json_safe, one_line, tolerant_stdout
from .errors import ICTError, InputError
from .files import image_files

log = logging.getLogger("ict_core")


# --------------------------------------------------------------------------------------------------- helpers
def load_scorer(args, need_hp: bool = False):
    from .scorer import Scorer

    model = model_path(args.model, "ict", True)
    hp = None if getattr(args, "no_hp", False) else model_path(args.hp_model, "hp", need_hp)
    return Scorer.load(model, hp, device=args.device, precision=args.precision, cache=open_cache(args),
                       config=args.config)


def _prompts(args, images: list[str]):
    """(prompt or per-image prompts or None, {index: error row text}) for this run: --prompt wins; with
    --prompt-from-metadata each image's own prompt, and an error for each image without one."""
    if args.prompt is not None:
        if getattr(args, "prompt_from_metadata", False):
            log.info("--prompt given: the prompts in the images' metadata are not read")
        from .prompt_source import usable_prompt
        return usable_prompt(args.prompt, "--prompt"), {}
    if not getattr(args, "prompt_from_metadata", False):
        return None, {}
    from .prompt_source import prompts_of
    found = prompts_of(images)
    for f in found:
        if f.prompt is not None:
            log.info("prompt from the %s", f.source)
    return [f.prompt for f in found], {i: f.error for i, f in enumerate(found) if f.prompt is None}


def _in_input_order(images: list[str], todo: list[int], scored: list, failed: dict) -> list:
    """One row per input path, in input order: the scored ones and an error row for each image left out."""
    from .scorer import ScoreResult

    rows = dict(zip(todo, scored))
    for i, r in rows.items():
        r.index = i
    rows.update({i: ScoreResult(i, images[i], "", error=e) for i, e in failed.items()})
    return [rows[i] for i in range(len(images))]


def _score(args, need_hp: bool = False):
    images = image_files(args.images)
    prompt, failed = _prompts(args, images)
    scorer = load_scorer(args, need_hp or prompt is None)  # no prompt: HP alone
    todo = [i for i in range(len(images)) if i not in failed]
    bar = Progress(args.quiet, "scoring")
    try:
        if isinstance(prompt, list):  # one prompt per image; each distinct prompt is encoded once
            scored = scorer.score([images[i] for i in todo], [prompt[i] for i in todo], progress=bar,
                                  labels=[images[i] for i in todo]) if todo else []
        else:
            scored = scorer.score(images, prompt, progress=bar, labels=images)
    finally:
        bar.close()
    results = _in_input_order(images, todo, scored, failed)
    for r in results:
        if r.error:  # one line per image; the error names it
            print(f"ict: cannot score: {one_line(r.error)}", file=sys.stderr)
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
                print(f"{one_line(r.label)}\terror: {one_line(r.error)}")
            else:
                ict = f"\tict={r.ict:.4f}" if r.ict is not None else ""
                hp = f"\thp={r.hp:.4f}" if r.hp is not None else ""
                print(f"{one_line(r.label)}{ict}{hp}\tscore={r.score:.4f}")
    if all(r.error for r in results):
        raise InputError("no image could be scored; see the line of each image above")
    return 0


def cmd_rank(args) -> int:
    has_prompt = args.prompt is not None or args.prompt_from_metadata
    by = args.by or ("ict" if has_prompt else "hp")
    if not has_prompt and by != "hp":
        raise InputError(f"--by {by} needs --prompt or --prompt-from-metadata (ICT compares each image with its "
                         f"prompt); without a prompt only --by hp works")
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


def cmd_show(args) -> int:
    from .stored_scores import show
    return show(image_files(args.images), args.json)


def cmd_convert(args) -> int:
    from .weights import convert

    info = convert(args.src, args.out, args.config, args.dtype)
    print(f"wrote {info.path} ({info.kind}, {len(info.tensors)} tensors, {info.size / 1e6:.1f} MB)")
    return 0


def cmd_fetch(args) -> int:
    from tqdm import tqdm

    from .official import RELEASES, ensure

    dest = Path(args.dest) if args.dest else paths.default_models_dir()
    for kind in (["ict", "hp"] if args.hp else ["ict"]):
        with tqdm(desc=RELEASES[kind].repo, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  disable=None) as bar:
            def show(stage: str, done: int, total: int, bar=bar, repo=RELEASES[kind].repo) -> None:
                if stage == "convert":
                    bar.set_description(f"{repo}: converting")
                    return
                bar.total = total
                bar.update(done - bar.n)

            out = ensure(kind, dest, progress=show)
        print(f"{kind}: {out}")
    return 0


# ----------------------------------------------------------------------------------------------------- parser
_FROM_METADATA = ("read each image's prompt from its own metadata: the pack's ict_reward record, the A1111/Forge "
                  "parameters (PNG text or JPEG/WebP EXIF) or the ComfyUI graph; --prompt overrides it")


class _Parser(argparse.ArgumentParser):
    """The `ict` parser: a bare `--ray` before an image means a local Ray (scale.cli.ray_argv)."""

    def parse_known_args(self, args=None, namespace=None):
        from .scale.cli import ray_argv

        return super().parse_known_args(ray_argv(sys.argv[1:] if args is None else args), namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ict", description="Score images with the ICT and HP reward models.")
    parser.add_argument("--version", action="version", version=f"ict-reward {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score images for a prompt")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument("--prompt", "-p", help="the prompt the images were generated from; without it, images are "
                                          "scored by the HP model alone (HP needs no prompt)")
    p.add_argument("--prompt-from-metadata", action="store_true", help=_FROM_METADATA)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    model_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("rank", help="rank images for a prompt, keep the best")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--prompt", "-p", help="the prompt the images were generated from; without it, images are "
                                          "scored by the HP model alone (HP needs no prompt)")
    p.add_argument("--prompt-from-metadata", action="store_true", help=_FROM_METADATA)
    p.add_argument("--by", choices=ranking.BY, help="ranking rule (default ict; hp without a prompt)")
    p.add_argument("--top-k", type=int, help="keep only the K best")
    p.add_argument("--min-score", type=float, help="keep only images reaching this value")
    p.add_argument("--copy-to", help="copy the kept images here, prefixed by their rank")
    p.add_argument("--json", action="store_true")
    model_args(p)
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
    p.add_argument("--dest", help=f"models folder (default {shown(paths.default_models_dir)})")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("show", help="print the scores stored in images (ict_reward records, webui infotext)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_show)

    from .cache_cli import add_subcommands
    add_subcommands(sub, model_args)
    from .scale.cli import register as register_ray  # --ray on score and index (imports no Ray)

    register_ray(sub, model_path=model_path)
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
    if getattr(args, "prompt_from_metadata", False) and (getattr(args, "ray", None) or getattr(args, "ingest", 0)):
        print("ict: error: --prompt-from-metadata reads each file on this machine; it does not combine with --ray "
              "or --ingest (give --prompt, or run without --ray)", file=sys.stderr)
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe is found here, not at exit
        return code
    except BrokenPipeError:  # `ict search | head -1`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes nowhere
        return 141  # 128 + SIGPIPE, what a tool stopped by SIGPIPE reports
    except ICTError as e:
        print(f"ict: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ict: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
