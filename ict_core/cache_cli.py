"""`ict index`, `ict search`, `ict cache stats|clear`: encode each image once, then rank the gallery for any
prompt with one text encode (none when the prompt is cached). ict_core.cli hands in its helpers (no import
back); errors are ICTError (one line)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from .cli_output import json_safe
from .errors import ICTError, InputError
from .weights import fingerprint  # needs no torch: a cached prompt loads none

#: Images encoded per round of index; each round is saved, so an interrupted run keeps its work.
INDEX_ROUND = 64
_host = SimpleNamespace()


def add_subcommands(sub, model_args, *, model_path, expand_images, progress) -> None:
    """Register index, search and cache; model_args adds --model etc., the rest are cli's helpers."""
    _host.__dict__.update(model_path=model_path, expand_images=expand_images, progress=progress)
    p = sub.add_parser("index", help="add images to the gallery (encoded once; see `ict search`)")
    p.add_argument("paths", nargs="+", metavar="DIR", help="image folders (searched recursively) or files")
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
    for s, func in ((stats, cmd_cache_stats), (clear, cmd_cache_clear)):
        s.add_argument("--cache-dir", help="embedding cache folder (default $ICT_CACHE_DIR or ~/.cache/ict-reward)")
        s.set_defaults(func=func)


def _open(args):
    """(cache, ICT path, HP path or None, gallery key) for these options."""
    from .cache import EmbeddingCache, gallery_key
    if getattr(args, "no_cache", False):
        raise InputError(f"`ict {args.command}` works on the embedding cache; drop --no-cache")
    ict = _host.model_path(args.model, "ict", True)
    hp = None if args.no_hp else _host.model_path(args.hp_model, "hp", getattr(args, "by", "ict") in ("hp", "ict*hp"))
    return EmbeddingCache(args.cache_dir), ict, hp, gallery_key(fingerprint(ict), hp and fingerprint(hp), _dtype(args))


def _dtype(args) -> str:
    """The precision a Scorer for these options runs at (part of the keys); fp32 needs no torch."""
    if args.precision in ("auto", "fp32"):
        return "float32"
    from .scorer import resolve_device, resolve_dtype
    return str(resolve_dtype(args.precision, resolve_device(args.device)))


def _snapshot(path: str):
    """The file's ImageRef, decoding and hashing the bytes read now (preprocess.bytes_ref). Only regular
    files are read (a FIFO would hang)."""
    from . import preprocess
    from .files import open_regular
    with open_regular(path) as fh:
        return preprocess.bytes_ref(str(Path(path).resolve()), fh.read())


def cmd_index(args) -> int:
    """Encode the images not yet in the gallery of this (ICT, HP) pair and store them."""
    from .scorer import Scorer
    cache, ict_path, hp_path, gallery = _open(args)
    files, failed, added, already, known, scorer = _host.expand_images(args.paths), 0, 0, 0, set(), None
    bar = _host.progress(args.quiet, "indexing")
    try:
        for start in range(0, len(files), INDEX_ROUND):
            todo = {}
            for f in files[start:start + INDEX_ROUND]:
                try:
                    ref = _snapshot(f)
                    todo.update({} if ref.digest() in known else {ref.digest(): ref})
                    known.add(ref.digest())
                except OSError as e:  # one line per image, naming it once
                    failed += 1
                    print(f"ict: cannot index: {f}: {e.strerror}" if e.strerror else f"ict: cannot index: {e}",
                          file=sys.stderr)
            stored, count = cache.get_images(gallery, list(todo)), len(todo)
            todo = {d: r for d, r in todo.items() if d not in stored or (hp_path and math.isnan(stored[d][1]))}
            already += count - len(todo)
            if todo:
                scorer = scorer or Scorer.load(ict_path, hp_path, device=args.device, precision=args.precision,
                                               cache=None, config=args.config)
                feats = scorer.encode_images(None, refs=list(todo.values()))
                entries = {d: (feats.ict[i].numpy(), None if feats.hp_raw is None else float(feats.hp_raw[i]), r.label)
                           for i, (d, r) in enumerate(todo.items()) if feats.errors[i] is None}
                for error in filter(None, feats.errors):
                    print(f"ict: cannot index: {error}", file=sys.stderr)
                cache.put_images(gallery, entries)
                added, failed = added + len(entries), failed + len(todo) - len(entries)
            bar(min(start + INDEX_ROUND, len(files)), len(files))
    finally:
        bar.close()
    cache.flush()
    if cache.memory_only:
        raise ICTError(f"could not save to the cache folder {cache.path} (read-only, full or not a folder); "
                       f"nothing was indexed: pass a writable --cache-dir")
    print(f"indexed {added} new image(s), {already} already stored, {failed} failed; "
          f"the gallery holds {cache.image_count(gallery)} image(s) ({cache.path})")
    if failed and not added and not already:
        raise ICTError(f"none of the {failed} image(s) could be indexed; see the messages above")
    return 0


