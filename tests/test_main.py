"""experiments/main.py at micro scale: every stage runs and writes report.md; a second run without
--resume fails before writing anything; --resume on a finished job redoes nothing."""
import json
import os

import pytest

from experiments import main as main_job

KW = dict(entities=40, corpus_bytes="200K", vocab_size=400, tokenizer_bytes="150K", seq_len=64, batch_size=8,
          steps=4, lr=3e-3, sft_steps=3, sft_conversations=100, n_per_row=2, rl_steps=0, rlhf=False, honesty=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("main") / "run"
    return out, main_job.run(main_job.MainConfig(out_dir=str(out), **KW))


def test_every_stage_runs_and_reports(job):
    out, res = job
    report = (out / "report.md").read_text()
    for section in ("## samples", "## phenomena", "## SFT", "## assistant evaluation"):
        assert section in report, section
    state = json.loads((out / main_job.STATE_FILE).read_text())
    assert set(main_job.STAGES[:6]) <= set(state) and not {"rl", "rlhf", "honesty"} & set(state)
    assert (out / "sft" / "config.json").exists() and (out / "sft" / "assistant.json").exists()
    figures = state["assistant"]["figures"]
    assert "format_rate" in figures and "base_format_rate" in figures


def test_rerun_without_resume_writes_nothing(job):
    out, _ = job
    tok = out / "tokenizer.zipchat.json"
    before = (tok.stat().st_mtime_ns, (out / "report.md").read_text())
    with pytest.raises(ValueError, match="--resume"):
        main_job.run(main_job.MainConfig(out_dir=str(out), **KW))
    assert (tok.stat().st_mtime_ns, (out / "report.md").read_text()) == before


def test_resume_of_a_finished_job_only_rewrites_the_report(job):
    out, _ = job
    evals = (out / "evals.jsonl").read_text()
    samples = (out / "samples.txt").read_text()
    os.remove(out / "report.md")
    main_job.run(main_job.MainConfig(out_dir=str(out), resume=True, **KW))
    assert (out / "report.md").exists()
    assert (out / "evals.jsonl").read_text() == evals and (out / "samples.txt").read_text() == samples


def test_bad_flags_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--preset"):
        main_job.run(main_job.MainConfig(out_dir=str(tmp_path / "x"), preset="huge", **KW))
    with pytest.raises(ValueError, match="--steps"):
        main_job.MainConfig(out_dir=str(tmp_path / "x"), **{**KW, "steps": 0})
    with pytest.raises(ValueError, match="--corpus_bytes"):
        main_job.MainConfig(out_dir=str(tmp_path / "x"), **{**KW, "corpus_bytes": "lots"})
    assert not (tmp_path / "x").exists()
