"""`ict index`, `ict search`, `ict cache stats|clear`: options in, lines out; ict_core.gallery and
ict_core.cache do the work. Errors are ICTError (one line, exit 1); a write that did not happen is never
reported as done."""
from __future__ import annotations

import json
import sys

from .cli_common import Progress, lock_wait_arg, model_path
from .cli_output import one_line
from .errors import ICTError, InputError


def add_subcommands(sub, model_args) -> None:
    """Register index, search and cache on the `ict` subparsers; model_args adds --model and the rest."""
    p = sub.add_parser("index", help="add images to the gallery (encoded once; see `ict search`)")
    p.add_argument("paths", nargs="+", metavar="DIR", help="image folders (searched recursively) or files")
    p.add_argument("--prompt-from-metadata", action="store_true",
                   help="also encode the prompt stored in each image (webui parameters, ComfyUI graph, ict_reward "
                        "record) into the prompt cache, so `ict search` with it needs no model")
    lock_wait_arg(p)
    p.set_defaults(func=cmd_index)
    model_args(p)
    p = sub.add_parser("search", help="rank the indexed images for a prompt, without encoding images")
    p.set_defaults(func=cmd_search)
    p.add_argument("prompt", nargs="?", help="the text to search for (not needed with --by hp)")
    p.add_argument("--top-k", type=int, help="show only the K best (default all)")
    p.add_argument("--by", choices=("ict", "hp", "ict*hp"),
                   help="ict: text-image match (the default with a prompt); hp: HP preference alone (the "
                        "default without one); ict*hp: weighted by HP preference. hp and ict*hp need the HP model")
    p.add_argument("--exact", action="store_true", help="exact top K of a big gallery (default: its faiss IVF "
                                                        "index, rescored exactly; see docs/BENCHMARKS.md)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    model_args(p)
    actions = sub.add_parser("cache", help="show or clear the embedding cache").add_subparsers(
        dest="cache_command", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="where the cache is and what it holds")
    stats.add_argument("--json", action="store_true")
    clear = actions.add_parser("clear", help="delete cached prompts and/or gallery images (all models)")
    which = clear.add_mutually_exclusive_group()
    which.add_argument("--prompts", action="store_true", help="only the prompt features")
    which.add_argument("--images", action="store_true", help="only the image gallery")
    lock_wait_arg(clear)
    for s, func in ((stats, cmd_cache_stats), (clear, cmd_cache_clear)):
        s.add_argument("--cache-dir", help="embedding cache folder (default $ICT_CACHE_DIR or ~/.cache/ict-reward)")
        s.set_defaults(func=func)


def _cache(args):
    """The cache these options name. A write waits at most a second in SQLite: longer waits are the
    command's own (--lock-wait), with a line on stderr while they last."""
    from .cache import EmbeddingCache
    return EmbeddingCache(args.cache_dir, lock_timeout=min(1.0, getattr(args, "lock_wait", 30.0)))


def _gallery(args):
    """The Gallery these options name (ict_core.gallery holds the workflow; this only translates options)."""
    from .gallery import Gallery
    if getattr(args, "no_cache", False):
        raise InputError(f"`ict {args.command}` works on the embedding cache; drop --no-cache")
    ict = model_path(args.model, "ict", True)
    hp = None if args.no_hp else model_path(args.hp_model, "hp", getattr(args, "by", "ict") in ("hp", "ict*hp"))
    return Gallery(ict, hp, cache=_cache(args), device=args.device, precision=args.precision, config=args.config)


def cmd_index(args) -> int:
    """Encode the images not yet in the gallery of this (ICT, HP) pair and store them."""
    gallery, bar = _gallery(args), Progress(args.quiet, "indexing")
    try:  # one line per image that fails, as it happens
        report = gallery.index(args.paths, progress=bar, wait=args.lock_wait,
                               on_error=lambda line: print(f"ict: cannot index: {one_line(line)}", file=sys.stderr))
    finally:
        bar.close()
    moved = f" ({report.moved} now under their new path)" if report.moved else ""
    print(f"indexed {report.added} new image(s), {report.already} already stored{moved}, {report.failed} failed; "
          f"the gallery holds {len(gallery)} image(s) ({one_line(gallery.cache.path)})")
    if args.prompt_from_metadata:
        _cache_prompts(gallery, args)
    if report.failed and not report.added and not report.already:
        raise ICTError(f"none of the {report.failed} image(s) could be indexed; see the messages above")
    return 0


def _cache_prompts(gallery, args) -> None:
    """--prompt-from-metadata: each image's own prompt into the prompt cache; a line per image without one."""
    from .files import image_files
    from .prompt_source import prompts_of

    found = prompts_of(image_files(args.paths))
    for f in found:
        if f.error:
            print(f"ict: no prompt: {one_line(f.error)}", file=sys.stderr)
    prompts = [f.prompt for f in found if f.prompt]
    encoded = gallery.cache_prompts(prompts, wait=args.lock_wait)
    print(f"prompts: {len(set(prompts))} distinct prompt(s) from {len(prompts)} image(s) in the prompt cache "
          f"({encoded} encoded now), {len(found) - len(prompts)} image(s) without one")


def cmd_search(args) -> int:
    """Rank the gallery of this (ICT, HP) pair for a prompt; no image is encoded. NaN values rank
    last and are written as null (JSON) or '-' (text)."""
    from .gallery import search_by
    by = args.by = search_by(args.prompt, args.top_k, args.by)  # before any model is looked up (hp needs one)
    gallery = _gallery(args)
    rows = [h.as_dict() for h in gallery.search(args.prompt, top_k=args.top_k, by=by, exact=args.exact)]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "by": by, "gallery": gallery.key, "count": len(gallery),
                          "results": rows, "cache": gallery.cache.counters}, indent=2, allow_nan=False))
        return 0
    has_hp = any(r["hp"] is not None for r in rows)
    cell = lambda x: f"{x:7.4f}" if x is not None else f"{'-':>7}"  # noqa: E731
    print(f"{'rank':>4} {'ict':>7}" + (f" {'hp':>7}" if has_hp else "") + f" {by:>8}  image")
    for r in rows:
        print(f"{r['rank']:>4} {cell(r['ict'])}" + (f" {cell(r['hp'])}" if has_hp else "")
              + f"  {cell(r['value'])}  {one_line(r['image'])}")
    return 0


