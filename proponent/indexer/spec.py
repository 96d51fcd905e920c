"""The dataset spec grammar: which kinds of source exist, their ARG and options (no file is read here).

The loaders live in :mod:`proponent.indexer.data`.

A dataset is described by a *spec string*::

    spec    := part ("+" part)*
    part    := KIND [":" ARG] ("," option)*
    option  := key "=" value | flag

Kinds (``ARG`` is a path; ``~`` is expanded):

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images), shape ``[N, 1, 8, 8]``, labels 0..9.
    Options (a deterministic, larger stand-in for MNIST-size experiments):
    ``size=S`` renders every digit in an S x S frame (S in 8..256; default 8, the original
    images). For S > 8 the 8x8 digit is resampled (bilinear, zero outside) into a centred box of
    5/7 of the frame, MNIST's 20-in-28 layout. ``augment=N`` gives N random affine variants of
    every image instead of the image itself: rotation uniform in +-15 degrees, scale in
    [0.9, 1.1], shift in +-S/14 pixels on each axis (+-2 px at 28); one bilinear resampling from
    the 8x8 source. Rows are variant-major (row ``v * 1797 + i`` is variant v of image i) and
    keep image i's label. ``seed=K`` (default 0) keys the transforms: variant v of image i
    depends only on (K, v, i), not on N. Example: ``digits,size=28,augment=6`` (10,782 images).
``glyphs``
    generated outliers (no files): dense, high-contrast, heavily filled images to inject among
    digits, ``[N, 1, S, S]`` without labels. Options: ``n=N`` images (default 180), ``size=S``
    (default 8, the digits' size; 28 for MNIST-sized data), ``seed=N`` (default 0) and
    ``style=letters|negative|shapes|texture|noise|mix`` (default letters: bold capitals of
    Pillow's bundled font, edge to edge; negative: the same inverted; shapes: overlapping filled
    ellipses, rectangles and polygons; texture: stripes and checkerboards; noise: binary blobs;
    mix: each image one of these). Deterministic: image r depends only on (seed, r), see
    :func:`generate_glyphs`. Options may also follow a colon: ``digits+glyphs:n=180,injected``.
    Among digits upscaled to 28x28, 10% ``letters`` at ``size=28`` have a median self-influence
    7.7x the digits' and raw TracIn puts them among the top proponents of clean digits
    (``benchmarks/outliers.py``); at 8x8 the VAE fits them and their gradients stay ordinary.
``mnist-idx:DIR``
    idx files (optionally gzipped) of MNIST, Fashion-MNIST, KMNIST, EMNIST, notMNIST...:
    ``DIR/{prefix}-images-idx3-ubyte[.gz]`` (or ``{prefix}-images.idx3-ubyte``) and, optionally,
    ``DIR/{prefix}-labels-idx1-ubyte[.gz]``. Options: ``prefix=train`` (default; e.g. ``t10k``,
    ``emnist-letters-train``) and the flag ``transpose`` (EMNIST stores its images transposed).
``cifar10:DIR``
    the CIFAR-10 python batches ``data_batch_1`` .. ``data_batch_5`` (those present, in order) or
    ``test_batch``; option ``split=train|test`` (default train); shape ``[N, 3, 32, 32]``.
    **Pickle files can run code when loaded**: only name files you trust. They are read with a
    restricted unpickler that only rebuilds numpy arrays and plain containers, which blocks the
    usual attacks, but it is no licence to load pickles from untrusted sources.
``npz:FILE``
    a numpy ``.npz`` archive with an array ``x`` and an optional integer array ``y`` (labels).
    ``x`` may be ``N x D`` (flat vectors, kept flat), ``N x H x W`` (grey) or ``N x H x W x C``
    with C in {1, 3, 4} (moved to channels first; ``N x C x H x W`` is accepted as is).
    Integer ``x`` must hold 0..255 and is divided by 255; float ``x`` must already lie in [0, 1].
``folder:DIR``
    image files read with Pillow. When DIR has sub-folders, each is a class (sorted names give the
    labels 0..K-1; images are searched recursively inside them); otherwise the images directly in
    DIR are read without labels. Files are sorted by their path for stable ids. Options:
    ``mode=L|RGB`` (default: L when every image is grey, else RGB) and ``size=HxW`` (resize with
    bilinear filtering; by default all images must share one size).

Options every part accepts: ``limit=N`` (keep the first N rows after the offset), ``offset=N``
(skip N rows) and the flag ``injected`` (marks the part's rows as injected outliers, for the
outlier-detection report). Spaces around tokens are ignored; paths cannot contain ``+`` or ``,``.

Example: ``mnist-idx:/d/mnist+mnist-idx:/d/emnist,prefix=emnist-letters-train,limit=1000,injected,transpose``.

Every malformed input raises :class:`DataError` (a ``ValueError``) with one line naming the
file and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proponent.format.images import DataError

__all__ = ["GLYPH_STYLES", "KINDS", "DataError", "Kind", "PartSpec", "parse_spec"]

GLYPH_STYLES = ("letters", "negative", "shapes", "texture", "noise", "mix")


@dataclass(frozen=True)
class PartSpec:
    """One parsed part of a spec string."""

    text: str
    kind: str
    arg: str | None
    offset: int
    limit: int | None
    injected: bool
    options: Mapping[str, Any]  # kind-specific options, defaults filled in

    @property
    def where(self) -> str:
        """Message prefix naming the part: ``"kind: path: "``."""
        return f"{self.kind}: {self.arg}: " if self.arg is not None else f"{self.kind}: "


@dataclass(frozen=True)
class _Option:
    usage: str  # e.g. "limit=N", shown in messages
    convert: Callable[[str], Any] | None  # None for flags
    default: Any = None


def _integer(minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError("not an integer") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return convert


def _integer_range(minimum: int, maximum: int) -> Callable[[str], int]:
    at_least = _integer(minimum)

    def convert(value: str) -> int:
        number = at_least(value)
        if number > maximum:
            raise ValueError(f"must be at most {maximum}")
        return number

    return convert


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(choices)}")

    return convert


def _size(value: str) -> tuple[int, int]:
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not found or int(found.group(1)) < 1 or int(found.group(2)) < 1:
        raise ValueError("expected HxW with positive integers, e.g. 28x28")
    return int(found.group(1)), int(found.group(2))


def _file_prefix(value: str) -> str:
    if "/" in value or "\\" in value:
        raise ValueError("a file name prefix, not a path")
    return value


_COMMON_OPTIONS: dict[str, _Option] = {
    "limit": _Option("limit=N", _integer(1)),
    "offset": _Option("offset=N", _integer(0), 0),
    "injected": _Option("injected", None, False),
}


@dataclass(frozen=True)
class Kind:
    """The grammar of one kind: what its ARG names (None: no ARG) and the options it takes."""

    arg: str | None  # what ARG names (for messages); None when the kind takes no ARG
    options: dict[str, _Option]


KINDS: dict[str, Kind] = {
    "digits": Kind(
        None,
        {
            "size": _Option("size=S", _integer_range(8, 256), None),
            "augment": _Option("augment=N", _integer(1), None),
            "seed": _Option("seed=K", _integer(0), None),
        },
    ),
    "glyphs": Kind(
        None,
        {
            "n": _Option("n=N", _integer(1), 180),
            "size": _Option("size=S", _integer(4), 8),
            "seed": _Option("seed=N", _integer(0), 0),
            "style": _Option(f"style={'|'.join(GLYPH_STYLES)}", _choice(*GLYPH_STYLES), "letters"),
        },
    ),
    "mnist-idx": Kind(
        "DIR",
        {
            "prefix": _Option("prefix=NAME", _file_prefix, "train"),
            "transpose": _Option("transpose", None, False),
        },
    ),
    "cifar10": Kind("DIR", {"split": _Option("split=train|test", _choice("train", "test"), "train")}),
    "npz": Kind("FILE", {}),
    "folder": Kind(
        "DIR",
        {
            "mode": _Option("mode=L|RGB", _choice("L", "RGB"), None),
            "size": _Option("size=HxW", _size, None),
        },
    ),
}


def parse_spec(spec: str) -> list[PartSpec]:
    """Parse a dataset spec string (see the module docstring) without reading any file."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty dataset spec")
    parts = []
    for text in spec.split("+"):
        text = text.strip()
        if not text:
            raise DataError(f"empty part in dataset spec {spec!r}")
        parts.append(_parse_part(text))
    return parts


