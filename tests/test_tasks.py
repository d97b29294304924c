"""Task fine-tuning (optlm.train.tasks, labelled, metrics, predict). Invariants:

- the metrics equal scikit-learn's on the same predictions (single-label, multi-label, regression);
- `optlm train --task sequence-classification` reaches 100 % validation accuracy on a separable task, keeps the
  best checkpoint in best/, and that checkpoint loads in transformers with our logits; a LoRA run's best/
  loads in peft with our logits; a run stopped and resumed equals the run straight through;
- batched, left-padded classification equals each text alone;
- bad data fails with one line naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import sklearn.metrics as skm
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils.class_weight import compute_class_weight
from train_fixtures import write_rows

from optlm.cli import main
from optlm.train import labelled, metrics
from optlm.train.predict import load_classifier
from optlm.train.tasks import parse_class_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return {"train": write_rows(root / "train.jsonl", 240, 0), "val": write_rows(root / "val.jsonl", 60, 1),
            "root": root}


def train(capsys, out: Path, data: dict, *extra: str) -> tuple[int, str, str]:
    argv = ["train", "--task", "sequence-classification", "--model", "opt-gutenberg", "--data", str(data["train"]),
            "--val-data", str(data["val"]), "--out", str(out), "--batch-size", "16", "--lr", "1e-3",
            "--warmup-steps", "5", "--dtype", "fp32", "--quiet", "--log-every", "1", *extra]
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- metrics against scikit-learn -------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(
    st.just(k), st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40))))
def test_classification_metrics_equal_scikit_learn(case):
    k, pairs = case
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    names = [f"c{i}" for i in range(k)]
    got = metrics.classification_metrics(y_true, y_pred, names)
    labels = list(range(k))  # every class, also those absent here (as the trainer scores)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average="macro",
                                                         zero_division=0))
    assert got["weighted_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average="weighted",
                                                            zero_division=0))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        assert got["per_label"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i],
                                                        "support": s[i]})
    assert got["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(2, 5), st.integers(0, 2**31))
def test_multilabel_and_regression_metrics_equal_scikit_learn(n, k, seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.random((n, k)) > 0.5, rng.random((n, k)) > 0.5
    got = metrics.multilabel_metrics(y_true, y_pred, [str(i) for i in range(k)])
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg in ("micro", "macro"):
        assert got[f"{avg}_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average=avg, zero_division=0))
    t, p = rng.normal(size=n + 1), rng.normal(size=n + 1)
    reg = metrics.regression_metrics(t, p)
    assert reg["mse"] == pytest.approx(skm.mean_squared_error(t, p))
    assert reg["mae"] == pytest.approx(skm.mean_absolute_error(t, p))
    assert reg["r2"] == pytest.approx(skm.r2_score(t, p))


def test_balanced_class_weights_equal_scikit_learn():
    y = np.array([0, 0, 0, 1, 2, 2])
    want = compute_class_weight("balanced", classes=np.arange(3), y=y)
    got = parse_class_weights("balanced", ["a", "b", "c"], torch.bincount(torch.tensor(y)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert parse_class_weights("b=2.5", ["a", "b", "c"], torch.ones(3)).tolist() == [1.0, 2.5, 1.0]
    with pytest.raises(ValueError, match="LABEL=WEIGHT"):
        parse_class_weights("d=1", ["a", "b", "c"], torch.ones(3))


# ---- training -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    assert main(["train", "--task", "sequence-classification", "--model", "opt-gutenberg", "--data",
                 str(data["train"]), "--val-data", str(data["val"]), "--out", str(out), "--batch-size", "16",
                 "--lr", "1e-3", "--warmup-steps", "5", "--dtype", "fp32", "--quiet", "--max-steps", "40",
                 "--eval-every", "10", "--save-every", "20"]) == 0
    return out


def test_separable_task_reaches_full_accuracy_and_best_is_kept(trained, data):
    vals = [r for r in records(trained) if "accuracy" in r]
    assert [r["step"] for r in vals] == [10, 20, 30, 40]
    assert vals[-1]["accuracy"] == 1.0 and vals[-1]["macro_f1"] == 1.0
    best = json.loads((trained / "best" / "best.json").read_text())
    first_best = next(r for r in vals if r["macro_f1"] == max(v["macro_f1"] for v in vals))
    assert best["metric"] == "macro_f1" and best["step"] == first_best["step"] and best["value"] == 1.0
    config = json.loads((trained / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "farm", "1": "sea", "2": "war"}
    assert config["architectures"] == ["OPTForSequenceClassification"]
    assert (trained / "confusion.png").stat().st_size > 0 and (trained / "best" / "confusion.png").is_file()
    table = (trained / "validation.txt").read_text()
    assert "confusion matrix (rows: true label, columns: predicted)" in table and "farm" in table


def test_best_checkpoint_loads_in_transformers_with_our_logits(trained, data):
    clf = load_classifier(trained / "best")
    texts = [json.loads(line)["text"] for line in data["val"].read_text().splitlines()[:6]]
    ours = clf.logits(texts, batch_size=4)
    ref = transformers.OPTForSequenceClassification.from_pretrained(trained / "best").eval()
    assert ref.config.id2label == {0: "farm", 1: "sea", 2: "war"}
    tok = transformers.AutoTokenizer.from_pretrained(trained / "best")
    with torch.no_grad():
        for text, row in zip(texts, ours, strict=True):  # one text at a time: no padding in the reference
            torch.testing.assert_close(ref(**tok(text, return_tensors="pt")).logits[0], row, atol=1e-5, rtol=1e-5)


def test_batched_left_padding_equals_each_text_alone(trained, data):
    clf = load_classifier(trained / "best")
    texts = [json.loads(line)["text"] for line in data["val"].read_text().splitlines()[:9]]
    together = clf.logits(texts, batch_size=9)
    alone = torch.cat([clf.logits([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_predict_and_eval_commands(trained, data, tmp_path, capsys):
    assert main(["predict", "--model", str(trained / "best"), "--data", str(data["val"]),
                 "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and all(r["predicted_label"] == max(r["probs"], key=r["probs"].get) for r in rows)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 and r["score"] == r["probs"][r["predicted_label"]]
               for r in rows)
    capsys.readouterr()
    assert main(["eval", "--task", "sequence-classification", "--model", str(trained / "best"),
                 "--data", str(data["val"]), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    y_true, y_pred = [r["label"] for r in rows], [r["predicted_label"] for r in rows]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))


def test_stopped_and_resumed_run_equals_the_straight_run(data, tmp_path, capsys):
    common = ["--max-steps", "12", "--eval-every", "4", "--save-every", "4", "--dropout", "0.1"]
    assert train(capsys, tmp_path / "a", data, *common)[0] == 0
    assert train(capsys, tmp_path / "b", data, *common, "--stop-after", "6")[0] == 0
    assert train(capsys, tmp_path / "b", data, *common, "--resume")[0] == 0
    # b also validated where its first session stopped (step 6); that validation never competes for best/
    a, b = records(tmp_path / "a"), [r for r in records(tmp_path / "b") if "val_loss" not in r or r["step"] % 4 == 0]
    key = ("step", "loss", "val_loss", "accuracy")
    assert [[r.get(k) for k in key] for r in a] == [[r.get(k) for k in key] for r in b]
    assert json.loads((tmp_path / "a" / "best" / "best.json").read_text())["step"] == \
        json.loads((tmp_path / "b" / "best" / "best.json").read_text())["step"]


def test_lora_classifier_loads_in_peft_with_our_logits(data, tmp_path, capsys):
    rc, out, err = train(capsys, tmp_path / "lora", data, "--max-steps", "8", "--eval-every", "4",
                         "--lr", "3e-3", "--lora", "r=4,alpha=8")
    assert rc == 0, err
    best = tmp_path / "lora" / "best"
    assert json.loads((best / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    clf = load_classifier(adapter=best)
    texts = [json.loads(line)["text"] for line in data["val"].read_text().splitlines()[:4]]
    ours = clf.logits(texts)
    from optlm.bundled import bundled_model_path

    task = json.loads((best / "task.json").read_text())
    base = transformers.OPTForSequenceClassification.from_pretrained(
        bundled_model_path(), num_labels=task["num_labels"], id2label={int(k): v for k, v in task["id2label"].items()})
    ref = peft.PeftModel.from_pretrained(base, best).eval()
    tok = transformers.AutoTokenizer.from_pretrained(best)
    with torch.no_grad():
        for text, row in zip(texts, ours, strict=True):
            torch.testing.assert_close(ref(**tok(text, return_tensors="pt")).logits[0], row, atol=1e-5, rtol=1e-5)


def test_a_lora_classifier_on_an_int8_base_trains_its_float_head(data, tmp_path, capsys):
    rc, out, err = train(capsys, tmp_path / "q", data, "--max-steps", "30", "--eval-every", "30", "--lr", "3e-3",
                         "--lora", "r=8", "--quantize", "int8")
    assert rc == 0, err
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "best" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.score.weight" in f.keys()  # the head trained whole, in float
    assert records(tmp_path / "q")[-1]["accuracy"] > 0.9
    capsys.readouterr()
    assert main(["eval", "--task", "sequence-classification", "--adapter", str(tmp_path / "q" / "best"), "--data",
                 str(data["val"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.9


def test_a_bottleneck_classifier_trains_and_saves_its_head(data, tmp_path, capsys):
    rc, out, err = train(capsys, tmp_path / "b", data, "--max-steps", "30", "--eval-every", "30", "--lr", "3e-3",
                         "--adapter", "bottleneck,reduction=16")
    assert rc == 0, err
    from safetensors import safe_open

    best = tmp_path / "b" / "best"
    with safe_open(best / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert records(tmp_path / "b")[-1]["accuracy"] > 0.9
    capsys.readouterr()  # loaded back onto the base, the trained head classifies as well (a random one: ~1/3)
    assert main(["eval", "--task", "sequence-classification", "--adapter", str(best), "--data", str(data["val"]),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.9


def test_multilabel_and_regression_runs(data, tmp_path, capsys):
    root = data["root"]
    multi = {k: write_rows(root / f"m_{k}.jsonl", n, s, lambda t, r: [t] + (["long"] if r.random() < 0.5 else []))
             for k, n, s in (("train", 80, 2), ("val", 20, 3))}
    rc, out, err = train(capsys, tmp_path / "m", multi, "--max-steps", "6", "--eval-every", "6")
    assert rc == 0, err
    last = records(tmp_path / "m")[-1]
    assert {"accuracy", "micro_f1", "macro_f1"} <= set(last) and set(last["per_label"]) == {"farm", "long", "sea",
                                                                                                "war"}
    reg = {k: write_rows(root / f"r_{k}.jsonl", n, s, lambda t, r: {"sea": 0.5, "war": 1.5, "farm": 2.25}[t])
           for k, n, s in (("train", 80, 4), ("val", 20, 5))}
    rc, out, err = train(capsys, tmp_path / "r", reg, "--max-steps", "6", "--eval-every", "6")
    assert rc == 0, err
    assert {"mse", "mae", "r2"} <= set(records(tmp_path / "r")[-1])
    assert json.loads((tmp_path / "r" / "best" / "best.json").read_text())["metric"] == "val_loss"


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, val_rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], None, "train.jsonl line 2 has no field 'label'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}],
     "val.jsonl line 1: label 'z' is not one of the model's classes (x, y)"),
    ([], None, "train.jsonl is empty"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 3}], None, "train.jsonl line 1: label 'x' is a string, "
                                                                     "but line 2's is a number"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, "a classifier needs at least two classes"),
    ([{"text": "a", "label": True}], None, "train.jsonl line 1: label True is neither"),
    ([{"body": "a", "label": "x"}], None, "train.jsonl line 1 has no string field 'text'"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, rows, val_rows, message):
    def write(name, items):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in items))
        return tmp_path / name

    files = {"train": write("train.jsonl", rows),
             "val": write("val.jsonl", val_rows or [{"text": "v", "label": "x"}, {"text": "w", "label": "y"}])}
    rc, out, err = train(capsys, tmp_path / "out", files, "--max-steps", "2", "--warmup-steps", "1")
    assert rc == 1 and message in err, err
    assert err.count("\n") == 1 and err.startswith("optlm train: error: ")


def test_classification_flags_are_checked(data, tmp_path, capsys):
    rc, _, err = train(capsys, tmp_path / "o", data, "--class-weights", "pirate=2")
    assert rc == 1 and "LABEL=WEIGHT pairs over the classes (farm, sea, war)" in err
    rc, _, err = train(capsys, tmp_path / "o2", data, "--best-metric", "bleu", "--max-steps", "2", "--eval-every", "2")
    assert rc == 1 and "--best-metric bleu" in err and "macro_f1" in err
    rc = main(["train", "--model", "opt-gutenberg", "--data", str(data["train"]), "--out", str(tmp_path / "o3"),
               "--class-weights", "balanced", "--quiet"])
    assert rc == 1 and "--class-weights applies to --task sequence-classification" in capsys.readouterr().err
    rc = main(["predict", "--model", "opt-gutenberg", "--data", str(data["val"])])
    assert rc == 1 and "has no sequence-classification head (score.weight)" in capsys.readouterr().err


def test_csv_and_tsv_rows_train_and_name_their_lines(data, tmp_path, capsys):
    import csv

    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        files = {}
        for split in ("train", "val"):
            rows = [json.loads(line) for line in data[split].read_text().splitlines()]
            rows[0]["text"] = 'with "quotes", a comma\nand a line break'  # quoted in the file, read back whole
            files[split] = tmp_path / f"{split}{suffix}"
            with open(files[split], "w", newline="") as f:
                writer = csv.DictWriter(f, ["text", "label"], delimiter=delimiter)
                writer.writeheader()
                writer.writerows(rows)
        first = labelled.read_rows(files["val"], "text", "label")[0]
        assert first.text == 'with "quotes", a comma\nand a line break' and first.label == rows[0]["label"]
        rc, out, err = train(capsys, tmp_path / f"run{suffix}", files, "--max-steps", "4", "--eval-every", "4")
        assert rc == 0, err
        assert set(records(tmp_path / f"run{suffix}")[-1]["per_label"]) == {"farm", "sea", "war"}
    (tmp_path / "bad.csv").write_text("text,label\na,x\nb,\nc,y\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3 has no field 'label'"):
        labelled.read_rows(tmp_path / "bad.csv", "text", "label")


def test_labels_of_each_kind():
    rows = [labelled.Row("t", v, i) for i, v in enumerate([3, 1, 2.0, 10], 1)]
    assert labelled.infer_problem_type(rows, "f") == "single_label_classification"
    assert labelled.label_names(rows, "single_label_classification") == ["1", "2", "3", "10"]  # by value
    assert labelled.encode_labels(rows, "single_label_classification", {"1": 0, "2": 1, "3": 2, "10": 3},
                                  "f").tolist() == [2, 0, 1, 3]
    assert labelled.infer_problem_type([labelled.Row("t", 0.5, 1)], "f") == "regression"
    assert labelled.infer_problem_type([labelled.Row("t", ["a", "b"], 1)], "f") == "multi_label_classification"
