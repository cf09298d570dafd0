"""Keys and values appended in place to a DynamicCache (nanogpt_hf/kv_cache.py): the numbers of transformers' own
cache.update (its torch.cat) at every step, through growth, crop, reorder and reset; no tensor anyone holds ever
changes; buffers bounded by the block size; autograd and other caches left to cache.update. The speed is measured
by `nanogpt-bench --what generate`, not here."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache

import nanogpt_hf.modeling_nanogpt as modeling
from conftest import FP32_ATOL, FP32_RTOL, assert_greedy_choices, assert_greedy_sequence, tiny_config, tiny_model
from nanogpt_hf.kv_cache import append_keys_values

B, NH, HS, MAX_LENGTH = 2, 3, 4, 200


def chunk(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, NH, T, HS, generator=g), torch.randn(B, NH, T, HS, generator=g)


def both(ours, reference, T, seed):
    """Appends the same T positions to both caches (layers 0 and 1); ours' results equal cache.update's."""
    k, v = chunk(T, seed)
    for layer in (0, 1):
        got = append_keys_values(ours, k + layer, v - layer, layer, MAX_LENGTH)
        want = reference.update(k + layer, v - layer, layer)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert torch.equal(ours.layers[layer].keys, reference.layers[layer].keys)
        assert torch.equal(ours.layers[layer].values, reference.layers[layer].values)
    assert ours.get_seq_length() == reference.get_seq_length()


def capacity(cache, layer=0):
    """The positions the storage under a layer's keys holds: their length for torch.cat's tensors, more for a
    buffer with room after them."""
    keys = cache.layers[layer].keys
    return keys.untyped_storage().nbytes() // (keys[:, :, :1].numel() * keys.element_size())


@pytest.fixture
def with_cat():
    """A function running fn() with transformers' own cache.update (torch.cat) in place of append_keys_values."""
    def run(fn):
        original = modeling.append_keys_values
        modeling.append_keys_values = lambda cache, k, v, layer_idx, max_length: cache.update(k, v, layer_idx)
        try:
            return fn()
        finally:
            modeling.append_keys_values = original
    return run


@torch.no_grad()
def test_appends_equal_cache_updates_through_growth_crop_reorder_and_reset():
    ours, reference = DynamicCache(), DynamicCache()
    held = []  # every keys/values tensor handed out, with a copy of what it held then
    capacities = []
    sizes = [5, 1, 1, 3, 60, 1, 70, 1, 30]  # 172 positions: buffers of 70, 135, then 200 (the cap)
    for step, T in enumerate(sizes):
        both(ours, reference, T, seed=step)
        layer = ours.layers[0]
        held += [(t, t.clone()) for t in (layer.keys, layer.values)]
        if step:  # from the second step on, views of a buffer with room
            capacities.append(capacity(ours))
    assert sorted(set(capacities)) == [70, 135, 200]  # 64 more than needed, then the cap: max_length
    ours.crop(-4), reference.crop(-4)  # assisted decoding's rollback: the next step copies, not overwrites
    both(ours, reference, 2, seed=100)
    both(ours, reference, 1, seed=101)
    beams = torch.tensor([1, 0])
    ours.reorder_cache(beams), reference.reorder_cache(beams)  # beam search
    both(ours, reference, 1, seed=102)
    ours.batch_repeat_interleave(2), reference.batch_repeat_interleave(2)  # 4 sequences now
    ours.batch_select_indices(torch.tensor([0, 3])), reference.batch_select_indices(torch.tensor([0, 3]))
    both(ours, reference, 1, seed=103)
    for _ in range(30):  # past max_length: buffers exactly as long as needed (forward() refuses this beforehand)
        both(ours, reference, 1, seed=104)
    assert ours.get_seq_length() == capacity(ours) == 203
    ours.reset(), reference.reset()
    both(ours, reference, 3, seed=105)  # a fresh start: cache.update creates the layer again
    both(ours, reference, 1, seed=106)
    assert capacity(ours) == 68  # new buffers: 4 positions and room for 64
    assert all(torch.equal(t, copy) for t, copy in held)  # nothing handed out changed


