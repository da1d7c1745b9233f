"""README's commands run in the order a reader follows them: after the quickstart, no `mimkit pretrain`
example lands in a run directory whose checkpoint it would be refused to resume (a changed guarded
setting), and no example writes into the repository's own files."""

import re
import shlex
from pathlib import Path

import pytest

from mimkit.config import load_config, to_dict
from mimkit.train.resume import config_changes

ROOT = Path(__file__).resolve().parents[1]


def _bash_commands(text: str) -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _pretrain_runs(commands: list[str]) -> list[tuple[str, list[str]]]:
    runs = []
    for cmd in commands:
        words = shlex.split(cmd)
        if words[:2] == ["bash", "scripts/quickstart.sh"]:
            runs.append(("configs/mae_fashion_mnist.yaml", ["train.resume=none", *words[2:]]))
        elif "pretrain" in words and words[0] in ("mimkit", "torchrun"):
            i = words.index("pretrain")
            runs.append((words[i + 1], words[i + 2:]))
    return runs


def test_readme_pretrain_examples_can_run_after_the_quickstart():
    runs = _pretrain_runs(_bash_commands((ROOT / "README.md").read_text()))
    assert len(runs) >= 4 and runs[0][1][0] == "train.resume=none"  # the quickstart, then the examples
    last: dict[str, dict] = {}
    for config, overrides in runs:
        cfg = to_dict(load_config(ROOT / config, overrides))
        out, resume = cfg["train"]["out_dir"], cfg["train"]["resume"]
        if out in last and resume == "auto" and cfg["train"]["resume_changes"] != "allow":
            diff = config_changes(last[out], cfg)
            assert not diff, f"`{config} {' '.join(overrides)}` would be refused: it resumes {out} with {diff}"
        last[out] = cfg


@pytest.mark.parametrize("tracked", ["docs/", "configs/", "src/", "tests/"])
def test_readme_examples_write_no_tracked_file(tracked):
    for cmd in _bash_commands((ROOT / "README.md").read_text()):
        for flag in ("--out", "train.out_dir="):
            for m in re.finditer(re.escape(flag) + r"[ =]?(\S+)", cmd):
                assert not m.group(1).startswith(tracked), f"`{cmd}` writes into {m.group(1)}"
