"""`reprise calibrate` and the skip tables stored per model version (`reprise cache table`).

The command runs end to end on the random-weight `tiny` model over a real prompt log (the mechanics, not
the numbers); the scorers, the log replay and the pair sampling are checked on their own; and real worker
processes pick up a stored table, while a worker with other weights reports its table as uncalibrated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cache.calibration_fit import fit_table
from cache.skip_table import choose_skip_fraction
from cache.skip_table_store import TableStore, TableStoreError
from scheduler.prompt_log import PromptRow
from workers.calibration_run import CalibrationError, replay_log, sample_pairs
from workers.scorers import PixelScorer, ScorerError, make_scorer, psnr, ssim

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO.parent / "shared" / "prompts"
needs_prompts = pytest.mark.skipif(not PROMPTS.is_dir(), reason="../shared/prompts is not here")


def _reprise(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


# --- the log, the pairs, the scorers -----------------------------------------------------------------


def _toy_embed(texts):
    """Bag of letters: prompts sharing letters are similar; deterministic, no model."""
    out = np.zeros((len(texts), 26), dtype=np.float32)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


def test_replay_takes_each_prompts_nearest_earlier_request_and_skips_exact_repeats():
    rows = [
        PromptRow("a red cat", seed=1),
        PromptRow("zzz qqq", seed=2),
        PromptRow("a red cat", seed=1),  # exact repeat: an exact-cache hit, not a pair
        PromptRow("a red cat", seed=9),  # re-roll: same text, other seed, similarity 1
        PromptRow("a red hat", seed=3),
    ]
    pairs, repeats = replay_log(rows, _toy_embed)
    assert repeats == 1
    assert [p["index"] for p in pairs] == [1, 3, 4]
    reroll = pairs[1]
    assert reroll["source_index"] == 0 and reroll["similarity"] == pytest.approx(1.0)
    assert pairs[2]["source_prompt"] == "a red cat" and pairs[2]["source_seed"] in (1, 9)
    assert all(p["source_index"] < p["index"] for p in pairs)  # only earlier requests can be in the cache


def test_sample_follows_the_log_and_spreads_over_the_similarity_range():
    neighbours = [{"similarity": s} for s in [0.1] * 50 + [0.5, 0.9, 0.99] + [1.0] * 30]
    picked = [p["similarity"] for p in sample_pairs(neighbours, 12)]
    assert len(picked) == 12 and picked == sorted(picked)
    assert {0.5, 0.9} <= set(picked)  # the rare close ones are measured
    assert picked.count(1.0) >= 2 and picked.count(0.1) >= 3  # and the log's masses as they occur
    assert len(sample_pairs(neighbours, 100)) == len(neighbours)


def test_sample_puts_the_pairs_where_thresholds_fall_not_on_re_rolls():
    # a log like a generated shapes log: a quarter re-rolls at s = 1, close edits 0.8-0.99, the rest far
    rng = np.random.default_rng(0)
    neighbours = (
        [{"similarity": 1.0}] * 50
        + [{"similarity": float(s)} for s in rng.uniform(0.8, 0.99, 60)]
        + [{"similarity": float(s)} for s in rng.uniform(0.3, 0.8, 90)]
    )
    picked = [p["similarity"] for p in sample_pairs(neighbours, 100)]
    assert len(picked) == 100 and picked == sorted(picked)
    assert picked.count(1.0) == 100 // 6  # enough re-rolls to judge a top band of them, no more
    assert sum(0.8 <= s < 0.99 for s in picked) >= 45  # most of the close edits are measured
    assert sum(s < 0.8 for s in picked) >= 25  # and the far neighbours as the log has them
    few = [p["similarity"] for p in sample_pairs(neighbours[:50] + neighbours[50:55], 20)]
    assert len(few) == 20 and few.count(1.0) == 15  # short of other pairs: the re-rolls fill up


def _scored(rows, fractions=(0.1, 0.5)):
    """(similarity, loss at every fraction, same text?) -> pairs scored fresh 100."""
    return [
        {
            "similarity": s,
            "source_prompt": "a",
            "target_prompt": "a" if same else f"b{i}",
            "fresh": 100.0,
            "resumed": {str(f): 100.0 - lost for f in fractions},
        }
        for i, (s, lost, same) in enumerate(rows)
    ]


def test_re_rolls_do_not_vouch_for_a_band_below_them():
    # 40 re-rolls at s = 1 lose nothing; two edits at 0.85 lose 30 points: the tail mean above 0.85 is 1.4
    # points, within 2, but nothing of the edits' own says they are safe (fewer than min_pairs of them).
    pairs = _scored([(1.0, 0.0, True)] * 40 + [(0.85, 30.0, False)] * 2 + [(0.5, 50.0, False)] * 10)
    table = fit_table(pairs, tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5), z=0.0)
    assert table == ((0.9999, 0.5),)  # the re-rolls skip the most; the edits and everything below: none
    assert choose_skip_fraction(0.85, table) == 0.0


def test_a_text_the_embedder_cannot_tell_from_a_re_roll_is_judged_with_the_re_rolls():
    # two case variants at s = 1 ("A red cat" / "a red cat") share the re-rolls' threshold: judged apart,
    # they would be a band of two and take the re-rolls' K away with them
    pairs = _scored([(1.0, 0.0, True)] * 20 + [(1.0, 0.0, False)] * 2 + [(0.5, 50.0, False)] * 10)
    assert fit_table(pairs, tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5), z=0.0) == ((0.9999, 0.5),)


def test_a_band_without_min_pairs_of_its_own_is_not_granted():
    # ten edits at 0.99 are safe at any K; two at 0.9 are safe at K = 10 % only. The tail above 0.9 at
    # 10 % (12 pairs) is within, but the band it would add holds two pairs: no evidence of its own.
    pairs = _scored([(1.0, 0.0, True)] * 10 + [(0.99, 0.0, False)] * 10)
    pairs += [
        {**p, "resumed": {"0.1": 100.0, "0.5": 50.0}} for p in _scored([(0.9, 0.0, False)] * 2)
    ]  # fmt: skip
    table = fit_table(pairs, tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5), z=0.0)
    assert [f for _, f in table] == [0.5] and table[0][0] > 0.9
    assert choose_skip_fraction(0.9, table) == 0.0


def test_the_pairs_just_above_a_threshold_must_hold_on_their_own():
    # 30 edits at 0.95 are safe at K = 10 %, five at 0.85 lose 10 points there: over the band (35 pairs)
    # the mean loss is 1.4, within 2, but the five nearest the threshold are not.
    pairs = _scored([(1.0, 0.0, True)] * 20 + [(0.95, 0.0, False)] * 30 + [(0.85, 10.0, False)] * 5)
    for p in pairs:
        if p["similarity"] == 0.95:
            p["resumed"]["0.5"] = 50.0  # the 0.95 edits are safe at 10 % only
    table = fit_table(pairs, tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5), z=0.0)
    assert table == ((0.9999, 0.5), (0.9499, 0.1))
    assert choose_skip_fraction(0.85, table) == 0.0 and choose_skip_fraction(0.95, table) == 0.1


def test_pixel_scorer_is_100_for_the_fresh_image_and_drops_with_the_difference():
    rng = np.random.default_rng(0)
    fresh = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    slightly = np.clip(fresh.astype(int) + rng.integers(-8, 9, fresh.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scores = PixelScorer()("any prompt", fresh, [fresh, slightly, other])
    assert scores.fresh == 100.0
    same, near, far = scores.resumed
    assert same == pytest.approx(100.0) and far < near < same
    assert ssim(fresh, fresh) == pytest.approx(1.0) and psnr(fresh, fresh) == float("inf")
    assert scores.details["psnr"][0] == 99.0 and scores.details["psnr"][2] < scores.details["psnr"][1]


def test_unknown_scorer_and_clip_without_a_model_are_typed_errors():
    with pytest.raises(ScorerError, match="unknown scorer"):
        make_scorer("lpips")
    with pytest.raises(ScorerError, match="--clip-model"):
        make_scorer("clip", clip_model=None)


def _random_clip(directory: Path) -> Path:
    """A randomly initialised CLIP saved as a model directory: only proves the clip scorer's path runs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from workers.model_loading import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_clip_scorer_scores_against_the_prompt(tmp_path):
    scorer = make_scorer("clip", clip_model=str(_random_clip(tmp_path / "clip")))
    rng = np.random.default_rng(1)
    fresh = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scores = scorer("a red circle", fresh, [fresh, other])
    assert -100.0 <= scores.fresh <= 100.0
    assert scores.resumed[0] == pytest.approx(scores.fresh, abs=1e-4)  # the same image scores the same
    assert scores.resumed[1] != pytest.approx(scores.fresh, abs=1e-6)


