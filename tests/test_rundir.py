"""Run-directory manifests: skip finished stages, resume interrupted ones, refuse mixed runs."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

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
            run = rl.resolved()  # the loss's logit temperature and the lr schedule follow the stage
            assert (run.loss.temperature, run.optim.total_steps) == (1.0, rl.steps) == (1.0, 300)
            assert (rl.optim.learning_rate, rl.optim.weight_decay, rl.optim.warmup_ratio,
                    rl.optim.grad_clip, rl.optim.schedule) == (3e-6, 0.01, 0.1, 1.0, "cosine")
            assert (rl.loss.clip_low, rl.loss.clip_high, rl.loss.dual_clip, rl.loss.kl_coef,
                    rl.loss.kl_estimator, rl.loss.agg) == (0.2, 0.2, 3.0, 0.005, "low_var_kl", "token-mean")
        assert (p.num_votes, p.eval_generations, p.eval_temperature, p.eval_top_p, p.eval_top_k,
                p.eval_max_new_tokens) == (8, 4, 0.6, 0.95, 20, 2048)
    assert pipeline_preset("tiny", alpha=0.7).alpha == 0.7
    a, b = pipeline_preset("tiny"), pipeline_preset("tiny")  # fresh copies: setting one changes no other
    a.rl_sup.loss.kl_coef = 0.5
    assert b.rl_sup.loss.kl_coef == PRESETS["tiny"].rl_sup.loss.kl_coef == 0.0 and a.rl_self.loss.kl_coef == 0.0
    assert a != b and hash(b) == hash(pipeline_preset("tiny"))  # by value: a jit static argument stays cached
    with pytest.raises(ValueError, match=r"unknown --config 'nope'"):
        pipeline_preset("nope")


def _tmp_leftovers(root):
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name)


def test_manifest_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "synthesize" / "manifest.json"
    path.parent.mkdir()
    for text, kind in (("[1, 2]", "list"), ('"done"', "str"), ("null", "NoneType"), ("3", "int")):
        path.write_text(text)
        with pytest.raises(ManifestMismatch) as e:
            RunDir(tmp_path).begin("synthesize", {}, {})
        assert str(e.value) == (f"{path}: not a manifest (a JSON {kind}, expected an object); "
                                f"move the stage directory away to rerun it")
        assert path.read_text() == text  # left as found


@pytest.mark.parametrize("content,problem", [
    (b"\xff\xfe\x00garbage", r"unreadable manifest \('utf-8' codec can't decode"),
    (b'{"status": "finished", "inputs": {}, "config": {}, "outputs": {}}',
     r"damaged manifest \(status 'finished' is not one of running, done\)"),
    (b'{"status": "done", "config": {}, "outputs": {}}', r"damaged manifest \(field 'inputs' is missing\)"),
    (b'{"status": "done", "inputs": [], "config": {}, "outputs": {"m": "model"}}',
     r"damaged manifest \(field 'inputs' is not an object; output 'm' lacks a path and sha256\)"),
])
def test_other_manifest_corruption_is_named(tmp_path, content, problem):
    path = tmp_path / "label" / "manifest.json"
    path.parent.mkdir()
    path.write_bytes(content)
    run = RunDir(tmp_path)
    for call in (lambda: run.begin("label", {}, {}), lambda: run.manifest_hash("label"),
                 lambda: run.finish("label", {})):
        with pytest.raises(ManifestMismatch, match=rf"^{re.escape(str(path))}: {problem}.*; move the stage "
                                                   rf"directory away to rerun it$"):
            call()
    assert path.read_bytes() == content


def test_manifest_that_is_a_directory_is_named(tmp_path):
    path = tmp_path / "eval" / "manifest.json"
    path.mkdir(parents=True)
    with pytest.raises(ManifestMismatch, match=rf"^{re.escape(str(path))}: cannot read the manifest "
                                               rf"\(Is a directory\); move the stage directory away"):
        RunDir(tmp_path).begin("eval", {}, {})


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "runs"
    f.write_text("not a directory")
    with pytest.raises(NotADirectoryError) as e:
        RunDir(f)
    assert str(e.value) == f"{f}: --workdir is a file, not a directory"
    with pytest.raises(OSError, match=rf"^{re.escape(str(f / 'sub'))}: cannot create the run directory "
                                      rf"\(--workdir\): Not a directory$"):
        RunDir(f / "sub")
    assert f.read_text() == "not a directory"


def test_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from medssr_jax import atomic
    run = RunDir(tmp_path)
    run.begin("label", {"seeds": "abc"}, {"n": 1})
    manifest = tmp_path / "label" / "manifest.json"
    before = manifest.read_bytes()
    out = tmp_path / "label" / "pseudo_labelled.jsonl"
    out.write_text('{"id": "a"}\n')

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", full)  # the data does not fit when it is flushed to disk
    with pytest.raises(OSError) as e:
        run.finish("label", {"labels": "pseudo_labelled.jsonl"}, {"kept": 1})
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"{manifest}: No space left on device while writing it "
                            f"(any earlier manifest.json is unchanged)")
    assert manifest.read_bytes() == before and run.manifest("label")["status"] == "running"
    assert _tmp_leftovers(tmp_path) == []
    monkeypatch.undo()

    written = []

    def write_half_then_fail(obj, f, **kwargs):  # the disk fills up half way through the JSON
        f.write(json.dumps(obj)[:10])
        written.append(f.name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.json, "dump", write_half_then_fail)
    with pytest.raises(OSError, match=rf"^{re.escape(str(tmp_path / 'x' / 'results.json'))}: No space left "
                                      rf"on device while writing it"):
        write_json_atomic(tmp_path / "x" / "results.json", {"a": 1})
    assert written and not os.path.exists(written[0])
    assert _tmp_leftovers(tmp_path) == [] and not (tmp_path / "x" / "results.json").exists()


def test_atomic_writes_use_unique_temporary_names(tmp_path, monkeypatch):
    """Two writers of one path never share a temporary file, and the result has open()'s permissions."""
    from medssr_jax import atomic
    seen = []
    real = atomic.tempfile.mkstemp

    def spy(**kwargs):
        fd, name = real(**kwargs)
        seen.append(name)
        return fd, name
    monkeypatch.setattr(atomic.tempfile, "mkstemp", spy)
    target = tmp_path / "synthetic.jsonl"
    with atomic.atomic_open(target) as a, atomic.atomic_open(target) as b:
        a.write("from a\n")
        b.write("from b\n")
    assert len(set(seen)) == 2 and all(Path(n).parent == tmp_path for n in seen)
    assert target.read_text() == "from a\n"  # the last to finish wins, whole
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(ValueError, match="boom"):
        with atomic.atomic_open(target) as f:
            f.write("partial")
            raise ValueError("boom")
    assert target.read_text() == "from a\n" and _tmp_leftovers(tmp_path) == []


