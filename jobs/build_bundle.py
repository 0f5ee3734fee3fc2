"""Rebuild the bundled demo data set ``cdi_ray/demo_assets/fashion16.npz`` deterministically.

Fashion-MNIST (Zalando, MIT licence) as installed by the Debian package
``dataset-fashion-mnist`` is read from ``/usr/share/datasets/fashion-mnist``; a
class-balanced subset of the *train* split is drawn with a seeded NumPy
generator, resized 28×28 → 16×16 with Pillow's BOX filter (area averaging,
i.e. an anti-aliased downscale) and stored as uint8.

The bundle is split into three disjoint pools, stored contiguously in this order:

* ``heldout`` — never used to train either demo model (the U side of demos);
* ``easy``    — the training set of ``models/easy`` (500 images);
* ``hard``    — the training set of ``models/hard``.

Every pool has the same number of images per class. The output is byte-for-byte
reproducible: the ``.npz`` is written with fixed zip timestamps, and
``fashion16.json`` records the sha256 of the file and of every array.

    python jobs/build_bundle.py                 # rewrite cdi_ray/demo_assets/fashion16.{npz,json}
    python jobs/build_bundle.py --smoke-test    # tiny bundle in a temporary directory
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "cdi_ray" / "demo_assets"
SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
COPYRIGHT_FILE = Path("/usr/share/doc/dataset-fashion-mnist/copyright")

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SIZE = 16           # small enough that a ~1M-parameter pixel DDPM trains in minutes on 2 CPU cores
SEED = 20250611     # fixed: the bundle must be reproducible bit for bit
# Pool sizes (images, all class-balanced). heldout ≥ 2,000 so a demo audit can use |U| up to 2,000;
# easy = 500 members of the easy model; hard = the 2,000 members of the hard model (2,000–5,000 wanted).
N_HELDOUT = 2500
N_EASY = 500
N_HARD = 2000
ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # fixed zip member timestamps → reproducible file hash


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-dir", type=Path, default=SOURCE_DIR, help="directory with the *-idx?-ubyte.gz files")
    p.add_argument("--out-dir", type=Path, default=ASSETS, help="where fashion16.{npz,json} are written")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-heldout", type=int, default=N_HELDOUT)
    p.add_argument("--n-easy", type=int, default=N_EASY)
    p.add_argument("--n-hard", type=int, default=N_HARD)
    p.add_argument("--smoke-test", action="store_true",
                   help="build a 60-image bundle into a temporary directory (nothing in the repo changes)")
    return p.parse_args(argv)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def array_sha256(a: np.ndarray) -> str:
    """sha256 of the C-ordered raw bytes (dtype and shape are recorded next to it)."""
    return sha256_bytes(np.ascontiguousarray(a).tobytes())


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST format): magic, dims (big-endian int32), uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    zero, dtype_code, ndim = raw[0] + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def resize(images28: np.ndarray, size: int) -> np.ndarray:
    """(N, 28, 28) uint8 → (N, size, size) uint8 with Pillow's BOX (area-average) filter."""
    out = np.empty((len(images28), size, size), dtype=np.uint8)
    for i, im in enumerate(images28):
        out[i] = np.asarray(Image.fromarray(im, mode="L").resize((size, size), Image.Resampling.BOX))
    return out


