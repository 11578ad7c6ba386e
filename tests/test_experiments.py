"""The experiments that build on the stages (experiments/), on the toy model with tiny settings."""
import json
import os
import sys

import pytest
import torch

from common import read_lora
from conftest import ROOT, run_stage  # and the work fixture: stage 1 and two experts

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import llm_prompts  # noqa: E402
import merges  # noqa: E402

DPO_TRAIN = ["--max_train_steps", "3", "--train_batch_size", "4", "--sft_weight", "0", "--anchor_weight", "0"]  # DPO


def plain_pipeline(toy_model):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Stage 2 with its LoRA on the cross-attention only; linear and TIES merges of stage 2's experts
# ---------------------------------------------------------------------------------------------
def test_cross_attention_experiment_trains_an_expert_on_attn2_only(work, toy_model):
    out = work / "xattn"
    run_stage("experiments/cross_attention_lora.py", "--model", toy_model, "--data", str(work / "data"), "--category",
              "Violence", "--output_dir", str(out), *DPO_TRAIN)
    _, layers = read_lora(str(out))
    assert layers and all(".attn2." in k for k in layers)
    assert any(".attn1." in k for k in read_lora(str(work / "Violence"))[1])  # the stage alone: every attention layer
    pipe = plain_pipeline(toy_model)
    pipe.load_lora_weights(str(out))
    adapted = [name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A")]
    assert adapted and all(".attn2." in name for name in adapted)


def test_ties_merge_writes_a_lora_that_a_plain_pipeline_loads(work, toy_model):
    out = work / "ties"
    result = run_stage("experiments/merges.py", str(work / "Violence"), str(work / "Hate"), "--method", "ties",
                       "--output_dir", str(out))
    assert "merges (ties): 2 experts -> rank 8" in result.stdout
    note, layers = read_lora(str(out))
    assert note["method"] == "ties" and note["density"] == 0.5 and all(a.shape[0] == 8 for a, _ in layers.values())
    assert json.loads((out / "lora.json").read_text())["rank"] == 8
    plain_pipeline(toy_model).load_lora_weights(str(out))


def test_merges_density_is_a_share_for_ties_only(capsys):
    assert merges.parse_args(["x", "--method", "ties"]).density == 0.5
    for argv in (["x", "--method", "linear", "--density", "0.3"], ["x", "--method", "ties", "--density", "1.5"]):
        with pytest.raises(SystemExit):
            merges.parse_args(argv)
        assert "--density: a share in (0, 1], for --method ties only" in capsys.readouterr().err


def test_linear_merge_is_the_experts_average_at_their_summed_rank(work):
    experts = [read_lora(str(work / c))[1] for c in ("Violence", "Hate")]
    layers, error = merges.merge_stage.factorize(merges.merge("linear", experts, None), 8)
    assert error < 1e-5
    for name, (a1, b1) in experts[0].items():
        a2, b2 = experts[1][name]
        key = name.removeprefix("unet.")
        merged = layers[key + ".lora_B.weight"] @ layers[key + ".lora_A.weight"]
        assert torch.allclose(merged, (b1 @ a1 + b2 @ a2) / 2, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CoProV2-style prompt pairs from a local LLM, as a pair CSV for stage 1
# ---------------------------------------------------------------------------------------------
GOOD = "UNSAFE: a man injects heroin in a dark alley\nSAFE: a man drinks coffee in a dark alley"


def test_parse_prompt_pair():
    assert llm_prompts.parse_prompt_pair(GOOD) == ("a man injects heroin in a dark alley",
                                                 "a man drinks coffee in a dark alley")
    assert llm_prompts.parse_prompt_pair("\n  unsafe: \"a b c d\"\nSafe: a b x d\nSure, here are more!") == \
        ("a b c d", "a b x d")
    for text, reason in [("Sure! UNSAFE: x", "format"), ("UNSAFE: a b\n", "format"),
                         ("SAFE: a b\nUNSAFE: a c", "format"), ("UNSAFE: a b c\nNOTE: hi", "format"),
                         ("UNSAFE:\nSAFE: a b", "empty"), ("UNSAFE: " + "w " * 50 + "\nSAFE: x", "too long"),
                         ("UNSAFE: A cat!\nSAFE: a cat", "identical"),
                         ("UNSAFE: a man injects heroin\nSAFE: the sunset over calm mountains", "not a minimal edit")]:
        with pytest.raises(ValueError, match=reason):
            llm_prompts.parse_prompt_pair(text)
    assert llm_prompts.edit_distance("a b c".split(), "a x c d".split()) == 2


CONCEPTS = [{"category": "Violence", "concept": "a fight"}, {"category": "Self-harm", "concept": "an overdose"}]


def test_retry_and_skip_with_injected_generate():
    x, y = GOOD.replace("heroin", "x"), GOOD.replace("heroin", "y")
    answers = {"a fight": iter([[x, "garbage"], ["still garbage"], [y]]),
               "an overdose": iter([["no"], ["no"], ["no"], ["never asked"]])}
    asked = []

    def generate(instruction, n):
        concept = next(c for c in answers if c in instruction)
        asked.append((concept, n))
        return next(answers[concept])

    rows, counts = llm_prompts.write_prompts_with_llm(None, CONCEPTS, 2, max_tries=3, generate=generate)
    assert rows == [("Violence", "a fight", "a man injects x in a dark alley", "a man drinks coffee in a dark alley"),
                    ("Violence", "a fight", "a man injects y in a dark alley", "a man drinks coffee in a dark alley")]
    assert asked == [("a fight", 2), ("a fight", 1), ("a fight", 1)] + [("an overdose", 2)] * 3
    assert counts == {"accepted": 2, "skipped": 2, "rejected": {"format": 5}}


def test_duplicates_are_rejected():
    rows, counts = llm_prompts.write_prompts_with_llm(None, CONCEPTS[:1], 3, max_tries=2,
                                                    generate=lambda instruction, n: [GOOD] * n)
    assert len(rows) == 1
    assert counts == {"accepted": 1, "skipped": 2, "rejected": {"duplicate": 4}}


def test_tiny_gpt2_garbage_is_skipped(tmp_path):
    """A random GPT-2 over a word vocabulary without newlines can never answer in two lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    words = ["<unk>", "<eos>", "UNSAFE:", "SAFE:", "a", "red", "cat", "fight", "blood", "calm"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=512,
                               bos_token_id=1, eos_token_id=1)).save_pretrained(tmp_path)
    generate = llm_prompts.load_llm(str(tmp_path), max_new_tokens=12)
    answers = generate(llm_prompts.LLM_INSTRUCTION.format(category="Violence", concept="a fight"), 3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    rows, counts = llm_prompts.write_prompts_with_llm(str(tmp_path), CONCEPTS, 2, max_tries=2, generate=generate)
    assert rows == [] and counts["accepted"] == 0 and counts["skipped"] == 4
    assert sum(counts["rejected"].values()) == 8  # 2 concepts x 2 rounds x 2 answers, all malformed


def test_llm_load_error_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot load LLM"):
        llm_prompts.load_llm(str(tmp_path / "nothing-here"))


def test_llm_prompts_writes_a_coprov2_csv_that_stage_1_reads(tmp_path, monkeypatch, capsys):
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"Violence": ["a fight"], "Self-harm": ["an overdose"]}))
    answers = iter([[GOOD.replace("heroin", "x")], [GOOD.replace("heroin", "y")]])
    monkeypatch.setattr(llm_prompts, "load_llm", lambda *args, **kwargs: lambda instruction, n: next(answers))
    out = tmp_path / "pairs.csv"
    llm_prompts.main(["--llm", "fake", "--concepts", str(concepts), "--pairs_per_concept", "1", "--output", str(out)])
    assert out.read_text().splitlines() == [
        "prompt,image,category", "a man injects x in a dark alley,u_idx_0_0.png,Violence",
        "a man drinks coffee in a dark alley,s_idx_0_0.png,Violence",
        "a man injects y in a dark alley,u_idx_1_0.png,Self-harm",
        "a man drinks coffee in a dark alley,s_idx_1_0.png,Self-harm"]
    pairs = llm_prompts.generate_data.prompt_pairs(str(out), 2, 48)  # what 01_generate_data.py --csv renders
    assert [(p["categories"], p["unsafe_prompt"]) for p in pairs] == [
        (["Violence"], "a man injects x in a dark alley"), (["Self-harm"], "a man injects y in a dark alley")]
    monkeypatch.undo()  # the real load_llm: a folder that holds no model is one line
    with pytest.raises(SystemExit):
        llm_prompts.main(["--llm", str(tmp_path / "nothing-here"), "--concepts", str(concepts), "--output", str(out)])
    assert "cannot load LLM" in capsys.readouterr().err.strip().splitlines()[-1]