def test_a_cache_filled_under_inference_mode_continues_under_no_grad():
    """pipeline-style inference_mode first, then generate's no_grad: inference tensors are copied, not written."""
    ours, reference = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        both(ours, reference, 3, seed=0)
        both(ours, reference, 1, seed=1)
        assert capacity(ours) > ours.get_seq_length() and ours.layers[0].keys.is_inference()
    with torch.no_grad():
        both(ours, reference, 1, seed=2)
        both(ours, reference, 1, seed=3)
    assert capacity(ours) > ours.get_seq_length() and not ours.layers[0].keys.is_inference()
    with torch.inference_mode():  # normal buffers may be written under inference_mode
        both(ours, reference, 1, seed=4)
        assert capacity(ours) > ours.get_seq_length() and not ours.layers[0].keys.is_inference()


def test_autograd_and_other_caches_take_cache_update():
    k, v = chunk(3, seed=0)
    cache = DynamicCache()
    append_keys_values(cache, k, v, 0, MAX_LENGTH)
    append_keys_values(cache, k, v, 0, MAX_LENGTH)  # autograd on: training's path is transformers' own
    assert capacity(cache) == cache.get_seq_length() == 6
    with torch.no_grad():
        static, reference = (StaticCache(config=tiny_config(), max_cache_len=16) for _ in range(2))
        got = append_keys_values(static, k, v, 0, MAX_LENGTH)
        assert all(torch.equal(g, w) for g, w in zip(got, reference.update(k, v, 0)))


@torch.no_grad()
def test_decoding_grows_buffers_in_place_with_cache_updates_logits(with_cat):
    """A model decoding past its buffers' growth: the logits of transformers' own cache.update (the same keys, only
    stored with room after them: attention reads them through other strides, so fp32 tolerance) and forward's over
    the whole sequence, both fed the same tokens."""
    model = tiny_model(seed=3, block_size=64)
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    ids = model.generate(prompt, 55, top_k=1)  # nanoGPT's API, greedy: 55 tokens, no end-of-text stop

    def decode():  # the next-token logits after each prefix of ids from the prompt on: (B, 55, V), and the cache
        cache = DynamicCache(config=model.config)
        return torch.stack([model.decode_logits(ids[:, :t], cache) for t in range(5, ids.size(1))], dim=1), cache

    logits, cache = decode()
    assert capacity(cache) == 64  # grown up to the block size
    ref_logits, ref_cache = with_cat(decode)
    assert capacity(ref_cache) == ref_cache.get_seq_length()  # the reference really took torch.cat
    torch.testing.assert_close(logits, ref_logits, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert_greedy_choices(ids[:, 5:], ref_logits)  # generate's tokens: greedy under the reference
    full = model(ids[:, :-1]).logits[:, 4:]  # teacher-forced: the predictions after the prompt
    torch.testing.assert_close(logits, full, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_beam_search_through_the_grown_cache_scores_as_theirs_with_torch_cat(with_cat):
    """Beam search reorders the cache every step: the best beams' scores of transformers' own cache."""
    model = tiny_model(seed=4, block_size=64)
    x = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=50, do_sample=False, pad_token_id=0, num_beams=3, output_scores=True,
              return_dict_in_generate=True)
    ours, theirs = model.generate(x, **kw), with_cat(lambda: model.generate(x, **kw))
    assert ours.sequences.shape == (2, 54)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("mode", [dict(return_dict_in_generate=True), dict(prompt_lookup_num_tokens=4), "assistant"])
def test_the_general_and_assisted_loops_decode_greedily_through_the_grown_cache(mode):
    """transformers' general loop (return_dict_in_generate) calls forward() with the cache; assisted decoding (prompt
    lookup, an assistant model) crops it after every rejected guess, so the crop's views are copied, not written
    over. Every token is a greedy choice of the model's own forward over the sequence (teacher forcing)."""
    model = tiny_model(seed=4, block_size=64)
    x = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    x = torch.cat([x, x], dim=1)  # a repeated prompt: prompt lookup finds candidates
    helper = dict(assistant_model=tiny_model(seed=5, block_size=64)) if mode == "assistant" else mode
    out = model.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0, **helper)
    ids = out.sequences if "return_dict_in_generate" in helper else out
    assert ids.shape == (1, 54)
    assert_greedy_sequence(ids, x.size(1), model)
