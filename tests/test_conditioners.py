"""Cross-attention conditioning (issue 12): conditioners (class tokens, a text encoder trained from
scratch, a Hugging Face text encoder), the spatial transformer and the U-Net that attends to them.
"""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from diffusers_kit.checkpoint import load_checkpoint, save_checkpoint
from diffusers_kit.conditioners import (
    ClassTokens,
    Conditioner,
    HFTextEncoder,
    TextConditioner,
    WordTokenizer,
)
from diffusers_kit.guidance import ClassifierFree
from diffusers_kit.model import ScoreModel
from diffusers_kit.networks import UNet
from diffusers_kit.networks.attention import (
    SelfAttention,
    SpatialTransformer,
    multi_head_attention,
)
from diffusers_kit.processes import VP
from diffusers_kit.registry import get_registry
from tests.helpers import TINY_SPEC, run_cli, word_tokenizer, write_spec

SHAPE = (1, 8, 8)


def small_unet(conditioner: Conditioner | None = None, **kwargs) -> UNet:  # type: ignore[no-untyped-def]
    settings = dict(channels=16, channel_mult=[1, 2], res_blocks=1, attention_resolutions=[4],
                    heads=2, dropout=0.0, data_shape=SHAPE)
    return UNet(**{**settings, **kwargs}, conditioner=conditioner)


