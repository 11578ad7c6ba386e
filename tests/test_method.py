"""The method itself, apart from the machinery: the Diffusion-DPO loss, Co-Merge's per-weight rule,
and the release's training recipe as stage 2 resolves it. Fast: no model is trained here."""
import math

import pytest
import torch

from conftest import load_stage

train = load_stage("02_train_expert.py")
dpo_loss = train.dpo_loss


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    torch.manual_seed(0)
    noise, w, l = torch.randn(3, 4, 4, 8, 8)
    loss, logits = dpo_loss(w, l, w.clone(), l.clone(), noise, beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert logits.abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_dpo_gradient_pushes_toward_the_winner():
    torch.manual_seed(0)
    noise = torch.randn(4, 4, 8, 8)
    ref_w, ref_l = noise + torch.randn_like(noise), noise + torch.randn_like(noise)
    model_w, model_l = ref_w.clone().requires_grad_(), ref_l.clone().requires_grad_()
    loss, _ = dpo_loss(model_w, model_l, ref_w, ref_l, noise, beta=10)
    loss.backward()
    with torch.no_grad():  # one gradient step
        model_w -= 0.01 * model_w.grad
        model_l -= 0.01 * model_l.grad
    error = lambda pred: (pred - noise).pow(2).mean().item()
    assert error(model_w) < error(ref_w)  # the winner is denoised better than by the reference
    assert error(model_l) > error(ref_l)  # the loser worse
    assert dpo_loss(model_w, model_l, ref_w, ref_l, noise, beta=10)[0] < loss


def test_co_merge_keeps_the_expert_that_dominates_each_weight():
    merge = load_stage("03_merge.py")
    eye = torch.eye(2)  # factors (A, B) with A = I: each expert's delta is its B
    deltas = [torch.tensor([[1.0, 0.1], [0.2, 0.0]]), torch.tensor([[0.5, 0.3], [-0.4, 0.1]])]
    factors = [{"layer": (eye, d)} for d in deltas]
    # Expert 1's inputs are ten times stronger on feature 1, so it wins column 1 despite smaller
    # deltas there; column 0 goes to whichever delta is larger since activations tie.
    activations = [{"layer": torch.tensor([1.0, 1.0])}, {"layer": torch.tensor([1.0, 10.0])}]
    merged = merge.co_merge(factors, activations)["layer"]
    assert torch.equal(merged, torch.tensor([[1.0, 0.3], [-0.4, 0.1]]))
    layers, error = merge.factorize({"unet.layer": merged}, rank=2)
    assert error < 1e-5 and torch.allclose(layers["layer.lora_B.weight"] @ layers["layer.lora_A.weight"], merged, atol=1e-5)


def test_release_preset_resolves_to_the_release_recipe():
    """The release's launcher: 16 pairs a step (its 4 x 4, run as 16 x 1), lr 1e-5 scaled by 16, 500 warm-up steps."""
    recipe = train.parse_args(["--preset", "release", "--category", "Hate"]).recipe
    assert (recipe["train_batch_size"], recipe["gradient_accumulation_steps"], recipe["augment"]) == (16, 1, True)
    split = train.parse_args(["--preset", "release", "--category", "Hate", "--train_batch_size", "4",
                              "--gradient_accumulation_steps", "4"]).recipe  # the launcher's split: the same rate
    assert train.learning_rate_at(split, 500) == train.learning_rate_at(recipe, 500)
    assert train.learning_rate_at(recipe, 500) == pytest.approx(1.6e-4)
    assert train.learning_rate_at(recipe, 5000) == pytest.approx(1.6e-4)
    assert train.learning_rate_at(recipe, 250) == pytest.approx(0.8e-4)  # halfway through the warm-up
    assert (recipe["beta"], recipe["sft_weight"], recipe["anchor_weight"], recipe["empty_prompt_share"]) == (5000, 0, 0, 0.2)
    assert (recipe["rank"], recipe["alpha"], recipe["max_train_steps"], recipe["mixed_precision"],
            recipe["max_grad_norm"]) == (4, 4, 2000, "fp16", 1.0)
    assert train.parse_args(["--preset", "release", "--all_data", "--max_train_steps", "10"]).recipe["max_train_steps"] == 10
    assert train.parse_args(["--category", "Hate"]).recipe == train.PRESETS["toy"]


def test_counterpart_sft_targets_the_reference_under_the_safe_prompt():
    """The toy recipe's SFT term: zero when the safe prompt equals the unsafe one (nothing to move),
    positive otherwise, and its gradient moves the LoRA's unsafe-prompt prediction toward the
    reference's safe-prompt prediction."""
    recipe = train.parse_args(["--category", "Hate", "--anchor_weight", "0", "--beta", "1"]).recipe
    assert recipe["sft_weight"] == 10
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 1)  # a stand-in UNet: output = conv(x) + a projection of the prompt

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora, self.on = torch.nn.Parameter(torch.zeros(4, 4)), True
            self.proj = torch.randn(6, 4)

        def disable_adapters(self):
            self.on = False

        def enable_adapters(self):
            self.on = True

        def forward(self, x, t, cond):
            text = cond.mean(1) @ self.proj
            out = conv(x) + (text + (text @ self.lora if self.on else 0))[:, :, None, None]
            return type("Out", (), {"sample": out})()

    class Scheduler:
        def add_noise(self, x, noise, t):
            return x + noise

    unet, n = Unet(), 3
    embeds = torch.randn(n, 5, 6)
    batch = {"pairs": torch.arange(n), "t": torch.zeros(n, dtype=torch.long), "noise": torch.randn(n, 4, 2, 2),
             "empty": torch.zeros(n, dtype=torch.bool)}
    from common import Latents, TrainingData
    make = lambda safe: TrainingData(Latents([torch.randn(n, 4, 2, 2)]), Latents([torch.randn(n, 4, 2, 2)]), None,
                                     embeds, safe, None, torch.zeros(5, 6))
    _, same, _ = train.expert_loss(recipe, unet, Scheduler(), batch, make(embeds.clone()))
    assert same["sft"].item() == pytest.approx(0.0, abs=1e-10)
    data = make(torch.randn(n, 5, 6))
    loss, terms, _ = train.expert_loss(recipe, unet, Scheduler(), batch, data)
    assert terms["sft"].item() > 0 and set(terms) == {"dpo", "sft"}  # the anchor term is off
    loss.backward()
    with torch.no_grad():
        unet.lora -= 0.1 * unet.lora.grad / unet.lora.grad.norm()
    assert train.expert_loss(recipe, unet, Scheduler(), batch, data)[1]["sft"].item() < terms["sft"].item()


