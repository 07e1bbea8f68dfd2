"""The supported transformers range: capability detection, loud failures, no deprecation warnings from our calls,
and models saved with one installed version loading as remote code in the other CI venv (when present)."""

import dataclasses
import re
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from modeling_calm import CalmForCausalLM
from modeling_calm import modeling_calm_compat as compat
from tests.utils import other_test_pythons, run_without_package, tiny_calm_config


ROOT = Path(__file__).resolve().parents[1]


def test_detected_names_are_the_ones_transformers_uses():
    names = {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
    assert compat.OUTPUT_CACHE_FIELD in names
    llama = CalmForCausalLM(tiny_calm_config()).model
    import inspect

    assert compat.backbone_cache_kwarg(llama) in inspect.signature(type(llama).forward).parameters


def test_calm_output_has_the_cache_field_transformers_expects_and_both_names_read_it():
    model = CalmForCausalLM(tiny_calm_config()).eval()
    out = model(torch.randint(3, 99, (1, 8)), use_cache=True)
    fields = {field.name for field in dataclasses.fields(out)}
    assert compat.OUTPUT_CACHE_FIELD in fields and len(fields & set(compat.CACHE_NAMES)) == 1
    cache = compat.output_cache(out)
    assert cache is not None and int(cache.get_seq_length()) == 2
    assert out.past_key_values is cache  # the old attribute keeps working on every release


def test_forward_takes_the_cache_under_either_name_and_not_both():
    model = CalmForCausalLM(tiny_calm_config()).eval()
    ids = torch.randint(3, 99, (1, 12))
    full = model(ids).last_hidden_state
    for name in compat.CACHE_NAMES:
        prefix = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], use_cache=True, **{name: compat.output_cache(prefix)})
        torch.testing.assert_close(step.last_hidden_state, full[:, 2:], rtol=1e-5, atol=1e-5)
    prefix = model(ids[:, :8], use_cache=True)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, 8:], cache=prefix.past_key_values, past_key_values=prefix.past_key_values)


def test_output_cache_reads_models_that_use_the_other_name():
    from types import SimpleNamespace

    marker = object()
    assert compat.output_cache(SimpleNamespace(past_key_values=marker)) is marker
    assert compat.output_cache(SimpleNamespace(cache=marker)) is marker
    assert compat.output_cache(SimpleNamespace(logits=1)) is None


def test_a_future_rename_fails_loudly_naming_the_version_and_the_capability():
    @dataclasses.dataclass
    class RenamedOutput(ModelOutput):
        last_hidden_state: torch.Tensor | None = None
        kv_store: object = None

    with pytest.raises(compat.MissingCapabilityError, match=rf"KV-cache field.*in transformers {re.escape(transformers.__version__)}"):
        compat.detect_output_cache_field(RenamedOutput)

    class RenamedBackbone(torch.nn.Module):
        def forward(self, inputs_embeds, attention_mask=None, kv_store=None):
            return inputs_embeds

    with pytest.raises(compat.MissingCapabilityError, match="cache keyword.*RenamedBackbone.forward"):
        compat.backbone_cache_kwarg(RenamedBackbone())

    class KwargsBackbone(torch.nn.Module):
        def forward(self, inputs_embeds, **kwargs):
            return inputs_embeds

    assert compat.backbone_cache_kwarg(KwargsBackbone()) == compat.OUTPUT_CACHE_FIELD


def test_with_cache_field_renames_only_when_transformers_uses_the_new_name():
    @dataclasses.dataclass
    @compat.with_cache_field
    class Output(ModelOutput):
        hidden: torch.Tensor | None = None
        past_key_values: object = None

    names = [field.name for field in dataclasses.fields(Output)]
    assert names == ["hidden", compat.OUTPUT_CACHE_FIELD]
    marker = object()
    assert compat.output_cache(Output(hidden=torch.ones(1), **{compat.OUTPUT_CACHE_FIELD: marker})) is marker


