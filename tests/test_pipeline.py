"""Pipeline stages over a run directory on the tiny preset: outputs, manifests, skip, refusal."""

from __future__ import annotations

import json

import pytest

from launch.pipeline import Inputs, Pipeline
from launch.presets import pipeline_preset
from launch.rundir import ManifestMismatch


def test_synthesize_and_label_then_skip_and_refuse(tmp_path):
    cfg = pipeline_preset("tiny")
    pipe = Pipeline(cfg, tmp_path, Inputs())
    result = pipe.run_stage("synthesize")
    items = [json.loads(x) for x in (tmp_path / "synthesize" / "synthetic.jsonl").read_text().splitlines()]
    assert len(items) == cfg.num_questions == result["summary"]["items"]
    assert all(it["intended_answer"] in it["options"] for it in items)

    pipe.run_stage("label")
    votes = [json.loads(x) for x in (tmp_path / "label" / "pseudo_label_votes.jsonl").read_text().splitlines()]
    assert len(votes) == cfg.num_questions and all(v["n"] == cfg.num_votes for v in votes)
    summary = json.loads((tmp_path / "label" / "label_summary.json").read_text())
    manifest = json.loads((tmp_path / "label" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["summary"] == summary
    assert manifest["inputs"]["model"] == "random:tiny" and "stage:synthesize" in manifest["inputs"]

    # a rerun skips both stages; a changed setting is refused, naming it
    again = Pipeline(cfg, tmp_path, Inputs())
    assert again.run_stage("synthesize") is None and again.run_stage("label") is None
    with pytest.raises(ManifestMismatch, match=r"stage 'synthesize' ran with different alpha"):
        Pipeline(cfg.replace(alpha=0.9), tmp_path, Inputs()).run_stage("synthesize")
    # settings of later stages do not touch finished earlier ones
    import dataclasses
    later = cfg.replace(eval_generations=3, rl_self=dataclasses.replace(cfg.rl_self, steps=5))
    assert Pipeline(later, tmp_path, Inputs()).run_stage("label") is None
    with pytest.raises(ManifestMismatch, match=r"stage 'label' ran with different num_votes"):
        Pipeline(cfg.replace(num_votes=2), tmp_path, Inputs()).run_stage("label")
    with pytest.raises(ManifestMismatch, match=r"stage 'rl_self' has not finished"):
        Pipeline(cfg, tmp_path, Inputs()).run_stage("export")


def test_rl_self_without_kept_labels_fails_clearly(tmp_path):
    # a random tiny model writes no readable answer: without letter recovery every label is dropped
    pipe = Pipeline(pipeline_preset("tiny", num_questions=2, num_votes=2, label_recover=False), tmp_path, Inputs())
    pipe.run_stage("synthesize")
    pipe.run_stage("label")
    with pytest.raises(ValueError, match=r"stage rl_self: no training items"):
        pipe.run_stage("rl_self")
    assert json.loads((tmp_path / "rl_self" / "manifest.json").read_text())["status"] == "running"


def test_stage_order_and_names(tmp_path):
    pipe = Pipeline(pipeline_preset("tiny"), tmp_path, Inputs())
    with pytest.raises(ManifestMismatch, match=r"stage 'synthesize' has not finished"):
        pipe.run_stage("label")
    with pytest.raises(ValueError, match=r"unknown stage 'train'"):
        pipe.run_stage("train")
    with pytest.raises(ValueError, match=r"rl_sup needs --real_data"):
        Pipeline(pipeline_preset("tiny", holdout_benchmark=None), tmp_path / "b", Inputs()).rl_sup()
    with pytest.raises(ValueError, match=r"synthesize needs --seeds"):
        Pipeline(pipeline_preset("tiny", holdout_benchmark=None), tmp_path / "c", Inputs()).seed_questions()


def test_real_data_formats_are_detected(tmp_path):
    from launch.pipeline import read_real_data
    (tmp_path / "q.jsonl").write_text(json.dumps(
        {"question": "Which?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer_idx": "B",
         "answer": "y"}) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"id": "m1", "question": "Which?", "opa": "x", "opb": "y", "opc": "z", "opd": "w", "cop": 3}) + "\n")
    (tmp_path / "e.json").write_text(json.dumps(
        [{"id": "e1", "question": "Which?\nA. x\nB. y", "gold": "A", "name": "toy"}]))
    assert [r.answer for r in read_real_data(tmp_path / "q.jsonl").load()] == ["B"]
    assert [r.answer for r in read_real_data(tmp_path / "m.jsonl").load()] == ["C"]
    assert [r.answer for r in read_real_data(tmp_path / "e.json").load()] == ["A"]
    # a broken first line: the format is read from the next lines, the reader reports the broken one
    good = json.dumps({"question": "Which?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"})
    (tmp_path / "broken.jsonl").write_text('{"question": "Whi\n' + good + "\n")
    data = read_real_data(tmp_path / "broken.jsonl")
    assert [r.answer for r in data.load()] == ["A"] and data.stats.skipped == {"bad_json": 1}
    (tmp_path / "x.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl: JSONL of neither MedQA"):
        read_real_data(tmp_path / "x.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no such file \(--real_data\)"):
        read_real_data(tmp_path / "missing.json")


