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
