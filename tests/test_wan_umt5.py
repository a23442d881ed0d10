"""UMT5 text encoder of Wan2.1 against transformers' UMT5EncoderModel (tiny random configs)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from transformers import PreTrainedTokenizerFast
from transformers import UMT5Config as HFConfig
from transformers import UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from euphonium_jax import parallel
from euphonium_jax.models.wan import loading, umt5, umt5_prompts

# transformers' UMT5EncoderOnlyModelTester sizes, with max_distance 16 so that sequences of
# 20 tokens reach both the log-spaced and the clamped buckets.
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj='gated-gelu', is_encoder_decoder=False)
# float32 on both sides, 2 layers: the differences are summation order and the exp/tanh/rsqrt
# implementations, measured 2.6e-6 of the output scale. 1e-4 leaves a margin for other
# BLAS/XLA builds and still catches formula errors: a 1/sqrt(d_kv) scaling, transposed buckets
# or a mean-subtracting norm move the output by 0.3-0.8 of its scale, the erf gelu by 5e-4.
RTOL = 1e-4

WORDS = 'a red blue ball cat dog jumps over the fence slowly under bright sky'.split()


def reference_model(seed: int = 0) -> UMT5EncoderModel:
  """A random tiny encoder whose outputs depend on every parameter: norm scales away from 1,
  q/k large enough that attention is far from uniform, bias tables of unit scale."""
  torch.manual_seed(seed)
  model = UMT5EncoderModel(HFConfig(**TINY)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif name.endswith(('.q.weight', '.k.weight')):
        p.copy_(0.4 * torch.randn_like(p))
      elif 'relative_attention_bias' in name:
        p.copy_(torch.randn_like(p))
  return model


def reference_hidden(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy()


def state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if k != umt5.EMBED_TOKENS}


def write_folder(folder, tensors, config=TINY):
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, 'model.safetensors'))
  HFConfig(**config).to_json_file(os.path.join(folder, 'config.json'))
  return str(folder)


def padded_batch(rng, lengths, length, vocab=99):
  """Random ids [B, length] right-padded with 0 after each row's length, and the mask."""
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  ids = np.where(mask, rng.integers(2, vocab, (len(lengths), length)), 0).astype(np.int32)
  return ids, mask


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(reference model, its save_pretrained folder, our loaded encoder)."""
  model = reference_model()
  folder = str(tmp_path_factory.mktemp('umt5') / 'text_encoder')
  model.save_pretrained(folder)
  return model, folder, umt5.load_umt5(folder)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """A T5-like word-level tokenizer (pad 0, </s> 1 appended, unk 2) loaded from a folder."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}
  for w in WORDS:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single='$A </s>', special_tokens=[('</s>', 1)])
  folder = str(tmp_path_factory.mktemp('tokenizer'))
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='</s>',
                          unk_token='<unk>', padding_side='right').save_pretrained(folder)
  return umt5_prompts.load_tokenizer(folder)


encode = nnx.jit(lambda model, ids, mask: model.encode(ids, mask))


def test_parity_with_transformers(tiny):
  model, _, ours = tiny
  ids, mask = padded_batch(np.random.default_rng(0), [20, 13, 5, 1], 20)
  ref = reference_hidden(model, ids, mask)
  got = np.asarray(encode(ours, ids, mask))
  err = np.abs(got - ref).max()
  scale = np.abs(ref).max()
  print(f'UMT5 parity: max abs err {err:.3g}, max |ref| {scale:.3g}, rel {err / scale:.3g}')
  assert got.shape == ref.shape == (4, 20, TINY['d_model']) and got.dtype == np.float32
  assert err <= RTOL * scale
  # The padding mask matters: without it the padded rows differ by O(1).
  unmasked = np.asarray(encode(ours, ids, np.ones_like(mask)))
  assert np.abs(unmasked - ref)[1:].max() > 1e-2 * scale


def test_bfloat16_matmuls_stay_close(tiny):
  model, folder, _ = tiny
  ids, mask = padded_batch(np.random.default_rng(1), [16, 9], 16)
  ref = reference_hidden(model, ids, mask)
  got = np.asarray(encode(umt5.load_umt5(folder, compute='bfloat16'), ids, mask))
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  print(f'UMT5 bf16 matmuls: relative RMS error {rel:.3g}')
  # bf16 (8 mantissa bits) with this peaky attention: measured 0.04 (transformers' own bf16
  # model: 0.06); above 1e-3 shows the matmuls did run in bf16.
  assert got.dtype == np.float32 and 1e-3 < rel < 0.1


def test_sharded_load_matches(tiny):
  model, folder, _ = tiny
  mesh = parallel.make_mesh((1, -1), ('data', 'fsdp'))
  rules = (('embed', 'fsdp'), ('mlp', None), ('heads', None), ('vocab', None))
  ours = umt5.load_umt5(folder, mesh=mesh, logical_rules=rules)
  assert ours.embed.embedding[...].sharding.spec == P(None, 'fsdp')
  assert ours.blocks.ffn.wi_0.kernel[...].sharding.spec == P(None, 'fsdp', None)
  ids, mask = padded_batch(np.random.default_rng(2), [12, 7], 12)
  ref = reference_hidden(model, ids, mask)
  assert np.abs(np.asarray(encode(ours, ids, mask)) - ref).max() <= RTOL * np.abs(ref).max()


