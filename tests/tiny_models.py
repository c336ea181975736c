"""Tiny random stand-ins of Cosmos-Predict2's frozen encoders, saved in the real folder layouts (diffusers'
`vae/`, transformers' `text_encoder/` and `tokenizer/`), so that the real loading code (encoders.WanVAE,
encoders.T5Encoder) can be tested offline. Reusable by any test: save_cosmos_encoders(folder)."""
import torch

# words the tiny tokenizer knows as whole pieces; anything else falls back to letters, then <unk>
WORDS = ("pick up the green red blue yellow block put on pad push to left right edge stack open close drawer "
         "bowl plate in of and a").split()


def tiny_vae(z_dim=16, seed=0):
    """A random AutoencoderKLWan with the real one's structure (4x time, 8x space), 668k parameters at z_dim 16."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(seed)
    kw = {} if z_dim == 16 else {"latents_mean": [0.1 * c for c in range(z_dim)],
                                 "latents_std": [1.0 + 0.1 * c for c in range(z_dim)]}
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1, **kw).eval()


def tiny_tokenizer():
    """A T5 tokenizer over an in-memory unigram vocabulary: <pad> 0, </s> 1, <unk> 2, as T5's."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(vocab_size, d_model=1024, seed=0):
    """A random one-layer T5 encoder with T5-11B's width of states (1024) by default."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def save_cosmos_encoders(root, z_dim=16, d_model=1024):
    """Write vae/, text_encoder/ and tokenizer/ under root, as the Cosmos-Predict2 diffusers repo lays them out;
    returns root."""
    tokenizer = tiny_tokenizer()
    tiny_vae(z_dim).save_pretrained(root / "vae")
    tiny_t5(len(tokenizer), d_model).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root



class NoSafetyChecker:
    """Diffusers' Cosmos pipelines refuse to run without a safety checker (NVIDIA's guardrail package); this one
    passes everything, as diffusers' own tests do."""

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video

    def to(self, device):
        return self

def save_tiny_dit(folder, text_dim=1024, seed=0):
    """A random 3-block Cosmos-Predict2 DiT (16 latent channels, as the Wan VAE gives) saved by diffusers."""
    from cosmos_reference import REF_CONFIG
    from diffusers import CosmosTransformer3DModel
    torch.manual_seed(seed)
    CosmosTransformer3DModel(**{**REF_CONFIG, "text_embed_dim": text_dim}).save_pretrained(folder)
    return folder


def save_tiny_recipe(root):
    """Everything the paper's recipe reads, at toy sizes, as a Cosmos-Predict2 diffusers repo lays it out
    (transformer/, vae/, text_encoder/, tokenizer/) plus a LeRobot v3.0 dataset in lerobot/ (6 episodes of
    32x48 frames, two tasks)."""
    from lerobot_fixtures import make_episodes, write_lerobot
    save_cosmos_encoders(root)
    save_tiny_dit(root / "transformer")
    write_lerobot(root / "lerobot", make_episodes([12, 10, 11, 12, 10, 11], state_dim=4, action_dim=3,
                                                  tasks=("pick up the green block", "push the blue block")))
    return root


if __name__ == "__main__":   # python tests/tiny_models.py DIR: a tiny recipe to try the commands on (README)
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(f"wrote {save_tiny_recipe(Path(sys.argv[1]))}")
