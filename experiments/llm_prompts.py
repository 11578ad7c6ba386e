"""CoProV2-style prompt pairs written by a local LLM, as a pair CSV that stage 1 renders.

For every concept of a concepts file (JSON {category: [concept, ...]}) the LLM writes an unsafe prompt
and a minimally edited safe one (LLM_INSTRUCTION; `parse_prompt_pair` checks the answer). The pairs
go to a CSV in CoProV2's layout (prompt,image,category; u_idx_N_0.png / s_idx_N_0.png), which stage 1
renders with the model being aligned:

    python experiments/llm_prompts.py --llm Qwen/Qwen2.5-1.5B-Instruct --concepts concepts.json \\
        --pairs_per_concept 8 --output llm_pairs.csv
    python 01_generate_data.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --csv llm_pairs.csv \\
        --output_dir data/llm

The prompts are sampled once: a rerun samples again (and overwrites the CSV, which stage 1 then
refuses to mix into a folder rendered from the old one). Malformed or duplicate answers are asked
again, up to --max_tries rounds per concept, then skipped: a bad answer never ends the run.
"""
import argparse
import json
import re
from collections import Counter

import torch
from tqdm import tqdm

import lab  # the repository root on sys.path
from common import entry_point, fail, positive

generate_data = lab.load_stage("01_generate_data.py")


# ---------------------------------------------------------------------------------------------
# The LLM and its answers
# ---------------------------------------------------------------------------------------------
LLM_INSTRUCTION = (
    "We are building training data that teaches a text-to-image model which concepts to avoid.\n"
    "Concept: {concept} (category: {category}).\n"
    "Write one image prompt of at most 30 words that clearly depicts this concept. Then write a safe version "
    "that changes as few words as possible so that the concept is gone.\n"
    "Answer with exactly two lines and nothing else:\nUNSAFE: <prompt>\nSAFE: <prompt>")


def _words(text):
    return re.findall(r"[\w']+", text.lower())


def edit_distance(a, b):
    """Levenshtein distance between two sequences (of words, here)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def parse_prompt_pair(text, max_words=40, max_edit_fraction=0.5):
    """(unsafe, safe) from an answer in LLM_INSTRUCTION's format, or ValueError(reason).

    The first two non-empty lines must be "UNSAFE: ..." and "SAFE: ..."; what follows is ignored (models
    ramble on). The safe prompt must be a minimal edit: at most max_edit_fraction of the unsafe prompt's
    words inserted, deleted or replaced (at least one)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()][:2]
    if len(lines) < 2 or not lines[0].upper().startswith("UNSAFE:") or not lines[1].upper().startswith("SAFE:"):
        raise ValueError("format")
    unsafe, safe = (line.split(":", 1)[1].strip().strip('"').strip() for line in lines)
    if not unsafe or not safe:
        raise ValueError("empty")
    if max(len(unsafe.split()), len(safe.split())) > max_words:
        raise ValueError("too long")
    a, b = _words(unsafe), _words(safe)
    if a == b:
        raise ValueError("identical")
    if edit_distance(a, b) > max(1, max_edit_fraction * len(a)):
        raise ValueError("not a minimal edit")
    return unsafe, safe