def query_vector(cache, ict_path: str, prompt: str, args):
    """The prompt's text feature: from the prompt cache (no model load at all), else encoded once."""
    from .cache import prompt_key
    hit = cache.get_prompts(prompt_key(fingerprint(ict_path), _dtype(args)), [prompt]).get(prompt)
    if hit is not None:  # text the scorer encoded (and checked) before
        return hit
    from .scorer import Scorer
    from .text import check_prompt
    scorer = Scorer.load(ict_path, None, device=args.device, precision=args.precision, cache=cache,
                         config=args.config)
    return scorer.encode_prompts([check_prompt(prompt)])[0].numpy()


def cmd_search(args) -> int:
    """Rank the gallery of this (ICT, HP) pair for a prompt; no image is encoded. NaN values rank
    last and are written as null (JSON) or '-' (text)."""
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    args.by = args.by or ("ict" if args.prompt is not None else "hp")
    if args.prompt is None and args.by != "hp":
        raise InputError(f"--by {args.by} needs a prompt to search for; without one only --by hp ranks the gallery")
    cache, ict_path, hp_path, gallery = _open(args)
    if args.by != "ict" and hp_path is None:
        raise InputError(f"--by {args.by} needs the HP model; pass --hp-model (and index with it)")
    if cache.image_count(gallery) == 0:
        raise InputError(_empty_gallery_hint(cache, gallery, hp_path))
    from .cache.gallery_search import sigmoid
    query = query_vector(cache, ict_path, args.prompt, args) if args.prompt is not None else None
    rows = []
    for pos, h in enumerate(cache.search(gallery, query, top_k=args.top_k, by=args.by, exact=args.exact), 1):
        hp = float(sigmoid(h.hp_raw))
        score = h.ict if math.isnan(hp) else hp if math.isnan(h.ict) else h.ict * hp
        rows.append(json_safe({"rank": pos, "image": h.label, "hash": h.hash, "ict": h.ict, "hp": hp,
                               "hp_raw": h.hp_raw, "value": h.value, "score": score}))
    cache.flush()
    if args.json:
        print(json.dumps({"prompt": args.prompt, "by": args.by, "gallery": gallery, "count": cache.image_count(gallery),
                          "results": rows, "cache": cache.counters}, indent=2, allow_nan=False))
        return 0
    has_hp = any(r["hp"] is not None for r in rows)
    cell = lambda x: f"{x:7.4f}" if x is not None else f"{'-':>7}"  # noqa: E731
    print(f"{'rank':>4} {'ict':>7}" + (f" {'hp':>7}" if has_hp else "") + f" {args.by:>8}  image")
    for r in rows:
        print(f"{r['rank']:>4} {cell(r['ict'])}" + (f" {cell(r['hp'])}" if has_hp else "")
              + f"  {cell(r['value'])}  {r['image']}")
    return 0


def _empty_gallery_hint(cache, gallery: str, hp_path) -> str:
    if any(g.split("+")[0] == gallery.split("+")[0] for g in cache.stats()["galleries"]):
        return ("the gallery of this ICT model was indexed with " + ("an HP model; pass the same --hp-model to "
                "search it" if hp_path is None else "another HP model (or none); use the same one here"))
    return f"no images are indexed for this model in {cache.path}; run `ict index FOLDER` with the same models first"


def cmd_cache_stats(args) -> int:
    from .cache import EmbeddingCache
    stats = EmbeddingCache(args.cache_dir).stats()
    stats.pop("counters", None)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"path:     {stats['path']}\nprompts:  {stats['prompts']}\nimages:   {stats['images']}\n"
          f"size:     {stats['bytes'] / 2 ** 20:.1f} MiB", *(f"  {t['kind']:<8} {t['count']:>8}  {t['key']}"
                                                         for t in stats["tables"]), sep="\n")
    return 0


def cmd_cache_clear(args) -> int:
    from .cache import EmbeddingCache
    prompts, images = (not args.images), (not args.prompts)
    cache = EmbeddingCache(args.cache_dir)
    before = cache.stats()
    cache.clear(prompts=prompts, images=images)
    if cache.memory_only:
        raise ICTError(f"cannot delete files in {cache.path}; check its permissions")
    what = [f"{before['prompts']} prompt(s)"] * prompts + [f"{before['images']} image(s)"] * images
    print(f"cleared {' and '.join(what)} from {cache.path}")
    return 0
