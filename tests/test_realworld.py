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
def test_clip_score(tiny_clip):
    ims, prompts = images(3), ["a red cat", "dog", "a very long prompt " * 20]  # the last one is truncated
    score = realworld.clip_score(ims, prompts, clip_model=tiny_clip, batch_size=2)
    clip = realworld.load_clip(tiny_clip)
    cosine = (realworld.image_embeddings(ims, clip) * realworld.text_embeddings(prompts, clip)).sum(-1)
    assert 0 <= score <= 100 and np.isfinite(score)
    assert score == pytest.approx(float((100 * cosine).clamp(min=0).mean()), abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        realworld.clip_score(ims, prompts[:2], clip_model=tiny_clip)


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert realworld.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # S2 = c^2 S1 with S1 full: tr sqrt(S1 S2) = c tr(S1), so FD = |dmu|^2 + (1 - c)^2 tr(S1)
    m = rng.normal(size=(5, 5))
    s1, c = m @ m.T + np.eye(5), 1.7
    expected = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1)
    assert realworld.frechet_distance(mu1, s1, mu2, c ** 2 * s1) == pytest.approx(expected)
    assert realworld.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    # from samples: close to the analytic value
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, c ** 2 * s1, size=20000)
    sampled = realworld.frechet_distance(*realworld.gaussian(x), *realworld.gaussian(y))
    assert sampled == pytest.approx(expected, rel=0.05)


def test_fid_on_folders(tiny_clip, tmp_path):
    ims = images(6)
    for i, im in enumerate(ims):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert realworld.fid(ims, str(tmp_path), clip_model=tiny_clip) == pytest.approx(0, abs=1e-6)
    other = [np.full((40, 40, 3), 30 * i, np.uint8) for i in range(6)]
    assert realworld.fid(other, str(tmp_path), clip_model=tiny_clip) > 1e-3
    with pytest.raises(ValueError, match="no such folder"):
        realworld.fid(ims, str(tmp_path / "missing"), clip_model=tiny_clip)
    with pytest.raises(ValueError, match="features"):
        realworld.fid(ims, str(tmp_path), features="dino")


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


def test_inception_features_resize_as_pytorch_fid(monkeypatch):
    import types
    seen = []

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()

        def forward(self, x):
            seen.append(x)
            return [x.mean(dim=(2, 3), keepdim=True)]
    module = types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = InceptionV3
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    ims = images(2, size=40) + images(1, seed=1, size=64)  # two sizes in one batch
    realworld.inception_features(ims, batch_size=8)
    expected = torch.cat([torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255,
                                                          size=(299, 299), mode="bilinear", align_corners=False)
                          for im in ims])
    assert seen[0].shape == (3, 3, 299, 299) and torch.allclose(seen[0], expected)
