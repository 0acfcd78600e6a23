"""Data: chat masks, SFT packing and resume, RL schema round trips, curation, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_klear.data.chat import render_chat
from megatron_klear.data.rl import CurationConfig, load_rl_prompts, to_row, write_parquet
from megatron_klear.data.sft import SFTDataConfig, SFTDataset
from megatron_klear.data.synthetic import make_code_rows, make_dataset, make_math_rows
from megatron_klear.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def tok_dir(hf_models) -> str:
    return str(hf_models["gqa1_untied"])


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_mask_is_exactly_the_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12+7?"},
        {"role": "assistant", "content": "<think>12+7=19</think>\nThe answer is \\boxed{19}."},
        {"role": "user", "content": "And 1+1?"},
        {"role": "assistant", "content": "<think>2</think> \\boxed{2}"},
    ]
    r = render_chat(tok, msgs)
    assert r.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert r.input_ids == tok(r.text, add_special_tokens=False)["input_ids"]
    on = tok.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m])
    off = tok.decode([i for i, m in zip(r.input_ids, r.loss_mask) if not m])
    assert on == msgs[2]["content"] + "<|im_end|>" + msgs[4]["content"] + "<|im_end|>"
    assert "Be brief." in off and "12+7?" in off and "<think>" not in off
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [m for i, m in zip(r.input_ids, r.loss_mask) if i == im_end]
    assert ends == [0, 0, 1, 0, 1]  # only the assistant turns' closing token is trained on


def test_generation_prompt(tok):
    r = render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert r.text.endswith("<|im_start|>assistant\n") and not any(r.loss_mask)


def test_bad_messages_are_named(tok):
    for bad, match in [
        ([], "non-empty"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
    ]:
        with pytest.raises(ValueError, match=match):
            render_chat(tok, bad)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(i: int, n_words: int = 5) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": "<think>" + " step" * n_words + f"</think> \\boxed{{{i}}}"},
        ]
    }


def dataset(paths: list[str], tok: str, align: int = 1, **data) -> SFTDataset:
    """An SFT dataset over ``paths`` with ``data`` section fields."""
    return SFTDataset(SFTDataConfig(train=paths, **data), tok, align=align)


def test_packing_never_crosses_documents(tmp_path, tok_dir, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(i, n_words=3 + i % 17) for i in range(60)])
    ds = dataset([str(path)], tok_dir, seq_len=128, cache_dir=str(tmp_path / "cache"))
    seen = 0
    for k, ids in enumerate(ds.plan(0)):
        s = ds.build(ids)
        cu = s.cu_seqlens
        assert cu[0] == 0 and cu[-1] == 128 and np.all(np.diff(cu) > 0)
        for a, b in zip(cu[:-1], cu[1:]):
            assert np.array_equal(s.position_ids[a:b], np.arange(b - a))  # restart per document
            assert s.loss_mask[b - 1] == 0  # the last token of a document predicts nothing
            assert np.array_equal(s.labels[a : b - 1], s.input_ids[a + 1 : b])
        seen += len(ids)
    assert seen == len(ds.refs) == 60  # every sample exactly once per epoch
    # the loss mask marks exactly the assistant tokens, shifted for next-token prediction
    s = ds.build([0])
    toks, mask = ds.caches[0].sample(ds.refs[0][1])
    assert np.array_equal(s.loss_mask[: len(toks) - 1], mask[1:].astype(np.float32))


def test_aligned_packing_for_context_parallel(tmp_path, tok_dir):
    """align=4 (context parallel 2): every document slot is a multiple of 4 long, and the packs
    hold the same documents with the same supervision as unaligned packing."""
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(i, n_words=3 + i % 17) for i in range(60)])
    base = dict(paths=[str(path)], tok=tok_dir, seq_len=128, cache_dir=str(tmp_path / "cache"))
    plain, aligned = dataset(**base), dataset(**base, align=4)

    def documents(ds):
        docs = {}
        for ids in ds.plan(0):
            s = ds.build(ids)
            assert len(s.input_ids) == 128 and s.cu_seqlens[-1] == 128
            for i, a in zip(ids, s.cu_seqlens[:-1]):
                n = int(ds.lengths[i])
                docs[i] = (
                    s.input_ids[a : a + n].tolist(),
                    s.labels[a : a + n].tolist(),
                    s.loss_mask[a : a + n].tolist(),
                )
            if ds.align > 1:
                assert all(c % 4 == 0 for c in s.cu_seqlens)
            # real tokens per document: alignment and end-of-pack padding left out (tokens/s, FLOPs)
            assert s.document_lengths().tolist() == [int(ds.lengths[i]) for i in ids]
            supervised = sum(s.loss_mask[a : a + int(ds.lengths[i])].sum() for i, a in zip(ids, s.cu_seqlens))
            assert s.loss_mask.sum() == supervised  # alignment padding carries no loss
        return docs

    assert documents(aligned) == documents(plain)
    assert len(aligned.plan(0)) >= len(plain.plan(0))
    with pytest.raises(DataError, match="data.seq_len=130 is not a multiple of the document alignment 4"):
        dataset(**{**base, "seq_len": 130}, align=4)


def test_exact_resume_of_data_order(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(i) for i in range(40)])
    cfg = SFTDataConfig([str(path)], seq_len=96, cache_dir=str(tmp_path / "cache"), seed=7)
    full = [(e, k, s.input_ids.tolist()) for (e, k, s), _ in zip(SFTDataset(cfg, tok_dir).iterate(), range(25))]
    e, k, _ = full[11]
    resumed = [
        (e2, k2, s.input_ids.tolist()) for (e2, k2, s), _ in zip(SFTDataset(cfg, tok_dir).iterate(e, k), range(14))
    ]
    assert resumed == full[11:]
    assert full[0][0] == 0 and full[-1][0] >= 1  # crossed into the next epoch
    assert SFTDataset(cfg, tok_dir).plan(0) != SFTDataset(cfg, tok_dir).plan(1)  # reshuffled per epoch
    other = SFTDataConfig(**{**cfg.__dict__, "seed": 8})
    assert SFTDataset(other, tok_dir).plan(0) != SFTDataset(cfg, tok_dir).plan(0)


def test_overlong_truncate_or_drop(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(0, 3), conv(1, 300), conv(2, 3)])
    base = dict(paths=[str(path)], tok=tok_dir, seq_len=64, cache_dir=str(tmp_path / "c"))
    t = dataset(**base, overlong="truncate")
    assert t.stats()["truncated"] == 1 and t.stats()["samples"] == 3 and t.lengths.max() == 64
    d = dataset(**base, overlong="drop")
    assert d.stats()["dropped"] == 1 and d.stats()["samples"] == 2


def test_malformed_rows_are_skipped_with_location_or_raise(tmp_path, tok_dir):
    rows = [
        conv(0),
        "{not json",
        {"text": "no messages"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "only a user"}]},
        conv(1),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    ds = dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c"), max_bad_fraction=1.0)
    assert ds.stats()["samples"] == 2 and ds.skipped == 4
    rows_skipped = [r for _, r, _ in (tuple(x) for x in ds.caches[0].meta["skipped"])]
    assert rows_skipped == [1, 2, 3, 4]
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c2"), strict=True)
    # the same cache, reused under the default limit (1%), is too bad to train on
    with pytest.raises(DataError, match=r"bad.jsonl: 4 of 6 rows are malformed \(66.7% > data.max_bad_fraction=0.01\)"):
        dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c"))


def test_a_row_that_is_not_utf8_is_skipped_and_named_by_line(tmp_path, tok_dir):
    """One bad byte costs its row, not the file; the position is the byte's in that line."""
    lines = [json.dumps(conv(i)).encode() for i in range(30)]
    lines[6] = lines[6].replace(b"question", b"qu\xffestion")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c"), max_bad_fraction=0.05)
    assert ds.stats()["samples"] == 29 and ds.skipped == 1
    ((_, row, why),) = (tuple(x) for x in ds.caches[0].meta["skipped"])
    byte = lines[6].index(b"\xff")
    assert row == 6 and why.startswith(f"not valid UTF-8 (byte {byte} of the line")
    with pytest.raises(DataError, match=r"latin.jsonl: line 7: not valid UTF-8"):
        dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c2"), strict=True)
    with pytest.raises(
        DataError, match=r"latin.jsonl: 1 of 30 rows are malformed \(3.3% > data.max_bad_fraction=0.01\)"
    ):
        dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c3"))
    rl = tmp_path / "rl.jsonl"  # RL prompt files: the same rule
    good = [json.dumps(r).encode() for r in make_math_rows(20, 3)]
    rl.write_bytes(b"\n".join(good + [b'{"prompt": "\xff"}']) + b"\n")
    prompts, stats = load_rl_prompts([str(rl)], CurationConfig(min_code_tests=0), max_bad_fraction=0.1)
    assert stats["skipped"] == 1 and stats["kept"] == len(prompts) == 20
    with pytest.raises(DataError, match=r"rl.jsonl: 1 of 21 rows are malformed"):
        load_rl_prompts([str(rl)], CurationConfig(min_code_tests=0), max_bad_fraction=0.01)


