"""What a frame store may contain: exactly the groups, arrays, dtypes, codecs and shapes dvsprep
writes. A store from elsewhere (a zip, a URL) is checked against this before zarr opens any of
it, so a crafted store cannot name a pickle/object codec, an unexpected array, or a shape whose
allocation would exhaust memory.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..constants import (
    FRAMES_FORMAT,
    LABEL_DTYPE,
    N_POLARITIES,
    ROW_DTYPE,
    SENSOR_SIZE,
    SPLIT_METHODS,
    SPLITS,
    T_DTYPE,
)
from ..errors import StoreError, UntrustedStoreError

# Declared sizes beyond these are refused before anything is allocated.
MAX_T = 4096
MAX_SAMPLES = 1_000_000
MAX_SHARD_SAMPLES = 4096
MAX_NAME_BYTES = 1024             # one recording name, UTF-8

FRAME_DTYPE_NAMES = ("uint8", "uint16")
N_EVENTS_DTYPE = np.dtype("<i8")
META_DTYPES: dict[str, np.dtype] = {
    "label": LABEL_DTYPE,
    "row": ROW_DTYPE,
    "t_start": T_DTYPE,
    "t_end": T_DTYPE,
    "n_events": N_EVENTS_DTYPE,
}
META_FIELDS = ("label", "recording", "row", "t_start", "t_end", "n_events")
ARRAYS = ("frames", *META_FIELDS)

_ARRAY_KEYS = {"shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs", "attributes",
               "dimension_names", "zarr_format", "node_type", "storage_transformers"}
_GROUP_KEYS = {"attributes", "zarr_format", "node_type", "consolidated_metadata"}
ZSTD_LEVELS = range(-131072, 23)  # what libzstd accepts
_BLOSC_CNAMES = {"lz4", "lz4hc", "blosclz", "zstd", "zlib"}
_BLOSC_SHUFFLES = {"noshuffle", "shuffle", "bitshuffle"}


def _int(v: Any) -> bool:
    return type(v) is int


def _in(v: Any, allowed: range) -> bool:
    """An int (not a bool or float) within `allowed`: codec levels beyond what the codec
    libraries take make them raise (or overflow) when the store is read."""
    return _int(v) and v in allowed


def check_root_attrs(where: str, attrs: Any) -> None:
    """The root group's attributes: format, T, split_by, dtype, sensor size, sample counts."""
    if not isinstance(attrs, dict):
        raise StoreError(f"{where}: root attributes are not an object")
    if attrs.get("format") != FRAMES_FORMAT:
        raise StoreError(f"{where}: not a dvsprep frame store (format {attrs.get('format')!r}, "
                         f"expected {FRAMES_FORMAT!r})")
    for key in ("T", "split_by", "dtype", "splits", "sensor_size"):
        if key not in attrs:
            raise StoreError(f"{where}: store attributes lack {key!r}")
    if not _int(attrs["T"]) or not 1 <= attrs["T"] <= MAX_T:
        raise UntrustedStoreError(f"{where}: T={attrs['T']!r} outside 1..{MAX_T}")
    if attrs["dtype"] not in FRAME_DTYPE_NAMES:
        raise StoreError(f"{where}: unsupported frame dtype {attrs['dtype']!r}")
    if attrs["split_by"] not in SPLIT_METHODS:
        raise StoreError(f"{where}: unknown split method {attrs['split_by']!r}")
    if attrs["sensor_size"] != list(SENSOR_SIZE):
        raise UntrustedStoreError(f"{where}: sensor size {attrs['sensor_size']!r}, expected {list(SENSOR_SIZE)}")
    splits = attrs["splits"]
    if not isinstance(splits, dict) or not set(splits) <= set(SPLITS):
        raise UntrustedStoreError(f"{where}: splits {sorted(splits) if isinstance(splits, dict) else splits!r}; "
                                  f"expected some of {', '.join(SPLITS)}")
    for name, info in splits.items():
        n = info.get("n_samples") if isinstance(info, dict) else None
        if not _int(n) or not 0 <= n <= MAX_SAMPLES:
            raise UntrustedStoreError(f"{where}: split {name!r} declares {n!r} samples (0..{MAX_SAMPLES} allowed)")


