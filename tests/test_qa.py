"""Extractive question answering (optlm.train.qa, the question-answering task, metrics.squad_metrics).
Invariants:

- exact match and F1 follow the official SQuAD v1.1 / v2.0 rules (hand-made cases whose values are worked out
  in the comments: punctuation, articles, whitespace, several gold answers, no-answer);
- windows cover the whole context with the asked overlap; a window's target is the answer's tokens exactly
  when the whole answer is inside it, else the no-answer position;
- the best span across windows comes back as the context's exact characters: answers crossing a window edge,
  at the very start or end of the context, in contexts longer than the model's window;
- `optlm train --task question-answering` runs, validates with EM/F1, and its best/ loads in transformers with
  our logits; bad data is one line naming the file and line (or question id).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from optlm.cli import main
from optlm.tokenizer import Tokenizer
from optlm.train import metrics, qa
from optlm.train.predict import load_reader

# ---- SQuAD metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("the Eiffel Tower", ["Eiffel Tower."], 1.0, 1.0),  # article and punctuation dropped: "eiffel tower" both
    ("  Paris ,  France ", ["Paris France"], 1.0, 1.0),  # punctuation removed, whitespace collapsed
    ("Eiffel Tower in Paris", ["the Eiffel Tower"], 0.0, 2 / 3),  # 2 shared of 4 predicted, 2 gold: P=.5 R=1
    ("an apple", ["apple", "a pear"], 1.0, 1.0),  # the best of several gold answers
    ("banana", ["bananas"], 0.0, 0.0),  # no shared token; "a" inside a word is not an article
    ("", [], 1.0, 1.0),  # unanswerable, and no answer given
    ("Paris", [], 0.0, 0.0),  # unanswerable, but an answer given
    ("", ["Paris"], 0.0, 0.0),  # answerable, but no answer given
    ("", ["The"], 1.0, 1.0),  # a gold answer that normalises to nothing is dropped (v2.0): unanswerable
    ("cat cat dog", ["cat dog dog"], 0.0, 2 / 3),  # counts clip: shared {cat: 1, dog: 1}, P=R=2/3
])
def test_exact_match_and_f1_follow_squad(prediction, golds, em, f1):
    m = metrics.squad_metrics({"q": prediction}, {"q": golds})
    assert m["exact_match"] == pytest.approx(100 * em) and m["f1"] == pytest.approx(100 * f1)


def test_squad_totals_and_the_answerable_split():
    m = metrics.squad_metrics({"a": "Paris", "b": "", "c": "Rome"}, {"a": ["Paris"], "b": [], "c": ["Oslo"]})
    assert m["exact_match"] == pytest.approx(200 / 3) and m["total"] == 3
    assert m["has_answer_exact_match"] == 50.0 and m["has_answer_total"] == 2
    assert m["no_answer_exact_match"] == 100.0 and m["no_answer_total"] == 1
    with pytest.raises(ValueError, match="no prediction for question 'c'"):
        metrics.squad_metrics({"a": "x"}, {"a": ["x"], "c": ["y"]})


# ---- windows and span decoding ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("opt-gutenberg")


CONTEXT = ("Alpha came first to the harbour that morning. The old lighthouse keeper, Morag Dunbar, had watched "
           "the boats for forty years before the storm of the winter took her cottage. She moved inland to a "
           "village called Kilbrannan, where she kept bees and wrote letters to the sea. Omega")


def example(answer: str, nth: int = 0) -> qa.Example:
    start = -1
    for _ in range(nth + 1):
        start = CONTEXT.index(answer, start + 1)
    return qa.Example("q", "Who kept the lighthouse?", CONTEXT, [(answer, start)], "test")


def test_windows_cover_the_context_with_the_overlap(tok):
    ids, _ = tok.encode_with_offsets(CONTEXT)
    ws = qa.windows(tok, [example("Morag Dunbar")], max_length=24, stride=6)
    assert len(ws) > 3  # a context several times longer than the window
    room = 24 - (ws[0].context_start)
    seen = []
    for a, b in zip(ws, ws[1:], strict=False):
        assert len(a.offsets) == room and a.offsets[-6:] == b.offsets[:6]  # consecutive windows share 6 tokens
    for w in ws:
        assert len(w.ids) <= 24 and w.ids[0] == tok.bos_token_id and w.ids[w.context_start - 1] == tok.eos_token_id
        seen += w.offsets
    assert sorted(set(seen)) == sorted(set(tok.encode_with_offsets(CONTEXT)[1])) and len(set(seen)) == len(ids)


@pytest.mark.parametrize("answer", ["Alpha", "Morag Dunbar", "Kilbrannan", "Omega", "forty years"])
def test_targets_are_the_answer_tokens_exactly_when_it_is_whole(tok, answer):
    ex = example(answer)
    ws = qa.windows(tok, [ex], max_length=20, stride=8)
    start, end = ex.answers[0][1], ex.answers[0][1] + len(answer)
    whole = [w for w in ws if w.offsets[0][0] <= start and w.offsets[-1][1] >= end]
    assert whole, "the overlap must leave every short answer whole in some window"
    for w in ws:
        if w in whole:
            s, e = w.start - w.context_start, w.end - w.context_start
            assert CONTEXT[w.offsets[s][0]:w.offsets[e][1]].strip() == answer
        else:
            assert (w.start, w.end) == (0, 0)


def peaked(features: qa.Features, answer: str, decoys: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that point at ``answer`` in the windows holding it whole, with higher-scoring invalid spans
    (end before start, too long, in the question) elsewhere when ``decoys``."""
    width = max(len(w.ids) for w in features.windows)
    start, end = torch.zeros(len(features), width), torch.zeros(len(features), width)
    for i, w in enumerate(features.windows):
        if w.start:
            start[i, w.start], end[i, w.end] = 5.0, 5.0
        if decoys and not w.start:
            start[i, w.context_start + 3], end[i, w.context_start + 1] = 9.0, 9.0  # end before start
        if decoys:
            start[i, 1], end[i, 2] = 20.0, 20.0  # inside the question (with the answer's ends: invalid too)
    return start, end


