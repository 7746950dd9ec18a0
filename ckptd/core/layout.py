"""Shard layouts: the tensors at offsets inside one rank's shard and the typed tree around them.

Shared by the client (which builds layouts) and the daemon (which validates every layout it is
handed, since it arrives from an untrusted process). Invariants a valid layout keeps:
- every tensor has a known dtype, 0..MAX_NDIM non-negative dims, nbytes == numel * itemsize;
- tensors lie inside the shard and never overlap; names are unique;
- the tree is JSON built only from the node kinds below and references each tensor index once.

Tree nodes (one key each): ``{"t": i}`` torch tensor, ``{"a": i}`` numpy array,
``{"d": [[key, node], ...]}`` dict (keys str or int, order kept), ``{"l": [...]}`` list,
``{"u": [...]}`` tuple, ``{"v": x}`` str/int/bool/None, ``{"f": "<float.hex>"}`` float (exact,
NaN and inf included), ``{"s": node}`` an object restored with ``load_state_dict``.

On the wire a layout is a ``ShardLayout`` message; ``layout_to_pb`` and ``tensors_from_pb`` are
the one conversion both ways, used by the client (CommitShard, restore streams) and the daemon's
servicers alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import InvalidArgument
from ckptd.core.types import DTYPE_ITEMSIZE, MAX_NDIM, MAX_TENSOR_NAME_LEN

MAX_TENSORS: Final = 1_000_000
MAX_TREE_JSON_BYTES: Final = 64 * 1024 * 1024
MAX_TREE_DEPTH: Final = 64
ALIGN_BYTES: Final = 64


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


def layout_to_pb(tensors: Sequence[TensorEntry], tree_json: str) -> pb.ShardLayout:
    """The ``ShardLayout`` message of a shard's tensors and its tree."""
    return pb.ShardLayout(
        tensors=[
            pb.TensorMeta(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=t.offset, nbytes=t.nbytes)
            for t in tensors
        ],
        tree_json=tree_json,
    )


def tensors_from_pb(layout: pb.ShardLayout) -> list[TensorEntry]:
    """The tensors of a ``ShardLayout`` message; InvalidArgument for an entry that is not one.

    Only the shape of each entry is checked here; ``validate_tensors`` checks the layout.
    """
    try:
        return [
            TensorEntry(t.name, t.dtype, tuple(int(d) for d in t.shape), int(t.offset), int(t.nbytes))
            for t in layout.tensors
        ]
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad tensor entry: {exc}") from None


def align_up(n: int, align: int = ALIGN_BYTES) -> int:
    """Round n up to a multiple of align."""
    return (n + align - 1) // align * align


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    """Number of crc32c chunks covering nbytes."""
    return (nbytes + chunk_bytes - 1) // chunk_bytes


def validate_tensors(tensors: list[TensorEntry], shard_nbytes: int) -> None:
    """Raise ValueError naming the first tensor that breaks a layout invariant."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"too many tensors: {len(tensors)} > {MAX_TENSORS}")
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for t in tensors:
        if not t.name or len(t.name) > MAX_TENSOR_NAME_LEN:
            raise ValueError(f"tensor name must be 1..{MAX_TENSOR_NAME_LEN} characters")
        if t.name in names:
            raise ValueError(f"duplicate tensor name {t.name!r}")
        names.add(t.name)
        itemsize = DTYPE_ITEMSIZE.get(t.dtype)
        if itemsize is None:
            raise ValueError(f"tensor {t.name!r}: unsupported dtype {t.dtype!r}")
        if len(t.shape) > MAX_NDIM:
            raise ValueError(f"tensor {t.name!r}: {len(t.shape)} dims > {MAX_NDIM}")
        if any(d < 0 for d in t.shape):
            raise ValueError(f"tensor {t.name!r}: negative dimension in {list(t.shape)}")
        numel = math.prod(t.shape)
        if numel * itemsize != t.nbytes:
            raise ValueError(
                f"tensor {t.name!r}: nbytes {t.nbytes} != {numel} elements x {itemsize} bytes"
            )
        if t.offset < 0 or t.offset + t.nbytes > shard_nbytes:
            raise ValueError(
                f"tensor {t.name!r}: bytes [{t.offset}, {t.offset + t.nbytes}) outside the "
                f"shard of {shard_nbytes} bytes"
            )
        if t.nbytes:
            spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"tensors {name!r} and {other!r} overlap")


def parse_tree(tree_json: str, n_tensors: int) -> Any:
    """Parse and validate a tree; raise ValueError on anything outside the grammar."""
    if len(tree_json) > MAX_TREE_JSON_BYTES:
        raise ValueError(f"tree_json larger than {MAX_TREE_JSON_BYTES} bytes")
    try:
        tree = json.loads(tree_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"tree_json is not valid JSON: {exc}") from None
    seen: set[int] = set()
    _check_node(tree, n_tensors, seen, 0)
    if len(seen) != n_tensors:
        raise ValueError(f"tree references {len(seen)} of {n_tensors} tensors")
    return tree


def _check_node(node: Any, n_tensors: int, seen: set[int], depth: int) -> None:
    if depth > MAX_TREE_DEPTH:
        raise ValueError(f"tree deeper than {MAX_TREE_DEPTH}")
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("tree node must be an object with exactly one key")
    ((kind, val),) = node.items()
    if kind in ("t", "a"):
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < n_tensors:
            raise ValueError(f"tree references tensor index {val!r} out of range")
        if val in seen:
            raise ValueError(f"tree references tensor {val} twice")
        seen.add(val)
    elif kind == "d":
        if not isinstance(val, list):
            raise ValueError("dict node must hold a list of [key, node] pairs")
        for pair in val:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("dict node must hold [key, node] pairs")
            if isinstance(pair[0], bool) or not isinstance(pair[0], (str, int)):
                raise ValueError("dict keys must be strings or integers")
            _check_node(pair[1], n_tensors, seen, depth + 1)
    elif kind in ("l", "u"):
        if not isinstance(val, list):
            raise ValueError("list/tuple node must hold a list")
        for child in val:
            _check_node(child, n_tensors, seen, depth + 1)
    elif kind == "v":
        if val is not None and not isinstance(val, (str, int, bool)):
            raise ValueError("value node must hold a string, integer, bool or null")
    elif kind == "f":
        if not isinstance(val, str):
            raise ValueError("float node must hold float.hex() text")
        try:
            float.fromhex(val)
        except ValueError:
            raise ValueError(f"float node holds {val!r}, not float.hex() text") from None
    elif kind == "s":
        _check_node(val, n_tensors, seen, depth + 1)
    else:
        raise ValueError(f"unknown tree node kind {kind!r}")
