import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import phase4_clip as p4
from conftest import ROOT, assert_clean_error, load_ckpt, run_script


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return p4.CLIPTextEncoder(tiny_clip, torch.device("cpu"))


def small_model(text_dim=32, seed=0):
    torch.manual_seed(seed)
    model = p4.TextConditionalDiT((3, 32, 32), 4, 2, 32, 2, text_dim)
    for p in model.parameters():  # move off the zero init so that the text really matters
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_encoder_shapes_and_mask(encoder):
    emb, mask = encoder.encode(["a photo of a dog", ""])
    n = mask[0].sum()
    assert emb.shape == (2, n, 32) and emb.dtype == torch.float32      # padded to the longest prompt only
    assert mask.shape == (2, n) and mask.dtype == torch.bool
    assert mask[1].sum() == 2 and n > 2                                # "" is just begin + end tokens
    assert mask[1, :2].all() and not mask[1, 2:].any() and (emb[1, 2:] == 0).all()   # real tokens, then padding


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


def test_more_padding_changes_nothing():
    model = small_model()
    emb, mask = torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :5], mask[1, :3] = True, True
    longer = torch.cat([emb, torch.zeros(2, 70, 32)], 1), torch.cat([mask, torch.zeros(2, 70, dtype=torch.bool)], 1)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(model(x, t, emb, mask), model(x, t, *longer), atol=1e-5)


def test_text_is_standardised_with_the_stored_statistics():
    model = small_model()
    text, mask = torch.randn(2, 5, 32) * 3 + 7, torch.ones(2, 5, dtype=torch.bool)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        plain = model(x, t, (text - 7) / 3, mask)
        model.text_mean.fill_(7.0), model.text_std.fill_(3.0)
        assert torch.allclose(model(x, t, text, mask), plain, atol=1e-5)
        assert not torch.allclose(model(x, t, (text - 7) / 3, mask), plain, atol=1e-3)


def test_the_end_token_reaches_every_block_through_adaln():
    """With cross-attention switched off (its output projections zero), the prompt still acts, through its end
    token (the last real one) added to t's embedding; the tokens before it then change nothing."""
    model = small_model()
    for block in model.blocks:
        block.cross.proj.weight.data.zero_(), block.cross.proj.bias.data.zero_()
    text, mask = torch.randn(2, 6, 32), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    other_start, other_end = text.clone(), text.clone()
    other_start[:, 1] += 1.0                                  # a token before the end
    other_end[0, 5] += 1.0                                    # each prompt's end token
    other_end[1, 3] += 1.0
    with torch.no_grad():
        v = model(x, t, text, mask)
        assert torch.allclose(model(x, t, other_start, mask), v, atol=1e-6)
        assert (model(x, t, other_end, mask) - v).abs().flatten(1).amax(1).min() > 1e-3


def test_fresh_text_block_is_the_identity():
    model = p4.TextConditionalDiT((3, 32, 32), 4, 1, 32, 2, 16)
    assert type(model.blocks[0]) is p4.TextConditionedDiTBlock and isinstance(model.blocks[0], p4.DiTBlock)
    x, c, text = torch.randn(2, 64, 32), torch.randn(2, 32), torch.randn(2, 5, 16)
    assert torch.equal(model.blocks[0](x, c, text, torch.ones(2, 5, dtype=torch.bool)), x)


def test_cfg_scale_1_is_conditional_0_unconditional_and_doubled_batch_matches(encoder, monkeypatch):
    monkeypatch.setattr(p4, "CFG_FROM", 0.0)                    # guided over the whole path, and outside
    monkeypatch.setattr(p4, "CFG_UNTIL", 0.9)                   # (t = 0.9 and later) the conditional alone
    model = small_model()
    captions = encoder.encode(["a photo of a dog", "a photo of a cat", ""])
    text, mask = captions
    y, null = torch.tensor([0, 1]), torch.tensor([2, 2])
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        v_c, v_u = model(x, t, text[y], mask[y]), model(x, t, text[null], mask[null])
        assert torch.equal(p4.guided_velocity(model, x, t, y, 1.0, captions), v_c)
        assert torch.equal(p4.guided_velocity(model, x, t, y, 0.0, captions), v_u)
        assert torch.allclose(p4.guided_velocity(model, x, t, y, 4.0, captions), v_u + 4 * (v_c - v_u), atol=1e-5)
        assert not torch.allclose(v_c, v_u)
        late = torch.full((2,), 0.9)
        assert torch.equal(p4.guided_velocity(model, x, late, y, 4.0, captions), model(x, late, text[y], mask[y]))