def check_group_meta(where: str, meta: Any) -> None:
    if (not isinstance(meta, dict) or not set(meta) <= _GROUP_KEYS or meta.get("zarr_format") != 3
            or meta.get("node_type") != "group" or meta.get("consolidated_metadata") is not None):
        raise UntrustedStoreError(f"{where}: not a plain zarr v3 group")


def _fail(where: str, what: str) -> UntrustedStoreError:
    return UntrustedStoreError(f"{where}: {what}; dvsprep never writes that, refusing the store")


def _check_bytes_codec(where: str, c: Any, itemsize: int) -> None:
    if not isinstance(c, dict) or c.get("name") != "bytes" or not set(c) <= {"name", "configuration"}:
        raise _fail(where, f"codec {c!r} where 'bytes' belongs")
    endian = (c.get("configuration") or {}).get("endian", "little" if itemsize == 1 else None)
    if endian != "little" and not (itemsize == 1 and endian in ("little", "big")):
        raise _fail(where, f"byte order {endian!r}")


def _check_compressor(where: str, c: Any, allowed: tuple[str, ...]) -> str:
    name = c.get("name") if isinstance(c, dict) else None
    if name not in allowed or not set(c) <= {"name", "configuration"}:
        raise _fail(where, f"codec {name or c!r} (allowed: {', '.join(allowed)})")
    # zarr requires the configuration (an object, `{}` for defaults) of every compressor: one it
    # cannot open must not pass as valid here
    cfg = c.get("configuration")
    if not isinstance(cfg, dict):
        raise _fail(where, f"{name} configuration {cfg!r}")
    ok = {
        "zstd": lambda: set(cfg) <= {"level", "checksum"} and _in(cfg.get("level", 0), ZSTD_LEVELS)
        and isinstance(cfg.get("checksum", False), bool),
        "gzip": lambda: set(cfg) <= {"level"} and _in(cfg.get("level", 6), range(0, 10)),
        "blosc": lambda: set(cfg) <= {"typesize", "cname", "clevel", "shuffle", "blocksize"}
        and cfg.get("cname", "lz4") in _BLOSC_CNAMES and cfg.get("shuffle", "bitshuffle") in _BLOSC_SHUFFLES
        and _in(cfg.get("clevel", 5), range(0, 10)) and _in(cfg.get("typesize", 1), range(1, 9))
        and _in(cfg.get("blocksize", 0), range(0, 1 << 31)),
    }[name]()
    if not ok:
        raise _fail(where, f"{name} configuration {cfg!r}")
    return name


