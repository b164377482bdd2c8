"""How a JSONL task file's bytes are read: UTF-8 with an optional byte-order mark, and prompts
that hold text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trustregion.tasks import JsonlTask
from trustregion.tasks.jsonl import UTF8_BOM, load_jsonl_examples


def test_non_utf8_bytes_name_the_file_line_byte_and_column(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    # line 3: '{"prompt": "' is 12 characters, so the 0xff byte sits in column 13
    path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n\n'
                     b'{"prompt": "\xff", "answer": "3"}\n')
    message = f"{path}:3: not valid UTF-8 (byte 0xff at column 13); save the file as UTF-8"
    with pytest.raises(ValueError, match=re.escape(message)):
        JsonlTask(path)


def test_the_column_counts_characters_not_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    # 'é' is 2 bytes in UTF-8 but one character: '{"prompt": "é' is 13 characters, so the
    # Latin-1 byte 0xe9 of the second 'é' sits in column 14
    path.write_bytes('{"prompt": "é'.encode() + b'\xe9", "answer": "x"}\n')
    with pytest.raises(ValueError, match=re.escape(
            f"{path}:1: not valid UTF-8 (byte 0xe9 at column 14)")):
        load_jsonl_examples(path)


def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(UTF8_BOM + b'{"prompt": "2+2=", "answer": "4"}\r\n'
                     b'{"prompt": "3+3=", "answer": 6}\r\n')
    examples = load_jsonl_examples(path)
    assert [(ex.prompt, ex.answer) for ex in examples] == [("2+2=", "4"), ("3+3=", "6")]
    assert len(JsonlTask(path)) == 2


def test_a_byte_order_mark_inside_the_file_is_still_an_error(tmp_path: Path) -> None:
    # only the file's first bytes may be a mark; U+FEFF before a later line's JSON is not JSON
    path = tmp_path / "two.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "b"}\n' + UTF8_BOM + b'{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        load_jsonl_examples(path)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_names_its_line(tmp_path: Path, prompt: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n'
                    + '{"prompt": ' + repr(prompt).replace("'", '"') + ', "answer": "0"}\n',
                    encoding="utf-8")
    message = f"{path}:2: 'prompt' is empty ({prompt!r}); every prompt needs text to complete"
    with pytest.raises(ValueError, match=re.escape(message)):
        JsonlTask(path)
