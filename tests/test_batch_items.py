"""`daam-fast batch` input: prompts files (text, JSONL) read and checked before anything is loaded, with errors
naming the line; ids; items = prompt x seed."""

import json

import pytest

from daam_fast.batch import plan_items, read_prompts
from daam_fast.batch.items import default_id
from daam_fast.cli import main
from daam_fast.session import UsageError


def _jsonl(tmp_path, *lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_text_file_one_prompt_a_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  テトとナウシカ  \n", encoding="utf-8")
    specs = read_prompts(path, seeds="0-2", steps=3, size="32x32")
    assert [s.request.prompt for s in specs] == ["a red circle", "テトとナウシカ"]
    assert [s.line for s in specs] == [1, 3]
    assert specs[0].request.seeds == (0, 1, 2) and specs[0].request.size == (32, 32)
    items = plan_items(specs)
    assert [i.id for i in items[:3]] == [f"{specs[0].id}_s{k}" for k in range(3)]
    assert len(items) == 6 and len({i.id for i in items}) == 6


def test_default_ids_are_stable_readable_and_differ_per_prompt():
    a, b = default_id("a red circle"), default_id("a red circle!")
    assert a.startswith("a_red_circle-") and len(a.split("-")[-1]) == 8
    assert a == default_id("a red circle") and a != b
    assert default_id("テト").startswith("テト-")  # any script's letters are kept


def test_jsonl_fields_override_the_defaults(tmp_path):
    path = _jsonl(
        tmp_path,
        {"prompt": "a red circle", "id": "circle", "seeds": [4, 9], "steps": 2, "size": [48, 32]},
        {"prompt": "a blue square", "negative_prompt": "blurry", "seeds": "1-2", "size": "64x32"},
        {"prompt": "a cat", "seeds": 7},
    )
    specs = read_prompts(path, seeds="0", steps=5, size="32x32", guidance_scale=3.0)
    r0, r1, r2 = (s.request for s in specs)
    assert specs[0].id == "circle" and r0.seeds == (4, 9) and r0.steps == 2 and r0.size == (48, 32)
    assert r1.negative_prompt == "blurry" and r1.seeds == (1, 2) and r1.steps == 5 and r1.size == (64, 32)
    assert r2.seeds == (7,) and all(r.guidance_scale == 3.0 for r in (r0, r1, r2))
    assert [i.id for i in plan_items(specs)][:2] == ["circle_s4", "circle_s9"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b",}'], "prompts.jsonl line 2: not valid JSON"),
        (['{"prompt": "a", "sede": 3}'], "prompts.jsonl line 1: unknown field 'sede'; the fields are prompt, id,"),
        (['["a cat"]'], "prompts.jsonl line 1: expected a JSON object"),
        (['{"id": "x"}'], 'prompts.jsonl line 1: "prompt" (a string) is required'),
        (['{"prompt": "a", "seeds": "0-x"}'], "prompts.jsonl line 1: seeds '0-x': expected"),
        (['{"prompt": "a", "seeds": [1, "2"]}'], "prompts.jsonl line 1: seeds [1, '2']: expected a list of integers"),
        (['{"prompt": "a", "size": "33x32"}'], "prompts.jsonl line 1: size '33x32': width and height must be"),
        (['{"prompt": "a", "steps": 0}'], "prompts.jsonl line 1: steps 0: must be at least 1"),
        (['{"prompt": "  "}'], "prompts.jsonl line 1: prompt is empty"),
        (['{"prompt": "a", "id": "../x"}'], "prompts.jsonl line 1: id '../x': expected a name of letters"),
        (['{"prompt": "a", "id": "x"}', "", '{"prompt": "b", "id": "x"}'], "line 3: id 'x' is also on line 1"),
        ([""], "no prompts (the file is empty)"),
    ],
)
def test_bad_jsonl_is_refused_naming_the_line(tmp_path, lines, message):
    with pytest.raises(UsageError) as exc:
        read_prompts(_jsonl(tmp_path, *lines))
    assert message in str(exc.value)


def test_duplicate_prompts_of_a_text_file_are_duplicate_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\na cat\n")
    with pytest.raises(UsageError, match=r"p.txt line 3: id 'a_cat-[0-9a-f]{8}' is also on line 1"):
        read_prompts(path)


def test_command_line_defaults_are_named_as_options(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    with pytest.raises(UsageError, match="^--seeds 'x'"):
        read_prompts(path, seeds="x")
    with pytest.raises(UsageError, match="^--size '10x10'"):
        read_prompts(path, size="10x10")


def test_cli_bad_input_exits_2_before_loading_a_model(tmp_path, capsys):
    # A model folder that does not exist would fail later (exit 2 too, but with another message): the line
    # error comes first, so nothing was loaded or generated.
    path = _jsonl(tmp_path, {"prompt": "a"}, '{"prompt": "b", "colour": "red"}')
    out = tmp_path / "out"
    assert main(["batch", str(path), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert "prompts.jsonl line 2: unknown field 'colour'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["batch", str(tmp_path / "none.txt"), "--model", "demo", "--out", str(out)]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err
    good = _jsonl(tmp_path, {"prompt": "a"}, name="good.jsonl")
    assert main(["batch", str(good), "--model", "demo", "--out", str(out), "--workers", "2"]) == 2
    assert "--workers 2 needs --engine ray" in capsys.readouterr().err