@pytest.mark.parametrize('buckets,distance', [(8, 16), (32, 128)])
def test_buckets_equal_reference(buckets, distance):
  cfg = HFConfig(**{**TINY, 'relative_attention_num_buckets': buckets,
                    'relative_attention_max_distance': distance})
  attn = UMT5Attention(cfg, has_relative_attention_bias=True)
  rel = np.arange(-700, 701)
  ref = attn._relative_position_bucket(torch.as_tensor(rel)).numpy()
  got = np.asarray(umt5.relative_position_bucket(jnp.asarray(rel), buckets, distance))
  np.testing.assert_array_equal(got, ref)
  assert got.min() == 0 and got.max() == buckets - 1


def test_prompt_embeds_zero_past_length(tiny, tokenizer):
  model, _, ours = tiny
  prompts = ['a red ball', '  the cat &amp;amp;\n jumps   over the fence ', '',
             ' '.join(WORDS)]  # 15 words + </s>: truncated to 12 tokens
  out = umt5_prompts.prompt_embeds(ours, tokenizer, prompts, max_length=12)
  tokens, keep = np.asarray(out['tokens']), np.asarray(out['mask'])
  assert out['pooled'] is None and tokens.shape == (4, 12, 32) and keep.dtype == bool
  np.testing.assert_array_equal(keep.sum(1), [4, 8, 1, 12])  # words + </s>; '&' is <unk>
  assert np.all(tokens[~keep] == 0.0)
  ids, mask = umt5_prompts.tokenize_prompts(tokenizer, prompts, 12)
  assert ids[2, 0] == 1 and ids[1, 2] == 2 and ids[3, -1] == 1  # </s>, <unk>, kept </s>
  np.testing.assert_array_equal(tokens[keep], np.asarray(encode(ours, ids, mask))[keep])
  # Wan's _get_t5_prompt_embeds on the reference encoder: trim to seq_len, re-pad with zeros.
  hidden = torch.as_tensor(reference_hidden(model, ids, mask))
  seq_lens = torch.as_tensor(mask).sum(1)
  ref = torch.stack([torch.cat([u[:v], u.new_zeros(12 - v, u.size(1))])
                     for u, v in zip(hidden, seq_lens)]).numpy()
  assert np.abs(tokens - ref).max() <= RTOL * np.abs(ref).max()


def test_clean_prompt():
  assert umt5_prompts.clean_prompt('  a\n\tred &amp;amp; <b>ball</b>  ') == 'a red & <b>ball</b>'


def test_cache_prompt_embeds(tiny, tokenizer, tmp_path):
  _, _, ours = tiny
  prompts = ['a red ball', 'the dog jumps', 'sky']
  first = umt5_prompts.cache_prompt_embeds(str(tmp_path), ours, tokenizer, prompts,
                                           model_id='tiny', max_length=10)
  direct = umt5_prompts.prompt_embeds(ours, tokenizer, prompts, max_length=10)
  np.testing.assert_array_equal(first['tokens'], np.asarray(direct['tokens']))
  np.testing.assert_array_equal(first['mask'], np.asarray(direct['mask']))
  assert first['pooled'] is None and len(os.listdir(tmp_path)) == 1
  # A second call reads the file: a zeroed model would give other embeddings.
  graphdef, state = nnx.split(ours)
  zeroed = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
  again = umt5_prompts.cache_prompt_embeds(str(tmp_path), zeroed, tokenizer, prompts,
                                           model_id='tiny', max_length=10)
  np.testing.assert_array_equal(again['tokens'], first['tokens'])
  np.testing.assert_array_equal(again['mask'], first['mask'])
  # Another max_length, model id or prompt set is another key, hence another file.
  other = umt5_prompts.cache_prompt_embeds(str(tmp_path), zeroed, tokenizer, prompts,
                                           model_id='tiny', max_length=8)
  assert other['tokens'].shape == (3, 8, 32) and np.all(other['tokens'] == 0)
  umt5_prompts.cache_prompt_embeds(str(tmp_path), zeroed, tokenizer, prompts[:2],
                                   model_id='tiny', max_length=10)
  umt5_prompts.cache_prompt_embeds(str(tmp_path), zeroed, tokenizer, prompts,
                                   model_id='other', max_length=10)
  assert len(os.listdir(tmp_path)) == 4
  # An explicit .npz path works the same way.
  path = str(tmp_path / 'sub' / 'set.npz')
  np.testing.assert_array_equal(umt5_prompts.cache_prompt_embeds(
      path, ours, tokenizer, prompts, model_id='tiny', max_length=10)['tokens'], first['tokens'])
  np.testing.assert_array_equal(umt5_prompts.cache_prompt_embeds(
      path, zeroed, tokenizer, prompts, model_id='tiny', max_length=10)['tokens'],
      first['tokens'])


