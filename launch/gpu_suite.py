"""Every GPU figure of the project from one command: anchors and our benchmarks, one JSON, one table.

    python3 -m launch.gpu_suite                 # on the GPU machine, from the repository root
    python3 -m launch.gpu_suite --smoke         # tiny shapes on any backend (what CI runs)

Parts, each in its own process (JAX preallocates most of the GPU memory, and
PyTorch and JAX must not share it), in this order, most valuable first:

  ceilings        copy bandwidth and bf16 matmul rate (.anchors/gpu_sampler_anchors.py)
  tunix           the Tunix sampler on vote-16x8, Qwen3-0.6B and -8B (.anchors, Tunix wheel)
  sampler         our sampler on vote-16x8, Qwen3-0.6B and -8B (launch.bench_sampler)
  attention       one layer of decode attention, Pallas and XLA, as a fraction of bandwidth
  train_anchor    the HF train step, 32,768 tokens, Qwen3-0.6B and -1.7B (.anchors)
  train           our train step, same shapes (launch.bench_train)
  hf              HF transformers generate on vote-16x8, Qwen3-0.6B (--hf_models; about a
                  minute each: last, as the budget allows)

A part that fails or runs out of time is recorded with its status and the end
of its output; the others still run. Each part's peak GPU memory (nvidia-smi,
sampled) and peak host RSS are recorded. The whole suite keeps to --budget_s
(default 450 s, inside the 8 minutes a device call may take). Results go to
--out (default $OUT, else ./gpu_suite_out): gpu_suite.json, gpu_suite.md and
gpu_suite.log.

The anchors come from ../shared/bench, copied into the ignored folder .anchors
with the Tunix wheel (see the README's benchmark section); without .anchors
the anchor parts are recorded as skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", [], "Parts to run (default: all, or the smoke set with --smoke).")
flags.DEFINE_float("budget_s", 450.0, "Wall-clock budget for the whole suite, in seconds.")
flags.DEFINE_string("out", None, "Output folder (default $OUT, else ./gpu_suite_out).")
flags.DEFINE_string("anchors", ".anchors", "Folder holding the anchor scripts and the Tunix wheel.")
flags.DEFINE_list("hf_models", ["0.6b"], "Models for the HF generate anchor (1 minute each).")
flags.DEFINE_bool("smoke", False, "Tiny shapes: checks that the suite and its parts run (e.g. on CPU).")

SITE = "/tmp/medssr_suite_site"  # where the Tunix wheel is unpacked (no dependencies)


@dataclasses.dataclass
class Part:
    name: str
    cmd: list[str]
    timeout_s: float
    needs: str | None = None  # a path that must exist, else the part is skipped
    env: dict | None = None


def default_parts(anchors: str, hf_models: list[str], smoke: bool) -> list[Part]:
    py = sys.executable
    if smoke:
        return [
            Part("sampler", [py, "-m", "launch.bench_sampler", "--smoke"], 120),
            Part("attention", [py, "-m", "launch.bench_decode_attention", "--smoke"], 120),
            Part("train", [py, "-m", "launch.bench_train", "--models=tiny", "--rows=2",
                           "--micro_batch=1", "--seq_len=16", "--prompt_len=4", "--remat=full",
                           "--attention=xla", "--steps=1"], 240),
        ]
    sampler_anchor = os.path.join(anchors, "gpu_sampler_anchors.py")
    train_anchor = os.path.join(anchors, "gpu_train_anchors.py")
    return [
        Part("ceilings", [py, sampler_anchor, "--which", "ceil", "--models", "0.6b,8b"], 60,
             needs=sampler_anchor),
        Part("tunix", [py, sampler_anchor, "--which", "tunix", "--models", "0.6b,8b"], 130,
             needs=os.path.join(SITE, "tunix"), env={"PYTHONPATH": SITE}),
        Part("sampler", [py, "-m", "launch.bench_sampler", "--models=qwen3_0p6b,qwen3_8b",
                         "--repeats=2"], 150),
        Part("attention", [py, "-m", "launch.bench_decode_attention",
                           "--models=qwen3_0p6b,qwen3_8b", "--impls=pallas,xla"], 45),
        Part("train_anchor", [py, train_anchor, "0.6b,1.7b"], 90, needs=train_anchor),
        Part("train", [py, "-m", "launch.bench_train", "--models=qwen3_0p6b,qwen3_1p7b", "--rows=32",
                       "--micro_batch=8", "--seq_len=1024", "--remat=dots", "--attention=cudnn",
                       "--steps=2"], 180),
        Part("hf", [py, sampler_anchor, "--which", "hf", "--models", ",".join(hf_models)], 200,
             needs=sampler_anchor),
    ]


def install_tunix(anchors: str) -> str:
    """Unpack the Tunix wheel from the anchors folder (no dependencies, no index); blank its __init__."""
    import glob
    wheels = sorted(glob.glob(os.path.join(anchors, "google_tunix-*.whl")))
    if not wheels:
        return "no Tunix wheel in " + anchors
    if os.path.isdir(os.path.join(SITE, "tunix")):
        return "already installed"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", SITE, wheels[-1]], capture_output=True, text=True)
    if r.returncode:
        return "pip failed: " + (r.stderr or r.stdout)[-300:]
    with open(os.path.join(SITE, "tunix", "__init__.py"), "w") as f:
        f.write("")  # its package __init__ imports every subsystem
    return "installed " + os.path.basename(wheels[-1])


class _GpuMemorySampler(threading.Thread):
    """The largest nvidia-smi memory.used (MiB) seen while a part runs; None without nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib = None
        self._halt = threading.Event()
        self._smi = shutil.which("nvidia-smi")

    def run(self):
        while self._smi and not self._halt.is_set():
            try:
                out = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = max(float(x) for x in out.split())
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except Exception:  # noqa: BLE001 - a failed sample only loses that sample
                pass
            self._halt.wait(0.5)

    def stop(self):
        self._halt.set()
        self.join(timeout=10)


