"""Loading and validating preference datasets: JSONL and datasets directories, plain and conversational."""
import json

import pytest

from clm_ext.preferences import PreferenceDataError, is_conversational_dataset, load_preferences

PLAIN = [
    {"prompt": "the cat", "chosen": " is happy", "rejected": " is sad", "score": 1},
    {"prompt": "a dog", "chosen": " sings", "rejected": " falls"},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "the cat"}],
        "chosen": [{"role": "assistant", "content": "is happy"}],
        "rejected": [{"role": "assistant", "content": "is sad"}],
    }
]


def write_jsonl(path, rows, blank_line_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_line_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_plain_jsonl_keeps_the_three_fields(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", PLAIN))
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[1] == {"prompt": "a dog", "chosen": " sings", "rejected": " falls"}
    assert not is_conversational_dataset(ds)


def test_conversational_jsonl(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "c.jsonl", CHAT))
    assert is_conversational_dataset(ds)
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "is happy"}]


def test_datasets_directory_and_dict_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(PLAIN).save_to_disk(str(tmp_path / "single"))
    assert len(load_preferences(str(tmp_path / "single"))) == 2
    DatasetDict({"train": Dataset.from_list(PLAIN), "test": Dataset.from_list(PLAIN[:1])}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(load_preferences(str(tmp_path / "dict"))) == 2
    assert len(load_preferences(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(PreferenceDataError, match=r"available: \['train', 'test'\]"):
        load_preferences(str(tmp_path / "dict"), split="validation")


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "the cat", "chosen": " is happy"}, r"row 1 \(line 3\): missing field\(s\) \['rejected'\]"),
        ({"prompt": "the cat", "chosen": "  ", "rejected": " is sad"},
         r"row 1 \(line 3\): field 'chosen': empty string"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, r"row 1 \(line 3\): field 'prompt': empty string"),
        ({"prompt": "the cat", "chosen": 3, "rejected": "b"}, r"row 1 \(line 3\): field 'chosen': expected a string"),
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}, r"row 1 .*mixes plain"),
        (CHAT[0], r"row 1 \(line 3\): is conversational but row 0 is plain"),
    ],
)
def test_malformed_rows_are_named(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [PLAIN[0], bad_row], blank_line_after_first=True)
    with pytest.raises(PreferenceDataError, match=message):
        load_preferences(path)


def test_bad_conversation_messages_are_named(tmp_path):
    empty = {**CHAT[0], "rejected": [{"role": "assistant", "content": ""}]}
    with pytest.raises(PreferenceDataError, match=r"row 1 \(line 2\): field 'rejected': message 0 has an empty"):
        load_preferences(write_jsonl(tmp_path / "c.jsonl", [CHAT[0], empty]))
    no_messages = {**CHAT[0], "chosen": []}
    with pytest.raises(PreferenceDataError, match=r"row 0 \(line 1\): field 'chosen': empty conversation"):
        load_preferences(write_jsonl(tmp_path / "c2.jsonl", [no_messages]))


def test_invalid_json_and_missing_columns(tmp_path):
    from datasets import Dataset

    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PLAIN[0]) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match="line 2 is not valid JSON"):
        load_preferences(str(path))
    Dataset.from_list([{"prompt": "a", "answer": "b"}]).save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['chosen', 'rejected'\]"):
        load_preferences(str(tmp_path / "cols"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match="empty"):
        load_preferences(str(tmp_path / "empty.jsonl"))


def test_invalid_utf8_is_named_by_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PLAIN[0]).encode() + b"\n\n" + json.dumps(PLAIN[0]).replace("cat", "caf\xe9").encode("latin-1") + b"\n")
    with pytest.raises(PreferenceDataError, match=r"line 3 is not valid UTF-8"):
        load_preferences(str(path))


def test_a_byte_order_mark_is_accepted_only_where_a_file_starts(tmp_path):
    """Some Windows editors save UTF-8 with a BOM: the file loads; a BOM inside the file is still an error."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in PLAIN).encode() + b"\n")
    ds = load_preferences(str(path))
    assert ds[0]["prompt"] == "the cat" and len(ds) == 2
    path.write_bytes(json.dumps(PLAIN[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(PLAIN[1]).encode() + b"\n")
    with pytest.raises(PreferenceDataError, match="line 2 is not valid JSON"):
        load_preferences(str(path))
