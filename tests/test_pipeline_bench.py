"""bench/pipeline.py runs end to end on CPU at --small and reports every phase."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_pipeline_benchmark_times_every_phase_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--small", "--device", "cpu", "--threads", "1",
         "--workers", "1", "--dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("vitclt reproduce:", 1)[1]
    for phase in ("normalisation", "thresholds", "harvest", "evaluation", "train clt:jumprelu", "train clt:relu-topk",
                  "train clt:abs-topk", "train plt:relu-topk", "train sae:relu-topk"):
        assert f"\n{phase} " in table, phase
    assert "images/s (32 images)" in table and "tokens/s (3 steps)" in table and "peak RSS" in table
    assert (tmp_path / "out" / "eval" / "report.html").is_file()