def test_eval_stage_on_the_base_model(tmp_path):
    cfg = pipeline_preset("tiny", eval_items_per_benchmark=2, eval_generations=2, eval_max_new_tokens=8)
    pipe = Pipeline(cfg, tmp_path, Inputs())
    result = pipe.run_stage("eval")
    out = tmp_path / "eval" / "base"
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["protocol"] == "medssr" and results["config"]["policy"] == "base"
    assert set(results["benchmarks"]) == {"medqa", "medmcqa", "mmlu", "pubmedqa", "bioasq", "medbullets"}
    for name, b in results["benchmarks"].items():
        assert b["n"] == 2 and 0.0 <= b["accuracy_mean"] <= 1.0
        # 8 new tokens never state an answer: every prediction is the biased recovery decode,
        # among the file's gold letters
        assert all(p in b["allowed_letters"] for item in b["items"] for p in item["predictions"])
        assert b["recovered"] == 4 and b["skipped"] == {}
        rows = [json.loads((out / f"{name}_gen{g}.json").read_text()) for g in range(2)]
        assert [len(r) for r in rows] == [2, 2] and all(row["recovery_used"] for r in rows for row in r)
        log = json.loads((out / f"{name}.eval.log").read_text())
        assert log["average_accuracy"] == b["average_accuracy"] and log["num_generations"] == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["summary"]["policies"] == ["base"] and result["summary"]["protocol"] == "medssr"
    assert (out / "results.md").read_text().count("\n| ") >= 6


def test_eval_only_on_a_file_of_ones_own(tmp_path):
    """An eval-only run on a file without medqa.json beside it needs no held-out seeds; NEJM-style
    records (extra fields, five options) load, and --eval_filter keeps the marked subset."""
    recs = [{"id": f"nejm-{i}", "question": f"Case {i}?\nA. a\nB. b\nC. c\nD. d\nE. e", "gold": "ABCDE"[i % 5],
             "name": "NEJM", "answer_content": "x", "is_reasoning": i % 2 == 0, "reasoning_prob": 0.5}
            for i in range(5)]
    f = tmp_path / "nejm.json"
    f.write_text(json.dumps(recs))
    cfg = pipeline_preset("tiny", eval_generations=1, eval_max_new_tokens=4, eval_items_per_benchmark=None,
                          eval_filter="is_reasoning")
    pipe = Pipeline(cfg, tmp_path / "run", Inputs(benchmarks=str(f)))
    pipe.check_inputs(("eval",))
    pipe.run_stage("eval")
    b = json.loads((tmp_path / "run" / "eval" / "base" / "results.json").read_text())["benchmarks"]["nejm"]
    assert [it["id"] for it in b["items"]] == ["nejm-0", "nejm-2", "nejm-4"]
    assert b["allowed_letters"] == list("ABCDE")  # from the whole file