def load_llm(model_id, device="cpu", dtype=torch.float32, max_new_tokens=96, temperature=0.8):
    """generate(instruction, n) -> n sampled answers from a transformers causal LM, through its chat
    template when it has one (no trust_remote_code: only architectures transformers ships)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load LLM {model_id!r} (a hub id needs network access or a cached copy): "
                         f"{str(error).splitlines()[0]}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(instruction, n):
        if tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:  # a base model: let it continue the instruction
            inputs = tokenizer(instruction + "\n", return_tensors="pt")
        inputs = inputs.to(device)
        out = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=0.95, num_return_sequences=n,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return generate


def write_prompts_with_llm(model_id, concepts, prompts_per_concept, max_tries=3, seed=0, generate=None,
                           device="cpu", dtype=torch.float32, **parse_options):
    """CoProV2-style pairs written by an LLM, for `concepts` (dicts {category, concept}).

    Returns the rows (category, concept, unsafe prompt, safe prompt) and counts {"accepted", "skipped",
    "rejected": {reason: n}}. Malformed or duplicate answers are asked again, up to `max_tries` rounds per
    concept, then skipped: a bad answer never ends the stage. `generate(instruction, n) -> n answers`
    may be injected (the tests do); by default it is load_llm(model_id)."""
    generate = generate or load_llm(model_id, device, dtype)
    torch.manual_seed(seed)
    rows, rejected, seen = [], Counter(), set()
    for c in tqdm(concepts, desc="LLM prompts"):
        instruction = LLM_INSTRUCTION.format(category=c["category"], concept=c["concept"])
        need = prompts_per_concept
        for _ in range(max_tries):
            for answer in generate(instruction, need)[:need]:
                try:
                    unsafe, safe = parse_prompt_pair(answer, **parse_options)
                    if unsafe.lower() in seen:
                        raise ValueError("duplicate")
                except ValueError as error:
                    rejected[str(error)] += 1
                    continue
                seen.add(unsafe.lower())
                rows.append((c["category"], c["concept"], unsafe, safe))
                need -= 1
            if need == 0:
                break
    skipped = len(concepts) * prompts_per_concept - len(rows)
    return rows, {"accepted": len(rows), "skipped": skipped, "rejected": dict(rejected)}


# ---------------------------------------------------------------------------------------------
# The script: a concepts file in, a CoProV2 pair CSV out
# ---------------------------------------------------------------------------------------------
def read_concepts(path):
    """A concepts file, JSON {category: [concept, ...]}, as [{category, concept}]."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"--concepts {path}: {str(error).splitlines()[0]}")
    if not isinstance(table, dict) or not all(isinstance(ks, list) and all(isinstance(k, str) for k in ks)
                                              for ks in table.values()):
        fail(f"--concepts {path}: expected {{category: [concept, ...]}} with strings for concepts")
    return [{"category": c, "concept": k} for c, ks in table.items() for k in ks]


def coprov2_rows(rows):
    """The rows (category, concept, unsafe, safe) as CoProV2's CSV rows: pair N is u_idx_N_0 and s_idx_N_0."""
    return [row for i, (category, _, unsafe, safe) in enumerate(rows)
            for row in zip((unsafe, safe), generate_data.image_names(i), (category, category))]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="a transformers causal LM: local folder or hub id")
    parser.add_argument("--concepts", required=True, help="JSON {category: [concept, ...]}")
    parser.add_argument("--pairs_per_concept", type=positive(int), default=8)
    parser.add_argument("--max_tries", type=positive(int), default=3, help="rounds of asking again per concept")
    parser.add_argument("--seed", type=positive(int, zero=True), default=0)
    parser.add_argument("--output", required=True, help="the pair CSV to write (01_generate_data.py --csv)")
    return parser.parse_args(argv)


@entry_point
def main(argv=None):
    args = parse_args(argv)
    concepts = read_concepts(args.concepts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        rows, counts = write_prompts_with_llm(args.llm, concepts, args.pairs_per_concept, args.max_tries, args.seed,
                                              device=device)
    except (ValueError, RuntimeError, OSError) as error:  # load_llm's one-line errors, a model that cannot generate
        fail(f"--llm {args.llm}: {str(error).splitlines()[0]}")
    print(f"llm prompts: {counts}")
    if not rows:
        fail(f"--llm {args.llm} wrote no usable prompt pair ({counts['rejected']})")
    generate_data.write_csv(args.output, coprov2_rows(rows))
    print(f"llm prompts: {len(rows)} pairs of {len(concepts)} concepts -> {args.output}")


if __name__ == "__main__":
    main()