def check_array_meta(where: str, meta: Any, *, field: str, n: int, T: int, dtype: str) -> dict[str, Any]:
    """Check one array's zarr.json against what we write; returns {"chunk": samples per chunk
    (per shard for frames), "codec": compressor name}."""
    if not isinstance(meta, dict) or not set(meta) <= _ARRAY_KEYS:
        extra = sorted(set(meta) - _ARRAY_KEYS) if isinstance(meta, dict) else meta
        raise _fail(where, f"array metadata with {extra!r}")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise _fail(where, "not a zarr v3 array")
    if meta.get("storage_transformers") not in (None, []) or meta.get("attributes") not in (None, {}):
        raise _fail(where, "storage transformers or array attributes")
    H, W = SENSOR_SIZE
    if field == "frames":
        want_dtype, want_shape, fill = dtype, [n, T, N_POLARITIES, H, W], 0
    elif field == "recording":
        want_dtype, want_shape, fill = "string", [n], ""
    else:
        want_dtype, want_shape, fill = META_DTYPES[field].name, [n], 0
    if meta.get("data_type") != want_dtype:
        raise _fail(where, f"data type {meta.get('data_type')!r} (expected {want_dtype})")
    if meta.get("shape") != want_shape:
        raise UntrustedStoreError(f"{where}: shape {meta.get('shape')!r}, expected {want_shape}")
    if meta.get("fill_value") != fill or type(meta.get("fill_value")) is not type(fill):
        raise _fail(where, f"fill value {meta.get('fill_value')!r}")
    cke = meta.get("chunk_key_encoding")
    if not isinstance(cke, dict) or cke.get("name") != "default" or \
            (cke.get("configuration") or {}).get("separator", "/") != "/":
        raise _fail(where, f"chunk key encoding {cke!r}")
    grid = meta.get("chunk_grid")
    chunk = (grid.get("configuration") or {}).get("chunk_shape") if isinstance(grid, dict) else None
    if not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunk, list) or \
            len(chunk) != len(want_shape) or not all(_int(c) and c >= 1 for c in chunk):
        raise _fail(where, f"chunk grid {grid!r}")
    codecs = meta.get("codecs")
    if not isinstance(codecs, list):
        raise _fail(where, "codecs that are not a list")
    if field == "frames":
        if chunk[1:] != want_shape[1:] or chunk[0] > MAX_SHARD_SAMPLES:
            raise UntrustedStoreError(f"{where}: shard shape {chunk}, expected [1..{MAX_SHARD_SAMPLES}, "
                                      f"{', '.join(map(str, want_shape[1:]))}]")
        if len(codecs) != 1 or not isinstance(codecs[0], dict) or codecs[0].get("name") != "sharding_indexed":
            raise _fail(where, f"codecs {[c.get('name') if isinstance(c, dict) else c for c in codecs]}")
        cfg = codecs[0].get("configuration")
        if not isinstance(cfg, dict) or not set(cfg) <= {"chunk_shape", "codecs", "index_codecs", "index_location"}:
            raise _fail(where, f"sharding configuration {cfg!r}")
        if cfg.get("chunk_shape") != [1, *want_shape[1:]]:
            raise UntrustedStoreError(f"{where}: inner chunk {cfg.get('chunk_shape')!r}, expected one sample")
        if cfg.get("index_location", "end") != "end":
            raise _fail(where, "shard index at the start")
        index = cfg.get("index_codecs")
        if not isinstance(index, list) or len(index) != 2 or index[1] != {"name": "crc32c"}:
            raise _fail(where, f"shard index codecs {index!r}")
        _check_bytes_codec(where, index[0], 8)
        inner = cfg.get("codecs")
        if not isinstance(inner, list) or len(inner) != 2:
            raise _fail(where, f"inner codecs {inner!r}")
        _check_bytes_codec(where, inner[0], np.dtype(dtype).itemsize)
        codec = _check_compressor(where, inner[1], ("blosc", "zstd", "gzip"))
    else:
        if chunk[0] > max(n, 1):
            raise UntrustedStoreError(f"{where}: chunk of {chunk[0]} for {n} samples")
        if len(codecs) != 2:
            raise _fail(where, f"{len(codecs)} codecs")
        if field == "recording":
            if codecs[0] not in ({"name": "vlen-utf8", "configuration": {}}, {"name": "vlen-utf8"}):
                raise _fail(where, f"string codec {codecs[0]!r}")
        else:
            _check_bytes_codec(where, codecs[0], META_DTYPES[field].itemsize)
        codec = _check_compressor(where, codecs[1], ("zstd",))
    return {"chunk": int(chunk[0]), "codec": codec}


def chunk_keys(split: str, field: str, n: int, chunk: int) -> list[str]:
    """Names of the chunk (shard) files an array of `n` samples may have, in sample order."""
    n_chunks = -(-n // chunk)
    tail = "/0/0/0/0" if field == "frames" else ""
    return [f"{split}/{field}/c/{k}{tail}" for k in range(n_chunks)]


def max_decoded_bytes(field: str, chunk: int) -> int:
    """Upper bound of one decoded metadata chunk (strings: vlen-utf8 framing + bounded names)."""
    if field == "recording":
        return 4 + chunk * (4 + MAX_NAME_BYTES)
    return chunk * META_DTYPES[field].itemsize


def zstd_content_size(data: bytes) -> int | None:
    """Decompressed size declared in a zstd frame header, or None when absent or not zstd."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = data[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(data) < pos + size:
        return None
    value = int.from_bytes(data[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def check_manifest_names(where: str, names: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    """Every file the manifest lists is one the store's layout expects; the metadata documents are there."""
    unexpected = sorted(set(names) - allowed)
    if unexpected:
        raise UntrustedStoreError(f"{where}: manifest lists unexpected file(s) {', '.join(unexpected[:5])}"
                                  f"{' ...' if len(unexpected) > 5 else ''}")
    absent = sorted(required - set(names))
    if absent:
        raise StoreError(f"{where}: manifest does not list {', '.join(absent[:5])}")
