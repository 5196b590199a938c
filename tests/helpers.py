"""Shared test helpers: random transformers checkpoints (the oracle) and comparisons."""
import torch

ODD_CONFIG = dict(vocab_size=131, d_model=40, d_kv=24, d_ff=72, num_layers=2, num_decoder_layers=3,
                  num_heads=5, relative_attention_num_buckets=20, relative_attention_max_distance=40,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def hf_config(**overrides):
    from transformers import UMT5Config as HFConfig
    return HFConfig(**dict(ODD_CONFIG, **overrides))


def make_hf_model(class_name: str, seed: int = 0, **overrides):
    """A transformers UMT5 model with random weights, norms and bias tables made non-trivial."""
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(hf_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # large enough that a wrong bucket changes the output
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def save_hf(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def random_batch(vocab_size: int, batch: int, length: int, seed: int, pad_id: int = 0, eos_id: int = 1,
                 padding=("right", "left", None)):
    """Random ids (no pad/eos inside) ending in eos, padded on the given sides; returns (ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        side = padding[row % len(padding)]
        n_pad = int(torch.randint(1, max(2, length // 3), (1,), generator=g)) if side else 0
        real = length - n_pad
        tokens = torch.cat([ids[row, : real - 1], torch.tensor([eos_id])])
        if side == "left":
            ids[row] = torch.cat([torch.full((n_pad,), pad_id), tokens])
            mask[row, :n_pad] = 0
        else:
            ids[row] = torch.cat([tokens, torch.full((n_pad,), pad_id)])
            if n_pad:
                mask[row, real:] = 0
    return ids, mask


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def assert_close(ours, ref, tol: float, what: str = "tensor"):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
