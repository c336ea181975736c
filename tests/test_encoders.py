"""encoders.py: the two frozen stand-ins, an exactly invertible latent tokenizer and a fixed text encoder."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from encoders import SpaceToDepth, TextEncoder
import tiny_models

# ----------------------------------------------------------------------------- the tokenizer stand-in


def test_space_to_depth_inverts_every_byte_exactly():
    frames = torch.arange(256, dtype=torch.uint8).view(1, 4, 8, 8, 1).expand(1, 4, 8, 8, 3).contiguous()
    tok = SpaceToDepth(2)
    z = tok.encode(frames)
    assert z.shape == (1, 12, 4, 4, 4) and z.min() == -1 and z.max() == 1
    assert torch.equal(tok.decode(z), frames)


@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 3), st.integers(0, 2**31))
def test_space_to_depth_layout(t, f, c, seed):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, t, 4 * f, 2 * f, c), generator=g, dtype=torch.uint8)
    tok = SpaceToDepth(f)
    z = tok.encode(frames)
    assert z.shape == (2, c * f * f, t, 4, 2) and tok.channels(c) == c * f * f
    b, ch, tt, y, x = (int(torch.randint(0, n, (), generator=g)) for n in z.shape)
    cc, i, j = ch // (f * f), ch // f % f, ch % f
    assert z[b, ch, tt, y, x] == frames[b, tt, f * y + i, f * x + j, cc].float() / 127.5 - 1
    assert torch.equal(tok.decode(z, c), frames)


def test_space_to_depth_refuses_bad_input():
    with pytest.raises(ValueError, match="not divisible by the space-to-depth factor 4"):
        SpaceToDepth(4).encode(torch.zeros(1, 1, 6, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\) uint8"):
        SpaceToDepth(2).encode(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="expected 3 x 2"):
        SpaceToDepth(2).decode(torch.zeros(1, 8, 1, 4, 4))

# ----------------------------------------------------------------------------- the text-encoder stand-in

PINNED_RED = (-0.40297340349152544, -1.5617714009118668, 0.5530653828744428)   # w("red")[:3], any dim (SHAKE-256)


def test_text_encoder_is_fixed_padded_and_order_aware():
    enc = TextEncoder(length=8, dim=16)
    a, b, c, d = enc(["stack the red block on the blue block", "Stack the RED block, on the blue block.",
                      "stack the blue block on the red block", ""])
    assert a.shape == (8, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)                            # case and punctuation do not matter
    assert torch.equal(a[:8], TextEncoder(length=8, dim=16)(["stack the red block on the blue block"])[0])
    assert not torch.equal(a, c)                        # word order does
    assert torch.equal(d, torch.zeros(8, 16))
    short = enc(["stack the red"])[0]
    assert torch.equal(short[:3], a[:3]) and torch.equal(short[3:], torch.zeros(5, 16))
    # w("red") is a fixed function of the word (SHAKE-256), the same on every machine: pin it
    w = enc.word("red")
    np.testing.assert_allclose(w[:3], PINNED_RED, rtol=1e-12)
    assert np.abs(w).max() <= 3**0.5
    with pytest.raises(ValueError, match="has 9 words; the text encoder holds 8"):
        enc(["one two three four five six seven eight nine"])

# ----------------------------------------------------------------------------- the real encoders (tiny, random)

PROMPT = "pick up the green block and put it on the yellow pad"


@pytest.fixture(scope="module")
def cosmos_folder(tmp_path_factory):
    from tiny_models import save_cosmos_encoders
    return save_cosmos_encoders(tmp_path_factory.mktemp("cosmos-encoders"))


@pytest.fixture(scope="module")
def real(cosmos_folder):
    import encoders
    return encoders.build(encoders.cosmos_spec(str(cosmos_folder), size=(32, 48)))


def history_frames(n=5, size=(40, 56), seed=0):
    """n smooth random frames (a codec-free stand-in for camera frames) of another size than the model's."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 7, generator=g)
    frames = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()   # (n, H, W, 3)


