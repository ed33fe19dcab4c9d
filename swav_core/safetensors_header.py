"""The header of a safetensors file, read and checked without torch (the API checks an
upload with it before any worker loads the tensors).

The format (huggingface/safetensors): 8 bytes, the header's length N as a little-endian
u64; N bytes of UTF-8 JSON mapping each tensor name to {"dtype", "shape", "data_offsets":
[begin, end]} relative to the byte after the header, plus an optional "__metadata__" of
string to string; then the data. The tensors tile the data exactly: sorted by offset,
each begins where the previous one ends, the last ends at the end of the file, and each
spans shape's product times its dtype's size in bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself applies
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
EXPECTED = (
    "expected a safetensors file: an 8-byte little-endian header length, a JSON header of "
    "{name: {dtype, shape, data_offsets}} and the tensors' bytes (save it with "
    "safetensors.torch.save_file(model.state_dict(), path))"
)


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a well-formed file holds: tensor name -> (dtype, shape), and its metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]


def _fail(problem: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"{problem}; {EXPECTED}")


def read_header(path: Path) -> SafetensorsHeader:
    """The header of the safetensors file at `path`, checked against the file's size.

    Raises SafetensorsFormatError naming the first problem found.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _fail(f"the file has {size} bytes, fewer than the 8 of a header length")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _fail(f"the header length {length} does not fit the file's {size} bytes")
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise _fail("the header is not UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise _fail("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail("__metadata__ is not a map of strings to strings")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, offsets = _entry(name, entry)
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _fail(f"tensor {name!r}: {end - begin} bytes for a {dtype} of shape {shape}")
        tensors[name] = (dtype, shape)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _fail(f"tensor {name!r} begins at byte {begin}, not {position} (gap or overlap)")
        position = end
    if position != size - 8 - length:
        raise _fail(f"the tensors end at data byte {position}, the file's data has "
                    f"{size - 8 - length}")
    return SafetensorsHeader(tensors, dict(metadata))


def _entry(name: str, entry: object) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _fail(f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _fail(f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    return str(dtype), tuple(shape), (offsets[0], offsets[1])
