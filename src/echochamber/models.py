"""The scale ladder -> ``transformers`` OLMo models, and checkpoints as plain ``save_pretrained`` folders.

A scale in the config (``scales:``) names the shape of an OLMo-1 style decoder: SwiGLU MLP
(``mlp_hidden`` is the width of each SwiGLU half, as in HF's ``intermediate_size``), RoPE,
non-parametric LayerNorm, no biases, optionally tied input/output embeddings. A checkpoint is a folder
that ``AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer saved beside the weights, so
every later stage (RL, evaluation) needs only the folder's path.
"""

from __future__ import annotations

import os
from pathlib import Path

from echochamber import manifest
from echochamber.io import atomic_path

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing or unreadable; the message is one sentence naming the path."""


def olmo_config(scale: dict, vocab_size: int, *, eos_id: int, pad_id: int, max_len: int):
    """The ``OlmoConfig`` of one scale of the ladder.

    The context is the scale's ``context`` when it sets one, else ``max_len`` (pretrain.seq_len);
    a scale whose context is shorter than ``max_len`` is a config mistake.
    """
    from transformers import OlmoConfig

    context = int(scale.get("context") or max_len)
    if context < max_len:
        raise ValueError(f"scale context {context} is shorter than the sequence length {max_len}")
    if scale["d_model"] % scale["n_heads"]:
        raise ValueError(f"d_model {scale['d_model']} is not divisible by n_heads {scale['n_heads']}")
    return OlmoConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(scale["d_model"]),
        intermediate_size=int(scale["mlp_hidden"]),
        num_hidden_layers=int(scale["n_layers"]),
        num_attention_heads=int(scale["n_heads"]),
        num_key_value_heads=int(scale["n_heads"]),
        hidden_act="silu",                 # SwiGLU
        max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        tie_word_embeddings=bool(scale.get("tie_embeddings", False)),
        initializer_range=0.02,
        bos_token_id=None,                  # documents carry no BOS
        eos_token_id=int(eos_id),
        pad_token_id=int(pad_id),
        use_cache=True,
    )


def build(scale: dict, tokenizer, max_len: int, seed: int, *, device=None):
    """A freshly initialised model of one scale, the same weights for the same seed.

    The global torch RNG is left as it was; ``device`` (e.g. ``"cuda"``) initialises in place there.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = olmo_config(scale, len(tokenizer), eos_id=tokenizer.eos_token_id,
                         pad_id=_pad_id(tokenizer), max_len=max_len)
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model


PACKED_CAUSAL = "packed_causal"


def _causal_without_mask(*args, **kwargs):
    return None


def use_packed_causal_attention(model):
    """Switch ``model`` to causal SDPA that never builds a mask, for training on packed, unpadded sequences.

    With no mask, SDPA runs its flash kernel; transformers' own ``sdpa`` builds an explicit mask under
    ``torch.compile`` (torch < 2.14), which rules flash out. Only for full sequences without padding or
    a KV cache: call ``model.set_attn_implementation("sdpa")`` before generating. The attention choice is
    not saved in checkpoints (they load with ``sdpa``).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_CAUSAL, sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_CAUSAL, _causal_without_mask)
    model.set_attn_implementation(PACKED_CAUSAL)
    return model


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def count_params(model, *, embeddings: bool = True) -> int:
    """Distinct parameters (tied weights counted once); ``embeddings=False`` leaves out the input table
    (it does no matmul work, so throughput formulas use that count), but keeps a tied output head."""
    n = sum(p.numel() for p in model.parameters())
    if not embeddings:
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        tied = out is not None and out.weight is emb
        if not tied:
            n -= emb.numel()
    return n


def save_checkpoint(model, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` into one ``save_pretrained`` folder, atomically, with its
    ``manifest.json`` (sizes and checksums, echochamber.manifest) written last."""
    model = getattr(model, "_orig_mod", model)           # a torch.compile'd model saves its original
    path = Path(path)
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest.write(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, *, dtype=None):
    """Load ``(model, tokenizer)`` from a checkpoint folder; raise ``CheckpointError`` when it is missing
    or unreadable (missing files, a truncated or corrupt weights file, weights that do not fit)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a save_pretrained folder)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json, so it is not a save_pretrained folder")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"checkpoint {path} has no weights file ({', '.join(WEIGHT_FILES[::2])})")
    if not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no tokenizer (tokenizer_config.json is missing)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the folder is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)})") from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: its weights lack {len(missing)} tensors "
                              f"such as {sorted(missing)[0]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} has an unreadable tokenizer "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else "no details"
