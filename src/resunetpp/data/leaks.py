"""Leaks between split parts: perceptual hashes, near-duplicate groups and video sequences.

A split leaks when two images that are nearly the same picture (a near-duplicate, or two frames of one
colonoscopy sequence) fall into different parts: the test score then partly measures memory.

- `phash(image)`: a 256-bit DCT perceptual hash, as a Python int: the `imagehash.phash` recipe at hash size
  16 on the central 60 % of the image (grey, 64x64 area resize, 2-D DCT, the 16x16 lowest frequencies, each
  bit = coefficient > their median).
- `near_duplicate_groups(hashes, max_distance)`: ids whose hashes differ in at most `max_distance` bits
  (`NEAR_DUPLICATE_BITS` = 54 by default, out of 256), joined transitively into groups; singletons are left out.
- `sequences(name)`: the committed sequence file of a dataset (CVC-ClinicDB: 31 sequences of consecutive
  frame ids, `resunetpp/splits/cvc-clinicdb-sequences.json`), as a list of id lists.
- `grouped_split(ids, groups, seed)`: an 80/10/10 split by frames that keeps every group in one part.
- `split_leaks(split, groups)`: the groups that a split cuts across parts, with the ids in each part.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np

from resunetpp.data.layouts import natural_sorted

HASH_SIZE = 16
CROP = 0.2
NEAR_DUPLICATE_BITS = 54
SPLIT_TRIALS = 1000
PARTS = ("train", "val", "test")


def phash(image: np.ndarray, hash_size: int = HASH_SIZE, crop: float = CROP) -> int:
    """Perceptual hash (hash_size**2 bits, as an int) of an (H, W, 3) RGB or (H, W) grey uint8 image.

    `crop` is cut off each side first (a fraction of the height and width), so that the black corners and
    the on-screen overlays that many colonoscopy frames share do not make different pictures look alike."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    h, w = grey.shape
    dy, dx = int(round(crop * h)), int(round(crop * w))
    grey = np.ascontiguousarray(grey[dy:h - dy, dx:w - dx])
    side = 4 * hash_size
    small = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:hash_size, :hash_size].ravel()
    bits = low > np.median(low)
    return int(sum(1 << k for k, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def _distances(hashes: Sequence[int]) -> np.ndarray:
    """(n, n) matrix of Hamming distances between hashes (ints of any width)."""
    nbits = max(1, max(int(x).bit_length() for x in hashes))
    nbytes = (nbits + 7) // 8
    raw = np.frombuffer(b"".join(int(x).to_bytes(nbytes, "little") for x in hashes), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(hashes), nbytes), axis=1).astype(np.int32)
    return bits @ (1 - bits).T + (1 - bits) @ bits.T


def near_duplicate_pairs(hashes: Mapping[str, int], max_distance: int = NEAR_DUPLICATE_BITS
                         ) -> list[tuple[str, str, int]]:
    """(id a, id b, distance) for every pair within `max_distance` bits, a before b naturally."""
    ids = natural_sorted(hashes)
    if len(ids) < 2:
        return []
    d = _distances([hashes[i] for i in ids])
    a, b = np.nonzero(np.triu(d <= max_distance, k=1))
    return [(ids[i], ids[j], int(d[i, j])) for i, j in zip(a.tolist(), b.tolist())]


def _union_groups(ids: Iterable[str], links: Iterable[tuple[str, str]]) -> list[list[str]]:
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra
    groups: dict[str, list[str]] = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    return sorted((natural_sorted(g) for g in groups.values()), key=lambda g: natural_sorted(g)[0])


def near_duplicate_groups(hashes: Mapping[str, int], max_distance: int = NEAR_DUPLICATE_BITS) -> list[list[str]]:
    """Groups (2 or more ids) of images linked by near-duplicate pairs, transitively."""
    pairs = near_duplicate_pairs(hashes, max_distance)
    linked = {i for a, b, _ in pairs for i in (a, b)}
    return [g for g in _union_groups(natural_sorted(linked), ((a, b) for a, b, _ in pairs)) if len(g) > 1]


def sequences_path(name: str) -> Path:
    return Path(str(files("resunetpp") / "splits" / f"{name.lower()}-sequences.json"))


def load_sequences(path: str | os.PathLike) -> list[list[str]]:
    """Read a sequence file ({"sequences": [[id, ...], ...]}); errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
        seqs = obj["sequences"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: sequence file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a sequence file with a 'sequences' list of id lists ({e!r})") from None
    if not isinstance(seqs, list) or not all(isinstance(s, list) and s and all(isinstance(i, str) for i in s)
                                             for s in seqs):
        raise ValueError(f"{path}: 'sequences' must be a list of non-empty lists of id strings")
    seen = [i for s in seqs for i in s]
    if len(seen) != len(set(seen)):
        dup = natural_sorted({i for i in seen if seen.count(i) > 1})[:5]
        raise ValueError(f"{path}: ids in more than one sequence: {', '.join(dup)}")
    return seqs


def sequences(name: str) -> list[list[str]]:
    """The committed sequences of a dataset ("cvc-clinicdb"), or an error naming what exists."""
    path = sequences_path(name)
    if not path.is_file():
        raise KeyError(f"no committed sequence file for dataset {name!r} (only cvc-clinicdb has one); "
                       "group by near-duplicates instead")
    return load_sequences(path)


def grouped_split(ids: Iterable[str], groups: Iterable[Sequence[str]], seed: int = 0,
                  fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """A split that keeps each group whole: about `fractions` of the frames per part.

    Ids in no group are groups of one. The groups, sorted by their first id, are shuffled with
    ``random.Random(seed)``; each goes to test when that brings test closer to round(f_test n) frames, else to
    val likewise, else to train. With large groups the parts can miss their sizes, so up to `SPLIT_TRIALS`
    shuffles (drawn one after the other from the same generator) are tried and the first that hits both sizes,
    or the closest, is kept: deterministic for a seed.
    """
    ids = natural_sorted(str(i) for i in ids)
    known = set(ids)
    units: list[list[str]] = []
    placed: set[str] = set()
    for g in groups:
        g = [str(i) for i in g if str(i) in known and str(i) not in placed]
        if g:
            units.append(natural_sorted(g))
            placed.update(g)
    units += [[i] for i in ids if i not in placed]
    order = {i: k for k, i in enumerate(ids)}
    units.sort(key=lambda g: order[g[0]])
    n = len(ids)
    target = {"val": round(fractions[1] * n), "test": round(fractions[2] * n)}
    rng = random.Random(seed)
    best, best_miss = None, None
    for _ in range(SPLIT_TRIALS):
        rng.shuffle(units)
        parts: dict[str, list[str]] = {p: [] for p in PARTS}
        for g in units:
            for part in ("test", "val"):
                have = len(parts[part])
                if abs(have + len(g) - target[part]) < abs(have - target[part]):
                    parts[part] += g
                    break
            else:
                parts["train"] += g
        miss = sum(abs(len(parts[p]) - target[p]) for p in ("val", "test"))
        if best_miss is None or miss < best_miss:
            best, best_miss = parts, miss
        if miss == 0:
            break
    parts = best
    return {p: natural_sorted(parts[p]) for p in PARTS}


def split_leaks(split: Mapping[str, Sequence[str]], groups: Iterable[Sequence[str]]) -> list[dict[str, list[str]]]:
    """For every group that spans two or more parts of `split`: {part: [its ids there]}."""
    where = {i: p for p in PARTS for i in split.get(p, [])}
    leaks = []
    for g in groups:
        by_part: dict[str, list[str]] = {}
        for i in g:
            if i in where:
                by_part.setdefault(where[i], []).append(i)
        if len(by_part) > 1:
            leaks.append(by_part)
    return leaks


def neighbour_leaks(split: Mapping[str, Sequence[str]], seqs: Iterable[Sequence[str]], part: str = "test"
                    ) -> tuple[int, int]:
    """(frames of `part` with at least one, with both, sequence neighbour(s) in train); ends count as one side."""
    train = set(split["train"])
    one = both = 0
    for s in seqs:
        for k, i in enumerate(s):
            if i not in split[part]:
                continue
            nbrs = [s[j] for j in (k - 1, k + 1) if 0 <= j < len(s)]
            inside = [x in train for x in nbrs]
            one += any(inside)
            both += len(nbrs) == 2 and all(inside)
    return one, both
