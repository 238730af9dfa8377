"""The experiment on many processes (`distributed.py`): 2 gloo ranks under torchrun give the
single-process run's numbers piece by piece; a killed run resumes with any number of ranks; bad
launches fail with one clear message; bf16 diagnosis and model parallelism options."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cast_interp import distributed
from cast_interp.pipeline import RunConfig, plan_pieces, run_experiment

REPO = Path(__file__).resolve().parents[1]
# Fields that hold wall times: they differ between any two runs.
TIMES = ("time_s", "eval_time_s", "timings", "timings_s", "step_times_s", "invocations",
         "distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _cli(out: Path, nproc: int = 1, *extra: str):
    """`cast-interp run --preset smoke --model tiny` as one process, or under torchrun."""
    args = ["-m", "cast_interp.cli", "run", "--preset", "smoke", "--model", "tiny", "--device",
            "cpu", "--out", str(out), *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own, so killing
    the launcher's process group alone would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _run_cli(out: Path, nproc: int = 1, *extra: str) -> str:
    p = _cli(out, nproc, *extra)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-4000:]
    return log


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in TIMES and not k.endswith("time_s")}
    if isinstance(d, list):
        return [_strip(x) for x in d]
    return d


def _pieces(run: Path) -> dict[str, dict]:
    return {p.name: _strip(json.loads(p.read_text())) for p in sorted((run / "arms").glob("*.json"))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _run_cli(out)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("two") / "run"
    return out, _run_cli(out, 2)


# --------------------------------------------------------------------------------------------------
# Two gloo ranks = one process
# --------------------------------------------------------------------------------------------------


def test_two_gloo_ranks_give_the_single_process_run_piece_by_piece(one_process, two_ranks):
    two, log = two_ranks
    # Both ranks worked on the grid, and rank 0 alone wrote the report.
    assert "[cast r0/2" in log and "[cast r1/2" in log
    # Round-robin over [original, piece 1, ..., piece 14]: piece i on rank i mod 2.
    tuned = re.findall(r"\[cast r(\d)/2 +[0-9.]+s\] piece (\d+)/14 \S+: tuning", log)
    assert sorted(int(i) for _, i in tuned) == list(range(1, 15))
    assert all(int(r) == int(i) % 2 for r, i in tuned)
    assert re.search(r"\[cast r0/2 +[0-9.]+s\] stage 3: evaluating the original", log)
    assert log.count("# CAST run: tiny") == 1
    a, b = _pieces(one_process), _pieces(two)
    assert sorted(a) == sorted(b) and len(a) == 15  # 14 pieces and the original
    for name in a:
        assert a[name] == b[name], name  # every number of every piece, exactly
    # The map (its exact S passes were shared out), the kept weights and stage 4 (its exact
    # reverts and random revert sets were shared out): the same tensors, bit for bit.
    from safetensors.torch import load_file

    for f in ("diagnosis/conflict_map.safetensors", "arms/full_state.safetensors",
              "attribution/full/attribution_result.safetensors"):
        t1, t2 = load_file(str(one_process / f)), load_file(str(two / f))
        assert sorted(t1) == sorted(t2), f
        for k in t1:
            assert torch.equal(t1[k].nan_to_num(-7.0), t2[k].nan_to_num(-7.0)), (f, k)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one_process, two))
    assert _strip(r1["comparisons"]) == _strip(r2["comparisons"])
    assert _strip(r1["attribution"]) == _strip(r2["attribution"])
    assert r1["distributed"] == {"world_size": 1, "backend": None}
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo"}
    # Shared files are rank 0's alone: no leftovers of concurrent atomic writes.
    assert not list(two.rglob("*.partial*")) and not list(two.rglob(".write-test"))


def test_killed_two_rank_job_resumes_with_one_process_redoing_only_missing_pieces(
        one_process, tmp_path, monkeypatch, one_thread):
    from cast_interp import sparse_tuning

    out = tmp_path / "run"
    job = _cli(out, 2, "--no-attribute")
    arms = out / "arms"
    t0 = time.time()
    while not list(arms.glob("*_t*.json")):  # the first piece finished: kill the job
        assert job.poll() is None, "the job ended before it could be killed"
        assert time.time() - t0 < 300
        time.sleep(0.01)
    for pid in [job.pid, *_descendants(job.pid)]:  # the whole job: torchrun and both ranks
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.communicate(timeout=60)
    done = {p.name: p.read_bytes() for p in arms.glob("*_t*.json")}
    n_pieces = 14
    assert 1 <= len(done) < n_pieces and not (out / "results.json").exists()
    for p in arms.glob("*.json"):
        json.loads(p.read_text())  # what is on disk is complete (atomic writes)

    calls = []
    real = sparse_tuning.safety_finetune
    monkeypatch.setattr(sparse_tuning, "safety_finetune",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = RunConfig.from_preset("smoke", out_dir=str(out), model="tiny", device="cpu",
                                attribute=False)
    doc = run_experiment(cfg, progress=False)  # one thread, as each rank had
    assert len(calls) == n_pieces - len(done)  # only the missing pieces were trained
    for name, content in done.items():
        assert (arms / name).read_bytes() == content
    ref = _pieces(one_process)
    got = _pieces(out)
    for name in got:  # killed, resumed elsewhere: the single-process run's numbers
        assert got[name] == ref[name], name
    assert doc["distributed"]["world_size"] == 1


def test_a_run_resumes_on_more_ranks_than_missing_pieces(two_ranks, tmp_path):
    src, _ = two_ranks
    run = tmp_path / "run"
    shutil.copytree(src, run)
    victims = ["cast_k1_t1.json", "random_k1_d1_t1.json"]
    for v in victims:
        (run / "arms" / v).unlink()
    before = {p.name: p.read_bytes() for p in (run / "arms").glob("*.json")}
    log = _run_cli(run, 3)
    assert "grid: 2 of 15 pieces to run" in log
    tuned = re.findall(r"\[cast r(\d)/3 +[0-9.]+s\] piece \d+/14 \S+: tuning", log)
    assert sorted(tuned) == ["0", "1"]  # two missing pieces: rank 2 had nothing to do
    for name, content in before.items():
        assert (run / "arms" / name).read_bytes() == content, name
    a, b = _pieces(src), _pieces(run)
    for v in victims:
        assert a[v] == b[v]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (src, run))
    assert _strip(r1["comparisons"]) == _strip(r2["comparisons"])
    assert [i["world_size"] for i in r2["invocations"]] == [2, 3]


# --------------------------------------------------------------------------------------------------
# The helpers, and launches that cannot work
# --------------------------------------------------------------------------------------------------


def test_one_process_is_a_world_of_one(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.setup("cpu") == "cpu"
    w = distributed.world()
    assert (w.rank, w.world_size, w.backend) == (0, 1, None) and distributed.is_main()
    items = list(range(7))
    assert distributed.share(items) == items
    assert distributed.map_shared(lambda x: x * x, items) == [x * x for x in items]
    assert distributed.main_only(lambda: "rank 0's") == "rank 0's"
    distributed.barrier()


def test_environment_of_torchrun_and_of_srun(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.env_world() == distributed.World(5, 8, 1, 4)
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(distributed.DistributedError, match="RANK=9"):
        distributed.env_world()
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x2)")
    assert distributed.env_world() == distributed.World()  # no MASTER_ADDR: not a launch
    monkeypatch.setenv("MASTER_ADDR", "node01")
    assert distributed.env_world() == distributed.World(3, 4, 1, 2)


def test_bad_launches_fail_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(distributed.DistributedError, match="NCCL backend needs CUDA"):
            distributed.setup(None, backend="nccl")
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR"):
        distributed.setup("cpu")
    # A rank that cannot reach rank 0's address: an error naming it, not a hang.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    t = time.time()
    with pytest.raises(distributed.DistributedError, match="could not join the gloo process group"):
        distributed.setup("cpu", timeout_min=0.05)
    assert time.time() - t < 60
    assert distributed.world_size() == 1


def _fails_on_rank_1(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.setup("cpu", timeout_min=2)
    squares = distributed.map_shared(lambda x: x * x, list(range(5)))

    def boom(x):
        if x == 3:
            raise ValueError("item 3 is bad")
        return x

    try:
        distributed.map_shared(boom, list(range(6)))
        msg = "no error"
    except Exception as exc:  # noqa: BLE001 (the test reads what each rank saw)
        msg = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.json").write_text(json.dumps({"squares": squares, "error": msg}))
    distributed.teardown()


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fails_on_rank_1, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["squares"] == r1["squares"] == [0, 1, 4, 9, 16]
    assert r1["error"] == "ValueError: item 3 is bad"  # item 3 is rank 1's (round-robin)
    assert r0["error"].startswith("DistributedError: rank 1 failed (ValueError: item 3 is bad)")


# --------------------------------------------------------------------------------------------------
# Larger models: bf16 diagnosis, model parallelism
# --------------------------------------------------------------------------------------------------


def test_bf16_diagnosis_is_close_to_float32_and_recorded(tiny, one_thread):
    from cast_interp.data import load_bundled
    from cast_interp.diagnose import DiagnosisConfig, diagnose
    from cast_interp.stats import spearman

    safe, util = load_bundled("harmful", "calibration"), load_bundled("benign", "calibration")
    kw = dict(n_calibration=6, n_sensitivity=6, n_bootstrap=0, utility_reference="dataset",
              sensitivity_method="exact")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    m32 = diagnose(tiny, safe, util, DiagnosisConfig(**kw))
    m16 = diagnose(tiny, safe, util, DiagnosisConfig(**kw, dtype="bfloat16"))
    assert tiny.cfg.dtype == torch.float32  # the model given is untouched; a bf16 copy worked
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert m16.config["dtype"]["weights"] == "bfloat16"
    assert m16.config["diagnosis"]["dtype"] == "bfloat16"
    assert m32.config["dtype"]["weights"] == "float32"
    assert m16.config["model"] == m32.config["model"]  # the same model (fingerprint of float32)
    for by in ("O", "S"):
        a, b = m32.units("head")[by].flatten().numpy(), m16.units("head")[by].flatten().numpy()
        assert spearman(a, b) > 0.9, by
        assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3, by
    with pytest.raises(ValueError, match="dtype"):
        DiagnosisConfig(dtype="float16")


def test_run_records_the_large_model_options(tmp_path):
    cfg = RunConfig.from_preset("smoke", out_dir=str(tmp_path), model="tiny", diag_dtype="bfloat16")
    assert cfg.diagnosis_config().dtype == "bfloat16"
    assert cfg.to_dict()["n_devices"] == 1 and cfg.to_dict()["diag_dtype"] == "bfloat16"
    # A float32 map keeps the key it had before the option existed (old runs are re-used).
    from cast_interp import pipeline

    assert pipeline._diag_key(RunConfig()) == RunConfig().key(*pipeline.DIAG_FIELDS)
    assert pipeline._diag_key(cfg) != cfg.key(*pipeline.DIAG_FIELDS)
    with pytest.raises(ValueError, match="n_devices"):
        RunConfig(n_devices=0)
    assert len(plan_pieces(cfg, 8)) == 14


def test_model_parallelism_is_refused_clearly_where_it_cannot_run():
    from cast_interp import backend
    from cast_interp.model import load_model

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="TransformerLens 3" if backend.USES_BRIDGE
                       else f"this machine has {n_gpu}"):
        backend.check_n_devices(max(2, n_gpu + 1))
    with pytest.raises(ValueError, match="n_devices"):
        load_model("tiny", n_devices=max(2, n_gpu + 1))
    with pytest.raises(ValueError, match="n_devices must be"):
        backend.check_n_devices(0)


def test_diagnose_on_two_ranks_writes_one_map_equal_to_one_process(tmp_path, one_thread):
    """`cast-interp diagnose` under torchrun: the exact S sweep of every unit shared out over 2
    ranks, rank 0 alone writing; the map equals one process's bit for bit."""
    from safetensors.torch import load_file

    from cast_interp.conflict_map import ConflictMap
    from cast_interp.data import load_bundled
    from cast_interp.diagnose import DiagnosisConfig, diagnose
    from cast_interp.model import load_model

    out = tmp_path / "map"
    opts = dict(n_calibration=4, n_sensitivity=4, n_bootstrap=10, utility_reference="dataset",
                sensitivity_method="exact")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        "-m", "cast_interp.cli", "diagnose", "--model", "tiny", "--device", "cpu",
                        *args, "--out", str(out)], cwd=REPO, env=_env(), text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert p.stdout.count("diagnosis done") == 1  # rank 0 wrote and reported
    ref = diagnose(load_model("tiny", device="cpu"), load_bundled("harmful", "calibration"),
                   load_bundled("benign", "calibration"), DiagnosisConfig(**opts))
    got = ConflictMap.load(out)
    assert got.config["distributed"]["world_size"] == 2
    for kind in ("head",):
        for name in ("O", "S", "C", "S_low", "S_high"):
            a, b = ref.units(kind)[name], got.units(kind)[name]
            assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)), name
    assert sorted(load_file(str(out / "conflict_map.safetensors")))  # a complete file
