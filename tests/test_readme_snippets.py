"""Issue 18, item 9: the README's Python training snippet runs as written on a CPU (extracted from README.md)."""

import re
from pathlib import Path

import torch


README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_training_snippet_runs_as_written_on_a_cpu(tmp_path, monkeypatch):
    (snippet,) = [block for block in _python_blocks("Training") if "CalmTrainer(" in block]
    assert "bf16=True" not in snippet.split("#")[0]
    monkeypatch.chdir(tmp_path)  # the snippet's output_dir is relative
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        exec(compile(snippet, "README.md (Training)", "exec"), namespace)  # noqa: S102 - the project's own README
    finally:
        torch.set_num_threads(threads)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 5 and trainer.state.log_history