def test_missing_unreadable_and_empty_data(tmp_path, tok_dir):
    with pytest.raises(DataError, match="nope.jsonl: data file does not exist"):
        dataset([str(tmp_path / "nope.jsonl")], tok_dir, cache_dir=str(tmp_path / "c"))
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{}"])
    with pytest.raises(DataError, match="empty.jsonl: 1 of 1 rows are malformed"):
        dataset([str(empty)], tok_dir, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no usable samples"):
        dataset([str(empty)], tok_dir, cache_dir=str(tmp_path / "c"), max_bad_fraction=1.0)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read Parquet"):
        load_rl_prompts([str(tmp_path / "broken.parquet")])


def test_cache_is_reused_and_workers_agree(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", [conv(i) for i in range(30)])
    one = dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "a"))
    two = dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "b"), workers=2)
    assert np.array_equal(np.asarray(one.caches[0].tokens), np.asarray(two.caches[0].tokens))
    again = dataset([str(path)], tok_dir, seq_len=64, cache_dir=str(tmp_path / "a"))
    assert again.caches[0].dir == one.caches[0].dir


def test_parquet_sft_input(tmp_path, tok_dir):
    write_parquet([conv(i) for i in range(5)], tmp_path / "sft.parquet")
    ds = dataset([str(tmp_path / "sft.parquet")], tok_dir, seq_len=64, cache_dir=str(tmp_path / "c"))
    assert ds.stats()["samples"] == 5


