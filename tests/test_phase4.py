import os

import numpy as np
import pytest
import torch
from PIL import Image

import phase4_clip as p4
from common import ImageData
from conftest import assert_clean_error, load_ckpt, run_script


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return p4.CLIPTextEncoder(tiny_clip, torch.device("cpu"))


def small_model(text_dim=32, seed=0, pooled=False):
    torch.manual_seed(seed)
    model = p4.TextConditionalDiT(depth=2, width=32, heads=2, text_dim=text_dim, pooled_text=pooled)
    for p in model.parameters():  # move off the zero init so that the text really matters
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_encoder_shapes_and_mask(encoder):
    emb, mask = encoder.encode(["a photo of a dog", ""])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    assert mask.shape == (2, 77) and mask.dtype == torch.bool
    assert mask[1].sum() == 2 and mask[0].sum() > 2          # "" is just begin + end tokens
    assert mask[0, : mask[0].sum()].all() and not mask[0, mask[0].sum():].any()  # real tokens first, then padding


def test_caption_cache_returns_identical_tensors_without_running_clip(encoder, monkeypatch):
    first = encoder.encode(["a photo of a cat", "a photo of a dog"])
    monkeypatch.setattr(encoder, "_run_clip", lambda prompts: pytest.fail(f"CLIP ran again for {prompts}"))
    again = encoder.encode(["a photo of a dog", "a photo of a cat"])
    assert torch.equal(again[0][0], first[0][1]) and torch.equal(again[1][1], first[1][0])


def test_caption_cache_survives_on_disk(tiny_clip, monkeypatch):
    one = p4.CLIPTextEncoder(tiny_clip, torch.device("cpu"))
    emb, _ = one.encode(["a photo of a frog"])
    two = p4.CLIPTextEncoder(tiny_clip, torch.device("cpu"))  # a new process would start like this: empty memory
    monkeypatch.setattr(two, "_run_clip", lambda prompts: pytest.fail("not read from disk"))
    assert torch.equal(two.encode(["a photo of a frog"])[0], emb)


