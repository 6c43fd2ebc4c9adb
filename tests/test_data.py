"""mini-WikiSQL: deterministic generation and the committed files, chat formatting, label masking, padding,
exact-match normalisation (property tests), batched greedy prediction, bad input. Seconds in all."""
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabook.models import byte_tokenizer
from lorabook import data
from lorabook.data import (IGNORE, collate, encode, exact_match, format_example, generate, load_split,
                           normalize_sql, to_jsonl)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def train():
    return load_split("train")


# ---------------------------------------------------------------------------------------------- generation

def test_generation_is_deterministic():
    small = {"train": 30, "val": 5, "test": 5}
    assert generate(0, small) == generate(0, small)
    assert generate(0, small) != generate(1, small)


@pytest.mark.parametrize("split", list(data.SPLITS))
def test_committed_files_equal_a_fresh_generation(split):
    path = data.DATA_DIR / f"sql_{split}.jsonl"
    assert path.read_bytes() == to_jsonl(generate()[split]), "run `python -m lorabook.data` and commit data/"
    assert path.stat().st_size < 1_000_000


def test_splits_have_their_sizes_and_share_no_query():
    splits = {name: load_split(name) for name in data.SPLITS}
    assert {k: len(v) for k, v in splits.items()} == data.SPLITS
    queries = [{ex["sql"] for ex in v} for v in splits.values()]
    assert sum(map(len, queries)) == sum(data.SPLITS.values())  # unique within and across splits


def test_sql_is_consistent_with_its_question_and_table(train):
    pattern = re.compile(r"SELECT (?:(COUNT|MAX|MIN|AVG)\((\w+)\)|(\w+)) FROM (\w+) WHERE (.+)")
    aggs, tables = set(), set()
    for ex in train:
        m = pattern.fullmatch(ex["sql"])
        assert m, ex["sql"]
        aggs.add(m.group(1))
        tables.add(m.group(4))
        assert m.group(4) == ex["table"] and (m.group(2) or m.group(3)) in dict(ex["columns"])
        conds = m.group(5).split(" AND ")
        assert 1 <= len(conds) <= 2
        for cond in conds:
            col, op, val = re.fullmatch(r"(\w+) (=|>|<) (.+)", cond).groups()
            assert col in dict(ex["columns"]) and val.strip("'") in ex["question"]
            assert (val[0] == "'") == (dict(ex["columns"])[col] == "text")
    assert aggs == {None, "COUNT", "MAX", "MIN", "AVG"} and tables == set(data.TABLES)


def test_load_split_first_n_and_bad_input(tmp_path):
    assert load_split("val", n=3) == load_split("val")[:3]
    with pytest.raises(ValueError, match="unknown split 'dev'.*train"):
        load_split("dev")
    for bad in (0, -1, 2.0, True, float("nan")):
        with pytest.raises(ValueError, match=f"n must be a positive int, got {bad!r}"):
            load_split("val", n=bad)
    with pytest.raises(FileNotFoundError, match="python -m lorabook.data"):
        load_split("val", data_dir=tmp_path)


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_bad_sizes(n):
    with pytest.raises(ValueError, match=rf"sizes\['train'\] must be an int >= 0, got {n!r}"):
        generate(0, {"train": n})


@pytest.mark.parametrize("bad, what", [(b'{"id": "val-00002", "sql": "SELECT', "not valid JSON"),
                                       (b'{"id": "val-00002", "sql": "SELECT \xff"}', "not valid UTF-8"),
                                       (b'["a list, not an example"]', "expected a JSON object")])