# --- RL prompt sets ----------------------------------------------------------------------------


def test_rl_schema_round_trip_both_test_shapes(tmp_path):
    rows = make_math_rows(5, 1) + make_code_rows(3, 1)
    lcb = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}] * 16
    rows.append(
        dict(
            data_source="lcb",
            ability="code",
            prompt=[{"role": "user", "content": "add"}],
            reward_model=dict(style="rule", ground_truth=json.dumps(lcb)),
            extra_info={"index": "x"},
        )
    )
    write_parquet(rows, tmp_path / "rl.parquet")
    prompts, stats = load_rl_prompts([str(tmp_path / "rl.parquet")])
    assert stats["kept"] == 9 and [p.ability for p in prompts].count("code") == 4
    write_parquet([to_row(p) for p in prompts], tmp_path / "again.parquet")
    again, _ = load_rl_prompts([str(tmp_path / "again.parquet")])
    assert [(p.messages, p.ground_truth, p.ability) for p in again] == [
        (p.messages, p.ground_truth, p.ability) for p in prompts
    ]


def test_rl_curation_filters(tmp_path):
    rows = make_math_rows(6, 2) + make_code_rows(2, 2, n_tests=16) + make_code_rows(2, 3, n_tests=8)
    rows.append(dict(rows[0]))  # an exact duplicate prompt
    story = "A farmer has 17 sheep and buys 5 more at the market on Sunday; how many now?"
    rows[1] = dict(rows[1], prompt=[{"role": "user", "content": "Solve it.\n\n" + story}])
    write_parquet(rows, tmp_path / "rl.parquet")
    eval_prompt = f"Q: {story} A:"  # an evaluation problem that shares 9-grams with row 1 only
    prompts, stats = load_rl_prompts(
        [str(tmp_path / "rl.parquet")], CurationConfig(min_code_tests=16, eval_prompts=[eval_prompt])
    )
    assert (stats["few_tests"], stats["duplicates"], stats["contaminated"]) == (2, 1, 1)
    assert stats["kept"] == len(prompts) == 11 - 4
    loose, s2 = load_rl_prompts([str(tmp_path / "rl.parquet")], CurationConfig(min_code_tests=0, dedup=False))
    assert s2["kept"] == 11


