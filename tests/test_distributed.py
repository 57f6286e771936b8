"""torchrun: the batch split across ranks, and a 2-process gloo run on CPU against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from ltrepro.checkpoint import load_checkpoint
from ltrepro.distributed import World, shard_window, take
from ltrepro.methods.fsgl import TwoStreamBatch
from ltrepro.runner import train

FAST = ["method=crt", "stage1.epochs=1", "stage2.epochs=2", "stage2.batch_size=16"]
# Runs the CLI on one rank, writing a fingerprint (pixel sum) of every image that rank trained on.
RECORDING_RANK = """
import json, os, sys
import ltrepro.distributed as distributed
from ltrepro.cli import main

seen, take = [], distributed.take

def recording_take(batch, window):  # the engine's call; take's own recursion is not recorded
    distributed.take = take
    images, labels = take(batch, window)
    distributed.take = recording_take
    seen.append(images.flatten(1).sum(1).tolist())
    return images, labels

distributed.take = recording_take
code = main(sys.argv[1:])
with open(os.path.join(os.environ["SEEN_DIR"], os.environ["RANK"] + ".json"), "w") as out:
    json.dump(seen, out)
sys.exit(code)
"""


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("n", [16, 14, 5])
def test_rank_shares_are_disjoint_and_cover_the_global_batch(n, size):
    shares = [shard_window(0, n, World(rank, size)) for rank in range(size)]
    assert [i for share in shares for i in range(n)[share]] == list(range(n))
    assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


def test_take_slices_every_tensor_of_a_batch():
    images, views = torch.arange(8), (torch.arange(8) * 2, torch.arange(8) * 3)
    batch = (TwoStreamBatch(views, (images, images + 1), images + 2), images)
    (two_stream, labels) = take(batch, slice(4, 8))
    assert isinstance(two_stream, TwoStreamBatch) and labels.tolist() == [4, 5, 6, 7]
    assert two_stream.instance[1].tolist() == [12, 15, 18, 21] and two_stream.resampled_labels.tolist() == [6, 7, 8, 9]


def test_two_gloo_processes_train_as_one_process_with_the_same_global_batch(project, tmp_path):
    """cRT's stage 2 trains a head on a frozen backbone with BN in eval mode, so nothing depends on
    how the global batch is split: 2 ranks must reach 1 process's head. Each rank's share of every
    batch is what the other does not see, the two shares make up the batch (else the averaged
    gradient would differ), and rank 0 alone logs to MLflow and writes the run."""
    params = project / "params.yaml"
    single = train(params, FAST)
    stage1 = single[0].run_dir
    (tmp_path / "rank.py").write_text(RECORDING_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py"),
               "stage", "stage2", "--config", str(params), "--input", f"stage1={stage1}", "--run-dir",
               str(tmp_path / "ddp"), "--metrics", str(tmp_path / "ddp.json"), *FAST, "experiment=ddp"]  # fmt: skip
    env = {**os.environ, "SEEN_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("stage2: finished") == 1  # reported once, by rank 0

    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    train_size = json.loads((single[1].run_dir / "data_info.json").read_text())["split_sizes"]["train"]
    assert len(ranks[0]) == len(ranks[1]) == 2 * -(-train_size // 16)  # two epochs of global batches of 16
    assert sum(len(rows) for rank in ranks for rows in rank) == 2 * train_size
    for first, second in zip(*ranks):
        assert abs(len(first) - len(second)) <= 1 and not set(first) & set(second)

    one, two = (load_checkpoint(Path(d) / "best.pt")["model"] for d in (single[1].run_dir, tmp_path / "ddp"))
    head = [key for key in one if key.startswith("head.")]
    assert head and all(torch.allclose(one[k], two[k], atol=1e-5) for k in head)
    assert json.loads((tmp_path / "ddp.json").read_text())["val_top1"] == pytest.approx(single[1].metrics["val_top1"])

    (run,) = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [0, 1]  # one value per epoch: the other rank logs nothing
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["status"] == "FINISHED"