def test_sample_text_conditional_draws_each_prompt_in_turn_with_cfg(encoder):
    model = small_model()
    captions = encoder.encode(["a photo of a dog", "a photo of a cat", ""])   # the empty prompt last
    images, labels = p4.sample_text_conditional(model, captions, 2, 3.0, 2, torch.Generator().manual_seed(5))
    assert labels.tolist() == [0, 0, 1, 1] and images.shape == (4, 3, 32, 32)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(images, p4.sample_conditional(model, labels, 3.0, 2, noise, captions)[0], atol=1e-6)


def test_caption_table_holds_every_wording_of_every_name_once_and_dropout_uses_the_empty_prompt(encoder, monkeypatch):
    trainer = p4.TextConditionalTrainer(encoder, p4.CLASSES)
    captions = trainer.captions
    assert len(captions) == len(set(captions)) == len(trainer.text) and captions[-1] == ""   # each once, "" last
    for c in p4.CLASSES:
        assert {p4.caption(w, name) for name in p4.names_of(c) for w in p4.WORDINGS} <= set(captions)
    assert len(captions) > 10 * len(p4.WORDINGS) * 3
    for i in (0, 17, len(captions) - 2, len(captions) - 1):  # the row is that caption's CLIP encoding
        emb, mask = encoder.encode([captions[i]])
        assert torch.allclose(trainer.text[i, :emb.shape[1]], emb[0], atol=1e-5) and trainer.mask[i].sum() == mask.sum()
    seen = []
    monkeypatch.setattr(p4, "text_conditional_loss", lambda model, x1, text, mask, t_mean: seen.append((text, mask)))
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (40000,))
    trainer.loss(None, torch.zeros(40000, 3, 2, 2), labels)
    text, mask = seen[0]
    rows = {tuple(row.flatten().tolist()): i for i, row in enumerate(trainer.text)}
    ids = torch.tensor([rows[tuple(row.flatten().tolist())] for row in text])
    dropped = ids == len(captions) - 1
    assert 0.09 < dropped.float().mean() < 0.11
    # a kept caption names its image's class (by one of its names); every caption of the table gets used
    assert all(p4.class_of_prompt(captions[i], p4.CLASSES) == y for i, y in zip(ids[~dropped][:3000].tolist(),
                                                                            labels[~dropped][:3000].tolist()))
    assert len(set(ids.tolist())) == len(captions)


def test_training_captions_fit_in_clip(encoder):
    """The tiny tokenizer has few merges: about a token per letter, more than CLIP's real one gives."""
    from torchvision.datasets import Flowers102
    for names in (p4.CLASSES, Flowers102.classes):  # phase 5 fills the same wordings with flower names
        longest = max((p4.caption(w, n) for c in names for n in p4.names_of(c) for w in p4.WORDINGS), key=len)
        assert encoder.encode([longest])[1].shape[1] < 77