def test_rl_malformed_rows(tmp_path):
    good = make_math_rows(2, 3)
    bad = [
        dict(good[0], ability="poetry"),
        {k: v for k, v in good[0].items() if k != "prompt"},
        dict(make_code_rows(1, 3)[0], reward_model={"style": "rule", "ground_truth": "{oops"}),
    ]
    path = write_jsonl(tmp_path / "rl.jsonl", good + bad)
    prompts, stats = load_rl_prompts([str(path)], CurationConfig(min_code_tests=0))
    assert stats["kept"] == 2 and stats["skipped"] == 3
    with pytest.raises(DataError, match=r"rl.jsonl: line 3: ability must be"):
        load_rl_prompts([str(path)], strict=True)
    with pytest.raises(DataError, match="no RL prompts left"):
        load_rl_prompts([str(write_jsonl(tmp_path / "none.jsonl", bad))])


def test_generator_is_deterministic_and_shipped_samples_are_current(tmp_path):
    a = make_dataset(tmp_path / "a", seed=0, n_math=64, n_code=12, n_test=32)
    b = make_dataset(tmp_path / "b", seed=0, n_math=64, n_code=12, n_test=32)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert (SAMPLES / a[name].name).read_bytes() == a[name].read_bytes(), f"examples/data/{a[name].name} is stale"
    c = make_dataset(tmp_path / "c", seed=1, n_math=64, n_code=12, n_test=32)
    assert c["sft"].read_bytes() != a["sft"].read_bytes()


def test_generated_solutions_score_correct_with_the_reward_code():
    from megatron_klear.rewards.batch import RewardItem, score_batch
    from megatron_klear.rewards.sandbox import available_backends

    if not available_backends():
        pytest.skip("no sandbox installed (tools/test.sh installs firejail)")
    prompts, _ = load_rl_prompts([str(SAMPLES / "math_train.parquet"), str(SAMPLES / "code_train.parquet")])
    items = [RewardItem(p.ability, p.extra_info["solution"], p.ground_truth, fn_name=p.fn_name) for p in prompts]
    results = score_batch(items, workers=4)
    assert all(r.correct for r in results), [r for r in results if not r.correct]
    levels = {p.extra_info["level"] for p in prompts if p.ability == "math"}
    assert levels == {1, 2, 3, 4}


def test_synthetic_math_test_split_never_repeats_a_training_question(tmp_path):
    """Level 0 (the demo's two-digit sums) has only 8100 questions: the test split must still
    be held out."""
    from megatron_klear.data.io import read_rows
    from megatron_klear.data.synthetic import make_dataset

    files = make_dataset(tmp_path, seed=0, n_math=3000, n_code=6, n_test=100, levels=(0,))
    train = {r["prompt"][0]["content"] for _, r in read_rows(files["math_train"])}
    test = [r["prompt"][0]["content"] for _, r in read_rows(files["math_test"])]
    assert len(test) == 100 and not set(test) & train


def test_code_ablation_split_holds_out_statements_and_its_solutions_pass(tmp_path):
    """Our code problems repeat statements (6 families x 39 constants): the code ablation's test
    statements never occur in its training split, and the shipped solutions pass their tests."""
    from megatron_klear.data.io import read_rows
    from megatron_klear.data.synthetic import make_code_dataset
    from megatron_klear.rewards.code import score_code

    files = make_code_dataset(tmp_path, n_train=300, n_test=20, seed=3)
    train = [r for _, r in read_rows(files["code_train"])]
    test = [r for _, r in read_rows(files["code_test"])]
    statements = [r["prompt"][0]["content"] for r in test]
    assert len(train) == 300 and len(set(statements)) == len(statements) == 20
    assert not set(statements) & {r["prompt"][0]["content"] for r in train}
    sft = [json.loads(line) for line in files["sft"].read_text().splitlines()]
    assert len(sft) == 300 and sft[0]["messages"][0] == train[0]["prompt"][0]
    for row in test[:2]:
        solution = row["extra_info"]["solution"]
        assert score_code(solution, row["reward_model"]["ground_truth"], max_tests=4).correct