@pytest.mark.parametrize("answer, nth", [("Alpha", 0), ("Omega", 0), ("Morag Dunbar", 0), ("the sea", 0),
                                         ("the boats for forty years before the storm", 0)])
def test_best_span_across_windows_is_the_contexts_exact_text(tok, answer, nth):
    ex = example(answer, nth)
    features = qa.Features([ex], qa.windows(tok, [ex], max_length=24, stride=10), tok.pad_token_id)
    assert len(features.windows) > 2
    got = qa.best_answers(features, *peaked(features, answer), max_answer_tokens=30)
    assert got[0].text == answer and got[0].score == 10.0


def test_an_answer_cut_by_a_window_edge_is_found_in_the_next_window(tok):
    answer = "the boats for forty years before the storm"
    ex = example(answer)
    ws = qa.windows(tok, [ex], max_length=24, stride=10)
    a0 = ex.answers[0][1]
    cut = [w for w in ws if w.offsets[0][0] <= a0 < w.offsets[-1][1] < a0 + len(answer)]
    assert cut and all((w.start, w.end) == (0, 0) for w in cut)  # the window that cuts it does not claim it
    features = qa.Features([ex], ws, tok.pad_token_id)
    assert qa.best_answers(features, *peaked(features, answer))[0].text == answer


def test_max_answer_length_and_no_answer(tok):
    answer = "the boats for forty years before the storm"  # 8 tokens
    ex = example(answer)
    features = qa.Features([ex], qa.windows(tok, [ex], max_length=24, stride=10), tok.pad_token_id)
    start, end = peaked(features, answer, decoys=False)
    assert qa.best_answers(features, start, end, max_answer_tokens=8)[0].text == answer
    assert qa.best_answers(features, start, end, max_answer_tokens=7)[0].text != answer
    start[:, 0], end[:, 0] = 6.0, 6.0  # no-answer scores 12 in every window, above the span's 10
    assert qa.best_answers(features, start, end, allow_no_answer=True)[0].text == ""
    assert qa.best_answers(features, start, end, allow_no_answer=False)[0].text == answer


# ---- training and bad input ----------------------------------------------------------------------------------

