"""Converts an open_clip checkpoint (HPSv2.1's ViT-H-14, or any open_clip ViT) into a transformers
CLIPModel directory that the `hpsv2` reward loads, with no open_clip dependency:

    python -m fastnft.rewards.convert_hps HPS_v2.1_compressed.pt OUT_DIR --tokenizer CLIP_DIR

The architecture is read from the state dict's shapes; open_clip's ViT-H-14 uses exact GELU and
LayerNorm eps 1e-5. `--tokenizer` names a directory holding the CLIP BPE tokenizer (any openai or
LAION CLIP in transformers layout; open_clip's ViT-H-14 uses the same one) and, optionally,
preprocessor_config.json; both are copied into OUT_DIR.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
)


def _layers(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return 1 + max(int(m.group(1)) for key in state if (m := pattern.match(key)))


def clip_config(state: dict[str, Tensor]) -> dict:
    """transformers CLIPConfig arguments read off an open_clip state dict. The text tower pools
    at the highest token id, as open_clip does: transformers does that for eos_token_id = 2."""
    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    positions = state["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    text_width = state["token_embedding.weight"].shape[1]
    return {
        "projection_dim": state["text_projection"].shape[1],
        "logit_scale_init_value": float(state["logit_scale"]),
        "vision_config": {
            "hidden_size": vision_width,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _layers(state, "visual."),
            "num_attention_heads": vision_width // 64,
            "image_size": grid * patch,
            "patch_size": patch,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "vocab_size": state["token_embedding.weight"].shape[0],
            "hidden_size": text_width,
            "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _layers(state, ""),
            "num_attention_heads": text_width // 64,
            "max_position_embeddings": state["positional_embedding"].shape[0],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "eos_token_id": 2,
        },
    }


def _block(state: dict[str, Tensor], source: str, target: str) -> dict[str, Tensor]:
    """One residual block: open_clip's fused in_proj becomes q, k and v."""
    q, k, v = state[f"{source}.attn.in_proj_weight"].chunk(3)
    q_bias, k_bias, v_bias = state[f"{source}.attn.in_proj_bias"].chunk(3)
    out = {
        f"{target}.self_attn.q_proj.weight": q,
        f"{target}.self_attn.k_proj.weight": k,
        f"{target}.self_attn.v_proj.weight": v,
        f"{target}.self_attn.q_proj.bias": q_bias,
        f"{target}.self_attn.k_proj.bias": k_bias,
        f"{target}.self_attn.v_proj.bias": v_bias,
    }
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            out[f"{target}.{new}.{kind}"] = state[f"{source}.{old}.{kind}"]
    return out


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip names -> transformers CLIPModel names."""
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),  # open_clip computes x @ P
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # transformers' spelling
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
    }
    for index in range(_layers(state, "")):
        out.update(_block(state, f"transformer.resblocks.{index}", f"text_model.encoder.layers.{index}"))
    for index in range(_layers(state, "visual.")):
        out.update(_block(state, f"visual.transformer.resblocks.{index}", f"vision_model.encoder.layers.{index}"))
    return {key: value.contiguous() for key, value in out.items()}


def convert(checkpoint: Path, out: Path, tokenizer: Path | None = None) -> Path:
    """Writes OUT (config.json, model.safetensors, tokenizer files) from an open_clip checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in loaded.get("state_dict", loaded).items()}
    model = CLIPModel(CLIPConfig(**clip_config(state)))
    missing, unexpected = model.load_state_dict(convert_state_dict(state), strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: not an open_clip ViT state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.save_pretrained(out)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnft.rewards.convert_hps", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="the open_clip checkpoint (.pt), e.g. HPS_v2.1_compressed.pt")
    parser.add_argument("out", type=Path, help="the transformers CLIP directory to write")
    parser.add_argument("--tokenizer", type=Path, help="a CLIP directory to copy the tokenizer (and preprocessor) from")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no such file {args.checkpoint}")
    convert(args.checkpoint, args.out, args.tokenizer)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
