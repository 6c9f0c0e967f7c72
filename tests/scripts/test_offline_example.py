"""The README's offline example (vLLM's quickstart with our import line) runs as written."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_offline_example_prints_a_completion_per_prompt(default_model):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "offline_example.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Prompt: ")]
    assert [line.split(", Generated text: ")[0] for line in lines] == [
        "Prompt: 'Hello, my name is'", "Prompt: 'The president of the United States is'",
        "Prompt: 'The capital of France is'", "Prompt: 'The future of AI is'"]
    assert all(len(line.split(", Generated text: ")[1]) > 4 for line in lines)
