"""Vision-language prompts: the tiny Qwen2-VL (rtpo/embedded_vl.py), image rows, the rollout engine's
and the log-prob pass's vision path (rtpo/vision.py) against transformers, and training end to end."""

import json

import pytest
import torch
from PIL import Image

from rtpo import embedded_vl
from rtpo.generation import SamplingConfig, generate
from rtpo.logprobs import collate, completion_logprobs
from rtpo.vision import VisionProcessor, batch_images


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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


def greedy_ours_and_hf(model, tok, ids_list, images, T):
    """(our greedy completions, transformers' generate's) of T tokens each, left-padded image prompts."""
    ours = generate(model, ids_list, SamplingConfig(max_new_tokens=T, temperature=0.0, pad_token_id=tok.pad_token_id),
                    images=images).completions
    inp = hf_inputs(tok, model, ids_list, images)
    with torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=T, do_sample=False, min_new_tokens=T, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    return ours, ref[:, inp["input_ids"].shape[1]:].tolist()


def test_greedy_matches_hf_generate_on_left_padded_image_prompts(vl, prompts):
    model, tok, _ = vl
    ids_list, images = prompts
    ours, ref = greedy_ours_and_hf(model, tok, ids_list, images, 12)
    assert ours == ref
    assert len({tuple(r) for r in ref}) == len(ref)  # the rows differ: the images and prompts matter


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_each_image_prompt_alone_equals_its_row_in_the_batch(vl, prompts, cache):
    model, tok, _ = vl
    ids_list, images = prompts
    s = SamplingConfig(max_new_tokens=8, temperature=0.0, pad_token_id=tok.pad_token_id)
    batch = generate(model, ids_list, s, images=images, cache=cache).completions
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


def test_a_completion_that_samples_the_image_token_stays_text(vl, prompts):
    """A policy may sample <|image_pad|> like any token: in the log-prob pass it is text (no pixels), as
    when transformers decodes it step by step through the KV cache (the reference here, in float64)."""
    from transformers import DynamicCache

    model, tok, vp = vl
    ids_list, images = prompts
    comp = [vp.image_token_id, 40, vp.image_token_id, 41]
    batch = collate(ids_list[:2], [comp, [41]], tok.pad_token_id, images=images[:2])
    lp, _ = completion_logprobs(model, batch, with_entropy=False)
    m64, p, x = _double(model), torch.tensor([ids_list[0]]), images[0]
    kv = DynamicCache(config=m64.config)
    with torch.no_grad():  # the model places the tokens itself: prefill with the image, then one token a step
        out = m64(input_ids=p, mm_token_type_ids=(p == m64.config.image_token_id).int(),
                  pixel_values=x.pixel_values.double(), image_grid_thw=x.image_grid_thw, cache=kv, use_cache=True)
        logits = [out.logits[0, -1]]
        for t in comp[:-1]:
            logits.append(m64(input_ids=torch.tensor([[t]]), cache=kv, use_cache=True).logits[0, -1])
    want = torch.stack([torch.log_softmax(lg, -1)[t] for lg, t in zip(logits, comp)])
    torch.testing.assert_close(lp[0, :len(comp)].double(), want, rtol=0, atol=2e-5)


# --- the trainer with image rows --------------------------------------------------------------------------
VL_FLAGS = ["--model", "embedded-vl", "--dataset", "shapes", "--data.num_eval", "4", "--loss.hint_loss", "0.5"]


def vl_args(out, cache, *extra):
    from conftest import tiny_args

    return tiny_args(out, cache, *VL_FLAGS, *extra)


def run_quiet(argv):
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    return Trainer(parse_args([str(a) for a in argv]), log=lambda m: None).train()


def test_shapes_rows_trace_and_image_agree():
    """The trace's counts are the pink and gold squares of the image (read back from its pixels), the
    last line multiplies them and states the answer; the same seed gives the same rows."""
    import numpy as np

    from rtpo import shapes

    rows = shapes.make_dataset(60, seed=7, max_operands=8)
    again = shapes.make_dataset(60, seed=7, max_operands=8)
    assert [r["reasoning"] for r in rows] == [r["reasoning"] for r in again]
    assert [np.asarray(r["image"]).tobytes() for r in rows] == [np.asarray(r["image"]).tobytes() for r in again]
    for r in rows:
        px = np.asarray(r["image"])
        centres = [tuple(px[14 * i + 7, 14 * j + 7]) for i in range(4) for j in range(4)]
        pink, gold = (sum(c == shapes.COLOURS[k] for c in centres) for k in ("pink", "gold"))
        assert r["reasoning"] == f"pink {pink}\ngold {gold}\n{pink}*{gold}={pink * gold}"
        assert r["answer"] == str(pink * gold) and r["reasoning"].endswith("=" + r["answer"])
    assert len({r["answer"] for r in rows}) >= 5


