"""merged_products: the query, key and value projections as one product for a decoded token, the
gate and up projections as one product, checked in transformers' own decoder on the CPU against a
second copy of the checkpoint that nothing was merged in."""

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from livevlm_ros.engine.cuda.kernels.fused_layers import own_product
from livevlm_ros.engine.cuda.kernels.merged_products import QueryKeyValue, merge
from livevlm_ros.engine.models.base import cache_kwarg_name


def load(path):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def test_a_decoded_token_takes_one_query_key_value_product_and_the_logits_stay(tiny_model_path):
    reference, model = load(tiny_model_path), load(tiny_model_path)
    rows_seen = []
    for layer in model.model.language_model.layers:
        attn = layer.self_attn
        product = merge([attn.q_proj, attn.k_proj, attn.v_proj])
        assert product is not None
        both = product.keywords["weight"]
        assert attn.k_proj.weight.data_ptr() == both[attn.q_proj.out_features:].data_ptr()   # views, no copy
        assert attn.q_proj.bias is not None                            # Qwen2's projections carry biases

        def counted(x, product=product):
            rows_seen.append(x.numel() // x.shape[-1])
            return product(x)
        for linear, forward in QueryKeyValue(attn, counted, own_product).forwards():
            linear.forward = forward

    torch.manual_seed(0)
    prompt = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        ref_out, out = reference(input_ids=prompt, use_cache=True), model(input_ids=prompt, use_cache=True)
        assert rows_seen == []                         # six rows: each projection its own product
        torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)
        ref_cache, cache = ref_out.past_key_values, out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        kwarg = cache_kwarg_name(model.forward)        # past_key_values, or cache on newer transformers
        for _ in range(3):                             # decoded tokens, one row each: the merged product
            ref_out = reference(input_ids=token, use_cache=True, **{kwarg: ref_cache})
            out = model(input_ids=token, use_cache=True, **{kwarg: cache})
            torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
            token = out.logits[:, -1:].argmax(-1)
    layers = len(model.model.language_model.layers)
    assert rows_seen == [1] * (3 * layers)
    for ref_layer, layer in zip(reference.model.language_model.layers, model.model.language_model.layers):
        for name in ("k_proj", "v_proj"):              # the keys and values the cache holds are the same
            ref_k = getattr(ref_layer.self_attn, name).weight
            torch.testing.assert_close(getattr(layer.self_attn, name).weight, ref_k, rtol=0, atol=0)
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.values, ref_layer.values, rtol=1e-5, atol=1e-6)


def test_another_input_between_the_calls_takes_each_projections_own_product(tiny_model_path):
    """The held key and value answer only the tensor the query was computed from."""
    model = load(tiny_model_path)
    attn = model.model.language_model.layers[0].self_attn
    reference = {name: getattr(attn, name).weight.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    biases = {name: getattr(attn, name).bias.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    qkv = QueryKeyValue(attn, merge([attn.q_proj, attn.k_proj, attn.v_proj]), own_product)
    for linear, forward in qkv.forwards():
        linear.forward = forward
    x, other = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        q = attn.q_proj(x)
        k = attn.k_proj(other)                         # not x: its own product
        v = attn.v_proj(x)
        v_again = attn.v_proj(x)                       # the held value was taken once
    exact = {name: t @ reference[name].t() + biases[name] for name, t in (("q_proj", x), ("k_proj", other),
                                                                          ("v_proj", x))}
    torch.testing.assert_close(q, exact["q_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, exact["k_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, exact["v_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_again, exact["v_proj"], rtol=1e-5, atol=1e-6)


def test_linears_of_different_kinds_are_not_merged(tiny_model_path):
    model = load(tiny_model_path)
    layer = model.model.language_model.layers[0]
    before = layer.self_attn.o_proj.weight
    assert merge([layer.self_attn.o_proj, layer.mlp.down_proj]) is None          # input widths differ
    assert layer.self_attn.o_proj.weight is before
    assert merge([layer.self_attn.q_proj, layer.mlp.gate_proj]) is None          # bias and none


def test_weights_merged_before_are_taken_as_they_are():
    """models/quantize.py merges each group as soon as it is quantized; the fused layers' merge then
    finds the weights side by side and takes them without a copy (a copy would hold the group twice
    until the old tensors go, and cut holes in the device's memory when they do)."""
    from livevlm_ros.engine.cuda.kernels.merged_products import _side_by_side

    linears = [torch.nn.Linear(16, n, bias=False) for n in (8, 4, 4)]
    x = torch.randn(3, 16)
    expected = torch.cat([m(x) for m in linears], -1)
    product = merge(linears)
    merged = linears[0].weight.data_ptr()
    assert [m.weight.data_ptr() for m in linears] == [merged, merged + 8 * 16 * 4, merged + 12 * 16 * 4]
    again = merge(linears)                      # side by side already: the same storage, no copy
    assert again.keywords["weight"].data_ptr() == merged and again.keywords["weight"].shape == (16, 16)
    torch.testing.assert_close(again(x), expected)
    torch.testing.assert_close(product(x), expected)
    # columns side by side (an int4 weight's scales: [groups, outputs], merged along the outputs)
    whole = torch.randn(4, 10)
    parts = list(whole.split([6, 4], 1))
    assert _side_by_side(parts, 1).data_ptr() == whole.data_ptr() and torch.equal(_side_by_side(parts, 1), whole)
    apart = [torch.randn(4, 6), torch.randn(4, 4)]
    assert torch.equal(_side_by_side(apart, 1), torch.cat(apart, 1))
    assert torch.equal(_side_by_side([parts[1], parts[0]], 1), torch.cat([parts[1], parts[0]], 1))
