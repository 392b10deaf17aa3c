"""LLaVA-style conversations + an image folder -> vision-language shards.

Input: a JSON array, or JSON Lines, of records
  {"id": ..., "image": "rel/path.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}
Each human turn followed by a gpt turn becomes one {"question", "answer"} turn
("user"/"assistant" are accepted too; "system" turns are dropped); the
"<image>" marker is removed and whitespace stripped. Answers holding points
or boxes (RoboPoint "[(0.56, 0.69), ...]", RefCOCO "[0.1, 0.2, 0.3, 0.4]") are
kept as text, unchanged. Image paths are relative to --images (default: the
JSON file's folder); absolute paths are used as they are.

A JSON array is read incrementally (one record at a time with the standard
library's `JSONDecoder.raw_decode` over a sliding buffer), so memory holds one
record and one image, never the whole file. --skip-bad granularity here is
the SAMPLE (record): a record with a missing or undecodable image file, or
with unpaired turns is skipped and counted. A record without an "image" (the
text-only ShareGPT rows of LLaVA's 665k mix) becomes a VL sample without an
image (the model skips the image prefix for it). A record with several images
is skipped under its own reason "multi-image record", with or without
--skip-bad (one image per VL sample), and counted in the summary.
With `max_tokens` and `tokenizer` (the model's folder), each record is
tokenized with the training prompt and the summary's `max_tokens` entry counts
those longer than the limit (they are still written: `data.overlong` decides
at training time whether they are truncated, dropped or an error).
This module never modifies the source files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from vla_scale.data.converters.common import BadSampleError, ProgressCallback, dataset_name_for, decode_image
from vla_scale.data.schema import VL_TASKS, vl_sample
from vla_scale.data.camera_images import ImageCodec
from vla_scale.data.writer import DEFAULT_SIZE_LIMIT, ShardWriter, check_output
from vla_scale.errors import DataError

_READ_CHARS = 1 << 20
_QUESTION_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant", "model")
IMAGE_MARKER = "<image>"


def iter_json_records(path: str | Path) -> Iterator[Any]:
    """Records of a JSON array or a JSON Lines file, one at a time, with bounded memory."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot open {path}: {e}") from None
    with f:
        buf = f.read(_READ_CHARS)
        start = len(buf) - len(buf.lstrip())
        if start == len(buf):
            return
        if buf[start] == "[":
            yield from _iter_array(f, buf, start + 1, path)
        elif buf[start] == "{":
            f.seek(0)
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {n}: not valid JSON ({e}); JSON Lines input needs one record "
                                        f"per line") from None
        else:
            raise DataError(f"{path}: expected a JSON array or JSON Lines of records, found {buf[start]!r} first")


def _iter_array(f, buf: str, pos: int, path: Path) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    eof = False
    consumed = 0  # characters dropped from the front of buf, for error positions
    expect_value = True

    def more() -> None:
        nonlocal buf, pos, eof, consumed
        chunk = f.read(max(_READ_CHARS, len(buf)))  # grow reads so a huge record is not re-parsed quadratically
        eof = not chunk
        consumed += pos
        buf, pos = buf[pos:] + chunk, 0

    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n":
            pos += 1
        if pos >= len(buf):
            if eof:
                raise DataError(f"{path}: the JSON array is not closed (file ends at character {consumed + pos})")
            more()
            continue
        c = buf[pos]
        if c == "]":
            return
        if not expect_value:
            if c != ",":
                raise DataError(f"{path}: expected ',' or ']' at character {consumed + pos}, found {c!r}")
            pos += 1
            expect_value = True
            continue
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if eof:
                raise DataError(f"{path}: invalid JSON at character {consumed + e.pos}: {e.msg}") from None
            more()
            continue
        if end >= len(buf) and not eof and not isinstance(obj, (dict, list, str)):
            more()  # a bare number or literal at the end of the buffer may continue in the next read
            continue
        pos = end
        expect_value = False
        yield obj


