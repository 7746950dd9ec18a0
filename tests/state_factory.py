"""The one place the tests build training states (what a rank hands to ``CheckpointManager.save``).

Every builder is deterministic in its arguments, so a test (or a child process) can build the state
it saved again and compare a restore with it. Each keeps the exact data its callers always had:

- ``vector_state(seed, n, **plain)``: one float32 vector ``w`` drawn from ``default_rng(seed)``,
  plus plain values; ``ramp_state``, ``filled_state``, ``byte_state``: one array of known values.
- ``numpy_tree(key, nbytes, ...)``: a model/optimizer-like tree of numpy arrays of about ``nbytes``;
  ``fault_state`` and ``ledger_state`` are its two shapes (the fault suite's and the scenarios').
- ``rank_state(rank, step, use_torch)``: a multi-rank worker's state (rank-dependent sizes).
- ``torch_state(step, rank)``: a mix of torch dtypes (bfloat16, float8, bool, 0-d, empty) and numpy.
- ``every_value_state(seed)``: every supported dtype, view, container and plain value.
- ``blank_like(state)``: the same tree with every array zeroed and every scalar replaced.
- ``gpt_state(seed, n_params)``: a mixed-precision GPT-like state (bf16 weights, fp32 master
  weights, Adam moments); ``finetune_state(seed, step, n_base)``: a frozen bf16 base (identical at
  every step) and small trainable adapters with their fp32 Adam state (changed at every step);
  ``state_shard(rank, state, chunk_bytes)``: such a state as one shard (entry and bytes), for tier tests.
- ``adamw_trainer(seed, width)``: a torch MLP with AdamW after one step, and its live state
  (``model.state_dict()`` and ``opt.state_dict()``, sharing the trained tensors).

Only numpy is imported here: the torch builders import torch when called, so trainer processes
that build numpy states start quickly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

KiB = 1024
MiB = 2**20

NUMPY_DTYPES = ["float64", "float32", "float16", "complex64", "complex128", "int8", "int16", "int32", "int64",
                "uint8", "uint16", "uint32", "uint64", "bool"]


# -- one array -----------------------------------------------------------------------------------
def random_array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An array of arbitrary bit patterns (NaNs, infs, subnormals included) drawn from rng."""
    dt = np.dtype(dtype)
    return np.frombuffer(rng.bytes(math.prod(shape) * dt.itemsize), dtype=dt).reshape(shape).copy()


def vector_state(seed: Any, n: int, **plain: Any) -> dict[str, Any]:
    """``{"w": n float32 from default_rng(seed).standard_normal, **plain}``."""
    return {"w": np.random.default_rng(seed).standard_normal(n).astype(np.float32), **plain}


def ramp_state(n: int, dtype: Any = np.float32, scale: int = 1, offset: int = 0, **plain: Any) -> dict[str, Any]:
    """``{"w": arange(n, dtype) * scale + offset, **plain}``."""
    return {"w": np.arange(n, dtype=dtype) * scale + offset, **plain}


def filled_state(value: Any, n: int, dtype: Any = np.float32) -> dict[str, Any]:
    """``{"w": n copies of value}``."""
    return {"w": np.full(n, value, dtype)}


def byte_state(seed: Any, n: int) -> dict[str, Any]:
    """``{"w": n uint8 from default_rng(seed).integers}``."""
    return {"w": np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)}


