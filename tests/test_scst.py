"""Self-critical sequence training: the CIDEr-D reward, the sampled-caption tensors, and SCST inside fit.

Tiny data: flat colours whose captions name the colour (tests/tiny_data.py).
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from tiny_data import make_flickr_layout

from captioner import checkpoint
from captioner.train import scst
from captioner.data.dataset import Batch
from captioner.train import loop as training
from captioner.train import step as train_step
from captioner.eval.cider import CiderD
from captioner.config import ModelConfig, TrainConfig, load_config
from captioner.data.vocab import SPECIALS, Vocabulary
from captioner.model.decoder import CaptionDecoder
from captioner.precision import FP32

REPO = Path(__file__).resolve().parents[1]
WORDS = ["a", "the", "man", "dog", "woman", "runs", "on", "grass", "in", "red", "blue", "shirt", "water", "jumps", "over", "ball", "two", "people", "street"]


def _sentence(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]


def test_cider_d_equals_pycocoevalcap_when_the_corpus_is_the_scored_set():
    rng = random.Random(0)
    refs = {i: [_sentence(rng) for _ in range(rng.randint(1, 5))] for i in range(40)}
    cands = {i: _sentence(rng) for i in refs}
    cands[3] = refs[3][0]  # one exact match, one empty-overlap candidate among them
    cands[4] = ["zebra", "zebra"]
    theirs_mean, theirs = Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in refs.items()},
                                                {i: [" ".join(c)] for i, c in cands.items()})
    mine = CiderD(refs).scores(list(cands), list(cands.values()))
    assert mine == pytest.approx(list(theirs), rel=1e-9, abs=1e-12)
    assert sum(mine) / len(mine) == pytest.approx(theirs_mean, rel=1e-9)
    assert mine[4] == 0.0 and mine[3] > max(mine[5:])


def test_cider_d_document_frequencies_come_from_the_whole_corpus():
    # "grass" in every image's references is worth nothing; "ball" in one image's is worth a lot.
    refs = {i: [["a", "dog", "on", "grass"]] for i in range(9)}
    refs[9] = [["a", "dog", "with", "ball", "on", "grass"]]
    cider = CiderD(refs)
    assert cider.score(0, ["grass"]) == 0.0
    assert cider.score(9, ["ball"]) > 0.0


def test_sequence_tensors_mark_end_only_for_captions_that_stopped():
    inputs, targets = scst.sequence_tensors([[5, 6], [7, 8, 9]], max_len=3, start_id=1, end_id=2, pad_id=0)
    assert inputs.tolist() == [[1, 5, 6, 0], [1, 7, 8, 0]]  # nothing follows the cut caption's last word
    assert targets.tolist() == [[5, 6, 2, 0], [7, 8, 9, 0]]  # the second was cut at max_len: no <end>


@pytest.mark.parametrize("cell,layers,end_weight", [("gru", 1, 1.0), ("lstm", 2, 0.5), ("rnn", 1, 2.0)])
def test_the_drawing_pass_gives_the_teacher_forced_policy_gradient(cell, layers, end_weight):
    """SCST takes its gradient from the pass that drew the samples (scst.Recorded): the captions are those
    search.sample draws with the same generator, and the loss and every gradient equal those of the
    teacher-forced pass over them (policy_loss on sequence_tensors, the never-emitted words masked)."""
    from captioner.model.output import Targets
    from captioner.model.search import captioning_policy, sample

    vocab = Vocabulary(SPECIALS + tuple(WORDS))
    torch.manual_seed(1)
    cfg = ModelConfig(cell=cell, conditioning="both", embed_dim=12, hidden_dim=16, num_layers=layers, dropout=0.2)
    model = CaptionDecoder(cfg, len(vocab), 10, vocab.pad_id).eval()
    with torch.no_grad():
        model.out.bias[vocab.end_id] = 1.5  # captions of varied lengths, some cut at max_len
    feats, max_len = torch.randn(24, 10), 7
    suppressed = captioning_policy(model, vocab).word_ids
    recorded = scst.draw_recorded(model, feats, suppressed, max_len, torch.Generator().manual_seed(5),
                                  vocab.start_id, vocab.end_id)
    drawn = sample(captioning_policy(model, vocab), feats, max_len=max_len, generator=torch.Generator().manual_seed(5),
                   start_id=vocab.start_id, end_id=vocab.end_id)
    assert recorded.captions == drawn
    lengths = {len(c) for c in drawn}
    assert len(lengths) > 2 and max_len in lengths  # ragged, and some never said <end>
    advantage = torch.randn(len(drawn))
    loss = recorded.backward(advantage, vocab.end_id, end_weight)
    single = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    inputs, targets = scst.sequence_tensors(drawn, max_len, vocab.start_id, vocab.end_id, vocab.pad_id)
    mask = targets != vocab.pad_id
    assert recorded.tokens == int(mask.sum())
    ids = targets[mask]
    weights = scst.policy_weights(advantage[:, None].expand_as(mask)[mask], ids == vocab.end_id, end_weight)
    log_probs = torch.log_softmax(model(feats, inputs, mask).index_fill(1, suppressed, float("-inf")), -1)
    reference = scst.policy_loss(log_probs.gather(1, ids[:, None]).squeeze(1), advantage[:, None].expand_as(mask)[mask],
                                 ids == vocab.end_id, end_weight)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), atol=1e-6, rtol=1e-5)
    chunked = model(feats, inputs, mask, Targets(ids, weights, suppressed=suppressed), lengths=mask.sum(1))
    torch.testing.assert_close(chunked.detach(), reference.detach(), atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        assert single[name].abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(single[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_flickr_layout(tmp_path_factory.mktemp("tiny") / "flickr")


def _cfg(data: Path, cache: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.toml",
                       [f"data.root={data}", f"data.cache_dir={cache}", "train.patience=0", *extra])


def test_scst_learns_to_say_what_the_reward_asks_for():
    # Four images (random vectors), each with its own reference words; an untrained decoder says random
    # words. Self-critical steps alone must raise both the sampled and the greedy captions' CIDEr-D.
    words = ["red", "ball", "blue", "car", "green", "tree", "white", "dog"]
    vocab = Vocabulary(SPECIALS + tuple(words))
    refs = [["a red ball", "red ball"], ["a blue car", "blue car"], ["a green tree", "green tree"],
            ["a white dog", "white dog"]]
    data = scst.RewardData(list(range(4)), np.arange(4), refs)
    features = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    torch.manual_seed(0)
    model = CaptionDecoder(ModelConfig(embed_dim=16, hidden_dim=32, dropout=0.0), len(vocab), 16, vocab.pad_id)
    cfg = TrainConfig(scst_lr=2e-2, scst_samples=8, scst_batch_size=4, eval_max_len=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.scst_lr)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(60):
        step = history[-1].step if history else 0
        history.append(scst.scst_epoch(model, features, data, vocab, optimizer, cfg, step, torch.device("cpu"), gen,
                                       precision=FP32))
    first, last = history[:5], history[-5:]
    mean = lambda rs, key: sum(getattr(r, key) for r in rs) / len(rs)
    print("sampled CIDEr-D:", round(mean(first, "sample_reward"), 3), "->", round(mean(last, "sample_reward"), 3),
          " greedy:", round(mean(first, "greedy_reward"), 3), "->", round(mean(last, "greedy_reward"), 3))
    assert mean(last, "sample_reward") > mean(first, "sample_reward") + 0.5
    assert mean(last, "greedy_reward") > mean(first, "greedy_reward") + 0.5
    assert history[-1].step == 60


def test_scst_in_fit_starts_from_the_best_cross_entropy_model_and_logs_its_phase(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "cache", "train.epochs=2", "train.scst_epochs=2", "train.scst_lr=1e-3",
               "train.scst_batch_size=4", "train.scst_samples=3")
    training.fit(cfg, tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in log] == ["xe", "xe", "scst", "scst"]
    assert all(e["lr"] == 1e-3 and "train_reward" in e and "train_greedy_reward" in e for e in log[2:])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert checkpoint.read(tmp_path / "run" / "last.pt", training=True)["epoch"] == 4


@pytest.mark.parametrize("scst_patience, phases", [(0, ["xe", "xe", "scst", "scst", "scst"]),
                                                    (1, ["xe", "xe", "scst"])])
def test_patience_ends_cross_entropy_early_but_scst_only_with_its_own_patience(tiny_data, tmp_path, monkeypatch,
                                                                               scst_patience, phases):
    # The dev score never improves after the first epoch: patience 1 ends the cross-entropy phase after its
    # second epoch; SCST then runs all its epochs unless train.scst_patience asks otherwise.
    real = training.dev_metrics
    monkeypatch.setattr(training, "dev_metrics", lambda *a: {**real(*a), "CIDEr": 0.5})
    cfg = _cfg(tiny_data, tmp_path / "cache", "train.epochs=3", "train.scst_epochs=3", "train.select_metric=CIDEr", "train.patience=1",
               f"train.scst_patience={scst_patience}", "train.scst_batch_size=4", "train.scst_samples=3")
    training.fit(cfg, tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["phase"] for e in log] == phases
    assert [e["best"] for e in log] == [True] + [False] * (len(phases) - 1)


@pytest.mark.parametrize("start", ["best", "last"])
def test_scst_starts_from_the_best_or_the_last_cross_entropy_epoch(tiny_data, tmp_path, monkeypatch, start):
    # The dev score peaks at the first of three cross-entropy epochs, so best.pt holds epoch 1 and the
    # model the last epoch leaves differs from it. SCST's first epoch must start from the one asked for.
    real = training.dev_metrics
    scores = iter([1.0] + [0.5] * 5)
    monkeypatch.setattr(training, "dev_metrics", lambda *a: {**real(*a), "CIDEr": next(scores)})
    after_xe, at_scst = {}, {}
    real_xe, real_scst = train_step.train_one_epoch, scst.scst_epoch

    def xe_epoch(model, *args, **kwargs):
        result = real_xe(model, *args, **kwargs)
        after_xe.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    def scst_epoch(model, *args, **kwargs):
        if not at_scst:
            at_scst.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_scst(model, *args, **kwargs)

    monkeypatch.setattr(train_step, "train_one_epoch", xe_epoch)
    monkeypatch.setattr(scst, "scst_epoch", scst_epoch)
    cfg = _cfg(tiny_data, tmp_path / "cache", "train.epochs=3", "train.scst_epochs=1", "train.select_metric=CIDEr",
               "train.scst_batch_size=4", "train.scst_samples=3", f"train.scst_start={start}")
    training.fit(cfg, tmp_path / "run")
    best = checkpoint.read(tmp_path / "run" / "best.pt", training=True)
    assert best["epoch"] == 1
    expected = best["model"] if start == "best" else after_xe
    other = after_xe if start == "best" else best["model"]
    assert any(not torch.equal(other[k], expected[k]) for k in expected)  # the two starts differ
    for key, value in expected.items():
        torch.testing.assert_close(at_scst[key], value, rtol=0, atol=0)


def test_scst_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data, tmp_path / "cache", "train.epochs=2", "train.scst_epochs=2", "train.scst_lr=1e-3",
               "train.scst_batch_size=4", "train.scst_samples=3", "train.scst_baseline=mean")
    full = training.fit(cfg, tmp_path / "full")

    real = scst.scst_epoch
    calls = {"n": 0}

    def crash_in_second_scst_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scst, "scst_epoch", crash_in_second_scst_epoch)
    with pytest.raises(KeyboardInterrupt):
        training.fit(cfg, tmp_path / "resumed")
    monkeypatch.setattr(scst, "scst_epoch", real)
    resumed = training.fit(None, tmp_path / "resumed", resume=True)
    assert resumed["epoch"] == full["epoch"] == 4 and resumed["phase"] == "scst"
    a = checkpoint.read(tmp_path / "full" / "last.pt")["model"]
    b = checkpoint.read(tmp_path / "resumed" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_scheduled_sampling_trains_and_swaps_inputs(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "cache", "train.epochs=2", "train.scheduled_sampling=0.5")
    entry = training.fit(cfg, tmp_path / "run")
    assert entry["epoch"] == 2 and entry["val_loss"] < 10

    loaded = checkpoint.load_model(tmp_path / "run" / "last.pt")
    model = loaded.model.train()
    inputs = torch.tensor([[1, 5, 6, 7, 0], [1, 8, 9, 0, 0]])
    targets = torch.tensor([[5, 6, 7, 2, 0], [8, 9, 2, 0, 0]])
    batch = Batch(torch.randn(2, model.feature_dim), inputs, targets)
    torch.manual_seed(0)
    never = train_step.scheduled_inputs(model, batch, 0.0, pad_id=0)
    always = train_step.scheduled_inputs(model, batch, 1.0, pad_id=0)
    assert torch.equal(never.inputs, inputs)
    assert torch.equal(always.inputs[:, 0], inputs[:, 0]) and torch.equal(always.inputs == 0, inputs == 0)
    assert torch.equal(always.targets, targets)
