"""Shard lists: brace expansion, existence checks, and what ``manifest.json`` says about them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import braceexpand

from mmcl.data.remote import HTTP_SCHEMES, ReadPolicy, beside, read_small, scheme
from mmcl.errors import DataError

MANIFEST = "manifest.json"


def is_remote(url: str) -> bool:
    """True for ``pipe:`` commands and URLs with a scheme (read through :mod:`mmcl.data.remote`)."""
    return url.startswith("pipe:") or "://" in url


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand ``"a-{000..009}.tar::b.tar"`` (or a list of such) into shard URLs.

    A local folder stands for all ``*.tar`` files in it. Local files are checked up front so a
    typo fails with a clear message instead of an empty epoch.

    >>> expand_shards("https://host/train-{000..002}.tar::https://host/extra.tar")
    ['https://host/train-000.tar', 'https://host/train-001.tar', 'https://host/train-002.tar', 'https://host/extra.tar']
    >>> expand_shards("no/such/train-{000..001}.tar")
    Traceback (most recent call last):
    mmcl.errors.DataError: ...no/such/train-000.tar...
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for part in str(s).split("::"):
            part = os.path.expanduser(os.path.expandvars(part.strip()))
            if not part:
                continue
            if not is_remote(part) and Path(part).is_dir():
                urls.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
                continue
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise DataError(f"the shard list {spec!r} is empty; give e.g. data/digits/train-{{000000..000004}}.tar")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"shard file(s) not found: {', '.join(missing[:3])}{more}; "
                        "build shards with `mmcl-prep` or fix the path")
    return urls


def find_manifest(urls: list[str], policy: ReadPolicy | None = None) -> dict[str, Any] | None:
    """The ``manifest.json`` beside the first local or ``http(s)://`` shard, if there is one (a
    remote one fetched with ``policy``'s time-out and retries, best effort: None if it fails)."""
    for url in urls:
        if not is_remote(url):
            path = Path(url).parent / MANIFEST
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    return None
            return None
        if scheme(url) in HTTP_SCHEMES:
            data = read_small(beside(url, MANIFEST), policy)
            try:
                manifest = json.loads(data) if data is not None else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            return manifest if isinstance(manifest, dict) else None
    return None


def shard_name(url: str) -> str:
    """The file name of a shard as ``manifest.json`` lists it (an http(s) URL's query left out)."""
    return Path(url.split("?", 1)[0]).name if scheme(url) in HTTP_SCHEMES else Path(url).name


def shard_entries(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Map shard file name -> its manifest entry (``samples``, and ``bytes`` when recorded), over all
    splits of a manifest."""
    if not manifest:
        return {}
    return {s["name"]: s for split in manifest.get("splits", {}).values() for s in split["shards"]}


def shard_sizes(manifest: dict[str, Any] | None) -> dict[str, int]:
    """Map shard file name -> number of samples, over all splits of a manifest."""
    return {name: entry["samples"] for name, entry in shard_entries(manifest).items()}


def entries_per_shard(urls: list[str], policy: ReadPolicy | None = None) -> dict[str, dict[str, Any]]:
    """URL -> the entry of that shard (``samples``, ``bytes``) in the ``manifest.json`` beside it,
    for local and http(s) shards; each folder's manifest is read once."""
    entries: dict[str, dict[str, dict[str, Any]]] = {}  # folder -> its manifest's shard entries
    out = {}
    for url in urls:
        if is_remote(url) and scheme(url) not in HTTP_SCHEMES:
            continue
        folder = beside(url, MANIFEST) if is_remote(url) else str(Path(url).parent)
        if folder not in entries:
            entries[folder] = shard_entries(find_manifest([url], policy))
        if shard_name(url) in entries[folder]:
            out[url] = entries[folder][shard_name(url)]
    return out


def samples_per_shard(urls: list[str], policy: ReadPolicy | None = None) -> dict[str, int]:
    """URL -> samples in that shard, for local and http(s) shards named in the ``manifest.json``
    beside them."""
    return {url: entry["samples"] for url, entry in entries_per_shard(urls, policy).items()}


def count_samples(urls: list[str], manifest: dict[str, Any] | None = None,
                  policy: ReadPolicy | None = None) -> int | None:
    """Total samples in ``urls`` according to the manifest, or None if any shard is unknown."""
    sizes = shard_sizes(manifest if manifest is not None else find_manifest(urls, policy))
    names = [shard_name(u) for u in urls]
    if not sizes or any(n not in sizes for n in names):
        return None
    return sum(sizes[n] for n in names)


def class_names(urls: list[str]) -> list[str] | None:
    """Class names recorded in the manifest for these shards, if any."""
    manifest = find_manifest(urls)
    if not manifest:
        return None
    names = {shard_name(u) for u in urls}
    for split in manifest.get("splits", {}).values():
        if names & {s["name"] for s in split["shards"]} and split.get("class_names"):
            return list(split["class_names"])
    return manifest.get("class_names")


def describe(spec: str) -> dict[str, Any]:
    """A short description of an evaluation shard list, for reports and model cards.

    ``name`` is ``SOURCE/SPLIT`` (e.g. ``digits/test``) when the manifest knows the shards, else
    the shard pattern itself; ``samples`` is the manifest's count (None if unknown).
    """
    urls = expand_shards(spec)
    manifest = find_manifest(urls)
    name = str(spec)
    if manifest:
        files = {shard_name(u) for u in urls}
        source = (manifest.get("source") or {}).get("type") or Path(urls[0]).parent.name
        for split, info in manifest.get("splits", {}).items():
            if files <= {s["name"] for s in info["shards"]}:
                name = f"{source}/{split}"
                break
    return {"name": name, "shards": str(spec), "samples": count_samples(urls, manifest)}