def test_shapes_splits_are_disjoint_by_image_not_by_question():
    """Every shapes row asks the same question: held-out rows are told apart by their pixels."""
    from rtpo.config import DataConfig
    from rtpo.data import load_splits

    train, ev = load_splits(DataConfig(dataset="shapes", synthetic_size=200, num_eval=20, max_operands=8))
    assert len(train) >= 180 and len(ev) == 20
    assert len({e.question for e in train}) == 1 and all(e.images and e.image_digest for e in train)
    assert not {e.identity for e in ev} & {e.identity for e in train}


@pytest.mark.slow
def test_rl_steps_on_the_tiny_vlm_train_checkpoint_the_processor_and_resume_exactly(tmp_path):
    """4 RL steps (full fine-tuning, hint loss on) on image prompts update the vision tower too; the
    checkpoint holds the image processor; 2 steps + resume + 2 steps = 4 steps (metrics, weights);
    rtpo.eval reads the checkpoint back."""
    from safetensors.torch import load_file

    from rtpo import eval as rtpo_eval
    from rtpo.metrics import read_metrics

    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    run_quiet(vl_args(a, cache))
    first = run_quiet(vl_args(b, cache, "--run.stop_after_steps", "2"))
    assert first["steps"] == 2
    run_quiet(vl_args(b, cache, "--resume", "auto"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert strip(ra) == strip(rb) and len([r for r in ra if "reward" in r]) == 4
    assert all(r["hint_nll"] is not None for r in ra if r.get("keep", 0) > 0 and "reward" in r)
    wa = load_file(a / "checkpoints/step_000004/model.safetensors")
    wb = load_file(b / "checkpoints/step_000004/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w2 = load_file(b / "checkpoints/step_000002/model.safetensors")
    merger = [k for k in wa if "visual.merger." in k]
    encoder = [k for k in wa if "visual." in k and k not in merger]
    assert merger and any(not torch.equal(wa[k], w2[k]) for k in merger)  # RL trains the merger...
    assert encoder and all(torch.equal(wa[k], w2[k]) for k in encoder)  # ...not the frozen vision encoder
    assert (a / "checkpoints/step_000004/preprocessor_config.json").is_file()
    assert rtpo_eval.main([str(a), "--keep", "0,1", "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["n"] for r in res] == [4, 4] and res[1]["injected_tokens"] > 0


def test_lora_on_the_tiny_vlm_trains_only_adapters(tmp_path):
    """With LoRA (model.lora, from the LoRA branch) one RL step on image prompts changes only adapter
    weights. Skipped until rtpo has model.lora."""
    from rtpo.config import ModelConfig

    if not hasattr(ModelConfig(), "lora"):
        pytest.skip("model.lora is not in this rtpo (the LoRA branch adds it)")
    from rtpo.cli import parse_args
    from rtpo.trainer import Trainer

    tr = Trainer(parse_args([str(a) for a in vl_args(tmp_path / "run", tmp_path / "cache", "--model.lora.r", "4",
                                                       "--max_steps", "1", "--eval.num_examples", "0")]),
                 log=lambda m: None)
    before = {k: v.detach().clone() for k, v in tr.run.model.named_parameters()}
    tr.train()
    changed = [k for k, v in tr.run.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed and all("lora_" in k for k in changed)


def test_lora_on_the_tiny_vlm_resumes_exactly_and_exports_a_vision_language_model(tmp_path):
    """LoRA on image prompts end to end: 2 steps + resume + 2 steps = 4 steps (metrics, adapter weights);
    the checkpoint is a PEFT adapter on the warm-started base; rtpo.eval reads the run back; rtpo.export
    writes a merged vision-language model (its class, no LoRA weights left) with its image processor."""
    from safetensors.torch import load_file

    from rtpo import eval as rtpo_eval, export
    from rtpo.metrics import read_metrics
    from rtpo.models import load_pretrained

    pytest.importorskip("peft")
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    lora = ("--model.lora.r", "4", "--lr", "1e-2")
    run_quiet(vl_args(a, cache, *lora))
    assert run_quiet(vl_args(b, cache, *lora, "--run.stop_after_steps", "2"))["steps"] == 2
    run_quiet(vl_args(b, cache, *lora, "--resume", "auto"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(read_metrics(a / "metrics.jsonl")) == strip(read_metrics(b / "metrics.jsonl"))
    ck = a / "checkpoints/step_000004"
    wa, wb = load_file(ck / "adapter_model.safetensors"), load_file(b / "checkpoints/step_000004/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (ck / "model.safetensors").exists() and (ck / "preprocessor_config.json").is_file()
    assert rtpo_eval.main([str(a), "--keep", "0", "--no-progress", "--out", str(tmp_path / "e.json")]) == 0
    out = tmp_path / "merged"
    assert export.main([str(ck), str(out)]) == 0
    assert (out / "preprocessor_config.json").is_file()
    merged = load_pretrained(str(out))
    assert type(merged).__name__.endswith("ForConditionalGeneration")
    assert not any("lora_" in k for k in merged.state_dict())


# --- bad image input: one error line, exit 2, nothing written ----------------------------------------------
@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    noise_image(56, 56, 1).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = {"question": "How many?", "reasoning": "1+1=2", "answer": "2"}

    def write(name, rows):
        (d / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return str(d / name)

    n = 8
    return {
        "missing": write("missing.jsonl", [{**good, "image": "ok.png"}] * (n - 1) + [{**good, "image": "nope.png"}]),
        "broken": write("broken.jsonl", [{**good, "image": "ok.png"}] * 3 + [{**good, "image": "broken.png"}] * 5),
        "good": write("good.jsonl", [{**good, "image": "ok.png", "question": f"How many? {i}"} for i in range(n)]),
        "field": write("field.jsonl", [{**good, "picture": "ok.png"}] * n),
    }


BAD_IMAGES = [
    ("missing_file", lambda f: ["--dataset", f["missing"], "--model", "embedded-vl"],
     ["row 7 field 'image' (data.image_field)", "image file 'nope.png' does not exist"]),
    ("unreadable_bytes", lambda f: ["--dataset", f["broken"], "--model", "embedded-vl"],
     ["row 3 field 'image'", "'broken.png' cannot be read as an image"]),
    ("image_field_with_a_text_only_model", lambda f: ["--dataset", f["good"], "--model", "embedded"],
     ["data.image_field", "has images", "text-only", "--model embedded-vl", "--data.image_field none"]),
    ("image_prompt_over_budget", lambda f: ["--dataset", f["good"], "--model", "embedded-vl",
                                            "--data.max_prompt_tokens", "20"],
     ["data.max_prompt_tokens = 20", "image tokens included", "--model.max_pixels"]),
    ("image_field_named_but_absent", lambda f: ["--dataset", f["field"], "--model", "embedded-vl",
                                               "--data.image_field", "photo"],
     ["row 0 has no field 'photo' (data.image_field)", "picture"]),
]


@pytest.mark.parametrize("case,flags,expected", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_input_one_error_line_exit_2_nothing_written(case, flags, expected, image_files, tmp_path, capfd):
    import train

    out = tmp_path / "run"
    argv = [str(a) for a in vl_args(out, tmp_path / "cache", "--warmstart.enabled", "false", *flags(image_files))]
    rc = train.main(argv)
    _, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for s in expected:
        assert s in lines[0], (s, lines[0])
    assert not out.exists()


def test_an_image_bytes_value_and_a_list_of_images_load():
    """Rows may hold bytes, a PIL image, a datasets Image dict, or a list of them; bytes that are not an
    image are refused with the reason."""
    import io

    from rtpo.vision import ImageError, load_images

    buf = io.BytesIO()
    noise_image(30, 20, 2).save(buf, format="PNG")
    ims = load_images([buf.getvalue(), noise_image(10, 10, 3), {"bytes": buf.getvalue(), "path": None}])
    assert [im.size for im in ims] == [(30, 20), (10, 10), (30, 20)] and all(im.mode == "RGB" for im in ims)
    with pytest.raises(ImageError, match="image bytes cannot be decoded"):
        load_images(b"GIF89a garbage")


@pytest.mark.parametrize("injection", ["prefix", "turn"])
def test_image_prompts_carry_the_hint_as_text_prompts_do(vl, injection):
    """The image tokens sit in the user turn, before any hint; keep 0 is the evaluation prompt; the hint is
    the first floor(keep * n) trace tokens, spliced after the image exactly as for a text row."""
    from rtpo.config import CurriculumConfig, DataConfig
    from rtpo.data import validate_rows
    from rtpo.prompts import PromptBuilder
    from rtpo import shapes

    _, tok, vp = vl
    ex = validate_rows(shapes.make_dataset(1, seed=2), DataConfig(dataset="shapes"), "shapes")[0]
    text_ex = validate_rows([{k: v for k, v in shapes.make_dataset(1, seed=2)[0].items() if k != "image"}],
                            DataConfig(), "text")[0]
    b = PromptBuilder(tok, CurriculumConfig(injection=injection), 512, vision=vp)
    enc, tenc = b.encode(ex), PromptBuilder(tok, CurriculumConfig(injection=injection), 512).encode(text_ex)
    n_img = sum(t == vp.image_token_id for t in enc.base)
    assert n_img == 4 and enc.reasoning == tenc.reasoning
    assert b.build(enc, 0.0)[0] == enc.base
    # what precedes the hint: the user turn (with its image tokens) in both modes
    head, thead = (enc.base, tenc.base) if injection == "prefix" else (enc.turn_pre, tenc.turn_pre)
    assert head.count(vp.image_token_id) == 4
    for keep in (0.5, 1.0):
        p, k = b.build(enc, keep)
        tp, tk = PromptBuilder(tok, CurriculumConfig(injection=injection), 512).build(tenc, keep)
        assert k == tk > 0 and p[:len(head)] == head and p[len(head):] == tp[len(thead):]


def test_warmstart_trains_the_merger_not_a_frozen_vision_encoder(vl, tmp_path):
    from rtpo.config import RTPOConfig
    from rtpo.data import validate_rows
    from rtpo.prompts import PromptBuilder
    from rtpo.vision import vision_encoder_parameters
    from rtpo.warmstart import train_sft
    from rtpo import shapes

    _, tok, vp = vl
    model = embedded_vl.build_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, seed=1)
    cfg = RTPOConfig()
    cfg.warmstart.steps, cfg.warmstart.batch_size = 3, 4
    exs = validate_rows(shapes.make_dataset(8, seed=2), cfg.data, "shapes")
    for p in vision_encoder_parameters(model):  # what the trainer does with model.freeze_vision_encoder
        p.requires_grad_(False)
    enc_before = [p.detach().clone() for p in vision_encoder_parameters(model)]
    merger = [p.detach().clone() for p in model.model.visual.merger.parameters()]
    train_sft(model, tok, PromptBuilder(tok, cfg.curriculum, 512, vision=vp), exs, cfg.warmstart, "cpu", log=lambda m: 0)
    after = vision_encoder_parameters(model)
    assert len(after) > 2 and all(torch.equal(a, b) for a, b in zip(after, enc_before))
    assert all(p.grad is None for p in after)  # no gradient computed for the frozen encoder
    assert any(not torch.equal(a, b) for a, b in zip(model.model.visual.merger.parameters(), merger))


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_image_prompts(tmp_path):
    """torchrun 2 processes (DDP: the images travel with each process's rows into the log-prob module)
    equals 1 process within 1e-5 on the tiny VLM."""
    from test_distributed import TOL, launch, max_differences, single, tiny, torchrun

    cache = tmp_path / "cache"
    extra = [*VL_FLAGS, "--loss.loss_type", "grpo"]
    single(tiny(tmp_path / "one", cache, *extra))
    p = launch(torchrun("train.py", *tiny(tmp_path / "ddp", cache, *extra)))
    assert "DDP: 2 process(es)" in p.stdout + p.stderr
    metric, weight = max_differences(tmp_path / "one", tmp_path / "ddp", 3)
    assert metric < TOL and weight < TOL


def tiny_qwen25_vl(tok, seed=0):
    """A random Qwen2.5-VL (window attention in the vision tower, its own rope index): what a GPU user runs
    at 3B, at toy size."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in embedded_vl.VISION_TOKENS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
                         initializer_range=0.15),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], initializer_range=0.15),
        image_token_id=ids[embedded_vl.IMAGE_PAD], video_token_id=ids[embedded_vl.VIDEO_PAD],
        vision_start_token_id=ids[embedded_vl.VISION_START], vision_end_token_id=ids[embedded_vl.VISION_END],
        tie_word_embeddings=True, initializer_range=0.15)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg).eval()


def test_qwen2_5_vl_greedy_and_logprobs_match_transformers(vl, prompts):
    """The same vision path works for Qwen2.5-VL: greedy decode equals transformers' generate on the
    left-padded image prompts, and the log-prob pass equals the model's own forward."""
    _, tok, _ = vl
    model = tiny_qwen25_vl(tok)
    ids_list, images = prompts
    ours, ref = greedy_ours_and_hf(model, tok, ids_list, images, 10)
    assert ours == ref
    batch = collate(ids_list, ours, tok.pad_token_id, images=images)
    lp, _ = completion_logprobs(model, batch, with_entropy=False)
    compared = 0
    for i, (p, c) in enumerate(zip(ids_list, ours)):
        if vl[2].image_token_id in c:
            continue  # the model's own forward would read a sampled image token as a placeholder
        compared += 1
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=(ids == model.config.image_token_id).int(),
                           pixel_values=images[i].pixel_values, image_grid_thw=images[i].image_grid_thw).logits
        want = torch.log_softmax(logits[0, len(p) - 1:-1].float(), -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(c)], want, rtol=0, atol=1e-4)
    assert compared >= 2


def test_max_pixels_bounds_the_image_tokens_and_is_saved_with_the_processor(vl, tmp_path):
    from rtpo.models import load_vision_processor

    model, tok, _ = vl
    big = noise_image(112, 112, 4)
    assert load_vision_processor("embedded-vl", tok, model).token_counts([big]) == [16]
    small = load_vision_processor("embedded-vl", tok, model, max_pixels=56 * 56)
    assert small.token_counts([big]) == [4] and small.process([big]).image_grid_thw.tolist() == [[1, 4, 4]]
    small.save_pretrained(str(tmp_path))
    assert load_vision_processor(str(tmp_path), tok, model).token_counts([big]) == [4]


def test_shapes_preset_fits_its_prompt_budget_with_the_whole_trace():
    """--preset shapes: every prompt, with the whole trace injected, fits data.max_prompt_tokens (no trace
    is cut), and the prompt budget plus completions fits the model's context."""
    from rtpo.cli import parse_args
    from rtpo.data import load_splits
    from rtpo.models import load_model_and_tokenizer, load_vision_processor
    from rtpo.prompts import PromptBuilder

    cfg = parse_args(["--preset", "shapes", "--data.synthetic_size", "50", "--data.num_eval", "10"])
    assert cfg.model.name == "embedded-vl" and cfg.data.dataset == "shapes" and cfg.model.freeze_vision_encoder
    model, tok = load_model_and_tokenizer(cfg.model)
    b = PromptBuilder(tok, cfg.curriculum, cfg.data.max_prompt_tokens, vision=load_vision_processor("embedded-vl", tok,
                                                                                                   model))
    train, ev = load_splits(cfg.data)
    for ex in train + ev:
        enc = b.encode(ex)
        assert not enc.truncated and len(b.build(enc, 1.0)[0]) <= cfg.data.max_prompt_tokens
    assert cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens <= model.config.text_config.max_position_embeddings


@pytest.mark.slow
def test_vlm_shapes_benchmark_smoke_writes_table_and_json(tmp_path, capsys):
    """benchmarks/vlm_shapes.py runs both arms (toy sizes: a 1-layer model, 2 RL steps) and writes its JSON."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "vlm_shapes.py")
    spec = importlib.util.spec_from_file_location("vlm_shapes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    toy = ["--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2", "--model.num_kv_heads",
           "1", "--model.intermediate_size", "64", "--warmstart.steps", "3", "--warmstart.num_examples", "40",
           "--warmstart.cache_dir", str(tmp_path / "cache"), "--data.synthetic_size", "40", "--data.num_eval", "4",
           "--eval.num_examples", "4", "--run.max_steps", "2", "--eval.every", "1", "--rollout.prompts_per_step", "2",
           "--G", "2", "--rollout.max_new_tokens", "8", "--eval.max_new_tokens", "8"]
    assert mod.main(["--seeds", "1", "--out", str(out), *toy]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["arm"] for r in res] == ["rtpo", "grpo"] and all(r["steps"] == 2 for r in res)
    assert [s for s, _ in res[0]["eval_curve"]] == [0, 1, 2]
    assert "| rtpo mean |" in capsys.readouterr().out


def test_a_batch_mixing_image_and_text_prompts_equals_each_prompt_alone(vl, prompts):
    """Rows without images (None) next to image rows: positions, pixels and grids line up per row."""
    model, tok, _ = vl
    ids_list, images = prompts
    text = tok.apply_chat_template([{"role": "user", "content": "Just text."}], tokenize=False,
                                   add_generation_prompt=True)
    mixed = [ids_list[0], tok(text, add_special_tokens=False)["input_ids"], ids_list[2]]
    imgs = [images[0], None, images[2]]
    s = SamplingConfig(max_new_tokens=6, temperature=0.0, pad_token_id=tok.pad_token_id)
    batch = generate(model, mixed, s, images=imgs).completions
    alone = [generate(model, [p], s, images=None if x is None else [x]).completions[0] for p, x in zip(mixed, imgs)]
    assert batch == alone
    b = collate(mixed, batch, tok.pad_token_id, images=imgs)
    lp, _ = completion_logprobs(model, b, with_entropy=False)
    for i, (p, c, x) in enumerate(zip(mixed, batch, imgs)):
        one = collate([p], [c], tok.pad_token_id, images=None if x is None else [x])
        torch.testing.assert_close(lp[i, :len(c)], completion_logprobs(model, one, with_entropy=False)[0][0, :len(c)],
                                   rtol=0, atol=1e-5)


def test_a_tokenizer_without_chat_template_takes_the_processors(vl, tmp_path):
    """Some VLM repos keep the chat template with the processor (chat_template.json) only: the
    tokenizer gets it, so image placeholders are rendered."""
    from rtpo.models import load_vision_processor

    model, tok, _ = vl
    bare = embedded_vl.build_tokenizer()
    bare.chat_template = None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": embedded_vl.CHAT_TEMPLATE}))
    embedded_vl.build_image_processor().save_pretrained(str(tmp_path))
    vp = load_vision_processor(str(tmp_path), bare, model)
    assert bare.chat_template == embedded_vl.CHAT_TEMPLATE and vp.token_counts([noise_image(56, 56, 0)]) == [4]


def test_packed_image_batch_equals_the_padded_one_loss_and_gradients(vl, prompts):
    """The update's packed layout on image prompts (each prompt and its images encoded once per tree,
    M-RoPE positions per tree, completions restarting at the prompt's next position) gives the padded
    layout's log-probs, entropies and gradients (vision tower, merger, decoder) within 1e-5 in float32:
    groups of 3 completions of different lengths (one of them samples the image token, which stays text),
    one group split over two micro batches, and two prompts with the same ids but other pixels."""
    from rtpo.logprobs import make_batch

    model, tok, vp = vl
    ids_list, images = prompts
    twin_ids, twin_img = image_prompt(tok, vp, CASES[0][0], [noise_image(56, 56, 999)])  # ids of prompt 0
    assert twin_ids == ids_list[0]
    groups = list(zip(ids_list, images)) + [(twin_ids, twin_img)]
    g = torch.Generator().manual_seed(5)
    rows_p, rows_c, rows_i = [], [], []
    for p, x in groups:
        for j in range(3):
            comp = torch.randint(3, 60, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            if j == 1:
                comp[0] = model.config.image_token_id
            rows_p.append(p)
            rows_c.append(comp)
            rows_i.append(x)
    u = torch.randn(len(rows_p), 9, generator=g)

    def loss_and_grads(packing, micro):
        model.zero_grad()
        for rows in micro:
            b = make_batch(model, [rows_p[i] for i in rows], [rows_c[i] for i in rows], tok.pad_token_id,
                           packing=packing, share_prefix=packing, images=[rows_i[i] for i in rows])
            assert ("gather_index" in b) == packing
            logp, ent = completion_logprobs(model, b)
            T = logp.shape[1]
            ((logp + 0.1 * ent) * u[rows, :T]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads

    n = len(rows_p)
    micro = [list(range(0, 5)), list(range(5, n))]  # the second group is cut between the micro batches
    g_pad, g_pack = loss_and_grads(False, micro), loss_and_grads(True, micro)
    assert g_pad.keys() == g_pack.keys() and any("visual" in k for k in g_pad)
    for k in g_pad:
        err = (g_pack[k] - g_pad[k]).abs().max() / g_pad[k].abs().max().clamp_min(1e-12)
        assert err < 1e-5, (k, float(err))
    for rows in micro:
        args = ([rows_p[i] for i in rows], [rows_c[i] for i in rows], tok.pad_token_id)
        kw = dict(images=[rows_i[i] for i in rows])
        with torch.no_grad():
            a = completion_logprobs(model, make_batch(model, *args, packing=True, **kw))
            b = completion_logprobs(model, make_batch(model, *args, packing=False, share_prefix=False, **kw))
        for x, y in zip(a, b):
            assert (x - y).abs().max() < 1e-5