def test_finished_outputs_must_still_match_their_digests(tmp_path):
    run = RunDir(tmp_path)
    run.begin("synthesize", {}, {"seed": 1})
    out = tmp_path / "synthesize" / "synthetic.jsonl"
    out.write_text('{"id": "q1"}\n')
    (tmp_path / "synthesize" / "model").mkdir()
    (tmp_path / "synthesize" / "model" / "w.bin").write_bytes(b"\0" * 8)
    run.finish("synthesize", {"synthetic": "synthetic.jsonl", "model": "model"})
    assert run.begin("synthesize", {}, {"seed": 1}) == "skip"
    out.write_text('{"id": "q2"}\n')
    with pytest.raises(ManifestMismatch, match=rf"^{re.escape(str(out))}: changed since stage 'synthesize' "
                                               rf"finished \(its SHA-256 differs from the manifest's\)"):
        run.begin("synthesize", {}, {"seed": 1})
    out.unlink()
    with pytest.raises(ManifestMismatch, match=rf"^{re.escape(str(out))}: output 'synthetic' of finished stage "
                                               rf"'synthesize' is missing"):
        run.begin("synthesize", {}, {"seed": 1}, write=False)


def test_credentials_in_settings_are_masked(tmp_path):
    run = RunDir(tmp_path)
    url = "http://alice:s3cret-pw@llm.example:8000/v1?api_key=sk-live-123&x=1"
    config = {"openai_base_url": url, "seed": 0}
    assert run.begin("synthesize", {}, config) == "start"
    text = (tmp_path / "synthesize" / "manifest.json").read_text()
    assert "s3cret" not in text and "alice" not in text and "sk-live-123" not in text
    assert run.manifest("synthesize")["config"]["openai_base_url"] == \
        "http://***@llm.example:8000/v1?api_key=***&x=1"
    assert run.begin("synthesize", {}, config) == "resume"  # compared masked: the same run
    with pytest.raises(ManifestMismatch, match="different openai_base_url"):
        run.begin("synthesize", {}, dict(config, openai_base_url="http://bob:pw@other.example/v1"))
    run.finish("synthesize", {}, {"endpoint": url})
    assert "s3cret" not in (tmp_path / "synthesize" / "manifest.json").read_text()


def test_model_from_a_run_directory_with_a_damaged_manifest(tmp_path):
    from launch.pipeline import resolve_model
    (tmp_path / "rl_self" / "model").mkdir(parents=True)
    (tmp_path / "rl_self" / "model" / "config.json").write_text("{}")
    manifest = tmp_path / "rl_self" / "manifest.json"
    manifest.write_text('["done"]')
    with pytest.raises(ManifestMismatch, match=rf"^{re.escape(str(manifest))}: not a manifest \(a JSON list"):
        resolve_model(str(tmp_path))
    manifest.write_text(json.dumps({"status": "done", "inputs": {}, "config": {}, "outputs": {}}))
    assert resolve_model(str(tmp_path)) == str(tmp_path / "rl_self" / "model")