# --- the command ----------------------------------------------------------------------------------------


@needs_prompts
def test_reprise_calibrate_runs_to_the_end_on_a_random_weight_model(tmp_path):
    out, png = tmp_path / "cal.json", tmp_path / "cal.png"
    proc = _reprise(
        "calibrate", "--model", "tiny", "--prompts", str(PROMPTS / "PartiPrompts.tsv"), "--scorer", "pixel",
        "--pairs", "3", "--steps", "4", "--limit", "40", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pair 3/3" in proc.stdout and "curve" in proc.stdout  # progress, then the curve
    report = json.loads(out.read_text())
    assert report["meta"]["model"] == "tiny" and report["meta"]["scorer"] == "pixel"
    assert report["meta"]["log_prompts"] == 40 and len(report["pairs"]) == 3
    sims = [p["similarity"] for p in report["pairs"]]
    assert sims == sorted(sims) and len(report["neighbour_similarities"]) == 39
    for p in report["pairs"]:
        assert p["fresh"] == 100.0 and set(p["resumed"]) == {str(f) for f in report["meta"]["fractions"]}
        assert all(0 <= v <= 100.0 + 1e-6 for v in p["resumed"].values())
    assert [c["tolerance"] for c in report["curve"]["fitted"]][0] == 0.0
    assert png.stat().st_size > 1000

    # --refit: the same scored pairs fitted again (here: anything goes), no generation
    from workers import calibration_run as calibrate

    again = tmp_path / "refit.json"
    assert calibrate.main(["--refit", str(out), "--tolerance", "100", "--z", "0", "--json", str(again)]) == 0
    refit = json.loads(again.read_text())
    assert [{k: v for k, v in p.items() if k != "report"} for p in refit["pairs"]] == report["pairs"]
    assert refit["meta"]["refit_of"] == [str(out)]
    assert refit["table"] == [[round(sims[0] - 1e-4, 4), max(report["meta"]["fractions"])]]  # every pair, largest K
    assert calibrate.main(["--refit", str(out), str(out), "--json", str(again)]) == 0  # reports pooled
    assert len(json.loads(again.read_text())["pairs"]) == 2 * len(report["pairs"])
    with pytest.raises(CalibrationError, match="not a calibration report"):
        calibrate.main(["--refit", str(png)])


def test_calibrate_with_the_clip_scorer_and_the_clip_embedder(tmp_path):
    from workers import calibration_run as calibrate

    log = tmp_path / "log.txt"
    log.write_text("a red circle\na red square\na blue circle\na green triangle on white\nan old red circle\n")
    clip = _random_clip(tmp_path / "clip")
    out = tmp_path / "cal.json"
    rc = calibrate.main(
        ["--model", "tiny", "--prompts", str(log), "--scorer", "clip", "--clip-model", str(clip),
         "--embedder", "clip", "--pairs", "2", "--steps", "3", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["meta"]["embedder"] == "clip" and report["meta"]["scorer"] == "clip" and len(report["pairs"]) == 2


def test_calibrate_refuses_bad_input_with_typed_errors(tmp_path):
    from workers import calibration_run as calibrate

    one = tmp_path / "one.txt"
    one.write_text("a lonely prompt\n")
    with pytest.raises(CalibrationError, match="neighbour pairs"):
        calibrate.main(["--model", "tiny", "--prompts", str(one), "--pairs", "2", "--steps", "2"])
    with pytest.raises(CalibrationError, match="--prompts"):
        calibrate.main(["--model", "tiny", "--prompts", str(tmp_path / "missing.tsv")])
    with pytest.raises(CalibrationError, match="--pairs"):
        calibrate.main(["--model", "tiny", "--prompts", str(one), "--pairs", "1"])
    with pytest.raises(CalibrationError, match="--prompts"):
        calibrate.main(["--model", "tiny"])
    proc = _reprise("calibrate", "--prompts", str(one), "--scorer", "nope")
    assert proc.returncode == 2 and "invalid_scorer" in proc.stderr


# --- tables stored per model version ---------------------------------------------------------------------


def test_table_store_keeps_one_table_per_version_and_embedder(redis_client):
    store = TableStore(redis_client, "ts-test")
    record = store.set("shapes", "abc", "minilm", [(0.9, 0.2), (0.99, 0.5)], tolerance=2.0)
    assert record["table"] == [[0.99, 0.5], [0.9, 0.2]]  # strictest first
    assert store.table("abc", "minilm") == ((0.99, 0.5), (0.9, 0.2))
    assert store.get("abc", "clip") is None and store.get("other", "minilm") is None
    assert redis_client.exists("ts-test:skip-table:abc:minilm")  # under the cluster's prefix
    for bad in ([(0.9, 0.5), (0.99, 0.2)], [(0.9, 1.5)], "nonsense"):
        with pytest.raises(TableStoreError):
            store.set("shapes", "abc", "minilm", bad)
    with pytest.raises(TableStoreError, match="embedder"):
        store.set("shapes", "abc", "bert", [(0.9, 0.2)])
    with pytest.raises(TableStoreError, match="version"):
        store.set("shapes", None, "minilm", [(0.9, 0.2)])
    assert [r["fingerprint"] for r in store.records("shapes")] == ["abc"]
    assert store.delete("abc", "minilm") and store.get("abc", "minilm") is None


class _Cache:
    """What the watcher needs of a LatentCache: its settings and set_skip_table (a real LatentCache
    opens a store and an embedder; the serving side is checked with real workers below)."""

    def __init__(self):
        from cache import CacheSettings

        self.settings = CacheSettings(embedder="minilm", skip_table=None)
        self.skip_table = self.settings.table()

    def set_skip_table(self, table):
        self.skip_table = tuple(table) if table else self.settings.table()


def test_watcher_serves_the_stored_table_and_falls_back_when_it_is_deleted(redis_client, monkeypatch):
    from workers.skip_table_choice import TableWatcher

    monkeypatch.delenv("REPRISE_CACHE_SKIP_TABLE", raising=False)
    service = SimpleNamespace(
        cache=_Cache(), components=SimpleNamespace(fingerprint="v1"), model_name="m", registry=None
    )
    store, info = TableStore(redis_client, "tw-test"), {}
    watcher = TableWatcher(service, redis_client, "tw-test", info, every_s=60)
    default = service.cache.skip_table
    assert watcher.refresh() and info["skip_table_source"] == "default" and not info["skip_table_calibrated"]
    assert info["skip_table_embedder"] == "minilm"
    store.set("m", "v1", "minilm", [(0.97, 0.4)])
    assert watcher.refresh() and service.cache.skip_table == ((0.97, 0.4),)
    assert info["skip_table_calibrated"] and info["skip_table_for"]["fingerprint"] == "v1"
    assert not watcher.refresh()  # nothing changed
    store.delete("v1", "minilm")
    store.set("m", "v0", "minilm", [(0.9, 0.2)])  # a table for other weights of the same model
    assert watcher.refresh() and service.cache.skip_table == default
    assert info["skip_table_source"] == "default" and "v0" in info["skip_table_uncalibrated"]
    assert "skip_table_for" not in info


def test_cache_table_cli_sets_shows_and_refuses_bad_tables(redis_server):
    env = {"REPRISE_QUEUE_PREFIX": "cli-test"}
    proc = _reprise(
        "cache",
        "table",
        "set",
        "--model",
        "m",
        "--version",
        "v9",
        "--embedder",
        "minilm",
        "--table",
        "0.95:0.3",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    shown = _reprise("cache", "table", "show", "--model", "m", "--json", env=env)
    assert json.loads(shown.stdout)["tables"][0]["table"] == [[0.95, 0.3]]
    bad = _reprise(
        "cache", "table", "set", "--model", "m", "--version", "v9", "--embedder", "clip", "--table", "0.95:7", env=env
    )
    assert bad.returncode == 2 and "invalid_table" in bad.stderr
    noversion = _reprise(
        "cache", "table", "set", "--model", "never-served", "--embedder", "minilm", "--table", "0.95:0.3", env=env
    )
    assert noversion.returncode == 2 and "version" in noversion.stderr
    # auto (the default embedder) with no live worker to say which one it resolved to: ask
    unknown = _reprise("cache", "table", "set", "--model", "m", "--version", "v9", "--table", "0.95:0.3", env=env)
    assert unknown.returncode == 2 and "--embedder" in unknown.stderr


def _nodes(env) -> dict:
    proc = _reprise("models", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout).get("tiny", {}).get("nodes", {})


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_workers_of_one_model_share_the_stored_table_and_new_weights_are_uncalibrated(redis_server, tmp_path):
    from ops.localcluster import LocalCluster
    from workers.model_loading import save_builtin

    # The test Redis (conftest's environment), a queue prefix of its own: nothing shared with other tests.
    env = {"REPRISE_QUEUE_PREFIX": "cal-it", "REPRISE_TABLE_REFRESH_S": "1"}
    with LocalCluster(workdir=str(tmp_path), redis_url=redis_server.url, env=env) as c:
        c.ensure_redis()
        workers = [c.start_worker("tiny", "cpu", wait=False, REPRISE_CACHE_PATH=f"{tmp_path}/q{i}") for i in (0, 1)]
        for w in workers:
            c.wait_worker_ready(w, timeout=300)
        nodes = _wait_for(lambda: len(_nodes(env)) == 2 and _nodes(env), 60, "two tiny nodes")
        assert all(n["skip_table_source"] == "default" and not n["skip_table_calibrated"] for n in nodes.values())
        assert all(n["skip_table_embedder"] == "minilm" for n in nodes.values())  # auto: tiny ships no clip table
        version = next(iter(nodes.values()))["model_version"]

        proc = _reprise("cache", "table", "set", "--model", "tiny", "--table", "0.5:0.3,0.8:0.5", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["fingerprint"] == version  # the version the cluster runs

        def both_calibrated():
            nodes = _nodes(env)
            ok = len(nodes) == 2 and all(n["skip_table"] == [[0.8, 0.5], [0.5, 0.3]] for n in nodes.values())
            return ok and nodes

        nodes = _wait_for(both_calibrated, 60, "both workers to serve the stored table")
        assert all(n["skip_table_calibrated"] and n["skip_table_for"]["fingerprint"] == version for n in nodes.values())

        other = save_builtin("tiny", tmp_path / "weights" / "tiny", seed=1)  # same model name, other weights
        w2 = c.start_worker(str(other), "cpu", REPRISE_CACHE_PATH=f"{tmp_path}/q2", timeout=300)
        new = _wait_for(lambda: _nodes(env).get(w2.hostname), 60, "the worker with other weights")
        assert new["model_version"] != version
        assert new["skip_table_calibrated"] is False and new["skip_table_source"] == "default"
        assert version in new["skip_table_uncalibrated"]


# --- the model's own text encoder where it is calibrated ------------------------------------------------


def test_auto_embedder_is_the_models_encoder_where_a_table_is_calibrated_for_it(tmp_path, monkeypatch):
    from cache import CacheSettings
    from workers.model_loading import load_components, save_builtin
    from workers.node_cache import cache_settings_for
    from workers.skip_table_choice import auto_embedder

    monkeypatch.delenv("REPRISE_CACHE_EMBEDDER", raising=False)
    monkeypatch.delenv("REPRISE_CACHE_SKIP_TABLE", raising=False)
    assert CacheSettings().embedder == "auto"
    plain = load_components(str(save_builtin("tiny", tmp_path / "plain")))
    assert auto_embedder(plain) == "minilm" and auto_embedder(None) == "minilm"
    assert auto_embedder(plain, lambda fp: fp == plain.fingerprint) == "clip"  # a clip table stored for this version
    assert auto_embedder(plain, lambda fp: False) == "minilm"
    settings, embed = cache_settings_for(CacheSettings(), plain)
    assert (
        settings.embedder == "minilm" and embed is None and settings.table() == CacheSettings(embedder="minilm").table()
    )

    # a model directory that ships a table for its own encoder (model_index.json → reprise → clip_skip_table)
    shipped = save_builtin("tiny", tmp_path / "shipped")
    index = json.loads((shipped / "model_index.json").read_text())
    index["reprise"]["clip_skip_table"] = [[0.97, 0.4]]
    (shipped / "model_index.json").write_text(json.dumps(index))
    model = load_components(str(shipped))
    assert model.extra["clip_skip_table"] == [[0.97, 0.4]]
    settings, embed = cache_settings_for(CacheSettings(), model)
    assert settings.embedder == "clip" and callable(embed) and settings.table() == ((0.97, 0.4),)
    assert settings.collection == CacheSettings().collection + "-clip"  # never mixed with MiniLM vectors
    # an explicit choice wins
    assert cache_settings_for(CacheSettings(embedder="minilm"), model)[0].embedder == "minilm"


def test_cache_table_calibrate_is_reprise_calibrate_with_store(monkeypatch):
    from scheduler import cache_cli
    from workers import calibration_run as calibrate

    monkeypatch.setattr(cache_cli, "TABLE_CALIBRATE", None)
    with pytest.raises(cache_cli.TableCommandError, match="worker layer"):  # the scheduler's command alone
        cache_cli.main(["table", "calibrate", "--prompts", "log.txt"])
    from ops.cli import build_parser

    build_parser()  # the full command wires the worker's calibration in
    seen = []
    monkeypatch.setattr(calibrate, "main", lambda argv: seen.append(argv) or 0)
    assert cache_cli.main(["table", "calibrate", "--model", "shapes", "--prompts", "log.txt"]) == 0
    assert seen == [["--model", "shapes", "--prompts", "log.txt", "--store"]]
