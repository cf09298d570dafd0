"""A decoding step's keys and values appended to transformers' DynamicCache without copying the cache.

DynamicCache's layers grow by torch.cat: every token copies all keys and values so far into new tensors, a cost
that grows with the context (at 6 layers x 384 and 900 tokens, twelve copies of 1.4 MB a token beside the 120 MB
of weights the step reads). Here a layer's keys and values are views of buffers with room to grow (a quarter more
than needed, at least 64 positions, up to the model's block_size: a bounded overhead in memory, a copy every few
dozen steps), and a step writes its own positions only. The cache stays a DynamicCache whose layers hold
plain tensors, so crop, reorder, get_seq_length and the rest work as before. Nothing anyone holds ever changes: a
step writes only positions no view has seen, and when a layer's tensors are no longer the written prefix of its
buffers (cropped, reordered, replaced, reset) the next step copies them into new buffers.

Outside autograd and torch.compile only, and only for a DynamicCache's plain layers; anything else is cache.update.
"""

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["append_keys_values"]

_ROOM = "_nanogpt_room"  # a layer's attribute: (key buffer, value buffer, positions written)


def append_keys_values(cache, key, value, layer_idx, max_length):
    """cache.update(key, value, layer_idx): all keys and values of the layer so far, (B, nh, S, hs) each."""
    layer = _growable_layer(cache, key, layer_idx)
    if layer is None:
        return cache.update(key, value, layer_idx)
    past, new = layer.keys.size(-2), key.size(-2)
    room = layer.__dict__.get(_ROOM)
    if not _is_written_prefix(layer, room) or past + new > room[0].size(-2):
        room = _copy_into_room(layer.keys, layer.values, past + new, max_length)
    keys, values, _ = room
    keys[:, :, past : past + new] = key
    values[:, :, past : past + new] = value
    layer.keys, layer.values = keys[:, :, : past + new], values[:, :, : past + new]  # (B, nh, S, hs) views
    setattr(layer, _ROOM, (keys, values, past + new))
    return layer.keys, layer.values


def _growable_layer(cache, key, layer_idx):
    """The cache's layer layer_idx where the keys can be appended in place; None where cache.update must run: the
    first step (the layer is created there), another cache or layer type, offloading, autograd, compiling."""
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False):
        layer.__dict__.pop(_ROOM, None)  # reset: its buffers are not needed any more
        return None
    keys = layer.keys
    if keys.dim() != 4 or keys.shape[:2] != key.shape[:2] or keys.size(-1) != key.size(-1) or keys.dtype != key.dtype:
        return None
    return layer


def _is_written_prefix(layer, room):
    """Whether the layer's keys and values are still the positions written into its buffers, nothing else, and the
    buffers may be written here (buffers made under torch.inference_mode may not be written outside it)."""
    if room is None:
        return False
    keys, values, written = room
    if keys.is_inference() and not torch.is_inference_mode_enabled():
        return False
    return (layer.keys.size(-2) == written and layer.keys.data_ptr() == keys.data_ptr()
            and layer.values.data_ptr() == values.data_ptr() and layer.keys.stride() == keys.stride()
            and layer.values.stride() == values.stride())


def _copy_into_room(keys, values, needed, max_length):
    """New buffers for at least `needed` positions (a quarter or 64 more, up to max_length), holding keys and values."""
    B, nh, past, hs = keys.shape
    capacity = max(needed, min(needed + max(64, needed // 4), max_length))
    room = []
    for t in (keys, values):
        buffer = t.new_empty(B, nh, capacity, hs)  # (B, nh, capacity, hs)
        buffer[:, :, :past] = t
        room.append(buffer)
    return room[0], room[1], past
