"""Labeled evaluation data: the formats (TSV / JSONL classification, STS, retrieval; the built-in paraphrase
pairs), the gold labels built from them, and bad input -- each one line naming file, line and what was expected,
exit 2 before any weights load."""

import json
import re

import numpy as np
import pytest
from conftest import data_cfg
from test_bad_input import assert_clean_error, leftovers

from compiler.core.errors import RecipeError
from compiler.core.paths import BUILTIN_DATA_DIR
from compiler.stages.data import evaluation_set, load_data, read_rows


def test_builtin_evaluation_is_paraphrase_retrieval(tiny_bert):
    d = load_data(data_cfg(calibration_samples=4, evaluation_samples=33, seq_len=16), tiny_bert.tokenizer,
                  tiny_bert.input_names)
    lines = (BUILTIN_DATA_DIR / "evaluation.txt").read_text().splitlines()
    assert d.evaluation.texts == lines[:32]  # an odd count drops the sentence whose partner is left out
    labels = d.evaluation_labels
    assert labels.task == "retrieval" and len(labels) == 32
    np.testing.assert_array_equal(labels.gold[:4], [1, 0, 3, 2])  # each sentence's partner: the other line
    np.testing.assert_array_equal(labels.queries, labels.candidates)


def test_plain_text_file_has_no_labels(tmp_path, tiny_bert):
    f = tmp_path / "plain.txt"
    f.write_text("one sentence.\nanother one.\na third.\n")
    d = load_data(data_cfg(evaluation_file=str(f), calibration_samples=2), tiny_bert.tokenizer, tiny_bert.input_names)
    assert d.evaluation_labels is None and len(d.evaluation) == 3


def test_tsv_and_jsonl_name_their_task_by_columns(tmp_path):
    cls = tmp_path / "c.tsv"
    cls.write_text("label\ttext\npositive\tgreat food.\nnegative\tawful food.\n")  # column order free
    rows = read_rows(cls, "auto", "data.evaluation_file")
    texts, labels = evaluation_set(rows, 10, {0: "negative", 1: "positive"})
    assert texts == ["great food.", "awful food."] and labels.labels.tolist() == [1, 0]
    ids = tmp_path / "ids.tsv"
    ids.write_text("text\tlabel\nok.\t1\n")  # a class id works as well as its name
    assert evaluation_set(read_rows(ids, "auto", "k"), 10, {0: "negative", 1: "positive"})[1].labels.tolist() == [1]

    sts = tmp_path / "s.jsonl"
    sts.write_text("\n".join(json.dumps(r) for r in [{"sentence1": "a cat.", "sentence2": "a kitten.", "score": 4.5},
                                                     {"sentence1": "a car.", "sentence2": "a song.", "score": "0.5"}]))
    texts, labels = evaluation_set(read_rows(sts, "auto", "k"), 10)
    assert texts == ["a cat.", "a kitten.", "a car.", "a song."]
    assert labels.task == "sts" and labels.pairs.tolist() == [[0, 1], [2, 3]] and labels.scores.tolist() == [4.5, 0.5]

    ret = tmp_path / "r.data"
    ret.write_text("query\tpositive\nwhere is it?\tit is here.\nwho came?\tshe came.\nwhen?\tnow.\n")
    texts, labels = evaluation_set(read_rows(ret, "tsv", "k"), 2)  # data.format=tsv: the extension is ignored
    assert texts == ["where is it?", "it is here.", "who came?", "she came."]
    assert labels.queries.tolist() == [0, 2] and labels.candidates.tolist() == [1, 3] and labels.gold.tolist() == [0, 1]


