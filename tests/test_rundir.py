"""Run-directory manifests: skip finished stages, resume interrupted ones, refuse mixed runs."""

from __future__ import annotations

import json

import pytest

from launch.rundir import ManifestMismatch, RunDir, file_digest, write_json_atomic


def test_stage_lifecycle(tmp_path):
    run = RunDir(tmp_path)
    inputs, config = {"seeds": "abc"}, {"alpha": 0.3, "n": 8}
    assert run.begin("label", inputs, config) == "start"
    assert run.manifest("label")["status"] == "running"
    assert run.begin("label", inputs, config) == "resume"  # interrupted: same inputs resume
    (tmp_path / "label" / "pseudo_labelled.jsonl").write_text('{"id": "a"}\n')
    run.finish("label", {"file": "pseudo_labelled.jsonl"}, {"kept": 5})
    m = run.manifest("label")
    assert m["status"] == "done" and m["summary"] == {"kept": 5} and m["seconds"] >= 0
    assert m["outputs"]["file"] == {"path": "pseudo_labelled.jsonl",
                                    "sha256": file_digest(tmp_path / "label" / "pseudo_labelled.jsonl")}
    assert m["code_version"]
    assert run.begin("label", inputs, config) == "skip"
    h = run.manifest_hash("label")
    assert len(h) == 64
    # a stage redone with other outputs gives downstream stages another upstream hash
    (tmp_path / "label" / "pseudo_labelled.jsonl").write_text('{"id": "b"}\n')
    run.finish("label", {"file": "pseudo_labelled.jsonl"}, {"kept": 5})
    assert run.manifest_hash("label") != h
    with pytest.raises(FileNotFoundError, match="no such input"):
        run.finish("label", {"file": "missing.jsonl"})


def test_begin_without_writing(tmp_path):
    run = RunDir(tmp_path)
    assert run.begin("eval", {}, {"a": 1}, write=False) == "start"
    assert run.manifest("eval") is None  # processes other than 0 only check
    run.begin("eval", {}, {"a": 1})
    assert run.begin("eval", {}, {"a": 1}, write=False) == "resume"
    with pytest.raises(ManifestMismatch, match="different a"):
        run.begin("eval", {}, {"a": 2}, write=False)


def test_changed_config_or_inputs_are_refused(tmp_path):
    run = RunDir(tmp_path)
    run.begin("synthesize", {"seeds": "abc"}, {"alpha": 0.3})
    run.finish("synthesize", {})
    with pytest.raises(ManifestMismatch, match=r"synthesize.*different alpha"):
        run.begin("synthesize", {"seeds": "abc"}, {"alpha": 0.5})
    with pytest.raises(ManifestMismatch, match=r"different input seeds"):
        run.begin("synthesize", {"seeds": "xyz"}, {"alpha": 0.3})


def test_upstream_must_be_done(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ManifestMismatch, match=r"stage 'label' has not finished"):
        run.manifest_hash("label")
    run.begin("label", {}, {})
    with pytest.raises(ManifestMismatch, match=r"has not finished"):
        run.manifest_hash("label")


def test_corrupt_manifest_is_named(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestMismatch, match=r"eval/manifest\.json: unreadable manifest"):
        RunDir(tmp_path).begin("eval", {}, {})


def test_atomic_json_and_digests(tmp_path):
    p = write_json_atomic(tmp_path / "a" / "x.json", {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert list((tmp_path / "a").iterdir()) == [p]  # no temporary file left behind
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f1").write_text("one")
    d1 = file_digest(tmp_path / "d")
    (tmp_path / "d" / "f1").write_text("two")
    assert file_digest(tmp_path / "d") != d1
    assert file_digest(p) == file_digest(p)
    with pytest.raises(FileNotFoundError, match="no such input"):
        file_digest(tmp_path / "missing")


def test_paper_presets_carry_the_verl_defaults():
    from launch.presets import PRESETS, pipeline_preset
    for name in ("qwen3_8b_base", "llama31_8b_instruct"):
        p = PRESETS[name]
        for rl in (p.rl_self, p.rl_sup):
            assert (rl.prompts_per_step, rl.num_generations, rl.max_prompt_len, rl.max_new_tokens) == (128, 8, 512, 3072)
            assert rl.temperature == 1.0
            assert (rl.optim.learning_rate, rl.optim.weight_decay, rl.optim.warmup_ratio,
                    rl.optim.grad_clip, rl.optim.schedule) == (3e-6, 0.01, 0.1, 1.0, "cosine")
            assert (rl.loss.clip_low, rl.loss.clip_high, rl.loss.dual_clip, rl.loss.kl_coef,
                    rl.loss.kl_estimator, rl.loss.agg) == (0.2, 0.2, 3.0, 0.005, "low_var_kl", "token-mean")
        assert (p.num_votes, p.eval_generations, p.eval_temperature, p.eval_top_p, p.eval_top_k,
                p.eval_max_new_tokens) == (8, 4, 0.6, 0.95, 20, 2048)
    assert pipeline_preset("tiny", alpha=0.7).alpha == 0.7
    with pytest.raises(ValueError, match=r"unknown --config 'nope'"):
        pipeline_preset("nope")
