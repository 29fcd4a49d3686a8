"""BLEU and chrF come from sacrebleu and equal its command line on the same files."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from scratchlm.errors import DataError
from scratchlm.eval.bleu import corpus_scores

pytest.importorskip("sacrebleu")


def test_scores_equal_the_sacrebleu_cli(tmp_path, shared_data):
    refs = (shared_data / "multi30k" / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:200]
    # hypotheses: references with some words dropped or swapped, so the scores are far from 0 and 100
    hyps = [" ".join(r.split()[::2]) if i % 3 else r.replace("a ", "the ", 1) for i, r in enumerate(refs)]
    (tmp_path / "ref.en").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "hyp.en").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ours = corpus_scores(hyps, refs)
    printed = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.en"), "-i", str(tmp_path / "hyp.en"),
         "-m", "bleu", "chrf", "-b", "-w", "6"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cli = re.findall(r"\d+\.\d+", printed)  # "[\n 31.123456,\n 55.654321\n]": BLEU, then chrF
    assert len(cli) == 2, printed
    assert ours["bleu"] == pytest.approx(float(cli[0]), abs=1e-5)
    assert ours["chrf"] == pytest.approx(float(cli[1]), abs=1e-5)
    assert 10 < ours["bleu"] < 90 and ours["sentences"] == 200
    assert ours["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "chrF2" in ours["chrf_signature"] or "nc:6" in ours["chrf_signature"]
    assert corpus_scores(refs, refs)["bleu"] == pytest.approx(100.0)


def test_misaligned_or_empty_inputs_are_refused():
    with pytest.raises(DataError, match="2 translations but 1 references"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no sentences"):
        corpus_scores([], [])
