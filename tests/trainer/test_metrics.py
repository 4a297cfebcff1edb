"""Every metric against values worked out by hand, the task kind inferred from data, and metrics that do not fit."""

import math

import pytest
from loraplex.trainer.metrics import (
    KIND_METRICS,
    MetricError,
    check_metric_fits,
    compute_metrics,
    infer_kind,
    metrics_for,
)


def test_exact_match_counts_equal_strings_and_accuracy_equal_stripped_labels():
    got = compute_metrics(["exact_match", "accuracy"], [" a", " b\n", "c"], [" a", " b", " b"])
    assert got == pytest.approx({"exact_match": 1 / 3, "accuracy": 2 / 3})


def test_macro_f1_averages_per_label_f1_and_counts_a_non_label_as_a_miss():
    # label a: TP 1, FP 1 (last row), FN 0 -> P 1/2, R 1, F1 2/3
    # label b: TP 1, FP 0, FN 2 (rows 3 and 4; 'c' is no label) -> P 1, R 1/3, F1 1/2
    got = compute_metrics("macro_f1", ["a", "b", "c", "a"], ["a", "b", "b", "b"])
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-6)
    # A label that neither occurs nor is predicted (absent from this eval split) is left out of the mean;
    # one that is predicted but never expected counts with F1 0.
    assert compute_metrics("macro_f1", ["a", "b"], ["a", "b"], labels=["a", "b", "c"])["macro_f1"] == 1.0
    assert compute_metrics("macro_f1", ["a", "c"], ["a", "b"], labels=["a", "b", "c"])["macro_f1"] == pytest.approx(
        1 / 3
    )
    assert compute_metrics("macro_f1", ["x", "y"], ["x", "y"])["macro_f1"] == pytest.approx(1.0)


def test_rouge_l_is_the_mean_lcs_f_measure():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens: P 5/5, R 5/6, F 2PR/(P+R) = 10/11.
    got = compute_metrics("rouge_l", ["the cat on the mat", "Hello, world"], ["the cat sat on the mat", "hello world"])
    assert got["rouge_l"] == pytest.approx((10 / 11 + 1.0) / 2, abs=1e-6)  # lowercased, punctuation dropped
    assert compute_metrics("rouge_l", [""], ["x y"])["rouge_l"] == 0.0


def test_bleu_is_corpus_bleu_with_effective_order():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): BLEU = (1/12) ** (1/4).
    got = compute_metrics("bleu", ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got["bleu"] == pytest.approx((1 / 12) ** 0.25, abs=1e-4)
    # Three-word completions have no 4-grams: scored on orders 1-3 instead of 0.
    # Corpus counts: unigrams 4/5, bigrams 2/3, trigrams 1/1 -> (8/15) ** (1/3).
    short = compute_metrics("bleu", ["tunnel apple violin", "a b"], ["tunnel apple violin", "a c"])
    assert short["bleu"] == pytest.approx((8 / 15) ** (1 / 3), abs=1e-4)
    # A hypothesis half the reference's length: brevity penalty exp(1 - 6/3), unigram/bigram/trigram precision 1.
    assert compute_metrics("bleu", ["the cat sat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(
        math.exp(1 - 2), abs=1e-4
    )


def test_perplexity_comes_from_the_eval_loss():
    assert compute_metrics("perplexity", [], [], eval_loss=math.log(4.0)) == {"perplexity": pytest.approx(4.0)}
    with pytest.raises(MetricError, match="perplexity comes from the eval loss"):
        compute_metrics("perplexity", ["a"], ["a"])


def test_a_kind_names_all_its_metrics_primary_first():
    got = compute_metrics("classification", ["a", "b"], ["a", "a"], eval_loss=0.0)
    assert list(got) == list(KIND_METRICS["classification"]) == ["accuracy", "macro_f1", "exact_match", "perplexity"]
    assert list(compute_metrics("generation", ["a b"], ["a b"], eval_loss=0.0)) == ["rouge_l", "bleu", "exact_match",
                                                                                    "perplexity"]  # fmt: skip
    assert metrics_for("exact_match", "generation") == ["exact_match", "rouge_l", "bleu", "perplexity"]
    assert metrics_for("auto", "classification")[0] == "accuracy"
    with pytest.raises(MetricError, match="unknown metric 'f1'"):
        compute_metrics(["f1"], ["a"], ["a"])


def test_the_kind_is_inferred_from_the_completions():
    assert infer_kind([" positive", " negative"] * 20) == "classification"
    assert infer_kind([f" word{i}" for i in range(40)]) == "generation"  # every completion its own
    assert infer_kind([f" w{i % 30}" for i in range(300)]) == "generation"  # 30 values: more than a small set
    assert infer_kind([" yes"] * 10) == "generation"  # one value is no choice


def test_a_label_metric_on_generated_text_names_the_task_and_the_fix():
    assert check_metric_fits("macro_f1", [" a", " b", " a", " b"], where="task 't'") == "classification"
    assert check_metric_fits("rouge_l", [" a", " b"] * 5, where="task 't'") == "classification"
    with pytest.raises(MetricError, match=r"task 'rev': metric 'accuracy' needs a label task .* 40 records have 40 "
                                          r"distinct completions; use metric: rouge_l, bleu or exact_match"):
        check_metric_fits("accuracy", [f" w{i}" for i in range(40)], where="task 'rev'")
    with pytest.raises(MetricError, match="all 3 records have the same completion 'yes'"):
        check_metric_fits("macro_f1", [" yes"] * 3, where="task 't'")