def test_a_bad_line_is_named_by_file_and_number(tmp_path, bad, what):
    lines = (data.DATA_DIR / "sql_val.jsonl").read_bytes().splitlines()[:4]
    path = tmp_path / "sql_val.jsonl"
    path.write_bytes(b"\n".join(lines[:2] + [bad] + lines[3:]) + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: {what}")):
        load_split("val", data_dir=tmp_path)
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a blank line is no example, and no error
    assert load_split("val", data_dir=tmp_path) == load_split("val", n=4)


def test_write_splits_is_atomic_and_identical(tmp_path):
    paths = data.write_splits(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sql_test.jsonl", "sql_train.jsonl", "sql_val.jsonl"]
    assert paths["val"].read_bytes() == (data.DATA_DIR / "sql_val.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------- formatting

def test_format_example_is_a_chat_with_schema_and_question(tok, train):
    ex = train[0]
    text = format_example(ex, tok)
    assert text["prompt"].startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT)
    assert data.schema_text(ex) in text["prompt"] and ex["question"] in text["prompt"]
    assert text["prompt"].endswith("<|im_start|>assistant\n")
    assert text["answer"] == ex["sql"] + "<|im_end|>"
    assert "system" not in format_example(ex, tok, system=None)["prompt"]  # our template has no default one
    assert format_example(text, tok) == text  # (prompt, answer) pairs pass through


def test_format_example_bad_input(tok):
    with pytest.raises(ValueError, match=r"ex lacks \['columns', 'sql'\]"):
        format_example({"table": "t", "question": "q"}, tok)


def test_collate_masks_the_prompt_and_pads(tok, train):
    batch = collate(train[:3], tok, max_len=512)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    assert ids.shape[1] == max(sum(map(len, encode(ex, tok))) for ex in train[:3])  # padded to the longest
    for i, ex in enumerate(train[:3]):
        prompt, answer = encode(ex, tok)
        n = len(prompt) + len(answer)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (labels[i, :len(prompt)] == IGNORE).all()  # no loss on the prompt
        assert labels[i, len(prompt):n].tolist() == answer  # loss on the SQL and the end token
        assert labels[i, n - 1] == tok.eos_token_id
        assert (labels[i, n:] == IGNORE).all() and (ids[i, n:] == tok.pad_token_id).all()
        assert tok.decode(ids[i, len(prompt):n]) == ex["sql"] + "<|im_end|>"


def test_collate_cuts_at_max_len(tok, train):
    batch = collate(train[:2], tok, max_len=20)
    assert batch["input_ids"].shape == (2, 20) and (batch["labels"] == IGNORE).all()


@pytest.mark.parametrize("max_len", [0, 1, 2.5, None, True])
def test_collate_bad_max_len(tok, train, max_len):
    with pytest.raises(ValueError, match="max_len must be"):
        collate(train[:1], tok, max_len=max_len)


def test_collate_empty_batch(tok):
    with pytest.raises(ValueError, match="batch must"):
        collate([], tok)


@pytest.mark.smollm2
def test_masking_with_smollm2s_tokenizer(train):
    from transformers import AutoTokenizer

    from lorabook.models import prepare_base_model
    tok = AutoTokenizer.from_pretrained(prepare_base_model(quiet=True))
    batch = collate(train[:4], tok, max_len=256)
    for i, ex in enumerate(train[:4]):
        kept = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert tok.decode(kept) == ex["sql"] + "<|im_end|>"
        text = format_example(ex, tok)
        assert tok.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()]) == text["prompt"] + text[
            "answer"]


# ---------------------------------------------------------------------------------------------- exact match

names = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
texts = st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}[A-Za-z]", fullmatch=True)
numbers = st.one_of(st.integers(0, 10**7).map(str), st.integers(0, 999).map(lambda k: f"{k / 10:.1f}"))
conds = st.tuples(names, st.sampled_from(["=", ">", "<"]), st.one_of(texts.map(lambda t: ("text", t)),
                                                                     numbers.map(lambda n: ("num", n))))


@st.composite
def queries(draw):
    """A query in the dataset's shape, as tokens."""
    agg = draw(st.sampled_from(["", "COUNT", "MAX", "MIN", "AVG"]))
    col = draw(names)
    toks = ["SELECT"] + ([agg, "(", col, ")"] if agg else [col]) + ["FROM", draw(names), "WHERE"]
    for i, (c, op, (kind, v)) in enumerate(draw(st.lists(conds, min_size=1, max_size=2))):
        toks += (["AND"] if i else []) + [c, op, f"'{v}'" if kind == "text" else v]
    return toks


KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "COUNT", "MAX", "MIN", "AVG"}