def pipeline_inputs(cosmos_folder, frames, prompt, height, width, num_frames):
    """What diffusers' Cosmos2VideoToWorldPipeline feeds its transformer at the first step for these history frames
    (given as PIL images) and prompt: the transformer's keyword arguments. Run with the posterior mean (below)."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_video2world as cosmos_pipeline
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel
    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(in_channels=17, out_channels=16, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=1, text_embed_dim=1024,
                                           adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
                                           concat_padding_mask=False).eval()
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    pipe = cosmos_pipeline.Cosmos2VideoToWorldPipeline(
        text_encoder=T5EncoderModel.from_pretrained(cosmos_folder, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(cosmos_folder, subfolder="tokenizer"), transformer=transformer,
        vae=AutoencoderKLWan.from_pretrained(cosmos_folder, subfolder="vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(), safety_checker=tiny_models.NoSafetyChecker())
    pipe.set_progress_bar_config(disable=True)
    mean = lambda output, generator=None, sample_mode=None: output.latent_dist.mode()   # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cosmos_pipeline, "retrieve_latents", mean)
        pipe(video=[Image.fromarray(f) for f in frames.numpy()], prompt=prompt, height=height, width=width,
             num_frames=num_frames, num_inference_steps=2, guidance_scale=1.0, fps=24, output_type="latent")
    return seen[0]


def test_the_encoders_prepare_exactly_what_diffusers_cosmos_pipeline_feeds_its_transformer(cosmos_folder, real):
    """diffusers' Cosmos2VideoToWorldPipeline, run on the same history frames (as PIL images of another size) and
    prompt: the context latent frames and the text states its transformer receives equal ours. One departure,
    named: the pipeline draws a posterior sample of the VAE, NVIDIA (and this project) take the posterior mean,
    so the pipeline runs here with the mean (its retrieve_latents in "argmax" mode)."""
    vae, t5 = real
    frames = history_frames(5)
    fed = pipeline_inputs(cosmos_folder, frames, PROMPT, height=32, width=48, num_frames=9)
    n_cond = vae.latent_frames(5)                                   # (5 - 1) // 4 + 1 = 2 context latent frames
    assert fed["condition_mask"][0, 0, :, 0, 0].tolist() == [1.0] * n_cond + [0.0]
    ours = vae.encode(frames[None])                                 # (1, 16, 2, 4, 6)
    assert ours.shape == (1, 16, 2, 4, 6)
    torch.testing.assert_close(fed["hidden_states"][:, :, :n_cond], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(fed["encoder_hidden_states"], t5([PROMPT]), rtol=0, atol=1e-5)
    assert ours.abs().max() > 0.1 and t5([PROMPT]).abs().max() > 0.1   # not trivially zero


def test_the_history_alone_gives_the_context_frames_of_the_whole_clip(real):
    """Causality, the reason the policy may encode just its H_o history frames: they give exactly the first
    latent frames that training took from the clip of history plus future."""
    vae, _ = real
    clip = history_frames(9, size=(32, 48), seed=1)[None]
    whole = vae.encode(clip)
    assert whole.shape[2] == vae.latent_frames(9) == 3
    torch.testing.assert_close(vae.encode(clip[:, :5]), whole[:, :, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.encode(clip[:, :1]), whole[:, :, :1], rtol=0, atol=1e-6)
    assert vae.decode(whole).shape == (1, 9, 32, 48, 3)


def test_the_wan_vae_refuses_what_it_cannot_encode(real):
    vae, _ = real
    with pytest.raises(ValueError, match=r"clips of 1 \+ 4 n frames, got 4"):
        vae.encode(torch.zeros(1, 4, 32, 48, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="reads RGB frames, got 1 channels"):
        vae.encode(torch.zeros(1, 5, 32, 48, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\) uint8"):
        vae.encode(torch.zeros(1, 5, 32, 48, 3))


def test_t5_zeroes_the_states_past_the_prompt_and_encodes_each_instruction_once(real):
    _, t5 = real
    t5.cache.clear()
    calls = []
    hook = t5.model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]) if a else None)
    states = t5([PROMPT, "push the blue block", PROMPT])
    again = t5(["push the blue block"])
    hook.remove()
    assert states.shape == (3, 512, 1024) and t5.length == 512 and t5.dim == 1024
    assert calls == [2]                                             # two distinct instructions, one pass, then cached
    n = len(t5.tokenizer("push the blue block").input_ids)          # its tokens, </s> included
    assert (states[1, :n].abs().sum(-1) > 0).all() and torch.equal(states[1, n:], torch.zeros(512 - n, 1024))
    torch.testing.assert_close(states[0], states[2], rtol=0, atol=0)
    torch.testing.assert_close(again[0], states[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="tokens; the T5 encoder holds 512"):
        t5(["block " * 600])


def test_build_gives_the_stand_ins_or_names_what_is_wrong(tmp_path):
    import encoders
    video, text = encoders.build(encoders.stand_in_spec(4, 16, 64))
    frames = torch.randint(0, 256, (1, 2, 8, 8, 3), dtype=torch.uint8)
    assert torch.equal(video.encode(frames), SpaceToDepth(4).encode(frames)) and video.latent_frames(7) == 7
    assert torch.equal(text(["pick it"]), TextEncoder(16, 64)(["pick it"]))
    with pytest.raises(ValueError, match="unknown encoder kind 'vq'"):
        encoders.build({"video": {"kind": "vq"}, "text": {"kind": "hash", "length": 4, "dim": 8}})
    with pytest.raises(ValueError, match="cannot load AutoencoderKLWan from its vae/ subfolder"):
        encoders.WanVAE(str(tmp_path / "nowhere"))
