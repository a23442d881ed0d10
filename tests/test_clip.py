"""CLIP in NNX against transformers' PyTorch CLIPModel and CLIPImageProcessor (tiny random
folders written by transformers), open_clip naming, and the real sizes shape-only."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from euphonium_jax.models.clip import loading, model as clip_model, preprocess, tiny  # noqa: E402
from euphonium_jax.models.wan import loading as wan_loading  # noqa: E402

PROMPTS = ["a red circle moving left", "a blue square", "zebra xylophone quickly rotating"]


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def folder(request, tmp_path_factory):
  return tiny.write_tiny_clip(str(tmp_path_factory.mktemp(request.param)),
                              hidden_act=request.param)


def rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def reference_outputs(folder, ids, mask, pixels_nchw):
  ref = transformers.CLIPModel.from_pretrained(folder).eval()
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
               pixel_values=torch.tensor(pixels_nchw))


def test_towers_and_logits_match_transformers(folder):
  clip = loading.load_clip(folder)
  ids, mask = loading.tokenize(loading.load_tokenizer(folder), PROMPTS, 16)
  assert ids[2, -1] == clip.cfg.text.eos_token_id  # the long prompt is truncated to 16 tokens
  pixels = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
  out = reference_outputs(folder, ids, mask, pixels)
  ours = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  img = clip_model.normalize(clip.image_features(ours))
  txt = clip_model.normalize(clip.text_features(jnp.asarray(ids), jnp.asarray(mask)))
  logits = clip(ours, jnp.asarray(ids), jnp.asarray(mask))
  # Measured: 2.4e-7 (image), 4.3e-7 (text), 5.5e-7 (logits) relative, quick_gelu.
  assert rel(img, out.image_embeds.numpy()) < 1e-5
  assert rel(txt, out.text_embeds.numpy()) < 1e-5
  assert rel(logits, out.logits_per_image.numpy()) < 1e-5
  assert rel(jnp.exp(clip.logit_scale[...]), out.logits_per_image.numpy()[0, 0] / (
      out.image_embeds[0] @ out.text_embeds[0]).item()) < 1e-5


def test_legacy_eos_rule_pools_at_the_largest_id(folder, tmp_path):
  """Configs with eos_token_id = 2 (older CLIP checkpoints) pool at argmax(ids), as the
  reference does; a padding id below the EOS id leaves the pooled token at the EOS."""
  import shutil
  legacy = str(tmp_path / "legacy")
  shutil.copytree(folder, legacy)
  with open(os.path.join(legacy, "config.json")) as f:
    cfg = json.load(f)
  cfg["text_config"]["eos_token_id"] = 2
  with open(os.path.join(legacy, "config.json"), "w") as f:
    json.dump(cfg, f)
  ids, mask = loading.tokenize(loading.load_tokenizer(legacy), PROMPTS[:2], 16)
  ids = np.where(mask == 1, ids, 5)  # pad with a small id
  pixels = np.zeros((1, 3, 32, 32), np.float32)
  out = reference_outputs(legacy, ids, mask, pixels)
  clip = loading.load_clip(legacy)
  txt = clip_model.normalize(clip.text_features(jnp.asarray(ids), jnp.asarray(mask)))
  assert rel(txt, out.text_embeds.numpy()) < 1e-5


@pytest.mark.parametrize("h,w,size", [(40, 48, 32), (32, 32, 224), (240, 416, 224)])
def test_preprocessing_matches_clip_image_processor(h, w, size):
  """Uniform-noise uint8 frames (the worst case for resampling): with match_uint8 every value
  is within one 8-bit level of CLIPImageProcessor's (PIL bicubic), and at most 0.2% of the
  values differ at all; without the rounding, within 1.2 levels."""
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                         crop_size={"height": size, "width": size})
  ours_cfg = preprocess.ImageProcessing.from_hf(proc.to_dict())
  assert ours_cfg.crop == (size, size) and ours_cfg.resample == 3
  frames = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
  ref = proc(images=list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  std = np.asarray(ours_cfg.std)
  for match, most, frac in ((True, 1.0 + 1e-4, 2e-3), (False, 1.2, 0.3)):
    ours = np.asarray(jax.jit(lambda x: preprocess.preprocess(x, ours_cfg, match))(
        jnp.asarray(frames / 255.0)))
    assert ours.shape == ref.shape
    levels = np.abs(ours - ref) * std * 255
    assert levels.max() <= most, (match, levels.max())
    assert (levels > 0.5).mean() <= frac, (match, (levels > 0.5).mean())


def test_resize_rule_is_transformers():
  from transformers.image_transforms import get_resize_output_image_size
  for h, w in ((240, 416), (416, 240), (33, 100), (224, 224), (7, 3)):
    img = np.zeros((h, w, 3), np.uint8)
    assert preprocess.resized_size(h, w, 224) == tuple(get_resize_output_image_size(
        img, 224, default_to_square=False))


def open_clip_state(hf_state):
  """transformers CLIPModel tensors -> the key layout of an open_clip CLIP state dict."""
  inv_top = {v: k for k, v in loading._OC_TOP.items()}
  inv_block = {v: k for k, v in loading._OC_BLOCK.items()}
  out = {"attn_mask": np.zeros((16, 16), np.float32)}
  for name, x in hf_state.items():
    if name in inv_top:
      out[inv_top[name]] = x
    elif name == "visual_projection.weight":
      out["visual.proj"] = x.T.copy()
    elif name == "text_projection.weight":
      out["text_projection"] = x.T.copy()
    elif ".encoder.layers." in name:
      tower, rest = name.split("_model.encoder.layers.")
      layer, piece = rest.split(".", 1)
      base = ("visual.transformer.resblocks." if tower == "vision" else
              "transformer.resblocks.") + f"{layer}."
      if "self_attn.q_proj" in piece or "self_attn.k_proj" in piece or "self_attn.v_proj" in piece:
        kind = piece.rsplit(".", 1)[1]
        key = base + ("attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias")
        if key not in out:
          pre = f"{tower}_model.encoder.layers.{layer}.self_attn."
          out[key] = np.concatenate([hf_state[pre + f"{p}_proj.{kind}"] for p in "qkv"])
      else:
        mod, kind = piece.rsplit(".", 1)
        out[base + f"{inv_block[mod]}.{kind}"] = x
  return out


def test_open_clip_state_dict_loads_as_the_same_model(folder, tmp_path):
  from safetensors.numpy import save_file
  reader = wan_loading.open_folder(folder)
  hf_state = {k: reader[k] for k in reader.keys()}
  oc = open_clip_state(hf_state)
  assert "visual.transformer.resblocks.1.attn.in_proj_weight" in oc
  assert oc["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
  oc_dir = tmp_path / "open_clip"
  oc_dir.mkdir()
  save_file(oc, str(oc_dir / "open_clip_model.safetensors"))
  (oc_dir / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  ours = jax.tree.leaves(nnx_state(loading.load_clip(str(oc_dir))))
  ref = jax.tree.leaves(nnx_state(loading.load_clip(folder)))
  assert len(ours) == len(ref)
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A missing and a renamed tensor: one error naming both.
  del oc["ln_final.bias"]
  oc["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(32, np.float32)
  save_file(oc, str(oc_dir / "open_clip_model.safetensors"))
  with pytest.raises(wan_loading.WeightsError) as e:
    loading.load_clip(str(oc_dir))
  assert "text/final_layernorm/bias" in str(e.value)
  assert "visual.transformer.resblocks.0.ls_1.gamma" in str(e.value)


def nnx_state(module):
  from flax import nnx
  return nnx.state(module, nnx.Param)


VIT_L14 = dict(  # openai/clip-vit-large-patch14 (CLIPScore, the aesthetic predictor)
    projection_dim=768,
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=224, patch_size=14),
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77))


@pytest.mark.parametrize("name,hf,count", [
    ("ViT-L/14", VIT_L14, 427_616_513),
    ("ViT-H/14", loading.OPEN_CLIP_CONFIGS["ViT-H-14"], 986_109_441)])
def test_real_sizes_shape_only(name, hf, count):
  """Tensor names (through the name table) and shapes of our model equal transformers'
  CLIPModel's on the meta device; so do the parameter counts."""
  cfg = transformers.CLIPConfig(**hf)
  with torch.device("meta"):
    ref = transformers.CLIPModel(cfg)
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  converted, unexpected = wan_loading.convert_shapes(shapes, loading.CLIP_RULES,
                                                     loading.CLIP_IGNORE)
  assert unexpected == []
  ours = wan_loading.flat_abstract(nnx_state(clip_model.abstract_clip(
      clip_model.CLIPConfig.from_hf(cfg.to_dict()))))
  assert set(converted) == set(ours)
  assert {k: tuple(v.shape) for k, v in ours.items()} == converted
  n_ref = sum(p.numel() for p in ref.parameters())
  n_ours = sum(int(np.prod(v.shape)) for v in ours.values())
  assert n_ours == n_ref == count, (name, n_ours, n_ref)
