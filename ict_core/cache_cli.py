"""`ict index`, `ict search` and `ict cache stats|clear`: the image gallery from the command line.

Why a gallery: the image tower is the expensive part (~5 s per image on a 2-core CPU). `ict index`
pays it once per image; `ict search` then ranks every indexed image for any prompt with one text
encode (none at all when the prompt is cached, and then not even a model load).

ict_core.cli calls add_subcommands(); errors are raised as ICTError (one line, no traceback).
"""
from __future__ import annotations

import json
import math
import sys

from .errors import ICTError, InputError

#: Images encoded per round of index; the gallery is saved after each, so an interrupted run keeps its work.
INDEX_ROUND = 64


def add_subcommands(subparsers, model_args=None) -> None:
    """Register index, search and cache on the `ict` parser; model_args adds --model etc."""
    model_args = model_args or _model_args

    p = subparsers.add_parser("index", help="add images to the gallery (encoded once; see `ict search`)")
    p.add_argument("paths", nargs="+", metavar="DIR", help="image folders (searched recursively) or files")
    model_args(p)
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser("search", help="rank every indexed image for a prompt, without encoding images")
    p.add_argument("prompt", nargs="?", help="the text to search for (not needed with --by hp)")
    p.add_argument("--top-k", type=int, help="show only the K best (default all)")
    p.add_argument("--by", choices=("ict", "hp", "ict*hp"),
                   help="ict: text-image match (the default with a prompt); hp: HP preference alone (the "
                        "default without one); ict*hp: weighted by HP preference. hp and ict*hp need the HP model")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    model_args(p)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("cache", help="show or clear the embedding cache")
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    s = sub.add_parser("stats", help="where the cache is and what it holds")
    s.add_argument("--json", action="store_true")
    _cache_dir_arg(s)
    s.set_defaults(func=cmd_cache_stats)
    s = sub.add_parser("clear", help="delete cached prompts and/or gallery images (all models)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--prompts", action="store_true", help="only the prompt features")
    which.add_argument("--images", action="store_true", help="only the image gallery")
    _cache_dir_arg(s)
    s.set_defaults(func=cmd_cache_clear)


def _cache_dir_arg(p) -> None:
    p.add_argument("--cache-dir", help="embedding cache folder (default $ICT_CACHE_DIR or ~/.cache/ict-reward)")