def select_pools(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Class-balanced, disjoint pools of source indices, each sorted ascending.

    Per class c, one permutation of that class's indices (drawn from
    ``default_rng([seed, c])``) is cut into consecutive blocks, one block per pool.
    """
    n_classes = int(labels.max()) + 1
    for name, n in sizes.items():
        if n % n_classes:
            raise ValueError(f"--n-{name} must be a multiple of {n_classes} (class balance), got {n}")
    picks: dict[str, list[np.ndarray]] = {name: [] for name in sizes}
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, c]).permutation(idx)
        start = 0
        for name, n in sizes.items():
            k = n // n_classes
            if start + k > len(perm):
                raise ValueError(f"class {c} has only {len(perm)} images; pools need {sum(sizes.values()) // n_classes}")
            picks[name].append(perm[start:start + k])
            start += k
    return {name: np.sort(np.concatenate(p)) for name, p in picks.items()}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def debian_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(args: argparse.Namespace) -> dict:
    sizes = {"heldout": args.n_heldout, "easy": args.n_easy, "hard": args.n_hard}
    out_dir = args.out_dir
    if args.smoke_test:
        sizes = {"heldout": 20, "easy": 20, "hard": 20}
        out_dir = Path(tempfile.mkdtemp(prefix="cdi-bundle-smoke-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. read the source split (train: 60,000 images, 28×28 uint8) and record what was read
    files = {"images": args.source_dir / "train-images-idx3-ubyte.gz",
             "labels": args.source_dir / "train-labels-idx1-ubyte.gz"}
    images28, labels_all = read_idx(files["images"]), read_idx(files["labels"])
    if images28.shape[0] != labels_all.shape[0]:
        raise ValueError(f"{files['images']} and {files['labels']} disagree on N")

    # 2. class-balanced disjoint pools, laid out [heldout | easy | hard]
    pools = select_pools(labels_all, sizes, args.seed)
    source_index = np.concatenate([pools[name] for name in sizes]).astype(np.int32)
    ranges, start = {}, 0
    for name in sizes:
        ranges[name] = [start, start + len(pools[name])]
        start += len(pools[name])

    # 3. resize 28 → 16 (area average) and store
    arrays = {
        "images": resize(images28[source_index], SIZE),          # (N, 16, 16) uint8
        "labels": labels_all[source_index].astype(np.uint8),      # (N,) class 0–9
        "source_index": source_index,                              # (N,) row in the train split
    }
    npz_path = out_dir / "fashion16.npz"
    write_npz(npz_path, arrays)
    npz_sha = sha256_bytes(npz_path.read_bytes())

    licence_text = COPYRIGHT_FILE.read_text() if COPYRIGHT_FILE.exists() else None
    meta = {
        "name": "fashion16",
        "description": "Class-balanced subset of the Fashion-MNIST train split, resized to 16x16 uint8, "
                       "split into pools: heldout (never trained on), easy (members of models/easy), "
                       "hard (members of models/hard).",
        "n": int(len(source_index)),
        "image_shape": [SIZE, SIZE],
        "class_names": CLASS_NAMES,
        "pools": {name: {"start": r[0], "stop": r[1], "per_class": sizes[name] // 10} for name, r in ranges.items()},
        "npz_sha256": npz_sha,
        "npz_bytes": npz_path.stat().st_size,
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": array_sha256(v)} for k, v in arrays.items()},
        "provenance": {
            "debian_package": DEBIAN_PACKAGE,
            "debian_version": debian_version(DEBIAN_PACKAGE),
            "upstream": "https://github.com/zalandoresearch/fashion-mnist",
            "source_split": "train",
            "source_files": {k: {"path": str(p), "sha256": sha256_bytes(p.read_bytes())} for k, p in files.items()},
            "selection": "per class c: numpy.random.default_rng([seed, c]).permutation(indices of class c), "
                         "cut into consecutive blocks heldout|easy|hard; each pool sorted by source index",
            "seed": args.seed,
            "resize": f"PIL.Image.resize(({SIZE}, {SIZE}), Image.Resampling.BOX) on 28x28 mode 'L' "
                      "(box filter = area average, anti-aliased)",
            "pillow_version": PIL.__version__,
            "numpy_version": np.__version__,
            "command": "python jobs/build_bundle.py" + (" --smoke-test" if args.smoke_test else ""),
        },
        "licence": {
            "spdx": "MIT",
            "summary": "Fashion-MNIST, Copyright (c) 2017 Zalando SE, released under the MIT licence "
                       "(Debian: Expat). Redistribution and modification are permitted provided the "
                       "copyright notice and permission notice are included; see LICENSE-fashion-mnist.txt.",
            "file": "LICENSE-fashion-mnist.txt",
        },
    }
    (out_dir / "fashion16.json").write_text(json.dumps(meta, indent=2) + "\n")
    if licence_text is not None:
        (out_dir / "LICENSE-fashion-mnist.txt").write_text(
            "The file fashion16.npz in this directory is derived from Fashion-MNIST\n"
            "(https://github.com/zalandoresearch/fashion-mnist): a subset of the train split,\n"
            "downscaled to 16x16. The demo models under models/ were trained on it.\n"
            f"Obtained from the Debian package {DEBIAN_PACKAGE} "
            f"{meta['provenance']['debian_version']}; its copyright file follows.\n\n"
            "The MIT License (MIT)\n\nCopyright (c) 2017 Zalando SE\n\n" + licence_text)

    summary = {"out_dir": str(out_dir), "n": meta["n"], "pools": meta["pools"],
               "npz_sha256": npz_sha, "npz_bytes": meta["npz_bytes"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_args())