def test_cross_attention_ignores_padded_positions():
    torch.manual_seed(0)
    attn = p4.CrossAttention(dim=32, text_dim=16, heads=2)
    x, text = torch.randn(3, 10, 32), torch.randn(3, 7, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = attn(x, text, mask)
    changed = torch.where(mask[:, :, None], text, torch.randn_like(text) * 100)  # scramble only the padding
    assert torch.allclose(attn(x, changed, mask), out, atol=1e-5)
    real = text.clone()
    real[0, 1] += 1.0  # ... while a real token does matter
    assert not torch.allclose(attn(x, real, mask)[0], out[0], atol=1e-3)


def test_trimming_padding_changes_nothing():
    model = small_model()
    emb, mask = torch.randn(2, 77, 32), torch.zeros(2, 77, dtype=torch.bool)
    mask[0, :5], mask[1, :3] = True, True
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        full = model(x, t, emb, mask)
        trimmed = model(x, t, *p4.trim_padding(emb, mask))
    assert p4.trim_padding(emb, mask)[0].shape == (2, 5, 32)
    assert torch.allclose(full, trimmed, atol=1e-5)


def test_fresh_text_block_is_the_identity():
    model = p4.TextConditionalDiT(depth=1, width=32, heads=2, text_dim=16)
    x, c, text = torch.randn(2, 64, 32), torch.randn(2, 32), torch.randn(2, 5, 16)
    assert torch.equal(model.blocks[0](x, c, text, torch.ones(2, 5, dtype=torch.bool)), x)


@pytest.mark.parametrize("pooled", [False, True])
def test_cfg_scale_1_is_conditional_and_doubled_batch_matches(encoder, pooled):
    model = small_model(pooled=pooled)
    emb, mask = p4.trim_padding(*encoder.encode(["a photo of a dog", "a photo of a cat", ""]))
    cond, uncond = (emb[:2], mask[:2]), (emb[2:].expand(2, -1, -1), mask[2:].expand(2, -1))
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        v_c, v_u = model(x, t, *cond), model(x, t, *uncond)
        assert torch.equal(p4.guided_velocity(model, x, t, cond, uncond, 1.0), v_c)
        assert torch.equal(p4.guided_velocity(model, x, t, cond, uncond, 0.0), v_u)
        assert torch.allclose(p4.guided_velocity(model, x, t, cond, uncond, 4.0), v_u + 4 * (v_c - v_u), atol=1e-5)
        assert not torch.allclose(v_c, v_u)


def test_caption_dropout_uses_the_empty_prompt(encoder):
    class Args:
        caption_dropout = 0.1

    data = ImageData(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4), p4.CIFAR10_CLASSES)
    trainer = p4.TextConditionalTrainer(Args, None, None, None, encoder, data)
    assert trainer.captions[trainer.empty] == ""
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    ids = trainer.caption_ids(labels)
    dropped = ids == trainer.empty
    assert 0.09 < dropped.float().mean() < 0.11
    # kept captions name the right class; dropped ones embed exactly like encoding ""
    kept = ids[~dropped]
    assert (kept // len(p4.TEMPLATES) == labels[~dropped]).all()
    assert len(set(kept.tolist())) == 10 * len(p4.TEMPLATES)   # every template gets used
    assert "dog" in trainer.captions[int(ids[(labels == 5) & ~dropped][0])]
    empty_emb, empty_mask = encoder.encode([""])
    n = trainer.text.shape[1]
    assert torch.equal(trainer.text[trainer.empty], empty_emb[0, :n]) and trainer.mask[trainer.empty].sum() == 2


def test_class_of_prompt():
    assert p4.class_of_prompt("a photo of a dog", p4.CIFAR10_CLASSES) == 5
    assert p4.class_of_prompt("Two Ships at sea", p4.CIFAR10_CLASSES) == 8
    assert p4.class_of_prompt("a dogma", p4.CIFAR10_CLASSES) == -1
    assert p4.class_of_prompt("a cat and a dog", p4.CIFAR10_CLASSES) == -1


def write_cifar_folder(root, per_class=3):
    for i, name in enumerate(p4.CIFAR10_CLASSES):
        os.makedirs(os.path.join(root, "cifar10", "train", name))
        for j in range(per_class):
            Image.new("RGB", (32, 32), (25 * i, 10 * j, 255 - 25 * i)).save(
                os.path.join(root, "cifar10", "train", name, f"{j}.png"))
    return root


TINY = ["--depth", 1, "--width", 32, "--heads", 2, "--batch-size", 8, "--sample-steps", 2, "--device", "cpu"]


def test_cli_trains_saves_and_samples_then_samples_straight_away(tmp_path, tiny_clip):
    root = write_cifar_folder(str(tmp_path / "data"))
    out = tmp_path / "run"
    r = run_script("phase4_clip.py", "--data-root", root, "--clip-model", tiny_clip, "--out-dir", out,
                   "--steps", 3, "--num-samples", 2, "--prompt", "a photo of a dog", "--prompt", "a red thing",
                   "--save-npz", tmp_path / "s.npz", *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "trajectory.png", "cfg_sweep.png", "ckpt.pt", "metrics.json"):
        assert (out / name).exists(), name
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (4, 32, 32, 3) and npz["labels"].tolist() == [5, 5, -1, -1]
    assert load_ckpt(out / "ckpt.pt")["step"] == 3
    # A checkpoint exists now: the same command samples without training.
    r = run_script("phase4_clip.py", "--out-dir", out, "--prompt", "a photo of a cat", "--num-samples", 3,
                   "--save-npz", tmp_path / "t.npz", "--sample-steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "training" not in r.stdout and np.load(tmp_path / "t.npz")["labels"].tolist() == [3, 3, 3]


@pytest.mark.parametrize("prompt, message", [("", "empty prompt"), ("   ", "empty prompt"),
                                             ("dog " * 80, "tokens")])
def test_bad_prompts_are_clean_errors(tmp_path, tiny_clip, prompt, message):
    r = run_script("phase4_clip.py", "--clip-model", tiny_clip, "--out-dir", tmp_path, "--prompt", prompt,
                   "--data-root", tmp_path / "none", *TINY)
    assert_clean_error(r, message)


def test_missing_clip_offline_is_a_clean_error(tmp_path):
    r = run_script("phase4_clip.py", "--clip-model", tmp_path / "no_clip_here", "--out-dir", tmp_path / "o",
                   "--data-root", tmp_path / "none", *TINY)
    assert_clean_error(r, "--clip-model")


def test_clip_run_to_the_longest_prompt_equals_the_full_77_tokens(encoder):
    from transformers import CLIPTokenizer
    short, long = "a photo of a dog", "a photo of a dog " * 6
    alone, mask_alone = encoder._run_clip([short])
    together, mask_together = encoder._run_clip([short, long])
    assert torch.equal(mask_alone[0], mask_together[0])
    n = int(mask_alone[0].sum())
    assert torch.allclose(alone[0, :n], together[0, :n], atol=1e-5)
    assert (alone[0, n:] == 0).all()
    # and both equal CLIP run on all 77 positions
    tok = CLIPTokenizer.from_pretrained(encoder.tokenizer.name_or_path)
    full = tok([short], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = encoder.model(input_ids=full.input_ids, attention_mask=full.attention_mask).last_hidden_state
    assert torch.allclose(ref[0, :n], alone[0, :n], atol=1e-5)