def run_part(part: Part, timeout_s: float, log) -> dict:
    """Run one part in its own process group; collect its JSON lines, status and peak memory."""
    record = dict(name=part.name, cmd=" ".join(part.cmd), status="ok", rows=[])
    if part.needs and not os.path.exists(part.needs):
        record.update(status="skipped", reason=f"{part.needs} not found")
        return record
    if timeout_s < 1:
        record.update(status="skipped", reason="suite budget spent")
        return record
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in ((part.env or {}).get("PYTHONPATH"), os.getcwd(),
                                                    env.get("PYTHONPATH")) if p)
    sampler = _GpuMemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(part.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(f"[{part.name}] {line}")
            log.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out, deadline = False, t0 + timeout_s
    while True:  # os.wait4 rather than Popen.wait: it also returns the child's resource usage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group only
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    sampler.stop()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["peak_gpu_mem_gb"] = None if sampler.peak_mib is None else round(sampler.peak_mib / 1024, 2)
    record["peak_host_rss_gb"] = round(usage.ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                record["rows"].append(json.loads(line))
            except json.JSONDecodeError:
                pass
    errors = [r for r in record["rows"] if r.get("kind") == "error"]
    if timed_out:
        record["status"] = "timeout"
    elif proc.returncode:
        record["status"] = f"failed (exit {proc.returncode})"
    elif errors:
        record["status"] = f"ok with {len(errors)} error rows"
    if record["status"] != "ok":
        record["tail"] = "".join(lines)[-2000:]
    return record


def _fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def summarize(parts: list[dict]) -> tuple[dict, str]:
    """Pick the figures out of the parts' rows: one summary dict and one markdown table."""
    rows = [r for p in parts for r in p["rows"]]
    find = lambda kind, **kw: next((r for r in rows if r.get("kind") == kind and all(  # noqa: E731
        r.get(k) == v for k, v in kw.items())), None)
    ceiling = find("ceiling")
    summary = dict(device=(ceiling or {}).get("device") or next(
        (r.get("device") for r in rows if r.get("device")), None),
        hbm_bytes_per_s=(ceiling or {}).get("hbm_bytes_per_s"), bf16_flops=(ceiling or {}).get("bf16_flops"))
    bw, fl = summary["hbm_bytes_per_s"], summary["bf16_flops"]
    md = [f"device: {summary['device']}; copy bandwidth {_fmt(bw and bw / 1e12, '.2f')} TB/s; "
          f"bf16 matmul {_fmt(fl and fl / 1e12, '.0f')} TFLOP/s", ""]
    md += ["| vote-16x8 | HF tok/s | Tunix tok/s | ours tok/s | ours / Tunix | shared-prompt floor | % of floor |",
           "|---|---|---|---|---|---|---|"]
    sampler = []
    for anchor, ours in (("0.6b", "qwen3_0p6b"), ("8b", "qwen3_8b"), ("tiny", "tiny")):
        mine = find("medssr_jax_sampler", model=ours)
        hf, tunix = find("hf_generate", model=anchor), find("tunix_sampler", model=anchor)
        if not (mine or hf or tunix):
            continue
        ours_tps = (mine or {}).get("tokens_per_s")
        tunix_tps = (tunix or {}).get("tokens_per_s")
        row = dict(model=ours, hf=(hf or {}).get("tokens_per_s"), tunix=tunix_tps, ours=ours_tps,
                   ours_over_tunix=ours_tps / tunix_tps if ours_tps and tunix_tps else None,
                   floor_shared=(mine or {}).get("floor_shared_tok_s"),
                   fraction_of_floor=(mine or {}).get("fraction_of_shared_floor"),
                   decode_attention=(mine or {}).get("decode_attention_used"))
        sampler.append(row)
        md.append(f"| {ours} | {_fmt(row['hf'])} | {_fmt(tunix_tps)} | {_fmt(ours_tps)} | "
                  f"{_fmt(row['ours_over_tunix'], '.2f')} | {_fmt(row['floor_shared'])} | "
                  f"{_fmt(None if row['fraction_of_floor'] is None else 100 * row['fraction_of_floor'], '.0f')}% |")
    summary["sampler"] = sampler
    attn = [r for r in rows if r.get("kind") == "decode_attention_layer"]
    summary["decode_attention"] = [dict(model=r["model"], impl=r["impl"], us=r["seconds"] * 1e6,
                                        fraction_of_bandwidth=r["fraction_of_bandwidth"],
                                        max_abs_diff_vs_xla=r.get("max_abs_diff_vs_xla")) for r in attn]
    if attn:
        md += ["", "| one-layer decode attention | impl | us | fraction of bandwidth | max abs diff vs XLA |",
               "|---|---|---|---|---|"]
        md += [f"| {r['model']} | {r['impl']} | {r['seconds'] * 1e6:,.1f} | {r['fraction_of_bandwidth']:.2f} | "
               f"{_fmt(r.get('max_abs_diff_vs_xla'), '.1e')} |" for r in attn]
    train = []
    for anchor, ours in (("0.6b", "qwen3_0p6b"), ("1.7b", "qwen3_1p7b"), ("tiny", "tiny")):
        hf, mine = find("hf_train_step", model=anchor), find("medssr_jax_train_step_best", model=ours)
        if hf or mine:
            train.append(dict(model=ours, hf_tokens_per_s=(hf or {}).get("tokens_per_s"),
                              hf_mfu=(hf or {}).get("mfu"), ours_tokens_per_s=(mine or {}).get("tokens_per_s"),
                              ours_mfu=(mine or {}).get("mfu")))
    summary["train"] = train
    if train:
        md += ["", "| train step, 32,768 tokens | HF tok/s | HF MFU | ours tok/s | ours MFU |", "|---|---|---|---|---|"]
        md += [f"| {t['model']} | {_fmt(t['hf_tokens_per_s'])} | {_fmt(t['hf_mfu'], '.0%')} | "
               f"{_fmt(t['ours_tokens_per_s'])} | {_fmt(t['ours_mfu'], '.0%')} |" for t in train]
    md += ["", "| part | status | seconds | peak GPU memory (nvidia-smi) | peak JAX memory | peak host RSS |",
           "|---|---|---|---|---|---|"]
    for p in parts:
        jax_peak = max((r["peak_mem_gb"] for r in p["rows"] if r.get("peak_mem_gb")), default=None)
        md.append(f"| {p['name']} | {p['status']} | {p.get('seconds', '-')} | "
                  f"{_fmt(p.get('peak_gpu_mem_gb'), '.1f')} GB | {_fmt(jax_peak, '.1f')} GB | "
                  f"{_fmt(p.get('peak_host_rss_gb'), '.1f')} GB |")
    return summary, "\n".join(md) + "\n"


def run_suite(parts: list[Part], budget_s: float, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    with open(os.path.join(out_dir, "gpu_suite.log"), "w") as log:
        for part in parts:
            left = budget_s - (time.perf_counter() - t0)
            print(f"== {part.name}: up to {min(part.timeout_s, left):.0f} s", flush=True)
            try:
                rec = run_part(part, min(part.timeout_s, left), log)
            except Exception as e:  # noqa: BLE001 - a part that cannot even start is recorded
                rec = dict(name=part.name, cmd=" ".join(part.cmd), status=f"not run: {e!r}"[:300], rows=[])
            print(f"== {part.name}: {rec['status']} in {rec.get('seconds', 0)} s, peak GPU memory "
                  f"{rec.get('peak_gpu_mem_gb')} GB, peak host RSS {rec.get('peak_host_rss_gb')} GB",
                  flush=True)
            records.append(rec)
    summary, md = summarize(records)
    result = dict(kind="gpu_suite", seconds=round(time.perf_counter() - t0, 1), budget_s=budget_s,
                  summary=summary, parts=records)
    with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return result


def main(argv):
    del argv
    out_dir = FLAGS.out or os.environ.get("OUT") or "gpu_suite_out"
    parts = default_parts(FLAGS.anchors, FLAGS.hf_models, FLAGS.smoke)
    if FLAGS.parts:
        unknown = set(FLAGS.parts) - {p.name for p in parts}
        if unknown:
            raise app.UsageError(f"unknown parts {sorted(unknown)}; choose from {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in FLAGS.parts]
    if not FLAGS.smoke and any(p.name == "tunix" for p in parts):
        print("tunix:", install_tunix(FLAGS.anchors), flush=True)
    run_suite(parts, FLAGS.budget_s, out_dir)


if __name__ == "__main__":
    app.run(main)
