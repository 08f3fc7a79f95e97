"""The paper's four ablations, end to end on the tiny preset, and the comparison command."""

from __future__ import annotations

import json
import shutil

import pytest

from launch.compare import compare
from launch.pipeline import Inputs, Pipeline, stages_for
from launch.presets import pipeline_preset
from launch.report import write_report

pytestmark = pytest.mark.slow

SMALL_EVAL = dict(eval_generations=1, eval_max_new_tokens=4, eval_items_per_benchmark=2)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny run through synthesize and label (the full method's first half)."""
    root = tmp_path_factory.mktemp("full")
    pipe = Pipeline(pipeline_preset("tiny", **SMALL_EVAL), root, Inputs())
    for stage in ("synthesize", "label"):
        pipe.run_stage(stage)
    return root


def test_without_knowledge_injection(tmp_path):
    """alpha=0: every offline item comes from its pair of seed questions, none from retrieved profiles."""
    cfg = pipeline_preset("tiny", alpha=0.0)
    pipe = Pipeline(cfg, tmp_path, Inputs())
    result = pipe.run_stage("synthesize")
    items = _lines(tmp_path / "synthesize" / "synthetic.jsonl")
    seeds = {s.id: s for s in pipe.seed_questions()}
    assert result["summary"]["rare_ratio"] == 0.0 and result["summary"]["alpha"] == 0.0
    assert len(items) == cfg.num_questions
    for it in items:
        prov = it["provenance"]
        assert prov["entity"] is None and prov["retrieved_doc_ids"] == [] and prov["generator"] == "offline-hpo-seeds"
        first, second = (seeds[i] for i in prov["seed_ids"])
        assert it["question"] == first.question
        assert set(it["options"].values()) - set(first.options.values()) <= {second.options[second.answer]}
        assert it["options"][it["intended_answer"]] == first.options[first.answer]
    full = Pipeline(pipeline_preset("tiny", alpha=1.0), tmp_path / "rare", Inputs())
    full.run_stage("synthesize")
    assert all(it["provenance"]["entity"] for it in _lines(tmp_path / "rare" / "synthesize" / "synthetic.jsonl"))


def test_without_pseudo_label_filtering(labelled, tmp_path):
    root = tmp_path / "nofilter"
    shutil.copytree(labelled, root)
    shutil.rmtree(root / "label")
    pipe = Pipeline(pipeline_preset("tiny", label_threshold=0.0), root, Inputs())
    summary = pipe.run_stage("label")["summary"]
    votes = _lines(root / "label" / "pseudo_label_votes.jsonl")
    assert summary["kept"] == sum(v["label"] is not None for v in votes) > 0
    assert summary["threshold"] == 0.0 and summary["keep"] == "gt"
    manifest = json.loads((root / "label" / "manifest.json").read_text())
    assert manifest["config"]["label_threshold"] == 0.0 and manifest["config"]["label_keep"] == "gt"
    # the default filter keeps only the labels whose confidence exceeds 0.25
    default = _lines(labelled / "label" / "pseudo_label_votes.jsonl")
    assert [v["kept"] for v in default] == [v["label"] is not None and v["confidence"] > 0.25 for v in default]


def test_without_the_self_supervised_stage_and_single_stage_mixed(labelled, tmp_path):
    no_self = tmp_path / "no_self"
    shutil.copytree(labelled, no_self)
    cfg = pipeline_preset("tiny", skip_stages=("rl_self",), **SMALL_EVAL)
    assert stages_for(cfg) == ("synthesize", "label", "rl_sup", "eval", "export")
    pipe = Pipeline(cfg, no_self, Inputs())
    result = pipe.run_stage("rl_sup")
    manifest = json.loads((no_self / "rl_sup" / "manifest.json").read_text())
    assert result["summary"]["start_policy"] == "base" and not (no_self / "rl_self").exists()
    assert not any(k.startswith("stage:") for k in manifest["inputs"])  # starts from the base model
    assert manifest["config"]["skip_stages"] == ["rl_self"]
    assert result["summary"]["sources"] == {"holdout of medqa.json": {"read": 8, "used": 8, "cap": None,
                                                                      "skipped": 0}}

    mixed = tmp_path / "mixed"
    shutil.copytree(labelled, mixed)
    mcfg = pipeline_preset("tiny", rl_mode="mixed", mix_ratio=0.5, **SMALL_EVAL)
    assert stages_for(mcfg) == ("synthesize", "label", "rl_mixed", "eval", "export")
    mpipe = Pipeline(mcfg, mixed, Inputs())
    summary = mpipe.run_stage("rl_mixed")["summary"]
    kept = len(_lines(labelled / "label" / "pseudo_labelled.jsonl"))
    assert summary["synthetic_items"] == summary["real_items"] == min(kept, 8)
    assert summary["items"] == summary["synthetic_items"] + summary["real_items"] - summary["dropped_long_prompts"]
    assert json.loads((mixed / "rl_mixed" / "manifest.json").read_text())["config"]["mix_ratio"] == 0.5

    # both evaluate base and their trained policy; the report and the comparison show them side by side
    for run, p in ((no_self, pipe), (mixed, mpipe)):
        ev = p.run_stage("eval")["summary"]
        assert ev["policies"] == ["base", "rl_sup" if run is no_self else "rl_mixed"]
        report = write_report(run).read_text()
        assert "| benchmark | base | " in report and "Method settings" in report
    assert "stage 2 starts from base" in write_report(no_self).read_text()
    assert "mix ratio 0.5" in write_report(mixed).read_text()
    paths = compare([no_self, mixed], tmp_path / "cmp")
    table = paths["markdown"].read_text()
    assert "| benchmark | no_self (base) | no_self (rl_sup) | mixed (rl_mixed) |" in table
    assert table.count("\n| ") == 1 + 6 + 1  # separator, six benchmarks, average
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no evaluation results"):
        compare([labelled], tmp_path / "cmp2")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "launch.compare", str(no_self), str(mixed), "--policy=base",
                           f"--out={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| benchmark | no_self (base) | mixed (base) |" in (tmp_path / "cli" / "comparison.md").read_text()


def test_stage2_reads_several_sources_with_caps(tmp_path):
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text("".join(json.dumps({"question": f"Q{i}?", "options": {"A": "a", "B": "b"},
                                         "answer_idx": "A"}) + "\n" for i in range(5)))
    medmcqa = tmp_path / "medmcqa.jsonl"
    medmcqa.write_text("".join(json.dumps({"id": f"m{i}", "question": f"M{i}?", "opa": "a", "opb": "b", "opc": "c",
                                           "opd": "d", "cop": 1}) + "\n" for i in range(4)))
    pipe = Pipeline(pipeline_preset("tiny"), tmp_path / "run",
                    Inputs(real_data=(f"{medqa}@3", str(medmcqa))))
    records, counts = pipe.real_records("rl_sup")
    assert counts == {"medqa.jsonl": {"read": 5, "used": 3, "cap": 3, "skipped": 0},
                      "medmcqa.jsonl": {"read": 4, "used": 4, "cap": None, "skipped": 0}}
    assert len(records) == 7 and len({r[0] for r in records}) == 7
    assert Inputs(real_data=("a.json,b.json", "c.json")).real_data == ("a.json", "b.json", "c.json")
    with pytest.raises(ValueError, match="cap after @"):
        Pipeline(pipeline_preset("tiny"), tmp_path / "r2", Inputs(real_data=(f"{medqa}@x",))).real_records("rl_sup")


def test_paper_presets_never_fall_back_to_the_offline_generator(tmp_path):
    paper = pipeline_preset("qwen3_8b_base")
    with pytest.raises(ValueError, match="--config.openai_base_url .* or --config.synth_generator=offline"):
        Pipeline(paper, tmp_path, Inputs()).generator()
    assert Pipeline(paper.replace(synth_generator="offline"), tmp_path, Inputs()).generator() == "offline"
    assert Pipeline(paper.replace(openai_base_url="http://127.0.0.1:1/v1"), tmp_path, Inputs()).generator() == "api"
    assert Pipeline(pipeline_preset("tiny"), tmp_path, Inputs()).generator() == "offline"
