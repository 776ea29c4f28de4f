"""benchmarks/learning_curve.py: its rate arithmetic, and the whole script on the tiny profile
(three runs along one schedule, a checkpoint kept per budget, resumed without retraining)."""
import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _curve():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    spec = importlib.util.spec_from_file_location("learning_curve", os.path.join(REPO, "benchmarks", "learning_curve.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["learning_curve"] = mod
    spec.loader.exec_module(mod)
    return mod


def _eval(label, epochs, val, gap, fg):
    return {"label": label, "epochs": epochs, "top1": {"val": val, "mixed_rand": val / 2}, "bg_gap": gap,
            "fg_probe": fg}


def test_rates_are_points_per_doubling_between_consecutive_budgets():
    lc = _curve()
    evals = [_eval("vanilla", 40, 30.0, 20.0, 18.0), _eval("vanilla", 10, 20.0, 22.0, 14.0),
             _eval("vanilla", 30, 27.0, 21.0, None), _eval("+OA-Crop", 10, 19.0, 21.0, 15.0)]
    rows = lc.rates(evals)
    assert [(r["label"], r["from"], r["to"]) for r in rows] == [("vanilla", 10, 30), ("vanilla", 30, 40)]
    first, second = rows
    assert first["val"] == pytest.approx(7.0 / math.log2(3)) and first["BG-gap"] == pytest.approx(-1.0 / math.log2(3))
    assert first["mixed_rand"] == pytest.approx(3.5 / math.log2(3))
    assert math.isnan(first["fg probe"]) and math.isnan(second["fg probe"])  # a missing probe is no rate
    assert second["val"] == pytest.approx(3.0 / math.log2(4 / 3))


def test_quick_run_keeps_a_checkpoint_per_budget_and_resumes(tmp_path, capsys):
    """Two of the three runs (the third differs only in its flags): CI time."""
    lc = _curve()
    work = str(tmp_path / "work")
    argv = ["--quick", "--work", work, "--runs", "vanilla,+BG-Mixup"]
    runs = [r for r in lc.RUNS if r.label in ("vanilla", "+BG-Mixup")]
    assert lc.main(argv) == 0
    doc = json.load(open(os.path.join(work, "results", "learning_curve.json")))
    got = sorted((e["label"], e["epochs"]) for e in doc["evaluations"])
    assert got == sorted((r.label, b) for b in (1, 2) for r in runs) and doc["missing"] == []
    spe = doc["settings"]["steps_per_epoch"]
    assert spe >= 1 and all(e["steps"] == e["epochs"] * spe for e in doc["evaluations"])
    left_out = next(r for r in lc.RUNS if r.label == "+OA-Crop")
    assert not os.path.exists(os.path.join(work, "runs", left_out.name))  # a run left out is not trained
    for run in runs:
        for b in (1, 2):
            assert os.path.isfile(os.path.join(work, "runs", run.name, f"ckpt_e{b}.pt"))
        # one schedule: the metrics of the 2-epoch budget continue the 1-epoch part (no second warm-up)
        steps = [json.loads(line)["step"] for line in open(os.path.join(work, "runs", run.name, "metrics.jsonl"))
                 if '"step"' in line and '"loss"' in line]
        assert steps == sorted(steps) and steps[-1] <= 2 * spe
    md = open(os.path.join(work, "results", "learning_curve.md")).read()
    assert "| vanilla | 1 -> 2 |" in md and "Rate between budgets" in md
    assert os.path.getsize(os.path.join(work, "results", "learning_curve.png")) > 1000
    capsys.readouterr()
    assert lc.main(argv) == 0  # everything there: nothing trained again
    assert "training" not in capsys.readouterr().out


def test_runs_must_name_labels_of_the_plan(capsys):
    lc = _curve()
    with pytest.raises(SystemExit):
        lc.main(["--list", "--runs", "vanilla,+OA-crop"])
    assert "--runs: labels among vanilla, +OA-Crop, +BG-Mixup" in capsys.readouterr().err
    assert lc.main(["--list", "--runs", "+OA-Crop"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"moco-train-oacrop-gt-s0 to epoch {b}" for b in lc.BUDGETS]


def test_another_seed_on_a_longer_schedule_reaches_the_trainer_and_its_own_results(tmp_path, monkeypatch):
    """--seed 1 --schedule-epochs 6 with budgets 1, 2: the trainer gets --seed 1 and --epochs 6
    with --max-steps at each budget; the work folder records the schedule; results go to
    learning_curve_s1.* (seed 0's files untouched)."""
    lc = _curve()
    curve = lc.Curve(str(tmp_path / "work"), lc.PROFILES["tiny"], [1, 2], schedule_epochs=6)
    monkeypatch.setattr(curve, "steps_per_epoch", lambda: 3)
    calls = []

    def fake_step(what, log_name, fn, method, argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "checkpoint.pt"), "w").close()

    monkeypatch.setattr(curve, "_step", fake_step)
    curve.check_profile()
    run = lc.dataclasses.replace(lc.RUNS[0], seed=1)
    for budget in (1, 2):
        assert os.path.isfile(curve.train_to(run, budget))
    opt = [dict(zip(a[::2], a[1::2])) for a in (c[:c.index("--crop-scale")] for c in calls)]
    assert [(o["--seed"], o["--epochs"], o["--max-steps"]) for o in opt] == [("1", "6", "3"), ("1", "6", "6")]
    assert "--resume" in calls[1] and "--resume" not in calls[0]
    assert json.load(open(tmp_path / "work" / "profile.json"))["schedule_epochs"] == 6
    assert "schedule_epochs" not in lc.Curve(str(tmp_path / "w2"), lc.PROFILES["tiny"], [1, 2]).p
    doc = {"machine": {}, "date": "d", "commit": {"commit": "c"}, "records": {"train": 9}, "missing": [],
           "settings": {"seed": 1, "image_size": 32, "batch_size": 16, "lr": 0.06, "crop_scale": [0.2, 1.0],
                        "schedule_epochs": 6},
           "evaluations": [_eval("vanilla", 1, 20.0, 10.0, 30.0) | {"steps": 3}]}
    lc.write_results(doc, str(tmp_path / "results"))
    assert sorted(os.listdir(tmp_path / "results")) == ["learning_curve_s1.json", "learning_curve_s1.md",
                                                         "learning_curve_s1.png"]
    assert "seed 1, one cosine schedule of 6 epochs" in open(tmp_path / "results" / "learning_curve_s1.md").read()


def test_seeds_summary_sets_each_seeds_file_side_by_side(tmp_path, capsys):
    """Mean (min–max) over the seeds that reached a budget, and BG-Mixup's paired changes with the
    fidelity target: met only when the mean gap is >= 3 lower, every seed's gap below every
    vanilla seed's, val at most 1 lower and mixed_rand higher."""
    lc = _curve()

    def doc(seed, evals):
        return {"machine": {"cpu": f"cpu{seed}"}, "date": "2026-12-06T00:00", "commit": {"commit": f"c{seed}"},
                "settings": {"seed": seed, "schedule_epochs": 300}, "evaluations": evals}

    s0 = doc(0, [_eval("vanilla", 10, 30.0, 20.0, 14.0), _eval("+BG-Mixup", 10, 29.5, 15.0, 15.0),
                 _eval("vanilla", 100, 40.0, 30.0, 20.0), _eval("+BG-Mixup", 100, 45.0, 14.0, 30.0)])
    s1 = doc(1, [_eval("vanilla", 10, 32.0, 16.0, 16.0), _eval("+BG-Mixup", 10, 31.0, 15.5, 17.0)])
    for d in (s0, s1):
        lc._write_json(str(tmp_path / f"{lc.results_stem(d['settings']['seed'])}.json"), d)
    (tmp_path / "learning_curve_sx.json").write_text("{}")  # not a seed's file: ignored
    assert lc.main(["--seeds-summary", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "learning_curve_seeds.md").read_text()
    assert "seed 0 (learning_curve.md): cpu0" in md and "seed 1 (learning_curve_s1.md): cpu1" in md
    assert "| vanilla | 10 | 0, 1 | 31.0 (30.0–32.0) | 15.5 (15.0–16.0) | 18.0 (16.0–20.0) | 15.0 (14.0–16.0) |" in md
    assert "| +BG-Mixup | 100 | 0 | 45.0 | 22.5 | 14.0 | 30.0 |" in md
    # 10 epochs: every seed's mix gap (15.0, 15.5) is below every vanilla gap (20.0, 16.0), but the mean
    # change is -2.75, short of -3 (mixed_rand = val / 2 here: lower too)
    assert "| 10 | 0, 1 | -2.8 [-5.0, -0.5] | yes | -0.8 [-0.5, -1.0] | -0.4 [-0.2, -0.5] | missed |" in md
    assert "| 100 | 0 | -16.0 [-16.0] | yes | +5.0 [+5.0] | +2.5 [+2.5] | met |" in md
