"""bs and la: one-stage methods that are their loss, whatever stage1.loss says."""
import yaml

from ltrepro.runner import train

FAST = ["stage1.epochs=1", "stage1.batch_size=16"]


def trained_loss(result) -> dict:
    stage1 = yaml.safe_load((result.run_dir / "config.yaml").read_text())["stage1"]
    return {"loss": stage1["loss"], "loss_params": stage1["loss_params"]}


def test_bs_and_la_train_their_own_loss_and_la_tau_reaches_it(project):
    bs = train(project / "params.yaml", ["method=bs", *FAST, "stage1.loss=focal", "stage1.loss_params={gamma: 2}"])[0]
    assert trained_loss(bs) == {"loss": "balanced_softmax", "loss_params": {}}
    la = train(project / "params.yaml", ["method=la", *FAST, "la.tau=0.5"])[0]
    assert trained_loss(la) == {"loss": "logit_adjusted", "loss_params": {"tau": 0.5}}
    ce = train(project / "params.yaml", ["method=ce", *FAST])[0]
    assert len({bs.run_dir, la.run_dir, ce.run_dir}) == 3 and not ce.reused
    assert train(project / "params.yaml", ["method=la", *FAST, "la.tau=0.5"])[0].reused
    assert not train(project / "params.yaml", ["method=la", *FAST, "la.tau=1.5"])[0].reused