_NO_DEPRECATIONS = """
import logging, warnings, torch
import transformers
from transformers.utils import logging as hf_logging
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
hf_logging.get_logger("transformers").addHandler(Keep())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from modeling_calm import CalmForCausalLM, CalmTrainer
    from tests.utils import tiny_calm_config
    from transformers import TrainingArguments
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = CalmForCausalLM(tiny_calm_config())
    ids = torch.randint(3, 99, (2, 16))
    model.eval()
    model(ids, labels=ids, use_cache=True)
    model.generate(ids[:, :7], max_new_tokens=8, seed=0)
    model.generate(ids[:, :7], max_new_tokens=8, seed=0, temperature=0.5, num_candidates=4)
    model.generate(ids[:, :7], max_new_tokens=8, seed=0, calm_compile=True, calm_compile_mode="backend:eager")
    model.score_brier(ids, generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(3, 99, (4, 16))]
    args = TrainingArguments(output_dir=OUTPUT, max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, dataloader_pin_memory=False)
    CalmTrainer(model=model, args=args, train_dataset=data).train()
    model.save_pretrained(OUTPUT + "/saved")
    loaded = CalmForCausalLM.from_pretrained(OUTPUT + "/saved")
    peft_model = get_peft_model(loaded, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model(input_ids=ids, labels=ids)
    peft_model.generate(input_ids=ids[:, :7], max_new_tokens=4, seed=0)
ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
for w in ours:
    print("WARNING", w.category.__name__, w.filename, w.lineno, str(w.message)[:300])
for message in records:
    if "deprecat" in message.lower():
        print("LOGGED", message[:300])
print("DONE")
"""


@pytest.mark.slow
def test_forward_training_generate_save_and_peft_raise_no_deprecation_warning(tmp_path):
    """transformers 5.24 warns on `past_key_values=` (FutureWarning) and on `out.past_key_values` (a log line): a
    user must see neither from our calls. Run in a fresh interpreter so that `warning_once` has not fired yet."""
    import subprocess

    code = f"OUTPUT = {str(tmp_path)!r}\n" + _NO_DEPRECATIONS
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DONE" in result.stdout
    problems = [line for line in result.stdout.splitlines() if line.startswith(("WARNING", "LOGGED"))]
    assert not problems, "\n".join(problems)


_CROSS_VERSION = """
import json, torch, transformers
from transformers import AutoModelForCausalLM
folder = {folder!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
assert "transformers_modules" in type(model).__module__, type(model)
ids = torch.load({ids!r})
model.eval()
out = model(ids)
torch.testing.assert_close(out.last_hidden_state, torch.load({expected!r}), rtol=1e-5, atol=1e-5)
generated = model.generate(ids[:, :7], max_new_tokens=6, seed=0)
assert torch.equal(generated, torch.load({generated!r})), generated
model.train()
before = {{name: p.detach().clone() for name, p in model.named_parameters()}}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
loss = model(ids, labels=ids).loss
loss.backward()
optimizer.step()
assert torch.isfinite(loss) and not any(p.requires_grad for p in model.autoencoder.parameters())
changed = {{name for name, p in model.named_parameters() if not torch.equal(p, before[name])}}
assert changed and not any(name.startswith("autoencoder.") for name in changed), sorted(changed)
print("OK", transformers.__version__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("python", [sys.executable] + other_test_pythons(), ids=lambda p: Path(p).parent.parent.name)
def test_saved_model_loads_as_remote_code_trains_and_generates_in_each_venv(tmp_path, python):
    """Saved with the installed transformers; loaded without the package by this venv's interpreter and by the
    other CI venv's (CALM_TEST_PYTHONS), which holds the other end of the supported range."""
    model = CalmForCausalLM(tiny_calm_config()).eval()
    folder = tmp_path / "calm"
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["transformers_version"] == transformers.__version__
    ids = torch.randint(3, 99, (2, 16))
    paths = {name: str(tmp_path / f"{name}.pt") for name in ("ids", "expected", "generated")}
    torch.save(ids, paths["ids"])
    torch.save(model(ids).last_hidden_state, paths["expected"])
    torch.save(model.generate(ids[:, :7], max_new_tokens=6, seed=0), paths["generated"])
    output = run_without_package(_CROSS_VERSION.format(folder=str(folder), **paths), cwd=tmp_path, python=python)
    assert output.startswith("OK")


def _lower_bounds_in_setup_cfg() -> dict[str, str]:
    import configparser
    import re as regex

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines() + parser["options.extras_require"]["test"].splitlines()
    bounds = {}
    for line in lines:
        match = regex.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", line)
        if match:
            bounds[match.group(1).lower().replace("_", "-")] = match.group(2)
    return bounds


def test_ci_lowest_constraints_are_setup_cfg_lower_bounds():
    """`.ci/run`'s second venv must test the real lower bounds: every pin equals setup.cfg's `>=` bound and every
    bounded package but torch (CI has only the 2.13 CPU wheel) is pinned."""
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    from packaging.version import Version

    bounds = _lower_bounds_in_setup_cfg()
    bounds.pop("torch")
    assert set(pins) == set(bounds)
    assert {name: Version(v) for name, v in pins.items()} == {name: Version(v) for name, v in bounds.items()}
    assert (ROOT / ".ci" / "run").read_text().count("-c .ci/lowest.txt") == 1