def _parse_part(text: str) -> PartSpec:
    head, *raw_options = (token.strip() for token in text.split(","))
    name, has_arg, raw_arg = head.partition(":")
    kind_name = name.strip().lower()
    kind = KINDS.get(kind_name)
    if kind is None:
        raise DataError(f"{text}: unknown kind {name.strip()!r} (known: {', '.join(sorted(KINDS))})")
    arg = raw_arg.strip() if has_arg else None
    if kind.arg is None and arg is not None and "=" in arg:  # ``glyphs:n=180``: options may follow the colon
        raw_options = [arg, *raw_options]
        arg = None
    if kind.arg is None and arg is not None:
        raise DataError(f"{text}: {kind_name} takes no argument")
    if kind.arg is not None and not arg:
        raise DataError(f"{text}: {kind_name} needs a {kind.arg}: {kind_name}:{kind.arg}")

    allowed = {**_COMMON_OPTIONS, **kind.options}
    values: dict[str, Any] = {}
    for raw in raw_options:
        if not raw:
            raise DataError(f"{text}: empty option")
        key, has_value, value = (s.strip() for s in raw.partition("="))
        option = allowed.get(key)
        if option is None:
            raise DataError(f"{text}: unknown option {key!r} for {kind_name} (allowed: {', '.join(sorted(allowed))})")
        if key in values:
            raise DataError(f"{text}: option {key!r} given twice")
        if option.convert is None:
            if has_value:
                raise DataError(f"{text}: option {key!r} is a flag and takes no value")
            values[key] = True
            continue
        if not value:
            raise DataError(f"{text}: option {key!r} needs a value ({option.usage})")
        try:
            values[key] = option.convert(value)
        except ValueError as exc:
            raise DataError(f"{text}: bad value {value!r} for {option.usage}: {exc}") from None

    def get(key: str) -> Any:
        return values.get(key, allowed[key].default)

    return PartSpec(
        text=text,
        kind=kind_name,
        arg=arg,
        offset=get("offset"),
        limit=get("limit"),
        injected=get("injected"),
        options={key: get(key) for key in kind.options},
    )