def render(toks, spaces, upper, double_quotes, semicolon):
    """The same query written another way: spacing, keyword case, quote style, a final ';'."""
    out = ""
    for tok, space in zip(toks, spaces):
        if tok in KEYWORDS:
            tok = tok.upper() if upper else tok.lower()
        elif tok.startswith("'") and double_quotes:
            tok = '"' + tok[1:-1] + '"'
        out += tok + " " * space
    return out + (";" if semicolon else "")


@settings(max_examples=200, deadline=None)
@given(queries(), st.lists(st.integers(1, 3), min_size=20, max_size=20), st.booleans(), st.booleans(),
       st.booleans())
def test_exact_match_ignores_spacing_case_quotes_and_semicolon(toks, spaces, upper, dq, semi):
    gold = " ".join(toks)
    assert exact_match(render(toks, spaces, upper, dq, semi), gold)


@settings(max_examples=200, deadline=None)
@given(queries(), st.data())
def test_exact_match_sees_a_changed_value_or_column(toks, draw):
    gold = " ".join(toks)
    i = draw.draw(st.sampled_from([i for i, t in enumerate(toks) if t not in KEYWORDS and t not in "()=<>"]))
    changed = toks[:i] + [toks[i][:-1] + "X'" if toks[i].startswith("'") else toks[i] + "9"] + toks[i + 1:]
    assert not exact_match(" ".join(changed), gold)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_normalize_is_idempotent_and_exact_match_symmetric(a, b):
    assert normalize_sql(normalize_sql(a)) == normalize_sql(a)
    assert exact_match(a, b) == exact_match(b, a) and exact_match(a, a)


def test_exact_match_examples():
    gold = "SELECT COUNT(city) FROM cities WHERE country = 'France' AND founded > 1200"
    assert exact_match('select count( city )  from cities where country="France" and founded>1200;', gold)
    assert exact_match(gold.replace("1200", "1200.0"), gold)
    assert not exact_match(gold.replace("France", "france"), gold)  # values keep their case
    assert not exact_match(gold.replace(">", ">="), gold)
    assert not exact_match("SELECT COUNT(city) FROM cities WHERE country = 'France'", gold)


# ---------------------------------------------------------------------------------------------- prediction

def test_batched_prediction_equals_one_at_a_time(tok):
    from lorabook.models import tiny_llama
    model = tiny_llama(seed=0, vocab_size=len(tok), max_seq_len=512)
    examples = load_split("test", n=5)
    kw = dict(max_new_tokens=6, progress=False)
    batched = data.predict(model, tok, examples, batch_size=4, **kw)  # left padding, sorted by length
    assert batched == [data.predict(model, tok, [ex], batch_size=1, **kw)[0] for ex in examples]
    assert 0.0 <= data.evaluate(model, tok, examples, batch_size=4, **kw) <= 1.0


def test_evaluate_counts_exact_matches(tok, tiny, monkeypatch):
    examples = load_split("test", n=4)
    answers = [examples[0]["sql"].lower(), "nope", examples[2]["sql"] + ";", ""]
    monkeypatch.setattr(data, "predict", lambda *a, **k: answers)
    assert data.evaluate(tiny, tok, examples) == 0.5


@pytest.mark.parametrize("kwargs, arg", [(dict(batch_size=0), "batch_size"), (dict(max_new_tokens=0),
                                                                              "max_new_tokens"),
                                         (dict(batch_size=True), "batch_size must be a positive int, got True"),
                                         (dict(max_new_tokens=4.0), "max_new_tokens must be a positive int")])
def test_predict_bad_input(tok, tiny, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        data.predict(tiny, tok, load_split("test", n=1), **kwargs)


def test_evaluate_needs_examples(tok, tiny):
    with pytest.raises(ValueError, match="examples"):
        data.evaluate(tiny, tok, [])


def test_byte_tokenizer_round_trips(tok):
    text = "SELECT name FROM players WHERE team = 'Inter Milan' <|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids[-1] == tok.eos_token_id == 2 and len(tok) == 259
    assert json.loads(json.dumps(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)))
