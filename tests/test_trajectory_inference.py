"""The patient twin answers through a numpy copy of the trajectory network (a cold query must not import
torch): it must give what the torch model gives, conformal offsets included, for any weights and inputs
(random ones here, with statics or none, treatments or none), else a query would show a forecast the
trained model does not make."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation.contract.twin_specs import TrajectorySpec
from federation.twins.trajectory import ConformalTrajectory
from federation.twins.trajectory_inference import TrajectoryForward
from federation.twins.trajectory_model import TrajectoryExamples

SIGNALS = [{"name": "glucose", "concept_ids": [1], "normal_range": [70, 180]},
           {"name": "sbp", "concept_ids": [2], "normal_range": [100, 140]}]  # fmt: skip
TREATMENTS = [{"name": "insulin", "concept_ids": [3], "dose": True, "dosed_on_measurement": True},
              {"name": "furosemide", "concept_ids": [4]}]


@pytest.mark.parametrize(("statics", "treatments"), [(4, TREATMENTS), (0, TREATMENTS), (3, [])])
def test_the_numpy_forward_pass_gives_the_torch_models_outputs(statics, treatments):
    spec = TrajectorySpec(signals=SIGNALS, treatments=treatments, step_hours=4, history_steps=5, horizon_steps=3,
                          hidden=8, windows_per_patient=2)  # fmt: skip
    torch.manual_seed(1)
    model = TrajectoryExamples(spec, statics).eval()
    with torch.no_grad():  # weights away from the initialisation, as a trained model's
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(7, model.layout.input_width)).astype(np.float32)
    weights = {name: value.numpy() for name, value in model.state_dict().items()}
    offsets = rng.uniform(0.0, 0.4, size=(2, spec.horizon_steps, len(spec.signals)))
    pairs = [(TrajectoryForward(spec, statics, weights), model),
             (TrajectoryForward(spec, statics, weights, offsets), ConformalTrajectory(model, offsets))]
    for forward, reference in pairs:
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        got = forward(x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_of_another_model_are_refused_by_name():
    spec = TrajectorySpec(signals=SIGNALS, treatments=TREATMENTS, step_hours=4, history_steps=5, horizon_steps=3,
                          hidden=8)  # fmt: skip
    weights = {name: value.numpy() for name, value in TrajectoryExamples(spec, 4).state_dict().items()}
    del weights["net.decoder.hidden_map.weight"]
    with pytest.raises(ValueError, match=r"net\.decoder\.hidden_map\.weight"):
        TrajectoryForward(spec, 4, weights)
