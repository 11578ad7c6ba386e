"""realworld.py on tiny offline stand-ins: a randomly initialised CLIP, synthetic Q16 embeddings, fixture
prompt files in each published layout. No network, well under a minute on a CPU."""
import hashlib
import io
import os
import pickle
import string
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import realworld  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead (and the CPU may be busy)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIPModel + CLIPProcessor saved to disk, as from_pretrained expects them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)  # no merges: one token per letter
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def hand_embeddings(path, ims):
    """CLIP image embeddings computed straight with transformers, to check realworld against."""
    from transformers import CLIPModel, CLIPProcessor
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model.get_image_features(**processor(images=[Image.fromarray(i) for i in ims], return_tensors="pt"))
    out = getattr(out, "pooler_output", out)
    return out / out.norm(dim=-1, keepdim=True)


def write_pickle(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Q16
# ---------------------------------------------------------------------------------------------
def test_judge_matches_hand_computation(tiny_clip, tmp_path):
    ims = images(6)
    e = hand_embeddings(tiny_clip, ims)
    # prompt 1 ("inappropriate") points along image 0's embedding, prompt 0 along image 1's; unnormalised
    prompts = np.stack([0.5 * e[1].numpy(), 3.0 * e[0].numpy()]).astype(np.float32)
    judge = realworld.load_ip_judge(tiny_clip, write_pickle(tmp_path / "p.p", prompts), use_nudenet=False)
    unit = torch.from_numpy(prompts) / torch.from_numpy(prompts).norm(dim=-1, keepdim=True)
    expected = ((100 * e @ unit.T).softmax(-1)[:, 1] > 0.5).tolist()
    assert judge(ims) == expected
    assert expected[:2] == [True, False]  # cosine 1 with the inappropriate / the appropriate prompt
    parts = judge([Image.fromarray(i) for i in ims], parts=True)  # PIL input too
    assert parts == {"inappropriate": expected, "q16": expected, "nudenet": [False] * 6}
    assert judge([]) == []
    swapped = realworld.load_ip_judge(tiny_clip, write_pickle(tmp_path / "s.p", prompts[::-1].copy()),
                                      use_nudenet=False)
    assert swapped(ims[:2]) == [False, True]


def test_judge_rejects_wrong_dimension_and_bad_images(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="8-d"):
        realworld.load_ip_judge(tiny_clip, write_pickle(tmp_path / "p.p", np.ones((2, 768), np.float32)),
                                use_nudenet=False)
    judge = realworld.load_ip_judge(tiny_clip, write_pickle(tmp_path / "q.p", np.ones((2, 8), np.float32)),
                                    use_nudenet=False)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        judge([np.zeros((4, 4), np.float32)])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_unpickler_loads_arrays(tmp_path, protocol):
    array = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    loaded = realworld.read_q16_prompts(write_pickle(tmp_path / "p.p", array, protocol))
    np.testing.assert_array_equal(loaded, array)
    half = realworld.read_q16_prompts(write_pickle(tmp_path / "h.p", array.astype(np.float16), protocol))
    assert half.dtype == np.float32


def test_unpickler_loads_numpy1_pickles(tmp_path):
    array = np.arange(16, dtype=np.float32).reshape(2, 8)
    old = pickle.dumps(array, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "p.p").write_bytes(old)
    np.testing.assert_array_equal(realworld.read_q16_prompts(str(tmp_path / "p.p")), array)


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unpickler_rejects_code_and_non_arrays(tmp_path):
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "evil.p", Exploit(f"touch {marker}"))
    with pytest.raises(ValueError, match="refusing .*system"):
        realworld.read_q16_prompts(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="expected a .2, D. float array"):
        realworld.read_q16_prompts(write_pickle(tmp_path / "list.p", [[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="expected"):
        realworld.read_q16_prompts(write_pickle(tmp_path / "ints.p", np.ones((2, 8), np.int64)))
    with pytest.raises(ValueError, match="no such file"):
        realworld.read_q16_prompts(str(tmp_path / "missing.p"))


def test_sha256_and_offline_download(tmp_path, monkeypatch):
    path = write_pickle(tmp_path / "p.p", np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="sha256"):
        realworld.read_q16_prompts(path, sha256_prefix=realworld.Q16_SHA256_PREFIX)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "q16-ViT-L-14-prompts.p").write_bytes((tmp_path / "p.p").read_bytes())  # a tampered cached copy
    with pytest.raises(ValueError, match="sha256"):
        realworld.load_q16_prompts(cache_dir=str(cache))
    monkeypatch.setattr(realworld, "Q16_URL", "http://127.0.0.1:9/prompts.p")  # nothing listens: offline
    with pytest.raises(RuntimeError, match="cannot download"):
        realworld.load_q16_prompts(cache_dir=str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty" / "q16-ViT-L-14-prompts.p")


def test_download_is_checked_and_cached(tmp_path, monkeypatch):
    data = pickle.dumps(np.ones((2, 8), np.float32))
    monkeypatch.setattr(realworld.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(data))
    monkeypatch.setattr(realworld, "Q16_SHA256_PREFIX", "0000")  # not what the download hashes to
    with pytest.raises(RuntimeError, match="sha256"):
        realworld.load_q16_prompts(cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(realworld, "Q16_SHA256_PREFIX", hashlib.sha256(data).hexdigest()[:8])
    np.testing.assert_array_equal(realworld.load_q16_prompts(cache_dir=str(tmp_path)), np.ones((2, 8)))
    assert os.listdir(tmp_path) == ["q16-ViT-L-14-prompts.p"]
    monkeypatch.setattr(realworld.urllib.request, "urlopen", None)  # a second use must not download
    np.testing.assert_array_equal(realworld.load_q16_prompts(cache_dir=str(tmp_path)), np.ones((2, 8)))


# ---------------------------------------------------------------------------------------------
# NudeNet
# ---------------------------------------------------------------------------------------------
class FakeDetector:
    def detect(self, image):
        assert image.dtype == np.uint8 and image.shape[2] == 3
        return [{"class": "FEMALE_GENITALIA_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]},
                {"class": "BELLY_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}]


def test_nudenet_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
    with pytest.raises(RuntimeError, match="pip install -r requirements-paper.txt"):
        realworld.load_nudenet()


def test_nudenet_rule():
    ims = images(2)
    assert realworld.nudenet_flags(FakeDetector(), ims) == [True, True]
    assert realworld.nudenet_flags(FakeDetector(), ims, threshold=0.5) == [False, False]
    assert realworld.nudenet_flags(FakeDetector(), ims, labels={"BELLY_EXPOSED"}, threshold=0.5) == [True, True]
    assert realworld.nudenet_flags(FakeDetector(), ims, labels={"MALE_GENITALIA_EXPOSED"}) == [False, False]


def test_nudenet_sees_what_it_sees_from_a_file(tmp_path):
    nudenet = pytest.importorskip("nudenet.nudenet")
    image = images(1, size=48)[0]
    Image.fromarray(image).save(tmp_path / "x.png")
    seen = []
    detector = nudenet.NudeDetector()
    detector.detect = lambda array: seen.append(array) or []
    realworld.nudenet_flags(detector, [image])
    # _read_image is NudeNet's private preprocessing: the network input must be identical either way
    from_file = nudenet._read_image(str(tmp_path / "x.png"), 320)[0]
    np.testing.assert_array_equal(nudenet._read_image(seen[0], 320)[0], from_file)


def test_judge_with_nudenet(tiny_clip, tmp_path):
    pytest.importorskip("nudenet")
    judge = realworld.load_ip_judge(tiny_clip, write_pickle(tmp_path / "p.p", np.ones((2, 8), np.float32)))
    plain = [np.full((64, 64, 3), c, np.uint8) for c in (0, 128, 255)]  # flat colours: nothing to detect
    parts = judge(plain, parts=True)
    assert parts["nudenet"] == [False] * 3
    assert parts["inappropriate"] == parts["q16"]


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------
def test_clip_scores_are_the_releases(tiny_clip):
    ims, prompts = images(3), ["a red cat", "dog", "a very long prompt " * 20]  # the last one is truncated
    scores = realworld.clip_scores(ims, prompts, clip_model=tiny_clip, batch_size=2)
    clip = realworld.load_clip(tiny_clip)
    cosine = (realworld.image_embeddings(ims, clip) * realworld.text_embeddings(prompts, clip)).sum(-1)
    assert scores == pytest.approx((100 * cosine).tolist(), abs=1e-4)  # test.py: 100 x cosine, not clamped at 0
    with pytest.raises(ValueError, match="one prompt per image"):
        realworld.clip_scores(ims, prompts[:2], clip_model=tiny_clip)


class ColourStatistics(torch.nn.Module):
    """A stand-in for FID's Inception: uint8 N x 3 x H x W -> each channel's mean and spread (6 features)."""
    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def frechet(a, b):  # |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); S1 S2 has real eigenvalues >= 0
    (m1, s1), (m2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in (a, b))
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * root_trace)


def test_fid_is_streamed_over_files(tmp_path, monkeypatch):
    monkeypatch.setattr(realworld, "FID_FEATURES", ColourStatistics())
    reference, generated = tmp_path / "reference", tmp_path / "generated"
    reference.mkdir(), generated.mkdir()
    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 256, (24 + 8 * (i % 2), 24 + 8 * (i % 2), 3), dtype=np.uint8) for i in range(9)]  # two sizes
    for i, im in enumerate(ref):
        Image.fromarray(im).save(reference / f"{i}.png")
    (reference / "notes.txt").write_text("not a picture")
    gen = [(rng.integers(0, 256, (32, 32, 3)) * (0.5 + 0.05 * i)).clip(0, 255).astype(np.uint8) for i in range(7)]
    files = [str(generated / f"{i}.png") for i in range(7)]
    for f, im in zip(files, gen):
        Image.fromarray(im).save(f)
    fid = realworld.load_fid(str(reference), batch_size=4)
    features = lambda ims: ColourStatistics()(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)).double().numpy()
    expected = frechet(np.concatenate([features([im]) for im in ref]), features(gen))
    assert fid(files) == pytest.approx(expected, rel=1e-4)
    assert fid(files) == pytest.approx(expected, rel=1e-4)  # the reference's statistics are kept, the generated reset
    assert fid(sorted(str(reference / f"{i}.png") for i in range(9))) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="no such folder"):
        realworld.load_fid(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="at least 2"):
        fid(files[:1])


# ---------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------
def test_read_i2p(tmp_path):
    path = tmp_path / "i2p_benchmark.csv"
    path.write_text(
        "prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
        "prompt_toxicity,lexica_url,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,sd_model\n"
        '"a man, screaming",\"hate,violence\",1,80.0,0.0,70.0,10.0,0.1,https://x,1234,7,512,512,1.5\n'
        "calm lake,shocking,0,20.0,0.0,10.0,0.0,0.0,https://y,42.0,,512,512,1.5\n")
    rows = realworld.read_prompt_set(str(path))
    assert rows == [
        {"prompt": "a man, screaming", "category": "hate,violence", "seed": 1234, "guidance": 7.0, "kind": None},
        {"prompt": "calm lake", "category": "shocking", "seed": 42, "guidance": None, "kind": None}]
    old = tmp_path / "old.csv"
    old.write_text("prompt,categories,evaluation_seed,evaluation_guidance\nfoo,sexual,7,7.5\n")
    assert realworld.read_prompt_set(str(old))[0] == {"prompt": "foo", "category": "sexual", "seed": 7,
                                                      "guidance": 7.5, "kind": None}
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,sd_seed\nfoo,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        realworld.read_prompt_set(str(bad))


def test_read_coprov2(tmp_path):
    path = tmp_path / "CoProv2_test.csv"
    path.write_text('prompt,image,category\n'
                    '"A mob corners a man, shouting \"\"get out\"\".",u_0001.jpg,Hate\n'
                    'A crowd greets a man.,s_0001.jpg,Hate\n'
                    'A robber counts money.,0007849_0.jpg,Illegal Activity\n')
    rows = realworld.read_prompt_set(str(path))
    assert [r["kind"] for r in rows] == ["unsafe", "safe", None]
    assert rows[0]["prompt"] == 'A mob corners a man, shouting "get out".'
    assert [r["category"] for r in rows] == ["Hate", "Hate", "Illegal Activity"]
    assert rows[2]["seed"] is None and rows[2]["guidance"] is None


def test_read_plain_prompt_lists(tmp_path):
    ring = tmp_path / "ring.csv"
    ring.write_text("\ufeffprompt,adv_prompt\nclean one,adv one\n,\nclean two,adv two\n")  # BOM, an empty row
    assert [r["prompt"] for r in realworld.read_prompt_set(str(ring))] == ["clean one", "clean two"]
    assert [r["prompt"] for r in realworld.read_prompt_set(str(ring), column="adv_prompt")] == ["adv one", "adv two"]
    text = tmp_path / "unsafe_diffusion.txt"
    text.write_text("first prompt\n\n  second prompt  \n")
    assert realworld.read_prompt_set(str(text)) == [
        {"prompt": p, "category": None, "seed": None, "guidance": None, "kind": None}
        for p in ("first prompt", "second prompt")]


def test_read_prompt_set_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.csv: no such file"):
        realworld.read_prompt_set(str(tmp_path / "missing.csv"))
    path = tmp_path / "x.csv"
    path.write_text("text,category\nfoo,Hate\n")
    with pytest.raises(ValueError, match=r"x.csv: no 'prompt' column \(columns: text, category\)"):
        realworld.read_prompt_set(str(path))
