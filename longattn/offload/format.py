"""Byte layout of a longattn KV page store on disk (format version 1).

A store is one directory::

    <dir>/lock              flock(2) lock file; holds the writer's pid as ASCII (for error messages only)
    <dir>/journal           header + append-only commit records (the index, as a log)
    <dir>/snapshot          header + the whole live index at one commit (written by compaction; optional)
    <dir>/layer_00000.kv    header + fixed page slots of layer 0 (one data file per layer)
    <dir>/layer_00001.kv    ...

All integers are little-endian.

**File header** (every data file, the journal and the snapshot start with it;
``HEADER_SIZE`` = 4096 bytes, so page slots start page-aligned)::

    offset size  field
    0      8     magic b"LONGATKV"
    8      4     u32 format version (1)
    12     4     u32 header size (4096)
    16     4     u32 file kind: 1 data, 2 journal, 3 snapshot
    20     4     u32 layer index (data files; 0xFFFFFFFF otherwise)
    24     4     u32 num_layers
    28     4     u32 nheads_k
    32     4     u32 headdim
    36     4     u32 page_size (tokens per page)
    40     16    dtype name, ASCII, NUL padded ("float32", "float16", "bfloat16", ...)
    56     16    checksum algorithm name, ASCII, NUL padded ("xxh3_64")
    72     8     u64 page_bytes = 2 * page_size * nheads_k * headdim * itemsize
    80     8     u64 slot_bytes = page_bytes rounded up to a multiple of 4096
    88     8     u64 generation (journal and snapshot: bumped by each compaction; data files: 0)
    96     16    store id (16 random bytes, the same in every file of one store)
    112    8     u64 xxh3_64 of bytes [0, 112)
    120    3976  zero

**Data file** ``layer_NNNNN.kv``: page slot ``s`` occupies bytes
``[4096 + s * slot_bytes, 4096 + s * slot_bytes + page_bytes)``; the rest of
the slot is padding. A page is its ``(2, page_size, nheads_k, headdim)``
tensor (K then V) in C order, native dtype bytes. A slot holds a page only if
the index says so; other slots are free (possibly holding stale or
half-written bytes, never reachable).

**Journal record** (appended at the journal's end, one per commit)::

    offset size  field
    0      4     magic b"LAJR"
    4      4     u32 number of entries n
    8      8     u64 commit number (1, 2, 3, ...: each record is the previous + 1)
    16     8     u64 xxh3_64 of bytes [0, 16) followed by the n entries
    24     40*n  entries

**Entry** (40 bytes; also the snapshot's body)::

    0      1     u8 op: 1 put (page now lives in slot), 2 free (page removed)
    1      1     u8 zero
    2      2     u16 layer
    4      4     u32 ntokens (valid tokens in the page, 1..page_size; 0 for free)
    8      8     i64 seq_id
    16     8     i64 page_no
    24     8     u64 slot (put; 0 for free)
    32     8     u64 xxh3_64 of the page's page_bytes (put; 0 for free)

A put of a key that exists replaces it (copy-on-write: the new bytes went to
a fresh slot; the old slot becomes free once this record is durable).

**Snapshot** ``snapshot``: header (kind 3), then ``u64 last commit number,
u64 entry count n, u64 xxh3_64 of the n entries``, then n put entries. It is
written to ``snapshot.tmp``, fsynced, renamed over ``snapshot``, and the
directory fsynced; then a fresh journal with the same generation replaces the
old one the same way. On open: snapshot generation S (0 without a snapshot)
and journal generation J: J == S replays the journal on the snapshot; J < S
(crash between the two renames) ignores the journal, whose commits the
snapshot already holds; J > S is corruption.

**Commit protocol**: write the batch's pages into free slots (never a slot the
same batch frees), fdatasync the data file, append the journal record,
fdatasync the journal. A record cut short or failing its checksum at the end
of the journal is a torn write of an uncommitted batch and is ignored (a
writer truncates it away on open); a bad record followed by a valid one is
corruption. Consequence: a bit flipped inside the *last* record looks like a
torn write, and that one commit is dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import xxhash

from longattn.errors import CorruptKVError

MAGIC = b"LONGATKV"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
ALIGN = 4096
CHECKSUM_NAME = "xxh3_64"
NO_LAYER = 0xFFFFFFFF

KIND_DATA = 1
KIND_JOURNAL = 2
KIND_SNAPSHOT = 3
KIND_NAMES = {KIND_DATA: "data", KIND_JOURNAL: "journal", KIND_SNAPSHOT: "snapshot"}

_HEADER = struct.Struct("<8sIIIIIIII16s16sQQQ16s")  # 112 bytes, then the u64 checksum
_HEADER_SUM = struct.Struct("<Q")

RECORD_MAGIC = b"LAJR"
RECORD_HEAD = struct.Struct("<4sIQ")  # magic, n entries, commit number: 16 bytes
RECORD_SUM = struct.Struct("<Q")
RECORD_HEAD_SIZE = RECORD_HEAD.size + RECORD_SUM.size  # 24
ENTRY = struct.Struct("<BBHIqqQQ")  # 40 bytes
OP_PUT = 1
OP_FREE = 2
SNAPSHOT_HEAD = struct.Struct("<QQQ")  # last commit, count, xxh3 of entries

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def checksum(buf) -> int:
    """xxh3_64 (seed 0) of a bytes-like object."""
    return xxhash.xxh3_64_intdigest(buf)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Header:
    kind: int
    layer: int
    num_layers: int
    nheads_k: int
    headdim: int
    page_size: int
    dtype_name: str
    page_bytes: int
    slot_bytes: int
    generation: int
    store_id: bytes

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC, FORMAT_VERSION, HEADER_SIZE, self.kind, self.layer, self.num_layers,
            self.nheads_k, self.headdim, self.page_size, self.dtype_name.encode("ascii"),
            CHECKSUM_NAME.encode("ascii"), self.page_bytes, self.slot_bytes, self.generation,
            self.store_id,
        )
        out = body + _HEADER_SUM.pack(checksum(body))
        return out + bytes(HEADER_SIZE - len(out))

    def same_store(self, other: Header) -> bool:
        """Same store id and geometry (kind, layer and generation may differ)."""
        keys = ("num_layers", "nheads_k", "headdim", "page_size", "dtype_name", "page_bytes",
                "slot_bytes", "store_id")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def unpack_header(raw: bytes, path, kind: int) -> Header:
    """Parse and check a file header; CorruptKVError naming ``path`` on anything wrong."""
    need = _HEADER.size + _HEADER_SUM.size
    if len(raw) < need:
        raise CorruptKVError(
            f"{path}: not a longattn KV file (header is {len(raw)} bytes, expected {HEADER_SIZE})"
        )
    if raw[:8] != MAGIC:
        raise CorruptKVError(f"{path}: not a longattn KV file (magic {raw[:8]!r}, expected {MAGIC!r})")
    fields = _HEADER.unpack_from(raw)
    (_, version, header_size, file_kind, layer, num_layers, nheads_k, headdim, page_size,
     dtype_raw, sum_raw, page_bytes, slot_bytes, generation, store_id) = fields
    if version != FORMAT_VERSION:
        raise CorruptKVError(
            f"{path}: format version {version}, this longattn reads version {FORMAT_VERSION}"
        )
    (stored,) = _HEADER_SUM.unpack_from(raw, _HEADER.size)
    if stored != checksum(raw[: _HEADER.size]):
        raise CorruptKVError(f"{path}: header checksum mismatch (header corrupted)")
    if header_size != HEADER_SIZE:
        raise CorruptKVError(f"{path}: header size {header_size}, expected {HEADER_SIZE}")
    if file_kind != kind:
        raise CorruptKVError(
            f"{path}: is a {KIND_NAMES.get(file_kind, file_kind)} file, expected {KIND_NAMES[kind]}"
        )
    dtype_name = dtype_raw.rstrip(b"\0").decode("ascii", "replace")
    sum_name = sum_raw.rstrip(b"\0").decode("ascii", "replace")
    if dtype_name not in DTYPES:
        raise CorruptKVError(f"{path}: unknown dtype {dtype_name!r} in header")
    if sum_name != CHECKSUM_NAME:
        raise CorruptKVError(f"{path}: checksum algorithm {sum_name!r}, expected {CHECKSUM_NAME!r}")
    itemsize = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    want = 2 * page_size * nheads_k * headdim * itemsize
    if min(num_layers, nheads_k, headdim, page_size) < 1 or page_bytes != want or (
        slot_bytes != round_up(page_bytes, ALIGN)
    ):
        raise CorruptKVError(f"{path}: inconsistent geometry in header")
    return Header(file_kind, layer, num_layers, nheads_k, headdim, page_size, dtype_name,
                  page_bytes, slot_bytes, generation, store_id)


def pack_record(commit: int, entries: list[tuple]) -> bytes:
    """One journal record for ``entries`` (tuples in ENTRY's field order)."""
    head = RECORD_HEAD.pack(RECORD_MAGIC, len(entries), commit)
    body = b"".join(ENTRY.pack(*e) for e in entries)
    return head + RECORD_SUM.pack(xxhash.xxh3_64_intdigest(head + body)) + body


def parse_record(buf: bytes, pos: int):
    """Record at ``pos``: (commit, entries, end) or None if it is cut short or fails its checks."""
    if len(buf) - pos < RECORD_HEAD_SIZE:
        return None
    magic, n, commit = RECORD_HEAD.unpack_from(buf, pos)
    if magic != RECORD_MAGIC:
        return None
    end = pos + RECORD_HEAD_SIZE + n * ENTRY.size
    if end > len(buf):
        return None
    (stored,) = RECORD_SUM.unpack_from(buf, pos + RECORD_HEAD.size)
    h = xxhash.xxh3_64()
    h.update(memoryview(buf)[pos: pos + RECORD_HEAD.size])
    h.update(memoryview(buf)[pos + RECORD_HEAD_SIZE: end])
    if h.intdigest() != stored:
        return None
    entries = [ENTRY.unpack_from(buf, pos + RECORD_HEAD_SIZE + i * ENTRY.size) for i in range(n)]
    return commit, entries, end


def valid_record_after(buf: bytes, pos: int) -> int | None:
    """Offset of the first well-formed record starting after ``pos``, else None.

    Tells a torn tail (nothing valid follows) from corruption in the middle."""
    i = buf.find(RECORD_MAGIC, pos + 1)
    while i != -1:
        if parse_record(buf, i) is not None:
            return i
        i = buf.find(RECORD_MAGIC, i + 1)
    return None
