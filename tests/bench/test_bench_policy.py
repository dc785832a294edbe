"""The policy benchmark reports every variant and its cost model, and refuses a backward
length range."""

import json

import pytest

from ragcache.bench import policy as bench_policy
from ragcache.chunkstore.policy import CostModel


def test_policy_benchmark_writes_every_variant_and_the_cost_model(tmp_path):
    out = tmp_path / "policy.json"
    bench_policy.main(
        [
            "--out",
            str(out),
            "--chunks",
            "60",
            "--requests",
            "600",
            "--seeds",
            "0",
            "--shapes",
            "zipf",
            "--cost-model",
            "default",
        ]
    )
    report = json.loads(out.read_text())
    assert report["cost_model"]["source"] == "default"
    assert report["cost_model"]["per_token"] == CostModel().per_token
    (run,) = report["runs"]
    assert set(run["results"]) == set(bench_policy.VARIANTS)
    lru = run["results"]["lru"]["saved_prefill_fraction"]
    pgdsf = run["results"]["pgdsf"]["saved_prefill_fraction"]
    assert run["pgdsf_minus_lru_saved_points"] == pytest.approx(100 * (pgdsf - lru))
    assert 0.0 <= lru <= 1.0 and 0.0 <= run["static_best_saved_fraction"] <= 1.0
    oracle = run["oracle_saved_fraction"]
    assert run["oracle_minus_lru_saved_points"] == pytest.approx(100 * (oracle - lru))
    summary = report["summary"]["zipf"]
    assert summary["pgdsf_minus_lru_min"] == pytest.approx(run["pgdsf_minus_lru_saved_points"])


def test_policy_benchmark_rejects_a_backward_length_range(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "p.json"), "--min-tokens", "600", "--max-tokens", "500"]
    with pytest.raises(SystemExit):
        bench_policy.main([*argv, "--cost-model", "default"])
    assert "--min-tokens <= --max-tokens" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
