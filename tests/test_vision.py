"""Vision-language prompts: the tiny Qwen2-VL (rtpo/embedded_vl.py), image rows, the rollout engine's
and the log-prob pass's vision path (rtpo/vision.py) against transformers, and training end to end."""

import pytest
import torch
from PIL import Image

from rtpo import embedded_vl
from rtpo.generation import SamplingConfig, generate
from rtpo.logprobs import collate, completion_logprobs
from rtpo.vision import VisionProcessor, batch_images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vl():
    """(model, tokenizer, VisionProcessor): the embedded VLM with larger-than-default init, so that greedy
    paths vary from prompt to prompt and image to image."""
    tok = embedded_vl.build_tokenizer()
    model = embedded_vl.build_model(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=128, vision_width=32, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model.eval(), tok, VisionProcessor(embedded_vl.build_image_processor(), tok)


def noise_image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand((h, w, 3), generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def image_prompt(tok, vp, question, images):
    """Prompt ids with each image expanded to its tokens, and the images' model inputs."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    ids = vp.expand(tok(text, add_special_tokens=False)["input_ids"], vp.token_counts(images))
    return ids, vp.process(images)


# prompts of different lengths and images of different sizes (4, 6, 9 + 8, 16 image tokens; two images in one)
CASES = [("How many?", [(56, 56)]), ("Count the red squares, please.", [(84, 56)]),
         ("Hi", [(84, 84), (56, 112)]), ("What is it?", [(112, 112)])]


@pytest.fixture(scope="module")
def prompts(vl):
    _, tok, vp = vl
    out = [image_prompt(tok, vp, q, [noise_image(w, h, 10 * i + j) for j, (w, h) in enumerate(sizes)])
           for i, (q, sizes) in enumerate(CASES)]
    return [p for p, _ in out], [x for _, x in out]


def hf_inputs(tok, vl_model, ids_list, images):
    P = max(len(p) for p in ids_list)
    ids = torch.full((len(ids_list), P), tok.pad_token_id)
    mask = torch.zeros((len(ids_list), P), dtype=torch.long)
    for i, p in enumerate(ids_list):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    extra = batch_images(images)
    mm = (ids == vl_model.config.image_token_id).int()
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **extra)


def test_image_tokens_match_the_image_grid(vl, prompts):
    _, _, vp = vl
    ids_list, images = prompts
    for ids, x in zip(ids_list, images):
        n = sum(t == vp.image_token_id for t in ids)
        assert n == int(x.image_grid_thw.prod(-1).sum()) // 4
    assert [int(x.image_grid_thw.prod(-1).sum()) // 4 for x in images] == [4, 6, 17, 16]


def test_greedy_matches_hf_generate_on_left_padded_image_prompts(vl, prompts):
    model, tok, _ = vl
    ids_list, images = prompts
    T = 12
    ours = generate(model, ids_list, SamplingConfig(max_new_tokens=T, temperature=0.0, pad_token_id=tok.pad_token_id),
                    images=images).completions
    inp = hf_inputs(tok, model, ids_list, images)
    with torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=T, do_sample=False, min_new_tokens=T, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    ref = ref[:, inp["input_ids"].shape[1]:].tolist()
    assert ours == ref
    assert len({tuple(r) for r in ref}) == len(ref)  # the rows differ: the images and prompts matter


def test_each_image_prompt_alone_equals_its_row_in_the_batch(vl, prompts):
    model, tok, _ = vl
    ids_list, images = prompts
    s = SamplingConfig(max_new_tokens=8, temperature=0.0, pad_token_id=tok.pad_token_id)
    batch = generate(model, ids_list, s, images=images).completions
    alone = [generate(model, [p], s, images=[x]).completions[0] for p, x in zip(ids_list, images)]
    assert batch == alone


@pytest.mark.parametrize("share_prefix", [True, False])
def test_sampling_with_images_is_the_same_with_or_without_prefix_sharing(vl, prompts, share_prefix):
    model, tok, _ = vl
    ids_list, images = prompts
    s = SamplingConfig(max_new_tokens=8, temperature=1.0, pad_token_id=tok.pad_token_id)
    out = generate(model, ids_list, s, num_samples=3, generator=torch.Generator().manual_seed(0), images=images,
                   share_prefix=share_prefix, batch_size=6)
    ref = generate(model, ids_list, s, num_samples=3, generator=torch.Generator().manual_seed(0), images=images,
                   share_prefix=True)
    assert out.completions == ref.completions
    # prefix sharing prefills (and encodes the images of) each prompt once, not once per sample
    chunks = [ids_list[:2], ids_list[2:]]  # batch_size 6 = 2 prompts x 3 samples per chunk
    rows = 1 if share_prefix else 3
    assert out.stats["prefill_tokens"] == sum(rows * len(c) * max(map(len, c)) for c in chunks)


def test_image_pixels_change_the_output(vl, prompts):
    """The images reach the model: the same prompt with other pixels decodes differently."""
    model, tok, vp = vl
    ids_list, images = prompts
    s = SamplingConfig(max_new_tokens=8, temperature=0.0, pad_token_id=tok.pad_token_id)
    other = [vp.process([noise_image(int(g[2]) * 14, int(g[1]) * 14, 99 + k) for k, g in enumerate(x.image_grid_thw)])
             for x in images]
    a = generate(model, ids_list, s, images=images).completions
    b = generate(model, ids_list, s, images=other).completions
    assert a != b


def test_completion_logprobs_with_images_equal_a_plain_float64_forward(vl, prompts):
    model, tok, _ = vl
    ids_list, images = prompts
    g = torch.Generator().manual_seed(1)
    comps = [torch.randint(30, 90, (n,), generator=g).tolist() for n in (5, 1, 7, 3)]
    batch = collate(ids_list, comps, tok.pad_token_id, images=images)
    # poison the padding: masked positions must not leak into real ones
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77)
    lp, ent = completion_logprobs(model, batch)
    m64 = _double(model)
    for i, (p, c) in enumerate(zip(ids_list, comps)):  # each row alone, unpadded, through the full model
        ids = torch.tensor([p + c])
        x = images[i]
        mask, mm = torch.ones_like(ids), (ids == m64.config.image_token_id).int()
        with torch.no_grad():  # the model places the tokens itself (its own M-RoPE positions)
            logits = m64(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, pixel_values=x.pixel_values.double(),
                         image_grid_thw=x.image_grid_thw).logits[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits, -1)
        want = ref.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(c)].double(), want, rtol=0, atol=2e-5)
        want_ent = -(ref.exp() * ref).sum(-1)
        torch.testing.assert_close(ent[i, :len(c)].double(), want_ent, rtol=0, atol=2e-5)
        assert (lp[i, len(c):] == 0).all()


def test_logprob_pass_sees_the_same_positions_as_generation(vl, prompts):
    """Sampling returns the sampler's log-probs; the log-prob pass over [prompt | completion] with M-RoPE
    must give the same numbers (positions, images and masks line up)."""
    model, tok, _ = vl
    ids_list, images = prompts
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, pad_token_id=tok.pad_token_id)
    out = generate(model, ids_list, s, num_samples=2, generator=torch.Generator().manual_seed(5), images=images,
                   return_logprobs=True)
    rows = [ids_list[r // 2] for r in range(len(out.completions))]
    batch = collate(rows, out.completions, tok.pad_token_id, images=[images[r // 2] for r in range(len(rows))])
    lp, _ = completion_logprobs(model, batch, with_entropy=False)
    for r, c in enumerate(out.completions):
        torch.testing.assert_close(lp[r, :len(c)], torch.tensor(out.logprobs[r]), rtol=0, atol=1e-4)


def _double(model):
    import copy

    return copy.deepcopy(model).double()
