"""load_pretrained's front door: registry names, local directories, and clear errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from minigemma import load_pretrained
from minigemma.weights.hf import CheckpointError, read_safetensors, safetensors_files


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gemma3-270m"):
        load_pretrained("gemma-7b-please")


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(f)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load_pretrained(tmp_path)


def test_pickles_are_refused_not_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError, match="never loaded"):
        safetensors_files(tmp_path)


def test_truncated_safetensors_is_named(tmp_path):
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_safetensors(tmp_path)


def test_shard_index_with_a_missing_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        safetensors_files(tmp_path)


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_safetensors(tmp_path)
    assert set(tensors) == {"a", "b"} and tensors["b"].shape == (3,)


def test_quant_is_a_level_and_file_codes_need_a_gguf(tmp_path):
    with pytest.raises(ValueError, match="quant='gguf': choose from None, 'bf16', 'int8', 'int4'"):
        load_pretrained("gemma3-270m", quant="gguf")
    _tiny_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="no integer codes of its own"):
        load_pretrained(tmp_path, file_codes=True)


TINY = {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "sliding_window": 8, "query_pre_attn_scalar": 32, "max_position_embeddings": 64,
        "layer_types": ["sliding_attention", "full_attention"]}


def _tiny_gemma():
    from minigemma.gemma import Gemma, GemmaConfig

    torch.manual_seed(0)
    return Gemma(GemmaConfig.from_hf(TINY)).eval()


def _tiny_hf_dir(path):
    """A tiny Gemma 3 written as an HF checkpoint directory by hand: config.json and model.safetensors."""
    from minigemma.pretrained import unfused_state_dict

    model = _tiny_gemma()
    state = {f"model.{k}": v.contiguous() for k, v in unfused_state_dict(model).items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(TINY))
    return model


@torch.no_grad()
def test_every_precision_of_a_directory_is_the_model_at_that_level(tmp_path):
    """A directory loads through the one builder (a meta skeleton, `quant.quantize` with the weights
    streamed): float32 is the checkpoint itself; dtype=torch.bfloat16 is quant="bf16" (norm weights
    float32 in both); int8 and int4 equal quantising the float32 model."""
    from minigemma.layers import RMSNorm
    from minigemma.quant import quantize

    ref = _tiny_hf_dir(tmp_path)

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)

    same(load_pretrained(tmp_path)[0], ref)
    bf16 = load_pretrained(tmp_path, dtype=torch.bfloat16)[0]
    same(bf16, load_pretrained(tmp_path, quant="bf16")[0])
    assert all(m.weight.dtype == torch.float32 for m in bf16.modules() if isinstance(m, RMSNorm))
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16 and bf16.lm_head.weight is bf16.embed_tokens.weight
    for level in ("int8", "int4"):
        same(load_pretrained(tmp_path, quant=level)[0], quantize(_tiny_gemma(), level))
