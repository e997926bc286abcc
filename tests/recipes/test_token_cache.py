"""The token cache: built once, reused, rebuilt when the data file or the tokenizer changes,
never read half-built, and built by streaming (memory does not grow with the file)."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dist_lora.cli import main
from dist_lora.parallel.agreement import RankError
from dist_lora.recipes.data import ensure
from dist_lora.recipes.data.cache import DIRNAME
from tests.recipes.sft_fixtures import chat_records, make_base, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("cache_base"))


def _published(path: Path) -> list[Path]:
    return sorted(p for p in (path.parent / DIRNAME).glob(f"{path.name}.*"))


def test_built_once_reused_and_rebuilt_when_the_file_or_tokenizer_changes(tmp_path, base, capfd):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    first = ensure(path, "chat", {}, "auto", base)
    assert "tokenising" in capfd.readouterr().err
    stamp = (first.directory / "meta.json").stat().st_mtime_ns
    again = ensure(path, "chat", {}, "auto", base)
    assert "tokenising" not in capfd.readouterr().err and again.directory == first.directory
    assert (again.directory / "meta.json").stat().st_mtime_ns == stamp, "the cache was rebuilt"

    write_jsonl(path, chat_records()[:4])  # the data changes
    changed = ensure(path, "chat", {}, "auto", base)
    assert "tokenising" in capfd.readouterr().err
    assert changed.directory != first.directory and len(changed) == 4

    config = json.loads((base / "tokenizer_config.json").read_text())
    template = (base / "chat_template.jinja")
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))  # the tokenizer changes
    try:
        retokenised = ensure(path, "chat", {}, "auto", base)
        assert "tokenising" in capfd.readouterr().err
        assert retokenised.directory not in (first.directory, changed.directory)
        assert len(retokenised.tokens) == len(changed.tokens) + sum(len(r["messages"]) for r in chat_records()[:4])
    finally:
        template.write_text(template.read_text().replace("<|im_start|> ", "<|im_start|>"))
    assert json.loads((base / "tokenizer_config.json").read_text()) == config
    assert ensure(path, "chat", {}, "auto", base).directory == changed.directory  # same inputs, same cache
    assert not list((path.parent / DIRNAME).glob(".*")), "temporary directories were left"


def test_a_half_built_cache_is_never_used(tmp_path):
    good = "".join(f"paragraph {i} " * 40 + "\n\n" for i in range(3000))  # several flushes of the buffers
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in good.split("\n\n")[:-1])
                    + '{"nottext": 1}\n')
    with pytest.raises(RankError, match=r"data.jsonl:3001: field 'text' must be a string"):
        ensure(path, "jsonl", {"text_field": "text"}, "bytes", None)
    assert not _published(path) and not list((tmp_path / DIRNAME).iterdir()), "a partial build is visible"

    # A crashed build leaves a temporary sibling behind: it is ignored, and the real build is complete.
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in good.split("\n\n")[:-1]))
    stale = tmp_path / DIRNAME / f".{path.name}.0000000000000000.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "tokens.bin").write_bytes(b"\0" * 12)
    cache = ensure(path, "jsonl", {"text_field": "text"}, "bytes", None)
    assert len(cache) == 3000 and cache.meta["documents"] == 3000
    assert int(cache.offsets[-1]) == len(cache.tokens) == cache.meta["tokens"]
    first = np.asarray(cache.tokens[cache.offsets[0]:cache.offsets[1]])
    assert bytes(first[1:-1].astype(np.uint8)) == ("paragraph 0 " * 40).encode()


def test_building_streams_the_file(tmp_path):
    """A 24 MB JSONL (24 M tokens: ~100 MB of token ids): the build's Python heap stays far below."""
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 4000}) + "\n"
    with open(path, "w") as handle:
        for _ in range(6000):
            handle.write(line)
    assert os.path.getsize(path) > 24_000_000
    tracemalloc.start()
    try:
        cache = ensure(path, "jsonl", {"text_field": "text"}, "bytes", None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == 6000 and len(cache.tokens) == 6000 * 4002
    assert peak < 30_000_000, f"peak {peak / 1e6:.0f} MB: the file or its tokens were held in memory"


def test_dist_lora_tokenize_builds_the_caches_a_job_then_reuses(tmp_path, base, capfd):
    train = write_jsonl(tmp_path / "train.jsonl", chat_records())
    evaluation = write_jsonl(tmp_path / "eval.jsonl", chat_records()[:2])
    recipe = write_recipe(tmp_path / "recipe.yaml", base, train, "chat", evaluation)
    assert main(["tokenize", str(recipe)]) == 0
    out = capfd.readouterr()
    assert out.err.count("tokenising") == 2 and f"{train}: 10 documents" in out.out
    ensure(train, "chat", {}, "auto", base)
    ensure(evaluation, "chat", {}, "auto", base)
    assert "tokenising" not in capfd.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert main(["tokenize", str(recipe), f"data.path={bad}"]) == 2
    assert f"{bad}:1: field 'messages' has no assistant turn" in capfd.readouterr().err