@pytest.mark.parametrize("name,content,fmt,message", [
    ("bad.tsv", "text\tlabel\ngood.\tpositive\nno label here\n", "auto",
     "{path}:3: 1 tab-separated fields, expected 2 (text, label) -- fix that row"),
    ("bad.tsv", "text\tlabel\ngood.\t \n", "auto", "{path}:2: empty or missing 'label' -- every row needs text, label"),
    ("bad.tsv", "sentence1\tsentence2\tscore\na.\tb.\thigh\n", "auto",
     "{path}:2: score 'high' is not a number -- give the gold similarity as a number"),
    ("bad.tsv", "sentence\tgold\na.\tb.\n", "auto",
     ("{path}:1: the first row must be a header naming the columns, e.g. text<TAB>label; it reads "
      "'sentence<TAB>gold', which names no task -- add a header row (text<TAB>label | "
      "sentence1<TAB>sentence2<TAB>score | query<TAB>positive), or give data.columns=[text,label] for a file "
      "without one")),
    ("bad.jsonl", '{"text": "a.", "label": "x"}\n{"text": "b.", "label": \n', "auto", "{path}:2: not a JSON object"),
    ("bad.jsonl", '{"text": "a.", "label": "x"}\n["b.", "x"]\n', "auto", "{path}:2: a JSON list, not an object"),
    ("odd.txt", "one.\ntwo.\nthree.\n", "paired_text", "{path}:3: paired_text needs an even number of sentences"),
])
def test_malformed_rows_name_file_line_and_expectation(tmp_path, name, content, fmt, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(RecipeError) as e:
        read_rows(f, fmt, "data.evaluation_file")
    assert str(e.value).startswith("data.evaluation_file: " + message.format(path=f)), str(e.value)


def test_headerless_tsv_reads_with_data_columns(tmp_path):
    """Issue 17.5: `sentence<TAB>label` rows with no header, the commonest shape of such files, read with
    data.columns naming the fields (two or three columns); a header equal to data.columns is still skipped."""
    cls = tmp_path / "c.tsv"
    cls.write_text("I loved this movie.\tpositive\nDull and long.\tnegative\n")
    rows = read_rows(cls, "auto", "data.evaluation_file", columns=["text", "label"])
    assert rows.task == "classification" and rows.lines == [1, 2]
    assert rows.examples == [("I loved this movie.", "positive"), ("Dull and long.", "negative")]
    sts = tmp_path / "s.tsv"
    sts.write_text("a cat sat.\ta kitten sat.\t4.5\na car.\ta song.\t0.5\n")
    rows = read_rows(sts, "auto", "k", columns=["sentence1", "sentence2", "score"])
    assert rows.task == "sts" and rows.examples[1] == ("a car.", "a song.", 0.5)
    headed = tmp_path / "h.tsv"
    headed.write_text("text\tlabel\ngood.\tpositive\n")
    assert read_rows(headed, "auto", "k", columns=["text", "label"]).examples == [("good.", "positive")]
    with pytest.raises(RecipeError) as e:  # data.columns that name no task
        read_rows(cls, "auto", "k", columns=["sentence", "gold"])
    assert str(e.value).startswith("data.columns: columns sentence, gold name no task -- use the columns text,label")


def test_headerless_tsv_without_data_columns_says_a_header_is_needed(tmp_path):
    f = tmp_path / "reviews.tsv"
    f.write_text("I loved every minute of this film, the acting and the music too.\tpositive\nDull.\tnegative\n")
    with pytest.raises(RecipeError) as e:
        read_rows(f, "auto", "data.evaluation_file")
    assert str(e.value) == (
        f"data.evaluation_file: {f}:1: the first row must be a header naming the columns, e.g. text<TAB>label; it "
        "reads 'I loved every minute of this film, the acting and the mus...', which names no task -- add a header "
        "row (text<TAB>label | sentence1<TAB>sentence2<TAB>score | query<TAB>positive), or give "
        "data.columns=[text,label] for a file without one")


def test_check_samples_keeps_pairs_whole(tiny_bert):
    d = load_data(data_cfg(calibration_samples=2, evaluation_samples=40, seq_len=16), tiny_bert.tokenizer,
                  tiny_bert.input_names, evaluation_limit=7)
    assert len(d.evaluation) == 6 and d.evaluation_labels.gold.tolist() == [1, 0, 3, 2, 5, 4]


def test_labeled_calibration_file_calibrates_on_its_texts(tmp_path, tiny_bert):
    f = tmp_path / "cal.tsv"
    f.write_text("sentence1\tsentence2\tscore\na cat sat.\ta kitten sat.\t4\na car.\ta song.\t0\n")
    d = load_data(data_cfg(calibration_file=str(f), calibration_samples=3, seq_len=16), tiny_bert.tokenizer,
                  tiny_bert.input_names)
    assert d.calibration.texts == ["a cat sat.", "a kitten sat.", "a car."]


# -- bad input through the CLI: exit 2, one line, no run directory, before any weights load ------------

CLS = ["model=tiny_bert", "model.task=classification", "recipe=fp32", "target=ort"]


@pytest.mark.parametrize("case,args,content,text", [
    ("malformed row", CLS, "text\tlabel\ngood.\tLABEL_1\nbad row\n",
     "data.evaluation_file: {file}:3: 1 tab-separated fields, expected 2 (text, label)"),
    ("unknown label", CLS, "text\tlabel\ngood.\tLABEL_1\nbad.\tpositive\n",
     "data.evaluation_file: {file}:3: label 'positive' is not in the model's label set (0=LABEL_0, 1=LABEL_1) -- "),
    ("task_metric that does not fit the task", CLS + ["recipe.gate.task_metric=spearman"], "text\tlabel\na.\t1\n",
     ("recipe.gate.task_metric: 'spearman' does not fit the classification task of {file} -- use one of "
      "accuracy, macro_f1")),
    ("budget below 0", CLS + ["recipe.gate.max_task_drop=-0.01"], "text\tlabel\na.\t1\n",
     "recipe.gate.max_task_drop: -0.01 is below 0 -- give the largest allowed drop"),
    ("labels for a model that has none", ["model=tiny_bert", "recipe=fp32", "target=ort"], "text\tlabel\na.\t1\n",
     "data.evaluation_file: {file} holds classification rows (text, label) but model.task=embedding -- "),
    ("a budget without labels", ["model=tiny_bert", "recipe=fp32", "target=ort", "data.format=text",
                                 "recipe.gate.max_task_drop=0.01"], "plain sentence.\n",
     "recipe.gate.max_task_drop: needs gold labels but {file} is plain text -- "),
    ("unknown format", ["model=tiny_bert", "recipe=fp32", "target=ort", "data.format=csv"], "a.\n",
     "data.format: bad value 'csv' -- use one of auto, text, paired_text, tsv, jsonl"),
    ("header-less file", CLS, "good film.\tLABEL_1\n",
     "data.evaluation_file: {file}:1: the first row must be a header naming the columns, e.g. text<TAB>label; it "
     "reads 'good film.<TAB>LABEL_1', which names no task -- add a header row"),
    ("data.columns on plain text", ["model=tiny_bert", "recipe=fp32", "target=ort", "data.format=text",
                                    "data.columns=[text,label]"], "plain sentence.\n",
     "data.columns: names the fields of a TSV without a header, but {file} is read as text -- "),
], ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_bad_labeled_input_is_one_line_exit_2(qcompile, tmp_path, case, args, content, text):
    f = tmp_path / "eval.tsv"
    f.write_text(content)
    r = qcompile(*args, f"data.evaluation_file={f}", timeout=300)
    assert_clean_error(r, 2, text.format(file=f))
    assert not re.search(r"^  load +\d", r.stdout, flags=re.M)  # refused at validation: no model was loaded
    assert leftovers(tmp_path) == []


def test_headerless_classifier_file_builds_with_data_columns(tmp_path):
    """Through validation and the load stage: data.columns=[text,label] on the command line."""
    from conftest import compose

    from compiler.stages.models import label_names
    from compiler.stages.validate import validate

    f = tmp_path / "eval.tsv"
    f.write_text("good film.\tLABEL_1\nbad film.\tLABEL_0\nfine.\t1\n")
    spec = validate(compose(*CLS, f"data.evaluation_file={f}", "data.columns=[text,label]"))
    assert spec.data.columns == ["text", "label"]
    from compiler.stages.models import load_model

    model = load_model(spec.model)
    d = load_data(spec.data, model.tokenizer, model.input_names, label_names=label_names(spec.model),
                  model_task="classification")
    assert d.evaluation.texts == ["good film.", "bad film.", "fine."] and d.evaluation_labels.labels.tolist() == [1, 0, 1]


def test_builtin_task_metric_of_the_wrong_task(qcompile, tmp_path):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", "recipe.gate.task_metric=accuracy", timeout=300)
    assert_clean_error(r, 2, "recipe.gate.task_metric: 'accuracy' does not fit the retrieval task of ")
    assert "use one of accuracy_at_1, mrr" in r.stderr


def test_classifier_without_labels_is_gated_on_fidelity(tmp_path, caplog):
    """A classifier with no labeled file builds (issue 17.1: the built-in paraphrase pairs used to refuse it at
    validation): the built-in sentences are read as plain text, the gate checks label agreement and KL against
    fp32, and one console line says what a text,label file would add."""
    import logging

    from conftest import FAST, compose

    from compiler.pipeline import run_build
    from compiler.rundir.cache import open_cache
    from compiler.stages.validate import validate

    spec = validate(compose("model=tiny_distilbert", "model.task=classification", "recipe=int8_static",
                            "target=ort", f"cache.dir={tmp_path / 'cache'}", "bench.enabled=false", *FAST))
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING):
        report = run_build(spec, tmp_path / "run", cache=open_cache(spec.cache))
    check = report["check"]
    assert check["passed"] and "task" not in check and report["data"]["evaluation_task"] is None
    assert {"label_agreement", "kl_target_reference_mean"} <= set(check["fidelity"])
    lines = (BUILTIN_DATA_DIR / "evaluation.txt").read_text().splitlines()
    assert check["samples"] == 32 == report["data"]["evaluation_samples"] and len(lines) >= 32
    said = [r.getMessage() for r in caplog.records if "without labeled data" in r.getMessage()]
    assert said == ["model.task=classification without labeled data: the gate checks fidelity to fp32 (label "
                    "agreement, KL) on the built-in sentences; data.evaluation_file=<a TSV with a text,label header> "
                    "adds accuracy / macro_f1"]


def test_builtin_sentences_are_plain_text_for_a_classifier(tiny_bert):
    d = load_data(data_cfg(calibration_samples=4, evaluation_samples=5, seq_len=16), tiny_bert.tokenizer,
                  tiny_bert.input_names, model_task="classification")
    lines = (BUILTIN_DATA_DIR / "evaluation.txt").read_text().splitlines()
    assert d.evaluation.texts == lines[:5] and d.evaluation_labels is None  # an odd count: no pair to keep whole