def test_release_augmentation_mirrors_each_image_and_samples_its_latent(toy_model, tmp_path):
    """--preset release: each winner and loser drawn mirrored or not (encoded mirrored, not a mirrored
    latent) and sampled from its VAE posterior; the toy preset draws the posterior mean, as before."""
    import numpy as np
    from PIL import Image
    from common import encode_training_data, load_pipeline
    pipe = load_pipeline(toy_model, "cpu")
    rng = np.random.default_rng(0)
    for name in ("w.png", "l.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    pairs = [{"unsafe_prompt": "red circle", "safe_prompt": "green circle", "winner_image": "w.png", "loser_image": "l.png"}]
    plain, augmented = (encode_training_data(pipe, pairs, [], str(tmp_path), augment=a) for a in (False, True))
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "w.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mirrored = pipe.vae.encode(pixels.flip(-1)).latent_dist
    scale, latents = pipe.vae.config.scaling_factor, augmented.winner_latents
    assert torch.allclose(latents.mean[1][0], mirrored.mean[0] * scale, atol=1e-5)
    assert torch.allclose(latents.std[1][0], mirrored.std[0] * scale, atol=1e-5)
    assert torch.equal(plain.winner_latents.mean[0], latents.mean[0]) and plain.winner_latents.std is None
    eps = torch.randn(2, *latents.latent_shape)
    drawn = latents.draw(torch.tensor([0, 0]), torch.tensor([False, True]), eps)
    assert torch.allclose(drawn[1], latents.mean[1][0] + latents.std[1][0] * eps[1])
    assert torch.equal(drawn[0], latents.mean[0][0] + latents.std[0][0] * eps[0])
    release = train.draw_batch(train.PRESETS["release"], 0, 0, 5, 0, (4, 8, 8), 1000, "cpu")
    assert release["winner_eps"].shape == release["loser_eps"].shape == (16, 4, 8, 8)
    assert 0 < int(release["winner_flip"].sum()) < 16 and not torch.equal(release["winner_flip"], release["loser_flip"])
    toy = train.draw_batch(train.PRESETS["toy"], 0, 0, 5, 3, (4, 8, 8), 1000, "cpu")
    assert not {"winner_flip", "winner_eps"} & set(toy)


def test_distillation_teacher_is_the_expert_itself(toy_model):
    """Stage 3's distillation asks the merge (rank 8 here) to predict what each expert (rank 4)
    predicts; the teacher, the expert's factors zero-padded into the merge's adapter, must predict
    exactly what the expert loaded on its own does."""
    from torch.func import functional_call
    from diffusers import UNet2DConditionModel
    from common import add_lora
    merge = load_stage("03_merge.py")
    torch.manual_seed(0)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 64)
    expert_unet = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    base = expert_unet(x, t, cond).sample.detach()
    add_lora(expert_unet, 4, 2)  # alpha / rank = 0.5: load_experts folds it into B
    factors = {}
    for name, module in expert_unet.named_modules():
        if hasattr(module, "lora_A"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
            factors["unet." + name] = (module.lora_A["default"].weight.detach(),
                                       module.lora_B["default"].weight.detach() * 2 / 4)
    expert = expert_unet(x, t, cond).sample.detach()
    assert (expert - base).abs().max() > 1e-3
    merged_unet = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    add_lora(merged_unet, 8, 8)
    taught = functional_call(merged_unet, merge.as_adapter_weights(factors, 8), (x, t, cond)).sample
    assert torch.allclose(taught, expert, atol=1e-5)