def test_eval_fails_loudly_on_unusable_benchmark_files(tmp_path):
    cfg = pipeline_preset("tiny", eval_generations=1, eval_max_new_tokens=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no benchmark files"):
        Pipeline(cfg, tmp_path / "r1", Inputs(benchmarks=str(empty))).run_stage("eval")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match=r"none.json: no readable records"):
        Pipeline(cfg, tmp_path / "r2", Inputs(benchmarks=str(tmp_path / "none.json"))).run_stage("eval")
    (tmp_path / "cut.json").write_text('[{"id": "a", "question": "Q?\\nA. x\\nB. y", "gold": "A"}, {"id": "b", "qu')
    with pytest.raises(ValueError, match=r"cut.json: not valid JSON \(line 1 column"):
        Pipeline(cfg, tmp_path / "r5", Inputs(benchmarks=str(tmp_path / "cut.json"))).run_stage("eval")
    lossy = tmp_path / "lossy.json"
    lossy.write_text(json.dumps([{"id": "a", "question": "Q?\nA. x\nB. y", "gold": "A"},
                                 {"id": "b", "question": "Q?", "gold": ""},
                                 {"id": "a", "question": "Q2?\nA. x\nB. y", "gold": "B"}]))
    with pytest.raises(ValueError, match=r"lossy.json: 1 records could not be read .*--config.eval_allow_partial"):
        Pipeline(cfg, tmp_path / "r3", Inputs(benchmarks=str(lossy))).run_stage("eval")
    assert json.loads((tmp_path / "r3" / "eval" / "manifest.json").read_text())["status"] != "done"
    res = Pipeline(cfg.replace(eval_allow_partial=True), tmp_path / "r4", Inputs(benchmarks=str(lossy))).run_stage("eval")
    assert res["summary"]["partial"] == {"base": {"lossy": {"missing_field": 1}}}
    table = (tmp_path / "r4" / "eval" / "base" / "results.md").read_text()
    assert "| lossy | 2 |" in table and table.rstrip().endswith("| 1 |")
    lossy_res = json.loads((tmp_path / "r4" / "eval" / "base" / "results.json").read_text())["benchmarks"]["lossy"]
    assert lossy_res["duplicate_ids"] == ["a"] and lossy_res["skipped"] == {"missing_field": 1}
    from launch.report import write_report
    report = write_report(tmp_path / "r4").read_text()
    assert "Records lost to read errors (partial results): {'base/lossy': {'missing_field': 1}}" in report


def test_policy_loading_follows_the_preset(tmp_path):
    import jax
    from flax import nnx

    cfg = pipeline_preset("tiny", dtype="bfloat16", param_dtype="float32", remat="full", chat_template="raw")
    model, mcfg = Pipeline(cfg, tmp_path, Inputs()).load_policy()
    assert (mcfg.dtype, mcfg.param_dtype, mcfg.remat, mcfg.chat_template) == ("bfloat16", "float32", "full", "raw")
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == "float32" for p in params)  # master weights for AdamW
    assert max(len(p.sharding.device_set) for p in params) == jax.device_count()  # sharded on the mesh
    paper = pipeline_preset("qwen3_8b_base")
    assert (paper.dtype, paper.param_dtype, paper.chat_template) == ("bfloat16", "float32", "raw")
    with pytest.raises(ValueError, match=r"the qwen3_8b_base preset needs --model"):
        Pipeline(paper, tmp_path / "p", Inputs()).model_source()
    with pytest.raises(FileNotFoundError, match=r"neither an HF checkpoint .* nor a run directory"):
        Pipeline(cfg, tmp_path / "q", Inputs(model=str(tmp_path))).model_source()


def test_rollout_and_loss_temperatures_must_match():
    import dataclasses
    cfg = pipeline_preset("tiny")
    bad = cfg.replace(rl_self=dataclasses.replace(
        cfg.rl_self, temperature=0.7, loss=dataclasses.replace(cfg.rl_self.loss, temperature=1.0)))
    with pytest.raises(ValueError, match=r"rl_self: the loss temperature 1.0 differs from the rollout"):
        bad.validate()
    # unset, the loss temperature follows the rollout temperature, as in verl
    followed = cfg.replace(rl_self=dataclasses.replace(cfg.rl_self, temperature=0.7)).validate()
    assert followed.rl_self.loss.temperature is None and followed.rl_self.resolved().loss.temperature == 0.7
    assert followed.resolved().rl_self.optim.total_steps == cfg.rl_self.steps