def test_heldout_and_synonym_prompts_name_their_class_and_are_not_training_captions(encoder):
    training = {p4.caption(w, n) for c in p4.CLASSES for n in p4.names_of(c) for w in p4.WORDINGS}
    heldout = p4.get_args([f"@{os.path.join(ROOT, 'docs', 'prompts', 'heldout.txt')}"]).prompt
    assert len(heldout) == 100 and not training & set(heldout)
    assert [p4.class_of_prompt(prompt, p4.CLASSES) for prompt in heldout] == [i // 10 for i in range(100)]
    synonyms = p4.get_args([f"@{os.path.join(ROOT, 'docs', 'prompts', 'synonyms.txt')}"]).prompt
    assert [p4.class_of_prompt(prompt, p4.CLASSES) for prompt in synonyms] == [i // 2 for i in range(20)]
    assert not any(p4.CLASSES[i // 2] in prompt.split() for i, prompt in enumerate(synonyms))   # another name each
    assert encoder.encode(heldout + synonyms)[1].shape[1] < 77


def test_attention_maps_are_the_probabilities_that_drew_the_sample(encoder):
    model, times = small_model(), [0.2, 0.5, 0.8]
    captions = encoder.encode(["a photo of a dog", "a cat", ""])   # the second prompt is padded
    labels, noise = torch.tensor([0, 1]), torch.randn(2, 3, 32, 32)
    x, trajectory, maps = p4.sample_with_attention(model, labels, 3.0, 10, noise, captions, times)
    assert list(maps) == pytest.approx(times) and len(trajectory) == 11
    real = captions[1][:2]                                              # (2, L): True = a real token
    for m in maps.values():
        assert m.shape == (2, (32 // 4) ** 2, real.shape[1])            # (prompts, 8x8 patch grid, tokens)
        assert torch.allclose(m.sum(-1), torch.ones(2, 64), atol=1e-5)  # each patch's weights over the tokens: 1
        assert torch.all(m[1][:, ~real[1]] == 0) and (~real[1]).any()   # padding gets exactly 0
        assert (m[0] > 0).all()                                         # every real token gets some
    # recorded from the very call that drew the sample: it equals the fused-kernel sampler's, to float error
    x_fused, _ = p4.sample_conditional(model, labels, 3.0, 10, noise, captions)
    assert torch.allclose(x, x_fused, atol=1e-4) and not torch.allclose(x, noise, atol=0.1)
    assert all(block.cross.record is None for block in model.blocks)   # and recording is off again


def test_words_label_every_real_token(encoder):
    words = encoder.words("a photo of a dog")
    assert words[0] == "<start>" and words[-1] == "<end>"
    assert len(words) == encoder.encode(["a photo of a dog"])[1].sum()     # one label per real token
    assert "".join(words[1:-1]) == "aphotoofadog"


def test_class_of_prompt():
    assert p4.class_of_prompt("a photo of a dog", p4.CLASSES) == 5
    assert p4.class_of_prompt("Two Ships at sea", p4.CLASSES) == 8
    assert p4.class_of_prompt("two puppies", p4.CLASSES) == 5 and p4.class_of_prompt("a Car.", p4.CLASSES) == 1
    assert p4.class_of_prompt("lorries", p4.CLASSES) == 9 and p4.class_of_prompt("a kitten and a cat", p4.CLASSES) == 3
    assert p4.class_of_prompt("a dogma", p4.CLASSES) == -1
    assert p4.class_of_prompt("a cat and a dog", p4.CLASSES) == -1
    assert p4.class_of_prompt("a boat and a car", p4.CLASSES) == -1
    assert p4.class_of_prompt("a car and a cargo ship", p4.CLASSES) == -1   # "car" is not a word of "cargo ship"


def test_caption_fills_in_article_and_plural():
    assert p4.caption("a photo of {a}", "airplane") == "a photo of an airplane"
    assert p4.caption("{s} and the {n}", "puppy") == "puppies and the puppy"
    assert [p4.plural(n) for n in ("deer", "bus", "bird of paradise", "canterbury bells")] == [
        "deer", "buses", "birds of paradise", "canterbury bells"]


def write_cifar_folder(root, per_class=3):
    for i, name in enumerate(p4.CLASSES):
        os.makedirs(os.path.join(root, "cifar10", "train", name))
        for j in range(per_class):
            Image.new("RGB", (32, 32), (25 * i, 10 * j, 255 - 25 * i)).save(
                os.path.join(root, "cifar10", "train", name, f"{j}.png"))
    return root


TINY = ["--depth", 1, "--width", 32, "--batch-size", 8, "--sample-steps", 2, "--device", "cpu"]


def test_cli_trains_saves_and_samples_then_samples_straight_away(tmp_path, tiny_clip, encoder):
    root = write_cifar_folder(str(tmp_path / "data"))
    out = tmp_path / "run"
    r = run_script("phase4_clip.py", "--data-root", root, "--clip-model", tiny_clip, "--out-dir", out,
                   "--steps", 3, "--num-samples", 2, "--prompt", "a photo of a dog", "--prompt", "a red\nthing",
                   "--save-npz", tmp_path / "s.npz", *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "trajectory.png", "trajectory.gif", "steps.png", "progress.png", "cfg_sweep.png",
                 "attention.png", "ckpt.pt", "metrics.json"):
        assert (out / name).exists(), name
    tokens = len(encoder.words("a photo of a dog")) + len(encoder.words("a red\nthing"))
    with Image.open(out / "attention.png") as picture:  # per prompt: a row of x_t, then one per token (not padding)
        assert picture.height == (2 + tokens) * 65 + 1   # 32-pixel tiles drawn at 64
    with Image.open(out / "trajectory.gif") as gif:        # the animation too: a frame per Euler step, 2 prompts
        assert gif.n_frames == 2 + 1 and gif.size == (2 * 65 + 1, 66)
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (4, 32, 32, 3) and npz["labels"].tolist() == [5, 5, -1, -1]
    ckpt = load_ckpt(out / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["phase"] == 4
    trainer = p4.TextConditionalTrainer(encoder, p4.CLASSES)   # the text statistics of the training captions
    for weights in (ckpt["model"], ckpt["ema"]):
        assert torch.allclose(weights["text_mean"], trainer.text_mean) and torch.allclose(weights["text_std"],
                                                                                          trainer.text_std)
    assert ckpt["config"]["clip_model"] == os.path.abspath(tiny_clip)   # stored absolute: found from anywhere
    # A checkpoint exists now: the same command samples without training, with the CLIP it was trained with.
    # Prompts from a file (@FILE, an argument a line); a synonym counts as its class in the npz.
    (tmp_path / "prompts.txt").write_text("--prompt=a photo of a cat\n--prompt=two puppies\n")
    r = run_script("phase4_clip.py", "--out-dir", out, f"@{tmp_path / 'prompts.txt'}", "--num-samples", 3,
                   "--save-npz", tmp_path / "t.npz", "--sample-steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "training" not in r.stdout and np.load(tmp_path / "t.npz")["labels"].tolist() == [3, 3, 3, 5, 5, 5]
    # --clip-model on the command line wins over the stored one
    moved = shutil.copytree(tiny_clip, tmp_path / "clip copy")
    r = run_script("phase4_clip.py", "--out-dir", out, "--clip-model", moved, "--num-samples", 1, *TINY)
    assert r.returncode == 0, r.stderr
    r = run_script("phase4_clip.py", "--out-dir", out, "--clip-model", tmp_path / "nothing", *TINY)
    assert_clean_error(r, "nothing")


def test_a_phase5_checkpoint_is_refused_and_left_alone(tmp_path, tiny_clip):
    torch.save({"phase": 5, "config": {}, "step": 7}, tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    r = run_script("phase4_clip.py", "--clip-model", tiny_clip, "--out-dir", tmp_path, *TINY)
    assert_clean_error(r, "phase 5")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "samples.png").exists()


@pytest.mark.parametrize("prompt, message", [("", "empty --prompt"), ("   ", "empty --prompt"),
                                             ("dog " * 80, "too long")])
def test_bad_prompts_are_clean_errors(tmp_path, tiny_clip, prompt, message):
    r = run_script("phase4_clip.py", "--clip-model", tiny_clip, "--out-dir", tmp_path, "--prompt", prompt,
                   "--data-root", tmp_path / "none", *TINY)
    assert_clean_error(r, message)


def test_missing_clip_offline_is_a_clean_error(tmp_path):
    r = run_script("phase4_clip.py", "--clip-model", tmp_path / "no_clip_here", "--out-dir", tmp_path / "o",
                   "--data-root", tmp_path / "none", *TINY)
    assert_clean_error(r, "--clip-model")
    assert not (tmp_path / "o").exists()   # a run that stops before writing anything leaves no empty folder


def test_clip_run_to_the_longest_prompt_equals_the_full_77_tokens(encoder):
    short, long = "a photo of a dog", "a photo of a dog " * 6
    alone, mask_alone = encoder.encode([short])
    together, mask_together = encoder.encode([short, long])
    n = int(mask_alone[0].sum())
    assert torch.equal(mask_alone[0], mask_together[0, :n]) and not mask_together[0, n:].any()
    assert torch.allclose(alone[0], together[0, :n], atol=1e-5) and (together[0, n:] == 0).all()
    # and both equal CLIP run on all 77 positions
    full = encoder.tokenizer([short], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = encoder.model(input_ids=full.input_ids, attention_mask=full.attention_mask).last_hidden_state
    assert torch.allclose(ref[0, :n], alone[0], atol=1e-5)


def test_a_full_two_tower_clip_loads_its_text_half_exactly_and_quietly(tmp_path, tiny_clip, capfd):
    """The real openai/clip-vit-base-patch32 is a CLIPModel (text and vision towers): its text weights must arrive
    exactly, and the unused vision weights must not be reported as if something were wrong."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    text_config = CLIPTextConfig.from_pretrained(tiny_clip)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    torch.manual_seed(1)
    full = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    folder = tmp_path / "two-tower"
    full.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tiny_clip, name), folder / name)
    capfd.readouterr()
    enc = p4.CLIPTextEncoder(str(folder), torch.device("cpu"))
    out, err = capfd.readouterr()
    assert "unexpected" not in (out + err).lower(), out + err
    text_weights = full.text_model.state_dict()
    loaded = {k.removeprefix("text_model."): v for k, v in enc.model.state_dict().items()}
    assert text_weights.keys() == loaded.keys()
    for k in text_weights:
        assert torch.equal(text_weights[k], loaded[k]), k


def test_a_folder_with_fewer_than_8_classes_trains_and_saves(tmp_path, tiny_clip):
    root = write_cifar_folder(str(tmp_path / "data"))
    for name in p4.CLASSES[5:]:                                       # only 5 of the 10 classes are there
        shutil.rmtree(os.path.join(root, "cifar10", "train", name))
    p4.main(["--data-root", root, "--clip-model", tiny_clip, "--out-dir", str(tmp_path / "run"), "--steps", "2",
             "--num-samples", "1", *map(str, TINY)])
    ckpt = load_ckpt(tmp_path / "run" / "ckpt.pt")
    assert ckpt["step"] == 2 and len(ckpt["progress"]) == 1 and ckpt["config"]["data"]["classes"] == p4.CLASSES[:5]


def test_a_folder_that_is_not_a_clip_says_so_without_asking_for_the_flag_it_got(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(SystemExit) as stop:
        p4.CLIPTextEncoder(str(tmp_path / "clip"), torch.device("cpu"))
    assert "save_pretrained" in str(stop.value) and "pass --clip-model" not in str(stop.value)


def test_resume_with_another_clip_is_refused_but_sampling_with_it_is_fine(tmp_path, tiny_clip):
    root = write_cifar_folder(str(tmp_path / "data"))
    args = ["--data-root", root, "--out-dir", str(tmp_path / "run"), "--num-samples", "1", *map(str, TINY)]
    p4.main(["--clip-model", tiny_clip, "--steps", "2", *args])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    from conftest import write_tiny_clip
    other = write_tiny_clip(str(tmp_path / "other-clip"))              # another CLIP, as wide
    with pytest.raises(SystemExit, match="was trained with CLIP"):
        p4.main(["--clip-model", other, "--steps", "4", "--resume", *args])
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    p4.main(["--clip-model", other, *args])                           # drawing with it trains nothing: allowed
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
