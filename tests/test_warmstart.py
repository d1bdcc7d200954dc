"""The warm-start cache is reused only when the warm-start would be rebuilt identically."""

from rtpo import embedded
from rtpo.config import RTPOConfig
from rtpo.data import Example
from rtpo.warmstart import cache_key


def _key(model_seed=0, questions=("Compute 1+2.",), **ws):
    cfg = RTPOConfig()
    for k, v in ws.items():
        setattr(cfg.warmstart, k, v)
    tok = embedded.build_tokenizer()
    model = embedded.build_model(tok, 32, 1, 2, 1, 64, seed=model_seed)
    rows = [Example(q, "", "3", i) for i, q in enumerate(questions)]
    return cache_key(model, tok, cfg.warmstart, cfg.data, cfg.curriculum, rows)


def test_same_inputs_same_key():
    assert _key() == _key()


def test_key_changes_with_initial_weights_rows_and_settings():
    """Different init weights, a different SFT row set (e.g. a larger held-out split excluded from it)
    or different SFT settings must not reuse a cached model."""
    base = _key()
    assert _key(model_seed=1) != base
    assert _key(questions=("Compute 1+2.", "Compute 2+2.")) != base
    assert _key(steps=7) != base
    assert _key(seed=5) != base