# -- numpy trees ---------------------------------------------------------------------------------
def numpy_tree(key: Sequence[int], nbytes: int, *, reserve: int, min_w: int, b_shape: tuple[int, int],
               opt_sizes: tuple[int, int], half_shape: tuple[int, int] | None = None,
               plain: Callable[[np.random.Generator], dict[str, Any]] = lambda rng: {}) -> dict[str, Any]:
    """A model/optimizer-like tree of about ``nbytes``, all drawn from ``default_rng(list(key))``.

    ``model.w`` is float32 of ``max(min_w, (nbytes - reserve) // 4)`` elements, ``model.b`` int16
    of ``b_shape``, ``model.h`` float16 of ``half_shape`` (when given); ``opt`` an int64 vector and
    a float64 vector of ``opt_sizes``; then the plain values ``plain(rng)`` (drawn last)."""
    rng = np.random.default_rng(list(key))
    model = {"w": rng.standard_normal(max(min_w, (nbytes - reserve) // 4), dtype=np.float32),
             "b": rng.integers(-(2**15), 2**15, size=b_shape, dtype=np.int16)}
    if half_shape is not None:
        model["h"] = rng.standard_normal(half_shape).astype(np.float16)
    opt = [rng.integers(0, 2**62, size=opt_sizes[0], dtype=np.int64), rng.random(opt_sizes[1])]
    return {"model": model, "opt": opt, **plain(rng)}


def fault_state(step: int, rank: int = 0, nbytes: int = 1 * MiB, seed: int = 1234) -> dict[str, Any]:
    """The fault suite's state of about ``nbytes`` for (step, rank): ``step`` is its top-level value."""
    return numpy_tree((seed, step, rank), nbytes, reserve=8192, min_w=1, b_shape=(17, 3), opt_sizes=(64, 33),
                      half_shape=(5, 7), plain=lambda _: {"step": step, "rank": rank, "lr": 1e-3 * (step + 1),
                                                          "name": f"step-{step}"})


def ledger_state(seed: int, step: int, rank: int, variant: int = 0, nbytes: int = 192 * KiB) -> dict[str, Any]:
    """The scenarios' state, different for every (seed, step, rank, variant)."""
    return numpy_tree((seed, step, rank, variant), nbytes, reserve=4 * KiB, min_w=16, b_shape=(31, 7),
                      opt_sizes=(97, 13), plain=lambda rng: {"meta": {"step": step, "rank": rank, "variant": variant,
                                                                      "lr": float(rng.random())}})


def blank_like(state: Any) -> Any:
    """Same structure, every array zeroed and every scalar replaced (so restore must fill it)."""
    if isinstance(state, dict):
        return {k: blank_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [blank_like(v) for v in state]
    if isinstance(state, np.ndarray):
        return np.zeros_like(state)
    if isinstance(state, str):
        return ""
    if isinstance(state, float):
        return -1.0
    if isinstance(state, int):
        return -1
    return None


# -- states with torch tensors -------------------------------------------------------------------
def rank_state(rank: int, step: int, use_torch: bool, zero: bool = False) -> dict[str, Any]:
    """A multi-rank worker's state (sizes grow with the rank); ``zero``: the same, all zeros."""
    rng = np.random.default_rng(1_000_003 * rank + step)
    n = 1000 + 517 * rank

    def arr(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        a = random_array(rng, dtype, shape)
        return np.zeros_like(a) if zero else a

    state: dict[str, Any] = {
        "arrays": {"f32": arr("float32", (n,)), "i64": arr("int64", (7, rank + 1)),
                   "f16": arr("float16", (3, 5)).T, "u8": arr("uint8", (rank * 3,))},
        "meta": {"rank": rank, "step": step, "lr": 0.1 * step + rank, "name": f"rank-{rank}",
                 "flags": (True, None), "ids": {rank: step}},
    }
    if use_torch:
        import torch

        g = torch.Generator().manual_seed(7919 * rank + step)
        model = {
            "w": torch.randn(16, 8 + rank, generator=g),
            "b": torch.randn(16, generator=g).to(torch.bfloat16),
            "steps": torch.tensor(step * 10 + rank),
            "mask": torch.randint(0, 2, (5, 5), generator=g).bool().t(),
        }
        if zero:
            model = {k: torch.zeros_like(v) for k, v in model.items()}
        state["model"] = model
    return state


def torch_state(step: int, rank: int) -> dict[str, Any]:
    """A mix of dtypes (bfloat16, float8, bool, int16, 0-d, empty), nested, for (step, rank)."""
    import torch

    g = torch.Generator().manual_seed(step * 100 + rank)
    return {
        "model": {
            "embed.weight": torch.randn(96, 40, generator=g).to(torch.bfloat16),
            "layers": [{"w": torch.randn(40, 40, generator=g), "b": torch.randn(40, generator=g).half()}
                       for _ in range(2)],
        },
        "optim": {"step": torch.tensor(step, dtype=torch.int64), "lr": 3e-4,
                  "mask": torch.rand(33, generator=g) > 0.5},
        "fp8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "hist": np.arange(rank, rank + 12, dtype=np.int16).reshape(3, 4),
        "bytes": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(1.5 + rank, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "meta": {"epoch": 3, "name": f"rank{rank}"},
    }


def adamw_trainer(seed: int, width: int, device: str = "cpu",
                  ) -> tuple[Any, Any, Callable[[], dict[str, Any]], Callable[[], None]]:
    """(model, AdamW, state(), backward()): an MLP of two ``width`` x ``width`` layers after one
    AdamW step; ``state()`` is the live state (its tensors are the trained ones, not copies) and
    ``backward()`` computes fresh gradients for the next ``opt.step()``."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, width, device=device)

    def backward() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()

    backward()
    opt.step()
    return model, opt, lambda: {"model": model.state_dict(), "optim": opt.state_dict()}, backward


def torch_dtypes() -> list[Any]:
    """Every torch dtype a state may hold (the unsigned and float8 ones where this torch has them)."""
    import torch

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
              torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
    return dtypes + [getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
                     if hasattr(torch, n)]


def random_tensor(dtype: Any, shape: tuple[int, ...], g: Any) -> Any:
    """A tensor of arbitrary bit patterns (NaNs, infs, subnormals included) of the given dtype."""
    import torch

    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def every_dtype(g: Any) -> dict[str, Any]:
    return {str(dt).removeprefix("torch."): random_tensor(dt, (3, 5), g) for dt in torch_dtypes()}


def odd_tensors(g: Any) -> dict[str, Any]:
    """Views of every kind: transposed, strided, offset, expanded, channels-last, conjugate, 0-d, empty."""
    import torch

    base = random_tensor(torch.float32, (6, 9), g)
    big = random_tensor(torch.bfloat16, (10, 12), g)
    img = random_tensor(torch.float16, (2, 3, 4, 5), g).contiguous(memory_format=torch.channels_last)
    return {
        "transposed": base.t(),
        "strided": base[:, ::3],
        "offset_view": big[5:9, 2:11:2],
        "expanded": random_tensor(torch.int32, (1, 3), g).expand(4, 3),
        "channels_last": img,
        "complex_t": random_tensor(torch.complex128, (3, 2), g).t(),
        "conj_view": random_tensor(torch.complex64, (2, 3), g).conj(),  # lazy conjugate bit: saved resolved
        "bool_strided": random_tensor(torch.bool, (8, 4), g)[::2, 1:],
        "zero_d": {str(dt).removeprefix("torch."): random_tensor(dt, (), g) for dt in torch_dtypes()},
        "empty": [torch.empty(0), torch.empty(3, 0, 2, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bool)],
        "requires_grad": torch.nn.Parameter(random_tensor(torch.float32, (4,), g).nan_to_num()),
    }


def numpy_values(seed: int) -> dict[str, Any]:
    """Every numpy dtype, a transposed, a strided, a 0-d, an empty and a Fortran-order array."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}
    for name in NUMPY_DTYPES:
        dt = np.dtype(name)
        if dt == np.bool_:
            arrays[name] = rng.integers(0, 2, (4, 3)).astype(bool)
        else:
            arrays[name] = random_array(rng, dt, (4, 3))
    mat = random_array(rng, np.float64, (8, 6))
    arrays["transposed"] = mat.T
    arrays["strided"] = mat[::2, 1::2]
    arrays["zero_d"] = np.array(2.5, dtype=np.float32)
    arrays["empty"] = np.empty((0, 4), dtype=np.int16)
    arrays["fortran"] = np.asfortranarray(rng.integers(-5, 5, (3, 4)))
    return arrays


def plain_values() -> dict[Any, Any]:
    """Non-tensor values at their edges: big ints, signed zero, NaN, non-ASCII, int keys, tuples."""
    return {
        "ints": [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**40)],
        "floats": [0.0, -0.0, 1.5, -2.25, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308,
                   float.fromhex("0x1.fffffffffffffp-1022"), 0.1],
        "strs": ["", "ascii", "héllo wörld", "日本語", "emoji 😀🚀", "nul\x00byte", 'quote"\\back\n\ttab', "\u2028"],
        "bools": [True, False],
        "none": None,
        "int_keys": {1: "one", -2: "minus two", 0: {3: [4]}, 2**40: "big"},
        "mixed_keys": {1: "int one", "1": "str one"},
        "tuple": (1, "two", (3.0, None), []),
        "nested": {"a": [{"b": ({"c": [[], {}, ()]},)}]},
        "empty_dict": {},
        "empty_list": [],
        "empty_tuple": (),
        "np_scalars": [np.float32(1.5), np.int64(-7), np.bool_(True)],
        7: "int key at the top",
    }


def every_value_state(seed: int) -> dict[str, Any]:
    """Every supported value type and dtype: torch dtypes, odd views, numpy arrays, plain values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"dtypes": every_dtype(g), "odd": odd_tensors(g), "numpy": numpy_values(seed), "plain": plain_values()}


# -- large-model-like states (torch) ---------------------------------------------------------------
def gpt_state(seed: int, n_params: int) -> dict[str, Any]:
    """What a mixed-precision trainer of a GPT holds for n_params parameters: bf16 weights
    (N(0, 0.02) like an initialised transformer), the fp32 master copy they were rounded from, and
    Adam's exp_avg (~N(0, 1e-3)) and exp_avg_sq (its square-like, positive) in fp32. 14 bytes a
    parameter. Random mantissas: no more compressible than real ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n_params, generator=g) * 0.02
    exp_avg = torch.randn(n_params, generator=g) * 1e-3
    exp_avg_sq = (torch.randn(n_params, generator=g) * 1e-3) ** 2
    return {"model": {"weight": master.to(torch.bfloat16)},
            "optimizer": {"master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": 1}}


def finetune_state(seed: int, step: int, n_base: int) -> dict[str, Any]:
    """Fine-tuning with a frozen base model: the base's bf16 weights are the same at every step
    (built from seed alone); adapters of n_base // 64 parameters and their fp32 master and Adam
    state change at every step (LoRA-like: about 1.6% of the parameters, 11% of the bytes)."""
    base = gpt_state(seed, n_base)["model"]
    adapter = gpt_state(seed * 100_003 + step, max(1, n_base // 64))
    return {"base": base, "adapter": adapter}


def state_shard(rank: int, state: dict[str, Any], chunk_bytes: int) -> tuple[Any, bytes]:
    """The shard of a (nested) dict of torch tensors, tensors back to back in sorted-path order
    with their dtypes (what the object tier's codecs look at), and its bytes."""
    import torch

    from ckptd.core.integrity import chunk_crcs
    from ckptd.core.layout import TensorEntry
    from ckptd.core.manifest import ShardEntry

    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, node: Any) -> None:
        for k in sorted(node):
            v = node[k]
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif hasattr(v, "dtype"):
                flat.append((prefix + k, v))

    walk("", state)
    tensors, blobs, offset = [], [], 0
    for name, t in flat:
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        tensors.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, len(raw)))
        blobs.append(raw)
        offset += len(raw)
    data = b"".join(blobs)
    tree = {"d": [[name, {"t": i}] for i, (name, _) in enumerate(flat)]}
    entry = ShardEntry(rank, len(data), chunk_bytes, tuple(chunk_crcs(data, chunk_bytes)), tuple(tensors), tree)
    return entry, data