def _model_args(p) -> None:
    """Fallback when the host parser gives no model options of its own."""
    p.add_argument("--model", help="converted ICT .safetensors")
    p.add_argument("--hp-model", help="converted HP .safetensors")
    p.add_argument("--no-hp", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--config")
    _cache_dir_arg(p)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")


# ------------------------------------------------------------------------------------------------ helpers
def _open_cache(args):
    from .cache import EmbeddingCache

    if getattr(args, "no_cache", False):
        raise InputError(f"`ict {args.command}` works on the embedding cache; drop --no-cache")
    return EmbeddingCache(getattr(args, "cache_dir", None))


def _models(args, need_hp: bool):
    """(ict path, hp path or None), resolved exactly as `ict score` / `ict rank` resolve them."""
    from .cli import _model_path

    ict = _model_path(args.model, "ict", True)
    hp = None if getattr(args, "no_hp", False) else _model_path(args.hp_model, "hp", need_hp)
    return ict, hp


def _dtype(args) -> str:
    """The precision a Scorer for these options would run at (part of the cache keys)."""
    from .scorer import resolve_device, resolve_dtype

    return str(resolve_dtype(args.precision, resolve_device(args.device)))


def _gallery_key(ict_path, hp_path, args) -> str:
    from .cache import gallery_key
    from .weights import fingerprint

    return gallery_key(fingerprint(ict_path), fingerprint(hp_path) if hp_path else None, _dtype(args))


def _label(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def _sigmoid(x: float) -> float | None:
    if x is None or math.isnan(x):
        return None
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ------------------------------------------------------------------------------------------------ index
def cmd_index(args) -> int:
    """Encode the images not yet in the gallery of this (ICT, HP) pair and store them."""
    from . import preprocess
    from .cli import Progress, expand_images
    from .scorer import Scorer

    cache = _open_cache(args)
    files = expand_images(args.paths)
    ict_path, hp_path = _models(args, need_hp=False)
    refs = preprocess.as_refs(files, [_label(f) for f in files])
    failed = 0
    digests: dict[str, object] = {}  # digest -> ref (a file indexed twice is encoded once)
    for ref in refs:
        try:
            digests.setdefault(ref.digest(), ref)
        except OSError as e:
            failed += 1
            print(f"ict: cannot index {ref.label}: {e.strerror or e}", file=sys.stderr)
    gallery = _gallery_key(ict_path, hp_path, args)
    stored = cache.get_images(gallery, list(digests))
    todo = [(d, r) for d, r in digests.items()
            if d not in stored or (hp_path is not None and math.isnan(stored[d][1]))]
    added = 0
    if todo:
        scorer = Scorer.load(ict_path, hp_path, device=args.device, precision=args.precision, cache=None,
                             config=getattr(args, "config", None))
        bar = Progress(args.quiet, "indexing")
        try:
            for start in range(0, len(todo), INDEX_ROUND):
                part = todo[start:start + INDEX_ROUND]
                feats = scorer.encode_images(
                    None, refs=[r for _, r in part],
                    progress=lambda done, _total, s=start: bar(s + done, len(todo)))
                entries = {}
                for i, (digest, ref) in enumerate(part):
                    if feats.errors[i] is not None:
                        failed += 1
                        print(f"ict: cannot index {ref.label}: {feats.errors[i]}", file=sys.stderr)
                        continue
                    hp_raw = float(feats.hp_raw[i]) if feats.hp_raw is not None else None
                    entries[digest] = (feats.ict[i].numpy(), hp_raw, ref.label)
                cache.put_images(gallery, entries)
                cache.flush()
                added += len(entries)
        finally:
            bar.close()
    cache.flush()
    total = cache.image_count(gallery)
    print(f"indexed {added} new image(s), {len(digests) - len(todo)} already stored, {failed} failed; "
          f"the gallery holds {total} image(s) ({cache.path})")  # --quiet silences only the progress bar
    if failed and not added and not stored:
        raise ICTError(f"none of the {failed} image(s) could be indexed; see the messages above")
    return 0


# ------------------------------------------------------------------------------------------------ search
def query_vector(cache, ict_path: str, prompt: str, args):
    """The prompt's text feature: from the prompt cache (no model load at all), else encoded once."""
    from .cache import prompt_key
    from .text import check_prompt
    from .weights import fingerprint

    prompt = check_prompt(prompt)
    hit = cache.get_prompts(prompt_key(fingerprint(ict_path), _dtype(args)), [prompt]).get(prompt)
    if hit is not None:
        return hit
    from .scorer import Scorer

    scorer = Scorer.load(ict_path, None, device=args.device, precision=args.precision, cache=cache,
                         config=getattr(args, "config", None))
    vec = scorer.encode_prompts([prompt])[0].numpy()
    cache.flush()
    return vec


def cmd_search(args) -> int:
    """Rank the gallery of this (ICT, HP) pair for a prompt; no image is encoded."""
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    by = args.by or ("ict" if args.prompt is not None else "hp")
    if args.prompt is None and by != "hp":
        raise InputError(f"--by {by} needs a prompt to search for; without one only --by hp ranks the gallery")
    cache = _open_cache(args)
    ict_path, hp_path = _models(args, need_hp=by != "ict")
    if by != "ict" and hp_path is None:
        raise InputError(f"--by {by} needs the HP model; pass --hp-model (and index with it)")
    gallery = _gallery_key(ict_path, hp_path, args)
    if cache.image_count(gallery) == 0:
        raise InputError(_empty_gallery_hint(cache, gallery, hp_path))
    query = query_vector(cache, ict_path, args.prompt, args) if args.prompt is not None else None
    hits = cache.search(gallery, query, top_k=args.top_k, by=by)
    cache.flush()
    rows = []
    for pos, h in enumerate(hits, 1):
        hp = _sigmoid(h.hp_raw)
        ict = None if math.isnan(h.ict) else h.ict  # by hp without a prompt: no ICT
        rows.append({"rank": pos, "image": h.label, "hash": h.hash, "ict": ict, "hp": hp,
                     "hp_raw": None if hp is None else h.hp_raw,
                     "score": (ict * hp if hp is not None else ict) if ict is not None else hp,
                     "value": None if math.isnan(h.value) else h.value})
    if args.json:
        json.dump({"prompt": args.prompt, "by": by, "gallery": gallery, "count": cache.image_count(gallery),
                   "results": rows, "cache": cache.counters}, sys.stdout, indent=2)
        print()
        return 0
    has_hp = any(r["hp"] is not None for r in rows)
    print(f"{'rank':>4} {'ict':>7}" + (f" {'hp':>7}" if has_hp else "") + f" {by:>8}  image")
    for r in rows:
        hp = (f" {r['hp']:7.4f}" if r["hp"] is not None else f" {'-':>7}") if has_hp else ""
        ict = f"{r['ict']:7.4f}" if r["ict"] is not None else f"{'-':>7}"
        print(f"{r['rank']:>4} {ict}{hp} {r['value']:8.4f}  {r['image']}")
    return 0


def _empty_gallery_hint(cache, gallery: str, hp_path) -> str:
    ict_fp = gallery.split("+", 1)[0]
    others = [g for g in cache.stats()["galleries"] if g.startswith(ict_fp + "+") and g != gallery]
    if others and hp_path is None:
        return "the gallery of this ICT model was indexed with an HP model; pass the same --hp-model to search it"
    if others:
        return "the gallery of this ICT model was indexed with another HP model (or none); use the same one here"
    return f"no images are indexed for this model in {cache.path}; run `ict index FOLDER` with the same models first"


# ------------------------------------------------------------------------------------------------ cache
def cmd_cache_stats(args) -> int:
    from .cache import EmbeddingCache

    stats = EmbeddingCache(args.cache_dir).stats()
    stats.pop("counters", None)
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
        return 0
    print(f"path:     {stats['path']}")
    print(f"prompts:  {stats['prompts']}")
    print(f"images:   {stats['images']}")
    print(f"size:     {_size(stats['bytes'])}")
    for t in stats["tables"]:
        print(f"  {t['kind']:<8} {t['count']:>8}  {_size(t['bytes']):>9}  {t['key']}")
    if stats["memory_only"]:
        print("note: the folder cannot be written; this run kept the cache in memory only")
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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
