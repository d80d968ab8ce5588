"""Heat-map files: every header field is checked on load (a damaged or hostile file raises HeatMapFileError, never
a TypeError / KeyError, and never loads to fail later), and a save works for every legal file name."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from daam_fast import GlobalHeatMap, HeatMapFileError, load
from daam_fast.heatmap import JointGlobalHeatMap
from daam_fast.tokens import tokenize_prompt
from tests.fixtures.pipelines import clip_tokenizer


@pytest.fixture(scope="module")
def tokens():
    return tokenize_prompt(clip_tokenizer(), "a red cat")


def _header(tokens, **meta) -> dict:
    n = tokens.n_tokens()
    return {
        "format": "daam_fast.heatmap",
        "format_version": "1",
        "tokens": tokens.to_dict(),
        "positions": list(range(n)),
        "meta": {"model": "test", "seed": 3, "image_size": [8, 12], **meta},
    }


def _write(path, header: dict, maps=None):
    """A file with ``header`` (values that are not strings are written as JSON) and ``maps``."""
    n = len(header["positions"]) if isinstance(header.get("positions"), list) else 5
    maps = torch.rand(n, 4, 6) if maps is None else maps
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items()}
    save_file({"heat_maps": maps}, str(path), metadata=text)
    return path


def _joint_meta(tokens):
    return {"text_sources": [{"name": "clip", "offset": 0, "tokens": tokens.to_dict()}], "default_source": "clip"}


def test_a_well_formed_file_loads(tokens, tmp_path):
    gm = load(_write(tmp_path / "ok.safetensors", _header(tokens)))
    assert gm.positions == list(range(tokens.n_tokens())) and gm.meta["seed"] == 3
    tall = load(_write(tmp_path / "tall.safetensors", _header(tokens, image_size=[64, 8], latent_size=[32, 4])))
    assert tall.meta["image_size"] == [64, 8]
    joint = load(_write(tmp_path / "joint.safetensors", _header(tokens, **_joint_meta(tokens))))
    assert isinstance(joint, JointGlobalHeatMap)
    half = load(_write(tmp_path / "half.safetensors", _header(tokens), torch.rand(tokens.n_tokens(), 4, 6).half()))
    assert half.heat_maps.dtype == torch.float32  # any float dtype is read as fp32


def _set(path: str, value):
    """A mutation of the header at ``path`` ("meta.text_sources.0.tokens"); ``...`` deletes the entry."""

    def apply(header):
        *parents, last = path.split(".")
        node = header
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value
        return header

    return apply


BAD = [
    # (header mutation, message): one damaged field each
    (_set("meta", 5), "'meta' must be a JSON object, got int"),
    (_set("meta", "ab"), "'meta' is not JSON"),
    (_set("meta", [1]), "'meta' must be a JSON object, got list"),
    (_set("meta.seed", "3"), r"meta\['seed'\] must be an int or null, got '3'"),
    (_set("meta.image_size", [8]), r"meta\['image_size'\] must be \[height, width\]"),
    (_set("meta.image_size", "8x12"), r"meta\['image_size'\] must be \[height, width\]"),
    (_set("meta.image_size", [8, 0]), r"meta\['image_size'\] must be \[height, width\]"),
    (_set("meta.complete", "yes"), r"meta\['complete'\] must be true or false"),
    (_set("meta.text_sources", [{"name": "clip", "offset": 0}]), r"text_sources\[0\] lacks 'tokens'"),
    (_set("meta.text_sources", {"name": "clip"}), "text_sources must be a non-empty list"),
    (_set("meta.text_sources", []), "text_sources must be a non-empty list"),
    (_set("meta.default_source", "t5"), "default_source 't5' is none of"),
    (_set("positions", json.dumps("abc")), "'positions' must be a JSON array, got str"),
    (_set("positions", [0, 1, "2", 3, 4]), "positions must be distinct integers >= 0"),
    (_set("positions", [0, 1, 1, 3, 4]), "positions must be distinct integers >= 0"),
    (_set("positions", [0, 1, 2, 3, -4]), "positions must be distinct integers >= 0"),
    (_set("positions", [0, 1, 2, 3, True]), "positions must be distinct integers >= 0"),
    (_set("format_version", "0"), "format version '0'"),
    (_set("format_version", "x"), "format version 'x'"),
    (_set("tokens", ...), "header field 'tokens' is missing"),
    (_set("tokens", [1, 2]), "'tokens' must be a JSON object"),
    (_set("tokens.prompt", 7), r"tokens\['prompt'\] must be a string"),
    (_set("tokens.input_ids", ["49406"]), r"tokens\['input_ids'\] must be a list of integers"),
    (_set("tokens.tokens", [1, 2, 3, 4, 5]), r"tokens\['tokens'\] must be a list of strings"),
    (_set("tokens.offsets", [[0, 0]]), "input_ids, tokens and offsets differ in length"),
    (_set("tokens.offsets.1", [0, 99]), r"tokens\['offsets'\] must be \[start, end\] pairs within the prompt"),
    (_set("tokens.offsets.1", "0-1"), r"tokens\['offsets'\] must be \[start, end\] pairs within the prompt"),
    (_set("tokens.words.0", ["red", 2, 5]), r"tokens\['words'\] must be \[text, start, end, \[positions\]\]"),
    (_set("tokens.words.0.3", [99]), r"tokens\['words'\] must be \[text, start, end, \[positions\]\]"),
    (_set("tokens.max_length", "77"), r"tokens\['max_length'\] must be an integer >= 1"),
    (_set("tokens.truncated_words", "red"), r"tokens\['truncated_words'\] must be a list of strings"),
    (_set("tokens.untruncated_offsets", 5), r"tokens\['untruncated_offsets'\] must be null or"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_every_damaged_header_field_is_a_heat_map_file_error(tokens, tmp_path, mutate, message):
    header = mutate(copy.deepcopy(_header(tokens, **_joint_meta(tokens))))
    path = _write(tmp_path / "bad.safetensors", header)
    with pytest.raises(HeatMapFileError, match=message):
        load(path)
    with pytest.raises(HeatMapFileError, match=message):
        GlobalHeatMap.load(path)


@pytest.mark.parametrize(
    "maps,message",
    [
        (torch.arange(5 * 24).reshape(5, 4, 6), "maps must be floating point, got torch.int64"),
        (torch.zeros(5, 4, 6, dtype=torch.bool), "maps must be floating point, got torch.bool"),
        (torch.zeros(5, 0, 6), r"maps \(5, 0, 6\) must be \[positions, height, width\] with height, width >= 1"),
        (torch.zeros(5, 24), r"maps \(5, 24\) do not match 5 positions"),
    ],
)
def test_maps_of_the_wrong_kind_are_refused(tokens, tmp_path, maps, message):
    with pytest.raises(HeatMapFileError, match=message):
        load(_write(tmp_path / "bad.safetensors", _header(tokens), maps))


def test_nested_json_is_refused_not_a_recursion_error(tokens, tmp_path):
    header = _header(tokens)
    header["meta"] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(HeatMapFileError):
        load(_write(tmp_path / "deep.safetensors", header))


# --------------------------------------------------------------------------------------------------- saving
def _name_max(folder) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@pytest.mark.parametrize("stem", ["a" * 243, "é" * 121 + "a"])  # 255 bytes with ".safetensors", ASCII and UTF-8
def test_a_save_works_for_every_legal_file_name(tokens, tmp_path, stem):
    if _name_max(tmp_path) < 255:
        pytest.skip(f"{tmp_path}'s file system allows names of {_name_max(tmp_path)} bytes")
    name = stem + ".safetensors"
    assert len(os.fsencode(name)) == 255
    gm = GlobalHeatMap(tokens, torch.rand(tokens.n_tokens(), 4, 6), meta={"model": "test"})
    path = gm.save(tmp_path / name)
    assert torch.equal(load(path).heat_maps, gm.heat_maps)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left
    with pytest.raises(OSError):  # one byte more is not a legal name: the save fails cleanly
        gm.save(tmp_path / ("b" + name))
    assert [p.name for p in tmp_path.iterdir()] == [name]
