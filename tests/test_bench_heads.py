"""benchmarks/bench_heads.py runs from a bare checkout on the CPU and reports every head and batch size."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_heads_tiny_reports_all_three_heads(tmp_path):
    out = tmp_path / "heads.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_heads.py"), "--tiny", "--repeats", "1",
                             "--new-tokens", "8", "--output", str(out)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["head"], r["batch_size"]) for r in rows] == [
        (h, b) for h in ("energy", "flow", "diffusion") for b in (1, 2)
    ]
    calls = {r["head"]: r["head_network_calls_per_step"] for r in rows}
    assert calls["energy"] == 1 and calls["diffusion"] > calls["flow"] > 1
    assert all(r["tokens_per_second"] > 0 and r["new_tokens"] == 8 for r in rows)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_heads.py"), "--tiny", "--repeats", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--repeats must be >= 1" in bad.stderr