def conversation_turns(conversations: Any, where: str) -> list[dict[str, str]]:
    """LLaVA conversations -> [{"question", "answer"}], the <image> marker removed, text otherwise unchanged."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSampleError("bad conversation", f"{where}: 'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    question: str | None = None
    for k, turn in enumerate(conversations):
        role = str((turn or {}).get("from", "")).lower() if isinstance(turn, dict) else ""
        value = turn.get("value") if isinstance(turn, dict) else None
        if role == "system":
            continue
        if not isinstance(value, str):
            raise BadSampleError("bad conversation", f"{where}, turn {k}: 'value' must be a string")
        text = value.replace(IMAGE_MARKER, "").strip()
        if role in _QUESTION_ROLES:
            if question is not None:
                raise BadSampleError("bad conversation", f"{where}, turn {k}: two questions in a row")
            if not text:
                raise BadSampleError("bad conversation", f"{where}, turn {k}: empty question")
            question = text
        elif role in _ANSWER_ROLES:
            if question is None:
                raise BadSampleError("bad conversation", f"{where}, turn {k}: an answer without a question")
            if not text:
                raise BadSampleError("bad conversation", f"{where}, turn {k}: empty answer")
            turns.append({"question": question, "answer": text})
            question = None
        else:
            raise BadSampleError("bad conversation", f"{where}, turn {k}: unknown speaker {role!r}; expected "
                                                     f"human/gpt")
    if question is not None:
        raise BadSampleError("bad conversation", f"{where}: the last question has no answer")
    if not turns:
        raise BadSampleError("bad conversation", f"{where}: no question/answer pair")
    return turns


class MultiImageRecord(BadSampleError):
    """A record with several images: skipped (counted under its own reason), with or without --skip-bad."""


def _image_path(record: dict, images: Path, where: str) -> Path | None:
    """The record's image file; None for a text-only record (no "image" key: ShareGPT rows of the mix)."""
    if "image" not in record or record["image"] is None:
        return None
    image = record.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise MultiImageRecord("multi-image record", f"{where}: {len(image)} images; a VL sample has one image, "
                                                         f"so multi-image records are skipped")
        if not image:
            return None
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise BadSampleError("missing image", f"{where}: the record's image is {image!r}, not a file name")
    path = Path(image)
    path = path if path.is_absolute() else images / path
    if not path.is_file():
        raise BadSampleError("missing image", f"{where}: image file {path} does not exist")
    return path


def convert_llava(src: str | Path, out: str | Path, *, task: str, images: str | Path | None = None,
                  dataset_name: str | None = None, skip_bad: bool = False, overwrite: bool = False,
                  size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
                  progress: bool = True, callback: ProgressCallback | None = None, max_tokens: int | None = None,
                  tokenizer: str | Path | None = None, codec: ImageCodec | None = None) -> dict[str, Any]:
    """Convert a LLaVA-style JSON/JSONL file plus its image folder to vision-language shards; returns the summary.

    task: "vqa", "spatial" or "affordance" (the co-training source this data feeds).
    max_tokens, tokenizer: count the records whose training text is longer than max_tokens.
    """
    from tqdm.auto import tqdm

    src = Path(src)
    if task not in VL_TASKS:
        raise DataError(f"--task must be one of {list(VL_TASKS)}, got {task!r}")
    if not src.is_file():
        raise DataError(f"LLaVA JSON file {src} does not exist")
    image_dir = Path(images) if images is not None else src.parent
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist (pass --images DIR)")
    length = _token_counter(max_tokens, tokenizer)
    check_output(out, overwrite)
    name = dataset_name_for(src, dataset_name)
    meta = {"kind": "llava", "source": str(src.resolve()), "images": str(image_dir.resolve()), "dataset": name,
            "task": task}
    over: dict[str, Any] = {"limit": max_tokens, "tokenizer": str(tokenizer), "over": 0, "longest": 0,
                            "examples": []}
    if length is not None:
        meta["max_tokens"] = over  # the writer keeps this same dict: the counts reach conversion.json
    with ShardWriter(out, overwrite=overwrite, size_limit=size_limit, compression=compression, metadata=meta,
                     codec=codec) as writer, \
            tqdm(unit="sample", desc=f"convert {name}", disable=not progress) as bar:
        for i, record in enumerate(iter_json_records(src)):
            rid = record.get("id") if isinstance(record, dict) else None
            where = f"{src}: record {i}" + (f" (id {rid})" if rid is not None else "")
            try:
                if not isinstance(record, dict):
                    raise BadSampleError("bad record", f"{where}: expected an object, got {type(record).__name__}")
                turns = conversation_turns(record.get("conversations"), where)
                path = _image_path(record, image_dir, where)
                image = None if path is None else path.read_bytes()
                if image is not None:
                    decode_image(image, f"{where} ({path})")  # validated here; the file's own bytes are stored
            except BadSampleError as e:
                if not skip_bad and not isinstance(e, MultiImageRecord):
                    raise
                writer.skip(e.reason, str(e), samples=1)
                continue
            writer.write(vl_sample(image=image, turns=turns, task=task, dataset=name, where=where), where=where)
            if length is not None:
                n = length(turns)
                over["longest"] = max(over["longest"], n)
                if n > max_tokens:
                    over["over"] += 1
                    if len(over["examples"]) < 5:
                        over["examples"].append(f"{where}: {n} tokens")
            bar.update(1)
            if callback is not None:
                callback(writer.summary)
    return writer.summary


def _token_counter(max_tokens: int | None, tokenizer: str | Path | None):
    """turns -> training text length in tokens (BOS, prompt tag, turns, EOS), or None when not asked."""
    if max_tokens is None and tokenizer is None:
        return None
    if max_tokens is None or tokenizer is None:
        raise DataError("--max-tokens and --tokenizer go together: the count needs the model's tokenizer folder")
    if max_tokens < 1:
        raise DataError(f"--max-tokens must be at least 1, got {max_tokens}")
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer

    prompts = PromptBuilder(load_tokenizer(tokenizer), None, max_length=1 << 62)
    return lambda turns: len(prompts.build_vl_turns(turns).input_ids)
