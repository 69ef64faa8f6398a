"""Write a hand data split as WebDataset tar shards (+ a shard list), for `data.format=webdataset`.

  python -m lib.data.make_shards --format folder --root tests/data/hand --split training --out shards/hand
  python -m lib.data.make_shards --format hand3d --root ../shared/data/hand3d --split all --out shards/hand3d
  -> <out>/<split>-000000.tar ... (samples <key>.jpg + <key>.json {"K", "xyz", ["mano"], "name"})
     <out>/<split>.json (wids shard list: url + nsamples per shard)
then train with data.format=webdataset data.root=<out> data.train_split=<split>. Images are stored
as their original bytes, so shards give exactly the samples the folder gives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import webdataset as wds

from lib.data.hand import FolderSource, Hand3DSource


def write_shards(source, out: str | Path, split: str, maxcount: int = 1000) -> Path:
    """All samples of `source` -> <out>/<split>-NNNNNN.tar with at most `maxcount` samples each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    for start in range(0, len(source), maxcount):
        with wds.TarWriter(str(out / f"{split}-{len(counts):06d}.tar")) as sink:
            for i in range(start, min(start + maxcount, len(source))):
                data, ext, meta = source.raw(i)
                sink.write({"__key__": f"{i:08d}", "jpg" if ext == "jpeg" else ext: data,
                            "json": json.dumps(meta).encode()})
        counts.append(min(maxcount, len(source) - start))
    index = out / f"{split}.json"
    index.write_text(json.dumps({
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
        "shardlist": [{"url": f"{split}-{k:06d}.tar", "nsamples": n} for k, n in enumerate(counts)]}, indent=1))
    return index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["folder", "hand3d"], default="folder")
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="training", help="folder split name (hand3d: name of the shard set)")
    p.add_argument("--out", required=True)
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    source = Hand3DSource(args.root) if args.format == "hand3d" else FolderSource(args.root, args.split)
    index = write_shards(source, args.out, args.split, args.maxcount)
    print(f"wrote {len(source)} samples to {index} ({json.loads(index.read_text())['shardlist'][-1]['url']} last)")


if __name__ == "__main__":
    from lib.runtime import cli_main

    cli_main(main)()