def test_weights_errors_name_every_key(tiny, tmp_path):
  model, _, _ = tiny
  tensors = state_dict_np(model)
  del tensors['encoder.final_layer_norm.weight']
  tensors['encoder.block.0.layer.0.SelfAttention.extra.weight'] = np.zeros((2, 2), np.float32)
  for i in range(2):
    name = f'encoder.block.{i}.layer.1.DenseReluDense.wo.weight'
    tensors[name] = tensors[name][:, :36].copy()
  folder = write_folder(tmp_path / 'bad', tensors)
  with pytest.raises(loading.WeightsError) as err:
    umt5.load_umt5(folder)
  msg = str(err.value)
  assert 'final_norm/scale' in msg  # missing
  assert 'encoder.block.0.layer.0.SelfAttention.extra.weight' in msg  # unexpected
  assert 'blocks/ffn/wo/kernel: weights (2, 36, 32), model (2, 37, 32)' in msg  # mis-shaped
  # A block missing in the middle of the stack is named too.
  tensors = state_dict_np(model)
  del tensors['encoder.block.0.layer.0.SelfAttention.q.weight']
  with pytest.raises(loading.WeightsError, match='blocks/attn/q/kernel'):
    umt5.load_umt5(write_folder(tmp_path / 'gap', tensors))
  # So is one block of the stack with another shape (not numpy's anonymous stacking error).
  tensors = state_dict_np(model)
  tensors['encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight'] = np.zeros(
      (7, 4), np.float32)
  with pytest.raises(loading.WeightsError, match=r'blocks/attn/rel_bias: layers differ'):
    umt5.load_umt5(write_folder(tmp_path / 'one', tensors))
  names = {k: v.shape for k, v in tensors.items()}
  with pytest.raises(loading.WeightsError, match=r'blocks/attn/rel_bias: layers differ'):
    loading.convert_shapes(names, umt5.UMT5_RULES)


def test_tied_embedding_names(tiny, tmp_path):
  model, _, ours = tiny
  tensors = state_dict_np(model)
  shared = tensors.pop(umt5.SHARED)
  ids, mask = padded_batch(np.random.default_rng(3), [9, 4], 9)
  want = np.asarray(encode(ours, ids, mask))
  alias = write_folder(tmp_path / 'alias', {**tensors, umt5.EMBED_TOKENS: shared})
  both = write_folder(tmp_path / 'both',
                      {**tensors, umt5.SHARED: shared, umt5.EMBED_TOKENS: shared})
  for folder in (alias, both):
    got = umt5.load_umt5(folder)
    np.testing.assert_array_equal(np.asarray(got.embed.embedding[...]), shared)
    np.testing.assert_array_equal(np.asarray(encode(got, ids, mask)), want)
  differ = write_folder(tmp_path / 'differ',
                        {**tensors, umt5.SHARED: shared, umt5.EMBED_TOKENS: shared + 1})
  with pytest.raises(loading.WeightsError, match='shared.weight and encoder.embed_tokens'):
    umt5.load_umt5(differ)


def test_umt5_xxl_shapes_match_reference():
  """google/umt5-xxl (Wan2.1's encoder): names, shapes and count, nothing allocated."""
  config = HFConfig(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                    num_heads=64, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj='gated-gelu',
                    tie_word_embeddings=False, is_encoder_decoder=False)
  with torch.device('meta'):
    ref = UMT5EncoderModel(config)
  ref_count = sum(p.numel() for p in ref.parameters())  # tied embedding counted once
  ours = loading.flat_abstract(nnx.state(umt5.abstract_umt5(umt5.UMT5Config.from_hf(
      config.to_dict()))))
  our_count = sum(int(np.prod(leaf.shape)) for leaf in ours.values())
  print(f'UMT5-XXL parameters: reference {ref_count:,}, ours {our_count:,}')
  v, d, f, n, h, b = 256384, 4096, 10240, 24, 64, 32  # d_kv * heads = d_model here
  assert our_count == ref_count == v * d + n * (4 * d * d + b * h + 2 * d + 3 * d * f) + d
  names = {k: tuple(p.shape) for k, p in ref.named_parameters()}
  assert umt5.SHARED in names and umt5.EMBED_TOKENS not in names
  shapes, unexpected = loading.convert_shapes(names, umt5.UMT5_RULES)
  assert unexpected == []
  assert shapes == {k: tuple(leaf.shape) for k, leaf in ours.items()}
  # The state dict also names the tied alias; it maps to the same parameter.
  shapes, unexpected = loading.convert_shapes(
      {k: tuple(v.shape) for k, v in ref.state_dict().items()}, umt5.UMT5_RULES)
  assert unexpected == [] and set(shapes) == set(ours)