def switch_on(net: torch.nn.Module) -> None:
    """Parameters that start at zero (the last layer of every residual branch, biases) drawn at
    random instead, so that every branch, the cross-attention included, changes the output."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.1)


# -- the tiny Hugging Face model, built offline ------------------------------------------------
HF_WORDS = ["a", "handwritten", "zero", "one", "two", "three", "four", "five", "six", "seven",
            "eight", "nine", "bright", "square"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A randomly initialised one-layer CLIP text model and a word-level tokenizer, saved with
    save_pretrained: nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    fast = word_tokenizer(HF_WORDS)
    vocab = fast.get_vocab()
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    transformers.CLIPTextModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def hf_text(folder, **kwargs):  # type: ignore[no-untyped-def]
    return HFTextEncoder(path=str(folder), tokens=8, dim=16, **kwargs)


CONDITIONERS = {
    "class_tokens": lambda folder: ClassTokens(num_classes=10, tokens=3, dim=16),
    "text": lambda folder: TextConditioner(tokens=4, dim=16, layers=1, heads=2),
    "hf_text": lambda folder: hf_text(folder),
}


@pytest.fixture(params=list(CONDITIONERS))
def make_conditioner(request):  # type: ignore[no-untyped-def]
    folder = request.getfixturevalue("hf_folder") if request.param == "hf_text" else None
    return lambda: CONDITIONERS[request.param](folder)


# -- conditioners ------------------------------------------------------------------------------
def test_context_has_batch_tokens_dim_and_y_none_is_the_null_label(make_conditioner):
    torch.manual_seed(0)
    conditioner = make_conditioner().eval()
    assert conditioner.num_classes == 10
    y = torch.tensor([0, 3, 9, 3, 10])
    context = conditioner(y, 5, torch.device("cpu"))
    assert context.shape == (5, conditioner.tokens, conditioner.dim)
    assert torch.equal(context[1], context[3]), "one context per label"
    assert not torch.allclose(context[0], context[1]), "labels are told apart"
    null = conditioner(None, 2, torch.device("cpu"))
    assert null.shape == (2, conditioner.tokens, conditioner.dim)
    torch.testing.assert_close(null[0], context[4])
    torch.testing.assert_close(null[1], context[4])
    # more captions than samples: the per-sample path gives the same contexts
    torch.testing.assert_close(conditioner(y[:2], 2, torch.device("cpu")), context[:2])


def test_label_dropout_replaces_labels_by_the_null_label_in_training_only(make_conditioner):
    torch.manual_seed(0)
    conditioner = make_conditioner()
    device = torch.device("cpu")
    y = torch.randint(0, 10, (2000,))
    conditioner.drop_prob = 0.5
    conditioner.train()
    dropped = (conditioner.labels(y, len(y), device) == conditioner.null_class).float().mean()
    assert 0.4 < dropped < 0.6  # binomial(2000, 0.5): 0.1 is 9 standard deviations
    conditioner.drop_prob = 1.0
    null = conditioner(None, 1, device)
    torch.testing.assert_close(conditioner(y[:4], 4, device), null.expand(4, -1, -1))
    conditioner.eval()
    assert torch.equal(conditioner.labels(y, len(y), device), y)


def test_class_tokens_null_label_starts_at_the_positional_component_alone():
    conditioner = ClassTokens(num_classes=5, tokens=3, dim=8)
    null = conditioner(None, 1, torch.device("cpu"))[0]
    assert torch.equal(null, conditioner.positions.detach())


def test_tokenizer_round_trip_unknown_words_and_truncation():
    tokenizer = WordTokenizer(["a handwritten  ", "zero", "seven", "sports car"], length=5)
    assert tokenizer.vocabulary[:3] == ["<pad>", "<unk>", "<start>"]
    assert tokenizer.vocabulary[3:] == sorted(tokenizer.vocabulary[3:])
    captions = ["a handwritten seven", "A Sports car", "", "zero"]
    ids = tokenizer.tokenize(captions)
    assert ids.dtype == torch.long and ids.shape == (4, 5)
    assert tokenizer.decode(ids) == ["a handwritten seven", "a sports car", "", "zero"]
    assert ids[:, 0].eq(tokenizer.index["<start>"]).all(), "every caption starts with <start>"
    unknown = tokenizer.tokenize(["a purple seven"])[0]
    assert unknown.tolist() == [2, tokenizer.index["a"], 1, tokenizer.index["seven"], 0]
    long = tokenizer.tokenize(["zero zero zero zero zero zero"])[0]
    assert long.tolist() == [2] + [tokenizer.index["zero"]] * 4
    # built deterministically from the words, whatever their order
    again = WordTokenizer(["sports car", "seven", "zero", "a handwritten"], length=5)
    assert again.vocabulary == tokenizer.vocabulary


def test_text_conditioner_captions_free_text_and_the_empty_caption():
    torch.manual_seed(0)
    text = TextConditioner(names=["cat", "dog"], template="a photo of a {}.", tokens=8, dim=16,
                           layers=1, heads=2).eval()
    assert text.num_classes == 2
    assert text.tokenizer.decode(text.caption_ids) == ["a photo of a cat .", "a photo of a dog .",
                                                       ""]
    labels = text(torch.tensor([1, 0, 2]), 3, torch.device("cpu"))
    free = text.encode_text(["a photo of a dog.", "A photo of a CAT .", ""])
    torch.testing.assert_close(free, labels)
    unknown = text.encode_text(["a photo of a horse."])
    assert not torch.allclose(unknown, labels[:1]), "an unknown word is not a known one"
    assert torch.equal(text.tokenize(["horse"])[0, 1], torch.tensor(1))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"template": "a handwritten digit"}, "exactly once"),
    ({"names": ["seven", "Seven"]}, "same caption"),
    ({"names": ["seven", "  "]}, "has no word"),
    ({"tokens": 3}, "tokens: expected at least 4: the caption"),
    ({"dim": 10, "heads": 4}, "heads: expected a divisor of dim \\(10\\), given 4"),
])
def test_text_conditioner_refuses_what_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextConditioner(**kwargs)


def test_every_conditioner_number_is_bounded():
    from tests import test_hardening_more

    test_hardening_more.test_every_built_in_number_has_a_lower_and_an_upper_bound("conditioner")


# -- attention ---------------------------------------------------------------------------------
def test_multi_head_attention_is_softmax_qk_v_per_head():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 6), torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    out = multi_head_attention(q, k, v, heads=2)
    for head in range(2):
        part = slice(3 * head, 3 * head + 3)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 3**0.5, dim=-1)
        torch.testing.assert_close(out[..., part], weights @ v[..., part])


def test_self_attention_computes_what_the_unet_block_computed_before_the_move():
    """The U-Net's attention moved to networks/attention.py: same parameters, same function,
    so checkpoints written before load and behave the same."""
    torch.manual_seed(0)
    block = SelfAttention(16, heads=4, groups=4)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(3, 16, 4, 4)

    def before(x: torch.Tensor) -> torch.Tensor:  # the forward of the old unet.SelfAttention
        b, c, h, w = x.shape
        q, k, v = block.qkv(block.norm(x)).reshape(b, 3, 4, c // 4, h * w).unbind(1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + block.proj(out.transpose(-1, -2).reshape(b, c, h, w))

    torch.testing.assert_close(block(x), before(x))


def test_a_fresh_spatial_transformer_is_the_identity_and_then_attends_to_the_context():
    torch.manual_seed(0)
    block = SpatialTransformer(16, heads=2, context_dim=8, depth=2, groups=4)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)
    assert torch.equal(block(x, context), x)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    changed = block(x, context)
    assert not torch.allclose(changed, x)
    assert not torch.allclose(block(x, context + 1.0), changed), "the context matters"
    # the context's order does not (keys and values are a set to attention)
    torch.testing.assert_close(block(x, context.flip(1)), changed)


# -- the U-Net ---------------------------------------------------------------------------------
# The state dicts of the U-Net before issue 12 (snapshot taken from the code as it was): key
# count and sha256 of the sorted "key shape" lines. The default network and the class-embedding
# one must not change, so that old checkpoints still load.
STATE_BEFORE = {
    "UNet(data_shape=(3, 8, 8))":
        (184, "c51352e7ff22fd493f19f0f5d26f13327e49352f01c39397d08abb36864797fe"),
    "UNet(data_shape=(3, 8, 8), num_classes=10, class_dropout=0.1)":
        (185, "1234c3bdb5a1dbdf019dd7f6391fa91f50e81079c5d0db2726784021a7011cd4"),
}


@pytest.mark.parametrize("call", list(STATE_BEFORE))
def test_the_unet_without_a_conditioner_keeps_its_state_dict_keys(call):
    count, digest = STATE_BEFORE[call]
    state = eval(call, {"UNet": UNet}).state_dict()
    lines = sorted(f"{k} {tuple(v.shape)}" for k, v in state.items())
    assert len(lines) == count
    assert not any("conditioner" in k or "layers" in k for k in state)
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


def test_num_classes_and_a_conditioner_must_agree():
    with pytest.raises(ValueError, match=r"num_classes: expected the conditioner's num_classes "
                       r"\(10\).*given 7"):
        small_unet(ClassTokens(num_classes=10, dim=8), num_classes=7)
    net = small_unet(ClassTokens(num_classes=10, dim=8), num_classes=10, class_dropout=0.2)
    assert net.num_classes == 10 and net.classes is None, "no class embedding beside the tokens"
    assert net.conditioner.drop_prob == 0.2
    assert isinstance(net.mid_attn, SpatialTransformer)
    assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) == 4  # 1 + 2 + mid
    assert not any(isinstance(m, SelfAttention) for m in net.modules())


def test_a_conditioned_unet_learns_to_depend_on_the_label_in_a_few_steps(make_conditioner):
    torch.manual_seed(0)
    net = small_unet(make_conditioner(), class_dropout=0.1)
    x, t = torch.randn(6, *SHAPE), torch.rand(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    same_x = x[:1].expand(6, -1, -1, -1)
    same_t = t[:1].expand(6)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a nonzero output, still label-blind
    net.eval()
    with torch.no_grad():
        fresh = net(same_x, same_t, y)
    torch.testing.assert_close(fresh, fresh[:1].expand_as(fresh), msg="fresh: the identity")
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn(3, *SHAPE)[y]  # a different target per label
    net.train()
    for _ in range(5):
        optimizer.zero_grad()
        (net(x, t, y) - target).square().mean().backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        out = net(same_x, same_t, y)
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[1] - out[2]).abs().max() > 1e-4
    torch.testing.assert_close(out[:3], out[3:])


def quadrant_images(y: torch.Tensor, side: int = 4) -> torch.Tensor:
    """``side x side`` images at -1 with the quadrant of their class (0..3) at +1."""
    images = -torch.ones(len(y), 1, side, side)
    half = side // 2
    for c in range(4):
        row, col = divmod(c, 2)
        images[y == c, :, half * row:half * (row + 1), half * col:half * (col + 1)] = 1.0
    return images


def quadrant_means(x: torch.Tensor) -> torch.Tensor:
    """(batch, 4): the mean of each quadrant."""
    return torch.nn.functional.avg_pool2d(x, x.shape[-1] // 2).flatten(1)


@pytest.mark.parametrize("name", ["class_tokens", "text"])
def test_a_short_training_learns_the_class_only_cross_attention_tells_it(name):
    """8x8 images whose class (0..3) is the bright quadrant. The label reaches the network only
    through cross-attention, and at t = 0.9 ``x_t`` carries almost nothing of ``x_0``
    (``alpha ~ 0.02``): an x0 prediction that lights up the class's quadrant is learned from the
    context alone, and the null label's is the average image (-0.5 in every quadrant).

    The loss is the simple loss in x0 units (the network predicts x0): in eps units the x0
    error at t = 0.9 weighs ``alpha^2 / sigma^2 ~ 3e-4``, and a short training would not learn
    the regime where only the label tells the class. (200 steps: every one of 8 seeds tried
    learns all four classes, with margins 3x those asserted; 150 steps did not always.)"""
    torch.manual_seed(0)
    conditioner = (ClassTokens(num_classes=4, tokens=2, dim=16) if name == "class_tokens" else
                   TextConditioner(names=["top left", "top right", "bottom left", "bottom right"],
                                   template="a bright {} square", tokens=6, dim=16, layers=1,
                                   heads=2))
    net = small_unet(conditioner, channels=8, class_dropout=0.3, prediction="x0")
    model = ScoreModel(VP(), net)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(200):
        y = torch.randint(0, 4, (32,))
        x0 = quadrant_images(y, side=8)
        t = torch.rand(32) * 0.98 + 0.01
        x_t, _ = model.process.marginal_sample(x0, t)
        loss = (model.predict(x_t, t, "x0", y) - x0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    y = torch.arange(4).repeat_interleave(16)
    t = torch.full((64,), 0.9)
    x_t, _ = model.process.marginal_sample(quadrant_images(y, side=8), t)
    with torch.no_grad():
        x0 = quadrant_means(model.predict(x_t, t, "x0", y))
        unconditional = quadrant_means(model.predict(x_t, t, "x0"))
    assert torch.equal(x0.argmax(dim=1), y), "every prediction lights up its class's quadrant"
    bright = x0.gather(1, y[:, None]).squeeze(1)
    dark = (x0.sum(dim=1) - bright) / 3
    assert bright.min() > 0.3 and dark.max() < -0.5, (bright.min(), dark.max())
    assert (unconditional.mean(dim=0) + 0.5).abs().max() < 0.3, unconditional.mean(dim=0)


def test_classifier_free_guidance_accepts_the_conditioned_unet():
    torch.manual_seed(0)
    net = small_unet(ClassTokens(num_classes=10, tokens=2, dim=8), class_dropout=0.1)
    model = ScoreModel(VP(), net)
    assert ClassifierFree(scale=3.0).check(model) is None
    blind = ScoreModel(VP(), small_unet(ClassTokens(num_classes=10, dim=8)))
    assert "class_dropout" in ClassifierFree(scale=3.0).check(blind)
    switch_on(net)
    model.eval()  # (a guided view takes the model's mode, and sets the shared network's)
    x, t, y = torch.randn(4, *SHAPE), torch.rand(4), torch.tensor([1, 2, 3, 1])
    with torch.no_grad():
        guided = model.guided([ClassifierFree(scale=3.0)], y).predict(x, t, "eps")
        cond, uncond = model.predict(x, t, "eps", y), model.predict(x, t, "eps")
    assert (cond - uncond).abs().max() > 1e-2, "the label matters"
    # batched [x; x] with [y; null] vs two calls: float32 rounding, times w = 3
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_a_conditioned_unet_round_trips_through_a_checkpoint(tmp_path, make_conditioner):
    torch.manual_seed(0)
    net = small_unet(make_conditioner(), class_dropout=0.1)
    switch_on(net)
    assert not any(k.endswith("caption_ids") for k in net.state_dict()), "derived, not saved"
    save_checkpoint(tmp_path / "c.safetensors", net.state_dict())
    torch.manual_seed(1)
    again = small_unet(make_conditioner(), class_dropout=0.1)
    again.load_state_dict(load_checkpoint(tmp_path / "c.safetensors")[0])
    x, t, y = torch.randn(3, *SHAPE), torch.rand(3), torch.tensor([4, 10, 7])
    net.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), net(x, t, y))


# -- nested construction from a spec -----------------------------------------------------------
def test_the_registry_builds_a_unet_with_a_nested_conditioner():
    registry = get_registry()
    assert {"class_tokens", "text", "hf_text"} <= set(registry.kinds["conditioner"].components)
    assert registry.get("network", "unet").nested["conditioner"].kind == "conditioner"
    net = registry.build("network", {"kind": "unet", "channels": 8, "class_dropout": 0.1,
                                     "conditioner": {"kind": "class_tokens", "num_classes": 10}},
                         data_shape=SHAPE)
    assert isinstance(net.conditioner, ClassTokens) and net.num_classes == 10
    assert net.conditioner.drop_prob == 0.1
    text = registry.build("network", {"kind": "unet", "channels": 8, "conditioner": {
        "kind": "text", "names": ["cat", "dog"], "template": "a {}", "layers": 1}},
        data_shape=SHAPE)
    assert text.num_classes == 2 and text.conditioner.tokenizer.vocabulary[3:] == ["a", "cat",
                                                                                   "dog"]


UNET_WITH = ("network: {kind: unet, channels: 8, channel_mult: [1, 2], res_blocks: 1, "
             "class_dropout: 0.1, conditioner: CONDITIONER}")


@pytest.mark.parametrize(("conditioner", "problem"), [
    ("{kind: class_tokens, num_classes: 10}", None),
    ("{kind: text, template: 'a handwritten {}', layers: 1}", None),
    ("{kind: class_tokens, num_classes: 10, tokens: 0}", "network.conditioner.tokens"),
    ("{kind: text, layers: 100}", "network.conditioner.layers"),
    ("{kind: class_tokns}", "network.conditioner.kind"),
])
def test_dkit_validate_checks_the_nested_conditioner(tmp_path, capsys, conditioner, problem):
    text = TINY_SPEC.replace("network: {kind: ncsn, channels: 8, blocks: 1}",
                             UNET_WITH.replace("CONDITIONER", conditioner))
    assert "conditioner" in text
    code, out, err = run_cli(["validate", str(write_spec(tmp_path, text))], capsys)
    if problem is None:
        assert code == 0, err
    else:
        assert code == 2 and problem in " ".join(err.split()), err
        assert "Traceback" not in out + err


# -- the Hugging Face encoder ------------------------------------------------------------------
def test_hf_text_is_frozen_by_default_and_trains_only_its_projection(hf_folder):
    torch.manual_seed(0)
    conditioner = hf_text(hf_folder)
    assert conditioner.tokenizer.decode(conditioner.caption_ids[7], skip_special_tokens=True) \
        == "a handwritten seven"
    assert not any(p.requires_grad for p in conditioner.encoder.parameters())
    conditioner.train()
    assert not conditioner.encoder.training, "a frozen encoder keeps dropout off"
    conditioner(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]), 12,
                torch.device("cpu")).square().sum().backward()
    assert conditioner.projection.weight.grad is not None
    assert all(p.grad is None for p in conditioner.encoder.parameters())
    null = conditioner(None, 1, torch.device("cpu"))
    torch.testing.assert_close(conditioner.encode_text([""]), null)
    torch.testing.assert_close(conditioner.encode_text(["a handwritten two"]),
                               conditioner(torch.tensor([2]), 1, torch.device("cpu")))
    tuned = hf_text(hf_folder, fine_tune=True).train()
    assert tuned.encoder.training
    tuned(torch.tensor([3]), 1, torch.device("cpu")).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.encoder.parameters())


def test_hf_text_recomputes_its_cache_when_weights_are_loaded(hf_folder):
    torch.manual_seed(0)
    a, b = hf_text(hf_folder).eval(), hf_text(hf_folder).eval()
    with torch.no_grad():
        for p in b.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        b._cache = None
    device = torch.device("cpu")
    before = a(None, 12, device)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(None, 12, device), b(None, 12, device))
    assert not torch.allclose(a(None, 12, device), before)


def test_hf_text_errors_are_clear(hf_folder, tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        hf_text(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a Hugging Face text model"):
        hf_text(tmp_path / "empty")
    with pytest.raises(ValueError, match="too short"):
        hf_text(hf_folder, template="a handwritten {} " + "square " * 6)
    with pytest.raises(ValueError, match=r"tokens: expected at most the 32 positions.*given 33"):
        HFTextEncoder(path=str(hf_folder), tokens=33)


def test_hf_text_without_transformers_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ValueError, match=r"pip install diffusers_kit\[text\]"):
        HFTextEncoder(path=str(tmp_path))
    registry = get_registry()  # the schema needs no transformers either
    assert "path" in registry.get("conditioner", "hf_text").params.model_fields