def write_qa(path, n: int, seed: int) -> None:
    r = random.Random(seed)
    names, cities = "Anna Bert Carl Dora Emil Fay".split(), "Paris Rome Oslo Lima Cairo Delhi".split()
    with open(path, "w") as f:
        for i in range(n):
            ns, cs = r.sample(names, 3), r.sample(cities, 3)
            ctx = " ".join(f"{a} lives in {c}." for a, c in zip(ns, cs, strict=True))
            k = r.randrange(3)
            answers = [{"text": cs[k], "answer_start": ctx.index(f"{ns[k]} lives in") + len(f"{ns[k]} lives in ")}]
            f.write(json.dumps({"id": f"q{i}", "question": f"Where does {ns[k]} live?", "context": ctx,
                                "answers": answers if i % 4 else []}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    write_qa(root / "train.jsonl", 120, 0)
    write_qa(root / "val.jsonl", 24, 1)
    assert main(["train", "--task", "question-answering", "--model", "opt-gutenberg", "--data",
                 str(root / "train.jsonl"), "--val-data", str(root / "val.jsonl"), "--out", str(root / "run"),
                 "--max-steps", "16", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every",
                 "8", "--block-size", "32", "--doc-stride", "8", "--dtype", "fp32", "--quiet", "--log-every", "1"]) == 0
    return root


def test_qa_training_validates_with_squad_metrics_and_best_loads_in_transformers(trained):
    records = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r for r in records if "exact_match" in r]
    assert [r["step"] for r in vals] == [8, 16] and sum(losses[-4:]) < sum(losses[:4])
    assert {"f1", "has_answer_f1", "no_answer_f1", "total"} <= set(vals[-1]) and vals[-1]["total"] == 24
    best = trained / "run" / "best"
    assert json.loads((best / "config.json").read_text())["architectures"] == ["OPTForQuestionAnswering"]
    ref = transformers.OPTForQuestionAnswering.from_pretrained(best).eval()
    reader = load_reader(best, max_length=32)
    ex = qa.read_examples(trained / "val.jsonl")[:3]
    features = qa.Features(ex, qa.windows(reader.tokenizer, ex, 32, 8), reader.tokenizer.pad_token_id)
    from optlm.train.tasks import qa_logits

    start, end = qa_logits(reader.model, features, 4)
    with torch.no_grad():
        for i, w in enumerate(features.windows):
            out = ref(torch.from_numpy(w.ids)[None])
            torch.testing.assert_close(out.start_logits[0], start[i, :len(w.ids)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.end_logits[0], end[i, :len(w.ids)], atol=1e-5, rtol=1e-5)


def test_predict_and_eval_answer_from_the_context(trained, capsys):
    capsys.readouterr()
    assert main(["predict", "--model", str(trained / "run" / "best"), "--data", str(trained / "val.jsonl"),
                 "--max-length", "32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    contexts = [json.loads(line)["context"] for line in (trained / "val.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["answer"] in c for r, c in zip(rows, contexts, strict=True))
    assert main(["eval", "--task", "question-answering", "--model", str(trained / "run" / "best"), "--data",
                 str(trained / "val.jsonl"), "--max-length", "32", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["total"] == 24 and 0 <= m["exact_match"] <= m["f1"] <= 100


def test_a_lora_reader_loads_in_peft_with_our_logits(trained, tmp_path, capsys):
    import peft

    from optlm.bundled import bundled_model_path
    from optlm.train.tasks import qa_logits

    assert main(["train", "--task", "question-answering", "--model", "opt-gutenberg", "--data",
                 str(trained / "train.jsonl"), "--val-data", str(trained / "val.jsonl"), "--out", str(tmp_path / "l"),
                 "--max-steps", "4", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "4",
                 "--block-size", "32", "--doc-stride", "8", "--dtype", "fp32", "--quiet", "--lora", "r=4"]) == 0
    best = tmp_path / "l" / "best"
    assert json.loads((best / "adapter_config.json").read_text())["modules_to_save"] == ["qa_outputs"]
    reader = load_reader(adapter=best, max_length=32)
    ex = qa.read_examples(trained / "val.jsonl")[:2]
    features = qa.Features(ex, qa.windows(reader.tokenizer, ex, 32, 8), reader.tokenizer.pad_token_id)
    start, end = qa_logits(reader.model, features, 4)
    base = transformers.OPTForQuestionAnswering.from_pretrained(bundled_model_path())
    ref = peft.PeftModel.from_pretrained(base, best).eval()
    with torch.no_grad():
        for i, w in enumerate(features.windows):
            out = ref(input_ids=torch.from_numpy(w.ids)[None])
            torch.testing.assert_close(out.start_logits[0], start[i, :len(w.ids)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.end_logits[0], end[i, :len(w.ids)], atol=1e-5, rtol=1e-5)
    capsys.readouterr()  # the task is read from the adapter's task.json: no --task needed
    assert main(["predict", "--adapter", str(best), "--data", str(trained / "val.jsonl"), "--max-length", "32",
                 "--quiet"]) == 0
    assert len([json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]) == 24


@pytest.mark.parametrize("content, suffix, message", [
    ('{"id": "a", "question": "q?", "context": "Paris is big", "answers": [{"text": "Rome", "answer_start": 0}]}',
     ".jsonl", "line 1: the answer 'Rome' is not at character 0 of the context (the context has 'Pari' there)"),
    ('{"id": "a", "question": "q?", "context": "c"}', ".jsonl", "line 1 has no field 'answers'"),
    ('{"data": [{"paragraphs": [{"context": "Oslo", "qas": [{"id": "x7", "question": "q?", "answers": '
     '[{"text": "Oslo", "answer_start": 2}]}]}]}]}', ".json", "question x7: the answer 'Oslo' is not at character 2"),
    ("", ".jsonl", "is empty"),
])
def test_bad_qa_data_is_one_line_naming_file_and_line(tmp_path, capsys, content, suffix, message):
    data = tmp_path / f"train{suffix}"
    data.write_text(content + ("\n" if content else ""))
    rc = main(["train", "--task", "question-answering", "--model", "opt-gutenberg", "--data", str(data), "--out",
               str(tmp_path / "out"), "--max-steps", "2", "--warmup-steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1, err
