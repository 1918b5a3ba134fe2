"""Transformer streams and attention heads: LayerNorm over gated channels takes its statistics over
the active channels (so removing a channel is exact), and each attention head is one unit."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import torch.nn.functional as F

import vpsurgery
from vpsurgery.passes.gate.modules import ActiveLayerNorm, ActiveRMSNorm, gate_norm, ungate_norm
from conftest import assert_invariant, n_params, random_hard_gates, realistic_stats, rel_err


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.RMSNorm])
def test_a_norm_over_active_channels_is_the_norm_of_the_kept_channels(cls):
    torch.manual_seed(0)
    norm = cls(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-1, 1)
    keep = torch.tensor([0, 2, 3, 6])
    small = cls(4)
    small.load_state_dict({k: v[keep] for k, v in norm.state_dict().items()})
    x = torch.randn(5, 3, 8) * 3 + 1
    z = torch.zeros(8)
    z[keep] = 1.0
    gate_norm(norm, torch.arange(1, 9))  # position i reads z[i]
    assert isinstance(norm, (ActiveLayerNorm, ActiveRMSNorm))
    for mode in (norm.train, norm.eval):
        mode()
        assert torch.allclose(norm(x, z)[..., keep], small(x[..., keep]), atol=1e-5)
    norm.eval()
    ungate_norm(norm)
    assert type(norm) is cls and "vps_index" not in dict(norm.named_buffers())


def _vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


def test_vit_stream_and_heads_are_prunable_and_shrink_exactly():
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert plan.prunable_share >= 0.95, vpsurgery.report(gated)
    heads = [g for g in plan.groups.values() if any(p.endswith("self_attention.in_proj") for p in g.producers)]
    assert len(heads) == 2 and all(len(g.units) == 4 for g in heads)  # one unit per head, per layer
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-5
    gates = vpsurgery.gates(gated)
    gates[heads[0].name].set([1, 0, 1, 0])  # two heads of layer 0 go
    random_hard_gates(gated, 0.3, 0, sections=0.0)
    gates[heads[0].name].set([1, 0, 1, 0])
    small = assert_invariant(gated, x, smaller=True)
    attn = small.get_submodule(heads[0].producers[0])
    assert attn.out_features == 3 * 16 * 2  # q, k, v rows of two heads of 16
    assert small.get_submodule("encoder.ln").normalized_shape[0] < 64  # the stream itself shrank
    # the gated model trains: every gate gets a gradient
    gated.train()
    gated(x).logsumexp(-1).mean().backward()
    assert all(g.theta.grad is not None for g in vpsurgery.gates(gated).values())


def test_convnext_stream_is_prunable_exact_and_the_gated_model_is_the_model():
    torch.manual_seed(0)
    model = realistic_stats(torchvision.models.convnext_tiny(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    gated = vpsurgery.wrap(model, (x,))
    assert vpsurgery.plan(gated).prunable_share >= 0.95
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) == 0.0  # every z = 1: the plain norms, bit for bit
    random_hard_gates(gated, 0.5, 3, sections=0.3)
    small = assert_invariant(gated, x, smaller=True)
    assert n_params(small) < 0.5 * n_params(model)


def test_keep_gates_shrink_keeps_the_norms_gated_and_exact():
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    gated = vpsurgery.wrap(model, (x,))
    random_hard_gates(gated, 0.25, 4, sections=0.0, keep_one=True)
    ref = gated.eval()(x)
    again = vpsurgery.shrink(gated, keep_gates=True).eval()
    assert any(isinstance(m, ActiveLayerNorm) for m in again.modules())
    with torch.no_grad():
        assert rel_err(again(x), ref) <= 1e-5
        assert rel_err(vpsurgery.shrink(again)(x), ref) <= 1e-5


# ---------------------------------------------------------------- attention written with q/k/v Linears
class FusedQKV(nn.Module):
    """One qkv Linear reshaped to heads (timm's style), with a per-head q norm."""

    def __init__(self, dim, heads, fused):
        super().__init__()
        self.h, self.d, self.fused = heads, dim // heads, fused
        self.scale = self.d ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_norm(q)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SeparateQKV(nn.Module):
    """Separate q, k, v Linears viewed as heads (Hugging Face's style)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def heads(self, t, B, N):
        return t.view(B, N, self.h, self.d).transpose(1, 2)

    def forward(self, x):
        B, N, _ = x.size()
        q, k, v = (self.heads(f(x), B, N) for f in (self.q, self.k, self.v))
        w = torch.matmul(q, k.transpose(-1, -2)) / (self.d ** 0.5)
        o = torch.matmul(w.softmax(-1), v).transpose(1, 2).contiguous().view(B, N, self.h * self.d)
        return self.o(o)


class Block(nn.Module):
    """Embed, pre-norm attention and MLP with residuals, a mean-pooled head."""

    def __init__(self, attn, dim=32):
        super().__init__()
        self.emb, self.n1, self.attn, self.n2 = nn.Linear(8, dim), nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.emb(x)
        x = x + self.attn(self.n1(x))
        x = x + self.mlp(self.n2(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("attention", [lambda: FusedQKV(32, 4, fused=True), lambda: FusedQKV(32, 4, fused=False),
                                       lambda: SeparateQKV(32, 4)], ids=["fused-sdpa", "fused-matmul", "separate"])
def test_heads_of_linear_attention_are_units_and_shrink_exactly(attention):
    torch.manual_seed(0)
    model = Block(attention()).eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    heads = [g for g in plan.groups.values() if g.producers[0] in ("attn.qkv", "attn.q")]
    assert len(heads) == 1 and len(heads[0].units) == 4, vpsurgery.report(gated)
    assert plan.prunable_share > 0.95
    gates = vpsurgery.gates(gated)
    random_hard_gates(gated, 0.4, 1, sections=0.0)
    gates[heads[0].name].set([0, 1, 1, 0])
    small = assert_invariant(gated, x, smaller=True)
    first = small.get_submodule(heads[0].producers[0])
    assert first.out_features == (3 if isinstance(model.attn, FusedQKV) else 1) * 2 * 8  # two heads of 8


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_is_captured_where_its_attention_is_visible_and_shrinks_exactly(name):
    """torchvision's Swin hides attention in functions fx keeps whole; auto capture exports each of
    those calls alone and splices its ops into the fx graph, where every op has a rule. The graph
    finds what torch.export's whole-model graph finds. V2 adds cosine attention (F.normalize per
    head) and a q/k/v bias computed in forward (its k part zeroed)."""
    torch.manual_seed(0)
    model = realistic_stats(torchvision.models.get_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert plan.capture == "fx+export" and plan.prunable_share >= 0.95, vpsurgery.report(gated)
    assert not any("shifted_window" in str(n.target) for n in gated.graph.nodes if n.op == "call_function")
    heads = [g for g in plan.groups.values() if any(".attn.qkv" in p for p in g.producers)]
    assert len(heads) == 12 and sorted({len(g.units) for g in heads}) == [3, 6, 12, 24]  # per block
    exported = vpsurgery.plan(vpsurgery.wrap(model, (x,), capture="export"))
    assert sorted(len(g.units) for g in exported.groups.values()) == sorted(len(g.units) for g in plan.groups.values())
    assert exported.prunable_share == pytest.approx(plan.prunable_share)
    with torch.no_grad():
        assert gated(torch.randn(3, 3, 32, 32)).shape == (3, 10)  # the batch dim stays dynamic
        assert rel_err(gated(x), model(x)) <= 1e-5  # v2's computed bias is added after its layer
    random_hard_gates(gated, 0.4, 0, sections=0.3)
    small = assert_invariant(gated, x, smaller=True)
    assert n_params(small) < 0.6 * n_params(model)


class EinsumAttention(nn.Module):
    """q, k, v from one Linear, attention written with einsum (as in torchvision's MaxViT)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.h = nn.Linear(8, 48), nn.Linear(16, 5), 4

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, self.h, 4).permute(0, 2, 1, 3) for t in self.qkv(x).chunk(3, -1))
        weights = torch.einsum("b h i d, b h j d -> b h i j", q, k).softmax(-1)
        y = torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3).reshape(B, N, 16)
        return self.out(y).mean(1)


