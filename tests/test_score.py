"""score.py and scoring.py: the command on a tiny setting (keys, ranges, determinism, the spread
over seeds), and each metric on cases whose answer is known, so each can fail on the bug it names."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import score
import scoring
from conftest import tiny_model_config
from latents import SD15
from model import MappingNetwork

TINY_ARGS = ["--steps", "3", "--size", "8", "--test-per-domain", "4", "--num-outs", "2", "--threads", "1",
             "data.synthetic_files_per_domain=8"]
KEYS = {f"{mode}_{metric}" for mode in ("lat", "ref") for metric in scoring.METRICS}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("score") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": tiny_model_config(), "loss": {"r1_interval": 2},
                                    "training": {"batch_size": 4, "lr": 1e-3, "ema_beta": 0.9}}))
    return str(path)


def run_score(capsys, args):
    assert score.main(args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0]), out


def figures(record):
    """What a run computed, without its timings."""
    return [{k: r[k] for k in ("seed", "init", "final", "curve", "losses", "nonfinite_skipped")}
            for r in record["per_seed"]]


def test_command_reports_every_metric_in_range_and_is_deterministic(tiny_config, capsys):
    args = ["--config", tiny_config, "--seeds", "0", "1", "--eval-every", "2", *TINY_ARGS]
    first, text = run_score(capsys, args)
    second, _ = run_score(capsys, args)
    assert figures(first) == figures(second)  # same seeds, same threads: the same figures

    assert set(first["score"]) == KEYS and set(first["init"]) == KEYS
    assert first["steps"] == 3 and first["seeds"] == [0, 1] and first["domains"] == ["day", "night", "pastel"]
    assert list(first["curve"]) == ["2"]
    for part in ("score", "init"):
        for key, (mean, std) in first[part].items():
            assert std >= 0, key
            if key.endswith(("_acc", "_rate")):
                assert 0 <= mean <= 1, key
            elif key.endswith("_r2"):
                assert -1 < mean <= 1, key
            else:
                assert mean >= 0, key
    # the spread is over the seeds' own figures
    for key, (mean, std) in first["score"].items():
        values = [r["final"][key] for r in first["per_seed"]]
        assert mean == pytest.approx(sum(values) / 2, abs=1e-5)
        assert std == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-5)  # the sample std
    assert figures(first)[0]["final"] != figures(first)[1]["final"]  # the seed matters
    # a fresh AdaIN ignores the style: every style gives the same output at init
    assert first["init"]["lat_diversity"][0] == 0 and first["init"]["ref_diversity"][0] == 0
    ref = first["reference"]
    assert ref["classifier_heldout_acc"] >= 0.9 and ref["unchanged_target_acc"] == 0
    assert ref["chance"] == pytest.approx(1 / 3)
    for label in ("target acc", "content R^2", "diversity", "at init", "after 3 steps", "time:"):
        assert label in text


def test_bad_arguments_are_an_error_naming_the_flag(tiny_config, capsys):
    assert score.main(["--config", tiny_config, "--size", "4"]) == 2
    assert "argument --size: 4: expected an integer from 8 to 1024" in capsys.readouterr().err
    assert score.main(["--config", tiny_config, "--test-per-domain", "5"]) == 2
    assert "--test-per-domain 5" in capsys.readouterr().err
    assert score.main(["--config", tiny_config, "--test-per-domain", "4", "--num-outs", "6"]) == 2
    assert "--num-outs 6: expected at most --test-per-domain 4" in capsys.readouterr().err


# ---------------------------------------------------------------------- the metrics on known cases

@pytest.fixture(scope="module")
def domains():
    data = scoring.make_domains(num_domains=3, size=16, train_per_domain=64, test_per_domain=32)
    return data, scoring.DomainClassifier(data.train)


def tasks_of(data, make):
    """{(source, target): make(source, target)} over the ordered pairs of different domains."""
    n = len(data.names)
    return {(i, j): make(i, j) for i in range(n) for j in range(n) if i != j}


def test_the_classifier_recognises_held_out_real_latents(domains):
    data, classifier = domains
    assert classifier.accuracy(data.test) >= 0.97
    assert classifier.accuracy(data.test.roll(1, 0)) <= 0.05  # every domain relabelled: it must disagree


def test_an_unchanged_source_keeps_its_content_and_misses_the_target(domains):
    data, classifier = domains
    identity = tasks_of(data, lambda i, j: data.test[i][:, None].expand(-1, 2, -1, -1, -1))  # two equal "styles"
    scores = scoring.score_tasks(identity, data, classifier)
    assert scores["target_acc"] <= 0.05 and scores["source_rate"] >= 0.95
    assert scores["content_r2"] >= 0.7
    assert scores["diversity"] == 0


def test_real_target_latents_hit_the_target_but_carry_no_source_content(domains):
    data, classifier = domains
    shuffled = tasks_of(data, lambda i, j: torch.stack([data.test[j], data.test[j].roll(1, 0)], 1))  # [S, 2, ...]
    scores = scoring.score_tasks(shuffled, data, classifier)
    assert scores["target_acc"] >= 0.97 and scores["source_rate"] <= 0.03
    assert scores["content_r2"] <= 0.1  # another sample's shapes
    assert scores["diversity"] > 0.1


def test_content_r2_is_one_for_the_label_map_and_zero_for_nothing(domains):
    data, _ = domains
    labels = data.test_labels[0]  # [S, H, W]
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()[:, None]  # [S, 1, 4, H, W]
    assert scoring.content_r2(one_hot, labels) >= 0.99
    assert abs(scoring.content_r2(torch.zeros_like(one_hot), labels)) <= 0.02
    noise = torch.randn(one_hot.shape, generator=torch.Generator().manual_seed(0))
    assert scoring.content_r2(noise, labels) <= 0.02


def test_diversity_is_the_mean_pairwise_l1():
    x = torch.randn(5, 1, 4, 8, 8)
    assert scoring.diversity(torch.cat([x, x + 0.5, x - 0.25], 1)) == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    assert scoring.diversity(x.expand(-1, 3, -1, -1, -1)) == 0


def test_non_finite_translations_give_nan(domains):
    data, classifier = domains
    broken = tasks_of(data, lambda i, j: torch.full((4, 2, 4, 16, 16), float("nan")))
    assert all(math.isnan(v) for v in scoring.score_tasks(broken, data, classifier).values())


def test_translations_pair_each_source_with_its_labels_and_target(domains):
    """Through translate_tasks with stand-in networks: a G that ignores the style scores as an
    unchanged source; a G that returns real latents of the style's domain scores as those."""
    data, classifier = domains
    num_domains, n_test = data.test.shape[:2]
    mapping = MappingNetwork(latent_dim=4, style_dim=8, num_domains=num_domains, hidden_dim=8, n_shared_layers=1)
    domain_style = lambda y: F.one_hot(y, num_domains).float()  # noqa: E731
    nets = {"generator": lambda x, s: x, "mapping_network": mapping,
            "style_encoder": lambda x, y: domain_style(y)}
    kept = scoring.score_networks(nets, data, classifier, 2, SD15, 4, seed=0)
    assert kept["lat_target_acc"] <= 0.05 and kept["ref_target_acc"] <= 0.05
    assert kept["lat_content_r2"] >= 0.7 and kept["lat_diversity"] == 0 and kept["ref_diversity"] == 0

    nets = {"generator": lambda x, s: data.test[s.argmax(1), torch.arange(len(s)) % n_test],
            "mapping_network": lambda z, y: domain_style(y) + 0 * z[:, :1],
            "style_encoder": lambda x, y: domain_style(y)}
    painted = scoring.score_networks(nets, data, classifier, 2, SD15, 4, seed=0)
    assert painted["lat_target_acc"] >= 0.97 and painted["ref_target_acc"] >= 0.97
    assert painted["lat_content_r2"] <= 0.1 and painted["lat_diversity"] > 0.1



def test_overrides_may_come_before_between_and_after_the_flags():
    args = score.parse_args(["--config", "c.yaml", "loss.w_sty=2", "--seeds", "0", "1", "training.lr=4e-4",
                             "--steps", "5", "loss.w_ds=0"])
    assert args.seeds == [0, 1] and args.steps == 5
    assert args.overrides == ["loss.w_sty=2", "training.lr=4e-4", "loss.w_ds=0"]
