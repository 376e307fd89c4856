"""The neighbour index (captioner.model.neighbours), consensus scoring and reranking, the confidence, and
how they reach train, export, caption, the API and the gallery."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import checkpoint
from captioner.cli import build_parser
from captioner.errors import CaptionerError
from captioner.eval.cider import CiderD
from captioner.eval.ranking import auroc, spearman
from captioner.model.confidence import Calibration, Confidence, photo_feature_names, photo_features_of
from captioner.model.consensus import Consensus
from captioner.model.neighbours import NeighbourIndex, find_index, index_path
from captioner.model.rerank import Judged, Rerank, judge
from captioner.model.search import Hypothesis
from tiny_data import make_flickr_layout

REPO = Path(__file__).resolve().parents[1]
WORDS = "a dog man woman runs on the grass in red ball beach water".split()
SPEC = {"name": "efficientnet_lite0", "weights": "imagenet"}


def random_index(n=40, dim=16, dims=8, seed=0):
    rng = random.Random(seed)
    caps = [[[rng.choice(WORDS) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 5))]
            for _ in range(n)]
    vectors = np.random.default_rng(seed).standard_normal((n, dim))
    return NeighbourIndex.build(vectors, caps, SPEC, [f"{i}.jpg" for i in range(n)], dims=dims), caps, vectors


def test_consensus_is_cider_d_over_the_training_captions_averaged_over_the_neighbours():
    index, caps, _ = random_index()
    rng = random.Random(1)
    candidates = [[rng.choice(WORDS + ["zebra"]) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    reference = CiderD({i: c for i, c in enumerate(caps)})
    for near in ([3, 7, 11], [0], list(range(40))):
        expected = [np.mean([reference.score(i, c) for i in near]) for c in candidates]
        np.testing.assert_allclose(Consensus(index).scores(candidates, near), expected, rtol=1e-9, atol=1e-12)


def test_search_finds_each_training_image_itself_first_through_the_projection(tmp_path):
    index, _, vectors = random_index(n=40, dim=16, dims=12)
    sims, ids = index.search(torch.tensor(vectors, dtype=torch.float32), k=3)
    assert ids[:, 0].tolist() == list(range(40))
    assert sims.shape == (40, 3) and bool((sims[:, 0] > 0.95).all()) and bool((sims[:, :-1] >= sims[:, 1:]).all())
    loaded = NeighbourIndex.load(index.save(tmp_path / "n.knn"))
    assert loaded.captions(5) == index.captions(5) and loaded.names == index.names
    assert torch.equal(loaded.search(torch.tensor(vectors[:4], dtype=torch.float32), 3)[1], ids[:4])


def test_an_index_of_another_encoder_or_a_damaged_file_is_refused_in_one_line(tmp_path):
    index, _, _ = random_index()
    index.check_encoder(SPEC, 16, "model.pt", "n.knn")  # the same features: accepted
    with pytest.raises(CaptionerError, match="another encoder") as err:
        index.check_encoder({**SPEC, "name": "resnet50"}, 16, "model.pt", "n.knn")
    assert "\n" not in str(err.value) and "resnet50" in str(err.value)
    with pytest.raises(CaptionerError, match="feature_dim: 16 vs 32"):
        index.check_encoder(SPEC, 32, "model.pt", "n.knn")
    bad = tmp_path / "bad.knn"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CaptionerError, match="bad.knn: (refused to load|not a readable)"):
        NeighbourIndex.load(bad)
    torch.save({"vectors": torch.zeros(2, 2)}, bad)
    with pytest.raises(CaptionerError, match="not a neighbour index"):
        NeighbourIndex.load(bad)


def test_the_index_goes_with_a_checkpoint_by_name_or_by_folder(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "other.pt").write_bytes(b"")
    assert index_path(tmp_path / "model.pt") is None
    (tmp_path / "neighbours.knn").write_bytes(b"")
    assert index_path(tmp_path / "model.pt") == tmp_path / "neighbours.knn"
    (tmp_path / "model.knn").write_bytes(b"")
    assert index_path(tmp_path / "model.pt") == tmp_path / "model.knn"
    assert find_index([tmp_path / "nowhere" / "x.pt", tmp_path / "other.pt"]) == tmp_path / "neighbours.knn"


def hyp(words, log_prob, vocab):
    return Hypothesis([vocab[w] for w in words], score=log_prob, log_prob=log_prob)


def test_reranking_puts_the_candidate_the_neighbours_agree_with_first():
    caps = [[["a", "dog", "runs", "on", "the", "grass"]] * 5, [["a", "man", "on", "the", "beach"]] * 5]
    index = NeighbourIndex.build(np.array([[1.0, 0.0], [0.0, 1.0]]), caps, SPEC, ["dog.jpg", "man.jpg"], dims=0)
    vocab = {w: i for i, w in enumerate(WORDS)}
    words = {i: w for w, i in vocab.items()}
    beam = [hyp(["a", "man", "runs", "in", "water"], -3.0, vocab), hyp(["a", "dog", "runs", "on", "the", "grass"], -3.5, vocab)]
    photo = torch.tensor([[0.9, 0.1]])  # nearest: the dog image
    words_of = lambda h: [words[t] for t in h.tokens]  # noqa: E731
    ranked = judge(index, Consensus(index), None, photo, [beam], words_of, Rerank(n_best=2, weight=2.0, k=1))[0]
    assert words_of(ranked[0]) == ["a", "dog", "runs", "on", "the", "grass"]
    assert ranked[0].consensus > ranked[1].consensus and ranked[0].neighbours[0][0] == 0
    assert ranked[0].score == pytest.approx(-3.5 / 7 + 2.0 * ranked[0].consensus)
    assert ranked[0].score > ranked[1].score
    assert ranked[0].log_prob == -3.5  # the decoder's, unchanged
    kept = judge(index, Consensus(index), None, photo, [beam], words_of, Rerank(n_best=0, k=1))[0]
    assert [h.tokens for h in kept] == [h.tokens for h in beam]  # off: the beam's order, still judged
    assert kept[1].consensus == ranked[0].consensus
    lp_only = judge(index, Consensus(index), None, photo, [beam], words_of, Rerank(n_best=2, weight=0.0))[0]
    assert lp_only[0].tokens == beam[0].tokens  # -3.0 / 6 beats -3.5 / 7


def test_rerank_options_are_checked_and_the_cli_defaults_are_rerank_defaults():
    for bad in (Rerank(n_best=-1), Rerank(k=0), Rerank(weight=-1.0), Rerank(weight=float("nan")), Rerank(beam=0)):
        with pytest.raises(CaptionerError):
            bad.check()
    for command in (["caption", "x.jpg"], ["evaluate", "--data", "d"], ["serve"]):
        args = build_parser().parse_args(command)
        assert Rerank(args.rerank, args.rerank_weight, args.rerank_k, args.rerank_beam) == Rerank()


def test_calibration_fits_ranks_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 4))
    good = (x[:, 2] + 0.3 * rng.standard_normal(400)) > 0
    cal = Calibration.fit(x, good, fitted_on="test")
    conf = cal(x)
    assert conf.min() >= 0 and conf.max() <= 1 and auroc(conf, good) > 0.9
    assert abs(cal.weights[2]) > 3 * max(abs(w) for j, w in enumerate(cal.weights) if j != 2)
    again = Calibration.from_dict(cal.to_dict())
    np.testing.assert_allclose(again(x), conf)
    assert Calibration.from_dict({**cal.to_dict(), "features": ["other"]}) is None


def photo_model(familiar_word="dog", power=2.0):
    """A quality model on the four features and a photo model that finds photos tagged `familiar_word`
    familiar and all others not."""
    quality = Calibration((0.5, 0.5, 5.0, -1.0), (0.1, 0.1, 2.0, 0.5), (1.0, 0.0, 1.0, 0.5), 0.0)
    names = photo_feature_names()
    weights = tuple(4.0 if name == f"tag:{familiar_word}" else 0.0 for name in names)
    photo = Calibration((0.0,) * len(names), (1.0,) * len(names), weights, 10.0, "test", names)
    return Confidence(quality, photo, power)


def tagged(word):
    from captioner.vision.tags import tag_words

    probs = np.full(len(tag_words()), 1e-6)
    probs[tag_words().index(word)] = 1.0
    return probs


def test_the_confidence_multiplies_quality_by_the_photo_models_familiarity_and_round_trips():
    conf = photo_model(power=2.0)
    x = np.array([[0.6, 0.5, 7.0, -0.8]] * 2)
    photo = photo_features_of(np.array([0.6, 0.6]), np.array([0.5, 0.5]), np.stack([tagged("dog"), tagged("pizza")]))
    got = conf(x, photo)
    np.testing.assert_allclose(got, conf.quality(x) * conf.photo(photo) ** 2.0)
    assert 0 <= got.min() and got.max() <= 1 and got[0] > 0.5 > 0.01 > got[1]  # a pizza is unlike the dogs
    again = Confidence.from_dict(conf.to_dict())
    assert again.photo is not None and again.power == 2.0
    np.testing.assert_allclose(again(x, photo), got)
    # An index calibrated before the photo model (four features, no "photo") still loads: quality alone.
    old = Confidence.from_dict(conf.quality.to_dict())
    assert old is not None and old.photo is None
    np.testing.assert_allclose(old(x), conf.quality(x))
    # A photo model for other tag words than this version's is left out; other quality features refuse.
    other = {**conf.to_dict(), "photo": {**conf.to_dict()["photo"], "features": ["nearest_similarity", "tag:x"]}}
    assert Confidence.from_dict(other).photo is None
    assert Confidence.from_dict({**conf.to_dict(), "features": ["other"]}) is None
    with pytest.raises(ValueError):
        conf(x)  # a photo model needs the photo's features


def test_judge_gives_an_unfamiliar_photo_a_lower_confidence_from_its_tags():
    caps = [[["a", "dog", "runs", "on", "the", "grass"]] * 5, [["a", "man", "on", "the", "beach"]] * 5]
    index = NeighbourIndex.build(np.array([[1.0, 0.0], [0.0, 1.0]]), caps, SPEC, ["dog.jpg", "man.jpg"], dims=0)
    vocab = {w: i for i, w in enumerate(WORDS)}
    words = {i: w for w, i in vocab.items()}
    beam = [hyp(["a", "dog", "runs", "on", "the", "grass"], -3.5, vocab)]
    photos = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # the same vector: only the tags differ
    words_of = lambda h: [words[t] for t in h.tokens]  # noqa: E731
    tags = torch.tensor(np.stack([tagged("dog"), tagged("pizza")]))
    conf = photo_model()
    dog, pizza = (h[0].confidence for h in judge(index, Consensus(index), conf, photos, [beam, beam], words_of,
                                                 Rerank(n_best=1, k=2), tags))
    assert 0 <= pizza < dog <= 1 and pizza < 0.01
    plain = judge(index, Consensus(index), Confidence(conf.quality), photos, [beam, beam],
                  words_of, Rerank(n_best=1, k=2))
    assert plain[0][0].confidence == plain[1][0].confidence > dog  # quality alone: the tags not consulted
    untagged = judge(index, Consensus(index), conf, photos, [beam], words_of, Rerank(n_best=1, k=2))
    assert untagged[0][0].confidence is None  # a photo model with nothing to judge the photo by: no confidence


def test_auroc_and_spearman_on_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count half
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run: its directory holds the neighbour index of its training images."""
    root = tmp_path_factory.mktemp("knn")
    data = make_flickr_layout(root / "flickr")
    run = root / "run"
    proc = subprocess.run([sys.executable, "-m", "captioner", "train", "--config", "tiny", "--data", str(data),
                           "--run-dir", str(run), "--set", f"data.cache_dir={root / 'cache'}",
                           "--set", "train.epochs=2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return data, run


def test_train_writes_the_index_of_its_training_images_and_export_carries_it(trained, tmp_path):
    data, run = trained
    index = NeighbourIndex.load(run / "neighbours.knn")
    assert len(index) == 8 and sorted(index.names)[0] == "blue_1.jpg"  # the *_0 images are dev
    assert index.captions(0)[0].startswith("a plain") and "." not in index.captions(0)[0]
    loaded = checkpoint.load_model(run / "best.pt")
    index.check_encoder(loaded.encoder, loaded.model.feature_dim, "best.pt", "neighbours.knn")
    out = checkpoint.export(run / "best.pt", tmp_path / "model.pt")
    assert (tmp_path / "model.knn").read_bytes() == (run / "neighbours.knn").read_bytes()
    assert out == tmp_path / "model.pt"


def test_caption_shows_consensus_and_the_nearest_training_captions(trained, tmp_path):
    data, run = trained
    photo = data / "Images" / "red_0.jpg"
    cmd = [sys.executable, "-m", "captioner", "caption", str(photo), "--checkpoint", str(run / "best.pt"),
           "--precision", "fp32"]
    proc = subprocess.run(cmd + ["--json", "--neighbours", "2", "--n-best", "2"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    item = json.loads(proc.stdout)[0]
    assert len(item["neighbours"]) == 2 and all(n["image"].startswith("red_") for n in item["neighbours"])
    assert "red" in item["neighbours"][0]["captions"][0] and "consensus" in item["n_best"][0]
    assert item["n_best"][0]["consensus"] >= item["n_best"][1]["consensus"] - 1.0  # reranked towards them
    proc = subprocess.run(cmd + ["--neighbours", "1"], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].split("\t")[1] == "neighbour" and "red" in lines[1]
    # No calibration in a run's index: a confidence threshold is refused in one line.
    proc = subprocess.run(cmd + ["--min-confidence", "0.5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no confidence calibration" in proc.stderr and "Traceback" not in proc.stderr


def test_an_index_made_with_another_encoder_is_refused_by_the_captioner(trained, tmp_path):
    from captioner.inference import Captioner

    data, run = trained
    index = NeighbourIndex.load(run / "neighbours.knn")
    index.encoder = {**index.encoder, "pooling": "max"}
    (tmp_path / "model.pt").write_bytes((run / "best.pt").read_bytes())
    index.save(tmp_path / "model.knn")
    with pytest.raises(CaptionerError, match="another encoder.*pooling: max vs mean"):
        Captioner.from_checkpoint(tmp_path / "model.pt")


def test_api_n_best_dicts_carry_confidence_when_the_index_is_calibrated(trained, tmp_path):
    from captioner.inference import Captioner

    data, run = trained
    index = NeighbourIndex.load(run / "neighbours.knn")
    index.calibration = photo_model().to_dict()  # with a photo model: the captioner tags the photo for it
    (tmp_path / "model.pt").write_bytes((run / "best.pt").read_bytes())
    index.save(tmp_path / "model.knn")
    cap = Captioner.from_pretrained(tmp_path / "model.pt", device="cpu", precision="fp32")
    best = cap(data / "Images" / "blue_0.jpg", n_best=2)
    assert all(0 <= h["confidence"] <= 1 and "consensus" in h for h in best)
    plain = Captioner.from_pretrained(run / "best.pt", device="cpu", precision="fp32")
    assert "confidence" not in plain(data / "Images" / "blue_0.jpg", n_best=1)[0]
    assert isinstance(Judged(index).calibration, Confidence) and Judged(index).needs_tags


def test_the_shipped_index_fits_the_shipped_models_and_the_package_stays_under_50_mb():
    shipped = checkpoint.default_checkpoints()
    where = find_index(shipped)
    assert where is not None and where.name == "neighbours.knn"
    index = NeighbourIndex.load(where)
    loaded = checkpoint.load_model(shipped[0])
    index.check_encoder(loaded.encoder, loaded.model.feature_dim, shipped[0], where)
    assert len(index) == 6000 and index.calibration is not None  # Flickr8k train, with its confidence
    confidence = Confidence.from_dict(index.calibration)
    assert confidence is not None and confidence.photo is not None  # quality, and the photo model on tags
    assert sum(p.stat().st_size for p in where.parent.iterdir() if p.is_file()) < 50e6


def test_the_gallery_shows_confidence_and_the_nearest_training_captions(tmp_path):
    from PIL import Image

    from captioner.eval.gallery import GalleryItem, write_gallery

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(photo)
    page = write_gallery(tmp_path / "g.html", [GalleryItem(photo, "a red square", confidence=0.42,
                                                           neighbours=[("red_1.jpg", ["a plain red square"])])])
    text = page.read_text()
    assert "confidence <b>0.42</b>" in text and 'data-confidence="0.4200"' in text
    assert "1 nearest training images" in text and "a plain red square" in text and "red_1.jpg" in text
    assert 'value="confidence:asc"' in text


def test_the_index_stores_its_word_list_and_names_as_text_and_still_reads_format_1(tmp_path):
    index, _, _ = random_index()
    raw = torch.load(index.save(tmp_path / "n.knn"), weights_only=True)
    assert raw["format"] == 2 and isinstance(raw["words"], str) and isinstance(raw["names"], str)
    old = {**raw, "format": 1, "words": list(index.words), "names": list(index.names)}
    torch.save(old, tmp_path / "old.knn")
    loaded = NeighbourIndex.load(tmp_path / "old.knn")
    assert loaded.words == index.words and loaded.names == index.names and loaded.captions(3) == index.captions(3)
    torch.save({**raw, "names": "{not json"}, tmp_path / "bad.knn")
    with pytest.raises(CaptionerError, match="names are not a list of strings"):
        NeighbourIndex.load(tmp_path / "bad.knn")