def test_einsum_attention_prunes_by_heads_exactly():
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,))
    groups = vpsurgery.plan(gated).groups
    assert [len(g.units) for g in groups.values()] == [4]  # one unit per head
    vpsurgery.gates(gated)[next(iter(groups))].set([1, 0, 0, 1])
    small = assert_invariant(gated, x, smaller=True)
    assert small.qkv.out_features == 3 * 2 * 4


def test_a_flops_target_counts_attention_products():
    """With long sequences q k^T and weights x v are a third of the MACs: a FLOP target must count
    them (torch's flop counter says what the shrunk model costs)."""
    from torch.utils.data import DataLoader, TensorDataset
    from vpsurgery.reporting import count_flops
    torch.manual_seed(0)
    model = Block(FusedQKV(32, 4, fused=True))
    x, y = torch.randn(128, 64, 8), torch.randint(0, 5, (128,))
    gated = vpsurgery.wrap(model, (x[:2],))
    dense = count_flops(model.eval(), x[:2])[0]
    products = sum(c.macs for c in vpsurgery.passes.analyse.cost.product_calls(gated)) * 2 * 2
    assert products > 0.25 * dense
    result = vpsurgery.fit(gated, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), None, epochs=4,
                           optimizer="adam", lr=0.01, target=0.5, per="flops", device="cpu", progress=False,
                           log=lambda line: None)
    share = count_flops(vpsurgery.shrink(result.model), x[:2])[0] / dense
    assert abs(share - 0.5) <= 0.05, share


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention with a causal attn_mask (a buffer) and a key_padding_mask (an input),
    as self-attention or as cross-attention onto a second stream."""

    def __init__(self, batch_first: bool, cross: bool, float_mask: bool = False):
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.emb, self.memory = nn.Linear(8, 32), nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.head = nn.Linear(32, 5)
        causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
        self.register_buffer("causal", torch.zeros(6, 6).masked_fill(causal, -1e4) if float_mask else causal)

    def forward(self, x, padding):
        return self.attend(x, padding, self.causal)

    def attend(self, x, padding, mask):
        h = self.emb(x)
        m = self.memory(x) if self.cross else h
        if not self.batch_first:
            h, m = h.transpose(0, 1), m.transpose(0, 1)
        y, _ = self.attn(h, m, m, key_padding_mask=padding, attn_mask=mask)
        return self.head((y if self.batch_first else y.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("cross, float_mask", [(False, False), (True, False), (False, True)],
                         ids=["self", "cross", "float-mask"])
def test_masked_and_cross_attention_prune_by_heads_exactly(batch_first, cross, float_mask):
    torch.manual_seed(0)
    model = MaskedAttention(batch_first, cross, float_mask).eval()
    x, padding = torch.randn(2, 6, 8), torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    gated = vpsurgery.wrap(model, (x, padding), capture="fx")
    plan = vpsurgery.plan(gated)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gated.modules())
    assert [len(g.units) for g in plan.groups.values()].count(4) == 1 and plan.prunable_share > 0.9, \
        vpsurgery.report(gated)
    with torch.no_grad():
        assert rel_err(gated(x, padding), model(x, padding)) <= 1e-6
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, padding, smaller=True)


class PerHeadMask(MaskedAttention):
    def forward(self, x, padding, per_head_mask):
        return self.attend(x, padding, per_head_mask)


def test_a_per_head_mask_keeps_the_attention_whole():
    """A (N*heads, L, S) mask would have to lose rows with the heads: the call is not split."""
    torch.manual_seed(0)
    model = PerHeadMask(True, False).eval()
    x, padding = torch.randn(2, 6, 8), torch.zeros(2, 6, dtype=torch.bool)
    per_head = torch.zeros(2 * 4, 6, 6, dtype=torch.bool)
    gated = vpsurgery.wrap(model, (x, padding, per_head), capture="fx")
    assert any(isinstance(m, nn.MultiheadAttention) for m in gated.modules())
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, padding, per_head)


class EncoderNet(nn.Module):
    """Transformer layers as a user stacks them: nn.TransformerEncoderLayer (a torch.nn layer fx
    would keep whole) whose attention drops weights (dropout=0.1 by default), which
    nn.MultiheadAttention applies in training only. `stacked`: the layers in nn.TransformerEncoder,
    whose forward fx cannot trace (it branches on `src.is_nested`)."""

    def __init__(self, stacked: bool = False):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
        self.stacked = stacked
        if stacked:
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.layers = nn.ModuleList([layer, copy.deepcopy(layer)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.emb(x)
        if self.stacked:
            x = self.encoder(x)
        else:
            for layer in self.layers:
                x = layer(x)
        return self.head(x.mean(1))


def test_transformer_layers_are_traced_into_and_their_attention_drops_in_training_only():
    torch.manual_seed(0)
    model = EncoderNet().eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,), capture="fx")
    plan = vpsurgery.plan(gated)
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in gated.modules())
    assert [len(g.units) for g in plan.groups.values()].count(4) == 2 and plan.prunable_share > 0.9, \
        vpsurgery.report(gated)
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
        heads = [m for m in gated.modules() if type(m).__name__ == "AttentionHeads"]
        assert len(heads) == 2 and all(h.dropout == 0.1 for h in heads)
        for h in heads:  # in training the attention weights are dropped: the same input differs
            h.train()
        assert rel_err(gated(x), model(x)) > 1e-3
        for h in heads:
            h.eval()
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, smaller=True)


def test_a_composite_layer_fx_cannot_trace_into_stays_whole_and_auto_exports_it():
    torch.manual_seed(0)
    model = EncoderNet(stacked=True).eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,), capture="fx")
    assert [n.target for n in gated.graph.nodes if n.op == "call_module"] == ["emb", "encoder", "head"]
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert plan.capture == "export" and plan.prunable_share > 0.9, vpsurgery.report(gated)
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, smaller=True)


class CausalAttention(nn.Module):
    """Causal self-attention as decoders call it (is_causal with the mask, no weights), and cross
    attention onto a memory of another width (kdim, vdim)."""

    def __init__(self):
        super().__init__()
        self.emb, self.memory = nn.Linear(8, 32), nn.Linear(8, 12)
        self.self_attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(32, 4, kdim=12, vdim=12, batch_first=True)
        self.head = nn.Linear(32, 5)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(6))

    def forward(self, x):
        h, m = self.emb(x), self.memory(x)
        h = h + self.self_attn(h, h, h, attn_mask=self.causal, is_causal=True, need_weights=False)[0]
        h = h + self.cross_attn(h, m, m)[0]
        return self.head(h.mean(1))


def test_causal_and_kdim_vdim_attention_prune_by_heads_exactly():
    torch.manual_seed(0)
    model = CausalAttention().eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,), capture="fx")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gated.modules())
    heads = {n: m.is_causal for n, m in gated.named_modules() if type(m).__name__ == "AttentionHeads"}
    assert heads == {"self_attn.heads": True, "cross_attn.heads": False}
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    plan = vpsurgery.plan(gated)
    assert [len(g.units) for g in plan.groups.values()].count(4) == 2 and plan.prunable_share > 0.9, \
        vpsurgery.report(gated)
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, smaller=True)


class DecoderNet(nn.Module):
    """A causal decoder as a user stacks it: nn.TransformerDecoderLayer (pre-norm) with a causal
    self-attention (tgt_is_causal) and cross-attention onto a memory."""

    def __init__(self):
        super().__init__()
        self.emb, self.memory = nn.Linear(8, 32), nn.Linear(8, 32)
        self.layers = nn.ModuleList([nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, norm_first=True)
                                     for _ in range(2)])
        self.head = nn.Linear(32, 5)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(6))

    def forward(self, x):
        h, memory = self.emb(x), self.memory(x)
        for layer in self.layers:
            h = layer(h, memory, tgt_mask=self.causal, tgt_is_causal=True)
        return self.head(h.mean(1))


def test_decoder_layers_prune_self_and_cross_attention_heads_exactly():
    torch.manual_seed(0)
    model = DecoderNet().eval()
    x = torch.randn(2, 6, 8)
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert plan.capture == "fx"
    causal = {n: m.is_causal for n, m in gated.named_modules() if type(m).__name__ == "AttentionHeads"}
    assert causal == {f"layers.{i}.{a}.heads": a == "self_attn" for i in range(2) for a in ("self_attn", "multihead_attn")}
    assert [len(g.units) for g in plan.groups.values()].count(4) == 4 and plan.prunable_share > 0.9, \
        vpsurgery.report(gated)
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    random_hard_gates(gated, 0.5, 0, sections=0.0)
    assert_invariant(gated, x, smaller=True)
