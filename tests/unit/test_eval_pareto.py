"""longseq.eval.pareto: speed and fidelity runs joined per (budget, reuse steps), defaults resolved per run."""

from __future__ import annotations

import json

from longseq.eval.pareto import pareto_points


def _decode(defaults, variants, dense_tpot=10.0):
    return {"settings_defaults": defaults, "table": [
        {"context": 129024, "batch": 1, "tpot_ratio": variants[0][1] / dense_tpot,
         "variants": [{"longseq_env": env, "tpot_ratio": t / dense_tpot} for env, t in variants]},
        {"context": 32768, "batch": 8, "tpot_ratio": 0.5, "variants": [{"longseq_env": {}, "tpot_ratio": 0.5}]}]}


def _fidelity(points):
    sweeps = {}
    for (budget, n), (agree, kl, keys) in points.items():
        sweeps.setdefault(f"auto+reuse{n}", {"budgets": {}})["budgets"][str(budget)] = {
            "agreement": agree, "mean_kl": kl, "passkey_correct": [True] * keys + [False] * (4 - keys), "steps": 256}
    return {"dense": {"passkey_correct": [True] * 4}, "sweeps": sweeps}


def test_points_join_runs_and_resolve_each_runs_defaults(tmp_path):
    # run A's empty env meant (2048, 4); run B's meant (2048, 1): the same empty env, two different settings
    json.dump(_decode({"budget": 2048, "reuse_steps": 4}, [({}, 6.0), ({"LONGSEQ_SPARSE_BUDGET": "1024"}, 5.5)]),
              open(tmp_path / "a.json", "w"))
    json.dump(_decode({"budget": 2048, "reuse_steps": 1}, [({}, 7.0), ({"LONGSEQ_SPARSE_REUSE_STEPS": "4"}, 6.4)]),
              open(tmp_path / "b.json", "w"))
    json.dump(_fidelity({(2048, 1): (0.996, 0.0075, 4), (2048, 4): (0.98, 0.0126, 3), (512, 4): (0.9, 0.1, 0)}),
              open(tmp_path / "f.json", "w"))
    pts = pareto_points(str(tmp_path), ["a.json", "b.json"], ["f.json"])
    by = {(p["budget"], p["reuse_steps"]): p for p in pts}
    assert set(by) == {(2048, 1), (2048, 4)}  # (1024, 4) has no fidelity, (512, 4) no speed: left out
    assert by[(2048, 1)]["tpot_ratio"] == 0.7 and by[(2048, 1)]["passkeys"] == 4
    assert sorted(by[(2048, 4)]["tpot_ratios"]) == [0.6, 0.64]  # both runs of the setting, averaged
    assert abs(by[(2048, 4)]["tpot_ratio"] - 0.62) < 1e-12 and by[(2048, 4)]["agreement"] == 0.98