def cmd_cache_stats(args) -> int:
    from .cache import EmbeddingCache
    stats = EmbeddingCache(args.cache_dir).stats()
    stats.pop("counters", None)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"path:     {one_line(stats['path'])}\nprompts:  {stats['prompts']}\nimages:   {stats['images']}\n"
          f"size:     {stats['bytes'] / 2 ** 20:.1f} MiB", *(f"  {t['kind']:<8} {t['count']:>8}  {t['key']}"
                                                         for t in stats["tables"]), sep="\n")
    return 0


def cmd_cache_clear(args) -> int:
    """Clear the chosen tables; exit 1, with nothing reported as cleared, when that cannot be done."""
    from .cache import Busy
    prompts, images = (not args.images), (not args.prompts)
    cache = _cache(args)
    before = cache.stats()
    if cache.memory_only:
        raise ICTError(f"cannot clear {cache.path}: {cache.problem}")
    try:
        cache.clear(prompts=prompts, images=images, wait=args.lock_wait)
    except Busy:
        raise ICTError(f"not cleared: another process kept writing to {cache.path} past the wait "
                       f"({args.lock_wait:g} s); run `ict cache clear` again when it is done, or wait longer "
                       f"(--lock-wait)") from None
    if cache.memory_only:
        raise ICTError(f"cannot clear {cache.path}: {cache.problem}")
    what = [f"{before['prompts']} prompt(s)"] * prompts + [f"{before['images']} image(s)"] * images
    print(f"cleared {' and '.join(what)} from {one_line(cache.path)}")
    return 0
